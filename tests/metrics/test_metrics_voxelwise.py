"""brainenc.metrics against scipy / scikit-learn and against a simulated noise ceiling."""
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import pearsonr
from sklearn.metrics import r2_score as sk_r2

from brainenc.exceptions import ConfigError, DataFormatError
from brainenc.metrics import (
    METRICS,
    noise_normalized,
    pearson_r,
    r2_score,
    roi_aggregate,
    split_scores,
)


@pytest.fixture
def yy():
    rng = np.random.default_rng(0)
    yt = rng.standard_normal((50, 12)).astype(np.float32) * 3 + 10
    yp = (yt * np.linspace(-1, 1, 12) + rng.standard_normal((50, 12))).astype(np.float32)
    return yt, yp


def test_pearson_r_matches_scipy(yy):
    yt, yp = yy
    r = pearson_r(yt, yp)
    ref = [pearsonr(yt[:, j].astype(np.float64), yp[:, j].astype(np.float64))[0] for j in range(12)]
    assert r.shape == (12,)
    np.testing.assert_allclose(r, ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(pearson_r(yt.T, yp.T, axis=1), r, rtol=1e-12)
    assert pearson_r(yt[:, 0], yp[:, 0]) == pytest.approx(ref[0], rel=1e-6)
    const = yt.copy()
    const[:, 3] = 1.0
    assert np.isnan(pearson_r(const, yp)[3]) and np.isfinite(pearson_r(const, yp)[2])


def test_r2_matches_sklearn(yy):
    yt, yp = yy
    np.testing.assert_allclose(r2_score(yt, yp), sk_r2(yt, yp, multioutput="raw_values"), rtol=1e-5, atol=1e-6)
    const = yt.astype(np.float64).copy()
    const[:, 0] = 2.0
    pred = yp.astype(np.float64).copy()
    pred[:, 1] = const[:, 1]
    np.testing.assert_allclose(r2_score(const, pred), sk_r2(const, pred, multioutput="raw_values"), rtol=1e-10)
    with pytest.raises(DataFormatError, match="same shape"):
        r2_score(yt, yp[:-1])


def test_noise_normalized_options():
    r = np.array([0.5, -0.4, 0.3, 0.9, 0.2])
    nc = np.array([0.5, 0.5, 0.0, 0.5, 0.02])
    out = noise_normalized(r, nc)
    np.testing.assert_allclose(out, [0.25 / 0.5, 0.0, np.nan, 1.0, 1.0], equal_nan=True)  # capped at 1
    out = noise_normalized(r, nc, clip_negative=False, cap=None)
    np.testing.assert_allclose(out, [0.5, -0.32, np.nan, 1.62, 2.0], equal_nan=True)
    out = noise_normalized(r, nc, nc_floor=0.1, below_floor="floor", cap=None)
    np.testing.assert_allclose(out, [0.5, 0.0, 0.09 / 0.1, 1.62, 0.04 / 0.1])
    out = noise_normalized(r, nc, nc_floor=0.1)  # below the floor -> NaN
    assert np.isnan(out[[2, 4]]).all()
    r2 = np.array([0.2, -0.1, 0.6])
    np.testing.assert_allclose(noise_normalized(r2, 0.4, kind="r2"), [0.5, 0.0, 1.0])
    with pytest.raises(DataFormatError, match="fraction in \\[0, 1\\]"):
        noise_normalized(r, nc * 100)
    with pytest.raises(ConfigError, match="'nc_floor' must be > 0"):
        noise_normalized(r, nc, below_floor="floor")
    with pytest.raises(ConfigError, match="'kind' must be one of"):
        noise_normalized(r, nc, kind="R2")


def test_ncsnr_noise_ceiling_matches_simulation():
    from brainenc.datasets.noise_ceiling import noise_ceiling

    # signal s (var sig2) + noise (var 1) per trial, averaged over k trials: the best possible R²
    # of the average is sig2 / (sig2 + 1/k), which is the formula with ncsnr = sqrt(sig2).
    rng = np.random.default_rng(1)
    n_img, k = 20000, 3
    sig = np.array([0.3, 1.0, 2.0])
    s = rng.standard_normal((n_img, 3)) * sig
    avg = s + rng.standard_normal((n_img, k, 3)).mean(1)
    best_r2 = r2_score(avg, s)
    np.testing.assert_allclose(noise_ceiling(sig, k), best_r2, atol=0.015)


def test_roi_aggregate_mean_median_nan():
    v = np.array([0.1, 0.2, np.nan, 0.4, 0.9, 0.3])
    masks = {"V1": np.array([1, 1, 1, 0, 0, 0], bool), "FFA": np.array([0, 0, 0, 1, 1, 1], bool),
             "empty": np.zeros(6, bool)}
    m = roi_aggregate(v, masks)
    assert list(m) == ["V1", "FFA", "empty"]
    assert m["V1"] == {"value": pytest.approx(0.15), "n_voxels": 2}
    assert m["FFA"]["value"] == pytest.approx(np.mean([0.4, 0.9, 0.3]))
    assert np.isnan(m["empty"]["value"]) and m["empty"]["n_voxels"] == 0
    assert roi_aggregate(v, masks, stat="median")["FFA"]["value"] == pytest.approx(0.4)
    with pytest.raises(DataFormatError, match="mask 'bad' must be a bool array"):
        roi_aggregate(v, {"bad": np.ones(5, bool)})


def test_split_scores_halves(yy):
    yt, yp = yy
    s = split_scores(yt, yp, 2, metric="r")
    assert s.shape == (2, 12)
    np.testing.assert_allclose(s[0], pearson_r(yt[:25], yp[:25]))
    np.testing.assert_allclose(s[1], pearson_r(yt[25:], yp[25:]))
    idx = [np.arange(0, 50, 2), np.arange(1, 50, 2)]
    s2 = split_scores(yt, yp, idx, metric="r2")
    np.testing.assert_allclose(s2[1], sk_r2(yt[1::2], yp[1::2], multioutput="raw_values"), rtol=1e-5, atol=1e-6)


def test_registry_and_no_torch_import():
    assert METRICS.get("r") is pearson_r and METRICS.get("r2") is r2_score
    with pytest.raises(ConfigError, match="Did you mean"):
        METRICS.get("pearson")
    code = "import sys, brainenc.metrics; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
