"""MultiSubjectDataset over several prepared simulated subjects (different anatomy, one design)."""
from __future__ import annotations

import numpy as np
import pytest

from brainenc.datasets.multisubject import (
    ExampleTable,
    FeatureRows,
    MultiSubjectDataset,
    PaddedResponses,
    feature_rows,
    load_multisubject,
)
from brainenc.datasets.prepare import PrepareConfig, PreparedDataset, prepare_subject
from brainenc.exceptions import ConfigError, DataFormatError

#: 2 sessions (so that a 1-session prepare is a real subset), different anatomy per subject
SIM = {"n_sessions": 2, "n_shared": 40, "grid": (20, 24, 20), "anatomy_jitter": 0.15,
       "write_stim_info": False, "write_hemi_rois": False}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """subj01 and subj02 prepared from all sessions, and subj02 prepared from session 1 only."""
    from brainenc.datasets.simulate import SimulationConfig, simulate_subject

    base = tmp_path_factory.mktemp("multi")
    root, cache = base / "nsd", base / "prepared"
    for s in ("subj01", "subj02"):
        simulate_subject(root, SimulationConfig(subject=s, **SIM))
    a = prepare_subject(root, PrepareConfig(subject="subj01"), cache_root=cache)
    b = prepare_subject(root, PrepareConfig(subject="subj02"), cache_root=cache)
    b1 = prepare_subject(root, PrepareConfig(subject="subj02", n_sessions=1), cache_root=cache)
    return {"root": root, "a": a, "b": b, "b1": b1}


def _memory_subject(subject="subj03", n_vox=37, seed=0, ids=None):
    """A small in-memory PreparedDataset (a third subject with its own voxel count)."""
    rng = np.random.default_rng(seed)
    ids = np.arange(1000, 1060) if ids is None else np.asarray(ids)
    resp = rng.standard_normal((ids.size, n_vox)).astype(np.float32)
    test = np.arange(0, ids.size, 3)
    train = np.setdiff1d(np.arange(ids.size), test)
    return PreparedDataset(subject=subject, responses=resp, image_ids=ids, n_repeats=np.ones(ids.size),
                           splits={"train": train, "test": test})


@pytest.fixture(scope="module")
def multi(prepared):
    return MultiSubjectDataset([prepared["a"], prepared["b"]])


def test_offsets_and_global_local_roundtrip(prepared, multi):
    a, b = prepared["a"], prepared["b"]
    c = _memory_subject()
    m = MultiSubjectDataset([b, a, c])  # order = subject order
    assert m.subjects == ["subj02", "subj01", "subj03"] and m.datasets[0] is b
    assert a.n_voxels != b.n_voxels  # anatomy jitter: different voxel counts
    assert m.n_voxels.dtype == np.int64 and m.n_voxels.tolist() == [b.n_voxels, a.n_voxels, 37]
    assert m.offsets.tolist() == [0, b.n_voxels, b.n_voxels + a.n_voxels, b.n_voxels + a.n_voxels + 37]
    assert m.n_total_voxels == int(m.offsets[-1])
    for s in range(3):
        g = m.to_global(s, np.arange(m.n_voxels[s]))
        assert g.dtype == np.int64 and np.array_equal(g, np.arange(m.offsets[s], m.offsets[s + 1]))
        assert np.array_equal(m.to_global(m.subjects[s], [0]), [m.offsets[s]])
    g = np.random.default_rng(0).integers(0, m.n_total_voxels, 500)
    subj, loc = m.to_local(g)
    assert subj.dtype == loc.dtype == np.int64
    assert np.all(loc >= 0) and np.all(loc < m.n_voxels[subj])
    back = np.empty_like(g)
    for s in range(3):
        back[subj == s] = m.to_global(s, loc[subj == s])
    assert np.array_equal(back, g)
    s2, l2 = m.to_local(m.offsets[1:-1])  # first voxel of each later subject
    assert s2.tolist() == [1, 2] and l2.tolist() == [0, 0]
    assert m.subject_index("subj03") == 2 and m.subject_index(1) == 1
    with pytest.raises(IndexError, match="subj01.*voxels"):
        m.to_global("subj01", [a.n_voxels])
    with pytest.raises(IndexError, match="out of range"):
        m.to_local([m.n_total_voxels])
    with pytest.raises(ConfigError, match="'subj05' is not in this dataset.*subj02, subj01, subj03"):
        m.subject_index("subj05")
    with pytest.raises(ConfigError, match="index 3 is out of range"):
        m.subject_index(3)


def test_shared_test_ids_are_the_intersection(prepared, multi):
    import h5py

    from brainenc.datasets import layout

    a, b, b1 = prepared["a"], prepared["b"], prepared["b1"]
    with h5py.File(layout.ground_truth_path(prepared["root"], "subj01"), "r") as f:
        shared = np.sort(f["images/nsd_id"][:][f["images/is_shared"][:]])
    assert np.array_equal(multi.shared_test_ids, shared) and multi.shared_test_ids.dtype == np.int64
    # a subject prepared from 1 of 2 sessions saw only part of the shared images: the intersection
    m1 = MultiSubjectDataset([a, b1])
    direct = np.intersect1d(np.unique(a.image_ids[a.splits["test"]]), np.unique(b1.image_ids[b1.splits["test"]]))
    assert np.array_equal(m1.shared_test_ids, direct)
    assert b1.manifest["n_sessions"] == 1 and 0 < direct.size < shared.size
    assert np.isin(direct, shared).all() and (b1.n_repeats[b1.splits["test"]] < 3).any()
    for m in (multi, m1):
        for s, ds in enumerate(m.datasets):
            rows = m.test_rows(s)
            assert rows.dtype == np.int64 and np.isin(rows, ds.splits["test"]).all()
            assert np.array_equal(ds.image_ids[rows], m.shared_test_ids)  # same image per position
    assert m1.test_rows("subj01").size < a.splits["test"].size  # subj01's other shared images left out


def test_padded_responses_rows_and_padding(prepared, multi):
    table = multi.examples("train")
    pr = multi.padded_responses(table)
    assert isinstance(pr, PaddedResponses)
    v_max = int(multi.n_voxels.max())
    assert pr.shape == (len(table), v_max) and pr.ndim == 2 and pr.dtype == np.float32 and len(pr) == len(table)
    assert np.array_equal(pr.lengths, multi.n_voxels[table.subject])
    rng = np.random.default_rng(1)
    idx = rng.integers(0, len(table), 64)
    idx[:3] = idx[0]  # duplicates and any order
    got = pr[idx]
    assert got.shape == (64, v_max) and got.dtype == np.float32
    for k, i in enumerate(idx):
        s, r = table.subject[i], table.row[i]
        v = multi.n_voxels[s]
        assert np.array_equal(got[k, :v], np.asarray(multi.responses(s)[r]))
        assert not got[k, v:].any()
    i = int(np.flatnonzero(table.subject == np.argmin(multi.n_voxels))[5])
    one = pr[i]
    assert one.shape == (v_max,) and np.array_equal(one, got[0] if idx[0] == i else pr[[i]][0])
    assert np.array_equal(pr[-1], pr[len(pr) - 1])
    assert np.array_equal(pr[2:5], pr[np.arange(2, 5)])
    mask = np.zeros(len(pr), dtype=bool)
    mask[[0, 7]] = True
    assert np.array_equal(pr[mask], pr[np.array([0, 7])])
    with pytest.raises(IndexError, match="out of range"):
        pr[len(pr)]
    # the prepared memmaps are handed out, never copied
    assert multi.responses("subj02") is prepared["b"].responses
    assert isinstance(multi.responses(0), np.memmap)
    # wider padding on request; rows outside a subject are refused
    assert multi.padded_responses(table, width=v_max + 5).shape == (len(table), v_max + 5)
    with pytest.raises(DataFormatError, match="rows of subject 0"):
        multi.padded_responses(ExampleTable([0], [10 ** 6], [0]))


def test_examples_cover_every_row_once(prepared, multi):
    for split in ("train", "test"):
        t = multi.examples(split)
        assert isinstance(t, ExampleTable) and t.subject.dtype == t.row.dtype == t.image_id.dtype == np.int64
        total = 0
        for s, ds in enumerate(multi.datasets):
            rows = t.row[t.subject == s]
            assert np.array_equal(np.sort(rows), np.sort(ds.splits[split])) and np.unique(rows).size == rows.size
            assert np.array_equal(t.image_id[t.subject == s], ds.image_ids[rows])
            total += ds.splits[split].size
        assert len(t) == total
    only = multi.examples("train", subjects=["subj02"])
    assert set(only.subject.tolist()) == {1} and len(only) == prepared["b"].splits["train"].size
    sub = t.subset(np.array([2, 0]))
    assert len(sub) == 2 and sub.row.tolist() == [t.row[2], t.row[0]]
    assert len(t.subset(slice(0, 3))) == 3
    # every row of every subject is covered by image_ids()
    ids = multi.image_ids()
    assert ids.dtype == np.int64 and np.all(np.diff(ids) > 0)
    assert np.array_equal(ids, np.union1d(prepared["a"].image_ids, prepared["b"].image_ids))
    with pytest.raises(ConfigError, match="split 'val' does not exist for subj01"):
        multi.examples("val")
    with pytest.raises(DataFormatError, match="same length"):
        ExampleTable([0, 1], [0], [0, 1])


def test_feature_rows_match_fancy_indexing(tmp_path, multi):
    ids = multi.image_ids()
    rng = np.random.default_rng(2)
    perm = rng.permutation(ids.size)  # feature rows in another order than the ids
    tokens = rng.standard_normal((ids.size, 3, 4)).astype(np.float16)
    np.save(tmp_path / "tokens.npy", tokens)
    mm = np.load(tmp_path / "tokens.npy", mmap_mode="r")
    feat_ids = ids[perm]
    table = multi.examples("train")
    fr = feature_rows(mm, feat_ids, table.image_id)
    assert isinstance(fr, FeatureRows)
    assert fr.shape == (len(table), 3, 4) and fr.dtype == np.float16 and fr.ndim == 3 and len(fr) == len(table)
    lookup = {int(i): k for k, i in enumerate(feat_ids)}
    want_rows = np.array([lookup[int(i)] for i in table.image_id])
    idx = rng.integers(0, len(table), 50)
    assert np.array_equal(fr[idx], tokens[want_rows[idx]])
    assert np.array_equal(fr[7], tokens[want_rows[7]])
    assert np.array_equal(fr[3:9], tokens[want_rows[3:9]])
    assert np.array_equal(np.asarray(fr), tokens[want_rows])
    # pooled [n, D] works the same way
    assert np.array_equal(feature_rows(tokens[:, 0], feat_ids, ids[:5])[:], tokens[perm.argsort()[:5], 0])
    missing = np.array([ids[0], 72999, 72998])
    with pytest.raises(DataFormatError, match=r"2 wanted image id\(s\) have no feature row \(first: 72998, 72999\)"):
        feature_rows(mm, feat_ids, missing)
    with pytest.raises(DataFormatError, match="repeats 1 id"):
        feature_rows(mm[:3], np.array([5, 5, 6]), [5])
    with pytest.raises(DataFormatError, match="has 2 ids for"):
        feature_rows(mm, feat_ids[:2], [feat_ids[0]])


def test_errors_name_the_subject(prepared):
    a = prepared["a"]
    with pytest.raises(ConfigError, match="at least one prepared dataset"):
        MultiSubjectDataset([])
    with pytest.raises(ConfigError, match="subject subj01 is given twice"):
        MultiSubjectDataset([a, prepared["b"], a])
    odd = _memory_subject("subj04")
    odd.splits.pop("test")
    with pytest.raises(DataFormatError, match="subj04 has no 'train'/'test' split"):
        MultiSubjectDataset([a, odd])
    # disjoint designs: nothing shared (empty, not an error)
    m = MultiSubjectDataset([a, _memory_subject("subj05", ids=np.arange(72000, 72030))])
    assert m.shared_test_ids.size == 0 and m.test_rows(0).size == 0


def test_load_and_describe(prepared, multi):
    m = load_multisubject([prepared["a"].path, prepared["b1"].path])
    assert m.subjects == ["subj01", "subj02"]
    assert np.array_equal(np.asarray(m.responses(1)[:3]), np.asarray(prepared["b1"].responses[:3]))
    text = m.describe()
    lines = text.splitlines()
    assert len(lines) == 3 and "2 subjects" in lines[0]
    assert lines[2].lstrip().startswith("subj02:") and "sessions 1" in lines[2]
    assert f"{m.n_voxels[1]} voxels" in lines[2] and f"train {prepared['b1'].splits['train'].size}" in lines[2]
    assert "sessions 2" in lines[1]
    assert "MultiSubjectDataset" in repr(multi)
    with pytest.raises(DataFormatError, match="not found"):
        load_multisubject([prepared["a"].path.parent / "nope"])


def test_lazy_arrays_feed_dict_dataset(multi):
    """The lazy arrays work as DictDataset columns (the training bridge)."""
    pytest.importorskip("torch")
    from brainenc.training.data import DictDataset

    table = multi.examples("train")
    tokens = np.arange(multi.image_ids().size * 2, dtype=np.float32).reshape(-1, 2)
    data = DictDataset({"x": feature_rows(tokens, multi.image_ids(), table.image_id),
                        "y": multi.padded_responses(table), "subject": table.subject})
    batch = data.__getitems__([5, 1, 5])
    assert batch["y"].shape == (3, int(multi.n_voxels.max())) and batch["x"].shape == (3, 2)
    assert batch["subject"].tolist() == table.subject[[5, 1, 5]].tolist()


def test_datasets_package_exports_without_torch():
    import subprocess
    import sys

    code = ("import sys, brainenc.datasets as d; d.MultiSubjectDataset; d.load_multisubject; d.feature_rows; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
