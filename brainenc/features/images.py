"""Image sources: anything with ``read(ids) -> uint8 [n, H, W, 3]`` and ``identity() -> str``.

``identity()`` goes into the feature-cache key, so it must change whenever the pixels behind
the ids could change. The sources here derive it from content (a hash of the array, or of a
sample of images plus the dataset shape for HDF5 files), never from an absolute path, so a
data root can move without invalidating caches.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from brainenc.exceptions import DataFormatError

__all__ = ["ImageSource", "HDF5Images", "ArrayImages", "check_image_ids", "as_image_source"]


@runtime_checkable
class ImageSource(Protocol):
    """Protocol of image sources used by :func:`brainenc.features.extract_features`."""

    def read(self, ids: np.ndarray) -> np.ndarray:
        """Return uint8 images ``[len(ids), H, W, 3]`` in the order of ``ids``."""

    def identity(self) -> str:
        """A string that changes whenever the images behind the ids may change."""


def check_image_ids(image_ids, n_available: int | None = None, name: str = "image_ids") -> np.ndarray:
    """Validate 0-based image ids and return them as int64 ``[n]``.

    Parameters
    ----------
    image_ids : array-like of int, shape (n,)
    n_available : int, optional
        Number of images in the source; ids must be ``< n_available``.
    """
    ids = np.asarray(image_ids)
    if ids.ndim != 1:
        raise DataFormatError(f"'{name}' must be a 1-D array of 0-based image ids; got shape {ids.shape}")
    if ids.size and ids.dtype.kind not in "iu":
        if ids.dtype.kind == "f" and np.all(np.mod(ids, 1) == 0):
            ids = ids.astype(np.int64)
        else:
            raise DataFormatError(f"'{name}' must contain integers; got dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if ids.size and ids.min() < 0:
        raise DataFormatError(f"'{name}' must be 0-based non-negative ids; found {int(ids.min())}")
    if n_available is not None and ids.size and ids.max() >= n_available:
        raise DataFormatError(f"'{name}' contains id {int(ids.max())} but the source holds {n_available} images")
    return ids


def _check_batch(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise DataFormatError(f"{where}: images must have shape [n, H, W, 3]; got {arr.shape}")
    if arr.dtype != np.uint8:
        raise DataFormatError(f"{where}: images must be uint8; got {arr.dtype}")
    return arr


class ArrayImages:
    """Images held in memory (or a memmap) as uint8 ``[n_images, H, W, 3]``, indexed by row.

    Parameters
    ----------
    array : ndarray, uint8, shape (n_images, H, W, 3)
    name : str
        Optional label included in :meth:`identity` (for humans; the hash decides).
    """

    def __init__(self, array: np.ndarray, name: str = "array"):
        self.array = _check_batch(np.asarray(array), "ArrayImages")
        self.name = name
        self._identity: str | None = None

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def read(self, ids) -> np.ndarray:
        ids = check_image_ids(ids, len(self))
        return np.ascontiguousarray(self.array[ids])

    def identity(self) -> str:
        """``"array:<name>:<hash>"``: a hash of the array's shape and contents, labelled with ``name``."""
        if self._identity is None:
            h = hashlib.sha256(str(self.array.shape).encode())
            flat = np.ascontiguousarray(self.array).reshape(len(self), -1)
            for start in range(0, len(self), 256):  # chunked: no full copy of a memmap
                h.update(np.ascontiguousarray(flat[start:start + 256]).tobytes())
            self._identity = f"array:{self.name}:{h.hexdigest()[:32]}"
        return self._identity

    def __repr__(self) -> str:
        return f"ArrayImages(shape={self.array.shape})"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def read_runs(ds, sorted_ids: np.ndarray) -> np.ndarray:
    """Read rows ``sorted_ids`` (sorted, unique) of an h5py dataset as contiguous slices.

    h5py point selection (``ds[list]``) on a per-image-chunked brick is ~30x slower than
    slicing: with NSD's one-image chunks, each run of consecutive ids is one slice read.
    """
    out = np.empty((len(sorted_ids),) + tuple(ds.shape[1:]), dtype=ds.dtype)
    breaks = np.flatnonzero(np.diff(sorted_ids) != 1) + 1
    start = 0
    for stop in list(breaks) + [len(sorted_ids)]:
        a, b = int(sorted_ids[start]), int(sorted_ids[stop - 1]) + 1
        ds.read_direct(out, source_sel=np.s_[a:b], dest_sel=np.s_[start:stop])
        start = stop
    return out


class HDF5Images:
    """Lazy reader of an image brick in an HDF5 file (NSD ``nsd_stimuli.hdf5`` layout).

    Parameters
    ----------
    path : str or Path
        HDF5 file.
    key : str
        Dataset holding uint8 images ``[n_images, H, W, 3]`` (NSD: ``"imgBrick"``, 73k × 425 × 425 × 3),
        indexed by 0-based image id.
    n_identity_samples : int
        Number of evenly spaced images hashed (with the dataset shape and file size) into
        :meth:`identity`. Hashing the whole 37 GB NSD brick would take minutes.

    Notes
    -----
    ``read`` accepts unsorted ids with duplicates: h5py fancy indexing needs sorted unique
    indices, so ids are sorted and de-duplicated, read, then put back in the requested order.
    The file is opened on first use and re-opened in a forked child process.
    """

    def __init__(self, path, key: str = "imgBrick", n_identity_samples: int = 8):
        self.path = Path(path)
        self.key = key
        self.n_identity_samples = int(n_identity_samples)
        if not self.path.is_file():
            raise DataFormatError(f"{self.path}: stimulus HDF5 file not found")
        self._fh = None
        self._pid = None
        self._identity: str | None = None
        ds = self._dataset()
        if ds.ndim != 4 or ds.shape[-1] != 3 or ds.dtype != np.uint8:
            raise DataFormatError(
                f"{self.path}: dataset '{key}' must be uint8 [n, H, W, 3]; got {ds.dtype} {ds.shape}")

    def _dataset(self):
        import h5py

        if self._fh is None or self._pid != os.getpid():
            try:
                self._fh = h5py.File(self.path, "r")
            except Exception as exc:  # noqa: BLE001 - h5py raises OSError, ValueError, ... on bad files
                raise DataFormatError(f"{self.path}: not a readable HDF5 file ({_one_line(exc)})") from None
            self._pid = os.getpid()
        try:
            if self.key not in self._fh:
                raise DataFormatError(f"{self.path}: no dataset '{self.key}' (found: {', '.join(self._fh.keys())})")
            ds = self._fh[self.key]
            if not isinstance(ds, h5py.Dataset):
                raise DataFormatError(f"{self.path}: '{self.key}' is a group, not a dataset")
            ds.shape, ds.dtype  # noqa: B018 - a damaged header fails here, not in a caller
        except DataFormatError:
            raise
        except Exception as exc:  # noqa: BLE001 - damaged metadata: OSError, KeyError, ValueError, ...
            raise DataFormatError(f"{self.path}: not a readable HDF5 file ({_one_line(exc)})") from None
        return ds

    def __len__(self) -> int:
        return int(self._dataset().shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._dataset().shape)

    @property
    def dtype(self) -> np.dtype:
        return self._dataset().dtype

    def read(self, ids) -> np.ndarray:
        ds = self._dataset()
        ids = check_image_ids(ids, ds.shape[0])
        if ids.size == 0:
            return np.zeros((0,) + tuple(ds.shape[1:]), dtype=np.uint8)
        uniq, inverse = np.unique(ids, return_inverse=True)
        try:
            block = read_runs(ds, uniq)
        except Exception as exc:  # noqa: BLE001 - corrupt chunks: OSError, ValueError, ...
            raise DataFormatError(f"{self.path}: failed to read images ({_one_line(exc)})") from None
        return np.ascontiguousarray(block[inverse.reshape(-1)])

    def identity(self) -> str:
        """``"hdf5:<file name>:<key>:<hash>"``: a hash of the dataset shape, the file size and
        ``n_identity_samples`` evenly spaced images.

        The folder is not part of it, so moving the file keeps feature caches valid.
        """
        if self._identity is None:
            ds = self._dataset()
            n = ds.shape[0]
            k = max(1, min(self.n_identity_samples, n))
            sample = np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))
            h = hashlib.sha256(f"{tuple(ds.shape)}|{self.path.stat().st_size}".encode())
            try:
                h.update(np.ascontiguousarray(ds[sample]).tobytes())
            except Exception as exc:  # noqa: BLE001 - corrupt chunks: OSError, ValueError, ...
                raise DataFormatError(f"{self.path}: failed to read images ({_one_line(exc)})") from None
            self._identity = f"hdf5:{self.path.name}:{self.key}:{h.hexdigest()[:32]}"
        return self._identity

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __getstate__(self):  # picklable for worker processes without the open handle
        state = dict(self.__dict__)
        state["_fh"] = None
        return state

    def __repr__(self) -> str:
        return f"HDF5Images({str(self.path)!r}, key={self.key!r})"


def as_image_source(images) -> ImageSource:
    """Accept an :class:`ImageSource`, a uint8 array ``[n, H, W, 3]``, or a path to an HDF5 brick."""
    if isinstance(images, np.ndarray):
        return ArrayImages(images)
    if isinstance(images, (str, os.PathLike)):
        return HDF5Images(images)
    if callable(getattr(images, "read", None)) and callable(getattr(images, "identity", None)):
        return images
    raise DataFormatError(
        "'images' must be an object with read(ids) and identity(), a uint8 array [n, H, W, 3], "
        f"or a path to an HDF5 image brick; got {type(images).__name__}")
