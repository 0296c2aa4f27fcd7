"""The estimator contract, checked over every registered estimator.

Each registered name needs a case below (small fit data + one invalid parameter, optionally
data-dependent ``fit`` keywords); a newly registered estimator without one fails
``test_every_estimator_has_a_case``.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.base import clone

import brainenc
from brainenc.estimator import CONFIG_FILE, ESTIMATORS, WEIGHTS_FILE, to_json_value
from brainenc.exceptions import BrainencError, ConfigError, DataFormatError, NotFittedError


def _ridge_data(rng):
    X = rng.standard_normal((80, 10))
    Y = X @ rng.standard_normal((10, 6)) + rng.standard_normal((80, 6))
    return (X,), Y


def _routing_data(rng):
    tokens = rng.standard_normal((40, 16, 6)).astype(np.float32)  # 4x4 grid of 6-d tokens
    Y = (tokens[:, 5, :5] + 0.5 * rng.standard_normal((40, 5))).astype(np.float32)
    return (tokens,), Y


#: 2 ROIs (+ unknown) over 5 voxels, passed to fit: sizes and labels come from the data
_ROUTING_FIT = {"roi_labels": {"rois": np.array([1, 1, 2, 0, 2], np.int32)}, "roi_names": {"rois": {1: "A", 2: "B"}}}

def _series_data(rng):
    X = rng.standard_normal((12, 20, 6)).astype(np.float32)  # 12 series of 20 time points x 6 ROIs
    return (X,), None


def _segment_labels(rng):
    (X,), _ = _series_data(rng)
    return (X,), np.arange(12) % 2


def _segment_targets(rng):
    (X,), _ = _series_data(rng)
    return (X,), X[:, :, 0].mean(1) * 2.0


def _brainmae(cls_name, **kw):
    import brainenc.pretraining.brainmae as bm
    from brainenc.models.brainmae import TINY_BRAINMAE

    return getattr(bm, cls_name)(tr=2.0, segment_seconds=8.0, model=dict(TINY_BRAINMAE),
                                 train={"epochs": 2, "batch_size": 4, "device": "cpu"}, **kw)


def _brainit_enc_data(rng):
    tokens = [rng.standard_normal((24, 4, 5)).astype(np.float32), rng.standard_normal((24, 2, 3)).astype(np.float32)]
    Y = np.zeros((24, 9), np.float32)
    Y[:, :9] = tokens[0][:, 0, :] @ rng.standard_normal((5, 9))
    Y[1::2, 6:] = 0.0  # subject 1 has 6 voxels (zero padding)
    return (tokens,), Y


_BRAINIT_SUBJ = {"subject": np.arange(24) % 2, "voxel_counts": [9, 6]}


def _brainit_dec_data(rng):
    Y = rng.standard_normal((24, 9)).astype(np.float32)
    return (Y, np.arange(24) % 2), (Y[:, :3, None] * np.ones((1, 1, 4))).astype(np.float32)


def _brainit_clusters_data(rng):
    return ([rng.standard_normal((20, 3)), rng.standard_normal((15, 3)) + 2],), ["a", "b"]


_TINY_BIT = {"width": 8, "heads": 2, "n_self": 1}

#: per case: ``method`` (what the fitted estimator outputs, default predict) and ``score``
#: ("voxels": shape [n_outputs], "scalar": sklearn's accuracy / R², None: no score)
CASES = {
    "brainmae": dict(make=lambda: _brainmae("BrainMAE", val_fraction=0.0), data=_series_data,
                     bad={"mask_weight": 1.5}, method="transform", score=None),
    "brainmae_classifier": dict(make=lambda: _brainmae("BrainMAEClassifier"), data=_segment_labels,
                                bad={"segment_seconds": -1.0}, score="scalar"),
    "brainmae_regressor": dict(make=lambda: _brainmae("BrainMAERegressor"), data=_segment_targets,
                               bad={"segment_seconds": -1.0}, score="scalar"),
    "ridge": dict(make=lambda: brainenc.encoding.RidgeEncoder(alphas=[0.1, 1.0, 10.0], cv=4),
                  data=_ridge_data, bad={"solver": "bogus"}),
    "ridge_standardized": dict(make=lambda: brainenc.encoding.RidgeEncoder(alphas=[1.0, 100.0], cv=None,
                                                                           standardize=True),
                               data=_ridge_data, bad={"dtype": "float16"}, registered="ridge"),
    "ridge_decoder": dict(make=lambda: brainenc.decoding.RidgeDecoder(alphas=[0.1, 1.0, 10.0]),
                          data=_ridge_data, bad={"standardize_targets": "yes"}, score="scalar"),
    "banded_ridge": dict(make=lambda: brainenc.encoding.BandedRidgeEncoder(band_sizes=[4, 6], n_iter=3, cv=3),
                         data=_ridge_data, bad={"scoring": "bogus"}),
    "routing": dict(make=lambda: brainenc.encoding.RoutingEncoder(
        queries="rois", model={"d_model": 8, "n_heads": 2, "d_ffn": 16},
        train={"epochs": 2, "batch_size": 8, "device": "cpu"}, val_fraction=0.2),
        data=_routing_data, fit=_ROUTING_FIT, bad={"queries": "bogus"}),
    "brainit_encoder": dict(make=lambda: brainenc.decoding.UniversalBrainEncoder(
        model={"embed_dim": 4, "token_dim": 4}, train={"epochs": 2, "batch_size": 8}, voxels_per_example=5),
        data=_brainit_enc_data, fit=_BRAINIT_SUBJ, bad={"cos_weight": -1.0}, score=None,
        out=lambda est, args: est.predict(args[0], 1)),
    "brainit_clusters": dict(make=lambda: brainenc.decoding.FunctionalClusters(n_clusters=2, covariance_type="diag"),
                             data=_brainit_clusters_data, bad={"covariance_type": "bogus"}, score=None,
                             out=lambda est, args: est.assign(np.eye(3))[0]),
    "brainit": dict(make=lambda: brainenc.decoding.BrainITDecoder(
        model=_TINY_BIT, train={"epochs": 2, "batch_size": 8, "warmup_epochs": 1}, voxels_per_example=7),
        data=_brainit_dec_data, fit={"voxel_counts": [9, 6], "clusters": np.arange(15) % 3, "n_clusters": 3},
        bad={"loss": "l1"}, score=None, out=lambda est, args: est.predict(args[0], 0)),
}


def _load_all():
    import brainenc.encoding  # noqa: F401  (registers the encoding estimators)
    import brainenc.pretraining.brainmae  # noqa: F401  (and the pretraining ones)
    import brainenc.decoding  # noqa: F401  (and the decoders)

    return sorted(ESTIMATORS)


def test_every_estimator_has_a_case():
    covered = {c.get("registered", n) for n, c in CASES.items()}
    missing = [n for n in _load_all() if n not in covered]
    assert not missing, f"registered estimators without a contract case: {missing}"


def _out(c, est, args):
    if "out" in c:  # multi-subject estimators: the output of one subject
        return np.asarray(c["out"](est, args))
    return np.asarray(getattr(est, c.get("method", "predict"))(*args))


def _json_params(est):
    return to_json_value(est.get_params(deep=False))


@pytest.fixture(params=sorted(CASES))
def case(request):
    _load_all()
    c = CASES[request.param]
    rng = np.random.default_rng(0)
    args, Y = c["data"](rng)
    return request.param, c, args, Y, c.get("fit", {})


def test_init_stores_params_only(case):
    name, c, _, _, _ = case
    est = c["make"]()
    assert type(est)._estimator_name == c.get("registered", name)
    assert not [a for a in vars(est) if a.endswith("_") and not a.startswith("_")]
    bad = clone(est).set_params(**c["bad"])  # no validation in __init__ / set_params
    assert bad.get_params()[next(iter(c["bad"]))] == next(iter(c["bad"].values()))


def test_clone_and_set_params(case):
    _, c, args, Y, kw = case
    est = c["make"]()
    cl = clone(est)
    assert _json_params(cl) == _json_params(est)
    est.fit(*args, Y, **kw)
    cl2 = clone(est)
    assert not cl2._is_fitted()
    key, value = next(iter(est.get_params().items()))
    assert cl2.set_params(**{key: value}) is cl2


def test_fit_validates_and_keeps_params(case):
    _, c, args, Y, kw = case
    est = c["make"]()
    before = _json_params(est)
    assert est.fit(*args, Y, **kw) is est
    assert _json_params(est) == before  # fit never rewrites a parameter
    new_public = [a for a in vars(est) if not a.startswith("_") and a not in est.get_params()]
    assert new_public and all(a.endswith("_") for a in new_public), new_public
    bad = clone(est).set_params(**c["bad"])
    with pytest.raises(BrainencError) as info:
        bad.fit(*args, Y, **kw)
    assert isinstance(info.value, ValueError)  # input errors are ValueErrors too
    assert next(iter(c["bad"])) in str(info.value)


def test_from_config_round_trips_and_validates(case):
    _, c, args, Y, kw = case
    est = c["make"]()
    cls = type(est)
    table = est.to_config()
    assert json.loads(json.dumps(table)) == table  # plain JSON data
    again = cls.from_config(table)
    assert again.to_config() == table
    np.testing.assert_array_equal(_out(c, again.fit(*args, Y, **kw), args),
                                  _out(c, clone(est).fit(*args, Y, **kw), args))
    key, value = next(iter(c["bad"].items()))
    with pytest.raises(ConfigError, match=f"'fit.m.{key}'"):  # invalid value: named with the prefix, before fit
        cls.from_config({**table, key: value}, prefix="fit.m.")
    with pytest.raises(ConfigError, match="unknown key 'fit.m.bogus_key'"):
        cls.from_config({"bogus_key": 1}, prefix="fit.m.")


def test_not_fitted(case):
    _, c, args, _, _ = case
    with pytest.raises(NotFittedError):
        _out(c, c["make"](), args)
    with pytest.raises(NotFittedError):
        c["make"]().save_pretrained("unused")


def test_save_load_round_trip(case, tmp_path):
    name, c, args, Y, kw = case
    est = c["make"]().fit(*args, Y, **kw)
    out = est.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    meta = json.loads((out / CONFIG_FILE).read_text())
    assert meta["class"] == c.get("registered", name) and meta["version"] == brainenc.__version__
    loaded = brainenc.load(out)  # predicts without the fit-time data keywords
    assert type(loaded) is type(est)
    # the saved configuration is the estimator's to_config (every default filled in)
    assert loaded.to_config() == est.to_config() == meta["config"]
    np.testing.assert_array_equal(_out(c, loaded, args), _out(c, est, args))  # bitwise
    if c.get("score", "voxels") == "voxels":
        assert loaded.score(*args, Y).shape == (Y.shape[1],)
    elif c["score"] == "scalar":  # sklearn's convention, what cross_val_score needs
        assert np.ndim(loaded.score(*args, Y)) == 0
    # overwriting keeps exactly one model and no temporaries
    est.save_pretrained(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    np.testing.assert_array_equal(_out(c, type(est).from_pretrained(out), args), _out(c, est, args))


def test_load_errors_name_the_file(case, tmp_path):
    name, c, args, Y, kw = case
    out = c["make"]().fit(*args, Y, **kw).save_pretrained(tmp_path / "m")
    other = next(ESTIMATORS.get(n) for n in ESTIMATORS if n != c.get("registered", name))
    with pytest.raises(DataFormatError, match=CONFIG_FILE):
        other.from_pretrained(out)
    (out / WEIGHTS_FILE).write_bytes(b"\x00" * 12)
    with pytest.raises(DataFormatError, match=WEIGHTS_FILE):
        brainenc.load(out)
    (out / CONFIG_FILE).write_text("{not json")
    with pytest.raises(DataFormatError, match=CONFIG_FILE):
        brainenc.load(out)
    with pytest.raises(DataFormatError, match="not found"):
        brainenc.load(tmp_path / "nothing")


def test_ridge_standardize_is_a_zscore_inside_fit():
    rng = np.random.default_rng(3)
    X = (rng.standard_normal((60, 5)) * [1, 10, 100, 0.1, 1] + 7).astype(np.float32)
    X[:, 4] = 2.0  # constant column keeps scale 1
    Y = rng.standard_normal((60, 3)).astype(np.float32)
    est = brainenc.encoding.RidgeEncoder(alphas=[1.0, 10.0], cv=3, standardize=True).fit(X[:40], Y[:40])
    mean, sd = X[:40].mean(0), X[:40].std(0)
    scale = np.where(sd > 1e-8, sd, 1.0).astype(np.float32)
    ref = brainenc.encoding.RidgeEncoder(alphas=[1.0, 10.0], cv=3).fit((X[:40] - mean) / scale, Y[:40])
    np.testing.assert_array_equal(est.feature_mean_, mean)
    np.testing.assert_array_equal(est.feature_scale_, scale)
    np.testing.assert_array_equal(est.coef_, ref.coef_)
    np.testing.assert_array_equal(est.predict(X[40:]), ref.predict((X[40:] - mean) / scale))
