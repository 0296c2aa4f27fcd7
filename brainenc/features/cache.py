"""On-disk feature cache: .npy memmaps keyed by everything that changes the numbers.

Layout::

    <cache_dir>/
        weights_sha256.json          {resolved path: {size, mtime_ns, sha256}} of weights files
        _identity/<hash>.json        backbone identities learnt from a build (see below)
        <backbone>/                  a :class:`brainenc._utils.store.KeyedFolderStore` (:func:`entry_store`)
            <key>/                   a complete entry (never written in place)
                tokens.npy     float32|float16 [n_images, n_tokens, dim]    (absent when tokens="none")
                pooled.npy     float32|float16 [n_images, dim]              (absent when pooled="none")
                image_ids.npy  int64 [n_images]
                meta.json      the full key description, grid, shapes
                COMPLETE       written last; a folder without it is never read as a result
            .<key>.partial/          the entry being extracted (kept after a crash, resumed)
            .<key>.lock              flock of its writer (pid and host)

While extracting, rows go into ``.<key>.partial/tokens.partial.npy`` / ``pooled.partial.npy`` and
``progress.json`` there records how many rows are flushed to disk (rewritten atomically after every
batch, always after the rows it counts), so a killed extraction resumes from its last finished
batch; rows written after the last progress update are simply computed again. At the end the
arrays get their final names, ``COMPLETE`` is written, ``progress.json`` removed and the folder
renamed to ``<key>``; a kill after ``COMPLETE`` publishes the folder on the next open, one before it
resumes with nothing left to compute. The ``.<key>.lock`` (``flock``-ed by the writer) keeps two
processes from writing the same key at once (a live holder: :class:`CacheLockedError` at once); the
kernel drops the lock when its process dies, so a lock file left by a killed process never blocks
the next run. Temporaries (``.<name>.<host>-<pid>.<random>.tmp<suffix>``,
``.tmp-<name>-<host>-<pid>-<hex>`` folders, see :mod:`brainenc._utils.io`) of dead processes are
swept when an entry is opened for writing.

The key (:func:`feature_key`) hashes: the backbone name and family, the weights identity
(sha256 of the weights file, ``random-init+seed=...`` or ``fixed:...``), the library version
and architecture overrides, the preprocessing (size, resize mode, crop, interpolation,
mean/std), the canonical layer, the token and pooling rules, the storage dtype, the image
source identity and a hash of the image-id array. Batch size and device are not part of it.

Computing the key never builds the model: the weights file is identified by (resolved path,
size, mtime_ns) and its sha256 read from ``weights_sha256.json`` while those match
(:func:`cached_sha256`; re-hashed once when the file changes), and the rest of the backbone's
description comes from its family's plan (:func:`brainenc.features.backbones.backbone_plan`)
or, for families whose preprocessing/blocks only the built model knows (open_clip, timm), from
an identity record written the first time the backbone was built for this cache
(:func:`read_identity_record`), keyed by the request (name, options, weights identity, library
and brainenc versions).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brainenc._utils.io import (
    LockedError,
    load_npy,
    read_json,
    remove_stale_temps,
    save_npy,
    sha256_file,
    write_json,
)
from brainenc._utils.store import KeyedFolderStore
from brainenc.config import canonical_json
from brainenc.exceptions import DataFormatError, MissingWeightsError

__all__ = ["FeatureSet", "feature_key", "ids_digest", "load_feature_set", "CACHE_FORMAT", "CacheLockedError",
           "cached_sha256"]

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



# ---------------------------------------------------------------------- weights content hashes
#: sidecar of weights hashes under a cache root: {"format": 1, "files": {path: {size, mtime_ns, sha256}}}
WEIGHTS_HASH_FILE = "weights_sha256.json"
_HASH_FORMAT = 1
#: per-process memo {(resolved path, size, mtime_ns): sha256 hex}
_SHA_MEMO: dict[tuple[str, int, int], str] = {}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _read_hash_sidecar(sidecar: Path) -> dict:
    try:
        data = read_json(sidecar)
    except DataFormatError:  # absent or damaged: rebuilt from scratch
        return {}
    files = data.get("files") if isinstance(data, dict) and data.get("format") == _HASH_FORMAT else None
    return files if isinstance(files, dict) else {}  # an older layout is ignored (and replaced)


def _entry_matches(entry, size: int, mtime_ns: int) -> bool:
    return (isinstance(entry, dict) and entry.get("size") == size and entry.get("mtime_ns") == mtime_ns
            and isinstance(entry.get("sha256"), str) and bool(_HEX64.match(entry["sha256"])))


def _store_hash(sidecar: Path, path: str, size: int, mtime_ns: int, digest: str) -> None:
    files = _read_hash_sidecar(sidecar)  # re-read just before writing: keep what others added
    files[path] = {"size": size, "mtime_ns": mtime_ns, "sha256": digest}
    for other in list(files):  # drop entries that can no longer match (file changed or gone)
        if other == path:
            continue
        try:
            st = os.stat(other)
        except OSError:
            del files[other]
            continue
        if not _entry_matches(files[other], st.st_size, st.st_mtime_ns):
            del files[other]
    sidecar.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(sidecar.parent, recursive=False)
    write_json(sidecar, {"format": _HASH_FORMAT, "files": files})


def cached_sha256(path, cache_root=None) -> str:
    """sha256 (hex) of a file, computed once per (resolved path, size, mtime_ns).

    Parameters
    ----------
    path : str or Path
    cache_root : str or Path, optional
        Folder holding the ``weights_sha256.json`` sidecar (a feature cache root). The digest
        is taken from it while the file's resolved path, size and ``mtime_ns`` equal the
        recorded ones; otherwise the file is hashed again and the entry replaced (written
        atomically). Without it only the per-process memo is used.

    Notes
    -----
    A rewrite that keeps size and ``mtime_ns`` (e.g. ``touch -r`` back to the old time, or
    ``cp -p`` of another file of the same size) is not noticed; any ordinary write or copy
    changes ``mtime_ns``.
    """
    p = Path(os.path.expanduser(str(path))).resolve()
    for _ in range(3):
        try:
            st = p.stat()
        except OSError:
            raise MissingWeightsError(f"weights file not found: {p}") from None
        if not p.is_file():
            raise MissingWeightsError(f"weights file not found: {p}")
        stamp = (str(p), int(st.st_size), int(st.st_mtime_ns))
        if stamp in _SHA_MEMO:
            return _SHA_MEMO[stamp]
        sidecar = Path(cache_root) / WEIGHTS_HASH_FILE if cache_root is not None else None
        if sidecar is not None:
            entry = _read_hash_sidecar(sidecar).get(stamp[0])
            if _entry_matches(entry, stamp[1], stamp[2]):
                _SHA_MEMO[stamp] = entry["sha256"]
                return entry["sha256"]
        digest = sha256_file(p)
        after = p.stat()
        if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            continue  # the file changed while it was read: hash it again
        _SHA_MEMO[stamp] = digest
        if sidecar is not None:
            try:
                _store_hash(sidecar, *stamp, digest)
            except OSError:  # a read-only shared cache still works, it only re-hashes
                pass
        return digest
    raise DataFormatError(f"{p}: the file keeps changing while it is hashed; wait until it is fully written")


# ---------------------------------------------------------------------- backbone identity records
IDENTITY_DIR = "_identity"  # never a backbone folder: safe_dirname() strips leading underscores
_IDENTITY_FORMAT = 1


def identity_record_path(cache_root, request: dict) -> Path:
    digest = hashlib.sha256(canonical_json(request).encode()).hexdigest()[:24]
    return Path(cache_root) / IDENTITY_DIR / f"{digest}.json"


def read_identity_record(cache_root, request: dict) -> dict | None:
    """The identity record of ``request`` under ``cache_root`` (None when absent or not matching)."""
    path = identity_record_path(cache_root, request)
    if not path.is_file():
        return None
    try:
        rec = read_json(path)
    except DataFormatError:
        return None
    want = ("describe", "n_blocks", "block_prefix", "layers")
    if (not isinstance(rec, dict) or rec.get("format") != _IDENTITY_FORMAT
            or canonical_json(rec.get("request")) != canonical_json(request) or any(k not in rec for k in want)):
        return None
    return rec


def write_identity_record(cache_root, request: dict, describe: dict, n_blocks: int, block_prefix: str,
                          layers: dict) -> None:
    """Record what a build of ``request`` produced (merging the layer names already known)."""
    path = identity_record_path(cache_root, request)
    old = read_identity_record(cache_root, request)
    merged = dict(old["layers"]) if old and canonical_json(old["describe"]) == canonical_json(describe) else {}
    merged.update(layers)
    rec = {"format": _IDENTITY_FORMAT, "request": request, "describe": describe, "n_blocks": int(n_blocks),
           "block_prefix": block_prefix, "layers": merged}
    if old is not None and canonical_json(old) == canonical_json(rec):
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path.parent, recursive=False)
        write_json(path, rec)
    except OSError:  # read-only cache: the next run builds the model again
        pass


# ---------------------------------------------------------------------- entry store
class CacheLockedError(LockedError):
    """Another live process is writing the same cache entry."""


PROGRESS_FILE = "progress.json"


def entry_store(backbone_folder) -> KeyedFolderStore:
    """The entries of one backbone folder ``<cache_dir>/<backbone>/`` (one entry folder per key).

    Writers fail at once when another live process writes the same entry
    (:class:`CacheLockedError`, naming the lock file and the holder's pid).
    """
    return KeyedFolderStore(backbone_folder, marker="COMPLETE", what="this feature-cache entry",
                            locked_error=CacheLockedError)


# ---------------------------------------------------------------------- writer
class CacheWriter:
    """Row-wise writer of one cache entry with batch-granular resume (internal).

    ``folder`` is the entry's resumable work folder (:meth:`KeyedFolderStore.write` with
    ``resumable=True``, under its lock). Crash safety (a SIGKILL at any point): rows are flushed
    (``msync``) before ``progress.json`` is atomically replaced, so ``n_done`` never counts rows that
    are not on disk; rows written after the last progress update are recomputed on resume.
    :meth:`finish` writes ids and meta and renames the partial arrays to their final names; a kill
    inside it resumes with ``n_done == n_rows`` and finishes without computing anything (arrays are
    found under either name). The store then writes ``COMPLETE``, removes ``progress.json`` (a
    scratch file) and renames the folder into place.
    """

    _ARRAYS = ("tokens", "pooled")

    def __init__(self, folder: Path, key: str, n_rows: int, dtype: str):
        self.folder = Path(folder)
        self.key = key
        self.n_rows = int(n_rows)
        self.dtype = np.dtype(dtype)
        self.tokens = None
        self.pooled = None
        self.n_done = 0
        self.layout: dict[str, Any] = {}

    @property
    def progress_file(self) -> Path:
        return self.folder / PROGRESS_FILE

    def _partial(self, name: str) -> Path:
        return self.folder / f"{name}.partial.npy"

    def _final(self, name: str) -> Path:
        return self.folder / f"{name}.npy"

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
            n_done = int(prog["n_done"])
            if not 0 <= n_done <= self.n_rows:
                raise DataFormatError("progress out of range")
            arrays = {}
            for name in self._ARRAYS:
                shape = layout[f"{name}_shape"]
                if shape is None:
                    arrays[name] = None
                    continue
                path = self._partial(name)
                if not path.is_file() and n_done == self.n_rows:
                    path = self._final(name)  # killed inside finish(), after this rename
                arr = np.load(path, mmap_mode="r+", allow_pickle=False)
                if list(arr.shape) != shape or arr.dtype != self.dtype:
                    raise DataFormatError(f"{name} shape/dtype changed")
                arrays[name] = arr
        except (DataFormatError, KeyError, OSError, ValueError, TypeError):
            self.clear_partial()
            return 0
        self.tokens, self.pooled, self.layout = arrays["tokens"], arrays["pooled"], layout
        self.n_done = n_done
        return self.n_done

    def clear_partial(self) -> None:
        """Forget any unfinished state (progress first: a kill midway leaves nothing to resume from)."""
        self.tokens = self.pooled = None
        for path in (self.progress_file, self._partial("tokens"), self._partial("pooled"), self._final("tokens"),
                     self._final("pooled"), self.folder / "meta.json", self.folder / "image_ids.npy"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def allocate(self, tokens_shape, pooled_shape, grid, n_prefix) -> None:
        fmt = np.lib.format
        self.layout = {"tokens_shape": list(tokens_shape) if tokens_shape else None,
                       "pooled_shape": list(pooled_shape) if pooled_shape else None,
                       "grid": list(grid), "n_prefix": int(n_prefix)}
        for name, shape in (("tokens", tokens_shape), ("pooled", pooled_shape)):
            arr = None
            if shape:
                with contextlib.suppress(FileNotFoundError):  # never truncate a file someone maps
                    self._partial(name).unlink()
                arr = fmt.open_memmap(self._partial(name), mode="w+", dtype=self.dtype, shape=tuple(shape))
            setattr(self, name, arr)
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
        self._write_progress()

    def _write_progress(self) -> None:
        write_json(self.progress_file, {"key": self.key, "n_rows": self.n_rows, "n_done": self.n_done,
                                        "layout": self.layout})

    def finish(self, image_ids: np.ndarray, meta: dict) -> None:
        if self.n_done != self.n_rows:
            raise DataFormatError(f"{self.folder}: {self.n_done} of {self.n_rows} rows written")
        for name in self._ARRAYS:
            arr = getattr(self, name)
            if arr is None:
                continue
            arr.flush()
            with open(arr.filename, "rb+") as fh:
                os.fsync(fh.fileno())
        save_npy(self.folder / "image_ids.npy", image_ids)
        meta = dict(meta, tokens_shape=self.layout["tokens_shape"], pooled_shape=self.layout["pooled_shape"],
                    has_tokens=self.layout["tokens_shape"] is not None,
                    has_pooled=self.layout["pooled_shape"] is not None,
                    grid=self.layout["grid"], n_prefix=self.layout["n_prefix"])
        write_json(self.folder / "meta.json", meta)
        for name in self._ARRAYS:
            arr = getattr(self, name)
            if arr is None:
                continue
            src = Path(arr.filename)
            setattr(self, name, None)
            del arr
            if src != self._final(name):
                os.replace(src, self._final(name))
