"""Per-voxel maps written back into subject space so they open in any viewer.

- volume spaces (``func1pt8mm``, ``func1mm``): a NIfTI-1 image with the dataset's grid shape
  and affine; voxel ``i`` of the map goes to ``geometry["indices"][i]`` (X, Y, Z);
- ``fsaverage``: one MGH file per hemisphere (``lh.<name>.mgh``, ``rh.<name>.mgh``) of shape
  ``(n_vertices, 1, 1)``, FreeSurfer's layout; voxel ``i`` goes to vertex
  ``geometry["vertex"][i]`` of hemisphere ``geometry["hemi"][i]``.

Everything outside the dataset's voxels is ``fill`` (0 by default: viewers treat 0 as "no
value", NaN is not handled everywhere). Files are written atomically.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from brainenc._utils.io import atomic_path
from brainenc.exceptions import DataFormatError

__all__ = ["is_volume", "values_to_volume", "values_to_surface", "hemisphere_sizes", "write_map", "FSAVERAGE_VERTICES"]

FSAVERAGE_VERTICES = 163842
_HEMIS = ("lh", "rh")


def is_volume(geometry: Mapping) -> bool:
    """True for a volume geometry (has ``indices``), False for a surface one (has ``vertex``)."""
    if "indices" in geometry:
        return True
    if "vertex" in geometry:
        return False
    raise DataFormatError("geometry must hold 'indices' (volume) or 'hemi'/'vertex' (surface); "
                          f"got keys {sorted(geometry)}")


def _hemi_codes(hemi) -> np.ndarray:
    """Hemisphere per voxel as 0 (lh) / 1 (rh), from strings or integers."""
    h = np.asarray(hemi)
    if h.dtype.kind in "US":
        h = np.char.lower(h.astype(str))
        bad = ~np.isin(h, _HEMIS)
        if bad.any():
            raise DataFormatError(f"geometry 'hemi' must be 'lh' or 'rh'; got {h[bad][0]!r}")
        return (h == "rh").astype(np.int64)
    h = h.astype(np.int64)
    if h.size and (h.min() < 0 or h.max() > 1):
        raise DataFormatError("geometry 'hemi' must be 0 (lh) / 1 (rh) when numeric")
    return h


def _check_values(values, n: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float32)
    if v.ndim != 1 or v.shape[0] != n:
        raise DataFormatError(f"map values must have shape ({n},) to match the geometry; got {v.shape}")
    return v


def values_to_volume(values, geometry: Mapping, fill: float = 0.0) -> np.ndarray:
    """Scatter per-voxel values into the subject's 3-D grid.

    Parameters
    ----------
    values : array of shape (n_voxels,)
    geometry : dict
        ``shape`` (X, Y, Z) and ``indices`` int array of shape (n_voxels, 3).
    fill : float
        Value outside the dataset's voxels.

    Returns
    -------
    volume : float32 array of shape ``geometry["shape"]``
    """
    idx = np.asarray(geometry["indices"], dtype=np.int64)
    shape = tuple(int(s) for s in geometry["shape"])
    if idx.ndim != 2 or idx.shape[1] != 3 or len(shape) != 3:
        raise DataFormatError(f"volume geometry needs 'shape' (3 ints) and 'indices' (n, 3); got {shape}, {idx.shape}")
    if idx.size and ((idx < 0).any() or (idx >= np.asarray(shape)).any()):
        raise DataFormatError(f"geometry 'indices' fall outside the grid {shape}")
    v = _check_values(values, idx.shape[0])
    vol = np.full(shape, fill, dtype=np.float32)
    vol[idx[:, 0], idx[:, 1], idx[:, 2]] = v
    return vol


def hemisphere_sizes(geometry: Mapping) -> tuple[int, int]:
    """Vertices of ``(lh, rh)``: ``geometry["n_vertices"]`` if given (one number for both, or
    ``[n_lh, n_rh]`` as a prepared dataset stores it), else 163842 for ``fsaverage``, else one more than
    the largest vertex index of either hemisphere."""
    if "n_vertices" in geometry:
        nv = np.atleast_1d(np.asarray(geometry["n_vertices"], dtype=np.int64)).ravel()
        if nv.size not in (1, 2):
            raise DataFormatError(f"geometry 'n_vertices' must be one size or [lh, rh]; got {geometry['n_vertices']!r}")
        return int(nv[0]), int(nv[-1])
    vertex = np.asarray(geometry["vertex"], dtype=np.int64)
    if geometry.get("space") == "fsaverage" and (vertex.size == 0 or vertex.max() < FSAVERAGE_VERTICES):
        return FSAVERAGE_VERTICES, FSAVERAGE_VERTICES
    n = int(vertex.max()) + 1 if vertex.size else 0
    return n, n


def surface_size(geometry: Mapping) -> int:
    """Vertices per hemisphere (the larger of :func:`hemisphere_sizes`)."""
    return max(hemisphere_sizes(geometry))


def values_to_surface(values, geometry: Mapping, fill: float = 0.0) -> dict[str, np.ndarray]:
    """Scatter per-voxel values onto each hemisphere's vertices.

    Parameters
    ----------
    values : array of shape (n_voxels,)
    geometry : dict
        ``hemi`` (n_voxels,) of 'lh'/'rh' (or 0/1), ``vertex`` int (n_voxels,), optional ``n_vertices``
        (one size, or ``[n_lh, n_rh]``).
    fill : float

    Returns
    -------
    dict
        ``{"lh": float32 (n_lh,), "rh": float32 (n_rh,)}``.
    """
    vertex = np.asarray(geometry["vertex"], dtype=np.int64)
    hemi = _hemi_codes(geometry["hemi"])
    if hemi.shape != vertex.shape or vertex.ndim != 1:
        raise DataFormatError(f"geometry 'hemi' and 'vertex' must be 1-D of equal length; got {hemi.shape}, {vertex.shape}")
    sizes = hemisphere_sizes(geometry)
    v = _check_values(values, vertex.shape[0])
    out = {}
    for code, name in enumerate(_HEMIS):
        sel = hemi == code
        n = sizes[code]
        if sel.any() and (vertex[sel].min() < 0 or vertex[sel].max() >= n):
            raise DataFormatError(f"geometry 'vertex' of {name} must lie in [0, {n}); got max {vertex[sel].max()}")
        arr = np.full(n, fill, dtype=np.float32)
        arr[vertex[sel]] = v[sel]
        out[name] = arr
    return out


def write_map(values, geometry: Mapping, out_dir: str | Path, name: str, fill: float = 0.0, *,
              dtype=np.float32, description: str | None = None) -> list[Path]:
    """Write one per-voxel map in the subject's space.

    Parameters
    ----------
    values : array of shape (n_voxels,)
        NaN values are written as ``fill``.
    geometry : dict
        ``PreparedDataset.geometry``.
    out_dir : path
    name : str
        File stem: ``<name>.nii.gz`` (volume) or ``lh.<name>.mgh`` + ``rh.<name>.mgh`` (surface).
    fill : float
    dtype : numpy dtype
        Stored data type (e.g. ``np.int16`` for label maps; values are cast).
    description : str, optional
        NIfTI ``descrip`` field (at most 79 ASCII characters).

    Returns
    -------
    list of Path
    """
    import nibabel as nib

    out_dir = Path(out_dir)
    v = np.asarray(values, dtype=np.float32)
    v = np.where(np.isfinite(v), v, np.float32(fill))
    if is_volume(geometry):
        vol = values_to_volume(v, geometry, fill).astype(dtype)
        affine = np.asarray(geometry.get("affine", np.eye(4)), dtype=np.float64)
        img = nib.Nifti1Image(vol, affine)
        img.set_data_dtype(dtype)
        img.header.set_xyzt_units("mm")
        if description:
            img.header["descrip"] = description.encode("ascii")[:79]
        path = out_dir / f"{name}.nii.gz"
        with atomic_path(path) as tmp:
            nib.save(img, tmp)
        return [path]
    paths = []
    for hemi, arr in values_to_surface(v, geometry, fill).items():
        path = out_dir / f"{hemi}.{name}.mgh"
        img = nib.MGHImage(arr.astype(dtype).reshape(-1, 1, 1), np.eye(4))
        with atomic_path(path) as tmp:
            nib.save(img, tmp)
        paths.append(path)
    return paths
