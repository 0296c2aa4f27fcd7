"""Readers for the raw NSD release files (spec: ``shared/reference/nsd_format.md``).

Everything here is numpy/h5py/nibabel/scipy only. Index bases follow the spec's §0 cheat sheet and
are converted once, on reading: inside brainenc 73k image ids are **0-based**, sessions are
**1-based**, trials (within session and global) are **0-based**, 10k slots are **0-based**
(``masterordering`` value − 1).

Readers validate cheaply (existence, header shape/dtype, file size or gzip trailer) so that a bad
file fails with a one-line :class:`~brainenc.exceptions.DataFormatError` naming it *before* a long
prepare starts (:func:`check_betas_file`), and again while streaming (corrupt payloads, NaN/inf).
"""
from __future__ import annotations

import dataclasses
import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from brainenc._utils.validation import check_option, check_subject
from brainenc.datasets import layout
from brainenc.exceptions import DataFormatError
from brainenc.features.images import HDF5Images

__all__ = [
    "Expdesign",
    "TrialTable",
    "NSDStimuli",
    "load_expdesign",
    "trial_table",
    "file_identity",
    "check_betas_file",
    "read_betas_session",
    "iter_betas_chunks",
    "load_volume",
    "load_roi_volume",
    "load_roi_surface",
    "load_surface_values",
    "parse_ctab",
    "read_ctab",
    "load_ncsnr",
    "check_ncsnr_values",
    "VolumeGrid",
    "affine_mismatch",
]

_MGH_HEADER_BYTES = 284
#: affines of files on the same grid may differ by this fraction of a voxel (float32 sform/qform storage
#: rounds at ~1e-5 mm; any real misregistration is far larger)
AFFINE_TOL_VOXELS = 1e-3


def _short(exc: BaseException) -> str:
    """``Type: message`` on one line (library messages can span lines)."""
    msg = " ".join(str(exc).split())
    if len(msg) > 200:
        msg = msg[:197] + "..."
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


# ----------------------------------------------------------------------------------------------
# experimental design
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Expdesign:
    """The three fields of ``nsd_expdesign.mat`` that readers use, converted to 0-based ints.

    Attributes
    ----------
    masterordering : ndarray of int64, shape (30000,)
        Global trial -> 10k slot, **0-based** (file value − 1).
    subjectim : ndarray of int64, shape (8, 10000)
        ``subjectim[s-1, slot]`` = 0-based 73k id of subject ``s``'s slot.
    sharedix : ndarray of int64, shape (1000,)
        0-based 73k ids of the shared1000 images, ascending.
    path : Path
        The file read.
    """

    masterordering: np.ndarray
    subjectim: np.ndarray
    sharedix: np.ndarray
    path: Path


_EXPDESIGN_FIELDS = ("masterordering", "subjectim", "sharedix")


def _mat_field(mat: dict, key: str, shape: tuple[int, ...], lo: int, hi: int, path: Path) -> np.ndarray:
    if key not in mat:
        raise DataFormatError(f"{path}: missing field '{key}'; expected masterordering, subjectim, sharedix")
    if isinstance(mat[key], str):  # scipy turns a MatReadError into a "Read error: ..." string
        raise DataFormatError(f"{path}: field '{key}' is unreadable ({mat[key]})")
    arr = np.asarray(mat[key])
    if arr.shape != shape:
        raise DataFormatError(f"{path}: field '{key}' must have shape {shape}; found {arr.shape}")
    if arr.dtype.kind not in "iuf":
        raise DataFormatError(f"{path}: field '{key}' must be numeric; found dtype {arr.dtype}")
    if arr.dtype.kind == "f" and (not np.isfinite(arr).all() or (arr != np.rint(arr)).any()):
        raise DataFormatError(f"{path}: field '{key}' must hold integers; found non-integer values")
    if arr.size and (arr.min() < lo or arr.max() > hi):  # before the cast: huge values would wrap
        fmt = (lambda v: f"{v:g}") if arr.dtype.kind == "f" else str
        raise DataFormatError(f"{path}: field '{key}' values must lie in [{lo}, {hi}] (1-based); "
                              f"found [{fmt(arr.min())}, {fmt(arr.max())}]")
    return arr.astype(np.int64)


def _check_shared(path: Path, subjectim: np.ndarray, sharedix: np.ndarray) -> None:
    """nsd_format §1.1: ``sharedix`` ascending and ``sharedix[k] == subjectim[s, k]`` for k < 1000, every s.

    Both arrays are compared as stored (1-based 73k ids); slots are reported 1-based like the file's.
    """
    steps = np.diff(sharedix)
    if (steps <= 0).any():
        k = int(np.argmax(steps <= 0))
        raise DataFormatError(f"{path}: 'sharedix' must be strictly ascending (the shared1000 73k ids); "
                              f"entries {k + 1} and {k + 2} are {sharedix[k]} and {sharedix[k + 1]} "
                              "(re-download nsd_expdesign.mat)")
    bad = subjectim[:, :layout.N_SHARED] != sharedix[None, :]
    if bad.any():
        s, k = (int(v) for v in np.argwhere(bad)[0])
        raise DataFormatError(
            f"{path}: 'sharedix' disagrees with subjectim[:, :1000] (slots 1..1000 are the shared images of "
            f"every subject) in {int(bad.sum())} of {bad.size} entries, first subj{s + 1:02d} slot {k + 1}: "
            f"sharedix {sharedix[k]} vs subjectim {subjectim[s, k]} (1-based 73k ids) "
            "(the file is corrupt or not NSD's design; re-download nsd_expdesign.mat)")


def load_expdesign(path: str | Path) -> Expdesign:
    """Read ``nsd_expdesign.mat`` (a path to the file, or an NSD root).

    The file's structure is checked in pure Python first (``brainenc.datasets._mat5.check_mat5``):
    scipy's compiled reader can crash the interpreter on some corrupt files.

    Parameters
    ----------
    path : str or Path
        The ``.mat`` file, or an NSD root (then :func:`~brainenc.datasets.layout.expdesign_path` is used).

    Returns
    -------
    Expdesign
        0-based arrays: masterordering (30000,), subjectim (8, 10000), sharedix (1000,).

    Raises
    ------
    DataFormatError
        Missing/unreadable file, missing field, wrong shape, values outside the 1-based ranges
        (73k ids in 1..73000, slots in 1..10000), a slot not listed exactly 3 times in ``masterordering``
        (nsd_format §8), ``sharedix`` not strictly ascending or not equal to ``subjectim[s, :1000]`` for
        every subject (nsd_format §1.1).
    """
    import warnings

    import scipy.io

    from brainenc.datasets._mat5 import check_mat5

    p = Path(path)
    if p.is_dir():
        p = layout.expdesign_path(p)
    if not p.is_file():
        raise DataFormatError(f"{p}: experimental design file not found")
    check_mat5(p, deep=set(_EXPDESIGN_FIELDS))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # duplicate names / unreadable variables: judged below
            mat = scipy.io.loadmat(p, variable_names=list(_EXPDESIGN_FIELDS))
    except Exception as exc:  # noqa: BLE001 - scipy raises many types for corrupt files
        raise DataFormatError(f"{p}: not a readable MATLAB v5 .mat file ({type(exc).__name__}: {exc})") from None
    mo = _mat_field(mat, "masterordering", (1, 30000), 1, layout.N_SLOTS_10K, p)[0]
    si = _mat_field(mat, "subjectim", (8, layout.N_SLOTS_10K), 1, layout.N_IMAGES_73K, p)
    sh = _mat_field(mat, "sharedix", (1, layout.N_SHARED), 1, layout.N_IMAGES_73K, p)[0]
    counts = np.bincount(mo, minlength=layout.N_SLOTS_10K + 1)[1:]
    if (counts != 3).any():
        k = int(np.argmax(counts != 3))
        raise DataFormatError(f"{p}: 'masterordering' must list every 10k slot exactly 3 times (10000 slots x 3 = "
                              f"30000 trials); slot {k + 1} appears {counts[k]} times "
                              f"({int((counts != 3).sum())} slots differ; re-download nsd_expdesign.mat)")
    _check_shared(p, si, sh)
    return Expdesign(masterordering=mo - 1, subjectim=si - 1, sharedix=sh - 1, path=p)


@dataclasses.dataclass(frozen=True)
class TrialTable:
    """One row per completed trial of one subject, chronological.

    Attributes
    ----------
    subject : str
    session : ndarray of int64, shape (n_trials,)
        1-based session.
    trial : ndarray of int64, shape (n_trials,)
        0-based trial within the session (0..749).
    global_trial : ndarray of int64, shape (n_trials,)
        0-based global trial, ``(session-1)*750 + trial``; row of a MindEye2 ``betas`` array.
    image_id : ndarray of int64, shape (n_trials,)
        0-based 73k id (row of ``imgBrick``).
    slot : ndarray of int64, shape (n_trials,)
        0-based 10k slot (``masterordering`` value − 1); slots < 1000 are the shared images.
    repeat : ndarray of int64, shape (n_trials,)
        0-based chronological occurrence of the slot (0, 1, 2).
    n_sessions : int
    """

    subject: str
    session: np.ndarray
    trial: np.ndarray
    global_trial: np.ndarray
    image_id: np.ndarray
    slot: np.ndarray
    repeat: np.ndarray
    n_sessions: int

    @property
    def n_trials(self) -> int:
        return int(self.session.shape[0])

    @property
    def shared(self) -> np.ndarray:
        """bool (n_trials,): trial shows a shared1000 image."""
        return self.slot < layout.N_SHARED

    def session_rows(self, session: int) -> np.ndarray:
        """Row indices (int64) of a 1-based session (a contiguous block of 750)."""
        start = (session - 1) * layout.TRIALS_PER_SESSION
        return np.arange(start, start + layout.TRIALS_PER_SESSION, dtype=np.int64)


def trial_table(expdesign: Expdesign, subject: str, n_sessions: int) -> TrialTable:
    """The trial -> image table of ``subject`` over its first ``n_sessions`` sessions.

    Implements the spec's canonical lookup: ``slot = masterordering[t]``,
    ``image = subjectim[s-1, slot]`` (both already 0-based in :class:`Expdesign`).

    Parameters
    ----------
    expdesign : Expdesign
    subject : str
        ``"subj01"`` .. ``"subj08"``.
    n_sessions : int
        Completed sessions (``layout.n_sessions(root, subject)``), 1..40.

    Returns
    -------
    TrialTable
        ``n_sessions * 750`` rows.
    """
    subject = check_option("subject", check_subject(subject), layout.SUBJECTS)
    max_sessions = expdesign.masterordering.shape[0] // layout.TRIALS_PER_SESSION
    if not (isinstance(n_sessions, (int, np.integer)) and 1 <= n_sessions <= max_sessions):
        raise DataFormatError(f"{subject}: number of sessions must be in 1..{max_sessions}; found {n_sessions!r}")
    n = int(n_sessions) * layout.TRIALS_PER_SESSION
    t = np.arange(n, dtype=np.int64)
    slot = expdesign.masterordering[:n]
    image = expdesign.subjectim[int(subject[4:]) - 1, slot]
    # repeat index = number of earlier occurrences of the same slot (stable sort keeps time order)
    order = np.argsort(slot, kind="stable")
    sorted_slots = slot[order]
    first = np.r_[True, sorted_slots[1:] != sorted_slots[:-1]]
    group_start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    repeat = np.empty(n, dtype=np.int64)
    repeat[order] = np.arange(n) - group_start
    return TrialTable(subject=subject, session=t // layout.TRIALS_PER_SESSION + 1,
                      trial=t % layout.TRIALS_PER_SESSION, global_trial=t, image_id=image,
                      slot=slot.copy(), repeat=repeat, n_sessions=int(n_sessions))


# ----------------------------------------------------------------------------------------------
# stimuli
# ----------------------------------------------------------------------------------------------
def file_identity(path: str | Path) -> dict:
    """``{"path", "size", "mtime_ns"}`` of a file (what cache keys hash; content is not read)."""
    p = Path(path)
    st = p.stat()
    return {"path": str(p.resolve()), "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


class NSDStimuli(HDF5Images):
    """:class:`~brainenc.features.images.HDF5Images` on ``nsd_stimuli.hdf5`` (``imgBrick``, uint8 (N, 425, 425, 3)).

    The one stimulus reader, with NSD conveniences: ``path`` may be an NSD root, and :meth:`read`
    takes 0-based 73k ids of an integer dtype only (floats are refused rather than rounded).
    :meth:`identity` is the content-based one of ``HDF5Images`` (shape, file size and sampled
    images), so moving the NSD folder keeps feature caches valid.

    Parameters
    ----------
    path : str or Path
        ``nsd_stimuli.hdf5`` (or an NSD root).
    key : str
        Dataset name, ``"imgBrick"`` in the release.
    """

    def __init__(self, path: str | Path, key: str = "imgBrick"):
        p = Path(path)
        if p.is_dir():
            p = layout.stimuli_path(p)
        if not p.is_file():
            raise DataFormatError(f"{p}: stimulus file not found")
        super().__init__(p, key=key)

    def read(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Images of 0-based 73k ``ids`` (any order, duplicates allowed).

        Parameters
        ----------
        ids : array-like of int, shape (n,)

        Returns
        -------
        ndarray of uint8, shape (n, H, W, 3)
            ``out[i] = imgBrick[ids[i]]``.
        """
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise DataFormatError(f"image ids must be a 1-D integer array; found {ids.dtype} {ids.shape}")
        n = len(self)
        if ids.size and (ids.min() < 0 or ids.max() >= n):
            raise DataFormatError(f"{self.path}: 73k ids must lie in [0, {n - 1}] (0-based); "
                                  f"found [{ids.min()}, {ids.max()}]")
        return super().read(ids.astype(np.int64))

    def __repr__(self) -> str:
        return f"NSDStimuli({str(self.path)!r}, key={self.key!r})"


# ----------------------------------------------------------------------------------------------
# raw binary streaming (NIfTI / MGH, plain or gzip)
# ----------------------------------------------------------------------------------------------
def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _check_payload_size(path: Path, offset: int, nbytes: int, what: str, exact: bool = True) -> None:
    """Cheap truncation check: file size (plain) or the gzip ISIZE trailer (compressed).

    ``exact=False`` allows bytes after the payload (MGH files may end with optional tags).
    """
    size = path.stat().st_size
    if _is_gzip(path):
        if size < 18:
            raise DataFormatError(f"{path}: truncated gzip {what} ({size} bytes)")
        with open(path, "rb") as fh:
            fh.seek(-4, os.SEEK_END)
            isize = struct.unpack("<I", fh.read(4))[0]
        expected = (offset + nbytes) % (1 << 32)
        short = (isize != expected) if exact else (offset + nbytes < (1 << 32) and isize < expected)
        if short:
            raise DataFormatError(f"{path}: truncated or corrupt gzip {what}: expected {offset + nbytes} "
                                  f"uncompressed bytes (mod 2^32 = {expected}), trailer says {isize}")
    elif size < offset + nbytes:
        raise DataFormatError(f"{path}: truncated {what}: expected at least {offset + nbytes} bytes; found {size}")


def _open_raw(path: Path):
    return gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb")


def _stream_fortran(path: Path, offset: int, dtype: np.dtype, vol_size: int, n_t: int,
                    flat_index: np.ndarray | None, chunk: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(t0, block)`` with block (k, n_sel) of raw values for trials t0..t0+k-1.

    The file stores a Fortran-ordered (..., n_t) array: each trial is a contiguous run of
    ``vol_size`` values, so a sequential read of ``chunk`` trials at a time never seeks back.
    """
    itemsize = np.dtype(dtype).itemsize
    try:
        with _open_raw(path) as fh:
            fh.seek(offset)
            for t0 in range(0, n_t, chunk):
                k = min(chunk, n_t - t0)
                want = k * vol_size * itemsize
                buf = fh.read(want)
                if len(buf) != want:
                    raise DataFormatError(f"{path}: truncated data: expected {want} bytes for trials "
                                          f"{t0}..{t0 + k - 1}; found {len(buf)}")
                block = np.frombuffer(buf, dtype=dtype).reshape(k, vol_size)
                yield t0, (block if flat_index is None else block[:, flat_index])
    except DataFormatError:
        raise
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as exc:
        raise DataFormatError(f"{path}: corrupt or truncated file ({_short(exc)})") from None


# ----------------------------------------------------------------------------------------------
# betas
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BetasHeader:
    """What :func:`check_betas_file` learned from a header (no payload read)."""

    path: Path
    kind: str  # "nifti" | "hdf5" | "mgh"
    shape: tuple[int, ...]  # nibabel-order shape for nifti/mgh ((X,Y,Z,T) / (V,1,1,T)); h5py shape for hdf5
    dtype: np.dtype
    offset: int = 0
    slope: float = 1.0
    inter: float = 0.0
    affine: Optional[np.ndarray] = None  # NIfTI only: voxel -> mm, (4, 4) float64


def _nifti_header(path: Path) -> BetasHeader:
    import nibabel as nib

    try:
        with np.errstate(all="ignore"):  # corrupt headers overflow in nibabel's arithmetic
            img = nib.load(str(path))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise DataFormatError(f"{path}: not a NIfTI file (nibabel read it as {type(img).__name__})")
        hdr = img.header
        slope, inter = hdr.get_slope_inter()
        out = BetasHeader(path=path, kind="nifti", shape=tuple(int(s) for s in img.shape),
                          dtype=np.dtype(hdr.get_data_dtype()), offset=int(img.dataobj.offset),
                          slope=1.0 if slope is None else float(slope),
                          inter=0.0 if inter is None else float(inter),
                          affine=np.asarray(img.affine, dtype=np.float64))
    except DataFormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for bad files
        raise DataFormatError(f"{path}: not a readable NIfTI file ({_short(exc)})") from None
    if not np.isfinite(out.affine).all():
        raise DataFormatError(f"{path}: NIfTI affine has NaN/inf entries (corrupt header)")
    return out


def _mgh_header(path: Path) -> BetasHeader:
    import nibabel as nib

    try:
        with np.errstate(all="ignore"):  # corrupt headers overflow in nibabel's arithmetic
            img = nib.load(str(path))
        if not isinstance(img, nib.MGHImage):
            raise DataFormatError(f"{path}: not an MGH file (nibabel read it as {type(img).__name__})")
        return BetasHeader(path=path, kind="mgh", shape=tuple(int(s) for s in img.shape),
                           dtype=np.dtype(img.header.get_data_dtype()), offset=_MGH_HEADER_BYTES)
    except DataFormatError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise DataFormatError(f"{path}: not a readable MGH file ({_short(exc)})") from None


def check_betas_file(path: str | Path, *, kind: str, shape: tuple[int, ...] | None = None,
                     n_trials: int = layout.TRIALS_PER_SESSION) -> BetasHeader:
    """Validate one session's betas file from its header (cheap; no payload decoded).

    Parameters
    ----------
    path : str or Path
    kind : {"nifti", "hdf5", "mgh"}
    shape : tuple of int, optional
        Expected spatial shape: (X, Y, Z) for volumes (HDF5 must then be (T, Z, Y, X)); (V,) for mgh.
        None accepts any spatial shape.
    n_trials : int
        Expected trial count (750).

    Returns
    -------
    BetasHeader

    Raises
    ------
    DataFormatError
        Missing file, unreadable header, wrong shape or dtype (volumes: int16; mgh: float32),
        truncated payload.
    """
    import h5py

    path = Path(path)
    check_option("kind", kind, ("nifti", "hdf5", "mgh"))
    if not path.is_file():
        raise DataFormatError(f"{path}: betas file not found")
    if kind == "hdf5":
        try:
            with h5py.File(path, "r") as f:
                if "betas" not in f:
                    raise DataFormatError(f"{path}: dataset 'betas' not found; found {sorted(f.keys())}")
                ds = f["betas"]
                if not isinstance(ds, h5py.Dataset):
                    raise DataFormatError(f"{path}: 'betas' is a group, not a dataset")
                hshape, hdtype = tuple(ds.shape or ()), ds.dtype
        except DataFormatError:
            raise
        except Exception as exc:  # noqa: BLE001 - h5py raises OSError, KeyError, ValueError, ... on bad files
            raise DataFormatError(f"{path}: not a readable HDF5 file ({_short(exc)})") from None
        want = None if shape is None else (n_trials,) + tuple(shape)[::-1]
        if len(hshape) != 4 or hshape[0] != n_trials or (want is not None and hshape != want):
            exp = want if want is not None else f"({n_trials}, Z, Y, X)"
            raise DataFormatError(f"{path}: 'betas' must have h5py shape {exp} (axes reversed from NIfTI); found {hshape}")
        if (hdtype.kind, hdtype.itemsize) != ("i", 2) or hdtype.fields is not None:
            raise DataFormatError(f"{path}: 'betas' must be int16 (PSC x 300); found {hdtype}")
        return BetasHeader(path=path, kind="hdf5", shape=hshape, dtype=hdtype)
    hdr = _nifti_header(path) if kind == "nifti" else _mgh_header(path)
    if kind == "nifti":
        want = None if shape is None else tuple(shape) + (n_trials,)
        if len(hdr.shape) != 4 or hdr.shape[3] != n_trials or (want is not None and hdr.shape != want):
            raise DataFormatError(f"{path}: betas must have shape {want or f'(X, Y, Z, {n_trials})'}; found {hdr.shape}")
        if (hdr.dtype.kind, hdr.dtype.itemsize) != ("i", 2):
            raise DataFormatError(f"{path}: betas must be int16 (PSC x 300); found {hdr.dtype}")
    else:
        want = None if shape is None else (int(shape[0]), 1, 1, n_trials)
        if len(hdr.shape) != 4 or hdr.shape[1:] != (1, 1, n_trials) or (want is not None and hdr.shape != want):
            raise DataFormatError(f"{path}: fsaverage betas must have shape {want or f'(V, 1, 1, {n_trials})'}; found {hdr.shape}")
        if (hdr.dtype.kind, hdr.dtype.itemsize) != ("f", 4):
            raise DataFormatError(f"{path}: fsaverage betas must be float32 PSC; found {hdr.dtype}")
    _check_payload_size(path, hdr.offset, int(np.prod(hdr.shape)) * hdr.dtype.itemsize, "betas",
                        exact=kind == "nifti")
    return hdr


def _fortran_flat(indices_xyz: np.ndarray, shape_xyz: tuple[int, int, int]) -> np.ndarray:
    """Flat Fortran index ``i + X*(j + Y*k)`` of (n, 3) voxel indices (also the C index over (Z,Y,X))."""
    X, Y, _ = shape_xyz
    ijk = np.asarray(indices_xyz, dtype=np.int64)
    return ijk[:, 0] + X * (ijk[:, 1] + Y * ijk[:, 2])


def iter_betas_chunks(header: BetasHeader, select: np.ndarray | None, chunk: int = 50) -> Iterator[tuple[int, np.ndarray]]:
    """Stream one session as float32 PSC blocks ``(t0, block[k, n_sel])``.

    Parameters
    ----------
    header : BetasHeader
        From :func:`check_betas_file`.
    select : ndarray of int64 or None
        Volumes: (n_sel, 3) voxel indices (i, j, k) on the NIfTI (X, Y, Z) grid, in the order wanted.
        mgh: (n_sel,) vertex indices. None = every voxel/vertex (Fortran order for volumes).
    chunk : int
        Trials per block (NIfTI/mgh) — bounds memory at ``chunk * n_grid`` raw values.

    Yields
    ------
    t0 : int
        First trial of the block (0-based within the session).
    block : ndarray of float32, shape (k, n_sel)
        Volumes: int16 / 300 (× NIfTI scaling when set); mgh: float32 as stored (no /300).
    """
    path = header.path
    if header.kind == "hdf5":
        yield 0, _read_hdf5_session(header, select)
        return
    if header.kind == "nifti":
        X, Y, Z, T = header.shape
        flat = None if select is None else _fortran_flat(select, (X, Y, Z))
        scaled = header.slope != 1.0 or header.inter != 0.0
        for t0, raw in _stream_fortran(path, header.offset, header.dtype, X * Y * Z, T, flat, chunk):
            out = raw.astype(np.float32)
            if scaled:  # NIfTI scl_slope/scl_inter (unset in the release) apply before the /300
                out = out * np.float32(header.slope) + np.float32(header.inter)
            out /= np.float32(300.0)
            yield t0, out
        return
    V, _, _, T = header.shape
    for t0, raw in _stream_fortran(path, header.offset, header.dtype, V, T, select, chunk):
        yield t0, raw.astype(np.float32)


def _read_hdf5_session(header: BetasHeader, select: np.ndarray | None, slab: int = 8) -> np.ndarray:
    """All 750 trials of an HDF5 session, reading Z-slabs of the mask's bounding box.

    Volumetric HDF5 is chunked per voxel (750, 1, 1, 1): reading by trial would touch every chunk
    per trial, so read slabs of whole trials over a few Z slices and pick the selected voxels.
    """
    import h5py

    T, Z, Y, X = header.shape
    if select is None:
        ii, jj, kk = (a.ravel() for a in np.meshgrid(np.arange(X), np.arange(Y), np.arange(Z), indexing="ij"))
        # Fortran order over (X, Y, Z), as for NIfTI with select=None
        order = np.lexsort((ii, jj, kk))
        select = np.stack([ii[order], jj[order], kk[order]], axis=1)
    sel = np.asarray(select, dtype=np.int64)
    out = np.empty((T, sel.shape[0]), dtype=np.float32)
    if sel.shape[0] == 0:
        return out
    k_lo, k_hi = int(sel[:, 2].min()), int(sel[:, 2].max()) + 1
    try:
        with h5py.File(header.path, "r") as f:
            ds = f["betas"]
            for k0 in range(k_lo, k_hi, slab):
                k1 = min(k0 + slab, k_hi)
                rows = np.nonzero((sel[:, 2] >= k0) & (sel[:, 2] < k1))[0]
                if rows.size == 0:
                    continue
                block = ds[:, k0:k1, :, :]  # (T, k, Y, X): h5[t, k, j, i] == nii[i, j, k, t]
                vals = block[:, sel[rows, 2] - k0, sel[rows, 1], sel[rows, 0]]
                out[:, rows] = vals.astype(np.float32) / np.float32(300.0)
    except DataFormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt chunks: OSError, ValueError, ...
        raise DataFormatError(f"{header.path}: corrupt HDF5 betas ({_short(exc)})") from None
    return out


def read_betas_session(path: str | Path, *, kind: str, select: np.ndarray | None = None,
                       shape: tuple[int, ...] | None = None, check_finite: bool = True) -> np.ndarray:
    """Read one whole session's betas as float32 % signal change.

    Parameters
    ----------
    path : str or Path
        ``betas_sessionNN.nii.gz`` / ``.hdf5`` or ``{lh,rh}.betas_sessionNN.mgh``.
    kind : {"nifti", "hdf5", "mgh"}
    select : ndarray, optional
        (n_sel, 3) voxel indices for volumes, (n_sel,) vertices for mgh; None = all.
    shape : tuple, optional
        Expected spatial shape ((X, Y, Z) or (V,)).
    check_finite : bool
        Raise on NaN/inf.

    Returns
    -------
    ndarray of float32, shape (750, n_sel)
    """
    hdr = check_betas_file(path, kind=kind, shape=shape)
    blocks = [b for _, b in iter_betas_chunks(hdr, select)]
    out = np.concatenate(blocks, axis=0) if blocks else np.empty((0, 0), np.float32)
    if check_finite and not np.isfinite(out).all():
        raise DataFormatError(f"{hdr.path}: betas contain {int((~np.isfinite(out)).sum())} NaN/inf values "
                              "in the selected voxels")
    return out


# ----------------------------------------------------------------------------------------------
# volumes, ROIs, label tables, ncsnr
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VolumeGrid:
    """The voxel grid every volume of a prepare must share: shape, affine and the file they come from.

    Attributes
    ----------
    shape : tuple of int
        (X, Y, Z), nibabel order.
    affine : ndarray of float64, shape (4, 4), or None
        voxel -> mm; None when the reference has none (HDF5 betas): the first NIfTI read then sets it.
    path : Path
        File the shape was read from (the first betas file; named in mismatch errors).
    affine_path : Path or None
        File the affine was read from, when not ``path`` (HDF5 betas: the first NIfTI read).
    """

    shape: tuple
    affine: Optional[np.ndarray]
    path: Path
    affine_path: Optional[Path] = None


def affine_mismatch(affine: np.ndarray, ref: np.ndarray, tol_voxels: float = AFFINE_TOL_VOXELS) -> str | None:
    """Why ``affine`` and ``ref`` are not the same grid placement (None when they are).

    Entries may differ by ``tol_voxels`` × the reference voxel size (mm): voxel axes and origin alike.
    """
    a, r = np.asarray(affine, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    vox = float(np.linalg.norm(r[:3, :3], axis=0).min()) or 1.0
    tol = tol_voxels * vox
    diff = np.abs(a[:3, :] - r[:3, :])
    if diff.max() <= tol and np.array_equal(a[3], r[3]):
        return None
    fmt = lambda v: "[" + " ".join(f"{x:.4g}" for x in v) + "]"  # noqa: E731
    parts = []
    if diff[:, :3].max() > tol:
        parts.append(f"voxel axes {fmt(a[:3, :3].ravel())} vs {fmt(r[:3, :3].ravel())}")
    if diff[:, 3].max() > tol:
        parts.append(f"origin {fmt(a[:3, 3])} vs {fmt(r[:3, 3])} mm")
    if not parts:
        parts.append(f"last row {fmt(a[3])} vs {fmt(r[3])}")
    return f"{'; '.join(parts)}, max difference {diff.max():.4g} mm (tolerance {tol:.2g} mm)"


def _volume_header(p: Path, what: str):
    """nibabel image of a NIfTI volume with its payload size checked (no data read yet)."""
    import nibabel as nib

    try:
        with np.errstate(all="ignore"):  # corrupt headers overflow in nibabel's arithmetic
            img = nib.load(str(p))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise DataFormatError(f"{p}: {what} is not a NIfTI file (nibabel read it as {type(img).__name__})")
        shape = tuple(int(x) for x in img.shape)
        dtype = np.dtype(img.header.get_data_dtype())
        offset = int(img.dataobj.offset)
    except DataFormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for bad files
        raise DataFormatError(f"{p}: not a readable NIfTI {what} ({_short(exc)})") from None
    n_vox = int(np.prod(shape, dtype=np.float64)) if shape else 0
    if n_vox > (1 << 31):
        raise DataFormatError(f"{p}: {what} header claims shape {shape} ({n_vox} voxels; corrupt header?)")
    _check_payload_size(p, offset, n_vox * dtype.itemsize, what)
    return img


def load_volume(path: str | Path, shape: tuple[int, int, int] | None = None, what: str = "volume",
                grid: VolumeGrid | None = None):
    """Load a 3-D NIfTI (mask, ROI, ncsnr) fully, validated.

    Parameters
    ----------
    path : str or Path
    shape : tuple of int, optional
        Expected (X, Y, Z) (ignored when ``grid`` is given).
    what : str
        Used in messages (``"brainmask"``, ``"'nsdgeneral' ROI volume"``, ...).
    grid : VolumeGrid, optional
        The betas' grid: shape and affine must match it (:func:`affine_mismatch`); errors name both files.

    Returns
    -------
    data : ndarray of float64, shape (X, Y, Z)
    affine : ndarray of float64, shape (4, 4)
    """
    p = Path(path)
    if not p.is_file():
        raise DataFormatError(f"{p}: {what} file not found")
    img = _volume_header(p, what)
    vshape = tuple(int(x) for x in img.shape)
    if len(vshape) == 4 and vshape[3] == 1:
        vshape = vshape[:3]
    if len(vshape) != 3:
        raise DataFormatError(f"{p}: {what} must be 3-D (X, Y, Z); found shape {vshape}")
    want = grid.shape if grid is not None else shape
    if want is not None and vshape != tuple(want):
        of = f" of {grid.path}" if grid is not None else ""
        raise DataFormatError(f"{p}: {what} grid {vshape} does not match the betas grid {tuple(want)}{of} "
                              "(use the file from the same subject and space folder)")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all():
        raise DataFormatError(f"{p}: {what} NIfTI affine has NaN/inf entries (corrupt header)")
    if grid is not None and grid.affine is not None:
        why = affine_mismatch(affine, grid.affine)
        if why is not None:
            raise DataFormatError(f"{p}: {what} affine differs from that of {grid.affine_path or grid.path}: {why}; "
                                  "its voxel indices would pick other places (use the file from the same subject "
                                  "and space folder)")
    try:
        with np.errstate(all="ignore"):  # odd scl_slope/inter give NaN/inf, judged by the callers' checks
            data = np.asarray(img.get_fdata(dtype=np.float64)).reshape(vshape)
    except Exception as exc:  # noqa: BLE001 - corrupt payloads: zlib.error, OSError, EOFError, ValueError
        raise DataFormatError(f"{p}: not a readable NIfTI {what} ({_short(exc)})") from None
    return data, affine


def _as_labels(data: np.ndarray, path: Path, what: str) -> np.ndarray:
    finite = np.isfinite(data)
    if not finite.all():
        raise DataFormatError(f"{path}: {what} contains {int((~finite).sum())} NaN/inf values")
    if data.size and np.abs(data).max() >= 2 ** 31:
        raise DataFormatError(f"{path}: {what} labels must be -1, 0 or positive integers; found "
                              f"{data.flat[np.argmax(np.abs(data))]:g}")
    lab = np.rint(data).astype(np.int64)
    if lab.size and lab.min() < -1:
        raise DataFormatError(f"{path}: {what} labels must be -1, 0 or positive integers; found minimum {lab.min()}")
    return lab


def load_roi_volume(path: str | Path, shape: tuple[int, int, int] | None = None,
                    grid: VolumeGrid | None = None) -> np.ndarray:
    """Volume ROI as integer labels (−1 = not cortex, 0 = unlabelled, k > 0 = label), compared after rint.

    Returns
    -------
    ndarray of int64, shape (X, Y, Z)
    """
    data, _ = load_volume(path, shape, what="ROI volume", grid=grid)
    return _as_labels(data, Path(path), "ROI volume")


def load_surface_values(path: str | Path, n_vertices: int | None = None, what: str = "surface file") -> np.ndarray:
    """A per-vertex ``.mgh``/``.mgz`` (nibabel shape (V, 1, 1)) as float64 (V,)."""
    import nibabel as nib

    p = Path(path)
    if not p.is_file():
        raise DataFormatError(f"{p}: {what} not found")
    try:
        with np.errstate(all="ignore"):  # corrupt headers overflow in nibabel's arithmetic
            img = nib.load(str(p))
        if not isinstance(img, nib.MGHImage):
            raise DataFormatError(f"{p}: {what} is not an MGH file (nibabel read it as {type(img).__name__})")
        shape = tuple(int(s) for s in img.shape)
        if len(shape) < 1 or any(s != 1 for s in shape[1:]):
            raise DataFormatError(f"{p}: {what} must have nibabel shape (V, 1, 1); found {shape}")
        _check_payload_size(p, _MGH_HEADER_BYTES, shape[0] * np.dtype(img.header.get_data_dtype()).itemsize, what,
                            exact=False)
        with np.errstate(all="ignore"):
            data = np.asarray(img.get_fdata(dtype=np.float64)).reshape(-1)
    except DataFormatError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise DataFormatError(f"{p}: not a readable MGH {what} ({_short(exc)})") from None
    if n_vertices is not None and data.shape[0] != n_vertices:
        raise DataFormatError(f"{p}: {what} has {data.shape[0]} vertices; the betas have {n_vertices}")
    return data


def load_roi_surface(path: str | Path, n_vertices: int | None = None) -> np.ndarray:
    """fsaverage label ``{lh,rh}.NAME.mgz`` as int64 labels (V,)."""
    return _as_labels(load_surface_values(path, n_vertices, "surface ROI"), Path(path), "surface ROI")


def parse_ctab(text: str, source: str = "ctab") -> dict[int, str]:
    """Parse a ``NAME.mgz.ctab`` label table: one ``<int> <name>`` per line, split on the first whitespace.

    Returns
    -------
    dict of int -> str
        Includes ``0: 'Unknown'`` when present in the file.

    Raises
    ------
    DataFormatError
        A line that is not ``<int> <name>``, a name with control characters, or a label listed twice.
    """
    table: dict[int, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.split(None, 1)
        if len(parts) != 2 or not parts[0].lstrip("-").isdigit() or len(parts[0]) > 12:
            raise DataFormatError(f"{source}: line {n} must look like '<int> <name>'; found {line[:80]!r}")
        name = parts[1].strip()
        if any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in name):
            raise DataFormatError(f"{source}: line {n}: label name {name[:80]!r} contains control characters "
                                  "(not a text label table?)")
        k = int(parts[0])
        if k in table:
            raise DataFormatError(f"{source}: line {n}: label {k} is listed twice ({table[k]!r} and {name!r})")
        table[k] = name
    return table


def read_ctab(path: str | Path) -> dict[int, str]:
    """Read and parse a ``.ctab`` file (UTF-8 text; see :func:`parse_ctab`)."""
    p = Path(path)
    if not p.is_file():
        raise DataFormatError(f"{p}: label table not found")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise DataFormatError(f"{p}: cannot read the label table ({exc.strerror or exc})") from None
    if len(raw) > (16 << 20):
        raise DataFormatError(f"{p}: {len(raw)} bytes is too large for a label table (corrupt or not a .ctab?)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{p}: not a text label table (byte {exc.start} is not UTF-8)") from None
    return parse_ctab(text, source=str(p))


def check_ncsnr_values(values: np.ndarray, path: Path) -> np.ndarray:
    """Reject an ncsnr map with no finite value (an all-NaN file would make every noise ceiling NaN)."""
    if values.size and not np.isfinite(values).any():
        raise DataFormatError(f"{path}: ncsnr is NaN/inf in all {values.size} voxels/vertices (a broken export; "
                              "re-download it, or compute ncsnr from the betas: --set ncsnr=compute)")
    return values


def load_ncsnr(root: str | Path, subject: str, space: str, beta_version: str,
               shape: tuple[int, ...] | None = None,
               grid: VolumeGrid | None = None) -> tuple[np.ndarray, list[Path]]:
    """The release's ncsnr map.

    Parameters
    ----------
    shape : tuple, optional
        (X, Y, Z) for volumes, (V_lh, V_rh) for fsaverage.
    grid : VolumeGrid, optional
        Volumes: the betas' grid (shape and affine checked; see :func:`load_volume`).

    Returns
    -------
    ncsnr : ndarray of float64
        (X, Y, Z) for volumes; (V_lh + V_rh,) for fsaverage (lh then rh). NaN allowed (outside the brain),
        but not everywhere (:func:`check_ncsnr_values`).
    paths : list of Path
        Files read.
    """
    if space == "fsaverage":
        parts, paths = [], []
        for i, hemi in enumerate(layout.HEMIS):
            p = layout.ncsnr_path(root, subject, space, beta_version, hemi=hemi)
            parts.append(check_ncsnr_values(load_surface_values(p, None if shape is None else shape[i], "ncsnr"), p))
            paths.append(p)
        return np.concatenate(parts), paths
    p = layout.ncsnr_path(root, subject, space, beta_version)
    data, _ = load_volume(p, shape, what="ncsnr", grid=grid)
    return check_ncsnr_values(data, p), [p]
