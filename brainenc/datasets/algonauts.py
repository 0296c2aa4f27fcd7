"""Reader of the Algonauts 2023 challenge layout (nsd_format.md §4) into a :class:`~brainenc.datasets.prepare.PreparedDataset`.

Layout under ``root``::

    subjXX/training_split/training_fmri/{lh,rh}_training_fmri.npy   float32 (N_train, V_hemi)
    subjXX/training_split/training_images/train-NNNN_nsd-IIIII.png  (0-based 73k id IIIII)
    subjXX/test_split/test_images/test-NNNN_nsd-IIIII.png
    subjXX/test_split/test_fmri/{lh,rh}_test_fmri.npy               optional (withheld in the challenge)
    subjXX/test_split/noise_ceiling/{lh,rh}_noise_ceiling.npy       optional, fraction
    subjXX/roi_masks/{lh,rh}.all-vertices_fsaverage_space.npy       int (163842,)
    subjXX/roi_masks/{lh,rh}.FAM_challenge_space.npy                int (V_hemi,)

**ROI names.** The release's ``mapping_FAM.npy`` files are pickled dicts; brainenc never unpickles
(``allow_pickle=False`` everywhere), so names come from ``brainenc.datasets.layout.LABEL_TABLES``,
which follow the same ctab tables the challenge's mappings were built from.

Rows are ordered as in the files (ascending 73k id); columns are lh vertices then rh vertices of the
``all-vertices`` mask (tested with ``!= 0``: it may hold 2 where nsdgeneral and RSC overlap).
``n_repeats`` is 0 ("unknown": the layout does not record how many trials were averaged); ``ncsnr``
is NaN (only the ceiling is shipped).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from brainenc._utils.io import load_npy
from brainenc._utils.validation import check_subject
from brainenc.datasets import layout
from brainenc.exceptions import DataFormatError

__all__ = ["load_algonauts", "ALGONAUTS_FAMILIES"]

ALGONAUTS_FAMILIES = ("prf-visualrois", "floc-bodies", "floc-faces", "floc-places", "floc-words", "streams")
_PNG = re.compile(r"^(train|test)-(\d{4})_nsd-(\d{5})\.png$")


def _image_ids(folder: Path, prefix: str) -> np.ndarray:
    if not folder.is_dir():
        raise DataFormatError(f"{folder}: image folder not found")
    ids, counters = [], []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() != ".png":
            continue
        m = _PNG.match(p.name)
        if not m or m.group(1) != prefix:
            raise DataFormatError(f"{p}: file name must look like '{prefix}-0001_nsd-00013.png'")
        counters.append(int(m.group(2)))
        ids.append(int(m.group(3)))
    ids_arr = np.asarray(ids, dtype=np.int64)
    if counters != list(range(1, len(counters) + 1)):
        raise DataFormatError(f"{folder}: image counters must run 1..{len(counters)} in file-name order")
    if ids_arr.size and (ids_arr.min() < 0 or ids_arr.max() >= layout.N_IMAGES_73K):
        raise DataFormatError(f"{folder}: 73k ids must lie in [0, 72999]; found [{ids_arr.min()}, {ids_arr.max()}]")
    return ids_arr


def _fmri(path: Path, n_rows: int, n_cols: int) -> np.ndarray:
    arr = load_npy(path)
    if arr.ndim != 2 or arr.shape != (n_rows, n_cols):
        raise DataFormatError(f"{path}: expected shape ({n_rows}, {n_cols}) (images x vertices); found {arr.shape}")
    if arr.dtype.kind != "f":
        raise DataFormatError(f"{path}: expected float32 fMRI; found {arr.dtype}")
    if not np.isfinite(arr).all():
        raise DataFormatError(f"{path}: contains {int((~np.isfinite(arr)).sum())} NaN/inf values")
    return arr.astype(np.float32, copy=False)


def load_algonauts(root: str | Path, subject: str = "subj01"):
    """Read one subject of the Algonauts 2023 layout.

    Parameters
    ----------
    root : str or Path
        Folder holding ``subj01/`` ... (the challenge data root).
    subject : str

    Returns
    -------
    PreparedDataset
        In memory (``path=None``). ``responses`` float32 (n_train [+ n_test], V_lh + V_rh); splits
        "train" and "test" (test empty when the test fMRI is absent; the test image ids are then in
        ``manifest["test_image_ids"]``); ``roi_labels`` per family found; ``noise_ceiling`` from the file
        (fraction) or NaN; ``geometry`` fsaverage with ``hemi`` and ``vertex``.
    """
    from brainenc.datasets.prepare import PreparedDataset

    subject = check_subject(subject)
    base = Path(root) / subject
    if not base.is_dir():
        raise DataFormatError(f"{base}: Algonauts subject folder not found")
    rd = base / "roi_masks"
    verts, n_fs = [], []
    for h in layout.HEMIS:
        allv = load_npy(rd / f"{h}.all-vertices_fsaverage_space.npy")
        if allv.ndim != 1 or allv.dtype.kind not in "iuf":
            raise DataFormatError(f"{rd / f'{h}.all-vertices_fsaverage_space.npy'}: expected a 1-D int mask; "
                                  f"found {allv.dtype} {allv.shape}")
        verts.append(np.nonzero(allv != 0)[0].astype(np.int64))
        n_fs.append(int(allv.shape[0]))
    v_lh, v_rh = verts[0].size, verts[1].size
    train_ids = _image_ids(base / "training_split" / "training_images", "train")
    test_ids = _image_ids(base / "test_split" / "test_images", "test")
    fm = base / "training_split" / "training_fmri"
    train = np.concatenate([_fmri(fm / f"lh_training_fmri.npy", train_ids.size, v_lh),
                            _fmri(fm / f"rh_training_fmri.npy", train_ids.size, v_rh)], axis=1)
    tf = base / "test_split" / "test_fmri"
    sources = [str(p) for p in sorted(base.rglob("*.npy"))]
    if all((tf / f"{h}_test_fmri.npy").is_file() for h in layout.HEMIS):
        test = np.concatenate([_fmri(tf / "lh_test_fmri.npy", test_ids.size, v_lh),
                               _fmri(tf / "rh_test_fmri.npy", test_ids.size, v_rh)], axis=1)
        responses = np.concatenate([train, test], axis=0)
        image_ids = np.concatenate([train_ids, test_ids])
        splits = {"train": np.arange(train_ids.size), "test": np.arange(train_ids.size, image_ids.size)}
    else:
        responses, image_ids = train, train_ids
        splits = {"train": np.arange(train_ids.size), "test": np.arange(0)}
    roi_labels, roi_names = {}, {}
    for fam in ALGONAUTS_FAMILIES:
        files = [rd / f"{h}.{fam}_challenge_space.npy" for h in layout.HEMIS]
        if not all(f.is_file() for f in files):
            continue
        parts = []
        for f, n in zip(files, (v_lh, v_rh)):
            lab = load_npy(f)
            if lab.shape != (n,):
                raise DataFormatError(f"{f}: expected shape ({n},) (challenge-space vertices); found {lab.shape}")
            parts.append(np.rint(lab).astype(np.int64))
        lab = np.concatenate(parts)
        table = layout.LABEL_TABLES[fam]
        unknown = sorted(set(np.unique(lab[lab > 0]).tolist()) - set(table))
        if unknown or (lab < 0).any():
            raise DataFormatError(f"{files[0]}: labels {unknown or 'below 0'} are not in the {fam} label table {sorted(table)}")
        roi_labels[fam] = lab.astype(np.int32)
        roi_names[fam] = dict(table)
    ncd = base / "test_split" / "noise_ceiling"
    nc = None
    if all((ncd / f"{h}_noise_ceiling.npy").is_file() for h in layout.HEMIS):
        nc = np.concatenate([load_npy(ncd / f"{h}_noise_ceiling.npy") for h in layout.HEMIS]).astype(np.float32)
        if nc.shape != (v_lh + v_rh,):
            raise DataFormatError(f"{ncd}: noise ceilings must have {v_lh + v_rh} values (lh + rh); found {nc.shape}")
    geometry = {"space": "fsaverage", "n_vertices": n_fs,
                "hemi": np.array(["lh"] * v_lh + ["rh"] * v_rh), "vertex": np.concatenate(verts)}
    manifest = {"source": "algonauts2023", "root": str(Path(root).resolve()), "sources": sources,
                "choices": {"subject": subject, "space": "fsaverage", "beta_version": "betas_fithrf_GLMdenoise_RR",
                            "mask": "nsdgeneral+RSC (all-vertices)", "split": "algonauts", "repeats": "average",
                            "zscore": True, "zscore_exclude_test": False},
                "test_image_ids": test_ids.tolist(),
                "roi_names_source": "brainenc.datasets.layout.LABEL_TABLES (mapping_*.npy are pickles; not read)"}
    return PreparedDataset(subject=subject, responses=responses, image_ids=image_ids,
                           n_repeats=np.zeros(image_ids.size, dtype=np.int64), splits=splits, roi_labels=roi_labels,
                           roi_names=roi_names, noise_ceiling=nc, geometry=geometry, manifest=manifest)
