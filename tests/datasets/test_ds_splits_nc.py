"""Splits against direct definitions; ncsnr / noise ceiling against direct computations."""
import numpy as np
import pytest
from scipy import stats

import nsd_fixtures as fx
from brainenc.datasets import layout
from brainenc.datasets.noise_ceiling import (ncsnr_from_repeats, ncsnr_from_variance, noise_ceiling,
                                             noise_ceiling_percent, repeat_norm)
from brainenc.datasets.nsd import load_expdesign, trial_table
from brainenc.datasets.splits import make_split, shared515_images
from brainenc.exceptions import DataFormatError


@pytest.fixture(scope="module")
def random_design(tmp_path_factory):
    """A design with no block structure (each slot's 3 trials anywhere in 40 sessions)."""
    rng = np.random.default_rng(11)
    d = fx.make_design(seed=11)
    d["masterordering"] = rng.permutation(np.repeat(np.arange(1, 10001), 3))[None, :].astype(float)
    root = tmp_path_factory.mktemp("rdesign")
    fx.write_expdesign(root, d)
    return d, load_expdesign(root)


def test_shared1000_split(random_design):
    d, exp = random_design
    tab = trial_table(exp, "subj03", 32)
    sp = make_split("shared1000", tab)
    shared_ids = set((d["sharedix"][0] - 1).astype(int).tolist())
    direct = np.array([fx.lookup(d, 3, t) in shared_ids for t in range(tab.n_trials)])
    np.testing.assert_array_equal(sp["test"], direct)
    np.testing.assert_array_equal(sp["train"], ~direct)


def test_shared515_direct(random_design):
    d, exp = random_design
    got = shared515_images(exp, layout.N_SESSIONS)
    mo = d["masterordering"][0].astype(int)
    expected = []
    for k in range(1, 1001):  # 1-based shared slots
        if all((mo[: 750 * n] == k).sum() == 3 for n in layout.N_SESSIONS.values()):
            expected.append(int(d["subjectim"][0, k - 1]) - 1)
    np.testing.assert_array_equal(got, np.sort(expected))
    assert 0 < got.size < 1000
    tab = trial_table(exp, "subj01", 40)
    sp = make_split("shared515", tab, expdesign=exp, sessions_per_subject=layout.N_SESSIONS)
    assert np.array_equal(np.unique(tab.image_id[sp["test"]]), got)
    assert not (sp["train"] & sp["test"]).any() and not (sp["val"] & sp["test"]).any()
    assert (sp["train"] | sp["test"] | sp["val"]).all()


@pytest.mark.parametrize("subject", ["subj01", "subj04"])
def test_algonauts_split_direct(random_design, subject):
    d, exp = random_design
    n = layout.N_SESSIONS[subject]
    s = int(subject[4:])
    tab = trial_table(exp, subject, n)
    sp = make_split("algonauts", tab)
    ids = np.array([fx.lookup(d, s, t) for t in range(tab.n_trials)])
    sess = np.arange(tab.n_trials) // 750 + 1
    shared_ids = set((d["sharedix"][0] - 1).astype(int).tolist())
    early = set(ids[sess <= n - 3].tolist())
    test = np.zeros(tab.n_trials, bool)
    for t, i in enumerate(ids):
        if i in early:
            continue
        if i in shared_ids and not (s in (1, 2, 5, 7) and (ids == i).sum() == 3):
            continue
        test[t] = True
    np.testing.assert_array_equal(sp["test"], test)
    np.testing.assert_array_equal(sp["train"], sess <= n - 3)


def test_nsd37_split(random_design):
    d, exp = random_design
    tab = trial_table(exp, "subj02", 40)
    sp = make_split("nsd37", tab)
    assert not (sp["train"] | sp["test"])[37 * 750:].any()
    assert (sp["train"] | sp["test"])[: 37 * 750].all()
    np.testing.assert_array_equal(sp["test"][: 37 * 750], tab.slot[: 37 * 750] < 1000)


def test_algonauts_needs_four_sessions(random_design):
    _, exp = random_design
    with pytest.raises(DataFormatError, match="at least 4 sessions"):
        make_split("algonauts", trial_table(exp, "subj01", 3))


# ------------------------------------------------------------------------------------------ noise ceiling
def test_noise_ceiling_formula_direct():
    rng = np.random.default_rng(0)
    ncsnr = rng.uniform(0, 2, 50)
    for n in (1, 3):
        np.testing.assert_allclose(noise_ceiling(ncsnr, n), ncsnr**2 / (ncsnr**2 + 1 / n))
    A, B, C = 40, 7, 3
    counts = np.r_[np.full(A, 3), np.full(B, 2), np.full(C, 1)]
    norm = (A / 3 + B / 2 + C / 1) / (A + B + C)
    assert repeat_norm(counts) == pytest.approx(norm)
    np.testing.assert_allclose(noise_ceiling(ncsnr, counts), ncsnr**2 / (ncsnr**2 + norm))
    np.testing.assert_allclose(noise_ceiling_percent(ncsnr, 3), 100 * ncsnr**2 / (ncsnr**2 + 1 / 3))
    out = noise_ceiling(np.array([np.nan, np.inf, 0.0]), 3)
    assert np.isnan(out[0]) and out[1] == 1.0 and out[2] == 0.0
    with pytest.raises(DataFormatError):
        repeat_norm(np.array([3, 0]))


def test_ncsnr_from_repeats_direct():
    rng = np.random.default_rng(1)
    n_img, n_vox = 60, 9
    ids = np.r_[np.repeat(np.arange(n_img), 3), [100, 100, 101]]  # 2 images not shown exactly 3x
    rng.shuffle(ids)
    sessions = np.arange(ids.size) // 61 + 1
    x = rng.standard_normal((ids.size, n_vox)) + rng.standard_normal((200, n_vox))[ids] * 0.8 + sessions[:, None]
    got = ncsnr_from_repeats(x, ids, sessions)
    z = np.concatenate([stats.zscore(x[sessions == s], axis=0, ddof=1) for s in np.unique(sessions)])
    var = np.array([np.var(z[ids == i], axis=0, ddof=1) for i in range(n_img)])
    v = np.sqrt(var.mean(0))
    np.testing.assert_allclose(got, np.sqrt(np.maximum(0, 1 - v**2)) / v, rtol=1e-10)
    np.testing.assert_allclose(ncsnr_from_variance(np.array([0.25, 1.5])), [np.sqrt(0.75) / 0.5, 0.0])


def test_ncsnr_recovers_signal_to_noise():
    rng = np.random.default_rng(2)
    n_img, snr = 3000, np.array([0.25, 0.5, 1.0, 2.0])
    ids = np.repeat(np.arange(n_img), 3)
    x = rng.standard_normal((n_img, 4))[ids] * snr + rng.standard_normal((ids.size, 4))
    got = ncsnr_from_repeats(x, ids, np.ones(ids.size, int))
    np.testing.assert_allclose(got, snr, rtol=0.1)


def test_ncsnr_needs_triplets():
    with pytest.raises(DataFormatError, match="exactly 3 times"):
        ncsnr_from_repeats(np.zeros((4, 2)), np.array([0, 0, 1, 1]))
