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
    np.testing.assert_allclose(enc.best_alphas_, ref.best_alphas_, rtol=1e-6)
    np.testing.assert_allclose(enc.coef_, ref.coef_, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(enc.intercept_, ref.intercept_, rtol=1e-6, atol=1e-9)
    # himalaya's cv_scores_ is the best mean score per voxel
    np.testing.assert_allclose(enc.cv_scores_.max(0), ref.cv_scores_, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("shape", [(200, 20), (40, 70)], ids=["primal", "dual"])
def test_gcv_matches_sklearn_ridgecv(shape):
    X, Y = make_problem(n=shape[0], p=shape[1], v=30)
    ref = SkRidgeCV(alphas=ALPHAS, alpha_per_target=True).fit(X, Y)
    enc = RidgeEncoder(alphas=ALPHAS, cv=None, dtype="float64").fit(X, Y)
    assert enc.solver_ == "gcv"
    assert len(np.unique(enc.best_alphas_)) >= 2
    np.testing.assert_allclose(enc.best_alphas_, ref.alpha_, rtol=1e-12)
    np.testing.assert_allclose(enc.coef_, ref.coef_.T, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(enc.intercept_, ref.intercept_, rtol=1e-6, atol=1e-9)


def test_quadratic_and_predict_routes_agree():
    X, Y = make_problem(n=300, p=20, v=25)
    a = solve_ridge_cv(X, Y, ALPHAS, 5, dtype="float64", score_method="quadratic")
    b = solve_ridge_cv(X, Y, ALPHAS, 5, dtype="float64", score_method="predict")
    np.testing.assert_allclose(a["cv_scores"], b["cv_scores"], rtol=1e-9, atol=1e-10)
    np.testing.assert_array_equal(a["best_alphas"], b["best_alphas"])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_torch_backend_equals_numpy(dtype):
    pytest.importorskip("torch")
    X, Y = make_problem(v=30)
    a = RidgeEncoder(alphas=ALPHAS, dtype=dtype).fit(X, Y)
    b = RidgeEncoder(alphas=ALPHAS, dtype=dtype, backend="torch").fit(X, Y)
    tol = 1e-10 if dtype == "float64" else 2e-4
    np.testing.assert_array_equal(a.best_alphas_, b.best_alphas_)
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=tol, atol=tol * np.abs(a.coef_).max())
    np.testing.assert_allclose(a.cv_scores_, b.cv_scores_, rtol=tol, atol=tol)
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
    np.testing.assert_array_equal(full.best_alphas_, bat.best_alphas_)
    np.testing.assert_allclose(full.coef_, bat.coef_, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(full.cv_scores_, bat.cv_scores_, rtol=1e-10, atol=1e-12)


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
