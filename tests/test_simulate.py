"""The simulated NSD subject: on-disk formats read back with nibabel/h5py/scipy directly
(nsd_format.md §1.1, §1.3-§1.5, §1.7, §1.8, §8), determinism, ground-truth consistency."""
from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import scipy.io
from scipy import ndimage

from brainenc.config import from_dict
from brainenc.datasets import layout
from brainenc.datasets.simulate import (
    SimulationConfig,
    SimulationExistsError,
    simulate_subject,
)
from brainenc.exceptions import ConfigError

SMALL = {"n_sessions": 1, "n_shared": 25, "grid": (20, 24, 20), "write_hdf5_betas": True}
BDIR = ("nsddata_betas", "ppdata", "subj01", "func1pt8mm", "betas_fithrf_GLMdenoise_RR")


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    root = tmp_path_factory.mktemp("nsd_sim")
    cfg = SimulationConfig(**SMALL)
    res = simulate_subject(root, cfg)
    return root, cfg, res


def _tree_hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _ncsnr_reference(sessions, slots):
    """Direct §1.8 computation: per-session z-score (ddof 1), images with exactly 3 trials."""
    z = np.concatenate([(b - b.mean(1, keepdims=True)) / b.std(1, ddof=1, keepdims=True) for b in sessions], 1)
    uniq, cnt = np.unique(slots, return_counts=True)
    var = np.stack([z[:, slots == k].var(axis=1, ddof=1) for k in uniq[cnt == 3]], axis=1)
    v = np.sqrt(np.nanmean(var, axis=1))
    return np.sqrt(np.clip(1 - v ** 2, 0, None)) / v


def test_expdesign_format(sim):
    root, cfg, _ = sim
    m = scipy.io.loadmat(layout.expdesign_path(root))
    assert {"masterordering", "subjectim", "sharedix", "stimpattern", "basiccnt"} <= set(m)
    mo = m["masterordering"]
    sim_ = m["subjectim"]
    shared = m["sharedix"]
    assert mo.shape == (1, 30000) and sim_.shape == (8, 10000) and shared.shape == (1, 1000)
    assert m["stimpattern"].shape == (40, 12, 75)
    mo = mo.astype(np.int64).ravel()
    sim_ = sim_.astype(np.int64)
    shared = shared.astype(np.int64).ravel()
    assert mo.min() == 1 and mo.max() == 10000
    assert np.all(np.bincount(mo, minlength=10001)[1:] == 3)
    assert sim_.min() >= 1 and sim_.max() <= 73000
    assert np.unique(sim_[:, 1000:]).size == 8 * 9000 and np.unique(sim_).size == 73000
    assert np.all(np.diff(shared) > 0)
    assert np.all(sim_[:, :1000] == shared[None, :])
    runs = m["stimpattern"].sum(axis=2)
    assert np.all(runs[:, 0::2] == 63) and np.all(runs[:, 1::2] == 62)
    # the completed sessions show exactly the simulated set, each slot 3 times
    n_unique = cfg.n_images - cfg.n_shared
    first = mo[:cfg.n_trials]
    slots, counts = np.unique(first, return_counts=True)
    expected = np.r_[1:cfg.n_shared + 1, 1001:1001 + n_unique]
    assert np.array_equal(slots, expected) and np.all(counts == 3)


def test_stimuli_hdf5(sim):
    root, cfg, _ = sim
    p = layout.stimuli_path(root)
    with h5py.File(root / f"brainenc_ground_truth_{cfg.subject}.h5", "r") as gt:
        ids = gt["images/nsd_id"][:]
    with h5py.File(p, "r") as f:
        assert list(f) == ["imgBrick"]
        d = f["imgBrick"]
        assert d.shape == (73000, 425, 425, 3) and d.dtype == np.uint8
        assert d.chunks == (1, 425, 425, 3) and d.compression == "gzip"
        assert d.id.get_num_chunks() == ids.size  # only the shown images are stored
        imgs = np.stack([d[i] for i in ids[:5]])
        assert np.all(imgs.reshape(5, -1).std(axis=1) > 5)
        absent = np.setdiff1d(np.arange(73000), ids)[0]
        assert not d[absent].any()
    assert p.stat().st_size < ids.size * 425 * 425 * 3  # compressed


def test_betas_nifti_and_hdf5(sim):
    root, cfg, _ = sim
    bm = nib.load(layout.brainmask_path(root, "subj01", "func1pt8mm"))
    mask = np.asarray(bm.dataobj) > 0
    p = root.joinpath(*BDIR, "betas_session01.nii.gz")
    with open(p, "rb") as fh:
        head = fh.read(10)
    assert head[:2] == b"\x1f\x8b" and head[4:8] == b"\0\0\0\0"  # gzip mtime 0: reproducible
    img = nib.load(p)
    assert img.shape == cfg.grid + (750,)
    assert img.get_data_dtype() == np.int16
    np.testing.assert_allclose(img.header.get_zooms(), (1.8, 1.8, 1.8, 4 / 3), rtol=1e-6)
    aff = np.diag([1.8, 1.8, 1.8, 1.0])
    aff[:3, 3] = -((np.asarray(cfg.grid) + 1) / 2 - 1) * 1.8
    np.testing.assert_allclose(img.affine, aff, atol=1e-5)
    data = np.asarray(img.dataobj)
    assert data.dtype == np.int16
    assert not data[~mask].any()
    assert (data[mask] != 0).mean() > 0.99
    psc = data[mask].astype(np.float64) / 300
    assert 0.2 < np.median(psc.std(axis=1)) < 20  # plausible PSC scale
    with h5py.File(root.joinpath(*BDIR, "betas_session01.hdf5"), "r") as f:
        h = f["betas"]
        assert h.dtype == np.int16 and h.shape == (750,) + cfg.grid[::-1]
        arr = h[:]
    i, j, k, t = 7, 5, 9, 123
    assert arr[t, k, j, i] == data[i, j, k, t]
    assert np.array_equal(arr, data.transpose(3, 2, 1, 0))


def test_rois_and_ctab(sim):
    root, cfg, _ = sim
    bm = np.asarray(nib.load(layout.brainmask_path(root, "subj01", "func1pt8mm")).dataobj) > 0
    outside = None
    for fam in ("nsdgeneral", "prf-visualrois", "prf-eccrois", "floc-faces", "floc-places",
                "floc-bodies", "floc-words", "streams"):
        img = nib.load(layout.roi_path(root, "subj01", "func1pt8mm", fam))
        assert img.shape == cfg.grid
        v = np.rint(np.asarray(img.dataobj)).astype(int)
        assert set(np.unique(v)) <= {-1, 0} | set(layout.LABEL_TABLES[fam])
        outside = (v == -1) if outside is None else outside
        assert np.array_equal(v == -1, outside)  # the same cortex in every family
        assert not (v >= 0)[~bm].any()
        lh = np.rint(np.asarray(nib.load(layout.roi_path(root, "subj01", "func1pt8mm", fam, hemi="lh")).dataobj))
        rh = np.rint(np.asarray(nib.load(layout.roi_path(root, "subj01", "func1pt8mm", fam, hemi="rh")).dataobj))
        assert np.array_equal(np.maximum(lh, rh), v)
        ctab = layout.ctab_path(root, "subj01", fam, space="func1pt8mm").read_text().splitlines()
        assert ctab[0] == "0 Unknown"
        assert ctab[1:] == [f"{k} {n}" for k, n in layout.LABEL_TABLES[fam].items()]
    ng = np.rint(np.asarray(nib.load(layout.roi_path(root, "subj01", "func1pt8mm", "nsdgeneral")).dataobj))
    assert 300 < (ng == 1).sum() < 3000
    # category ROIs are one contiguous blob per hemisphere inside nsdgeneral; early visual
    # ROIs are bands around the pole, mostly one piece on this coarse grid
    half = cfg.grid[0] // 2
    for fam, labs in (("prf-visualrois", (1, 2, 3, 4, 5, 6, 7)), ("floc-faces", (1, 2)),
                      ("floc-places", (1, 2)), ("floc-bodies", (1,)), ("floc-words", (2,))):
        v = np.rint(np.asarray(nib.load(layout.roi_path(root, "subj01", "func1pt8mm", fam)).dataobj))
        for k in labs:
            assert np.all(ng[v == k] == 1)
            for sl in (slice(0, half), slice(half, None)):
                m = (v == k)[sl]
                assert m.sum() >= 3, (fam, k)
                lab, n_comp = ndimage.label(m, structure=np.ones((3, 3, 3)))
                largest = np.bincount(lab.ravel())[1:].max()
                if fam == "prf-visualrois":
                    assert largest >= 0.7 * m.sum(), (fam, k)
                else:
                    assert n_comp == 1, (fam, k, n_comp)


def test_manifest_and_session_count(sim):
    root, cfg, res = sim
    man = json.loads((root / layout.SIMULATION_MANIFEST).read_text())
    assert man["seed"] == cfg.seed and man["config"]["n_sessions"] == cfg.n_sessions
    assert man["subjects"]["subj01"]["complete"] is True
    assert layout.n_sessions(root, "subj01") == cfg.n_sessions
    for rel, sha in man["subjects"]["subj01"]["files"].items():
        assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == sha, rel
    assert res.ground_truth_path.is_file() and res.n_trials == 750 * cfg.n_sessions


def test_trial_table_matches_ground_truth(sim):
    root, cfg, _ = sim
    m = scipy.io.loadmat(layout.expdesign_path(root))
    mo = m["masterordering"].astype(np.int64).ravel()
    subjectim = m["subjectim"].astype(np.int64)
    t = np.arange(cfg.n_trials)
    nsd0 = subjectim[0, mo[t] - 1] - 1  # the canonical lookup of §0
    with h5py.File(root / "brainenc_ground_truth_subj01.h5", "r") as gt:
        assert np.array_equal(gt["trials/nsd_id"][:], nsd0)
        assert np.array_equal(gt["trials/session"][:], t // 750 + 1)
        rows = gt["trials/image_row"][:]
        assert np.array_equal(gt["images/nsd_id"][:][rows], nsd0)
        rep = gt["trials/repeat"][:]
        shared = gt["images/is_shared"][:]
        ids = gt["images/nsd_id"][:]
    for r in range(3):  # repeat r = r-th chronological occurrence
        first = {}
        for tt, (i, rr) in enumerate(zip(nsd0, rep)):
            if rr == r:
                first.setdefault(i, tt)
        assert len(first) == cfg.n_images
    assert shared.sum() == cfg.n_shared
    assert np.array_equal(np.sort(ids[shared]), np.sort(m["sharedix"].ravel().astype(int) - 1)[:cfg.n_shared])
    # nsd_stim_info_merged.csv (§1.3, §8.9): subject1_repR - 1 is the trial showing nsdId
    import pandas as pd

    csv = pd.read_csv(layout.stim_info_path(root), index_col=0)
    assert len(csv) == 73000 and np.array_equal(csv.index, csv["nsdId"])
    assert csv["shared1000"].sum() == 1000
    for r in range(3):
        tr = csv.loc[ids, f"subject1_rep{r}"].to_numpy() - 1
        assert np.all(nsd0[tr[tr < cfg.n_trials]] == ids[tr < cfg.n_trials])
        assert np.all(tr < cfg.n_trials)  # the simulated images are all shown in completed sessions
    assert csv.loc[ids[0], "cropBox"] == "(0, 0, 0, 0)"


def test_ncsnr_matches_direct_recomputation(sim):
    root, cfg, _ = sim
    mask = np.asarray(nib.load(layout.brainmask_path(root, "subj01", "func1pt8mm")).dataobj) > 0
    sessions = []
    for s in range(1, cfg.n_sessions + 1):
        d = np.asarray(nib.load(root.joinpath(*BDIR, f"betas_session{s:02d}.nii.gz")).dataobj)
        sessions.append(d[mask].astype(np.float64) / 300)
    mo = scipy.io.loadmat(layout.expdesign_path(root))["masterordering"].ravel().astype(int)[:cfg.n_trials]
    ref = _ncsnr_reference(sessions, mo)
    got = np.asarray(nib.load(root.joinpath(*BDIR, "ncsnr.nii.gz")).dataobj)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got[mask], ref, rtol=1e-5, atol=1e-6)
    assert not got[~mask].any()
    with h5py.File(root / "brainenc_ground_truth_subj01.h5", "r") as gt:
        ijk = gt["voxels/ijk"][:]
        snr = gt["voxels/snr"][:]
    est = got[tuple(ijk.T)]
    assert np.corrcoef(est, snr)[0, 1] > 0.8  # ncsnr recovers the true per-voxel SNR


def _energy_from_pixels(images):
    """Band-pass energy computed independently from the stored pixels (skimage/scipy pipeline)."""
    from skimage.color import rgb2gray
    from skimage.filters import difference_of_gaussians

    out = []
    for im in images:
        lum = ndimage.zoom(ndimage.gaussian_filter(rgb2gray(im), 1.2), 128 / 425, order=1)
        band = difference_of_gaussians(lum, 1.0, 4.0)
        out.append((band ** 2).reshape(64, 2, 64, 2).mean(axis=(1, 3)))
    return np.stack(out)


def test_early_voxels_follow_contrast_energy_in_their_prf(sim):
    root, cfg, _ = sim
    with h5py.File(root / "brainenc_ground_truth_subj01.h5", "r") as gt:
        ids = gt["images/nsd_id"][:]
        clean = gt["clean_responses"][:]
        model = gt["voxels/model"][:]
        x, y, sig = gt["voxels/prf_x"][:], gt["voxels/prf_y"][:], gt["voxels/prf_sigma"][:]
        vis = gt["voxels/roi/prf-visualrois"][:]
        ijk = gt["voxels/ijk"][:]
    n = 60
    order = np.argsort(ids[:n])
    with h5py.File(layout.stimuli_path(root), "r") as f:
        # one id at a time: h5py fancy indexing over the 73000-long axis is very slow
        imgs = np.stack([f["imgBrick"][i] for i in np.sort(ids[:n])])
    energy = np.empty((n, 64, 64))
    energy[order] = _energy_from_pixels(imgs)
    c = ((np.arange(64) + 0.5) / 64 - 0.5) * 8.4
    early = np.flatnonzero((model == 1) & (vis > 0))
    assert early.size > 50
    r_local, r_global = [], []
    for v in early:
        w = np.exp(-((c[None, :] - x[v]) ** 2 + (-c[:, None] - y[v]) ** 2) / (2 * sig[v] ** 2))
        drive = np.sqrt((energy * w).sum(axis=(1, 2)))
        r_local.append(np.corrcoef(drive, clean[:n, v])[0, 1])
        r_global.append(np.corrcoef(np.sqrt(energy.mean(axis=(1, 2))), clean[:n, v])[0, 1])
    assert np.median(r_local) > 0.9
    assert np.median(r_local) > np.median(r_global) + 0.1  # retinotopic, not global
    # retinotopy: left-hemisphere V1 sees the right visual field, ventral V1 the upper field
    lh = ijk[:, 0] < cfg.grid[0] / 2
    v1 = (vis == 1) | (vis == 2)
    assert (x[v1 & lh] > 0).mean() > 0.9 and (x[v1 & ~lh] < 0).mean() > 0.9
    assert (y[vis == 1] > 0).mean() > 0.9 and (y[vis == 2] < 0).mean() > 0.9


def test_category_voxels_respond_to_category_anywhere(sim):
    root, cfg, _ = sim
    with h5py.File(root / "brainenc_ground_truth_subj01.h5", "r") as gt:
        clean = gt["clean_responses"][:]
        frac = gt["images/category_fraction"][:]
        pl = {k: gt[f"placements/{k}"][:] for k in ("image_row", "category", "x0", "x1", "y0", "y1")}
        rois = {f: gt[f"voxels/roi/{f}"][:] for f in ("floc-faces", "floc-places", "floc-bodies", "floc-words")}
        cats = json.loads(gt.attrs["categories"])
    for fam, lab, cat in (("floc-faces", 2, "faces"), ("floc-places", 2, "places"),
                          ("floc-bodies", 1, "bodies"), ("floc-words", 2, "words")):
        c = cats.index(cat)
        resp = clean[:, rois[fam] == lab].mean(axis=1)
        present = frac[:, c] > 0.01
        assert resp[present].mean() > resp[~present].mean() + 3 * resp[~present].std() / np.sqrt((~present).sum())
        assert np.corrcoef(resp, 1 - np.exp(-frac[:, c] / 0.03))[0, 1] > 0.7
        # position invariance: among images with one object of the category, the response does
        # not depend on where it is (horizontal or vertical centre)
        sel = pl["category"] == c
        rows, n_obj = np.unique(pl["image_row"][sel], return_counts=True)
        single = rows[n_obj == 1]
        k = np.flatnonzero(sel)[np.isin(pl["image_row"][sel], single)]
        cx = (pl["x0"][k] + pl["x1"][k]) / 2
        cy = (pl["y0"][k] + pl["y1"][k]) / 2
        g = 1 - np.exp(-frac[pl["image_row"][k], c] / 0.03)
        resid = resp[pl["image_row"][k]] - np.polyval(np.polyfit(g, resp[pl["image_row"][k]], 1), g)
        assert abs(np.corrcoef(resid, cx)[0, 1]) < 0.3 and abs(np.corrcoef(resid, cy)[0, 1]) < 0.3


def test_same_seed_identical_files_other_seed_differs(sim, tmp_path):
    root, cfg, _ = sim
    ref = _tree_hashes(root)
    other = tmp_path / "nsd"
    simulate_subject(other, SimulationConfig(**SMALL))
    assert _tree_hashes(other) == ref
    with pytest.raises(SimulationExistsError, match=r"subj01.*overwrite=True") as exc:
        simulate_subject(other, SimulationConfig(**SMALL))
    assert "\n" not in str(exc.value)
    simulate_subject(other, SimulationConfig(**{**SMALL, "seed": 1}), overwrite=True)
    new = _tree_hashes(other)
    assert set(new) == set(ref)
    for rel in ("nsddata/experiments/nsd/nsd_expdesign.mat", "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5",
                "/".join(BDIR) + "/betas_session01.nii.gz", "brainenc_ground_truth_subj01.h5"):
        assert new[rel] != ref[rel], rel
    assert json.loads((other / layout.SIMULATION_MANIFEST).read_text())["seed"] == 1


@pytest.mark.slow
def test_interrupted_simulation_is_redone_identically(sim, tmp_path, monkeypatch):
    """A simulation that died midway (manifest ``complete: false``) is simply run again: same
    files as an uninterrupted run, temporaries of dead writers swept, the umask respected."""
    import os
    import subprocess
    import sys

    from brainenc._utils import io
    from brainenc.datasets import simulate as sim_mod

    root, _, _ = sim
    ref = _tree_hashes(root)
    other = tmp_path / "nsd"

    def boom(*a, **k):
        raise KeyboardInterrupt  # as a Ctrl-C after the betas are written

    monkeypatch.setattr(sim_mod, "compute_ncsnr", boom)
    with pytest.raises(KeyboardInterrupt):
        simulate_subject(other, SimulationConfig(**SMALL))
    monkeypatch.undo()
    man = json.loads((other / layout.SIMULATION_MANIFEST).read_text())
    assert man["subjects"]["subj01"]["complete"] is False
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stim_dir = layout.stimuli_path(other).parent
    stale = stim_dir / f".nsd_stimuli.hdf5.{io._HOST}-{dead.pid}.abcd1234.tmp.hdf5"  # a killed writer's
    stale.write_bytes(b"\0" * 4096)
    live = other / f".brainenc_ground_truth_subj01.h5.{io._HOST}-{os.getppid()}.abcd1234.tmp.h5"
    live.write_bytes(b"being written")
    old = os.umask(0o002)
    try:
        simulate_subject(other, SimulationConfig(**SMALL))  # no overwrite needed: it was not complete
    finally:
        os.umask(old)
    assert not stale.exists() and live.exists()  # a live writer's temporary is left alone
    live.unlink()
    assert _tree_hashes(other) == ref
    assert json.loads((other / layout.SIMULATION_MANIFEST).read_text())["subjects"]["subj01"]["complete"]
    modes = {p.stat().st_mode & 0o777 for p in other.rglob("*") if p.is_file()}
    assert modes == {0o664}


def test_refuses_real_release_and_foreign_design(sim, tmp_path):
    root, cfg, _ = sim
    real = tmp_path / "real_nsd"
    p = layout.expdesign_path(real)
    p.parent.mkdir(parents=True)
    p.write_bytes(b"not ours")
    with pytest.raises(SimulationExistsError, match="not written by brainenc simulate"):
        simulate_subject(real, SimulationConfig(**SMALL), overwrite=True)
    assert p.read_bytes() == b"not ours"
    # a second subject must share the root's design
    with pytest.raises(SimulationExistsError, match="seed"):
        simulate_subject(root, SimulationConfig(**{**SMALL, "subject": "subj02", "seed": 7}))


def test_config_validation():
    cfg = from_dict(SimulationConfig, {"subject": "subj03", "seed": 4, "grid": [24, 28, 24]})
    assert cfg.grid == (24, 28, 24) and cfg.subject == "subj03"
    with pytest.raises(ConfigError, match="n_sesions"):
        from_dict(SimulationConfig, {"n_sesions": 2})
    with pytest.raises(ConfigError, match="'n_shared'"):
        SimulationConfig(n_sessions=1, n_shared=300)
    with pytest.raises(ConfigError, match="'grid'"):
        SimulationConfig(grid=(8, 8, 8))
    with pytest.raises(ConfigError, match="'subject'"):
        SimulationConfig(subject="subj09")


def test_gzip_helper_reproducible(tmp_path):
    """NIfTI .gz bytes do not depend on the wall clock (mtime 0, no file name)."""
    from brainenc.datasets.simulate import _write_nifti

    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    _write_nifti(a, data, (1.8, 1.8, 1.8), 4)
    _write_nifti(b, data, (1.8, 1.8, 1.8), 4)
    assert a.read_bytes() == b.read_bytes()
    assert np.array_equal(np.asarray(nib.load(a).dataobj), data)
    assert gzip.decompress(a.read_bytes())[:4] == (348).to_bytes(4, "little")


@pytest.mark.slow
def test_default_build_via_cli(tmp_path, capsys):
    """Default size through the CLI: < 300 MB, 3 sessions, a second subject shares the design."""
    from brainenc.cli import main

    data = tmp_path / "data"
    assert main(["--data-dir", str(data), "-q", "simulate"]) == 0
    out = capsys.readouterr().out
    root = data / "nsd"
    assert "ground truth" in out and str(root) in out
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size < 300e6, size
    assert layout.n_sessions(root, "subj01") == 3
    cfg = SimulationConfig()
    mask = np.asarray(nib.load(layout.brainmask_path(root, "subj01", "func1pt8mm")).dataobj) > 0
    sessions = [np.asarray(nib.load(root.joinpath(*BDIR, f"betas_session{s:02d}.nii.gz")).dataobj)[mask]
                .astype(np.float64) for s in (1, 2, 3)]
    mo = scipy.io.loadmat(layout.expdesign_path(root))["masterordering"].ravel().astype(int)[:cfg.n_trials]
    got = np.asarray(nib.load(root.joinpath(*BDIR, "ncsnr.nii.gz")).dataobj)[mask]
    np.testing.assert_allclose(got, _ncsnr_reference(sessions, mo), rtol=1e-5, atol=1e-6)
    # second subject: same design, own images added to the same stimuli file, shared images identical
    with h5py.File(root / "brainenc_ground_truth_subj01.h5", "r") as g1:
        shared_id = int(g1["images/nsd_id"][:][g1["images/is_shared"][:]][0])
    with h5py.File(layout.stimuli_path(root), "r") as f:
        shared_img = f["imgBrick"][shared_id]
    assert main(["--data-dir", str(data), "-q", "simulate", "--subject", "subj02",
                 "--set", "grid=[20,24,20]"]) == 0
    assert layout.n_sessions(root, "subj02") == 3
    with h5py.File(root / "brainenc_ground_truth_subj02.h5", "r") as g2, \
            h5py.File(root / "brainenc_ground_truth_subj01.h5", "r") as g1:
        ids1, ids2 = g1["images/nsd_id"][:], g2["images/nsd_id"][:]
        assert np.array_equal(ids1[g1["images/is_shared"][:]], ids2[g2["images/is_shared"][:]])
        assert np.intersect1d(ids1, ids2).size == cfg.n_shared
    with h5py.File(layout.stimuli_path(root), "r") as f:
        assert f["imgBrick"].id.get_num_chunks() == 2 * cfg.n_images - cfg.n_shared
        assert shared_img.any() and np.array_equal(f["imgBrick"][shared_id], shared_img)
