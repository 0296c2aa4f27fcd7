"""Reader of the MindEye2 Hugging Face layout (nsd_format.md §5) into a :class:`~brainenc.datasets.prepare.PreparedDataset`.

Files under ``root``:

- ``betas_all_subjXX_fp32_renorm.hdf5``: dataset ``betas`` float32 (n_sessions·750, n_voxels); row = 0-based
  global trial; columns = nsdgeneral voxels in NIfTI C-order (= brainenc's canonical order);
- ``COCO_73k_subj_indices.hdf5``: dataset ``subjXX``; element t = 0-based 73k id of global trial t;
- ``shared1000.npy``: bool (73000,), True for the shared1000 images.

The betas are used as stored (their normalisation is MindEye2's; recorded in the manifest). When an NSD
root is given, the voxel geometry is taken from its nsdgeneral ROI (checked against the column count)
and ``stimuli_path`` points at its ``nsd_stimuli.hdf5``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from brainenc._utils.io import load_npy
from brainenc._utils.validation import check_option, check_subject
from brainenc.datasets import layout
from brainenc.exceptions import DataFormatError

__all__ = ["load_mindeye2"]


def load_mindeye2(root: str | Path, subject: str = "subj01", repeats: str = "single", split: str = "shared1000",
                  nsd_root: str | Path | None = None, chunk_rows: int = 4096):
    """Read one subject of the MindEye2 layout.

    Parameters
    ----------
    root : str or Path
        Folder with the HF files.
    subject : str
    repeats : {"single", "average"}
        One row per trial (MindEye2 training) or per image (mean over its trials).
    split : {"shared1000", "nsd37"}
        Test = shared1000 images (all trials; "nsd37": only trials of sessions 1..37, the old test set).
    nsd_root : str or Path, optional
        NSD root providing the nsdgeneral voxel indices and the stimuli file.
    chunk_rows : int
        Rows read per HDF5 call (memory knob).

    Returns
    -------
    PreparedDataset
        In memory; ``responses`` float32 (n_rows, n_voxels); ``global_trials`` for single trials;
        ``ncsnr``/``noise_ceiling`` NaN (not shipped in this layout).
    """
    import h5py

    from brainenc.datasets.prepare import PreparedDataset

    subject = check_subject(subject)
    check_option("repeats", repeats, ("single", "average"))
    check_option("split", split, ("shared1000", "nsd37"))
    root = Path(root)
    bpath = root / f"betas_all_{subject}_fp32_renorm.hdf5"
    ipath = root / "COCO_73k_subj_indices.hdf5"
    spath = root / "shared1000.npy"
    for p in (bpath, ipath, spath):
        if not p.is_file():
            raise DataFormatError(f"{p}: MindEye2 file not found")
    shared = load_npy(spath)
    if shared.shape != (layout.N_IMAGES_73K,) or shared.dtype != bool:
        raise DataFormatError(f"{spath}: expected bool ({layout.N_IMAGES_73K},); found {shared.dtype} {shared.shape}")
    try:
        with h5py.File(ipath, "r") as f:
            if subject not in f:
                raise DataFormatError(f"{ipath}: dataset '{subject}' not found; found {sorted(f.keys())}")
            ids_all = np.asarray(f[subject][:])
    except DataFormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - h5py raises OSError, KeyError, TypeError, ... on bad files
        raise DataFormatError(f"{ipath}: not a readable HDF5 file ({type(exc).__name__}: {exc})") from None
    if ids_all.ndim != 1:
        raise DataFormatError(f"{ipath}: '{subject}' must be 1-D (one 73k id per trial); found shape {ids_all.shape}")
    try:
        with h5py.File(bpath, "r") as f:
            if "betas" not in f:
                raise DataFormatError(f"{bpath}: dataset 'betas' not found; found {sorted(f.keys())}")
            ds = f["betas"]
            if not isinstance(ds, h5py.Dataset) or ds.ndim != 2 or ds.dtype != np.float32:
                raise DataFormatError(f"{bpath}: 'betas' must be float32 (n_trials, n_voxels); found {ds.dtype} {ds.shape}")
            n_t, n_vox = ds.shape
            if n_t % layout.TRIALS_PER_SESSION or ids_all.shape[0] < n_t:
                raise DataFormatError(f"{bpath}: {n_t} trials must be a multiple of 750 and covered by {ipath} "
                                      f"'{subject}' ({ids_all.shape[0]} ids)")
            ids = ids_all[:n_t]
            if ids.dtype.kind not in "iuf" or (ids.dtype.kind == "f" and (ids != np.rint(ids)).any()):
                raise DataFormatError(f"{ipath}: '{subject}' must hold integer 73k ids; found {ids.dtype}")
            ids = ids.astype(np.int64)
            if ids.min() < 0 or ids.max() >= layout.N_IMAGES_73K:
                raise DataFormatError(f"{ipath}: 73k ids must lie in [0, 72999] (0-based); found [{ids.min()}, {ids.max()}]")
            t = np.arange(n_t)
            keep = t < 37 * layout.TRIALS_PER_SESSION if split == "nsd37" else np.ones(n_t, dtype=bool)
            is_test = shared[ids]
            if repeats == "single":
                rows = np.nonzero(keep)[0]
                responses = np.empty((rows.size, n_vox), dtype=np.float32)
                for c0 in range(0, rows.size, chunk_rows):
                    r = rows[c0:c0 + chunk_rows]
                    responses[c0:c0 + r.size] = ds[int(r[0]):int(r[-1]) + 1][r - r[0]]
                image_ids, n_rep, global_trials = ids[rows], np.ones(rows.size, np.int64), rows
                test_rows = is_test[rows]
            else:
                uniq, inv, counts = np.unique(ids[keep], return_inverse=True, return_counts=True)
                sums = np.zeros((uniq.size, n_vox), dtype=np.float64)
                trial_rows = np.nonzero(keep)[0]
                for c0 in range(0, trial_rows.size, chunk_rows):
                    r = trial_rows[c0:c0 + chunk_rows]
                    block = ds[int(r[0]):int(r[-1]) + 1][r - r[0]]
                    np.add.at(sums, inv.reshape(-1)[c0:c0 + r.size], block)
                responses = (sums / counts[:, None]).astype(np.float32)
                image_ids, n_rep, global_trials = uniq, counts.astype(np.int64), None
                test_rows = shared[uniq]
    except DataFormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt files: OSError, KeyError, ValueError, ...
        raise DataFormatError(f"{bpath}: not a readable HDF5 file ({type(exc).__name__}: {exc})") from None
    if not np.isfinite(responses).all():
        raise DataFormatError(f"{bpath}: betas contain {int((~np.isfinite(responses)).sum())} NaN/inf values")
    geometry: dict = {"space": "func1pt8mm", "indices": None}
    stimuli = None
    if nsd_root is not None:
        from brainenc.datasets import nsd as nsdio

        lab = nsdio.load_roi_volume(layout.roi_path(nsd_root, subject, "func1pt8mm", "nsdgeneral"))
        idx = np.argwhere(lab > 0).astype(np.int64)
        if idx.shape[0] != n_vox:
            raise DataFormatError(f"{bpath}: {n_vox} voxel columns, but the nsdgeneral ROI of {nsd_root} has {idx.shape[0]}")
        r = layout.VOXEL_SIZE["func1pt8mm"]
        aff = np.diag([r, r, r, 1.0])
        aff[:3, 3] = -((np.asarray(lab.shape) + 1) / 2 - 1) * r
        geometry = {"space": "func1pt8mm", "shape": list(lab.shape), "affine": aff.tolist(), "indices": idx}
        sp = layout.stimuli_path(nsd_root)
        stimuli = sp if sp.is_file() else None
    splits = {"train": np.nonzero(~test_rows)[0], "test": np.nonzero(test_rows)[0]}
    manifest = {"source": "mindeye2", "root": str(root.resolve()), "sources": [str(bpath), str(ipath), str(spath)],
                "choices": {"subject": subject, "space": "func1pt8mm", "beta_version": "betas_fithrf",
                            "mask": "nsdgeneral", "split": split, "repeats": repeats,
                            "zscore": "as shipped (MindEye2 _renorm)", "zscore_exclude_test": "unknown"},
                "n_sessions": n_t // layout.TRIALS_PER_SESSION, "n_trials": int(n_t)}
    return PreparedDataset(subject=subject, responses=responses, image_ids=image_ids, n_repeats=n_rep, splits=splits,
                           geometry=geometry, manifest=manifest, stimuli_path=stimuli, global_trials=global_trials)
