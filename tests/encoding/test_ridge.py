"""RidgeEncoder / solve_ridge_* against scikit-learn and himalaya on small synthetic problems."""
import warnings

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import Ridge
from sklearn.linear_model import RidgeCV as SkRidgeCV
from sklearn.metrics import r2_score as sk_r2
from sklearn.model_selection import KFold

from brainenc.encoding._ridge_solvers import check_cv_splits, solve_ridge, solve_ridge_cv
from brainenc.encoding.ridge import DEFAULT_ALPHAS, RidgeEncoder
from brainenc.exceptions import ConfigError, DataFormatError, NotFittedError

ALPHAS = np.logspace(-2, 5, 8)


def make_problem(n=240, p=30, v=40, seed=0, offset=True):
    """Correlated features with offsets, voxel-varying SNR (so the chosen alphas spread)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p)) @ (rng.standard_normal((p, p)) * np.arange(1, p + 1) ** -0.7)
    if offset:
        X = X + rng.standard_normal(p) * 2
    snr = np.linspace(0.02, 3.0, v)
    S = X @ rng.standard_normal((p, v))
    Y = S / S.std(0) * np.sqrt(snr) + rng.standard_normal((n, v))
    if offset:
        Y = Y + rng.standard_normal(v) * 5
    return X, Y


def assert_same_choices(scores, got, want, slack, candidates=ALPHAS):
    """Per-target alpha choices ``got`` (ours, the argmax of ``scores``) and ``want`` agree.

    ``scores`` (n_alphas, n_targets) are the CV scores behind ``got``; ``slack`` bounds how far the
    scores behind ``want`` may differ from them (measured when both are at hand, else the tolerance
    the two implementations' scores are held to). ``want`` may then be any alpha within 2 * slack of
    the best score (with the solvers' larger-alpha tie-break), and nothing else: where one alpha
    beats every other by more than 2 * slack, which is every target of the problems here (gaps
    >= 8e-5 against rounding differences <= 2e-7), the choices must be identical. Fails if more than
    10 % of targets are such near-ties (the test would lose its teeth). Returns the targets whose
    choices agree.
    """
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    s = np.asarray(scores) + (np.log(candidates) * 1e-10)[:, None]
    assert np.array_equal(got, candidates[np.argmax(s, axis=0)])
    slack = np.broadcast_to(slack, got.shape)
    near = s >= s.max(0) - 2 * slack  # candidates a computation whose scores are within slack may pick
    iw = np.abs(np.log(candidates)[:, None] - np.log(want)[None, :]).argmin(0)
    np.testing.assert_allclose(candidates[iw], want, rtol=1e-12)  # want is one of the candidates
    bad = np.flatnonzero(~near[iw, np.arange(len(want))])
    assert bad.size == 0, f"targets {bad}: alpha {want[bad]} is not within 2*slack of the best score (ours {got[bad]})"
    assert np.mean(near.sum(0) > 1) <= 0.1, "too many near-ties for a meaningful comparison"
    return np.isclose(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("shape", [(200, 25), (30, 60)], ids=["primal", "dual"])
def test_fixed_alpha_equals_sklearn_ridge(fit_intercept, shape):
    X, Y = make_problem(n=shape[0], p=shape[1], v=12, offset=fit_intercept)
    for alpha in (0.3, 50.0):
        enc = RidgeEncoder(alphas=[alpha], cv=3, fit_intercept=fit_intercept, dtype="float64").fit(X, Y)
        ref = Ridge(alpha=alpha, fit_intercept=fit_intercept, solver="svd").fit(X, Y)
        np.testing.assert_allclose(enc.coef_, ref.coef_.T, rtol=1e-6, atol=1e-6 * np.abs(ref.coef_).max())
        np.testing.assert_allclose(enc.intercept_, np.broadcast_to(ref.intercept_, (12,)), rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(enc.predict(X), ref.predict(X), rtol=1e-6, atol=1e-8)


def test_solve_ridge_per_target_alpha():
    X, Y = make_problem(v=5)
    alphas = np.array([0.1, 1.0, 10.0, 100.0, 1000.0])
    coef, intercept = solve_ridge(X, Y, alphas, dtype="float64")
    for j, a in enumerate(alphas):
        ref = Ridge(alpha=a).fit(X, Y[:, j])
        np.testing.assert_allclose(coef[:, j], ref.coef_, rtol=1e-7, atol=1e-10)
        np.testing.assert_allclose(intercept[j], ref.intercept_, rtol=1e-7)


@pytest.mark.parametrize("scoring", ["neg_mse", "r2"])
@pytest.mark.parametrize("shape", [(240, 30), (60, 80)], ids=["primal", "dual"])
def test_same_alphas_as_himalaya_ridgecv(scoring, shape):
    hr = pytest.importorskip("himalaya.ridge")
    from himalaya.backend import set_backend
    from himalaya.scoring import r2_score as h_r2

    set_backend("numpy")
    X, Y = make_problem(n=shape[0], p=shape[1], v=40)
    solver_params = {"score_func": h_r2} if scoring == "r2" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = hr.RidgeCV(alphas=ALPHAS, cv=KFold(5), fit_intercept=True, solver_params=solver_params).fit(X, Y)
    enc = RidgeEncoder(alphas=ALPHAS, cv=KFold(5), scoring=scoring, dtype="float64").fit(X, Y)
    # the test must not pass trivially: alphas differ across voxels
    assert len(np.unique(enc.best_alphas_)) >= 3
    # himalaya's cv_scores_ is the best mean score per voxel; its per-alpha scores are not exposed,
    # so its choice may differ from ours only within the score tolerance (1e-9 + 1e-6 |score|)
    np.testing.assert_allclose(enc.cv_scores_.max(0), ref.cv_scores_.ravel(), rtol=1e-6, atol=1e-9)
    same = assert_same_choices(enc.cv_scores_, enc.best_alphas_, ref.best_alphas_,
                               1e-9 + 1e-6 * np.abs(enc.cv_scores_.max(0)))
    np.testing.assert_allclose(enc.coef_[:, same], ref.coef_[:, same], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(enc.intercept_[same], ref.intercept_[same], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("shape", [(200, 20), (40, 70)], ids=["primal", "dual"])
def test_gcv_matches_sklearn_ridgecv(shape):
    X, Y = make_problem(n=shape[0], p=shape[1], v=30)
    ref = SkRidgeCV(alphas=ALPHAS, alpha_per_target=True, store_cv_results=True).fit(X, Y)
    enc = RidgeEncoder(alphas=ALPHAS, cv=None, dtype="float64").fit(X, Y)
    assert enc.solver_ == "gcv"
    assert len(np.unique(enc.best_alphas_)) >= 2
    # sklearn's LOO squared errors as our (r2) scores: 1 - SSE_loo / SS_tot; equal up to the
    # conditioning of X (measured 1e-15 primal, 6e-12 dual)
    ref_scores = 1.0 - ref.cv_results_.sum(0).T / ((Y - Y.mean(0)) ** 2).sum(0)
    np.testing.assert_allclose(enc.cv_scores_, ref_scores, rtol=1e-9, atol=1e-10)
    # slack: the measured score difference, plus 1e-9 for the tie-break (sklearn breaks exact ties
    # towards the smaller alpha, we towards the larger, by 1e-10 per unit of log(alpha))
    same = assert_same_choices(enc.cv_scores_, enc.best_alphas_, ref.alpha_,
                               np.abs(enc.cv_scores_ - ref_scores).max(0) + 1e-9)
    np.testing.assert_allclose(enc.coef_[:, same], ref.coef_.T[:, same], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(enc.intercept_[same], ref.intercept_[same], rtol=1e-6, atol=1e-9)


def test_quadratic_and_predict_routes_agree():
    X, Y = make_problem(n=300, p=20, v=25)
    a = solve_ridge_cv(X, Y, ALPHAS, 5, dtype="float64", score_method="quadratic")
    b = solve_ridge_cv(X, Y, ALPHAS, 5, dtype="float64", score_method="predict")
    np.testing.assert_allclose(a["cv_scores"], b["cv_scores"], rtol=1e-9, atol=1e-10)
    slack = np.abs(a["cv_scores"] - b["cv_scores"]).max(0)
    assert_same_choices(a["cv_scores"], a["best_alphas"], b["best_alphas"], slack)


def test_choice_comparison_tolerates_only_rounding_ties():
    scores = np.tile(np.linspace(-1.0, 0.0, len(ALPHAS))[:, None], (1, 20))  # best: the largest alpha
    scores[6, 0] = scores[7, 0] - 1e-13  # target 0: a rounding-level tie between the two largest alphas
    got = ALPHAS[np.argmax(scores + (np.log(ALPHAS) * 1e-10)[:, None], axis=0)]
    assert assert_same_choices(scores, got, got, 1e-12).all()
    other = got.copy()
    other[0] = ALPHAS[6]
    # the tie-break favours alpha 7 by 1e-10 * log(10) = 2.3e-10: within 2 * slack at slack 1e-9...
    assert not assert_same_choices(scores, got, other, 1e-9)[0]
    with pytest.raises(AssertionError, match="not within 2"):
        assert_same_choices(scores, got, other, 1e-11)  # ...but not when the scores agree to 1e-11
    other = got.copy()
    other[5] = ALPHAS[6]  # a real difference (gap 0.14)
    with pytest.raises(AssertionError, match=r"targets \[5\]"):
        assert_same_choices(scores, got, other, 1e-12)
    scores[6, :5] = scores[7, :5]
    with pytest.raises(AssertionError, match="near-ties"):
        assert_same_choices(scores, got, got, 1e-9)  # 5 of 20 targets tied


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_torch_backend_equals_numpy(dtype):
    pytest.importorskip("torch")
    X, Y = make_problem(v=30)
    a = RidgeEncoder(alphas=ALPHAS, dtype=dtype).fit(X, Y)
    b = RidgeEncoder(alphas=ALPHAS, dtype=dtype, backend="torch").fit(X, Y)
    tol = 1e-10 if dtype == "float64" else 2e-4
    np.testing.assert_allclose(a.cv_scores_, b.cv_scores_, rtol=tol, atol=tol)
    # same choices except where the two backends' own score difference could flip a near-tie
    same = assert_same_choices(a.cv_scores_, a.best_alphas_, b.best_alphas_,
                               np.abs(a.cv_scores_ - b.cv_scores_).max(0))
    np.testing.assert_allclose(a.coef_[:, same], b.coef_[:, same], rtol=tol, atol=tol * np.abs(a.coef_).max())
    assert b.coef_.dtype == np.dtype(dtype)


@pytest.mark.parametrize("solver_cv", [5, None], ids=["kfold", "gcv"])
def test_target_batching_identical(solver_cv, tmp_path):
    X, Y = make_problem(v=23)
    full = RidgeEncoder(alphas=ALPHAS, cv=solver_cv, dtype="float64").fit(X, Y)
    # a read-only memmap exercises the out-of-core path
    path = tmp_path / "Y.npy"
    np.save(path, Y)
    Ym = np.load(path, mmap_mode="r")
    bat = RidgeEncoder(alphas=ALPHAS, cv=solver_cv, dtype="float64", target_batch_size=5).fit(X, Ym)
    # batches of 5 targets run other BLAS shapes (other summation orders): equal up to rounding
    np.testing.assert_allclose(full.cv_scores_, bat.cv_scores_, rtol=1e-10, atol=1e-12)
    same = assert_same_choices(full.cv_scores_, full.best_alphas_, bat.best_alphas_,
                               np.abs(full.cv_scores_ - bat.cv_scores_).max(0))
    np.testing.assert_allclose(full.coef_[:, same], bat.coef_[:, same], rtol=1e-10, atol=1e-12)


def test_float32_close_to_float64():
    X, Y = make_problem(n=400, p=40, v=30)
    a = RidgeEncoder(alphas=ALPHAS, dtype="float64").fit(X, Y)
    b = RidgeEncoder(alphas=ALPHAS, dtype="float32").fit(X, Y)
    assert b.coef_.dtype == np.float32
    np.testing.assert_allclose(b.cv_scores_, a.cv_scores_, atol=1e-4)
    agree = np.isclose(a.best_alphas_, b.best_alphas_)
    assert agree.mean() >= 0.9
    # where float32 picks another alpha it is a near-tie
    idx = np.flatnonzero(~agree)
    assert np.all(a.cv_scores_.max(0)[idx] - a.cv_scores_[np.searchsorted(ALPHAS, b.best_alphas_[idx]), idx] < 1e-4)
    same = np.flatnonzero(agree)
    np.testing.assert_allclose(b.coef_[:, same], a.coef_[:, same], rtol=1e-3, atol=1e-4 * np.abs(a.coef_).max())


def test_score_is_per_voxel_r2():
    X, Y = make_problem(v=15)
    Xt, Yt = make_problem(v=15, seed=1)
    enc = RidgeEncoder(alphas=ALPHAS).fit(X, Y)
    s = enc.score(Xt, Yt)
    assert s.shape == (15,)
    np.testing.assert_allclose(s, sk_r2(Yt, enc.predict(Xt), multioutput="raw_values"), rtol=1e-6, atol=1e-7)


def test_cv_forms_and_shared_alpha():
    X, Y = make_problem(n=200, v=20)
    pairs = list(KFold(4).split(X))
    a = RidgeEncoder(alphas=ALPHAS, cv=4, dtype="float64").fit(X, Y)
    b = RidgeEncoder(alphas=ALPHAS, cv=KFold(4), dtype="float64").fit(X, Y)
    c = RidgeEncoder(alphas=ALPHAS, cv=pairs, dtype="float64").fit(X, Y)
    np.testing.assert_array_equal(a.cv_scores_, b.cv_scores_)
    np.testing.assert_array_equal(a.cv_scores_, c.cv_scores_)
    # an int means contiguous folds (no shuffling)
    splits = check_cv_splits(4, 200)
    np.testing.assert_array_equal(splits[0][1], np.arange(50))
    shared = RidgeEncoder(alphas=ALPHAS, cv=4, dtype="float64", alpha_per_target=False).fit(X, Y)
    assert len(np.unique(shared.best_alphas_)) == 1
    assert shared.best_alphas_[0] == ALPHAS[np.argmax(a.cv_scores_.mean(1))]


def test_sklearn_api_and_1d_target():
    X, Y = make_problem(v=3)
    enc = RidgeEncoder(alphas=[1.0, 10.0], cv=3)
    assert enc.get_params()["cv"] == 3
    enc2 = clone(enc).set_params(backend="numpy", target_batch_size=2, alphas=None)
    assert enc2.target_batch_size == 2 and enc.target_batch_size is None
    enc2.fit(X, Y)
    np.testing.assert_array_equal(enc2.alphas_, DEFAULT_ALPHAS)
    one = RidgeEncoder(alphas=[1.0, 10.0], cv=3, dtype="float64").fit(X, Y[:, 0])
    assert one.coef_.shape == (X.shape[1],) and one.predict(X).shape == (X.shape[0],)
    np.testing.assert_allclose(one.coef_, RidgeEncoder(alphas=[1.0, 10.0], cv=3, dtype="float64").fit(X, Y).coef_[:, 0])


def test_fit_validation_errors():
    X, Y = make_problem(v=3)
    enc = RidgeEncoder(alphas=[1.0], cv=3)
    with pytest.raises(NotFittedError, match="not fitted"):
        enc.predict(X)
    with pytest.raises(DataFormatError, match="'X' and 'Y' must have the same number of samples"):
        enc.fit(X, Y[:-1])
    Xn = X.copy()
    Xn[3, 2] = np.nan
    with pytest.raises(DataFormatError, match="'X' contains 1 NaN"):
        enc.fit(Xn, Y)
    with pytest.raises(DataFormatError, match="'X' must have 2 dimensions"):
        enc.fit(X[:, 0], Y)
    with pytest.raises(ConfigError, match="'backend' must be one of"):
        RidgeEncoder(backend="jax").fit(X, Y)
    with pytest.raises(ConfigError, match="'alphas' must all be finite and > 0"):
        RidgeEncoder(alphas=[0.0, 1.0]).fit(X, Y)
    with pytest.raises(ConfigError, match="'cv' must be an int"):
        RidgeEncoder(cv=1).fit(X, Y)
    enc.fit(X, Y)
    with pytest.raises(DataFormatError, match="fitted with 30"):
        enc.predict(X[:, :5])


def test_torch_backend_keeps_the_thread_count():
    """The single-threaded eigendecomposition must hand torch its thread count back."""
    import torch

    from brainenc.encoding import RidgeEncoder

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rng = np.random.default_rng(0)
        X, Y = rng.standard_normal((60, 8)), rng.standard_normal((60, 3))
        RidgeEncoder(alphas=[1.0, 10.0], cv=3, backend="torch").fit(X, Y)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
