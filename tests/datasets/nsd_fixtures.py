"""Fixture *writer* for the NSD release layout, written from ``shared/reference/nsd_format.md`` alone.

Independent of brainenc's readers and simulator on purpose: it uses scipy.io / nibabel / h5py directly
and its own copy of the path rules, so a reader bug and a writer bug cannot cancel out. Shapes follow the
spec (§8 checklist): ``masterordering`` (1, 30000) and ``subjectim`` (8, 10000) are full size; betas use a
tiny grid and few vertices; 750 trials per session; ``imgBrick`` is (73000, 425, 425, 3) chunked per
image with only a few images written (unwritten chunks cost no disk).

Every writer returns the ground truth it wrote (1-based design arrays, int16 betas, labels) so tests can
compute expected values directly.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import scipy.io

TPS = 750
GLM = "betas_fithrf_GLMdenoise_RR"
FAMILIES_WRITTEN = ("nsdgeneral", "prf-visualrois", "floc-faces", "streams")
N_LABELS = {"nsdgeneral": 1, "prf-visualrois": 7, "floc-faces": 5, "streams": 7}
CTAB = {  # spec §1.7 label tables, written as .ctab text
    "nsdgeneral": ["nsdgeneral"],
    "prf-visualrois": ["V1v", "V1d", "V2v", "V2d", "V3v", "V3d", "hV4"],
    "floc-faces": ["OFA", "FFA-1", "FFA-2", "mTL-faces", "aTL-faces"],
    "streams": ["early", "midventral", "midlateral", "midparietal", "ventral", "lateral", "parietal"],
}


def _ctab_text(family: str) -> str:
    return "0 Unknown\n" + "".join(f"{k} {n}\n" for k, n in enumerate(CTAB[family], 1))


# ------------------------------------------------------------------------------------------------
# experimental design
# ------------------------------------------------------------------------------------------------
def make_design(seed: int = 0, sessions_per_block: int = 4) -> dict:
    """1-based design arrays with real shapes.

    Each block of ``sessions_per_block`` sessions holds all 3 presentations of its slots, so even a few
    sessions contain images shown 3 times. 73k ids 1 and 73000 (edge values) belong to subject 1.
    """
    rng = np.random.default_rng(seed)
    per_block = sessions_per_block * TPS
    n_blocks = 30000 // per_block
    slots = rng.permutation(np.arange(1, 10001))
    blocks = np.array_split(slots, n_blocks)
    mo = []
    for b in blocks:
        trials = np.repeat(b, 3)
        mo.append(rng.permutation(trials))
    masterordering = np.concatenate(mo)[None, :].astype(np.float64)  # (1, 30000)
    assert masterordering.shape == (1, 30000)
    ids = rng.permutation(np.arange(2, 73000))  # 1..73000 minus the two edge ids
    sharedix = np.sort(ids[:1000])
    rest = ids[1000:]
    subjectim = np.zeros((8, 10000), dtype=np.float64)
    subjectim[:, :1000] = sharedix
    for s in range(8):
        subjectim[s, 1000:] = rng.choice(rest, 9000, replace=False)  # subjects may overlap, as in NSD
    # edge 73k ids for subject 1, placed at slots seen in the first block
    first_slots = [int(x) for x in blocks[0] if x > 1000][:2]
    subjectim[0, first_slots[0] - 1] = 1
    subjectim[0, first_slots[1] - 1] = 73000
    return {"masterordering": masterordering, "subjectim": subjectim,
            "sharedix": sharedix[None, :].astype(np.float64)}


def write_expdesign(root: Path, design: dict | None = None, **overrides) -> dict:
    design = dict(make_design() if design is None else design)
    design.update(overrides)
    p = Path(root) / "nsddata" / "experiments" / "nsd" / "nsd_expdesign.mat"
    p.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(p, {**design, "stimpattern": np.zeros((40, 12, 75)), "basiccnt": np.zeros((3, 40))})
    return design


def lookup(design: dict, subject: int, t: int) -> int:
    """The spec's canonical lookup written literally: 0-based 73k id of 0-based global trial t."""
    k1 = int(design["masterordering"].flat[t])
    return int(design["subjectim"][subject - 1, k1 - 1]) - 1


# ------------------------------------------------------------------------------------------------
# stimuli
# ------------------------------------------------------------------------------------------------
def image_of(nsd_id: int) -> np.ndarray:
    """Deterministic (425, 425, 3) uint8 image encoding its 0-based id."""
    img = np.zeros((425, 425, 3), dtype=np.uint8)
    img[..., 0] = (nsd_id >> 8) & 255
    img[..., 1] = nsd_id & 255
    img[..., 2] = np.arange(425, dtype=np.uint8)[None, :]
    return img


def write_stimuli(root: Path, ids, n_images: int = 73000) -> Path:
    p = Path(root) / "nsddata_stimuli" / "stimuli" / "nsd" / "nsd_stimuli.hdf5"
    p.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(p, "w") as f:
        ds = f.create_dataset("imgBrick", shape=(n_images, 425, 425, 3), dtype=np.uint8, chunks=(1, 425, 425, 3))
        for i in sorted(set(int(x) for x in ids)):
            ds[i] = image_of(i)
    return p


# ------------------------------------------------------------------------------------------------
# subject data
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SubjectFixture:
    root: Path
    subject: str
    n_sessions: int
    design: dict
    grid: tuple
    betas: dict  # session -> int16 (X, Y, Z, 750)
    fs_betas: dict  # session -> {"lh": float32 (V, 750), "rh": ...}
    labels: dict  # family -> int (X, Y, Z) with -1/0/k
    fs_labels: dict  # family -> {"lh": (V,), "rh": (V,)}
    brainmask: np.ndarray
    ncsnr: np.ndarray
    fs_ncsnr: dict
    n_vertices: tuple


def _affine(grid, r=1.8):
    aff = np.diag([r, r, r, 1.0])
    aff[:3, 3] = -((np.asarray(grid) + 1) / 2 - 1) * r
    return aff


def _save_nifti(path: Path, data: np.ndarray, grid, zooms):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, _affine(grid))
    img.header.set_zooms(zooms)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))


def _save_mgh(path: Path, data: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.MGHImage(np.asarray(data, dtype=np.float32), np.eye(4)), str(path))


def write_subject(root: Path, subject: str = "subj01", n_sessions: int = 4, grid=(7, 6, 5),
                  n_vertices=(30, 26), seed: int = 1, design: dict | None = None,
                  formats=("nifti", "hdf5"), fsaverage: bool = True, simulated_manifest: bool = True,
                  write_ncsnr: bool = True) -> SubjectFixture:
    """Write one subject: expdesign, stimuli (a few images), volume betas (NIfTI and/or HDF5), ROIs,
    brainmask, ncsnr, fsaverage betas/labels/ncsnr/ctabs, and ``brainenc_simulated.json``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    design = write_expdesign(root, design)
    s_idx = int(subject[4:])
    n_t = n_sessions * TPS
    slots = design["masterordering"][0, :n_t].astype(int)
    ids = design["subjectim"][s_idx - 1, slots - 1].astype(int) - 1
    write_stimuli(root, list(ids[:3]) + [0, 72999])
    if simulated_manifest:
        (root / "brainenc_simulated.json").write_text(json.dumps({"subjects": {subject: {"n_sessions": n_sessions, "complete": True}}}))

    X, Y, Z = grid
    ii, jj, kk = np.meshgrid(np.arange(X), np.arange(Y), np.arange(Z), indexing="ij")
    r2 = ((ii - (X - 1) / 2) / (X / 2)) ** 2 + ((jj - (Y - 1) / 2) / (Y / 2)) ** 2 + ((kk - (Z - 1) / 2) / (Z / 2)) ** 2
    brainmask = r2 < 1.0
    cortex = brainmask & (r2 > 0.15)
    labels = {}
    nsdg = np.where(cortex, 0, -1)
    nsdg[cortex & (jj < Y // 2 + 1)] = 1
    labels["nsdgeneral"] = nsdg
    for fam in FAMILIES_WRITTEN[1:]:
        lab = np.where(cortex, 0, -1)
        pick = cortex & (rng.random(grid) < 0.5)
        lab[pick] = rng.integers(1, N_LABELS[fam] + 1, size=int(pick.sum()))
        labels[fam] = lab

    # responses: image signal x voxel gain + session offsets + trial noise (PSC)
    n_vox = X * Y * Z
    uniq = np.unique(ids)
    sig = rng.standard_normal((uniq.size, n_vox)) * rng.uniform(0.3, 2.0, n_vox)
    sig_rows = np.searchsorted(uniq, ids)
    betas = {}
    bdir = root / "nsddata_betas" / "ppdata" / subject / "func1pt8mm" / GLM
    for s in range(1, n_sessions + 1):
        rows = slice((s - 1) * TPS, s * TPS)
        psc = sig[sig_rows[rows]] + rng.standard_normal((TPS, n_vox)) * 1.5 + rng.normal(0, 2, n_vox) + s
        vol = np.round(psc * 300).clip(-32768, 32767).astype(np.int16).T.reshape(X, Y, Z, TPS)
        vol[~brainmask] = 0
        betas[s] = vol
        if "nifti" in formats:
            _save_nifti(bdir / f"betas_session{s:02d}.nii.gz", vol, grid, (1.8, 1.8, 1.8, 4 / 3))
        if "hdf5" in formats:
            bdir.mkdir(parents=True, exist_ok=True)
            with h5py.File(bdir / f"betas_session{s:02d}.hdf5", "w") as f:
                f.create_dataset("betas", data=vol.transpose(3, 2, 1, 0), chunks=(TPS, 1, 1, 1))
    ncsnr = rng.uniform(0.05, 1.5, grid).astype(np.float32)
    if write_ncsnr:
        _save_nifti(bdir / "ncsnr.nii.gz", ncsnr, grid, (1.8, 1.8, 1.8))
    pp = root / "nsddata" / "ppdata" / subject / "func1pt8mm"
    _save_nifti(pp / "brainmask.nii.gz", brainmask.astype(np.int16), grid, (1.8, 1.8, 1.8))
    for fam, lab in labels.items():
        _save_nifti(pp / "roi" / f"{fam}.nii.gz", lab.astype(np.int16), grid, (1.8, 1.8, 1.8))
    (root / "nsddata" / "freesurfer" / subject / "label").mkdir(parents=True, exist_ok=True)
    (root / "nsddata" / "freesurfer" / subject / "label" / "prf-visualrois.mgz.ctab").write_text(_ctab_text("prf-visualrois"))

    fs_betas, fs_labels, fs_ncsnr = {}, {}, {}
    if fsaverage:
        fdir = root / "nsddata_betas" / "ppdata" / subject / "fsaverage" / GLM
        ldir = root / "nsddata" / "freesurfer" / "fsaverage" / "label"
        ldir.mkdir(parents=True, exist_ok=True)
        for fam in ("nsdgeneral", "streams"):
            (ldir / f"{fam}.mgz.ctab").write_text(_ctab_text(fam))
            fs_labels[fam] = {}
        for h, V in zip(("lh", "rh"), n_vertices):
            vsig = rng.standard_normal((uniq.size, V))
            lab_g = (rng.random(V) < 0.6).astype(np.float32)
            lab_s = rng.integers(0, 8, V).astype(np.float32)
            fs_labels["nsdgeneral"][h] = lab_g.astype(int)
            fs_labels["streams"][h] = lab_s.astype(int)
            _save_mgh(ldir / f"{h}.nsdgeneral.mgz", lab_g[:, None, None])
            _save_mgh(ldir / f"{h}.streams.mgz", lab_s[:, None, None])
            fs_ncsnr[h] = rng.uniform(0.1, 1.0, V).astype(np.float32)
            _save_mgh(fdir / f"{h}.ncsnr.mgh", fs_ncsnr[h][:, None, None])
            for s in range(1, n_sessions + 1):
                rows = slice((s - 1) * TPS, s * TPS)
                data = (vsig[sig_rows[rows]] + rng.standard_normal((TPS, V)) + s).astype(np.float32).T  # (V, 750)
                fs_betas.setdefault(s, {})[h] = data
                _save_mgh(fdir / f"{h}.betas_session{s:02d}.mgh", data[:, None, None, :])
    return SubjectFixture(root=root, subject=subject, n_sessions=n_sessions, design=design, grid=tuple(grid),
                          betas=betas, fs_betas=fs_betas, labels=labels, fs_labels=fs_labels, brainmask=brainmask,
                          ncsnr=ncsnr, fs_ncsnr=fs_ncsnr, n_vertices=tuple(n_vertices))


def betas_path(root: Path, subject: str, session: int, fmt: str = "nifti", space: str = "func1pt8mm",
               hemi: str = "lh") -> Path:
    d = Path(root) / "nsddata_betas" / "ppdata" / subject / space / GLM
    if space == "fsaverage":
        return d / f"{hemi}.betas_session{session:02d}.mgh"
    return d / f"betas_session{session:02d}.{'nii.gz' if fmt == 'nifti' else 'hdf5'}"


# ------------------------------------------------------------------------------------------------
# derived layouts
# ------------------------------------------------------------------------------------------------
def write_algonauts(root: Path, subject: str = "subj01", n_train: int = 12, n_test: int = 4, n_fs: int = 40,
                    seed: int = 2, with_test_fmri: bool = True) -> dict:
    """Algonauts 2023 layout (§4), fsaverage size ``n_fs`` per hemisphere instead of 163842.

    ``mapping_*.npy`` (pickled dicts in the real release) are deliberately not written: brainenc never
    unpickles, and its reader takes names from the spec's label tables.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = Path(root) / subject
    ids = rng.choice(73000, n_train + n_test, replace=False)
    train_ids, test_ids = np.sort(ids[:n_train]), np.sort(ids[n_train:])
    out = {"train_ids": train_ids, "test_ids": test_ids}
    tiny = Image.fromarray(np.zeros((4, 4, 3), np.uint8))
    for split, folder, prefix, lst in (("training_split", "training_images", "train", train_ids),
                                       ("test_split", "test_images", "test", test_ids)):
        d = base / split / folder
        d.mkdir(parents=True, exist_ok=True)
        for i, nid in enumerate(lst, 1):
            tiny.save(d / f"{prefix}-{i:04d}_nsd-{nid:05d}.png")
    rd = base / "roi_masks"
    rd.mkdir(parents=True, exist_ok=True)
    for h in ("lh", "rh"):
        allv = (rng.random(n_fs) < 0.5).astype(np.int64)
        allv[0] = 2  # nsdgeneral + RSC overlap: readers must test != 0
        np.save(rd / f"{h}.all-vertices_fsaverage_space.npy", allv)
        v = int((allv != 0).sum())
        out[f"{h}_vertices"] = np.nonzero(allv)[0]
        for fam, nl in (("prf-visualrois", 7), ("streams", 7)):
            fs = rng.integers(0, nl + 1, n_fs).astype(np.int64)
            np.save(rd / f"{h}.{fam}_fsaverage_space.npy", fs)
            np.save(rd / f"{h}.{fam}_challenge_space.npy", fs[allv != 0])
            out[f"{h}_{fam}"] = fs[allv != 0]
        tr = rng.standard_normal((n_train, v)).astype(np.float32)
        (base / "training_split" / "training_fmri").mkdir(parents=True, exist_ok=True)
        np.save(base / "training_split" / "training_fmri" / f"{h}_training_fmri.npy", tr)
        out[f"{h}_train"] = tr
        te = rng.standard_normal((n_test, v)).astype(np.float32)
        if with_test_fmri:
            (base / "test_split" / "test_fmri").mkdir(parents=True, exist_ok=True)
            np.save(base / "test_split" / "test_fmri" / f"{h}_test_fmri.npy", te)
        out[f"{h}_test"] = te
        nc = rng.uniform(0, 1, v)
        (base / "test_split" / "noise_ceiling").mkdir(parents=True, exist_ok=True)
        np.save(base / "test_split" / "noise_ceiling" / f"{h}_noise_ceiling.npy", nc)
        out[f"{h}_nc"] = nc
    return out


def write_mindeye2(root: Path, subject: str = "subj01", n_sessions: int = 2, n_vox: int = 20, seed: int = 3,
                   design: dict | None = None) -> dict:
    """MindEye2 HF layout (§5): betas (T, V) float32, COCO_73k_subj_indices, shared1000.npy."""
    rng = np.random.default_rng(seed)
    design = make_design() if design is None else design
    s = int(subject[4:])
    T = n_sessions * TPS
    ids = np.array([lookup(design, s, t) for t in range(T)], dtype=np.int64)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    betas = rng.standard_normal((T, n_vox)).astype(np.float32)
    with h5py.File(root / f"betas_all_{subject}_fp32_renorm.hdf5", "w") as f:
        f.create_dataset("betas", data=betas)
    with h5py.File(root / "COCO_73k_subj_indices.hdf5", "w") as f:
        full = np.array([lookup(design, s, t) for t in range(30000)], dtype=np.int64)
        f.create_dataset(subject, data=full)
    shared = np.zeros(73000, dtype=bool)
    shared[design["sharedix"][0].astype(int) - 1] = True
    np.save(root / "shared1000.npy", shared)
    return {"betas": betas, "ids": ids, "shared": shared, "design": design}
