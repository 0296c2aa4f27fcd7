"""The differentiable image -> features path equals the feature-extraction path it mirrors.

References: ``Preprocess.__call__`` (uint8) for ``Preprocess.transform``, ``extract_features`` (the
cached rows the pipeline reads) + ``pool_grid`` (numpy) for ``ImageToFeatures`` / ``pool_grid_torch``,
and a fitted estimator's ``predict`` on those rows for ``compose``. Backbones: EfficientNet-Lite0
(real offline weights) at a small input size, the Gabor pyramid, a 2-block random-init timm ViT
(prefix token: ``tokens="all"``, ``pooled="cls"``).
"""
import numpy as np
import pytest
import torch

from brainenc.encoding import RidgeEncoder
from brainenc.encoding.routing import RoutingEncoder
from brainenc.exceptions import ConfigError, DataFormatError
from brainenc.features import FeatureSpec, Preprocess, create_backbone, extract_features, pool_grid
from brainenc.features.differentiable import ImageEncoder, ImageToFeatures, compose, pool_grid_torch

TIMM = dict(backbone="timm:vit_tiny_patch16_224", pretrained="random", seed=1, options={"depth": 2, "img_size": 32})


def _floats(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def _close(got, ref, rtol=1e-4):
    got = got.detach().cpu().numpy().astype(np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=1e-4 * float(ref.std()) + 1e-7)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    smooth = rng.integers(0, 256, size=(3, 9, 11, 3)).astype(np.float32)
    big = np.kron(smooth, np.ones((1, 8, 8, 1), np.float32))[:, :70, :84]  # blocky, not pure noise
    noise = rng.normal(0, 20, size=big.shape)
    return np.clip(big + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def lite0_small():
    return create_backbone("efficientnet-lite0", image_size=64)


@pytest.fixture(scope="module")
def timm_vit():
    spec = FeatureSpec(**TIMM)
    return create_backbone(spec.backbone, **spec.backbone_kwargs())


@pytest.mark.parametrize("pre", [
    Preprocess(size=(48, 40), resize_mode="shortest", crop_pct=0.875, interpolation="bicubic"),
    Preprocess(size=(32, 32), resize_mode="squash", interpolation="bilinear"),
    Preprocess(size=(36, 36), resize_mode="longest", interpolation="bicubic", fill=0.5),
    Preprocess(size=(70, 84), resize_mode="shortest", interpolation="nearest"),  # no resize at all
])
def test_transform_is_the_uint8_path_and_differentiable(images, pre):
    x = _floats(images)
    ref = pre(images)
    got = pre.transform(x)
    assert got.dtype == torch.float32 and torch.equal(got, ref)
    xg = x.clone().requires_grad_(True)
    pre.transform(xg).square().sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match=r"\[n, 3, H, W\]"):
        pre.transform(torch.zeros(2, 70, 84, 3))
    with pytest.raises(ConfigError, match="float tensor"):
        pre.transform(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


def test_forward_layer_grad_option(lite0_small, images):
    x = lite0_small.preprocess_images(images)
    plain = lite0_small.forward_layer(x, "blocks.5")
    assert plain.tokens.grad_fn is None and plain.tokens.is_inference()
    xg = x.clone().requires_grad_(True)
    kept = lite0_small.forward_layer(xg, "blocks.5", grad=True)
    assert kept.tokens.grad_fn is not None and torch.equal(kept.tokens, plain.tokens)
    assert kept.grid == plain.grid and kept.n_prefix == plain.n_prefix
    kept.tokens.sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0
    with torch.no_grad():  # the caller's grad mode is respected
        assert lite0_small.forward_layer(xg, "last", grad=True).tokens.grad_fn is None


@pytest.mark.parametrize("grid, cells, n_prefix", [((4, 4), 2, 0), ((5, 7), 3, 1), ((6, 6), 1, 2), ((3, 3), 3, 0)])
def test_pool_grid_torch_equals_numpy(grid, cells, n_prefix):
    rng = np.random.default_rng(3)
    tokens = rng.standard_normal((3, n_prefix + grid[0] * grid[1], 5)).astype(np.float32)
    ref = pool_grid(tokens, grid, cells, n_prefix)
    t = torch.from_numpy(tokens).requires_grad_(True)
    got = pool_grid_torch(t, grid, cells, n_prefix)
    _close(got, ref, rtol=1e-6)
    got.sum().backward()  # each patch token gets 1 / (its region's size) per channel; prefix tokens none
    assert torch.all(t.grad[:, :n_prefix] == 0) and torch.all(t.grad[:, n_prefix:] > 0)
    with pytest.raises(ConfigError, match="grid_pool"):
        pool_grid_torch(t, grid, min(grid) + 1, n_prefix)
    with pytest.raises(DataFormatError, match="patches"):
        pool_grid_torch(t[:, 1:], grid, cells, n_prefix)


CASES = [
    # backbone spec, fit inputs (features, grid_pool)
    (dict(backbone="efficientnet-lite0", image_size=64, layer="blocks.10"), ("pooled", 0)),
    (dict(backbone="efficientnet-lite0", image_size=64, layer="blocks.10"), ("tokens", 0)),
    (dict(backbone="efficientnet-lite0", image_size=64, layer="blocks.10"), ("tokens", 2)),
    (dict(backbone="efficientnet-lite0", image_size=64, layer="last", pooled="model"), ("pooled", 0)),
    (dict(backbone="efficientnet-lite0", image_size=64, layer=3, dtype="float16"), ("tokens", 3)),
    (dict(backbone="efficientnet-lite0", image_size=64, layer=3, dtype="float16"), ("pooled", 0)),
    (dict(backbone="gabor", image_size=32, options={"cycles_per_image": [2, 4], "n_orientations": 4, "grid": 4}),
     ("tokens", 2)),
    (dict(backbone="gabor", image_size=32, options={"cycles_per_image": [2, 4], "n_orientations": 4, "grid": 4}),
     ("pooled", 0)),
    (dict(TIMM, tokens="all", pooled="cls"), ("pooled", 0)),
    (dict(TIMM, tokens="all", pooled="cls", layer="blocks.0"), ("tokens", 0)),
    (dict(TIMM, tokens="all", pooled="cls", layer="blocks.0"), ("tokens", 2)),
    (dict(TIMM, tokens="patch", layer="last"), ("tokens", 0)),
]


def _backbone(spec, lite0_small, timm_vit):
    if spec.backbone == "efficientnet-lite0":
        return lite0_small
    if spec.backbone.startswith("timm:"):
        return timm_vit
    return None


def _design(fs, features, grid_pool):
    """What ``workflows.fitters._design`` builds from a feature set."""
    if features == "tokens" and grid_pool:
        return pool_grid(np.asarray(fs.tokens), fs.grid, grid_pool, fs.n_prefix)
    arr = np.asarray(fs.pooled if features == "pooled" else fs.tokens, dtype=np.float32)
    return arr if features == "tokens" else arr.reshape(arr.shape[0], -1)


@pytest.mark.parametrize("table, inputs", CASES, ids=lambda v: str(v) if isinstance(v, tuple) else None)
def test_image_to_features_equals_extract_features(tmp_path, images, lite0_small, timm_vit, table, inputs):
    features, grid_pool = inputs
    spec = FeatureSpec(**table)
    bb = _backbone(spec, lite0_small, timm_vit)
    fs = extract_features(images, np.arange(len(images)), spec, cache_dir=tmp_path, backbone=bb, show_progress=False)
    ref = _design(fs, features, grid_pool)
    itf = ImageToFeatures.from_spec(spec, features, grid_pool, backbone=bb)
    assert itf.output_kind == ("tokens" if features == "tokens" and not grid_pool else "design")
    x = _floats(images).requires_grad_(True)
    got = itf(x)
    _close(got, ref)
    if spec.dtype == "float16":  # the storage rounding is reproduced
        assert np.array_equal(got.detach().numpy().astype(np.float16), np.asarray(ref).astype(np.float16))
    shape = itf.probe()
    assert shape["shape"] == tuple(ref.shape[1:]) and shape["grid"] == tuple(fs.grid)
    assert shape["n_prefix"] == fs.n_prefix
    got.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in itf.parameters())


def test_image_to_features_validates(lite0_small):
    with pytest.raises(ConfigError, match="features"):
        ImageToFeatures(lite0_small, "last", "logits")
    with pytest.raises(ConfigError, match="grid_pool"):
        ImageToFeatures(lite0_small, "last", "pooled", grid_pool=2)
    with pytest.raises(ConfigError, match="layer"):
        ImageToFeatures(lite0_small, "blocks.99", "pooled")
    with pytest.raises(ConfigError, match="Backbone"):
        ImageToFeatures(object(), "last")
    itf = ImageToFeatures(lite0_small, "blocks.2", "pooled")
    with pytest.raises(ConfigError, match=r"\[n, 3, H, W\]"):
        itf(torch.zeros(1, 64, 64, 3))
    with pytest.raises(ConfigError, match="does not match"):
        ImageToFeatures.from_spec(FeatureSpec(backbone="gabor"), backbone=lite0_small)
    with pytest.raises(ConfigError, match="pooled = 'none'"):
        ImageToFeatures.from_spec(FeatureSpec(backbone="efficientnet-lite0", pooled="none"), backbone=lite0_small)


def test_compose_matches_predict_and_stays_frozen(tmp_path, images, lite0_small):
    spec = FeatureSpec(backbone="efficientnet-lite0", image_size=64, layer="blocks.10")
    fs = extract_features(images, np.arange(3), spec, cache_dir=tmp_path, backbone=lite0_small, show_progress=False)
    X = pool_grid(np.asarray(fs.tokens), fs.grid, 2, 0)
    rng = np.random.default_rng(0)
    # a ridge "fitted" on these rows plus noise rows of the same scale (3 images are too few to fit on)
    Xfit = np.concatenate([X, X[rng.integers(0, 3, 60)] + rng.normal(0, X.std(), (60, X.shape[1]))]).astype(np.float32)
    Y = (Xfit @ rng.standard_normal((X.shape[1], 9)) / 30).astype(np.float32)
    enc = RidgeEncoder(alphas=[1.0, 100.0], cv=3, standardize=True).fit(Xfit, Y)
    model = compose(ImageToFeatures.from_spec(spec, "tokens", 2, backbone=lite0_small), enc.to_torch())
    assert isinstance(model, ImageEncoder) and model.n_voxels == 9 and model.adapter == "none"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    assert not any(m.training for m in model.modules())
    x = _floats(images).requires_grad_(True)
    out = model(x)
    _close(out, enc.predict(X))
    out[:, 4].sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    d = model.describe()
    assert d["features"]["layer"] == "blocks.10" and d["head"]["estimator"] == "ridge" and d["n_voxels"] == 9

    # ridge on raw (flattened) tokens: the composer flattens them as the fitter does
    Xt = np.asarray(fs.tokens).reshape(3, -1)
    enc_t = RidgeEncoder(alphas=[10.0], cv=None).fit(np.concatenate([Xt] * 4) + rng.normal(0, 1, (12, Xt.shape[1])),
                                                     rng.standard_normal((12, 2)))
    flat = compose(ImageToFeatures.from_spec(spec, "tokens", backbone=lite0_small), enc_t.to_torch())
    assert flat.adapter == "flatten"
    _close(flat(_floats(images)), enc_t.predict(Xt))

    # the wrong features for a head: one line naming both sizes
    with pytest.raises(ConfigError, match="takes 448 design features but .* gives 112"):
        compose(ImageToFeatures.from_spec(spec, "pooled", backbone=lite0_small), enc.to_torch())
    with pytest.raises(ConfigError, match="input_kind"):
        compose(ImageToFeatures.from_spec(spec, "pooled", backbone=lite0_small), torch.nn.Linear(112, 3))


def test_compose_routing_head_on_prefixed_tokens(tmp_path, images, timm_vit):
    spec = FeatureSpec(**dict(TIMM, tokens="all", pooled="none", layer="blocks.1"))
    fs = extract_features(images, np.arange(3), spec, cache_dir=tmp_path, backbone=timm_vit, show_progress=False)
    assert fs.n_prefix == 1
    patches = np.asarray(fs.tokens)[:, 1:]  # what fit_routing trains on
    rng = np.random.default_rng(0)
    Xfit = np.concatenate([patches] * 8) + rng.normal(0, 0.1, (24,) + patches.shape[1:]).astype(np.float32)
    enc = RoutingEncoder(queries="voxels", model=dict(d_model=16, n_heads=2, d_ffn=32),
                         train={"epochs": 1, "batch_size": 8, "device": "cpu", "amp": False}, val_fraction=0.0)
    enc.fit(Xfit.astype(np.float32), rng.standard_normal((24, 5)).astype(np.float32), grid=tuple(fs.grid))
    model = compose(ImageToFeatures.from_spec(spec, "tokens", backbone=timm_vit), enc.to_torch())
    assert model.adapter == "patches"
    x = _floats(images).requires_grad_(True)
    out = model(x)
    _close(out, enc.predict(patches))
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="takes tokens"):
        compose(ImageToFeatures.from_spec(spec, "tokens", 1, backbone=timm_vit), enc.to_torch())
