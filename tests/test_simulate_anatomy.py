"""Several simulated subjects with different anatomy (``SimulationConfig.anatomy_jitter``)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from brainenc.config import from_dict
from brainenc.datasets import layout
from brainenc.datasets.simulate import SimulationConfig, _make_brain, simulate_subject, subject_anatomy
from brainenc.exceptions import ConfigError, DataFormatError

TINY = {"n_sessions": 1, "n_shared": 25, "grid": (20, 24, 20), "write_stim_info": False, "write_hemi_rois": False}


def _tree_hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def jittered(tmp_path_factory):
    """subj01 and subj02 with anatomy_jitter 0.15 in one root."""
    root = tmp_path_factory.mktemp("nsd_jitter")
    res = {s: simulate_subject(root, SimulationConfig(subject=s, anatomy_jitter=0.15, **TINY))
           for s in ("subj01", "subj02")}
    return root, res


def _nsdgeneral_ijk(root, subject):
    v = np.asarray(nib.load(layout.roi_path(root, subject, "func1pt8mm", "nsdgeneral")).dataobj)
    return np.argwhere(np.rint(v) == 1)


def test_jitter_gives_each_subject_its_own_anatomy(jittered):
    root, res = jittered
    a, b = res["subj01"], res["subj02"]
    assert a.n_voxels != b.n_voxels
    ija, ijb = _nsdgeneral_ijk(root, "subj01"), _nsdgeneral_ijk(root, "subj02")
    assert len(ija) == a.n_voxels and len(ijb) == b.n_voxels
    sa, sb = {tuple(r) for r in ija}, {tuple(r) for r in ijb}
    assert sa != sb and len(sa ^ sb) > 0.1 * min(len(sa), len(sb))  # different voxel positions
    # the same design and the same shared (test) images, each subject's own other images
    man = json.loads((root / layout.SIMULATION_MANIFEST).read_text())
    assert set(man["subjects"]) == {"subj01", "subj02"}
    with h5py.File(a.ground_truth_path, "r") as fa, h5py.File(b.ground_truth_path, "r") as fb:
        ids_a, ids_b = fa["images/nsd_id"][:], fb["images/nsd_id"][:]
        sh_a, sh_b = fa["images/is_shared"][:], fb["images/is_shared"][:]
        assert np.array_equal(np.sort(ids_a[sh_a]), np.sort(ids_b[sh_b])) and sh_a.sum() == TINY["n_shared"]
        assert not np.intersect1d(ids_a[~sh_a], ids_b[~sh_b]).size
        # the realised anatomy is recorded (ground truth and manifest agree with subject_anatomy)
        for s, f in (("subj01", fa), ("subj02", fb)):
            want = subject_anatomy(SimulationConfig(subject=s, anatomy_jitter=0.15, **TINY))
            np.testing.assert_allclose(f["anatomy/radii"][:], want["radii"])
            np.testing.assert_allclose(f["anatomy/centre"][:], want["centre"])
            assert f["anatomy/snr_factor"][()] == pytest.approx(want["snr_factor"])
            rec = man["subjects"][s]["anatomy"]
            np.testing.assert_allclose(rec["radii"], want["radii"])
            assert rec["snr_factor"] == pytest.approx(want["snr_factor"]) and rec["jitter"] == 0.15
            assert json.loads(f.attrs["config"])["anatomy_jitter"] == 0.15
            # the SNR factor moves the whole subject's SNR
            snr, model = f["voxels/snr"][:], f["voxels/model"][:]
            assert np.median(snr[model != 0]) == pytest.approx(0.6 * want["snr_factor"], rel=0.25)
        assert not np.allclose(fa["anatomy/radii"][:], fb["anatomy/radii"][:])


def test_jitter_zero_is_the_reference_simulation(tmp_path):
    """An explicit anatomy_jitter = 0 writes exactly the files of the default config (and records nothing new)."""
    a, b = tmp_path / "implicit", tmp_path / "explicit"
    simulate_subject(a, SimulationConfig(**TINY))
    simulate_subject(b, from_dict(SimulationConfig, {**TINY, "anatomy_jitter": 0}))
    ha, hb = _tree_hashes(a), _tree_hashes(b)
    assert ha == hb and len(ha) > 10
    man = json.loads((a / layout.SIMULATION_MANIFEST).read_text())
    assert "anatomy_jitter" not in man["config"] and "anatomy" not in man["subjects"]["subj01"]
    with h5py.File(layout.ground_truth_file(a, "subj01"), "r") as f:
        assert "anatomy" not in f and "anatomy" not in f.attrs
        assert "anatomy_jitter" not in json.loads(f.attrs["config"])
    an = subject_anatomy(SimulationConfig(**TINY))
    X, Y, Z = TINY["grid"]
    assert np.array_equal(an["radii"], [0.215 * X, 0.45 * Y, 0.40 * Z]) and an["snr_factor"] == 1.0
    assert np.array_equal(an["centre"][:, 0], [0.27 * (X - 1), 0.73 * (X - 1)])


def test_jitter_streams_and_validation():
    base = SimulationConfig(subject="subj03", anatomy_jitter=0.1, **TINY)
    a1, a2 = subject_anatomy(base), subject_anatomy(SimulationConfig(subject="subj03", anatomy_jitter=0.1, **TINY))
    assert np.array_equal(a1["radii"], a2["radii"])  # deterministic per (seed, subject)
    a3 = subject_anatomy(SimulationConfig(subject="subj03", anatomy_jitter=0.1, seed=1, **TINY))
    assert not np.array_equal(a1["radii"], a3["radii"])
    with pytest.raises(ConfigError, match="'anatomy_jitter' must be in"):
        SimulationConfig(anatomy_jitter=0.5)
    with pytest.raises(ConfigError, match="'anatomy_jitter' must be in"):
        SimulationConfig(anatomy_jitter=-0.1)
    # a jittered brain too small for the grid names both settings
    cfg = SimulationConfig(subject="subj01", anatomy_jitter=0.15, **{**TINY, "grid": (16, 18, 16)})
    with pytest.raises(ConfigError, match=r"'grid' .*too small.*raise 'grid' or lower 'anatomy_jitter'"):
        _make_brain(cfg, np.random.default_rng(0))


# ---- unseen images (synthetic-fMRI augmentation pool) -------------------------------------------
def test_unseen_images_are_what_the_root_would_show(jittered):
    from brainenc.datasets.nsd import load_expdesign
    from brainenc.datasets.simulate import _written_chunks
    from brainenc.datasets.unseen import read_images, unseen_image_ids

    root, _ = jittered
    with h5py.File(layout.stimuli_path(root), "r") as f:
        dset = f["imgBrick"]
        seen = np.array(sorted(_written_chunks(dset)))
        stored = dset[seen[:3]]
    np.testing.assert_array_equal(read_images(root, seen[:3]), stored)  # rendering = the simulator's images
    ids = unseen_image_ids(root, seen, 40, seed=3)
    assert ids.shape == (40,) and np.all(np.diff(ids) > 0)
    assert not np.isin(ids, seen).any()
    assert not np.isin(ids, load_expdesign(layout.expdesign_path(root)).sharedix).any()
    np.testing.assert_array_equal(ids, unseen_image_ids(root, seen, 40, seed=3))
    assert not np.array_equal(ids, unseen_image_ids(root, seen, 40, seed=4))
    img = read_images(root, ids[:2])
    assert img.shape == (2,) + stored.shape[1:] and img.dtype == np.uint8 and img.std() > 0
    with pytest.raises(DataFormatError, match="only"):
        unseen_image_ids(root, seen, layout.N_IMAGES_73K, seed=0)


def test_unseen_images_of_a_real_root_come_from_its_stimuli_file(tmp_path):
    from brainenc.datasets.unseen import read_images

    path = layout.stimuli_path(tmp_path)
    path.parent.mkdir(parents=True)
    brick = np.random.default_rng(0).integers(0, 256, size=(12, 6, 6, 3), dtype=np.uint8)
    with h5py.File(path, "w") as f:
        f.create_dataset("imgBrick", data=brick)
    np.testing.assert_array_equal(read_images(tmp_path, [7, 2]), brick[[7, 2]])
    with pytest.raises(DataFormatError, match="missing"):
        read_images(tmp_path / "nowhere", [0])


def test_augment_stimuli_real_in_place_simulated_rendered_once(jittered, tmp_path):
    from brainenc.datasets.unseen import read_images
    from brainenc.features import HDF5Images
    from brainenc.workflows.decode import _augment_stimuli

    root, _ = jittered
    ids = np.array([5, 70001, 123], dtype=np.int64)
    stim, rows = _augment_stimuli(root, ids, tmp_path / "sim")  # simulated: a run-local brick, row = position
    assert stim == tmp_path / "sim" / "stimuli.hdf5" and rows.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(HDF5Images(stim).read(rows[::-1]), read_images(root, ids[::-1]))

    real = tmp_path / "real"  # a real root: the 73k brick is used in place, rows are the ids themselves
    path = layout.stimuli_path(real)
    path.parent.mkdir(parents=True)
    with h5py.File(path, "w") as f:
        d = f.create_dataset("imgBrick", shape=(layout.N_IMAGES_73K, 4, 4, 3), dtype=np.uint8, chunks=(1, 4, 4, 3))
        d[123] = 7
    stim, rows = _augment_stimuli(real, ids, tmp_path / "out")
    assert stim == path and rows.tolist() == ids.tolist() and not (tmp_path / "out").exists()
    assert (HDF5Images(stim).read(rows[2:]) == 7).all()
    path.unlink()
    with pytest.raises(DataFormatError, match="nsd_stimuli.hdf5: missing"):
        _augment_stimuli(real, ids, tmp_path / "out")
