"""Several prepared NSD subjects seen as one dataset (multi-subject models such as Brain-IT).

Every subject keeps its own prepared arrays (memory-mapped, never copied or concatenated); this module
only adds the bookkeeping a model trained on all of them at once needs:

- a **global voxel index**: subject ``s``'s local voxel ``j`` is global voxel ``offsets[s] + j``
  (:meth:`MultiSubjectDataset.to_global` / :meth:`~MultiSubjectDataset.to_local`);
- an :class:`ExampleTable` of ``(subject, row, image_id)`` triples, one per prepared row of a split;
- :class:`PaddedResponses`, a lazy ``[n, V_max]`` float32 view of those rows, zero-padded to the
  largest subject (read row by row per subject, in increasing row order: fast on memmaps);
- :func:`feature_rows`, the lazy rows of an image-feature array selected by 73k image id;
- the **shared test images**: ``MultiSubjectDataset.shared_test_ids`` is the sorted intersection,
  over subjects, of the image ids in each subject's ``"test"`` split. With every subject prepared
  from all its sessions on one design these are the shared images; a subject prepared from fewer
  sessions (``PrepareConfig(n_sessions=1)``) has seen only some of them, and the intersection is
  what every subject can be evaluated on (:meth:`~MultiSubjectDataset.test_rows`).

numpy only (no torch): the lazy arrays follow the protocol of ``brainenc.training.data`` (``dtype``,
``shape``, ``ndim``, ``__len__``, ``__getitem__`` with an int, a slice or an int array), so they can be
handed to :class:`~brainenc.training.DictDataset` directly.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from brainenc.datasets.prepare import PreparedDataset, load_prepared
from brainenc.exceptions import ConfigError, DataFormatError

__all__ = ["MultiSubjectDataset", "ExampleTable", "PaddedResponses", "FeatureRows", "feature_rows",
           "load_multisubject"]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _as_index(idx, n: int, what: str) -> tuple[np.ndarray, bool]:
    """``idx`` (int, slice, int array, bool mask) -> (int64 positions in [0, n), scalar?)."""
    if isinstance(idx, slice):
        return np.arange(n, dtype=np.int64)[idx], False
    arr = np.asarray(idx)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise IndexError(f"{what}: a boolean index must have shape ({n},); found {arr.shape}")
        return np.flatnonzero(arr).astype(np.int64), False
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise IndexError(f"{what}: indices must be integers, a slice or a boolean mask; found dtype {arr.dtype}")
    scalar = arr.ndim == 0
    pos = arr.astype(np.int64).reshape(-1)
    bad = (pos < -n) | (pos >= n)
    if bad.any():
        raise IndexError(f"{what}: index {int(pos[bad][0])} is out of range for {n} rows")
    pos = np.where(pos < 0, pos + n, pos)
    return pos, scalar


def _read_rows(array, rows: np.ndarray) -> np.ndarray:
    """``array[rows]`` read in increasing row order (fast on memmaps), returned in ``rows`` order."""
    if rows.size == 0:
        return np.empty((0,) + tuple(np.shape(array)[1:]), dtype=array.dtype)
    order = np.argsort(rows, kind="stable")
    srt = rows[order]
    out = np.empty((rows.size,) + tuple(np.shape(array)[1:]), dtype=array.dtype)
    out[order] = np.asarray(array[srt])
    return out


def _first_ids(ids: np.ndarray, k: int = 5) -> str:
    shown = ", ".join(str(int(i)) for i in ids[:k])
    return shown + (", ..." if ids.size > k else "")


# ----------------------------------------------------------------------------------------------
# examples and lazy arrays
# ----------------------------------------------------------------------------------------------
@dataclass
class ExampleTable:
    """``(subject, row, image_id)`` triples: one training/evaluation example each.

    Attributes
    ----------
    subject : int64 ndarray [n]
        Index into ``MultiSubjectDataset.subjects``.
    row : int64 ndarray [n]
        Row of that subject's prepared arrays (``responses``, ``image_ids``).
    image_id : int64 ndarray [n]
        0-based 73k id of the image of that row.
    """

    subject: np.ndarray
    row: np.ndarray
    image_id: np.ndarray

    def __post_init__(self):
        self.subject = np.asarray(self.subject, dtype=np.int64).reshape(-1)
        self.row = np.asarray(self.row, dtype=np.int64).reshape(-1)
        self.image_id = np.asarray(self.image_id, dtype=np.int64).reshape(-1)
        if not (self.subject.size == self.row.size == self.image_id.size):
            raise DataFormatError(f"ExampleTable: 'subject', 'row' and 'image_id' must have the same length; "
                                  f"found {self.subject.size}, {self.row.size}, {self.image_id.size}")

    def __len__(self) -> int:
        return int(self.subject.size)

    def subset(self, idx) -> "ExampleTable":
        """The examples at ``idx`` (int array, slice or boolean mask), as a new table."""
        pos, _ = _as_index(idx, len(self), "ExampleTable.subset")
        return ExampleTable(self.subject[pos], self.row[pos], self.image_id[pos])

    def __repr__(self) -> str:
        return f"ExampleTable(n={len(self)}, subjects={np.unique(self.subject).tolist()})"


class PaddedResponses:
    """Lazy ``[n, V_max]`` float32 view of the responses of an :class:`ExampleTable`.

    Row ``i`` is ``responses[subject[i]][row[i]]`` followed by zeros up to ``V_max`` (the largest
    subject's voxel count). Nothing is loaded whole: ``__getitem__`` reads the requested rows subject
    by subject, in increasing row order (fast on memmaps).

    Attributes
    ----------
    dtype : numpy.float32
    shape : (n, V_max)
    ndim : 2
    subject, row : int64 ndarray [n]
        The table's columns.
    n_voxels : int64 ndarray [S]
        Voxels per subject (the valid prefix of a row of subject ``s``).
    lengths : int64 ndarray [n]
        Valid voxels of every row (``n_voxels[subject]``): a loss mask is ``arange(V_max) < lengths[:, None]``.
    """

    def __init__(self, responses: Sequence, table: ExampleTable, width: int | None = None):
        self.responses = list(responses)
        self.subject = table.subject
        self.row = table.row
        self.n_voxels = np.array([np.shape(r)[1] for r in self.responses], dtype=np.int64)
        v_max = int(self.n_voxels.max()) if self.n_voxels.size else 0
        width = v_max if width is None else int(width)
        if width < v_max:
            raise ConfigError(f"'width' = {width} is smaller than the largest subject's {v_max} voxels")
        n_subj = len(self.responses)
        if self.subject.size and (self.subject.min() < 0 or self.subject.max() >= n_subj):
            raise DataFormatError(f"PaddedResponses: subject indices must lie in [0, {n_subj - 1}]; "
                                  f"found {int(self.subject.min())}..{int(self.subject.max())}")
        for s in np.unique(self.subject):
            r = self.row[self.subject == s]
            n_rows = np.shape(self.responses[s])[0]
            if r.min() < 0 or r.max() >= n_rows:
                raise DataFormatError(f"PaddedResponses: rows of subject {int(s)} must lie in [0, {n_rows - 1}]; "
                                      f"found {int(r.min())}..{int(r.max())}")
        self.lengths = self.n_voxels[self.subject] if self.subject.size else np.zeros(0, np.int64)
        self.dtype = np.dtype(np.float32)
        self.shape = (int(self.subject.size), width)
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx):
        pos, scalar = _as_index(idx, len(self), "PaddedResponses")
        out = np.zeros((pos.size, self.shape[1]), dtype=np.float32)
        subj = self.subject[pos]
        for s in np.unique(subj):
            where = np.flatnonzero(subj == s)
            v = int(self.n_voxels[s])
            out[where, :v] = _read_rows(self.responses[s], self.row[pos[where]])
        return out[0] if scalar else out

    def __array__(self, dtype=None, copy=None):
        out = self[np.arange(len(self))]
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        return f"PaddedResponses(shape={self.shape}, subjects={len(self.responses)})"


class FeatureRows:
    """Lazy row subset of a feature array (same semantics as :class:`~brainenc.training.RowSubset`).

    Row ``i`` is ``array[index[i]]``; an int array of rows is read in increasing order of
    ``index`` (fast on memmaps) and returned in the requested order. Nothing is copied at
    construction.

    Parameters
    ----------
    array : array [n_images, ...]
        e.g. ``FeatureSet.tokens`` (float16 memmap [n_images, T, D]) or ``FeatureSet.pooled``.
    index : int array [m]
        Rows of ``array`` exposed as rows ``0..m-1``.
    """

    def __init__(self, array, index):
        self.array = array
        self.index = np.asarray(index, dtype=np.int64).reshape(-1)
        self.shape = (int(self.index.size),) + tuple(np.shape(array)[1:])
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx):
        pos, scalar = _as_index(idx, len(self), "FeatureRows")
        if scalar:
            return np.asarray(self.array[int(self.index[pos[0]])])
        return _read_rows(self.array, self.index[pos])

    def __array__(self, dtype=None, copy=None):
        out = self[np.arange(len(self))]
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        return f"FeatureRows(shape={self.shape}, dtype={self.dtype})"


def feature_rows(array, array_image_ids, image_ids) -> FeatureRows:
    """Lazy rows of ``array`` (rows aligned with ``array_image_ids``) for the wanted ``image_ids``.

    Parameters
    ----------
    array : array [n_images, ...]
        e.g. ``FeatureSet.tokens`` [n_images, T, D] (a memmap is never loaded whole).
    array_image_ids : int array [n_images]
        73k id of every row of ``array`` (``FeatureSet.image_ids``); must be unique.
    image_ids : int array [m]
        Wanted ids, any order, duplicates allowed (e.g. ``ExampleTable.image_id``).

    Returns
    -------
    FeatureRows
        Lazy ``[m, ...]``: row ``i`` = the features of image ``image_ids[i]``.

    Raises
    ------
    DataFormatError
        ``array_image_ids`` does not match ``array`` or repeats an id, or some wanted ids have no row
        (the message gives how many and the first few).
    """
    have = np.asarray(array_image_ids, dtype=np.int64).reshape(-1)
    want = np.asarray(image_ids, dtype=np.int64).reshape(-1)
    n = np.shape(array)[0]
    if have.size != n:
        raise DataFormatError(f"feature_rows: 'array_image_ids' has {have.size} ids for {n} feature rows")
    order = np.argsort(have, kind="stable")
    srt = have[order]
    dup = srt[1:][srt[1:] == srt[:-1]]
    if dup.size:
        raise DataFormatError(f"feature_rows: 'array_image_ids' repeats {np.unique(dup).size} id(s) "
                              f"({_first_ids(np.unique(dup))}); each image must have one feature row")
    if srt.size:
        pos = np.minimum(np.searchsorted(srt, want), srt.size - 1)
        found = srt[pos] == want
    else:
        pos, found = np.zeros(want.size, dtype=np.int64), np.zeros(want.size, dtype=bool)
    if not found.all():
        missing = np.unique(want[~found])
        raise DataFormatError(f"feature_rows: {missing.size} wanted image id(s) have no feature row "
                              f"(first: {_first_ids(missing)}); extract features for every image of the "
                              f"dataset (MultiSubjectDataset.image_ids())")
    return FeatureRows(array, order[pos])


# ----------------------------------------------------------------------------------------------
# the multi-subject dataset
# ----------------------------------------------------------------------------------------------
class MultiSubjectDataset:
    """Several prepared NSD subjects (same NSD root/design) seen as one dataset with a global voxel index.

    Parameters
    ----------
    datasets : sequence of PreparedDataset
        One per subject; their order is the subject order (subject index ``s``).

    Attributes
    ----------
    subjects : list of str
    datasets : list of PreparedDataset
    n_voxels : int64 ndarray [S]
    offsets : int64 ndarray [S + 1]
        Global voxel id of subject ``s``'s local voxel ``j`` is ``offsets[s] + j``; ``offsets[-1]`` =
        ``n_total_voxels``.
    n_total_voxels : int
    shared_test_ids : int64 ndarray
        Sorted 0-based 73k ids present in the ``"test"`` split of *every* subject (the intersection:
        a subject prepared from fewer sessions has seen only part of the shared images).

    Raises
    ------
    ConfigError
        No dataset, or a subject given twice.
    """

    def __init__(self, datasets: Sequence[PreparedDataset]):
        datasets = list(datasets)
        if not datasets:
            raise ConfigError("MultiSubjectDataset needs at least one prepared dataset; none was given")
        seen: dict[str, object] = {}
        for ds in datasets:
            if ds.subject in seen:
                raise ConfigError(f"subject {ds.subject} is given twice ({seen[ds.subject]} and "
                                  f"{ds.path or '(in memory)'}); pass each subject once")
            seen[ds.subject] = ds.path or "(in memory)"
            if "test" not in ds.splits or "train" not in ds.splits:
                raise DataFormatError(f"{ds.path or ds.subject}: subject {ds.subject} has no 'train'/'test' "
                                      f"split (splits: {sorted(ds.splits)})")
        self.datasets = datasets
        self.subjects = [ds.subject for ds in datasets]
        self.n_voxels = np.array([ds.n_voxels for ds in datasets], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.n_voxels)]).astype(np.int64)
        self.n_total_voxels = int(self.offsets[-1])
        shared = None
        for ds in datasets:
            ids = np.unique(ds.image_ids[ds.splits["test"]])
            shared = ids if shared is None else np.intersect1d(shared, ids, assume_unique=True)
        self.shared_test_ids = shared.astype(np.int64)

    # ---- subjects and voxels
    @property
    def n_subjects(self) -> int:
        """Number of subjects."""
        return len(self.subjects)

    def subject_index(self, subject: int | str) -> int:
        """Index of ``subject`` (a name like ``"subj02"`` or an index) in ``subjects``."""
        if isinstance(subject, (int, np.integer)) and not isinstance(subject, bool):
            if not 0 <= int(subject) < len(self.subjects):
                raise ConfigError(f"subject index {int(subject)} is out of range for {len(self.subjects)} "
                                  f"subjects ({', '.join(self.subjects)})")
            return int(subject)
        if isinstance(subject, str) and subject in self.subjects:
            return self.subjects.index(subject)
        raise ConfigError(f"subject {subject!r} is not in this dataset (subjects: {', '.join(self.subjects)})")

    def to_global(self, subject: int | str, local) -> np.ndarray:
        """Global voxel ids (int64) of ``subject``'s local voxel indices ``local``."""
        s = self.subject_index(subject)
        loc = np.asarray(local, dtype=np.int64)
        bad = (loc < 0) | (loc >= self.n_voxels[s])
        if bad.any():
            raise IndexError(f"local voxel {int(loc[bad].flat[0])} is out of range for {self.subjects[s]} "
                             f"({int(self.n_voxels[s])} voxels)")
        return loc + self.offsets[s]

    def to_local(self, global_ids) -> tuple[np.ndarray, np.ndarray]:
        """``(subject, local)`` int64 arrays (same shape as ``global_ids``) of global voxel ids."""
        g = np.asarray(global_ids, dtype=np.int64)
        bad = (g < 0) | (g >= self.n_total_voxels)
        if bad.any():
            raise IndexError(f"global voxel {int(g[bad].flat[0])} is out of range for {self.n_total_voxels} voxels")
        subj = np.searchsorted(self.offsets, g, side="right").astype(np.int64) - 1
        return subj, g - self.offsets[subj]

    # ---- rows and images
    def responses(self, subject: int | str):
        """``subject``'s prepared responses (float32 [n_samples_s, V_s], the memmap itself, never copied)."""
        return self.datasets[self.subject_index(subject)].responses

    def test_rows(self, subject: int | str) -> np.ndarray:
        """Rows of ``subject``'s ``"test"`` split whose image is in ``shared_test_ids``, in that order.

        With averaged repeats (the default prepare) this is one row per shared test image, so row ``i``
        of every subject shows image ``shared_test_ids[i]``. With ``repeats="single"`` an image has one
        row per trial: they are grouped by image in ``shared_test_ids`` order, chronological within.
        """
        ds = self.datasets[self.subject_index(subject)]
        rows = ds.splits["test"]
        ids = ds.image_ids[rows]
        keep = np.isin(ids, self.shared_test_ids)
        rows, ids = rows[keep], ids[keep]
        order = np.lexsort((rows, np.searchsorted(self.shared_test_ids, ids)))
        return rows[order].astype(np.int64)

    def examples(self, split: str = "train", subjects: Iterable[int | str] | None = None) -> ExampleTable:
        """Every ``(subject, row)`` of ``split`` (subjects in the given order, rows ascending).

        Parameters
        ----------
        split : str
            A split name every chosen subject has (``"train"``, ``"test"``, ``"val"`` ...).
        subjects : iterable of names or indices, optional
            Default: every subject, in order.
        """
        chosen = list(range(self.n_subjects)) if subjects is None else [self.subject_index(s) for s in subjects]
        if len(set(chosen)) != len(chosen):
            raise ConfigError(f"'subjects' repeats a subject: {[self.subjects[s] for s in chosen]}")
        subj, rows, ids = [], [], []
        for s in chosen:
            ds = self.datasets[s]
            if split not in ds.splits:
                raise ConfigError(f"split {split!r} does not exist for {ds.subject} (splits: {sorted(ds.splits)})")
            r = np.sort(ds.splits[split])
            subj.append(np.full(r.size, s, dtype=np.int64))
            rows.append(r)
            ids.append(ds.image_ids[r])
        cat = (lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64))
        return ExampleTable(cat(subj), cat(rows), cat(ids))

    def image_ids(self) -> np.ndarray:
        """Sorted unique 0-based 73k ids of every row of every subject (what features must cover)."""
        return np.unique(np.concatenate([ds.image_ids for ds in self.datasets])).astype(np.int64)

    def padded_responses(self, table: ExampleTable, width: int | None = None) -> PaddedResponses:
        """Lazy ``[len(table), V_max]`` float32 responses of ``table``'s rows, zero-padded (see :class:`PaddedResponses`)."""
        return PaddedResponses([ds.responses for ds in self.datasets], table, width=width)

    def describe(self) -> str:
        """A header line, then one line per subject: voxels (global range), rows per split, sessions."""
        lines = [f"{self.n_subjects} subjects, {self.n_total_voxels} voxels in all, "
                 f"{self.shared_test_ids.size} shared test images, {self.image_ids().size} images"]
        for s, ds in enumerate(self.datasets):
            counts = ", ".join(f"{k} {v}" for k, v in sorted(ds.split_counts().items()))
            sess = ds.manifest.get("n_sessions", "?")
            lines.append(f"  {ds.subject}: {int(self.n_voxels[s])} voxels "
                         f"[{int(self.offsets[s])}, {int(self.offsets[s + 1])}); rows {counts}; "
                         f"sessions {sess}; {self.test_rows(s).size} shared test rows")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"MultiSubjectDataset(subjects={self.subjects}, n_voxels={self.n_voxels.tolist()}, "
                f"shared_test={self.shared_test_ids.size})")


def load_multisubject(paths: Sequence[str | Path]) -> MultiSubjectDataset:
    """Open prepared cache folders (one per subject, in subject order) as a :class:`MultiSubjectDataset`."""
    return MultiSubjectDataset([load_prepared(p) for p in paths])
