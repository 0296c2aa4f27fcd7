"""prepare_subject against direct computations (sklearn StandardScaler, numpy), caching, bad inputs."""
import json
import os

import numpy as np
import pytest
from scipy import stats
from sklearn.preprocessing import StandardScaler

import nsd_fixtures as fx
from brainenc.cli import main as cli_main
from brainenc.datasets import prepare as prep
from brainenc.datasets.prepare import PrepareConfig, list_prepared, load_prepared, prepare_subject
from brainenc.exceptions import ConfigError, DataFormatError

TPS = 750


def _ids(sub):
    n = sub.n_sessions * TPS
    return np.array([fx.lookup(sub.design, 1, t) for t in range(n)])


def _shared(sub, ids):
    return np.isin(ids, sub.design["sharedix"][0].astype(int) - 1)


def _direct_trials(sub, idx, stat_rows=None, zscore=True):
    """Single-trial PSC (volume, nsdgeneral order), z-scored per session with sklearn."""
    out = []
    for s in range(1, sub.n_sessions + 1):
        x = sub.betas[s][idx[:, 0], idx[:, 1], idx[:, 2], :].T.astype(np.float64) / 300.0
        if zscore:
            rows = np.ones(TPS, bool) if stat_rows is None else stat_rows[(s - 1) * TPS: s * TPS]
            x = StandardScaler().fit(x[rows]).transform(x)
        out.append(x)
    return np.concatenate(out)


def _average(trials, ids, keep):
    uniq = np.unique(ids[keep])
    return uniq, np.stack([trials[keep & (ids == u)].mean(0) for u in uniq]), np.array([(keep & (ids == u)).sum() for u in uniq])


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "prepared"


def test_default_prepare_matches_direct_computation(nsd_subject, cache):
    ds = prepare_subject(nsd_subject.root, PrepareConfig(), cache_root=cache)
    idx = np.argwhere(nsd_subject.labels["nsdgeneral"] > 0)
    ids = _ids(nsd_subject)
    uniq, mean, counts = _average(_direct_trials(nsd_subject, idx), ids, np.ones(ids.size, bool))
    assert not ds.cache_hit
    assert isinstance(ds.responses, np.memmap) and ds.responses.dtype == np.float32
    np.testing.assert_array_equal(ds.image_ids, uniq)
    np.testing.assert_array_equal(ds.n_repeats, counts)
    np.testing.assert_allclose(ds.responses, mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(ds.geometry["indices"], idx)
    test_ids = np.sort(np.unique(ids[_shared(nsd_subject, ids)]))
    np.testing.assert_array_equal(ds.image_ids[ds.splits["test"]], test_ids)
    assert set(ds.splits["train"]).isdisjoint(ds.splits["test"])
    assert ds.n_samples == ds.splits["train"].size + ds.splits["test"].size
    # ROI labels carried from every family present, -1 -> 0, names from the ctab / tables
    assert set(ds.roi_labels) == set(fx.FAMILIES_WRITTEN)
    lab = nsd_subject.labels["prf-visualrois"][idx[:, 0], idx[:, 1], idx[:, 2]]
    np.testing.assert_array_equal(ds.roi_labels["prf-visualrois"], np.maximum(lab, 0))
    masks = ds.roi_masks()
    np.testing.assert_array_equal(masks["prf-visualrois/hV4"], lab == 7)
    # ncsnr from the file, ceiling for the test rows' repeat counts
    np.testing.assert_allclose(ds.ncsnr, nsd_subject.ncsnr[idx[:, 0], idx[:, 1], idx[:, 2]], rtol=1e-6)
    s2 = ds.ncsnr.astype(np.float64) ** 2
    norm = np.mean(1.0 / ds.n_repeats[ds.splits["test"]])
    np.testing.assert_allclose(ds.noise_ceiling, s2 / (s2 + norm), rtol=1e-5)
    assert ds.manifest["ncsnr_source"] == "file"


def test_hdf5_and_nifti_give_identical_datasets(nsd_subject, cache):
    a = prepare_subject(nsd_subject.root, PrepareConfig(fmt="nifti"), cache_root=cache)
    b = prepare_subject(nsd_subject.root, PrepareConfig(fmt="hdf5"), cache_root=cache)
    assert a.path != b.path
    np.testing.assert_array_equal(np.asarray(a.responses), np.asarray(b.responses))


def test_fsaverage_matches_direct(nsd_subject, cache):
    ds = prepare_subject(nsd_subject.root, PrepareConfig(space="fsaverage", repeats="single"), cache_root=cache)
    sel = {h: np.nonzero(nsd_subject.fs_labels["nsdgeneral"][h] > 0)[0] for h in ("lh", "rh")}
    trials = []
    for s in range(1, nsd_subject.n_sessions + 1):
        x = np.concatenate([nsd_subject.fs_betas[s][h][sel[h]].T for h in ("lh", "rh")], axis=1).astype(np.float64)
        trials.append(StandardScaler().fit_transform(x))
    np.testing.assert_allclose(ds.responses, np.concatenate(trials), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(ds.geometry["vertex"], np.concatenate([sel["lh"], sel["rh"]]))
    assert ds.geometry["hemi"].tolist() == ["lh"] * sel["lh"].size + ["rh"] * sel["rh"].size
    np.testing.assert_array_equal(ds.global_trials, np.arange(nsd_subject.n_sessions * TPS))
    np.testing.assert_array_equal(ds.image_ids, _ids(nsd_subject))
    assert set(ds.roi_labels) == {"nsdgeneral", "streams"}  # only families with fsaverage files
    np.testing.assert_allclose(ds.noise_ceiling, ds.ncsnr.astype(float) ** 2 / (ds.ncsnr.astype(float) ** 2 + 1), rtol=1e-5)


def test_zscore_without_test_images(nsd_subject, cache):
    ds = prepare_subject(nsd_subject.root, PrepareConfig(zscore_exclude_test=True, repeats="single"), cache_root=cache)
    idx = np.argwhere(nsd_subject.labels["nsdgeneral"] > 0)
    ids = _ids(nsd_subject)
    direct = _direct_trials(nsd_subject, idx, stat_rows=~_shared(nsd_subject, ids))
    np.testing.assert_allclose(ds.responses, direct, rtol=1e-4, atol=1e-5)
    assert "without test trials" in ds.manifest["conventions"]["zscore"]


def test_no_zscore_keeps_psc(nsd_subject, cache):
    ds = prepare_subject(nsd_subject.root, PrepareConfig(zscore=False, repeats="single", mask="brainmask"),
                         cache_root=cache)
    idx = np.argwhere(nsd_subject.brainmask)
    np.testing.assert_allclose(ds.responses, _direct_trials(nsd_subject, idx, zscore=False), rtol=1e-6)


def test_algonauts_split_averages_only_split_sessions(nsd_subject, cache):
    ds = prepare_subject(nsd_subject.root, PrepareConfig(split="algonauts"), cache_root=cache)
    idx = np.argwhere(nsd_subject.labels["nsdgeneral"] > 0)
    ids = _ids(nsd_subject)
    sess = np.arange(ids.size) // TPS + 1
    trials = _direct_trials(nsd_subject, idx)
    train_keep = sess <= nsd_subject.n_sessions - 3
    u, m, c = _average(trials, ids, train_keep)
    tr = ds.splits["train"]
    np.testing.assert_array_equal(ds.image_ids[tr], u)
    np.testing.assert_array_equal(ds.n_repeats[tr], c)
    np.testing.assert_allclose(ds.responses[tr], m, rtol=1e-4, atol=1e-5)


def test_computed_ncsnr_matches_direct_recipe(nsd_subject, cache):
    # zscore_exclude_test changes the stored values; ncsnr must still follow the all-trial recipe
    ds = prepare_subject(nsd_subject.root, PrepareConfig(ncsnr="compute", zscore_exclude_test=True), cache_root=cache)
    idx = np.argwhere(nsd_subject.labels["nsdgeneral"] > 0)
    ids = _ids(nsd_subject)
    psc = _direct_trials(nsd_subject, idx, zscore=False)
    z = np.concatenate([stats.zscore(psc[s * TPS:(s + 1) * TPS], axis=0, ddof=1)  # MATLAB std, as the release
                        for s in range(nsd_subject.n_sessions)])
    uniq, counts = np.unique(ids, return_counts=True)
    var = [z[ids == u].var(axis=0, ddof=1) for u in uniq[counts == 3]]
    v2 = np.mean(var, axis=0)
    expected = np.sqrt(np.maximum(0, 1 - v2)) / np.sqrt(v2)
    np.testing.assert_allclose(ds.ncsnr, expected, rtol=1e-4)
    assert ds.manifest["ncsnr_source"] == "computed"


def test_cache_hit_and_misses(nsd_copy, cache):
    a = prepare_subject(nsd_copy.root, PrepareConfig(), cache_root=cache)
    b = prepare_subject(nsd_copy.root, PrepareConfig(), cache_root=cache)
    assert not a.cache_hit and b.cache_hit and a.path == b.path
    c = prepare_subject(nsd_copy.root, PrepareConfig(repeats="single"), cache_root=cache)
    assert not c.cache_hit and c.path != a.path
    d = prepare_subject(nsd_copy.root, PrepareConfig(chunk_trials=13), cache_root=cache)  # memory knob only
    assert d.cache_hit
    p = fx.betas_path(nsd_copy.root, "subj01", 4)
    os.utime(p, ns=(10**9, 10**9))  # a source file changed -> miss
    e = prepare_subject(nsd_copy.root, PrepareConfig(), cache_root=cache)
    assert not e.cache_hit and e.path != a.path
    assert len(list_prepared(cache)) == 3 and list_prepared(cache, subject="subj02") == []


def test_manifest_records_choices_sources_versions(nsd_subject, cache):
    ds = prepare_subject(nsd_subject.root, PrepareConfig(split="nsd37", rois=["streams"]), cache_root=cache)
    m = json.loads((ds.path / "manifest.json").read_text())
    assert m["choices"]["split"] == "nsd37" and m["choices"]["rois"] == ["streams"]
    assert m["choices"]["beta_version"] == "betas_fithrf_GLMdenoise_RR" and m["choices"]["mask"] == "nsdgeneral"
    paths = [s["path"] for s in m["sources"]]
    for s in range(1, 5):
        assert str(fx.betas_path(nsd_subject.root, "subj01", s).resolve()) in paths
    assert all({"size", "mtime_ns"} <= set(s) for s in m["sources"])
    assert {"brainenc", "numpy", "nibabel", "h5py"} <= set(m["versions"])
    assert set(ds.roi_labels) == {"streams", "nsdgeneral"}  # the mask family is always carried


def test_interrupted_prepare_leaves_no_complete_cache(nsd_subject, cache, monkeypatch):
    calls = []
    real = prep._read_session

    def boom(plan, session):
        calls.append(session)
        if session == 3:
            raise KeyboardInterrupt
        return real(plan, session)

    monkeypatch.setattr(prep, "_read_session", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare_subject(nsd_subject.root, PrepareConfig(), cache_root=cache)
    assert calls == [1, 2, 3]
    assert list_prepared(cache) == [] and list(cache.iterdir()) == []
    monkeypatch.setattr(prep, "_read_session", real)
    assert not prepare_subject(nsd_subject.root, PrepareConfig(), cache_root=cache).cache_hit


def test_killed_prepare_folder_is_not_loadable(nsd_subject, cache):
    ds = prepare_subject(nsd_subject.root, PrepareConfig(), cache_root=cache)
    (ds.path / "COMPLETE").unlink()  # as if killed before the marker
    with pytest.raises(DataFormatError, match="incomplete prepared dataset"):
        load_prepared(ds.path)
    assert list_prepared(cache) == []
    again = prepare_subject(nsd_subject.root, PrepareConfig(), cache_root=cache)
    assert not again.cache_hit and (again.path / "COMPLETE").is_file()


def test_stale_tmp_folder_of_dead_process_is_removed(nsd_subject, cache):
    ds = prepare_subject(nsd_subject.root, PrepareConfig(), cache_root=cache)
    from brainenc._utils.io import temp_dir_name

    stale = cache / temp_dir_name(ds.path.name).replace(f"-{os.getpid()}-", "-999999999-")  # a dead writer
    stale.mkdir()
    import shutil

    shutil.rmtree(ds.path)
    prepare_subject(nsd_subject.root, PrepareConfig(), cache_root=cache)
    assert not stale.exists()


def test_concurrent_prepare_of_the_same_key_waits_then_loads(nsd_subject, cache):
    import shutil
    import threading

    ds = prepare_subject(nsd_subject.root, PrepareConfig(), cache_root=cache)
    name = ds.path.name
    saved = cache.parent / "saved"
    shutil.copytree(ds.path, saved)
    store = prep.prepared_store(cache)
    assert store.invalidate(name) and store.complete(name) is None
    result = {}
    with store.lock(name):  # another process is preparing this key
        t = threading.Thread(target=lambda: result.update(ds=prepare_subject(nsd_subject.root, PrepareConfig(),
                                                                             cache_root=cache)))
        t.start()
        t.join(1.0)
        assert t.is_alive() and not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]  # waiting
        os.rename(saved, cache / name)  # ... and publishes its result
    t.join(60)
    assert result["ds"].cache_hit and result["ds"].path == cache / name
    assert sorted(p.name for p in cache.iterdir()) == [name]


def test_missing_session_fails_before_reading(nsd_copy, cache, monkeypatch):
    fx.betas_path(nsd_copy.root, "subj01", 4).unlink()
    monkeypatch.setattr(prep, "_read_session", lambda *a: pytest.fail("read before validation"))
    with pytest.raises(DataFormatError, match=r"betas_session04\.nii\.gz: betas file not found"):
        prepare_subject(nsd_copy.root, PrepareConfig(), cache_root=cache)


def test_corrupt_last_session_fails_before_reading(nsd_copy, cache, monkeypatch):
    p = fx.betas_path(nsd_copy.root, "subj01", 4)
    p.write_bytes(p.read_bytes()[:-50])
    monkeypatch.setattr(prep, "_read_session", lambda *a: pytest.fail("read before validation"))
    with pytest.raises(DataFormatError, match=r"betas_session04\.nii\.gz: truncated or corrupt gzip"):
        prepare_subject(nsd_copy.root, PrepareConfig(), cache_root=cache)


def test_nan_fsaverage_betas_named(nsd_copy, cache):
    import nibabel as nib

    p = fx.betas_path(nsd_copy.root, "subj01", 2, space="fsaverage", hemi="rh")
    data = nsd_copy.fs_betas[2]["rh"].copy()
    sel = np.nonzero(nsd_copy.fs_labels["nsdgeneral"]["rh"] > 0)[0]
    data[sel[0], 10] = np.inf
    nib.save(nib.MGHImage(data[:, None, None, :], np.eye(4)), str(p))
    with pytest.raises(DataFormatError, match=r"rh\.betas_session02\.mgh: betas contain 1 NaN/inf"):
        prepare_subject(nsd_copy.root, PrepareConfig(space="fsaverage"), cache_root=cache)


def test_mask_grid_mismatch(nsd_copy, cache):
    import nibabel as nib

    p = nsd_copy.root / "nsddata" / "ppdata" / "subj01" / "func1pt8mm" / "roi" / "nsdgeneral.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((7, 6, 4), np.int16), np.eye(4)), str(p))
    with pytest.raises(DataFormatError, match=r"nsdgeneral\.nii\.gz: 'nsdgeneral' ROI volume grid \(7, 6, 4\) "
                                              r"does not match the betas grid \(7, 6, 5\)"):
        prepare_subject(nsd_copy.root, PrepareConfig(), cache_root=cache)


def test_73k_id_out_of_range_for_stimuli(nsd_copy, cache):
    fx.write_stimuli(nsd_copy.root, [0], n_images=100)
    with pytest.raises(DataFormatError, match=r"nsd_stimuli\.hdf5: 73k id \d+ used by subj01 is out of range for "
                                              r"'imgBrick' with 100 images"):
        prepare_subject(nsd_copy.root, PrepareConfig(), cache_root=cache)


def test_unknown_roi_label_in_file(nsd_copy, cache):
    import nibabel as nib

    p = nsd_copy.root / "nsddata" / "ppdata" / "subj01" / "func1pt8mm" / "roi" / "floc-faces.nii.gz"
    lab = nsd_copy.labels["floc-faces"].copy()
    lab[lab > 0] = 9
    img = nib.load(str(p))
    nib.save(nib.Nifti1Image(lab.astype(np.int16), img.affine), str(p))
    with pytest.raises(DataFormatError, match=r"floc-faces\.nii\.gz: labels \[9\] are not in the floc-faces label table"):
        prepare_subject(nsd_copy.root, PrepareConfig(), cache_root=cache)


@pytest.mark.parametrize("bad, match", [
    ({"subject": "subj09"}, r"'subject' must be one of .*'subj09' was provided"),
    ({"space": "fsavg"}, r"'space' must be one of .*'fsavg' was provided. Did you mean 'fsaverage'"),
    ({"rois": ["floc-face"]}, r"'rois' must be one of .*'floc-face' was provided. Did you mean 'floc-faces'"),
    ({"split": "shared100"}, r"'split' must be one of"),
    ({"mask": "brainmask", "space": "fsaverage"}, r"'brainmask' exists only for volume spaces"),
    ({"n_sessions": 9}, r"'n_sessions' must be <= 4"),
    ({"zscore": False, "zscore_exclude_test": True}, r"needs 'zscore' = true"),
])
def test_config_errors(nsd_subject, cache, bad, match):
    with pytest.raises(ConfigError, match=match):
        prepare_subject(nsd_subject.root, PrepareConfig(**bad), cache_root=cache)
    assert not cache.exists() or list_prepared(cache) == []


def test_missing_roi_family_requested(nsd_subject, cache):
    with pytest.raises(DataFormatError, match=r"floc-words\.nii\.gz: ROI file for family 'floc-words' not found"):
        prepare_subject(nsd_subject.root, PrepareConfig(rois=["floc-words"]), cache_root=cache)


def test_cli_prepare_and_info(nsd_subject, tmp_path, capsys):
    data = tmp_path / "data"
    args = ["--data-dir", str(data), "--nsd-root", str(nsd_subject.root)]
    assert cli_main(args + ["prepare", "--split", "shared1000"]) == 0
    out = capsys.readouterr().out
    assert "subj01: prepared in" in out and "samples x" in out
    assert cli_main(args + ["prepare"]) == 0
    assert "cache hit" in capsys.readouterr().out
    assert cli_main(args + ["info"]) == 0
    info = capsys.readouterr().out
    assert "split test" in info and "roi prf-visualrois/V1v" in info
    assert cli_main(args + ["prepare", "--space", "fsavg"]) == 2
    assert "'space' must be one of" in capsys.readouterr().err


def test_computed_ncsnr_is_nan_for_constant_voxels(nsd_subject, cache):
    ds = prepare_subject(nsd_subject.root, PrepareConfig(mask="none", ncsnr="compute", rois=[]), cache_root=cache)
    outside = ~nsd_subject.brainmask.reshape(-1)  # zero betas outside the brainmask (C order = np.nonzero order)
    assert ds.n_voxels == outside.size
    assert np.isnan(ds.ncsnr[outside]).all() and np.isnan(ds.noise_ceiling[outside]).all()
    assert np.isfinite(ds.ncsnr[~outside]).all()
    np.testing.assert_array_equal(np.asarray(ds.responses)[:, outside], 0.0)


def test_single_trials_with_dropped_trials(nsd_subject, cache):
    # algonauts drops late trials of images seen earlier: the single-trial rows are a subset, in time order
    ds = prepare_subject(nsd_subject.root, PrepareConfig(split="algonauts", repeats="single"), cache_root=cache)
    idx = np.argwhere(nsd_subject.labels["nsdgeneral"] > 0)
    ids = _ids(nsd_subject)
    sess = np.arange(ids.size) // TPS + 1
    late = sess > nsd_subject.n_sessions - 3
    early_ids = set(ids[~late].tolist())
    shared = _shared(nsd_subject, ids)
    keep = ~late | np.array([i not in early_ids for i in ids]) & (~shared | (np.bincount(ids)[ids] == 3))
    np.testing.assert_array_equal(ds.global_trials, np.nonzero(keep)[0])
    np.testing.assert_allclose(ds.responses, _direct_trials(nsd_subject, idx)[keep], rtol=1e-4, atol=1e-5)
    assert (ds.n_repeats == 1).all() and 0 < ds.splits["test"].size < ds.n_samples


def test_prepare_expands_user_paths(tmp_path, monkeypatch):
    """``~`` in the NSD root and cache root means the home folder, as the README's example uses it."""
    from brainenc.datasets.prepare import prepare_subject

    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(DataFormatError, match=str(tmp_path / "no_nsd_here")):
        prepare_subject("~/no_nsd_here", cache_root="~/prepared")
