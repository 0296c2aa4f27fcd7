"""Algonauts 2023 and MindEye2 readers, and the DATASETS registry."""
import h5py
import numpy as np
import pytest

import nsd_fixtures as fx
from brainenc.datasets import DATASETS, load_dataset
from brainenc.datasets.algonauts import load_algonauts
from brainenc.datasets.mindeye2 import load_mindeye2
from brainenc.exceptions import ConfigError, DataFormatError


def test_algonauts_reader(tmp_path):
    w = fx.write_algonauts(tmp_path)
    ds = load_algonauts(tmp_path, "subj01")
    ntr, nte = w["train_ids"].size, w["test_ids"].size
    np.testing.assert_array_equal(ds.image_ids, np.r_[w["train_ids"], w["test_ids"]])
    np.testing.assert_array_equal(ds.responses[:ntr], np.hstack([w["lh_train"], w["rh_train"]]))
    np.testing.assert_array_equal(ds.responses[ntr:], np.hstack([w["lh_test"], w["rh_test"]]))
    assert ds.split_counts() == {"train": ntr, "test": nte}
    # all-vertices tested with != 0 (the fixture puts a 2 at vertex 0)
    np.testing.assert_array_equal(ds.geometry["vertex"], np.r_[w["lh_vertices"], w["rh_vertices"]])
    assert ds.geometry["vertex"][0] == 0
    np.testing.assert_array_equal(ds.roi_labels["streams"], np.r_[w["lh_streams"], w["rh_streams"]])
    assert ds.roi_names["prf-visualrois"][7] == "hV4"
    np.testing.assert_allclose(ds.noise_ceiling, np.r_[w["lh_nc"], w["rh_nc"]], rtol=1e-6)
    assert "not read" in ds.manifest["roi_names_source"]


def test_algonauts_without_test_fmri(tmp_path):
    w = fx.write_algonauts(tmp_path, with_test_fmri=False)
    ds = load_algonauts(tmp_path, "subj01")
    assert ds.splits["test"].size == 0 and ds.manifest["test_image_ids"] == w["test_ids"].tolist()


def test_algonauts_shape_mismatch(tmp_path):
    w = fx.write_algonauts(tmp_path)
    p = tmp_path / "subj01" / "training_split" / "training_fmri" / "rh_training_fmri.npy"
    np.save(p, w["rh_train"][:, :-1])
    with pytest.raises(DataFormatError, match=r"rh_training_fmri\.npy: expected shape \(12, \d+\)"):
        load_algonauts(tmp_path, "subj01")


def test_algonauts_refuses_pickles(tmp_path):
    fx.write_algonauts(tmp_path)
    p = tmp_path / "subj01" / "roi_masks" / "lh.streams_challenge_space.npy"
    np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataFormatError, match=r"lh\.streams_challenge_space\.npy: not a readable \.npy"):
        load_algonauts(tmp_path, "subj01")


@pytest.mark.parametrize("repeats", ["single", "average"])
def test_mindeye2_reader(tmp_path, repeats):
    w = fx.write_mindeye2(tmp_path)
    ds = load_mindeye2(tmp_path, "subj01", repeats=repeats)
    ids, betas, shared = w["ids"], w["betas"], w["shared"]
    if repeats == "single":
        np.testing.assert_array_equal(ds.responses, betas)
        np.testing.assert_array_equal(ds.image_ids, ids)
        np.testing.assert_array_equal(ds.global_trials, np.arange(ids.size))
        np.testing.assert_array_equal(ds.splits["test"], np.nonzero(shared[ids])[0])
    else:
        uniq = np.unique(ids)
        np.testing.assert_array_equal(ds.image_ids, uniq)
        expected = np.stack([betas[ids == u].mean(0) for u in uniq])
        np.testing.assert_allclose(ds.responses, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(ds.n_repeats, [(ids == u).sum() for u in uniq])
        np.testing.assert_array_equal(ds.image_ids[ds.splits["test"]], uniq[shared[uniq]])


def test_mindeye2_ids_out_of_range(tmp_path):
    fx.write_mindeye2(tmp_path)
    with h5py.File(tmp_path / "COCO_73k_subj_indices.hdf5", "r+") as f:
        f["subj01"][5] = 73000
    with pytest.raises(DataFormatError, match=r"COCO_73k_subj_indices\.hdf5: 73k ids must lie in \[0, 72999\]"):
        load_mindeye2(tmp_path, "subj01")


def test_mindeye2_missing_file(tmp_path):
    with pytest.raises(DataFormatError, match=r"betas_all_subj02_fp32_renorm\.hdf5: MindEye2 file not found"):
        load_mindeye2(tmp_path, "subj02")


def test_dataset_registry(tmp_path):
    assert DATASETS.list() == ["algonauts2023", "mindeye2", "nsd"]
    fx.write_algonauts(tmp_path)
    assert load_dataset("algonauts2023", tmp_path, "subj01").n_voxels > 0
    with pytest.raises(ConfigError, match="Did you mean 'mindeye2'"):
        DATASETS.get("mindeye")
