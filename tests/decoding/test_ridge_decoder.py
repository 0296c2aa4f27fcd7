import numpy as np
import pytest
from sklearn.linear_model import RidgeCV
from sklearn.preprocessing import StandardScaler

import brainenc
from brainenc.decoding.ridge import RidgeDecoder, flatten_targets, unflatten_targets
from brainenc.exceptions import ConfigError, DataFormatError


def _data(n=150, v=40, seed=0):
    rng = np.random.default_rng(seed)
    V = rng.standard_normal((n, v))
    T = {
        "emb": V[:, :6] @ rng.standard_normal((6, 5)) + 0.3 * rng.standard_normal((n, 5)),
        "map": (V[:, 6:10] @ rng.standard_normal((4, 18))).reshape(n, 2, 3, 3) * 10.0 + 5.0,
    }
    return V, T


def test_matches_sklearn_ridgecv_per_target():
    V, T = _data()
    alphas = [0.1, 1.0, 10.0, 100.0, 1000.0]
    dec = RidgeDecoder(alphas=alphas, dtype="float64").fit(V[:120], {k: v[:120] for k, v in T.items()})
    Y, _, _ = flatten_targets({k: v[:120] for k, v in T.items()})
    xs, ys = StandardScaler().fit(V[:120]), StandardScaler().fit(Y)
    ref = RidgeCV(alphas=alphas, alpha_per_target=True).fit(xs.transform(V[:120]), ys.transform(Y))
    want = ys.inverse_transform(ref.predict(xs.transform(V[120:])))
    got = dec.predict_flat(V[120:])
    np.testing.assert_allclose(dec.best_alphas_, ref.alpha_)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_shapes_names_and_scores():
    V, T = _data()
    dec = RidgeDecoder(alphas=[1, 10, 100]).fit(V[:120], {k: v[:120] for k, v in T.items()})
    pred = dec.predict(V[120:])
    assert set(pred) == {"emb", "map"} and pred["map"].shape == (30, 2, 3, 3)
    s = dec.score(V[120:], {k: v[120:] for k, v in T.items()})
    assert s["emb"] > 0.8 and s["map"] > 0.9
    # shuffled voxels: the same decoder carries no information about other images
    perm = np.random.default_rng(1).permutation(30)
    s_shuf = dec.score(V[120:][perm], {k: v[120:] for k, v in T.items()})
    assert s_shuf["emb"] < 0.3 and s_shuf["map"] < 0.3
    # a bare array stays bare
    bare = RidgeDecoder(alphas=[1, 10]).fit(V[:120], T["emb"][:120])
    assert bare.predict(V[120:]).shape == (30, 5) and isinstance(bare.score(V[120:], T["emb"][120:]), float)


def test_kfold_and_shared_alpha():
    V, T = _data()
    dec = RidgeDecoder(alphas=[1, 10, 100], cv=4, alpha_per_target=False).fit(V[:120], T["emb"][:120])
    assert dec.solver_ == "kfold" and np.unique(dec.best_alphas_).size == 1


def test_save_load_roundtrip(tmp_path):
    V, T = _data()
    dec = RidgeDecoder(alphas=[1, 10]).fit(V[:120], {k: v[:120] for k, v in T.items()})
    dec.save_pretrained(tmp_path / "dec")
    back = brainenc.load(tmp_path / "dec")
    assert isinstance(back, RidgeDecoder)
    for k, v in dec.predict(V[120:]).items():
        np.testing.assert_array_equal(back.predict(V[120:])[k], v)


def test_flatten_roundtrip():
    V, T = _data()
    flat, names, shapes = flatten_targets(T)
    back = unflatten_targets(flat, names, shapes)
    for k in T:
        np.testing.assert_allclose(back[k], T[k], rtol=1e-6)


def test_errors_name_the_argument():
    V, T = _data()
    with pytest.raises(DataFormatError, match="targets\\['emb'\\]"):
        RidgeDecoder().fit(V, {"emb": T["emb"][:10]})
    with pytest.raises(ConfigError, match="standardize_targets"):
        RidgeDecoder(standardize_targets="yes").fit(V, T["emb"])
    with pytest.raises(ConfigError, match="alphas"):
        RidgeDecoder(alphas=[-1]).fit(V, T["emb"])
    bad = T["emb"].copy()
    bad[0, 0] = np.nan
    with pytest.raises(DataFormatError, match="NaN"):
        RidgeDecoder().fit(V, bad)
    dec = RidgeDecoder(alphas=[1.0]).fit(V, T["emb"])
    with pytest.raises(DataFormatError, match="voxels|features"):
        dec.predict(V[:, :10])


def test_match_train_statistics():
    from brainenc.decoding import match_train_statistics

    rng = np.random.default_rng(0)
    train = rng.normal(3.0, 2.0, (200, 4, 3))
    pred = 0.1 * rng.standard_normal((50, 4, 3)) + 3.0
    pred[:, 0, 0] = 1.0  # constant feature -> training mean
    out = match_train_statistics(pred, train)
    f, t = out.reshape(50, -1), train.reshape(200, -1)
    np.testing.assert_allclose(f[:, 1:].std(0), t[:, 1:].std(0), rtol=1e-6)
    np.testing.assert_allclose(f[:, 1:].mean(0), t[:, 1:].mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(f[:, 0], t[:, 0].mean(), rtol=1e-9)
    # order within the predicted set is kept (a monotone map per feature)
    np.testing.assert_array_equal(np.argsort(out[:, 2, 1]), np.argsort(pred[:, 2, 1]))
    with pytest.raises(DataFormatError, match="per-sample shape"):
        match_train_statistics(pred, train[:, :2])
