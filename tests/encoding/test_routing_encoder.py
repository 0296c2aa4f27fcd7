"""RoutingEncoder estimator: fit/predict/score, persistence, attention maps and figures."""
import numpy as np
import pytest
import torch
from PIL import Image

from brainenc.encoding.routing import RoutingEncoder, RoutingEncoderConfig
from brainenc.exceptions import ConfigError, DataFormatError, NotFittedError
from brainenc.report.attention import (
    attention_filename,
    maps_by_query,
    plot_attention_maps,
    plot_top_images,
    roi_mean_responses,
    upsample_map,
)

N_TOK, F, V = 16, 32, 30
TINY = dict(d_model=16, n_heads=2, d_ffn=32, dropout=0.0, train={"epochs": 3, "batch_size": 8, "lr": 3e-3})


def _data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, N_TOK, F)).astype(np.float32)
    Y = (X[:, 5, :V] + 0.3 * rng.standard_normal((n, V))).astype(np.float32)
    labels = {"faces": (np.arange(V) % 3).astype(np.int32), "words": (np.arange(V) % 4 == 0).astype(np.int32)}
    names = {"faces": {1: "FFA-1", 2: "OFA"}, "words": {1: "VWFA-1"}}
    hemi = np.where(np.arange(V) < V // 2, "lh", "rh")
    return X, Y, labels, names, hemi


@pytest.mark.parametrize("queries", ["rois", "voxels"])
def test_fit_predict_score_and_round_trip(tmp_path, queries):
    X, Y, labels, names, hemi = _data()
    enc = RoutingEncoder(TINY, queries=queries, roi_labels=labels, roi_names=names, hemi=hemi)
    enc.fit(X[:32], Y[:32], val_fraction=0.25)
    assert enc.val_scores_.shape == (V,) and 1 <= enc.best_epoch_ <= 3 and len(enc.history_) == 3
    pred = enc.predict(X[32:])
    assert pred.shape == (8, V) and pred.dtype == np.float32
    assert enc.score(X[32:], Y[32:]).shape == (V,)
    np.testing.assert_allclose(enc.score(X[32:], Y[32:], metric="r"),
                               [np.corrcoef(Y[32:, v], pred[:, v])[0, 1] for v in range(V)], rtol=1e-4, atol=1e-6)
    enc.save_pretrained(tmp_path / "enc")
    assert sorted(p.name for p in (tmp_path / "enc").iterdir()) == ["config.json", "model.safetensors"]
    back = RoutingEncoder.from_pretrained(tmp_path / "enc")
    np.testing.assert_array_equal(back.predict(X[32:]), pred)
    assert back.query_names_ == enc.query_names_
    np.testing.assert_array_equal(back.val_scores_, enc.val_scores_)


def test_rois_query_names_and_membership():
    X, Y, labels, names, hemi = _data()
    enc = RoutingEncoder(TINY, roi_labels=labels, roi_names=names, hemi=hemi, train={"epochs": 1}).fit(X, Y)
    assert enc.query_names_ == ["lh_FFA-1", "lh_OFA", "lh_VWFA-1", "lh_unknown",
                                "rh_FFA-1", "rh_OFA", "rh_VWFA-1", "rh_unknown"]
    np.testing.assert_array_equal(enc.query_set_.voxels_of("rh_OFA"), np.flatnonzero((labels["faces"] == 2) & (hemi == "rh")))


def test_validation_data_and_errors():
    X, Y, labels, names, hemi = _data()
    enc = RoutingEncoder(TINY, queries="hemis", hemi=hemi)
    with pytest.raises(NotFittedError):
        enc.predict(X)
    enc.fit(X[:30], Y[:30], validation_data=(X[30:], Y[30:]))
    assert enc.val_index_ is None and enc.val_scores_.shape == (V,)
    with pytest.raises(DataFormatError, match="tokens"):
        enc.predict(X[:, :5])
    with pytest.raises(ConfigError, match="unknown key"):
        RoutingEncoder({"quries": "rois"})
    with pytest.raises(ConfigError, match="'queries' must be one of"):
        RoutingEncoderConfig(queries="roi").check()
    with pytest.raises(ConfigError, match="grid"):
        RoutingEncoder(TINY, queries="hemis", hemi=hemi).fit(X, Y, grid=(3, 4))


def test_attention_maps_are_labelled_by_their_own_query(tmp_path):
    """ROI i's map is saved and titled as ROI i (the original's figure loop is off by one)."""
    X, Y, labels, names, hemi = _data()
    enc = RoutingEncoder(TINY, roi_labels=labels, roi_names=names, hemi=hemi, train={"epochs": 1}).fit(X, Y)
    maps = enc.attention_maps(X[:3])  # [3, Q, 4, 4]
    Q = len(enc.query_names_)
    assert maps.shape == (3, Q, 4, 4)
    np.testing.assert_allclose(maps.sum((-1, -2)), 1.0, rtol=1e-5)
    raw = enc.model_.attention_maps(torch.from_numpy(X[:3])).mean(1).numpy().reshape(3, Q, 4, 4)
    named = maps_by_query(maps, enc.query_names_)
    for i, name in enumerate(enc.query_names_):
        np.testing.assert_allclose(named[name], raw[:, i], rtol=1e-6)
    by_name = enc.attention_maps(X[:3], queries=["rh_OFA"])
    np.testing.assert_allclose(by_name[:, 0], named["rh_OFA"], rtol=1e-6)
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
