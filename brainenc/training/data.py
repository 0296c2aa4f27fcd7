"""Torch data bridge: numpy arrays (memmaps welcome) -> batches, with a seeded global batch order
that is identical for one process and for N DDP processes (each rank takes a contiguous shard of
every global batch)."""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["ArrayDataset", "RowSubset", "GlobalBatchSampler", "make_loader"]


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
        order = np.argsort(rows, kind="stable")  # sorted reads on memmaps
        inv = np.empty_like(order)
        inv[order] = np.arange(order.size)
        return np.asarray(self.array[rows[order]])[inv]


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
            raise ValueError(f"X has {len(X)} rows, Y has {len(Y)}")
        self.X, self.Y = X, Y

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, i):
        return self.__getitems__([i])

    def __getitems__(self, idx: Sequence[int]):
        idx = np.asarray(idx, dtype=np.int64)
        order = np.argsort(idx, kind="stable")  # sorted reads are fast on memmaps; restore order after
        inv = np.empty_like(order)
        inv[order] = np.arange(order.size)
        x = torch.from_numpy(np.asarray(self.X[idx[order]], dtype=np.float32)[inv])
        if self.Y is None:
            return (x,)
        y = torch.from_numpy(np.asarray(self.Y[idx[order]], dtype=np.float32)[inv])
        return x, y


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


def make_loader(X, Y=None, *, batch_size: int, generator: torch.Generator | None = None, rank: int = 0,
                world: int = 1, num_workers: int = 0) -> tuple[DataLoader, GlobalBatchSampler]:
    """DataLoader over :class:`ArrayDataset` with a :class:`GlobalBatchSampler`.

    Each item the loader yields is ``(x [b, ...], y [b, V])`` (or ``(x,)``), ``b`` = this rank's shard.
    """
    sampler = GlobalBatchSampler(len(X), batch_size, generator, rank, world)
    loader = DataLoader(ArrayDataset(X, Y), batch_sampler=sampler, collate_fn=_first, num_workers=num_workers,
                        generator=generator)
    return loader, sampler
