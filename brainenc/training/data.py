"""Torch data bridge: numpy arrays (memmaps welcome) -> batches, with a seeded global batch order
that is identical for one process and for N DDP processes (each rank takes a contiguous shard of
every global batch).

Two views of the same machinery:

- :class:`DictDataset` / :func:`make_dict_loader`: named arrays ``{"x": tokens, "y": Y, ...}`` ->
  batches ``{"x": Tensor [b, ...], "y": Tensor [b, ...], "index": int64 [b]}`` (what the
  :class:`~brainenc.training.Trainer` and its objectives consume);
- :class:`ArrayDataset` / :func:`make_loader`: ``(X, Y)`` -> tuples ``(x, y)`` (or ``(x,)``).
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from brainenc.exceptions import DataFormatError

__all__ = ["ArrayDataset", "DictDataset", "RowSubset", "ConcatRows", "GlobalBatchSampler", "make_loader", "make_dict_loader",
           "channel_statistics", "INDEX_KEY"]

#: Key of the dataset row indices [b] (int64) that :class:`DictDataset` adds to every batch.
INDEX_KEY = "index"


def _sorted_read(array, idx: np.ndarray, dtype=None) -> np.ndarray:
    """``array[idx]`` read in increasing row order (fast on memmaps), returned in ``idx`` order."""
    order = np.argsort(idx, kind="stable")
    inv = np.empty_like(order)
    inv[order] = np.arange(order.size)
    return np.asarray(array[idx[order]], dtype=dtype)[inv]


def channel_statistics(array, *, chunk_rows: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation over every axis but the last, streamed by rows.

    Reads ``chunk_rows`` rows at a time (a float16 memmap of NSD-scale tokens is never loaded
    whole) and accumulates shifted sums in float64, so the result does not depend on the chunking
    beyond rounding.

    Parameters
    ----------
    array : array [n, ..., C] (a :class:`RowSubset` or memmap welcome)
    chunk_rows : int

    Returns
    -------
    mean, std : float64 ndarray [C]
        Population standard deviation (``ddof=0``).
    """
    n = len(array)
    if n == 0:
        raise DataFormatError("channel statistics need at least one row")
    shift = None
    count, s1, s2 = 0, 0.0, 0.0
    for start in range(0, n, chunk_rows):
        x = np.asarray(array[start:start + chunk_rows], dtype=np.float64)
        x = x.reshape(-1, x.shape[-1])
        if shift is None:
            shift = x.mean(0)  # shifted sums: no cancellation for channels with a large mean
        x = x - shift
        count += x.shape[0]
        s1 = s1 + x.sum(0)
        s2 = s2 + np.einsum("ij,ij->j", x, x)
    m = s1 / count
    var = np.maximum(s2 / count - m * m, 0.0)
    return shift + m, np.sqrt(var)


class RowSubset:
    """Lazy row subset of an array (e.g. a train/validation split of a memmap) without copying it.

    Parameters
    ----------
    array : array [n, ...]
    index : int array [m]
        Rows of ``array`` exposed as rows ``0..m-1``.
    """

    def __init__(self, array, index):
        self.array = array
        self.index = np.asarray(index, dtype=np.int64)
        self.shape = (len(self.index),) + tuple(np.shape(array)[1:])
        self.dtype = array.dtype
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, idx):
        rows = self.index[idx]
        if np.ndim(rows) == 0:
            return self.array[int(rows)]
        return _sorted_read(self.array, rows)


class ConcatRows:
    """Lazy row concatenation of arrays with equal trailing shapes (e.g. real and synthetic examples).

    Rows ``0 .. len(parts[0]) - 1`` are ``parts[0]``'s, the next ones ``parts[1]``'s, and so on; a read
    touches each part only for its own rows (in increasing order, fast on memmaps). Nothing is copied
    up front.

    Parameters
    ----------
    parts : sequence of arrays [n_i, ...]
    """

    def __init__(self, parts: Sequence[Any]):
        parts = list(parts)
        if not parts:
            raise DataFormatError("ConcatRows needs at least one array")
        tails = {tuple(np.shape(p)[1:]) for p in parts}
        if len(tails) != 1:
            raise DataFormatError(f"ConcatRows: the arrays' shapes past the first axis differ: {sorted(tails)}")
        self.parts = parts
        self.offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        self.dtype = np.result_type(*[np.dtype(p.dtype) for p in parts])
        self.shape = (int(self.offsets[-1]),) + tails.pop()
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            idx = np.arange(*idx.indices(len(self)))
        rows = np.asarray(idx, dtype=np.int64)
        if rows.ndim == 0:
            r = int(rows) + len(self) if int(rows) < 0 else int(rows)
            if not 0 <= r < len(self):
                raise IndexError(f"row {int(rows)} out of range for {len(self)} rows")
            k = int(np.searchsorted(self.offsets, r, side="right") - 1)
            return np.asarray(self.parts[k][r - int(self.offsets[k])], dtype=self.dtype)
        rows = np.where(rows < 0, rows + len(self), rows)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows out of range for {len(self)} rows")
        out = np.empty((rows.size,) + self.shape[1:], dtype=self.dtype)
        part = np.searchsorted(self.offsets, rows, side="right") - 1
        for k in np.unique(part).tolist():
            sel = np.nonzero(part == k)[0]
            out[sel] = _sorted_read(self.parts[k], rows[sel] - self.offsets[k], self.dtype)
        return out


class ArrayDataset(Dataset):
    """Rows of ``X`` (and ``Y``) as tensors; batch reads go through one fancy-index call.

    Parameters
    ----------
    X : array [n, ...]
        e.g. tokens [n, n_tokens, dim]; any float dtype (cast to float32 per batch).
    Y : array [n, V], optional
    """

    def __init__(self, X: np.ndarray, Y: np.ndarray | None = None):
        if Y is not None and len(X) != len(Y):
            raise DataFormatError(f"'X' has {len(X)} rows, 'Y' has {len(Y)}; they must have the same number of rows")
        self.X, self.Y = X, Y

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, i):
        return self.__getitems__([i])

    def __getitems__(self, idx: Sequence[int]):
        idx = np.asarray(idx, dtype=np.int64)
        x = torch.from_numpy(_sorted_read(self.X, idx, np.float32))
        if self.Y is None:
            return (x,)
        return x, torch.from_numpy(_sorted_read(self.Y, idx, np.float32))


def _batch_dtype(dtype: np.dtype):
    kind = np.dtype(dtype).kind
    if kind == "f":
        return np.float32
    if kind in "iu":
        return np.int64
    if kind == "b":
        return np.bool_
    raise DataFormatError(f"arrays must be floating, integer or boolean; got dtype {dtype}")


class DictDataset(Dataset):
    """Rows of several named arrays of equal length; a batch is one fancy-index read per array.

    Parameters
    ----------
    arrays : mapping name -> array [n, ...]
        numpy arrays, memmaps or :class:`RowSubset` views (rows are read lazily per batch, never
        copied whole). Floating arrays come out as float32, integer arrays as int64, boolean as bool.
    name : str
        Used in error messages (e.g. ``"train"``).

    Notes
    -----
    Every batch also carries ``"index"`` (``INDEX_KEY``): int64 [b], the dataset rows of the
    batch, so objectives can derive per-sample randomness (masks) from the row alone — independent
    of batch composition, world size and resume.
    """

    def __init__(self, arrays: Mapping[str, Any], name: str = "data"):
        if not isinstance(arrays, Mapping) or not arrays:
            raise DataFormatError(f"'{name}' must be a non-empty mapping of name -> array [n, ...]")
        if INDEX_KEY in arrays:
            raise DataFormatError(f"'{name}' must not contain the key {INDEX_KEY!r} (reserved for row indices)")
        # numpy arrays / memmaps / RowSubset views stay lazy; anything else (lists, CPU tensors) -> ndarray
        self.arrays = {str(k): (v if isinstance(getattr(v, "dtype", None), np.dtype) and hasattr(v, "shape")
                                else np.asarray(v)) for k, v in arrays.items()}
        lengths = {k: len(v) for k, v in self.arrays.items()}
        if len(set(lengths.values())) > 1:
            rows = ", ".join(f"{k} has {n}" for k, n in lengths.items())
            raise DataFormatError(f"'{name}' arrays differ in length: {rows} rows")
        for k, v in self.arrays.items():
            if len(np.shape(v)) < 1:
                raise DataFormatError(f"'{name}[{k!r}]' must be an array [n, ...]; got a scalar")
        self._dtypes = {k: _batch_dtype(v.dtype) for k, v in self.arrays.items()}
        self.n = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return self.__getitems__([i])

    def __getitems__(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = np.asarray(idx, dtype=np.int64)
        out = {k: torch.from_numpy(_sorted_read(v, idx, self._dtypes[k])) for k, v in self.arrays.items()}
        out[INDEX_KEY] = torch.from_numpy(idx.copy())
        return out


class GlobalBatchSampler(Sampler):
    """Shuffled global batches of ``batch_size``; rank ``r`` of ``world`` yields its contiguous shard.

    A final partial batch smaller than ``world`` is dropped (every rank needs a sample); with
    ``world=1`` nothing is dropped. The order depends only on ``generator``'s state, whose state is
    checkpointed, so resume continues the same sequence.

    Parameters
    ----------
    n : int
    batch_size : int
        Global batch size.
    generator : torch.Generator or None
        None = no shuffling (evaluation order).
    rank, world : int
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator | None, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.generator, self.rank, self.world = n, batch_size, generator, rank, world
        self.last_global_sizes: list[int] = []

    def global_batches(self) -> list[torch.Tensor]:
        perm = torch.randperm(self.n, generator=self.generator) if self.generator is not None else torch.arange(self.n)
        batches = list(torch.split(perm, self.batch_size))
        if batches and len(batches[-1]) < self.world:
            batches = batches[:-1]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.global_batches()
        self.last_global_sizes = [len(b) for b in batches]
        for b in batches:
            yield torch.tensor_split(b, self.world)[self.rank].tolist()

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest >= self.world and rest > 0 else 0)


def _first(batch):
    return batch


def _loader(dataset: Dataset, *, batch_size: int, generator: torch.Generator | None, rank: int, world: int,
            num_workers: int) -> tuple[DataLoader, GlobalBatchSampler]:
    # note: iterating a DataLoader draws one number from ``generator`` (from torch's global
    # generator when None) for its worker seed: once per epoch, part of the checkpointed RNG stream
    sampler = GlobalBatchSampler(len(dataset), batch_size, generator, rank, world)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=_first, num_workers=num_workers,
                        generator=generator)
    return loader, sampler


def make_loader(X, Y=None, *, batch_size: int, generator: torch.Generator | None = None, rank: int = 0,
                world: int = 1, num_workers: int = 0) -> tuple[DataLoader, GlobalBatchSampler]:
    """DataLoader over :class:`ArrayDataset` with a :class:`GlobalBatchSampler`.

    Each item the loader yields is ``(x [b, ...], y [b, V])`` (or ``(x,)``), ``b`` = this rank's shard.
    """
    return _loader(ArrayDataset(X, Y), batch_size=batch_size, generator=generator, rank=rank, world=world,
                   num_workers=num_workers)


def make_dict_loader(data: Mapping[str, Any] | DictDataset, *, batch_size: int,
                     generator: torch.Generator | None = None, rank: int = 0, world: int = 1,
                     num_workers: int = 0, name: str = "data") -> tuple[DataLoader, GlobalBatchSampler]:
    """DataLoader over :class:`DictDataset` with a :class:`GlobalBatchSampler`.

    Parameters
    ----------
    data : mapping name -> array [n, ...], or DictDataset
    batch_size : int
        Global batch size (rank ``r`` of ``world`` gets its contiguous shard of each global batch).
    generator : torch.Generator, optional
        Data order; None = rows in order (evaluation).
    rank, world, num_workers : int
    name : str
        For error messages.

    Returns
    -------
    loader : DataLoader
        Yields dicts ``{name: Tensor [b, ...], "index": int64 [b]}``, ``b`` = this rank's shard.
    sampler : GlobalBatchSampler
        ``sampler.last_global_sizes[step]`` is the global size of batch ``step`` of the current epoch.
    """
    ds = data if isinstance(data, DictDataset) else DictDataset(data, name)
    return _loader(ds, batch_size=batch_size, generator=generator, rank=rank, world=world, num_workers=num_workers)
