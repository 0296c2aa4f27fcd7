"""BandedRidgeEncoder against himalaya's BandedRidgeCV (random-search solver) on the same candidates."""
import warnings

import numpy as np
import pytest
from sklearn.model_selection import KFold

from brainenc.encoding.banded import BandedRidgeEncoder, make_band_gammas
from brainenc.exceptions import ConfigError, DataFormatError

ALPHAS = np.logspace(-2, 5, 8)


def make_bands(n=240, p1=12, p2=20, v=40, seed=0):
    """Voxels 0..v/2 are driven by band 1 only, the rest by band 2 only."""
    rng = np.random.default_rng(seed)
    X1 = rng.standard_normal((n, p1)) + 1.0
    X2 = rng.standard_normal((n, p2)) - 2.0
    h = v // 2
    Y = np.empty((n, v))
    Y[:, :h] = X1 @ rng.standard_normal((p1, h))
    Y[:, h:] = X2 @ rng.standard_normal((p2, v - h))
    Y = Y / Y.std(0) + rng.standard_normal((n, v)) * 0.7 + 3.0
    return X1, X2, Y


def test_make_band_gammas_matches_himalaya():
    kr = pytest.importorskip("himalaya.kernel_ridge")
    g = make_band_gammas(11, 3, concentration=[0.1, 1.0], random_state=4)
    ref = kr.generate_dirichlet_samples(11, 3, concentration=[0.1, 1.0], random_state=4)
    np.testing.assert_allclose(g[1:], ref[1:])
    np.testing.assert_allclose(g[0], 1 / 3)
    np.testing.assert_allclose(g.sum(1), 1.0)


def test_banded_matches_himalaya_bandedridgecv():
    hr = pytest.importorskip("himalaya.ridge")
    from himalaya.backend import set_backend

    set_backend("numpy")
    X1, X2, Y = make_bands()
    gammas = make_band_gammas(10, 2, random_state=0)
    enc = BandedRidgeEncoder(alphas=ALPHAS, gammas=gammas, cv=KFold(5), scoring="neg_mse", dtype="float64")
    enc.fit([X1, X2], Y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = hr.BandedRidgeCV(groups="input", cv=KFold(5), fit_intercept=True,
                               solver_params=dict(n_iter=gammas, alphas=ALPHAS, progress_bar=False)).fit([X1, X2], Y)
    ref_g = np.exp(ref.deltas_)
    ref_g /= ref_g.sum(0)
    # Tolerance: same candidates and folds in float64 -> the same per-candidate scores up to
    # rounding (measured max difference 1.2e-9: himalaya sums in another order), so identical
    # choices for every voxel whose best candidate leads the next by more than twice that (all of
    # them here: the smallest lead is 5e-4, and 1.1e-5 between alphas within a candidate; a
    # rounding-level near-tie could go either way),
    # predictions equal to 1e-6 relative.
    np.testing.assert_allclose(enc.cv_scores_, ref.cv_scores_, rtol=1e-6, atol=1e-9)
    slack = np.abs(enc.cv_scores_ - ref.cv_scores_).max(0) + np.finfo(np.float64).eps  # + the eps rule
    near = enc.cv_scores_ >= enc.cv_scores_.max(0) - 2 * slack
    assert np.mean(near.sum(0) > 1) <= 0.1, "too many near-ties for a meaningful comparison"
    ref_idx = np.abs(gammas[:, None, :] - ref_g.T[None, :, :]).max(-1).argmin(0)  # ref's candidate per voxel
    np.testing.assert_allclose(gammas[ref_idx].T, ref_g, atol=1e-8)
    assert near[ref_idx, np.arange(Y.shape[1])].all()
    same = np.abs(enc.best_gammas_ - ref_g).max(0) <= 1e-8
    assert np.all(same | (near.sum(0) > 1))
    np.testing.assert_allclose(enc.best_alphas_[same], ref.best_alphas_[same], rtol=1e-6)
    np.testing.assert_allclose(enc.deltas_[:, same], ref.deltas_[:, same], rtol=1e-6, atol=1e-6)
    pred, ref_pred = enc.predict([X1, X2]), ref.predict([X1, X2])
    np.testing.assert_allclose(pred[:, same], ref_pred[:, same], rtol=1e-6, atol=1e-6 * np.abs(ref_pred).max())


def test_banded_recovers_band_ratio_and_input_forms():
    X1, X2, Y = make_bands(v=20)
    grid = np.array([[0.5, 0.5], [0.98, 0.02], [0.02, 0.98]])
    enc = BandedRidgeEncoder(alphas=ALPHAS, gammas=grid, cv=4).fit([X1, X2], Y)
    # band-1 voxels favour band 1 (small band-1 penalty), band-2 voxels band 2
    assert np.mean(enc.best_gammas_[0, :10] > 0.5) >= 0.9
    assert np.mean(enc.best_gammas_[1, 10:] > 0.5) >= 0.9
    np.testing.assert_allclose(enc.band_alphas_, enc.best_alphas_ / enc.best_gammas_)
    assert enc.coef_.shape == (32, 20) and enc.score([X1, X2], Y).shape == (20,)
    flat = BandedRidgeEncoder(alphas=ALPHAS, gammas=grid, cv=4, band_sizes=(12, 20)).fit(np.hstack([X1, X2]), Y)
    np.testing.assert_array_equal(flat.best_gammas_, enc.best_gammas_)
    np.testing.assert_allclose(flat.predict(np.hstack([X1, X2])), enc.predict([X1, X2]), rtol=1e-5, atol=1e-5)


def test_banded_validation():
    X1, X2, Y = make_bands(v=4)
    with pytest.raises(ConfigError, match="'band_sizes' is required"):
        BandedRidgeEncoder().fit(np.hstack([X1, X2]), Y)
    with pytest.raises(DataFormatError, match="must be positive and sum to"):
        BandedRidgeEncoder(band_sizes=(5, 5)).fit(np.hstack([X1, X2]), Y)
    with pytest.raises(ConfigError, match="'gammas' must be a non-negative array of shape"):
        BandedRidgeEncoder(gammas=[[1.0, 0.0, 0.0]]).fit([X1, X2], Y)
    with pytest.raises(DataFormatError, match="same number of samples"):
        BandedRidgeEncoder().fit([X1, X2[:-1]], Y)
