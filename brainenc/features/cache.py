"""On-disk feature cache: .npy memmaps keyed by everything that changes the numbers.

Layout (one folder per key)::

    <cache_dir>/<backbone>/<key>/
        tokens.npy     float32|float16 [n_images, n_tokens, dim]    (absent when tokens="none")
        pooled.npy     float32|float16 [n_images, dim]              (absent when pooled="none")
        image_ids.npy  int64 [n_images]
        meta.json      the full key description, grid, shapes
        COMPLETE       written last; a folder without it is never read as a result

While extracting, rows go into ``tokens.partial.npy`` / ``pooled.partial.npy`` and
``progress.json`` records how many rows are flushed to disk (updated atomically after every
batch), so a killed extraction resumes from its last finished batch. A ``.lock`` file holding
the writer's pid keeps two processes from writing the same key at once (a lock left by a dead
process is taken over).

The key (:func:`feature_key`) hashes: the backbone name and family, the weights identity
(sha256 of the weights file, ``random-init+seed=...`` or ``fixed:...``), the library version
and architecture overrides, the preprocessing (size, resize mode, crop, interpolation,
mean/std), the canonical layer, the token and pooling rules, the storage dtype, the image
source identity and a hash of the image-id array. Batch size and device are not part of it.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brainenc._utils.io import load_npy, read_json, save_npy, write_json, write_text
from brainenc.config import canonical_json
from brainenc.exceptions import BrainencError, DataFormatError

__all__ = ["FeatureSet", "feature_key", "ids_digest", "load_feature_set", "CACHE_FORMAT"]

#: bump when the on-disk layout or the meaning of a key component changes
CACHE_FORMAT = 1


def ids_digest(image_ids: np.ndarray) -> str:
    """sha256 (hex, 32 chars) of an int64 little-endian id array (order matters)."""
    arr = np.ascontiguousarray(np.asarray(image_ids, dtype="<i8"))
    return hashlib.sha256(arr.tobytes()).hexdigest()[:32]


def feature_key(info: dict) -> str:
    """Hex digest (24 chars) of a key description (see the module docstring)."""
    return hashlib.sha256(canonical_json(info).encode()).hexdigest()[:24]


def safe_dirname(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "backbone"


@dataclass
class FeatureSet:
    """Features of a list of images, memory-mapped from the cache.

    Attributes
    ----------
    tokens : ndarray (memmap) or None, shape (n_images, n_tokens, dim)
        Per-image tokens; patches in row-major grid order, preceded by ``n_prefix`` prefix
        tokens (CLS, registers) when the token rule is ``"all"``.
    pooled : ndarray (memmap) or None, shape (n_images, dim_pooled)
    grid : (int, int)
        Patch grid ``(h, w)``; ``h * w == n_tokens - n_prefix``.
    n_prefix : int
        Number of prefix tokens stored in ``tokens`` (0 with the rule ``"patch"``).
    image_ids : ndarray, int64, shape (n_images,)
        Row ``i`` holds the features of image ``image_ids[i]`` (0-based 73k ids for NSD).
    key : str
        Cache key; ``meta`` holds the full description it hashes.
    cache_hit : bool
        True when nothing was computed by this call.
    path : Path
        Cache folder.
    """

    tokens: np.ndarray | None
    pooled: np.ndarray | None
    grid: tuple[int, int]
    n_prefix: int
    image_ids: np.ndarray
    key: str
    cache_hit: bool
    path: Path
    meta: dict = field(default_factory=dict, repr=False)

    @property
    def n_images(self) -> int:
        return int(self.image_ids.shape[0])

    @property
    def n_tokens(self) -> int:
        return 0 if self.tokens is None else int(self.tokens.shape[1])

    @property
    def dim(self) -> int:
        return int(self.tokens.shape[2]) if self.tokens is not None else int(self.pooled.shape[1])

    def rows_for(self, ids) -> np.ndarray:
        """Row indices of ``ids`` (e.g. trial-wise image ids) in this set.

        Parameters
        ----------
        ids : array-like of int, shape (m,)

        Returns
        -------
        ndarray, int64, shape (m,)
            ``self.image_ids[rows] == ids``; for duplicated ids in the set the first row is used.

        Raises
        ------
        DataFormatError
            If an id is not in the set.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        order = np.argsort(self.image_ids, kind="stable")
        sorted_ids = self.image_ids[order]
        pos = np.searchsorted(sorted_ids, ids)
        pos = np.clip(pos, 0, max(len(sorted_ids) - 1, 0))
        if len(sorted_ids) == 0 or not np.array_equal(sorted_ids[pos], ids):
            missing = np.setdiff1d(ids, self.image_ids)
            raise DataFormatError(f"{len(missing)} image ids not in this feature set (e.g. {missing[:5].tolist()})")
        return order[pos].astype(np.int64)

    def __repr__(self) -> str:
        tok = None if self.tokens is None else tuple(self.tokens.shape)
        pool = None if self.pooled is None else tuple(self.pooled.shape)
        return (f"FeatureSet(tokens={tok}, pooled={pool}, grid={self.grid}, key={self.key!r}, "
                f"cache_hit={self.cache_hit})")


def load_feature_set(path, cache_hit: bool = True, expect_key: str | None = None) -> FeatureSet:
    """Open a completed cache folder (memory-mapped).

    Raises
    ------
    DataFormatError
        When the folder is incomplete, its key differs from ``expect_key`` or a file has the
        wrong shape.
    """
    path = Path(path)
    if not (path / "COMPLETE").is_file():
        raise DataFormatError(f"{path}: not a completed feature cache (no COMPLETE marker)")
    meta = read_json(path / "meta.json")
    if expect_key is not None and meta.get("key") != expect_key:
        raise DataFormatError(f"{path}: cache key {meta.get('key')!r} does not match {expect_key!r}")
    ids = load_npy(path / "image_ids.npy")
    tokens = load_npy(path / "tokens.npy", mmap=True) if meta.get("has_tokens") else None
    pooled = load_npy(path / "pooled.npy", mmap=True) if meta.get("has_pooled") else None
    for name, arr, shape in (("tokens", tokens, meta.get("tokens_shape")), ("pooled", pooled, meta.get("pooled_shape"))):
        if arr is not None and list(arr.shape) != list(shape):
            raise DataFormatError(f"{path / (name + '.npy')}: shape {arr.shape} != recorded {shape}")
        if arr is not None and arr.shape[0] != ids.shape[0]:
            raise DataFormatError(f"{path / (name + '.npy')}: {arr.shape[0]} rows for {ids.shape[0]} image ids")
    return FeatureSet(tokens=tokens, pooled=pooled, grid=tuple(meta["grid"]), n_prefix=int(meta["n_prefix"]),
                      image_ids=ids, key=meta["key"], cache_hit=cache_hit, path=path, meta=meta)


class CacheLockedError(BrainencError, RuntimeError):
    """Another live process is writing the same cache entry."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def cache_lock(folder: Path):
    """Exclusive writer lock on a cache folder (stale locks of dead processes are taken over)."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _pid_alive(pid):
                raise CacheLockedError(f"{folder}: another process (pid {pid}) is extracting these features") from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        break
    else:
        raise CacheLockedError(f"{folder}: could not take the cache lock")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


class CacheWriter:
    """Row-wise writer of one cache entry with batch-granular resume (internal)."""

    def __init__(self, folder: Path, key: str, n_rows: int, dtype: str):
        self.folder = folder
        self.key = key
        self.n_rows = int(n_rows)
        self.dtype = np.dtype(dtype)
        self.tokens = None
        self.pooled = None
        self.n_done = 0
        self.layout: dict[str, Any] = {}

    @property
    def progress_file(self) -> Path:
        return self.folder / "progress.json"

    def try_resume(self) -> int:
        """Reopen partial files of the same key; returns the number of finished rows (0 if none)."""
        if not self.progress_file.is_file():
            self.clear_partial()
            return 0
        try:
            prog = read_json(self.progress_file)
            if prog.get("key") != self.key or prog.get("n_rows") != self.n_rows:
                raise DataFormatError("progress of another key")
            layout = prog["layout"]
            tokens = pooled = None
            if layout["tokens_shape"] is not None:
                tokens = np.load(self.folder / "tokens.partial.npy", mmap_mode="r+", allow_pickle=False)
                if list(tokens.shape) != layout["tokens_shape"] or tokens.dtype != self.dtype:
                    raise DataFormatError("tokens shape/dtype changed")
            if layout["pooled_shape"] is not None:
                pooled = np.load(self.folder / "pooled.partial.npy", mmap_mode="r+", allow_pickle=False)
                if list(pooled.shape) != layout["pooled_shape"] or pooled.dtype != self.dtype:
                    raise DataFormatError("pooled shape/dtype changed")
        except (DataFormatError, KeyError, OSError, ValueError):
            self.clear_partial()
            return 0
        self.tokens, self.pooled, self.layout = tokens, pooled, layout
        self.n_done = int(prog["n_done"])
        return self.n_done

    def clear_partial(self) -> None:
        for name in ("tokens.partial.npy", "pooled.partial.npy", "progress.json"):
            with contextlib.suppress(FileNotFoundError):
                (self.folder / name).unlink()
        with contextlib.suppress(FileNotFoundError):
            (self.folder / "COMPLETE").unlink()

    def allocate(self, tokens_shape, pooled_shape, grid, n_prefix) -> None:
        fmt = np.lib.format
        self.layout = {"tokens_shape": list(tokens_shape) if tokens_shape else None,
                       "pooled_shape": list(pooled_shape) if pooled_shape else None,
                       "grid": list(grid), "n_prefix": int(n_prefix)}
        if tokens_shape:
            self.tokens = fmt.open_memmap(self.folder / "tokens.partial.npy", mode="w+", dtype=self.dtype,
                                          shape=tuple(tokens_shape))
        if pooled_shape:
            self.pooled = fmt.open_memmap(self.folder / "pooled.partial.npy", mode="w+", dtype=self.dtype,
                                          shape=tuple(pooled_shape))
        self.n_done = 0

    def write(self, start: int, tokens: np.ndarray | None, pooled: np.ndarray | None) -> None:
        stop = start + (tokens.shape[0] if tokens is not None else pooled.shape[0])
        for arr, block, what in ((self.tokens, tokens, "tokens"), (self.pooled, pooled, "pooled")):
            if arr is None:
                continue
            cast = block.astype(self.dtype)
            if not np.isfinite(cast).all():
                hint = " (values overflow float16: use dtype='float32')" if self.dtype == np.float16 else ""
                raise DataFormatError(f"non-finite {what} features for rows {start}:{stop}{hint}")
            arr[start:stop] = cast
            arr.flush()
        self.n_done = stop
        write_json(self.progress_file, {"key": self.key, "n_rows": self.n_rows, "n_done": self.n_done,
                                        "layout": self.layout})

    def finish(self, image_ids: np.ndarray, meta: dict) -> None:
        for name, arr in (("tokens", self.tokens), ("pooled", self.pooled)):
            if arr is None:
                continue
            arr.flush()
            with open(self.folder / f"{name}.partial.npy", "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(self.folder / f"{name}.partial.npy", self.folder / f"{name}.npy")
        self.tokens = self.pooled = None
        save_npy(self.folder / "image_ids.npy", image_ids)
        meta = dict(meta, tokens_shape=self.layout["tokens_shape"], pooled_shape=self.layout["pooled_shape"],
                    has_tokens=self.layout["tokens_shape"] is not None,
                    has_pooled=self.layout["pooled_shape"] is not None,
                    grid=self.layout["grid"], n_prefix=self.layout["n_prefix"])
        write_json(self.folder / "meta.json", meta)
        with contextlib.suppress(FileNotFoundError):
            self.progress_file.unlink()
        write_text(self.folder / "COMPLETE", self.key + "\n")  # last: marks the entry as valid


def remove_entry(folder: Path) -> None:
    """Delete a cache entry (``overwrite=True``)."""
    if folder.is_dir():
        shutil.rmtree(folder)
