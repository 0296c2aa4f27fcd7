"""NSD betas -> a prepared dataset: masked, per-session z-scored, split, repeat-averaged, cached.

:func:`prepare_subject` reads one subject's betas **one session at a time** (float32, never all sessions
in float64), writes the prepared arrays as ``.npy`` files into a cache folder keyed by a hash of every
choice in :class:`PrepareConfig` and of the identity (path, size, mtime) of every source file, and
returns a :class:`PreparedDataset` whose ``responses`` are memory-mapped. A second call with the same
choices and unchanged files is a cache hit.

Crash safety: the cache is a ``brainenc._utils.store.KeyedFolderStore`` (see there)::

    <cache_root>/
        <name>/                              a complete prepared dataset (``COMPLETE`` marker in it)
        .<name>.lock                         flock of the process preparing <name>
        .tmp-<name>-<host>-<pid>-<hex>/      the folder being built (per process)

The folder is built under the hidden per-process name, the ``COMPLETE`` marker is written last, and
only then is the folder renamed to its final name; :func:`load_prepared` refuses folders without the
marker, so a killed prepare never leaves a cache that looks complete. One process prepares a key at a
time (the lock); a second prepare of the same key waits for it, then loads its result (a cache hit).
Temporary folders of dead processes are removed by the next prepare (under the lock; those of live
ones are left alone).

Validation happens before any long work: every needed session file is checked (exists, header shape and
dtype, payload size / gzip trailer), as are the mask and ROI grids, ids and names.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Optional

import numpy as np

from brainenc._utils.io import load_npy, read_json, save_npy, write_json
from brainenc._utils.logging import get_logger, progress
from brainenc._utils.store import KeyedFolderStore
from brainenc._utils.validation import check_option, check_subject
from brainenc.config import to_dict
from brainenc.datasets import layout
from brainenc.datasets import nsd as nsdio
from brainenc.datasets.noise_ceiling import ncsnr_from_variance, noise_ceiling
from brainenc.datasets.splits import SPLITS, make_split
from brainenc.exceptions import ConfigError, DataFormatError

__all__ = ["PrepareConfig", "PreparedDataset", "prepare_subject", "load_prepared", "list_prepared",
           "FORMAT_VERSION"]

FORMAT_VERSION = 4  # bump whenever the computation changes: it is part of the cache key
COMPLETE = "COMPLETE"
MASKS = ("nsdgeneral", "brainmask", "none")
REPEATS = ("average", "single")
NCSNR_SOURCES = ("auto", "file", "compute")
_log = get_logger("datasets.prepare")


def prepared_store(cache_root: str | Path) -> KeyedFolderStore:
    """The prepared-dataset cache under ``cache_root`` (one entry folder per cache key)."""
    return KeyedFolderStore(cache_root, marker=COMPLETE, what="this prepared dataset")


@dataclasses.dataclass
class PrepareConfig:
    """Every choice that changes a prepared dataset (all recorded in its manifest and cache key).

    Parameters
    ----------
    subject : str
        ``"subj01"`` .. ``"subj08"``.
    space : {"func1pt8mm", "func1mm", "fsaverage"}
    beta_version : {"betas_fithrf_GLMdenoise_RR", "betas_fithrf", "betas_assumehrf"}
    fmt : {"nifti", "hdf5"}
        Volumetric file variant (ignored for fsaverage, which is ``.mgh``).
    mask : str
        ``"nsdgeneral"`` (label > 0), ``"brainmask"`` (volumes only), ``"none"`` (every voxel/vertex),
        or any ROI family (its labelled voxels).
    rois : list of str or None
        ROI families to carry as labels; None = every family of ``layout.ROI_FAMILIES`` whose files exist.
    zscore : bool
        z-score every voxel within each session (ddof 0; constant voxels -> 0).
    zscore_exclude_test : bool
        Compute each session's mean/std without the test split's trials (no test leakage).
    repeats : {"average", "single"}
        One row per (split, image) averaging its trials, or one row per trial.
    split : {"shared1000", "shared515", "algonauts", "nsd37"}
    n_sessions : int or None
        Use only the first ``n_sessions`` completed sessions (None = all). From the command line:
        ``brainenc prepare --set n_sessions=3`` (``brainenc run``: ``--set prepare.n_sessions=3``).
    allow_partial : bool
        When betas of some needed sessions are missing and the ones on disk run from session 1 without a gap
        (a partial download), use those with a warning instead of failing. The sessions used are recorded in
        the manifest (``n_sessions``, ``partial``) and are part of the cache key; the flag itself is not (with
        every session on disk it changes nothing). A gap (a missing session before present ones) is always
        an error. Default False: a missing file fails, naming it and the ``n_sessions`` value that works.
    ncsnr : {"auto", "file", "compute"}
        Read the release's ncsnr map, compute it from the betas (nsd_format §1.8), or file-if-present.
    chunk_trials : int
        Trials per streamed block (memory knob; does not change results, so not part of the cache key).
    """

    subject: str = "subj01"
    space: str = "func1pt8mm"
    beta_version: str = "betas_fithrf_GLMdenoise_RR"
    fmt: str = "nifti"
    mask: str = "nsdgeneral"
    rois: Optional[list[str]] = None
    zscore: bool = True
    zscore_exclude_test: bool = False
    repeats: str = "average"
    split: str = "shared1000"
    n_sessions: Optional[int] = None
    allow_partial: bool = False
    ncsnr: str = "auto"
    chunk_trials: int = 50

    def check(self) -> "PrepareConfig":
        """Validate every field (raises :class:`~brainenc.exceptions.ConfigError` naming the field)."""
        self.subject = check_option("subject", check_subject(self.subject), layout.SUBJECTS)
        check_option("space", self.space, layout.SPACES)
        check_option("beta_version", self.beta_version, layout.BETA_VERSIONS)
        check_option("fmt", self.fmt, layout.BETA_FORMATS)
        check_option("mask", self.mask, MASKS + layout.ROI_FAMILIES)
        if self.space == "fsaverage" and self.mask == "brainmask":
            raise ConfigError("'mask' 'brainmask' exists only for volume spaces; use 'nsdgeneral' or 'none' with fsaverage")
        if self.rois is not None:
            self.rois = [check_option("rois", r, layout.ROI_FAMILIES) for r in self.rois]
        check_option("repeats", self.repeats, REPEATS)
        check_option("split", self.split, SPLITS)
        check_option("ncsnr", self.ncsnr, NCSNR_SOURCES)
        if self.n_sessions is not None and (isinstance(self.n_sessions, bool) or not isinstance(self.n_sessions, int)
                                            or self.n_sessions < 1):
            raise ConfigError(f"'n_sessions' must be a positive integer or None; {self.n_sessions!r} was provided")
        if isinstance(self.chunk_trials, bool) or not isinstance(self.chunk_trials, int) or self.chunk_trials < 1:
            raise ConfigError(f"'chunk_trials' must be a positive integer; {self.chunk_trials!r} was provided")
        if not isinstance(self.zscore, bool) or not isinstance(self.zscore_exclude_test, bool):
            raise ConfigError("'zscore' and 'zscore_exclude_test' must be true or false")
        if not isinstance(self.allow_partial, bool):
            raise ConfigError(f"'allow_partial' must be true or false; {self.allow_partial!r} was provided")
        if self.zscore_exclude_test and not self.zscore:
            raise ConfigError("'zscore_exclude_test' needs 'zscore' = true")
        return self

    def key_dict(self) -> dict:
        """The choices that change the numbers (``chunk_trials`` and ``allow_partial`` excluded: the sessions
        actually read are keyed separately)."""
        d = to_dict(self)
        d.pop("chunk_trials")
        d.pop("allow_partial")
        return d


# ----------------------------------------------------------------------------------------------
# the prepared dataset
# ----------------------------------------------------------------------------------------------
class PreparedDataset:
    """A prepared dataset (in memory, or backed by a cache folder with memory-mapped responses).

    Attributes
    ----------
    path : Path or None
        Cache folder (None for in-memory datasets from the Algonauts/MindEye2 readers).
    subject : str
    cache_hit : bool
    responses : ndarray of float32, shape (n_samples, n_voxels)
        Memory-mapped when loaded from disk.
    image_ids : ndarray of int64, shape (n_samples,)
        0-based 73k ids.
    n_repeats : ndarray of int64, shape (n_samples,)
        Trials averaged into each row (1 for single trials).
    splits : dict of str -> ndarray of int64
        Row indices per split name (at least "train" and "test").
    roi_labels : dict of str -> ndarray of int32, shape (n_voxels,)
        Per family, 0 = none.
    roi_names : dict of str -> dict of int -> str
    ncsnr : ndarray of float32, shape (n_voxels,)
    noise_ceiling : ndarray of float32, shape (n_voxels,)
        Fraction (0..1) for the test split's repeat structure.
    geometry : dict
        Volume: ``space, shape, affine (4x4 list), indices (n_voxels, 3) int64``;
        fsaverage: ``space, hemi (n_voxels,) str, vertex (n_voxels,) int64``.
    manifest : dict
    stimuli_path : Path or None
    global_trials : ndarray of int64, shape (n_samples,), or None
        0-based global trial per row when ``repeats == "single"``.
    """

    def __init__(self, *, subject, responses, image_ids, n_repeats, splits, roi_labels=None, roi_names=None,
                 ncsnr=None, noise_ceiling=None, geometry=None, manifest=None, stimuli_path=None, path=None,
                 cache_hit=False, global_trials=None):
        self.path = None if path is None else Path(path)
        self.subject = subject
        self.cache_hit = bool(cache_hit)
        self.responses = responses
        self.image_ids = np.asarray(image_ids, dtype=np.int64)
        self.n_repeats = np.asarray(n_repeats, dtype=np.int64)
        self.splits = {k: np.asarray(v, dtype=np.int64) for k, v in splits.items()}
        self.roi_labels = {k: np.asarray(v, dtype=np.int32) for k, v in (roi_labels or {}).items()}
        self.roi_names = {k: {int(i): str(n) for i, n in v.items()} for k, v in (roi_names or {}).items()}
        nv = responses.shape[1]
        self.ncsnr = np.full(nv, np.nan, np.float32) if ncsnr is None else np.asarray(ncsnr, dtype=np.float32)
        self.noise_ceiling = (np.full(nv, np.nan, np.float32) if noise_ceiling is None
                              else np.asarray(noise_ceiling, dtype=np.float32))
        self.geometry = dict(geometry or {})
        self.manifest = dict(manifest or {})
        self.stimuli_path = None if stimuli_path is None else Path(stimuli_path)
        self.global_trials = None if global_trials is None else np.asarray(global_trials, dtype=np.int64)
        self._validate()

    def _validate(self) -> None:
        n, v = self.responses.shape
        where = f"{self.path}: " if self.path else ""
        for name, arr in (("image_ids", self.image_ids), ("n_repeats", self.n_repeats)):
            if arr.shape != (n,):
                raise DataFormatError(f"{where}'{name}' must have shape ({n},); found {arr.shape}")
        for name, arr in (("ncsnr", self.ncsnr), ("noise_ceiling", self.noise_ceiling)):
            if arr.shape != (v,):
                raise DataFormatError(f"{where}'{name}' must have shape ({v},); found {arr.shape}")
        for fam, arr in self.roi_labels.items():
            if arr.shape != (v,):
                raise DataFormatError(f"{where}roi_labels['{fam}'] must have shape ({v},); found {arr.shape}")
        for split, idx in self.splits.items():
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                raise DataFormatError(f"{where}split '{split}' row indices must lie in [0, {n - 1}]")

    @property
    def n_samples(self) -> int:
        return int(self.responses.shape[0])

    @property
    def n_voxels(self) -> int:
        return int(self.responses.shape[1])

    def split_counts(self) -> dict[str, int]:
        """Rows per split."""
        return {k: int(v.size) for k, v in self.splits.items()}

    def roi_masks(self) -> dict[str, np.ndarray]:
        """``"family/name"`` -> bool (n_voxels,) for every label present."""
        out = {}
        for fam, lab in self.roi_labels.items():
            names = self.roi_names.get(fam, {})
            for k in np.unique(lab):
                if k > 0:
                    out[f"{fam}/{names.get(int(k), f'label{int(k)}')}"] = lab == k
        return out

    def describe(self) -> str:
        """Human-readable summary (what ``brainenc info`` prints)."""
        m = self.manifest
        ch = m.get("choices", {})
        lines = [f"{self.subject}: {self.path if self.path else '(in memory)'}",
                 f"  source      {m.get('source', 'nsd')}; space {ch.get('space', self.geometry.get('space', '?'))}; "
                 f"betas {ch.get('beta_version', '?')}; mask {ch.get('mask', '?')}",
                 f"  choices     split {ch.get('split', '?')}; repeats {ch.get('repeats', '?')}; "
                 f"z-score {ch.get('zscore', '?')} (exclude test: {ch.get('zscore_exclude_test', '?')})"]
        if "n_sessions" in m:
            lines.append(f"  sessions    {m['n_sessions']} ({m.get('n_trials', '?')} trials read)")
        if m.get("partial"):
            pa = m["partial"]
            lines.append(f"  partial     only {pa.get('sessions_on_disk', '?')} of {pa.get('sessions_needed', '?')} "
                         "sessions were on disk (allow_partial)")
        lines.append(f"  samples     {self.n_samples} x {self.n_voxels} voxels")
        for k, idx in sorted(self.splits.items()):
            imgs = np.unique(self.image_ids[idx]).size if idx.size else 0
            trials = int(self.n_repeats[idx].sum()) if idx.size else 0
            lines.append(f"  split {k:<6} {idx.size} rows, {imgs} images, {trials} trials")
        fin = self.noise_ceiling[np.isfinite(self.noise_ceiling)]
        if fin.size:
            lines.append(f"  noise ceil. median {np.median(fin):.3f} (fraction, test repeats)")
        for name, mask in self.roi_masks().items():
            lines.append(f"  roi {name:<26} {int(mask.sum())} voxels")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"PreparedDataset(subject={self.subject!r}, n_samples={self.n_samples}, "
                f"n_voxels={self.n_voxels}, splits={self.split_counts()})")


# ----------------------------------------------------------------------------------------------
# loading / listing
# ----------------------------------------------------------------------------------------------
def load_prepared(path: str | Path, cache_hit: bool = False) -> PreparedDataset:
    """Open a prepared cache folder (responses memory-mapped read-only).

    Raises
    ------
    DataFormatError
        The folder is missing or has no ``COMPLETE`` marker (an interrupted prepare).
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DataFormatError(f"{p}: prepared dataset folder not found")
    if not (p / COMPLETE).is_file():
        raise DataFormatError(f"{p}: incomplete prepared dataset (no {COMPLETE} marker); rerun brainenc prepare")
    man = read_json(p / "manifest.json")
    geo = read_json(p / "geometry.json")
    try:
        if geo.get("space") == "fsaverage":
            geo["hemi"] = load_npy(p / "geometry_hemi.npy")
            geo["vertex"] = load_npy(p / "geometry_vertex.npy")
        else:
            geo["indices"] = load_npy(p / "geometry_indices.npy")
        splits = {name: load_npy(p / f"split_{name}.npy") for name in man["split_names"]}
        rois = {fam: load_npy(p / f"roi_{fam}.npy") for fam in man["roi_families"]}
        names = {fam: {int(k): v for k, v in tab.items()} for fam, tab in man["roi_names"].items()}
        gt = p / "global_trials.npy"
        responses = load_npy(p / "responses.npy", mmap=True)
        if responses.ndim != 2:
            raise DataFormatError(f"{p / 'responses.npy'}: must be 2-D (samples, voxels); found shape {responses.shape}")
        return PreparedDataset(
            path=p, subject=man["choices"]["subject"], cache_hit=cache_hit,
            responses=responses, image_ids=load_npy(p / "image_ids.npy"),
            n_repeats=load_npy(p / "n_repeats.npy"), splits=splits, roi_labels=rois, roi_names=names,
            ncsnr=load_npy(p / "ncsnr.npy"), noise_ceiling=load_npy(p / "noise_ceiling.npy"), geometry=geo,
            manifest=man, stimuli_path=man.get("stimuli_path"),
            global_trials=load_npy(gt) if gt.is_file() else None)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        if isinstance(exc, DataFormatError):
            raise
        raise DataFormatError(f"{p}: not a brainenc prepared dataset (manifest.json / geometry.json: "
                              f"{type(exc).__name__}: {exc}) (delete the folder and rerun brainenc prepare)") from None


def list_prepared(cache_root: str | Path | None = None, subject: str | None = None) -> list[Path]:
    """Complete prepared folders under ``cache_root`` (default ``<data root>/prepared``), sorted."""
    from brainenc._utils.paths import prepared_root

    root = Path(cache_root).expanduser() if cache_root is not None else prepared_root()
    if not root.is_dir():
        return []
    want = None if subject is None else check_subject(subject)
    out = []
    for d in sorted(root.iterdir()):
        if d.name.startswith(".") or not (d / COMPLETE).is_file():
            continue
        if want is not None and not d.name.startswith(want + "-"):
            continue
        out.append(d)
    return out


# ----------------------------------------------------------------------------------------------
# raw .npy streaming helpers (no memmap: file-backed pages would count as resident memory)
# ----------------------------------------------------------------------------------------------
class _NpyWriter:
    """Append rows of float32 to a C-order ``.npy`` whose final shape is known."""

    def __init__(self, path: Path, n_rows: int, n_cols: int):
        self.path, self.n_rows, self.n_cols, self.done = path, n_rows, n_cols, 0
        self.fh = open(path, "wb")
        np.lib.format.write_array_header_1_0(self.fh, {"descr": np.dtype(np.float32).str, "fortran_order": False,
                                                       "shape": (n_rows, n_cols)})

    def write(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=np.float32)
        assert block.shape[1] == self.n_cols
        self.fh.write(block.tobytes())
        self.done += block.shape[0]

    def close(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        if self.done != self.n_rows:
            raise RuntimeError(f"{self.path}: wrote {self.done} rows, expected {self.n_rows}")


class _NpyRows:
    """Random row reads from a C-order float32 ``.npy`` with ``os.pread``."""

    def __init__(self, path: Path):
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version != (1, 0):
                raise DataFormatError(f"{path}: unexpected .npy version {version}")
            shape, _, _ = np.lib.format.read_array_header_1_0(fh)
            self.offset = fh.tell()
        self.n_rows, self.n_cols = shape
        self.fd = os.open(path, os.O_RDONLY)
        self.row_bytes = self.n_cols * 4

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Rows (any order) as float32 (len(rows), n_cols); contiguous runs are read in one call."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((rows.size, self.n_cols), dtype=np.float32)
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        i = 0
        while i < srt.size:
            j = i + 1
            while j < srt.size and srt[j] == srt[j - 1] + 1:
                j += 1
            buf = os.pread(self.fd, (j - i) * self.row_bytes, self.offset + int(srt[i]) * self.row_bytes)
            out[order[i:j]] = np.frombuffer(buf, dtype=np.float32).reshape(j - i, self.n_cols)
            i = j
        return out

    def close(self) -> None:
        os.close(self.fd)


# ----------------------------------------------------------------------------------------------
# planning: resolve and validate every source before any long work
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Plan:
    cfg: PrepareConfig
    root: Path
    table: object
    split_masks: dict
    sessions: list
    headers: dict  # session -> list of BetasHeader (1 for volumes, lh+rh for fsaverage)
    select: list  # volumes: [indices (n,3)]; fsaverage: [lh vertices, rh vertices]
    geometry: dict
    roi_labels: dict
    roi_names: dict
    ncsnr_file: Optional[np.ndarray]
    sources: list
    stimuli: Optional[Path]
    partial: Optional[dict] = None  # allow_partial used: sessions on disk vs needed


def _family_files(root, cfg, family):
    if cfg.space == "fsaverage":
        files = [layout.roi_path(root, cfg.subject, cfg.space, family, hemi=h) for h in layout.HEMIS]
    else:
        files = [layout.roi_path(root, cfg.subject, cfg.space, family)]
    return files


def _label_names(root, cfg, family, labels, files):
    ctab = layout.ctab_path(root, cfg.subject, family, space=cfg.space)
    if ctab.is_file():
        table, src = nsdio.read_ctab(ctab), ctab
    else:
        table, src = dict(layout.LABEL_TABLES[family]), None
    present = np.unique(labels[labels > 0])
    unknown = [int(k) for k in present if int(k) not in table]
    if unknown:
        raise DataFormatError(f"{files[0]}: labels {unknown} are not in the {family} label table "
                              f"({src or 'brainenc.datasets.layout.LABEL_TABLES'}: {sorted(table)})")
    return {k: v for k, v in table.items() if k > 0}, src


def _session_files(root: Path, cfg: PrepareConfig, session: int) -> list[Path]:
    if cfg.space == "fsaverage":
        return [layout.betas_path(root, cfg.subject, cfg.space, cfg.beta_version, session, hemi=h)
                for h in layout.HEMIS]
    return [layout.betas_path(root, cfg.subject, cfg.space, cfg.beta_version, session, fmt=cfg.fmt)]


def _override(key: str, value) -> str:
    """How to set a PrepareConfig key from the command line: ``brainenc prepare`` (top-level key) and a
    pipeline run (``brainenc run``, key under ``prepare.``); for the end of a message's parenthesis."""
    return f"--set {key}={value}; in a pipeline: --set prepare.{key}={value}"


def _sessions_on_disk(root: Path, cfg: PrepareConfig, needed: list[int], n_design: int) -> tuple[int, Path] | None:
    """None when every needed session is on disk, else ``(sessions on disk, first missing file)``.

    Sessions on disk must run 1..k without a gap: a missing session followed by present ones is an error
    naming the missing file (a partial download only ever lacks the last sessions).
    """
    for s in needed:
        absent = [f for f in _session_files(root, cfg, s) if not f.is_file()]
        if not absent:
            continue
        missing = absent[0]
        later = [t for t in range(s + 1, n_design + 1) if any(f.is_file() for f in _session_files(root, cfg, t))]
        if later:
            use = (f"or use the first {s - 1} session{'s' if s > 2 else ''} with {_override('n_sessions', s - 1)}"
                   if s > 1 else "sessions on disk must run from 01 without gaps")
            raise DataFormatError(f"{missing}: betas file not found, but later sessions are on disk "
                                  f"(session {later[0]:02d}{' and more' if len(later) > 1 else ''}): sessions must "
                                  f"be contiguous from 01 (restore this file, {use})")
        if s == 1:
            raise DataFormatError(f"{missing}: betas file not found; no session of {cfg.subject} is on disk in "
                                  f"{missing.parent} (check --nsd-root and the space, beta_version and fmt choices)")
        return s - 1, missing
    return None


def _check_ncsnr_selected(values: np.ndarray, path: Path, mask: str) -> None:
    """The ncsnr of the selected voxels must be finite and >= 0 (nsd_format §1.8: sqrt(max(0, 1-v^2))/v)."""
    bad = ~np.isfinite(values)
    if bad.any():
        raise DataFormatError(f"{path}: ncsnr is NaN/inf in {int(bad.sum())} of the {values.size} voxels selected "
                              f"by mask '{mask}' (their noise ceilings would be NaN; fix or re-download the file, "
                              f"or compute ncsnr from the betas with {_override('ncsnr', 'compute')})")
    neg = values < 0
    if neg.any():
        raise DataFormatError(f"{path}: ncsnr is negative in {int(neg.sum())} of the {values.size} voxels selected "
                              f"by mask '{mask}' (minimum {values.min():.4g}; ncsnr is >= 0 by definition, so the "
                              f"file is corrupt; re-download it or use {_override('ncsnr', 'compute')})")


def _plan(root: Path, cfg: PrepareConfig) -> _Plan:
    sources: list[Path] = []
    n_avail = layout.n_sessions(root, cfg.subject)
    n_sess = n_avail if cfg.n_sessions is None else cfg.n_sessions
    if n_sess > n_avail:
        raise ConfigError(f"'n_sessions' must be <= {n_avail} (completed sessions of {cfg.subject}); {n_sess} was provided")
    exp = nsdio.load_expdesign(layout.expdesign_path(root))
    sources.append(exp.path)
    sess_table = {s: layout.n_sessions(root, s) for s in layout.SUBJECTS}

    def split_for(n: int):
        table = nsdio.trial_table(exp, cfg.subject, n)
        masks = make_split(cfg.split, table, expdesign=exp, sessions_per_subject=sess_table)
        used = np.zeros(table.n_trials, dtype=bool)
        for m in masks.values():
            used |= m
        return table, masks, used, [int(s) for s in np.unique(table.session[used])]

    table, masks, used, sessions = split_for(n_sess)
    # --- which sessions are on disk (a partial download lacks the last ones), before anything is read
    partial = None
    short = _sessions_on_disk(root, cfg, sessions, n_avail)
    if short is not None:
        k, missing = short
        if not cfg.allow_partial:
            raise DataFormatError(
                f"{missing}: betas file not found; only {k} session{'s' if k > 1 else ''} (01-{k:02d}) of the "
                f"{max(sessions)} needed for {cfg.subject} are on disk (a partial download? use them with "
                f"--set n_sessions={k}, or --set allow_partial=true to use whatever is on disk; in a pipeline: "
                f"--set prepare.n_sessions={k})")
        _log.warning("%s: using the %d sessions on disk (01-%02d) of the %d needed: %s not found (allow_partial)",
                     cfg.subject, k, k, max(sessions), missing)
        partial = {"sessions_on_disk": k, "sessions_needed": max(sessions), "first_missing": str(missing)}
        n_sess = k
        table, masks, used, sessions = split_for(n_sess)
    if not masks["train"].any() or not masks["test"].any():
        raise DataFormatError(f"split '{cfg.split}' of {cfg.subject} over {n_sess} sessions leaves an empty "
                              f"{'train' if not masks['train'].any() else 'test'} set")

    stim = layout.stimuli_path(root)
    stimuli = None
    if stim.is_file():
        st = nsdio.NSDStimuli(stim)
        n_stim = len(st)
        st.close()
        top = int(table.image_id[used].max())
        if top >= n_stim:
            raise DataFormatError(f"{stim}: 73k id {top} used by {cfg.subject} is out of range for "
                                  f"'imgBrick' with {n_stim} images")
        stimuli = stim
        sources.append(stim)

    # --- betas headers, every needed session, before reading any payload
    headers: dict[int, list] = {}
    vgrid: Optional[nsdio.VolumeGrid] = None  # volumes: the betas' grid every mask/ROI/ncsnr must share
    if cfg.space == "fsaverage":
        spatial = [None, None]
        for s in sessions:
            hs = []
            for i, p in enumerate(_session_files(root, cfg, s)):
                hdr = nsdio.check_betas_file(p, kind="mgh", shape=spatial[i])
                spatial[i] = (hdr.shape[0],)
                hs.append(hdr)
                sources.append(p)
            headers[s] = hs
        n_vert = [spatial[0][0], spatial[1][0]]
    else:
        grid = None
        for s in sessions:
            p = _session_files(root, cfg, s)[0]
            hdr = nsdio.check_betas_file(p, kind=cfg.fmt, shape=grid)
            grid = tuple(hdr.shape[:3]) if cfg.fmt == "nifti" else tuple(hdr.shape[1:][::-1])
            if vgrid is None:
                vgrid = nsdio.VolumeGrid(grid, hdr.affine, p)
            elif hdr.affine is not None:
                why = nsdio.affine_mismatch(hdr.affine, vgrid.affine)
                if why is not None:
                    raise DataFormatError(f"{p}: betas affine differs from that of {vgrid.path}: {why} (every "
                                          "session must be on one grid; re-download this file)")
            headers[s] = [hdr]
            sources.append(p)

    def load_vol(path: Path, what: str) -> np.ndarray:
        nonlocal vgrid
        data, aff = nsdio.load_volume(path, what=what, grid=vgrid)
        if vgrid.affine is None:  # HDF5 betas carry no affine: the first NIfTI read sets the reference
            vgrid = dataclasses.replace(vgrid, affine=aff, affine_path=path)
        return data

    # --- ROI families
    families = list(cfg.rois) if cfg.rois is not None else [
        f for f in layout.ROI_FAMILIES if all(p.is_file() for p in _family_files(root, cfg, f))]
    if cfg.mask in layout.ROI_FAMILIES and cfg.mask not in families:
        families.append(cfg.mask)
    full_labels: dict[str, np.ndarray] = {}
    roi_names: dict[str, dict] = {}
    for fam in families:
        files = _family_files(root, cfg, fam)
        for f in files:
            if not f.is_file():
                raise DataFormatError(f"{f}: ROI file for family '{fam}' not found")
        if cfg.space == "fsaverage":
            lab = np.concatenate([nsdio.load_roi_surface(f, n) for f, n in zip(files, n_vert)])
        else:
            lab = nsdio._as_labels(load_vol(files[0], f"'{fam}' ROI volume"), files[0], "ROI volume")
        names, ctab = _label_names(root, cfg, fam, lab, files)
        full_labels[fam] = lab
        roi_names[fam] = names
        sources.extend(files + ([ctab] if ctab else []))

    # --- voxel selection (canonical order: np.nonzero on (X, Y, Z); fsaverage lh then rh)
    if cfg.space == "fsaverage":
        if cfg.mask == "none":
            sel = [np.arange(n_vert[0]), np.arange(n_vert[1])]
        else:
            lab = full_labels[cfg.mask]
            sel = [np.nonzero(lab[: n_vert[0]] > 0)[0], np.nonzero(lab[n_vert[0]:] > 0)[0]]
        geometry = {"space": cfg.space, "n_vertices": n_vert,
                    "hemi": np.array(["lh"] * sel[0].size + ["rh"] * sel[1].size),
                    "vertex": np.concatenate(sel).astype(np.int64)}
        offsets = [0, n_vert[0]]
        select = [s.astype(np.int64) for s in sel]
        flat_sel = np.concatenate([s + o for s, o in zip(sel, offsets)])
    else:
        if cfg.mask == "none":
            mask = np.ones(grid, dtype=bool)
        elif cfg.mask == "brainmask":
            bp = layout.brainmask_path(root, cfg.subject, cfg.space)
            mask = load_vol(bp, "brainmask") > 0
            sources.append(bp)
        else:
            mask = full_labels[cfg.mask] > 0
        idx = np.argwhere(mask).astype(np.int64)
        affine = vgrid.affine
        if affine is None:  # HDF5 betas and no NIfTI read: the spec's affine (nsd_format §1.5)
            r = layout.VOXEL_SIZE[cfg.space]
            affine = np.diag([r, r, r, 1.0])
            affine[:3, 3] = -((np.asarray(grid) + 1) / 2 - 1) * r
        geometry = {"space": cfg.space, "shape": list(grid), "affine": np.asarray(affine).tolist(), "indices": idx}
        select = [idx]
        flat_sel = np.ravel_multi_index(tuple(idx.T), grid)
    if flat_sel.size == 0:
        raise DataFormatError(f"mask '{cfg.mask}' of {cfg.subject} selects no voxels")
    roi_labels = {fam: np.maximum(lab.reshape(-1)[flat_sel], 0).astype(np.int32) for fam, lab in full_labels.items()}

    # --- ncsnr: grid, affine and values of the selected voxels checked here, before any betas are read
    ncsnr_file = None
    if cfg.ncsnr != "compute":
        paths = ([layout.ncsnr_path(root, cfg.subject, cfg.space, cfg.beta_version, hemi=h) for h in layout.HEMIS]
                 if cfg.space == "fsaverage" else [layout.ncsnr_path(root, cfg.subject, cfg.space, cfg.beta_version)])
        if all(p.is_file() for p in paths):
            if cfg.space == "fsaverage":
                full, paths = nsdio.load_ncsnr(root, cfg.subject, cfg.space, cfg.beta_version, tuple(n_vert))
                per_file = [(full[: n_vert[0]][sel[0]], paths[0]), (full[n_vert[0]:][sel[1]], paths[1])]
            else:
                data = nsdio.check_ncsnr_values(load_vol(paths[0], "ncsnr"), paths[0])
                full = data
                per_file = [(data.reshape(-1)[flat_sel], paths[0])]
            for values, path in per_file:
                _check_ncsnr_selected(values, path, cfg.mask)
            ncsnr_file = full.reshape(-1)[flat_sel]
            sources.extend(paths)
        elif cfg.ncsnr == "file":
            missing = next(p for p in paths if not p.is_file())
            raise DataFormatError(f"{missing}: ncsnr file not found (ncsnr='file'; use 'auto' or 'compute')")
    return _Plan(cfg=cfg, root=root, table=table, split_masks=masks, sessions=sessions, headers=headers,
                 select=select, geometry=geometry, roi_labels=roi_labels, roi_names=roi_names,
                 ncsnr_file=ncsnr_file, sources=sources, stimuli=stimuli, partial=partial)


def _versions() -> dict:
    import h5py
    import nibabel
    import scipy

    from brainenc._version import __version__

    return {"brainenc": __version__, "format": FORMAT_VERSION, "numpy": np.__version__, "scipy": scipy.__version__,
            "h5py": h5py.__version__, "nibabel": nibabel.__version__, "python": platform.python_version()}


def _cache_key(plan: _Plan) -> tuple[str, list[dict]]:
    idents = [nsdio.file_identity(p) for p in plan.sources]
    blob = json.dumps({"format": FORMAT_VERSION, "choices": plan.cfg.key_dict(), "sessions": plan.sessions,
                       "n_sessions": plan.table.n_sessions, "sources": idents}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16], idents


# ----------------------------------------------------------------------------------------------
# the work
# ----------------------------------------------------------------------------------------------
def _read_session(plan: _Plan, session: int) -> np.ndarray:
    """All 750 trials of one session, masked: float32 (750, n_voxels) PSC."""
    parts = []
    for hdr, sel in zip(plan.headers[session], plan.select):
        blocks = [b for _, b in nsdio.iter_betas_chunks(hdr, sel, chunk=plan.cfg.chunk_trials)]
        block = np.concatenate(blocks, axis=0)
        if not np.isfinite(block).all():
            raise DataFormatError(f"{hdr.path}: betas contain {int((~np.isfinite(block)).sum())} NaN/inf values "
                                  "in the selected voxels")
        parts.append(block)
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def _build(plan: _Plan, out: Path) -> dict:
    cfg, table = plan.cfg, plan.table
    tpt = layout.TRIALS_PER_SESSION
    n_vox = int(sum(s.shape[0] for s in plan.select))
    test_mask = plan.split_masks["test"]
    # rows of the single-trial file: whole needed sessions, in order
    file_row = np.full(table.n_trials, -1, dtype=np.int64)
    for i, s in enumerate(plan.sessions):
        file_row[(s - 1) * tpt: s * tpt] = np.arange(i * tpt, (i + 1) * tpt)
    n_file = len(plan.sessions) * tpt
    # per session: stored = (x - m_used) / sd_used; nsd z = (x - m_all) / sd_all  -> affine map for ncsnr
    m_used = np.zeros((len(plan.sessions), n_vox))
    sd_used = np.ones((len(plan.sessions), n_vox))
    m_all = np.zeros((len(plan.sessions), n_vox))
    sd_all = np.ones((len(plan.sessions), n_vox))
    constant = np.zeros((len(plan.sessions), n_vox), dtype=bool)

    trials_path = out / "_trials.npy"
    writer = _NpyWriter(trials_path, n_file, n_vox)
    try:
        for i, s in enumerate(progress(plan.sessions, desc=f"{cfg.subject} sessions", unit="session")):
            x = _read_session(plan, s)  # float32 (750, n_vox)
            m_all[i] = x.mean(axis=0, dtype=np.float64)
            sd_all[i] = x.std(axis=0, dtype=np.float64)
            constant[i] = sd_all[i] == 0  # invalid in this session (all-zero betas): NaN for ncsnr
            sd_all[i][constant[i]] = 1.0
            if cfg.zscore:
                if cfg.zscore_exclude_test:
                    stat_rows = ~test_mask[(s - 1) * tpt: s * tpt]
                    if not stat_rows.any():
                        raise DataFormatError(f"session {s} of {cfg.subject} has only test trials; cannot compute "
                                              "z-scoring statistics without them (zscore_exclude_test)")
                    xs = x[stat_rows]
                    m_used[i] = xs.mean(axis=0, dtype=np.float64)
                    sd_used[i] = xs.std(axis=0, dtype=np.float64)
                    sd_used[i][sd_used[i] == 0] = 1.0
                    del xs
                else:
                    m_used[i], sd_used[i] = m_all[i], sd_all[i]
                x -= m_used[i].astype(np.float32)
                x /= sd_used[i].astype(np.float32)
            writer.write(x)
            del x
    except BaseException:
        writer.fh.close()  # the caller removes the whole temporary folder
        raise
    writer.close()

    used = np.zeros(table.n_trials, dtype=bool)
    for m in plan.split_masks.values():
        used |= m
    reader = _NpyRows(trials_path)
    reuse = False
    try:
        if cfg.repeats == "single":
            rows = np.nonzero(used)[0]  # chronological
            image_ids = table.image_id[rows]
            n_rep = np.ones(rows.size, dtype=np.int64)
            split_of = {k: m[rows] for k, m in plan.split_masks.items()}
            reuse = np.array_equal(file_row[rows], np.arange(n_file))  # every row read is used, in order
            if not reuse:
                resp = _NpyWriter(out / "responses.npy", rows.size, n_vox)
                for c0 in range(0, rows.size, 2048):
                    resp.write(reader.read(file_row[rows[c0:c0 + 2048]]))
                resp.close()
            save_npy(out / "global_trials.npy", table.global_trial[rows])
        else:
            # one row per (split, image); images are disjoint across splits, so order by 73k id
            label = np.full(table.n_trials, -1, dtype=np.int64)
            names = list(plan.split_masks)
            for j, k in enumerate(names):
                label[plan.split_masks[k]] = j
            t_used = np.nonzero(used)[0]
            pairs = np.stack([table.image_id[t_used], label[t_used]], axis=1)
            uniq_pairs, inv = np.unique(pairs, axis=0, return_inverse=True)
            inv = inv.reshape(-1)
            if np.unique(uniq_pairs[:, 0]).size != uniq_pairs.shape[0]:
                raise RuntimeError("an image falls in two splits")  # guarded by the split definitions
            order = np.argsort(inv, kind="stable")
            counts = np.bincount(inv, minlength=uniq_pairs.shape[0])
            starts = np.r_[0, np.cumsum(counts)]
            image_ids = uniq_pairs[:, 0]
            n_rep = counts.astype(np.int64)
            split_of = {k: uniq_pairs[:, 1] == j for j, k in enumerate(names)}
            resp = _NpyWriter(out / "responses.npy", image_ids.size, n_vox)
            step = 256  # images per block (bounds the float64 block at ~3 x 256 x n_vox x 8 bytes)
            for g0 in range(0, image_ids.size, step):
                g1 = min(g0 + step, image_ids.size)
                trials = t_used[order[starts[g0]:starts[g1]]]
                block = reader.read(file_row[trials]).astype(np.float64)
                means = np.add.reduceat(block, starts[g0:g1] - starts[g0], axis=0) / counts[g0:g1, None]
                resp.write(means.astype(np.float32))
            resp.close()

        # ncsnr
        if plan.ncsnr_file is not None:
            ncsnr, ncsnr_source = plan.ncsnr_file, "file"
        else:
            ncsnr, ncsnr_source = _compute_ncsnr(plan, reader, file_row, m_used, sd_used, m_all, sd_all,
                                                  constant), "computed"
    finally:
        reader.close()
    if reuse:  # the single-trial file is the output: no copy
        os.replace(trials_path, out / "responses.npy")
    else:
        trials_path.unlink()

    test_rows = np.nonzero(split_of["test"])[0]
    nc = noise_ceiling(ncsnr, n_rep[test_rows])
    save_npy(out / "image_ids.npy", image_ids.astype(np.int64))
    save_npy(out / "n_repeats.npy", n_rep)
    for k, m in split_of.items():
        save_npy(out / f"split_{k}.npy", np.nonzero(m)[0].astype(np.int64))
    for fam, lab in plan.roi_labels.items():
        save_npy(out / f"roi_{fam}.npy", lab)
    save_npy(out / "ncsnr.npy", np.asarray(ncsnr, dtype=np.float32))
    save_npy(out / "noise_ceiling.npy", nc.astype(np.float32))
    geo = {k: v for k, v in plan.geometry.items() if k not in ("indices", "hemi", "vertex")}
    if cfg.space == "fsaverage":
        save_npy(out / "geometry_hemi.npy", plan.geometry["hemi"])
        save_npy(out / "geometry_vertex.npy", plan.geometry["vertex"])
    else:
        save_npy(out / "geometry_indices.npy", plan.geometry["indices"])
    write_json(out / "geometry.json", geo)
    return {"split_names": list(split_of), "ncsnr_source": ncsnr_source,
            "n_trials": int(n_file), "n_samples": int(image_ids.size), "n_voxels": n_vox,
            "split_counts": {k: int(m.sum()) for k, m in split_of.items()}}


def _compute_ncsnr(plan, reader, file_row, m_used, sd_used, m_all, sd_all, constant) -> np.ndarray:
    """nsd_format §1.8 from the single-trial file: per-session z (all trials, ddof 1), 3-repeat images only."""
    table = plan.table
    tpt = layout.TRIALS_PER_SESSION
    sess_pos = {s: i for i, s in enumerate(plan.sessions)}
    in_file = file_row >= 0
    t = np.nonzero(in_file)[0]
    slots, counts = np.unique(table.slot[t], return_counts=True)
    keep = slots[counts == 3]
    if keep.size == 0:
        raise DataFormatError(f"cannot compute ncsnr for {plan.cfg.subject}: no image has exactly 3 trials in the "
                              f"sessions read; provide the ncsnr file or use more sessions")
    t3 = t[np.isin(table.slot[t], keep)]
    t3 = t3[np.argsort(table.slot[t3], kind="stable")].reshape(-1, 3)  # (n_img, 3) trials per image
    n_vox = m_all.shape[1]
    # stored y = (x - m_used) / sd_used; the recipe's z = (x - m_all) / sd1 with MATLAB std (ddof 1),
    # sd1 = sd_all * sqrt(n / (n - 1)); so z = a * y + b per (session, voxel)
    sd1 = sd_all * np.sqrt(tpt / (tpt - 1))
    a = sd_used / sd1
    b = (m_used - m_all) / sd1
    a[constant] = np.nan  # a voxel constant within a session has no z-score there
    acc = np.zeros(n_vox)
    n_ok = np.zeros(n_vox)
    step = 128  # images per block: bounds the float64 temporaries (~3 x 384 x n_vox x 8 bytes)
    for g0 in range(0, t3.shape[0], step):
        tr = t3[g0:g0 + step].reshape(-1)
        si = np.array([sess_pos[int(s)] for s in (tr // tpt + 1)])
        z = reader.read(file_row[tr]).astype(np.float64)
        z *= a[si]
        z += b[si]
        var = z.reshape(-1, 3, n_vox).var(axis=1, ddof=1)
        del z
        ok = np.isfinite(var)
        acc += np.where(ok, var, 0.0).sum(axis=0)
        n_ok += ok.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return ncsnr_from_variance(acc / n_ok)


def prepare_subject(nsd_root: str | Path, cfg: PrepareConfig | None = None,
                    cache_root: str | Path | None = None) -> PreparedDataset:
    """Prepare (or load from cache) one subject's dataset.

    Parameters
    ----------
    nsd_root : str or Path
        Folder holding ``nsddata/``, ``nsddata_betas/``, ``nsddata_stimuli/`` (real or simulated).
    cfg : PrepareConfig, optional
        Defaults: subj01, func1pt8mm, GLMdenoise_RR, NIfTI, nsdgeneral, z-scored, averaged, shared1000.
    cache_root : str or Path, optional
        Default ``<data root>/prepared``.

    Returns
    -------
    PreparedDataset
        ``cache_hit`` is True when an identical prepared folder already existed.

    Raises
    ------
    ConfigError
        Unknown subject/space/ROI/split names or inconsistent options.
    DataFormatError
        Missing or malformed source files (raised before any session is read).
    """
    from brainenc._utils.paths import prepared_root

    cfg = (cfg or PrepareConfig())
    cfg = dataclasses.replace(cfg).check()
    root = Path(nsd_root).expanduser()
    if not root.is_dir():
        raise DataFormatError(f"{root}: NSD root folder not found (run 'brainenc simulate' or point --nsd-root at the release)")
    cache_root = Path(cache_root).expanduser() if cache_root is not None else prepared_root()
    plan = _plan(root, cfg)
    key, idents = _cache_key(plan)
    name = f"{cfg.subject}-{cfg.space}-{cfg.split}-{cfg.repeats}-{key}"
    store = prepared_store(cache_root)
    done = store.complete(name)
    if done is not None:
        return load_prepared(done, cache_hit=True)
    # one writer per key; a second prepare of the same key waits for it, then loads its result. Under
    # the lock, temporaries of killed prepares (any key) go; those of live processes stay.
    with store.write(name, marker={"key": key}, wait=None) as entry:
        if entry.existing is None:
            _log.info("preparing %s (%s, %s, %d sessions) -> %s", cfg.subject, cfg.space, cfg.split,
                      len(plan.sessions), entry.final)
            stats = _build(plan, entry.path)
            manifest = {
                "source": "nsd",
                "choices": cfg.key_dict(),
                "key": key,
                "nsd_root": str(root.resolve()),
                "n_sessions": plan.table.n_sessions,
                "sessions_read": plan.sessions,
                "partial": plan.partial,
                "allow_partial": cfg.allow_partial,
                "sources": idents,
                "stimuli_path": None if plan.stimuli is None else str(plan.stimuli.resolve()),
                "roi_families": list(plan.roi_labels),
                "roi_names": {f: {str(k): v for k, v in t.items()} for f, t in plan.roi_names.items()},
                "simulated": layout.simulation_manifest(root) is not None,
                "versions": _versions(),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "conventions": {
                    "image_ids": "0-based 73k ids", "sessions": "1-based", "global_trials": "0-based",
                    "units": "z-scores" if cfg.zscore else "% signal change",
                    "zscore": "per session and voxel, ddof 0, std 0 -> 1" + (
                        ", statistics without test trials" if cfg.zscore_exclude_test else ", over all trials"),
                    "voxel_order": "np.nonzero on the (X, Y, Z) mask" if cfg.space != "fsaverage"
                    else "lh then rh, ascending vertex",
                    "noise_ceiling": "fraction ncsnr^2/(ncsnr^2 + mean(1/n)) over the test rows' repeat counts",
                },
                **stats,
            }
            write_json(entry.path / "manifest.json", manifest)
    return load_prepared(entry.final, cache_hit=entry.existing is not None)
