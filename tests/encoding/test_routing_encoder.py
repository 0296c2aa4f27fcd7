"""RoutingEncoder estimator: fit/predict/score, persistence, attention maps and figures."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.base import clone

import brainenc
from brainenc.encoding.routing import PRESETS, RoutingEncoder
from brainenc.estimator import CONFIG_FILE, WEIGHTS_FILE
from brainenc.exceptions import ConfigError, DataFormatError, NotFittedError
from brainenc.models import RoutingArchitecture
from brainenc.report.attention import (
    attention_filename,
    maps_by_query,
    plot_attention_maps,
    plot_top_images,
    roi_mean_responses,
    upsample_map,
)
from brainenc.training import TrainConfig

N_TOK, F, V = 16, 32, 30
ARCH = dict(d_model=16, n_heads=2, d_ffn=32, dropout=0.0)
TRAIN = {"epochs": 3, "batch_size": 8, "lr": 3e-3, "device": "cpu"}
TINY = dict(model=ARCH, train=TRAIN)


def _data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, N_TOK, F)).astype(np.float32)
    Y = (X[:, 5, :V] + 0.3 * rng.standard_normal((n, V))).astype(np.float32)
    labels = {"faces": (np.arange(V) % 3).astype(np.int32), "words": (np.arange(V) % 4 == 0).astype(np.int32)}
    names = {"faces": {1: "FFA-1", 2: "OFA"}, "words": {1: "VWFA-1"}}
    hemi = np.where(np.arange(V) < V // 2, "lh", "rh")
    return X, Y, labels, names, hemi


def _rois(X, Y, labels, names, hemi, **params):
    return RoutingEncoder(**{**TINY, **params}).fit(X, Y, roi_labels=labels, roi_names=names, hemi=hemi)


@pytest.mark.parametrize("queries", ["rois", "voxels"])
def test_fit_predict_score_and_round_trip(tmp_path, queries):
    X, Y, labels, names, hemi = _data()
    enc = RoutingEncoder(**TINY, queries=queries, val_fraction=0.25)
    enc.fit(X[:32], Y[:32], roi_labels=labels, roi_names=names, hemi=hemi)
    assert enc.val_scores_.shape == (V,) and 1 <= enc.best_epoch_ <= 3 and len(enc.history_) == 3
    assert enc.val_index_.shape == (8,) and np.union1d(enc.train_index_, enc.val_index_).tolist() == list(range(32))
    pred = enc.predict(X[32:])
    assert pred.shape == (8, V) and pred.dtype == np.float32
    assert enc.score(X[32:], Y[32:]).shape == (V,)
    np.testing.assert_allclose(enc.score(X[32:], Y[32:], metric="r"),
                               [np.corrcoef(Y[32:, v], pred[:, v])[0, 1] for v in range(V)], rtol=1e-4, atol=1e-6)
    enc.save_pretrained(tmp_path / "enc")
    assert sorted(p.name for p in (tmp_path / "enc").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    for back in (RoutingEncoder.from_pretrained(tmp_path / "enc"), brainenc.load(tmp_path / "enc")):
        # the loaded encoder predicts without any ROI data: the query set is part of the saved model
        assert type(back) is RoutingEncoder
        np.testing.assert_array_equal(back.predict(X[32:]), pred)
        assert back.query_names_ == enc.query_names_
        np.testing.assert_array_equal(back.val_scores_, enc.val_scores_)
        np.testing.assert_array_equal(back.val_index_, enc.val_index_)
        assert back.history_ == enc.history_ and back.best_epoch_ == enc.best_epoch_
        for k, v in enc.model_.state_dict().items():
            assert torch.equal(back.model_.state_dict()[k], v), k


def test_saved_config_is_the_nested_parameter_tables(tmp_path):
    X, Y, labels, names, hemi = _data()
    enc = _rois(X, Y, labels, names, hemi, families=["faces"], train={**TRAIN, "epochs": 1})
    meta = json.loads(enc.save_pretrained(tmp_path / "m").joinpath(CONFIG_FILE).read_text())
    assert meta["class"] == "routing"
    # the tables are written whole: the preset's fields under the given ones over the dataclass defaults
    # (a saved model does not depend on what a preset holds in a later version)
    arch, train = PRESETS["compact"]
    assert meta["config"] == {"queries": "rois", "combine": "sum", "families": ["faces"], "unknown": True,
                              "preset": "compact", "standardize_tokens": True,
                              "model": {**vars(RoutingArchitecture()), **arch, **ARCH},
                              "train": {**vars(TrainConfig()), **train, **TRAIN, "epochs": 1, "betas": [0.9, 0.999]},
                              "val_fraction": 0.1, "val_seed": 0, "scoring": "r2"}
    assert meta["config"] == enc.to_config()
    assert meta["fitted"]["grid"] == [4, 4] and meta["fitted"]["n_features"] == F
    assert meta["fitted"]["query_set"]["names"] == ["lh_FFA-1", "lh_OFA", "lh_unknown", "rh_FFA-1", "rh_OFA",
                                                    "rh_unknown"]


def test_dataclass_params_fit_and_save_like_their_tables(tmp_path):
    X, Y, labels, names, hemi = _data()
    arch, train = RoutingArchitecture(**ARCH), TrainConfig(**TRAIN)
    enc = RoutingEncoder(model=arch, train=train, queries="hemis").fit(X, Y, hemi=hemi)
    assert enc.model is arch and enc.train is train and arch == RoutingArchitecture(**ARCH)  # untouched
    assert enc.model_.arch is not arch  # the fitted model keeps its own copy
    # a dataclass is used whole (the preset does not apply), the same as its field table on 'paper'
    ref = RoutingEncoder(**TINY, queries="hemis", preset="paper").fit(X, Y, hemi=hemi)
    np.testing.assert_array_equal(enc.predict(X), ref.predict(X))
    back = brainenc.load(enc.save_pretrained(tmp_path / "m"))
    # every field of a dataclass parameter is saved (tuples as lists)
    assert back.model == {**vars(RoutingArchitecture()), **ARCH}
    assert back.train == {**vars(TrainConfig()), **TRAIN, "betas": [0.9, 0.999]}
    np.testing.assert_array_equal(back.predict(X), enc.predict(X))


def test_load_overrides_update_the_nested_tables(tmp_path):
    X, Y, labels, names, hemi = _data()
    enc = RoutingEncoder(**TINY, queries="voxels").fit(X, Y)
    out = enc.save_pretrained(tmp_path / "m")
    back = brainenc.load(out, train={"eval_batch_size": 3}, model={"routing_backend": "reference"})
    saved = enc.to_config()
    assert back.train == {**saved["train"], "eval_batch_size": 3}
    assert back.model == {**saved["model"], "routing_backend": "reference"}
    assert back.model_.arch.routing_backend == "reference"
    np.testing.assert_allclose(back.predict(X), enc.predict(X), rtol=1e-5, atol=1e-6)  # another backend
    with pytest.raises(DataFormatError, match=f"{WEIGHTS_FILE}: weights do not fit the architecture"):
        RoutingEncoder.from_pretrained(out, model={"d_model": 32, "d_ffn": 32})
    with pytest.raises(DataFormatError, match=CONFIG_FILE):
        brainenc.encoding.RidgeEncoder.from_pretrained(out)


def test_rois_query_names_and_membership():
    X, Y, labels, names, hemi = _data()
    enc = _rois(X, Y, labels, names, hemi, train={**TRAIN, "epochs": 1})
    assert enc.query_names_ == ["lh_FFA-1", "lh_OFA", "lh_VWFA-1", "lh_unknown",
                                "rh_FFA-1", "rh_OFA", "rh_VWFA-1", "rh_unknown"]
    np.testing.assert_array_equal(enc.query_set_.voxels_of("rh_OFA"), np.flatnonzero((labels["faces"] == 2) & (hemi == "rh")))


def test_validation_data_and_errors():
    X, Y, labels, names, hemi = _data()
    enc = RoutingEncoder(**TINY, queries="hemis")
    with pytest.raises(NotFittedError):
        enc.predict(X)
    enc.fit(X[:30], Y[:30], hemi=hemi, validation_data=(X[30:], Y[30:]))
    assert enc.val_index_ is None and enc.val_scores_.shape == (V,)
    with pytest.raises(DataFormatError, match="tokens"):
        enc.predict(X[:, :5])
    with pytest.raises(ConfigError, match="unknown key 'quries' for RoutingEncoder; did you mean 'queries'"):
        RoutingEncoder.from_config({"quries": "rois"})
    with pytest.raises(ConfigError, match="unknown key 'fit.r.model.model.d_modle' .*did you mean 'd_model'"):
        RoutingEncoder.from_config({"model": {"d_modle": 8}}, prefix="fit.r.model.")
    with pytest.raises(ConfigError, match="unknown key 'fit.r.model.d_model' .*belongs in the 'fit.r.model.model' table"):
        RoutingEncoder.from_config({"queries": "rois", "d_model": 64}, prefix="fit.r.model.")  # the old flat layout
    with pytest.raises(ConfigError, match="'queries' must be one of"):
        RoutingEncoder.from_config({"queries": "roi"})
    assert RoutingEncoder.from_config({"queries": "hemis", **TINY}).get_params()["model"] == ARCH
    bad = RoutingEncoder(queries="roi")  # no validation in __init__ ...
    with pytest.raises(ConfigError, match="'queries' must be one of"):
        bad.fit(X, Y)  # ... but in fit
    with pytest.raises(ConfigError, match="queries='rois' needs 'roi_labels'"):
        RoutingEncoder(**TINY).fit(X, Y)  # ROI data are fit arguments
    with pytest.raises(ConfigError, match="'model' must be None, a RoutingArchitecture"):
        RoutingEncoder(model=16, queries="hemis").fit(X, Y)
    with pytest.raises(ConfigError, match="'val_fraction'"):
        RoutingEncoder(**TINY, queries="hemis", val_fraction=1.0).fit(X, Y)
    with pytest.raises(ConfigError, match="grid"):
        RoutingEncoder(**TINY, queries="hemis").fit(X, Y, hemi=hemi, grid=(3, 4))
    assert not clone(enc)._is_fitted() and clone(enc).get_params() == enc.get_params()


def test_import_registers_without_torch():
    code = ("import sys, brainenc.encoding; from brainenc.estimator import ESTIMATORS; "
            "assert 'routing' in ESTIMATORS and 'torch' not in sys.modules, sorted(ESTIMATORS)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_attention_maps_are_labelled_by_their_own_query(tmp_path):
    """ROI i's map is saved and titled as ROI i (the original's figure loop is off by one)."""
    X, Y, labels, names, hemi = _data()
    enc = _rois(X, Y, labels, names, hemi, train={**TRAIN, "epochs": 1})
    maps = enc.attention_maps(X[:3])  # [3, Q, 4, 4]
    Q = len(enc.query_names_)
    assert maps.shape == (3, Q, 4, 4)
    np.testing.assert_allclose(maps.sum((-1, -2)), 1.0, rtol=1e-5)
    raw = enc.model_.attention_maps(torch.from_numpy(X[:3])).mean(1).numpy().reshape(3, Q, 4, 4)
    named = maps_by_query(maps, enc.query_names_)
    for i, name in enumerate(enc.query_names_):
        np.testing.assert_allclose(named[name], raw[:, i], rtol=1e-6)
    by_name = enc.attention_maps(X[:3], queries=["rh_OFA"])
    # one query decodes as a [1, d] x [d, .] product, all of them as [Q, d] x [d, .]: another kernel and
    # summation order, so each logit moves by ~n*u32*sum|q_d k_d| and each weight by that relatively
    # (measured max 7.8e-7 over all queries with AVX-512, AVX2 and no-SIMD ATen kernels at 1-3 threads;
    # a map of another query differs by O(1))
    np.testing.assert_allclose(by_name[:, 0], named["rh_OFA"], rtol=4e-6)
    # synthetic maps: query i attends only to patch i, so a mislabelled figure is detectable
    onehot = np.zeros((2, Q, 4, 4))
    for i in range(Q):
        onehot[:, i].flat[i::16] = 1.0
    for i, (name, m) in enumerate(maps_by_query(onehot, enc.query_names_).items()):
        assert name == enc.query_names_[i] and np.argmax(m[0]) == i
    images = np.random.default_rng(0).integers(0, 255, (2, 20, 20, 3), dtype=np.uint8)
    paths = plot_attention_maps(images, onehot, enc.query_names_, tmp_path)
    for i, (name, p) in enumerate(zip(enc.query_names_, paths)):
        assert p.name == attention_filename(name) == f"attention_{name}.png"
        meta = Image.open(p).text
        assert meta["Title"] == name and meta["Description"] == f"query index {i}"
    per_head = plot_attention_maps(images, np.stack([onehot, onehot], 1), enc.query_names_, tmp_path / "heads",
                                   queries=["lh_OFA"])
    assert [p.name for p in per_head] == ["attention_lh_OFA.png"]


def test_upsample_crop_and_top_images(tmp_path):
    m = np.arange(4.0).reshape(2, 2)
    up = upsample_map(m, (3, 4), padded_size=(4, 4))  # grid covers a 4x4 padded input; image is 3x4
    np.testing.assert_array_equal(up, [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3]])
    pred = np.array([[1.0, 0, 5], [3, 0, 1], [2, 0, 0]])
    names, resp = roi_mean_responses(pred, {"A": np.array([1, 0, 0], bool), "B": np.array([0, 1, 1], bool),
                                            "empty": np.zeros(3, bool)})
    assert names == ["A", "B"]
    np.testing.assert_allclose(resp, [[1, 2.5], [3, 0.5], [2, 0]])
    images = np.zeros((3, 8, 8, 3), np.uint8)
    p = plot_top_images(images, resp, names, tmp_path / "top.png", k=2)
    assert p.is_file() and Image.open(p).text["Description"] == "A, B"


# ---- token standardisation, presets, several queries per ROI (issue 17) --------------------------
def test_token_statistics_are_fitted_on_the_training_rows_and_applied_at_predict(tmp_path):
    X, Y, labels, names, hemi = _data()
    rng = np.random.default_rng(3)
    a, b = rng.uniform(0.1, 50, F).astype(np.float32), rng.normal(0, 100, F).astype(np.float32)
    Xs = X * a + b  # channels on very different scales, as backbone activations
    enc = RoutingEncoder(**TINY, queries="hemis").fit(Xs, Y, hemi=hemi)
    tr = Xs[enc.train_index_].reshape(-1, F).astype(np.float64)
    np.testing.assert_allclose(enc.token_mean_, tr.mean(0), rtol=1e-6, atol=1e-6 * np.abs(tr).max())
    np.testing.assert_allclose(enc.token_scale_, tr.std(0), rtol=1e-5)
    # the same as the unstandardised encoder on tokens standardised by hand (same seed, same data order)
    Xz = ((Xs - enc.token_mean_) / enc.token_scale_).astype(np.float32)
    ref = RoutingEncoder(**TINY, queries="hemis", standardize_tokens=False).fit(Xz, Y, hemi=hemi)
    pred = enc.predict(Xs)
    scale = np.abs(pred).max()
    np.testing.assert_allclose(pred, ref.predict(Xz), rtol=1e-4, atol=1e-4 * scale)
    np.testing.assert_allclose(enc.attention_maps(Xs[:4]), ref.attention_maps(Xz[:4]), rtol=1e-4, atol=1e-5)
    assert ref.token_mean_ is None and ref.token_scale_ is None
    # ... and saved with the model
    back = brainenc.load(enc.save_pretrained(tmp_path / "m"))
    np.testing.assert_array_equal(back.token_mean_, enc.token_mean_)
    np.testing.assert_array_equal(back.predict(Xs), pred)


def test_a_constant_token_channel_keeps_unit_scale():
    X, Y, labels, names, hemi = _data()
    X[:, :, 3] = 7.0
    enc = RoutingEncoder(**TINY, queries="hemis").fit(X, Y, hemi=hemi)
    assert enc.token_scale_[3] == 1.0 and enc.token_mean_[3] == pytest.approx(7.0)
    assert np.isfinite(enc.predict(X)).all()


def test_models_saved_before_presets_and_standardisation_load_as_they_were(tmp_path):
    # a config written before 'preset' / 'standardize_tokens' existed: the paper's tables, raw tokens
    X, Y, labels, names, hemi = _data()
    enc = RoutingEncoder(model=ARCH, train=TRAIN, queries="hemis", preset="paper",
                         standardize_tokens=False).fit(X, Y, hemi=hemi)
    out = enc.save_pretrained(tmp_path / "old")
    meta = json.loads((out / CONFIG_FILE).read_text())
    for key in ("preset", "standardize_tokens"):
        del meta["config"][key]
    meta["config"]["model"], meta["config"]["train"] = ARCH, TRAIN  # old files held the given tables
    (out / CONFIG_FILE).write_text(json.dumps(meta))
    back = brainenc.load(out)
    assert back.preset == "paper" and back.standardize_tokens is False
    assert back.to_config() == enc.to_config()
    np.testing.assert_array_equal(back.predict(X), enc.predict(X))


def test_presets_fill_the_tables_and_given_fields_override_them():
    compact = RoutingEncoder().to_config()
    assert compact["preset"] == "compact" and compact["standardize_tokens"] is True
    assert {k: compact["model"][k] for k in PRESETS["compact"][0]} == PRESETS["compact"][0]
    assert {k: compact["train"][k] for k in PRESETS["compact"][1]} == PRESETS["compact"][1]
    paper = RoutingEncoder(preset="paper").to_config()
    assert paper["model"] == {**vars(RoutingArchitecture()), "input_proj": None}
    assert paper["train"]["lr"] == 5e-4 and paper["model"]["d_model"] == 768
    mixed = RoutingEncoder(model={"d_model": 32, "n_heads": 4}, train={"epochs": 2}).to_config()
    assert mixed["model"]["d_model"] == 32 and mixed["model"]["d_ffn"] == PRESETS["compact"][0]["d_ffn"]
    assert mixed["train"]["epochs"] == 2 and mixed["train"]["lr"] == PRESETS["compact"][1]["lr"]
    assert RoutingEncoder.from_config(mixed).to_config() == mixed
    with pytest.raises(ConfigError, match="'fit.r.preset' must be one of .*Did you mean 'paper'"):
        RoutingEncoder.from_config({"preset": "papr"}, prefix="fit.r.")
    with pytest.raises(ConfigError, match="'standardize_tokens' must be true or false"):
        RoutingEncoder(standardize_tokens="yes").to_config()


def test_several_queries_per_roi_fit_save_and_name_their_maps(tmp_path):
    X, Y, labels, names, hemi = _data()
    enc = _rois(X, Y, labels, names, hemi, families=["faces"], model={**ARCH, "queries_per_group": 2})
    assert enc.query_names_[:4] == ["lh_FFA-1#0", "lh_FFA-1#1", "lh_OFA#0", "lh_OFA#1"]
    maps = enc.attention_maps(X[:3], queries=["lh_OFA#1"])
    assert maps.shape == (3, 1, 4, 4)
    np.testing.assert_allclose(maps.sum((-1, -2)), 1.0, rtol=1e-5)
    back = brainenc.load(enc.save_pretrained(tmp_path / "m"))
    assert back.query_names_ == enc.query_names_
    np.testing.assert_array_equal(back.predict(X), enc.predict(X))
