"""Subject-level fMRI time series for group analyses: a :class:`Cohort` is subjects' ROI time
series plus their phenotype (diagnosis, site, official split).

The loaders (:func:`load_cohort`) read the layout most labs ship: one ROI table per subject
(ABIDE-PCP ``.1D`` / CSV / TSV, rows = time points, columns = ROIs) and a phenotypic CSV with one
row per subject. The simulated cohort (:mod:`brainenc.datasets.simulate_cohort`) is written in
exactly this layout, so it is read by the same code as real data.

On-disk layout of a cohort folder (what ``load_cohort(folder)`` reads with no other argument)::

    cohort.json                 {"name", "tr", "atlas", "roi_names", "id_column", "label_column",
                                 "site_column", "split_column", "tables", "label_names"} (optional)
    phenotypic.csv              one row per subject (id, diagnosis, site, split, age, ...)
    rois_<atlas>/<site>_<id>_rois_<atlas>.1D
                                ABIDE-PCP style: a '#' header line of ROI labels, then one
                                whitespace-separated row per time point
    confounds/<id>_confounds.tsv   optional, one row per time point (motion parameters, FD)
    ground_truth.npz            simulated cohorts only (see simulate_cohort)

``cohort.json`` keys (all optional; keyword arguments of :func:`load_cohort` override them):

- ``name`` (str), ``atlas`` (str, informative), ``tr`` (seconds; or a ``{subject id: TR}`` table),
  ``roi_names`` (list, overrides the table headers);
- ``id_column`` (default ``"subject_id"``), ``label_column``, ``site_column``, ``split_column``,
  ``tr_column``: columns of ``phenotypic.csv`` (``phenotype`` names another CSV, relative to the folder);
- ``tables``: a glob relative to the folder (e.g. ``"rois_cc200/*.1D"``); default ``rois_*/*`` tables;
- ``label_names``: class order/names (a list, or a ``{value: name}`` table);
- ``confounds``: a glob of per-subject confound TSVs (e.g. ``"confounds/*_confounds.tsv"``).

Subject ids are compared as **strings**: ABIDE's ``0050002`` in a file name does not match ``50002``
in a phenotype CSV (no leading zeros are stripped; fix the CSV, or pass ``id_pattern`` and a matching
id column).
"""
from __future__ import annotations

import dataclasses
import glob as _glob
import io
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from brainenc._utils.io import read_json, write_json, write_text
from brainenc._utils.logging import get_logger
from brainenc.exceptions import ConfigError, DataFormatError

__all__ = ["Cohort", "load_cohort", "cohort_from_arrays", "write_roi_table", "write_cohort_json",
           "COHORT_JSON", "PHENOTYPE_CSV"]

log = get_logger("datasets")

COHORT_JSON = "cohort.json"
PHENOTYPE_CSV = "phenotypic.csv"
TABLE_SUFFIXES = (".1d", ".csv", ".tsv", ".txt")


@dataclasses.dataclass
class Cohort:
    """ROI time series of a group of subjects with their phenotype.

    Attributes
    ----------
    name : str
        Cohort name (folder name by default).
    series : list of ndarray
        One float32 array [n_timepoints_i, n_rois] per subject (lengths may differ).
    subject_ids : ndarray of str [n_subjects]
    tr : float
        Repetition time in seconds (the same for every subject; validated).
    roi_names : list of str [n_rois]
    labels : ndarray of int [n_subjects] or None
        Class index per subject (into ``label_names``), e.g. 0 = control, 1 = patient.
    label_names : list of str or None
    sites : ndarray of str [n_subjects] or None
        Acquisition site (for leave-site-out folds and site harmonisation).
    split : ndarray of str [n_subjects] or None
        Official hold-out split ("train" / "test") when the cohort has one.
    phenotype : dict of str -> ndarray [n_subjects]
        Every phenotype column, rows in ``subject_ids`` order.
    confounds : list of ndarray or None
        Per-subject confound tables [n_timepoints_i, n_confounds] (motion parameters, FD).
    confound_names : list of str or None
    files : list of Path
        The table each subject's series was read from (empty for in-memory cohorts).
    root : Path or None
        The cohort folder.
    """

    name: str
    series: list
    subject_ids: np.ndarray
    tr: float
    roi_names: list
    labels: np.ndarray | None = None
    label_names: list | None = None
    sites: np.ndarray | None = None
    split: np.ndarray | None = None
    phenotype: dict = dataclasses.field(default_factory=dict)
    confounds: list | None = None
    confound_names: list | None = None
    files: list = dataclasses.field(default_factory=list)
    root: Path | None = None

    @property
    def n_subjects(self) -> int:
        return len(self.series)

    @property
    def n_rois(self) -> int:
        return len(self.roi_names)

    def subset(self, index: Sequence[int] | np.ndarray) -> "Cohort":
        """The cohort restricted to ``index`` (rows in this cohort's order)."""
        idx = np.asarray(index, dtype=np.int64)

        def take(a):
            return None if a is None else np.asarray(a)[idx]

        return dataclasses.replace(
            self, series=[self.series[i] for i in idx], subject_ids=self.subject_ids[idx],
            labels=take(self.labels), sites=take(self.sites), split=take(self.split),
            phenotype={k: np.asarray(v)[idx] for k, v in self.phenotype.items()},
            confounds=None if self.confounds is None else [self.confounds[i] for i in idx],
            files=[self.files[i] for i in idx] if self.files else [])

    def lengths(self) -> np.ndarray:
        """Time points per subject (int64 [n_subjects])."""
        return np.array([len(s) for s in self.series], dtype=np.int64)

    def describe(self) -> str:
        """One line: subjects, ROIs, TRs, classes and sites."""
        lengths = self.lengths()
        parts = [f"cohort '{self.name}': {self.n_subjects} subjects x {self.n_rois} ROIs",
                 f"{lengths.min()}-{lengths.max()} time points at TR {self.tr:g} s" if len(lengths) else "empty"]
        if self.labels is not None:
            names = self.label_names or [str(k) for k in range(int(self.labels.max()) + 1)]
            counts = np.bincount(self.labels, minlength=len(names))
            parts.append(", ".join(f"{n} {names[k]}" for k, n in enumerate(counts)))
        if self.sites is not None:
            parts.append(f"{len(np.unique(self.sites))} sites")
        if self.split is not None:
            u, c = np.unique(self.split, return_counts=True)
            parts.append("split " + "/".join(f"{n} {s}" for s, n in zip(u, c)))
        return "; ".join(parts)

    def info(self) -> dict[str, Any]:
        """JSON-able summary (for stage records and reports)."""
        return {"name": self.name, "n_subjects": self.n_subjects, "n_rois": self.n_rois, "tr": self.tr,
                "lengths": [int(v) for v in self.lengths()], "label_names": self.label_names,
                "root": str(self.root) if self.root else None}


# ----------------------------------------------------------------------------------------------
# writers
# ----------------------------------------------------------------------------------------------
def write_roi_table(path: str | Path, series: np.ndarray, roi_names: Sequence[str]) -> Path:
    """Write one subject's ROI time series as an ABIDE-PCP style ``.1D`` table, atomically.

    Parameters
    ----------
    path : str or Path
        Target file (parent folders are created).
    series : ndarray, shape (n_timepoints, n_rois)
    roi_names : sequence of str [n_rois]
        Written as the header line ``#name1<TAB>name2...``; names may not contain tabs or newlines or
        start with ``#``.

    Returns
    -------
    Path
        ``path``. Values are written with ``%.9g`` (float32 values round-trip exactly).
    """
    x = np.asarray(series, dtype=np.float64)
    names = [str(n) for n in roi_names]
    if x.ndim != 2:
        raise ConfigError(f"'series' must be [n_timepoints, n_rois]; shape {x.shape} was provided")
    if len(names) != x.shape[1]:
        raise ConfigError(f"'roi_names' has {len(names)} names; 'series' has {x.shape[1]} ROI columns")
    bad = [n for n in names if not n.strip() or any(c in n for c in "\t\r\n") or n.lstrip().startswith("#")]
    if bad:
        raise ConfigError(f"'roi_names' must be non-empty, without tabs/newlines and not start with '#'; "
                          f"found {bad[0]!r}")
    buf = io.StringIO()
    buf.write("#" + "\t".join(names) + "\n")
    np.savetxt(buf, x, fmt="%.9g", delimiter="\t")
    return write_text(path, buf.getvalue())


def write_cohort_json(root: str | Path, **meta) -> Path:
    """Write ``root/cohort.json`` atomically (keys as documented in this module; numpy values converted)."""
    return write_json(Path(root) / COHORT_JSON, meta)


# ----------------------------------------------------------------------------------------------
# validation shared by the file and array loaders
# ----------------------------------------------------------------------------------------------
def _check_series(x: np.ndarray, where: str, roi_names: Sequence[str], min_timepoints: int,
                  allow_constant: bool) -> np.ndarray:
    """float32 [T, R] with no NaN/inf column, no constant column and at least ``min_timepoints`` rows."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise DataFormatError(f"{where}: ROI series must be 2-D [n_timepoints, n_rois]; found shape {x.shape}")
    if x.shape[0] < min_timepoints:
        raise DataFormatError(f"{where}: {x.shape[0]} time points is shorter than min_timepoints={min_timepoints}")
    bad = ~np.isfinite(x)
    if bad.any():
        j = int(np.argmax(bad.any(axis=0)))
        raise DataFormatError(f"{where}: ROI column {j + 1} ({roi_names[j]!r}) is NaN/inf at "
                              f"{int(bad[:, j].sum())} time points")
    if not allow_constant and x.shape[0] > 1:
        const = np.ptp(x, axis=0) == 0
        if const.any():
            j = int(np.argmax(const))
            raise DataFormatError(f"{where}: ROI column {j + 1} ({roi_names[j]!r}) is constant ({x[0, j]:g} at all "
                                  f"{x.shape[0]} time points; an ROI outside the field of view? pass "
                                  "allow_constant=True to keep it)")
    return x


def _value_str(v) -> str:
    """A phenotype value as the string used for matching and naming (1.0 -> '1')."""
    if isinstance(v, (float, np.floating)) and np.isfinite(v) and float(v).is_integer():
        return str(int(v))
    return str(v).strip()


def _is_missing(v) -> bool:
    if v is None:
        return True
    if isinstance(v, (float, np.floating)):
        return not np.isfinite(v)
    return isinstance(v, str) and v.strip() == ""


def _encode_labels(values: Sequence, label_names, where: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Class indices [n] and names: numeric values in sorted order, strings in ``label_names`` (or sorted) order.

    ``label_names`` may be a list (names of the sorted numeric values, or the order of string labels) or a
    ``{value: name}`` table (its order is the class order). ``where[i]`` names subject i in errors.
    """
    for i, v in enumerate(values):
        if _is_missing(v):
            raise DataFormatError(f"{where[i]}: no label (empty cell in the label column)")
    numeric = all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in values)
    keys = [_value_str(v) for v in values]
    if isinstance(label_names, Mapping):
        order = [_value_str(k) for k in label_names]
        names = [str(label_names[k]) for k in label_names]
    elif numeric:
        order = [_value_str(v) for v in sorted(set(float(v) for v in values))]
        names = [str(n) for n in label_names] if label_names is not None else list(order)
        if len(names) != len(order):
            raise ConfigError(f"'label_names' has {len(names)} names; the labels take {len(order)} values {order}")
    else:
        order = [str(n) for n in label_names] if label_names is not None else sorted(set(keys))
        names = list(order)
    index = {k: c for c, k in enumerate(order)}
    for i, k in enumerate(keys):
        if k not in index:
            raise DataFormatError(f"{where[i]}: label {k!r} is not one of the label names {order}")
    return np.array([index[k] for k in keys], dtype=np.int64), names


def _check_tr_value(tr, what: str) -> float:
    if isinstance(tr, bool) or not isinstance(tr, (int, float, np.number)) or not np.isfinite(tr) or tr <= 0:
        raise ConfigError(f"'{what}' must be a positive number of seconds; {tr!r} was provided")
    return float(tr)


def cohort_from_arrays(series: Sequence[np.ndarray], *, tr: float, labels=None, sites=None, subject_ids=None,
                       roi_names: Sequence[str] | None = None, label_names=None, name: str = "cohort",
                       min_timepoints: int = 10, allow_constant: bool = False, confounds=None,
                       split=None) -> Cohort:
    """An in-memory :class:`Cohort`, validated as :func:`load_cohort` validates files.

    Parameters
    ----------
    series : sequence of ndarray [n_timepoints_i, n_rois]
    tr : float
    labels : sequence [n_subjects], optional
        Class values (numbers: sorted order; strings: ``label_names`` order, else sorted).
    sites, subject_ids, split : sequence [n_subjects], optional
        Subject ids default to ``sub-0000``, ``sub-0001``, ...
    roi_names : sequence of str, optional
        Default ``roi_0``, ``roi_1``, ...
    label_names : list or {value: name}, optional
    min_timepoints : int
    allow_constant : bool
        Keep constant ROI columns (otherwise an error).
    confounds : sequence of ndarray [n_timepoints_i, n_confounds], optional

    Raises
    ------
    DataFormatError
        A subject's series is NaN or constant in a column, too short, or has another ROI count (the
        message names the subject index and id).
    ConfigError
        Per-subject arguments whose length differs from the number of subjects.
    """
    tr = _check_tr_value(tr, "tr")
    series = list(series)
    n = len(series)
    if n == 0:
        raise ConfigError("'series' holds no subjects")
    ids = np.array([f"sub-{i:04d}" for i in range(n)] if subject_ids is None else [str(s) for s in subject_ids])
    for what, v in (("subject_ids", ids), ("labels", labels), ("sites", sites), ("split", split),
                    ("confounds", confounds)):
        if v is not None and len(v) != n:
            raise ConfigError(f"'{what}' has {len(v)} entries; 'series' has {n} subjects")
    where = [f"subject {i} ({str(ids[i])!r})" for i in range(n)]
    first = np.asarray(series[0])
    n_rois = first.shape[1] if first.ndim == 2 else 0
    names = [f"roi_{k}" for k in range(n_rois)] if roi_names is None else [str(r) for r in roi_names]
    if len(names) != n_rois:
        raise ConfigError(f"'roi_names' has {len(names)} names; subject 0 has {n_rois} ROI columns")
    out = []
    for i, x in enumerate(series):
        x = np.asarray(x)
        if x.ndim == 2 and x.shape[1] != n_rois:
            raise DataFormatError(f"{where[i]}: {x.shape[1]} ROI columns; subject 0 has {n_rois}")
        out.append(_check_series(x, where[i], names, min_timepoints, allow_constant))
    conf = None
    if confounds is not None:
        conf = []
        for i, c in enumerate(confounds):
            c = np.asarray(c, dtype=np.float32)
            c = c[:, None] if c.ndim == 1 else c
            if c.shape[0] != out[i].shape[0]:
                raise DataFormatError(f"{where[i]}: confounds have {c.shape[0]} rows; the series has "
                                      f"{out[i].shape[0]} time points")
            conf.append(c)
    codes, lnames = (None, None) if labels is None else _encode_labels(list(labels), label_names, where)
    pheno = {"subject_id": ids}
    if labels is not None:
        pheno["label"] = np.asarray(labels)
    return Cohort(name=name, series=out, subject_ids=ids, tr=tr, roi_names=names, labels=codes, label_names=lnames,
                  sites=None if sites is None else np.array([str(s) for s in sites]),
                  split=None if split is None else np.array([str(s) for s in split]), phenotype=pheno,
                  confounds=conf,
                  confound_names=None if conf is None else [f"confound_{k}" for k in range(conf[0].shape[1])])


# ----------------------------------------------------------------------------------------------
# the folder loader
# ----------------------------------------------------------------------------------------------
def _read_meta(root: Path | None) -> dict:
    if root is None or not (root / COHORT_JSON).is_file():
        return {}
    meta = read_json(root / COHORT_JSON)
    if not isinstance(meta, dict):
        raise DataFormatError(f"{root / COHORT_JSON}: must be a JSON object")
    return meta


def _resolve(p, root: Path | None) -> Path:
    p = Path(p).expanduser()
    return p if p.is_absolute() or root is None else root / p


def _find_files(spec, root: Path | None, what: str) -> list[Path]:
    """Files of a glob (relative to ``root``), a folder (its table files) or a list of paths; sorted."""
    if isinstance(spec, (list, tuple)):
        files = [_resolve(p, root) for p in spec]
        for f in files:
            if not f.is_file():
                raise DataFormatError(f"{f}: {what} file not found")
        return files
    p = _resolve(spec, root)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in TABLE_SUFFIXES)
    else:
        files = sorted(Path(f) for f in _glob.glob(str(p)) if Path(f).is_file())
    if not files:
        raise DataFormatError(f"{p}: no {what} files match")
    return files


def _read_phenotype(path: Path, id_column: str):
    import pandas as pd

    if not path.is_file():
        raise DataFormatError(f"{path}: phenotype table not found")
    try:
        df = pd.read_csv(path, dtype={id_column: str}, skipinitialspace=True)
    except Exception as exc:  # noqa: BLE001 - pandas parser errors
        msg = " ".join(str(exc).split())[:200]
        raise DataFormatError(f"{path}: not a readable CSV ({type(exc).__name__}: {msg})") from None
    if id_column not in df.columns:
        raise DataFormatError(f"{path}: no id column {id_column!r} (columns: {list(df.columns)[:20]}; pass id_column=)")
    ids = df[id_column]
    if ids.isna().any():
        raise DataFormatError(f"{path}: row {int(np.argmax(ids.isna().to_numpy())) + 2} has no subject id "
                              f"(column {id_column!r})")
    df[id_column] = ids.str.strip()
    dup = df[id_column][df[id_column].duplicated()]
    if len(dup):
        raise DataFormatError(f"{path}: subject {dup.iloc[0]!r} has more than one row")
    return df


def _file_id(path: Path, ids: Sequence[str], id_set: set, id_pattern: re.Pattern | None, csv: Path) -> str:
    """The subject id a file belongs to (``id_pattern``'s group 'id', else the one id its name contains)."""
    name = path.name
    if id_pattern is not None:
        m = id_pattern.search(name)
        if m is None:
            raise DataFormatError(f"{path}: the file name does not match id_pattern {id_pattern.pattern!r}")
        sid = m.group("id")
        if sid not in id_set:
            raise DataFormatError(f"{path}: subject {sid!r} is not in the phenotype table {csv}")
        return sid
    stem = name.split(".")[0]
    cands = [i for i in ids if f"_{i}_" in name or name.startswith(f"{i}_") or stem == i or stem.endswith(f"_{i}")]
    if len(cands) > 1:
        longest = [c for c in cands if not any(c != o and c in o for o in cands)]
        if len(longest) == 1:
            return longest[0]
        raise DataFormatError(f"{path}: the file name matches several subjects of {csv}: {cands[:5]} "
                              "(pass id_pattern=)")
    if not cands:
        raise DataFormatError(f"{path}: no subject of the phenotype table {csv} is named in the file name (ids are "
                              "compared as strings, e.g. 0050002 != 50002; or pass id_pattern=)")
    return cands[0]


def _sidecar_tr(path: Path) -> float | None:
    """TR from a JSON sidecar next to a table (``<name>.json`` or ``<stem>.json``; keys tr / RepetitionTime)."""
    for side in (path.with_name(path.name + ".json"), path.with_name(path.name.split(".")[0] + ".json")):
        if side.is_file():
            meta = read_json(side)
            value = meta.get("tr", meta.get("RepetitionTime")) if isinstance(meta, dict) else None
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                    raise DataFormatError(f"{side}: TR must be a positive number; found {value!r}")
                return float(value)
    return None


def _subject_trs(files, ids, df, rows, tr_column, meta_tr, csv) -> list[tuple[float, str] | None]:
    """Per-subject (TR, source) from the phenotype column, cohort.json's table or a sidecar (None: not given)."""
    out = []
    for f, sid, row in zip(files, ids, rows):
        got = None
        if tr_column is not None:
            v = df[tr_column].iloc[row]
            if not _is_missing(v):
                try:
                    got = (float(v), f"phenotype column {tr_column!r} of {csv}")
                except (TypeError, ValueError):
                    raise DataFormatError(f"{csv}: subject {sid!r} has TR {v!r} in column {tr_column!r} "
                                          "(not a number)") from None
        if got is None and isinstance(meta_tr, dict) and sid in meta_tr:
            got = (float(meta_tr[sid]), COHORT_JSON)
        if got is None:
            side = _sidecar_tr(f)
            got = None if side is None else (side, "its JSON sidecar")
        out.append(got)
    return out


def _cohort_tr(tr, files, trs) -> float:
    """The common TR; a subject whose own TR differs is an error naming its file and both TRs."""
    ref_file = None
    if tr is None:
        given = [(t, f) for t, f in zip(trs, files) if t is not None]
        if not given:
            raise ConfigError("no TR for the cohort: pass tr=, set 'tr' in cohort.json, or name a TR column "
                              "(tr_column=)")
        (tr, _), ref_file = given[0]
    for f, t in zip(files, trs):
        if t is not None and not np.isclose(t[0], tr, rtol=1e-4, atol=1e-6):
            ref = f"{ref_file}" if ref_file is not None else "the cohort"
            raise DataFormatError(f"{f}: TR {t[0]:g} s ({t[1]}) differs from the TR {tr:g} s of {ref}")
    return float(tr)


def _phenotype_arrays(df, rows: list[int]) -> dict[str, np.ndarray]:
    """Every phenotype column in subject order: numeric columns as numbers, others as str ('' = missing)."""
    import pandas as pd

    out = {}
    sub = df.iloc[rows]
    for col in df.columns:
        s = sub[col]
        if pd.api.types.is_numeric_dtype(s.dtype):
            out[str(col)] = s.to_numpy()
        else:
            out[str(col)] = np.array(["" if _is_missing(v) or v is pd.NA else str(v) for v in s], dtype=str)
    return out


def _read_confounds(spec, root, ids, id_set, id_pattern, csv, files, series):
    """Per-subject confound arrays (float32) and names from a glob; rows checked against the series."""
    from brainenc.datasets.timeseries import read_confounds_table

    by_id: dict[str, Path] = {}
    for f in _find_files(spec, root, "confound"):
        try:
            sid = _file_id(f, ids, id_set, id_pattern, csv)
        except DataFormatError:
            log.debug("confound file %s names no subject of %s; ignored", f, csv)
            continue
        if sid in by_id:
            raise DataFormatError(f"{f}: a second confound file for subject {sid!r} (the other: {by_id[sid]})")
        by_id[sid] = f
    conf, names = [], None
    for sid, table, x in zip(ids, files, series):
        if sid not in by_id:
            raise DataFormatError(f"{table}: no confound file for subject {sid!r} matches {spec}")
        c, cn = read_confounds_table(by_id[sid])
        if c.shape[0] != x.shape[0]:
            raise DataFormatError(f"{by_id[sid]}: {c.shape[0]} confound rows; the ROI table {table.name} has "
                                  f"{x.shape[0]} time points")
        if names is not None and len(cn) != len(names):
            raise DataFormatError(f"{by_id[sid]}: {len(cn)} confound columns; the first subject's file has "
                                  f"{len(names)}")
        names = names or cn
        conf.append(c.astype(np.float32))
    return conf, names


def load_cohort(root: str | Path | None = None, *, tables=None, phenotype: str | Path | None = None,
                tr: float | None = None, id_column: str | None = None, label_column: str | None = None,
                site_column: str | None = None, split_column: str | None = None, id_pattern: str | None = None,
                label_names=None, roi_names: Sequence[str] | None = None, min_timepoints: int = 10,
                confounds=None, name: str | None = None, tr_column: str | None = None,
                allow_constant: bool = False) -> Cohort:
    """Load a cohort: one ROI table per subject plus a phenotype CSV (see the module docstring).

    Parameters
    ----------
    root : str or Path, optional
        Cohort folder; its ``cohort.json`` (if any) gives defaults for every argument below, and relative
        globs/paths are taken from it. Default phenotype: ``root/phenotypic.csv``.
    tables : str, Path or list of paths, optional
        A glob (e.g. ``"rois_cc200/*.1D"``), a folder (its ``.1D/.csv/.tsv/.txt`` files) or a list of files.
        Default: cohort.json's ``tables``, else ``rois_*/*`` tables under ``root``.
    phenotype : str or Path, optional
        CSV with one row per subject; the id column is read as strings.
    tr : float, optional
        Repetition time in seconds; default cohort.json's ``tr``, else the first per-subject TR found.
    id_column : str, optional
        Default cohort.json's, else ``"subject_id"``.
    label_column, site_column, split_column, tr_column : str, optional
        Phenotype columns of the class label, site, official split and per-subject TR.
    id_pattern : str, optional
        Regex with a named group ``id`` searched in each file name. Default: a file belongs to the subject
        whose id it contains as ``_<id>_``, a ``<id>_`` prefix or the whole stem (ids compared as strings).
    label_names : list or {value: name}, optional
        Numeric labels: names of the sorted unique values (default: the values as strings). String labels:
        the class order (default: sorted). A table gives both the order and the names.
    roi_names : sequence of str, optional
        Override the table headers (length must equal the ROI count).
    min_timepoints : int
        Shorter runs are an error.
    confounds : str, list or False, optional
        Glob (or list) of per-subject confound TSVs (header row; ``n/a`` allowed), matched to subjects like the
        tables; every subject must have one. False ignores cohort.json's ``confounds``.
    name : str, optional
        Default cohort.json's ``name``, else the folder name.
    allow_constant : bool
        Keep constant ROI columns (ABIDE-PCP tables hold all-zero ROIs outside the field of view).

    Returns
    -------
    Cohort
        Subjects in phenotype-row order; ``phenotype`` holds every CSV column; ``files`` and ``root`` set.
        Phenotype rows without a table are dropped with a logged warning.

    Raises
    ------
    DataFormatError
        One line naming the offending file: a table whose subject is not in the phenotype table, two tables
        for one subject, a NaN/inf or constant ROI column, a run shorter than ``min_timepoints``, an ROI count
        (or header) differing from the first table's, a TR differing from the cohort's, a missing label, or a
        confound table whose rows differ from the series'.
    ConfigError
        No tables/phenotype/TR to go by, or bad arguments.
    """
    root = None if root is None else Path(root).expanduser()
    meta = _read_meta(root)

    def pick(value, key, default=None):
        return value if value is not None else meta.get(key, default)

    id_column = pick(id_column, "id_column", "subject_id")
    label_column, site_column = pick(label_column, "label_column"), pick(site_column, "site_column")
    split_column, tr_column = pick(split_column, "split_column"), pick(tr_column, "tr_column")
    label_names, roi_names = pick(label_names, "label_names"), pick(roi_names, "roi_names")
    id_pattern = pick(id_pattern, "id_pattern")
    confounds = None if confounds is False else pick(confounds, "confounds")
    meta_tr = meta.get("tr")
    tr = _check_tr_value(tr, "tr") if tr is not None else (
        _check_tr_value(meta_tr, "cohort.json tr") if meta_tr is not None and not isinstance(meta_tr, dict) else None)
    tables = pick(tables, "tables")
    if tables is None:
        if root is None:
            raise ConfigError("'tables' is required when no cohort folder ('root') is given")
        tables = "rois_*/*"
    phenotype = pick(phenotype, "phenotype")
    if phenotype is None:
        if root is None:
            raise ConfigError("'phenotype' is required when no cohort folder ('root') is given")
        phenotype = PHENOTYPE_CSV
    csv = _resolve(phenotype, root)
    pattern = None
    if id_pattern is not None:
        try:
            pattern = re.compile(id_pattern)
        except re.error as exc:
            raise ConfigError(f"'id_pattern' is not a valid regex ({exc})") from None
        if "id" not in pattern.groupindex:
            raise ConfigError(f"'id_pattern' needs a named group 'id', e.g. r'_(?P<id>\\d+)_'; {id_pattern!r}")

    df = _read_phenotype(csv, id_column)
    for what, col in (("label_column", label_column), ("site_column", site_column),
                      ("split_column", split_column), ("tr_column", tr_column)):
        if col is not None and col not in df.columns:
            raise DataFormatError(f"{csv}: no column {col!r} ({what}; columns: {list(df.columns)[:20]})")
    all_ids = list(df[id_column])
    id_set = set(all_ids)
    found = [f for f in _find_files(tables, root, "ROI table")
             if tables != "rois_*/*" or f.suffix.lower() in TABLE_SUFFIXES]
    by_id: dict[str, Path] = {}
    for f in found:
        sid = _file_id(f, all_ids, id_set, pattern, csv)
        if sid in by_id:
            raise DataFormatError(f"{f}: a second ROI table for subject {sid!r} (the other: {by_id[sid]})")
        by_id[sid] = f
    missing = [s for s in all_ids if s not in by_id]
    if missing:
        log.warning("%s: %d phenotype rows have no ROI table and are dropped (%s%s)", csv, len(missing),
                    ", ".join(missing[:5]), ", ..." if len(missing) > 5 else "")
    rows = [k for k, s in enumerate(all_ids) if s in by_id]
    if not rows:
        raise DataFormatError(f"{csv}: no subject of the phenotype table has an ROI table ({tables})")
    ids = [all_ids[k] for k in rows]
    files = [by_id[s] for s in ids]

    from brainenc.datasets.timeseries import read_roi_table

    series, names = [], None
    for f in files:
        x, header = read_roi_table(f)
        if names is None:
            names = [str(r) for r in roi_names] if roi_names is not None else header
            if len(names) != x.shape[1]:
                raise ConfigError(f"'roi_names' has {len(names)} names; {f} has {x.shape[1]} ROI columns")
            ref, ref_header = f, header
        elif x.shape[1] != len(names):
            raise DataFormatError(f"{f}: {x.shape[1]} ROI columns; {ref} has {len(names)}")
        elif header != ref_header and not header[0].startswith("roi_") and not ref_header[0].startswith("roi_"):
            k = next(j for j, (a, b) in enumerate(zip(header, ref_header)) if a != b)
            raise DataFormatError(f"{f}: ROI column {k + 1} is {header[k]!r}; in {ref} it is {ref_header[k]!r} "
                                  "(tables from different atlases or orders?)")
        series.append(_check_series(x, str(f), names, min_timepoints, allow_constant))

    trs = _subject_trs(files, ids, df, rows, tr_column, meta_tr, csv)
    tr = _cohort_tr(tr, files, trs)
    labels = lnames = None
    if label_column is not None:
        values = list(df[label_column].iloc[rows])
        where = [f"{f}: subject {s!r} in {csv} (column {label_column!r})" for f, s in zip(files, ids)]
        labels, lnames = _encode_labels(values, label_names, where)

    def column(col):
        return None if col is None else np.array([_value_str(v) for v in df[col].iloc[rows]], dtype=str)

    conf = conf_names = None
    if confounds is not None:
        conf, conf_names = _read_confounds(confounds, root, ids, set(ids), pattern, csv, files, series)
    cname = name if name is not None else meta.get("name") or (root.name if root is not None else "cohort")
    return Cohort(name=str(cname), series=series, subject_ids=np.array(ids, dtype=str), tr=tr, roi_names=list(names),
                  labels=labels, label_names=lnames, sites=column(site_column), split=column(split_column),
                  phenotype=_phenotype_arrays(df, rows), confounds=conf, confound_names=conf_names, files=files,
                  root=root)
