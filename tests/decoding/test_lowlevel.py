import numpy as np
import pytest
import torch

from brainenc.decoding.lowlevel import (
    LITE0_LAYERS,
    VGG16_BN_LAYERS,
    DeepImagePrior,
    FeatureCNN,
    InversionResult,
    build_feature_cnn,
    invert_features,
    map_shapes,
    tokens_to_vgg_maps,
    vgg_maps_to_tokens,
)
from brainenc.exceptions import ConfigError, DataFormatError, MissingWeightsError

VGG_SHAPES_112 = [(64, 112, 112), (128, 56, 56), (256, 28, 28), (512, 14, 14), (512, 7, 7)]


def _image(name, size):
    from skimage import data, transform

    a = getattr(data, name)()
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    a = transform.resize(a[..., :3], (size, size), anti_aliasing=True)
    return torch.tensor(a, dtype=torch.float32).permute(2, 0, 1)[None]


def _corr(a, b):
    a = a.flatten() - a.mean()
    b = b.flatten() - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.fixture(scope="module")
def lite():
    return build_feature_cnn("efficientnet-lite0")


@pytest.fixture(scope="module")
def lite_random():
    return build_feature_cnn("efficientnet-lite0", weights="random", layers=(0, 2, 4))


@pytest.fixture(scope="module")
def vgg_random():
    return build_feature_cnn("vgg16_bn", weights="random", seed=1)


@pytest.fixture(scope="module")
def pair():
    return _image("astronaut", 32), _image("coffee", 32)


# ------------------------------------------------------------------------------ tokenisation
def test_vgg_tokens_round_trip_exactly(vgg_random):
    x = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        maps = vgg_random(x)
    assert [tuple(m.shape[1:]) for m in maps] == VGG_SHAPES_112
    tokens = vgg_maps_to_tokens(maps)
    assert tuple(tokens.shape) == (2, 7190, 512)
    back = tokens_to_vgg_maps(tokens)
    for m, b in zip(maps, back):
        assert b.shape == m.shape
        assert float((m - b).abs().max()) <= 1e-6
    # the duplicated halves are really duplicated, and the fold is not the identity on noise
    assert torch.equal(tokens[:, :3136, :256], tokens[:, :3136, 256:])
    noisy = tokens + torch.randn(tokens.shape, generator=torch.Generator().manual_seed(1))
    assert float((tokens_to_vgg_maps(noisy)[1] - maps[1]).abs().max()) > 0.1


def test_vgg_token_errors():
    with pytest.raises(ConfigError, match="tokens"):
        tokens_to_vgg_maps(torch.zeros(1, 7000, 512))
    with pytest.raises(ConfigError, match="maps"):
        vgg_maps_to_tokens([torch.zeros(1, 64, 112, 112)] * 5)


# ------------------------------------------------------------------------------ networks
def test_lite0_default_layers_shapes(lite):
    assert lite.layers == LITE0_LAYERS
    assert map_shapes(lite, 64) == [(16, 32, 32), (24, 16, 16), (40, 8, 8), (112, 4, 4), (320, 2, 2)]
    assert lite.identity["weights"].startswith("sha256:")
    assert not any(p.requires_grad for p in lite.parameters()) and not lite.training
    lite.train()
    assert not lite.training


def test_vgg_random_shapes_and_identity(vgg_random):
    assert vgg_random.layers == VGG16_BN_LAYERS and vgg_random.input_size == 112
    assert map_shapes(vgg_random, 112) == VGG_SHAPES_112
    assert vgg_random.identity["weights"] == "random-init:seed=1"
    assert vgg_random.identity["mean"] == [0.485, 0.456, 0.406]


def test_vgg_missing_and_bad_weights(tmp_path):
    with pytest.raises(MissingWeightsError, match="vgg16_bn-6c64b313.pth"):
        build_feature_cnn("vgg16_bn")
    bad = tmp_path / "vgg16_bn-6c64b313.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DataFormatError, match="vgg16_bn-6c64b313.pth"):
        build_feature_cnn("vgg16_bn", weights=bad)
    wrong = tmp_path / "wrong.pth"
    torch.save({"features.0.weight": torch.zeros(3)}, wrong)
    with pytest.raises(DataFormatError, match="wrong.pth"):
        build_feature_cnn("vgg16_bn", weights=wrong)
    with pytest.raises(MissingWeightsError, match="missing.pth"):
        build_feature_cnn("vgg16_bn", weights=tmp_path / "missing.pth")


def test_vgg_weights_file_reproduces_maps(tmp_path):
    a = build_feature_cnn("vgg16_bn", weights="random", seed=3)  # all layers: a full state dict
    b = build_feature_cnn("vgg16_bn", weights="random", seed=4, layers=(5, 12))
    # torchvision-style keys ("features.N...") as in vgg16_bn-6c64b313.pth
    state = {f"features.{k}": v for k, v in a.network.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)
    path = tmp_path / "vgg.pth"
    torch.save(state, path)
    c = build_feature_cnn("vgg16_bn", weights=path, layers=(5, 12))
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ma, mb, mc = a(x), b(x), c(x)
    assert all(torch.equal(u, v) for u, v in zip(ma[:2], mc))
    assert not torch.equal(ma[1], mb[1])
    assert c.identity["weights"].startswith("sha256:") and len(c.identity["weights"]) == 7 + 64


def test_random_init_leaves_global_rng_alone():
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    build_feature_cnn("vgg16_bn", weights="random", seed=5, layers=(2,))
    build_feature_cnn("efficientnet-lite0", weights="random", layers=(0,))
    assert torch.equal(torch.rand(3), want)


def test_unknown_name_and_bad_layers():
    with pytest.raises(ConfigError, match="efficientnet-lite0.*vgg16_bn"):
        build_feature_cnn("resnet50")
    with pytest.raises(ConfigError, match="layers"):
        build_feature_cnn("vgg16_bn", weights="random", layers=(5, 99))
    with pytest.raises(ConfigError, match="layers"):
        build_feature_cnn("efficientnet-lite0", weights="random", layers=(1, 1))


# ------------------------------------------------------------------------------ DIP net
def test_deep_image_prior_shapes():
    net = DeepImagePrior(input_channels=4, channels=8, skip_channels=2, n_scales=3)
    with torch.no_grad():
        out = net(torch.rand(2, 4, 32, 32))
    assert out.shape == (2, 3, 32, 32) and float(out.min()) > 0 and float(out.max()) < 1
    big = DeepImagePrior()
    assert 1.0e6 < sum(p.numel() for p in big.parameters()) < 1.6e6  # ~1.29 M (paper's skip net)
    with pytest.raises(ConfigError, match="upsample"):
        DeepImagePrior(upsample="cubic")


# ------------------------------------------------------------------------------ inversion
def test_pixel_inversion_inverts(lite, pair):
    a, b = pair
    with torch.no_grad():
        ta, tb = lite(a), lite(b)
    targets = [torch.cat([u, v]) for u, v in zip(ta, tb)]
    res = invert_features(targets, lite, size=32, iterations=50)
    assert isinstance(res, InversionResult)
    assert res.images.shape == (2, 3, 32, 32) and res.images.dtype == torch.float32
    assert res.loss_history.shape == (50,) and res.final_loss.shape == (2,) and res.iterations == 50
    assert res.loss_history[-1] < res.loss_history[0] / 4
    assert float(res.images.min()) >= 0 and float(res.images.max()) <= 1
    # closer to its own image than to the other, for both images
    assert _corr(res.images[0], a) > _corr(res.images[0], b) + 0.2
    assert _corr(res.images[1], b) > _corr(res.images[1], a) + 0.2
    assert _corr(res.images[0], a) > 0.4
    # final_loss is the loss of the returned images
    with torch.no_grad():
        own = invert_features(targets, lite, size=32, iterations=1, init=res.images, lr=1e-9)
    np.testing.assert_allclose(own.final_loss, res.final_loss, rtol=1e-3)


def test_pixel_inversion_with_resize_and_numpy_targets(lite, pair):
    a, _ = pair
    with torch.no_grad():
        t = [m.numpy() for m in lite(a)]
    res = invert_features(t, lite, size=64, input_size=32, iterations=20, layer_weights=[1, 2, 1, 1, 1],
                          normalize=False)
    assert res.images.shape == (1, 3, 64, 64)
    assert res.loss_history[-1] < res.loss_history[0] / 2
    with pytest.raises(ConfigError, match="input_size.*too small"):
        map_shapes(lite, 8)


def test_dip_inversion_decreases_loss_and_is_deterministic(lite_random, pair):
    a, _ = pair
    with torch.no_grad():
        t = lite_random(a)
    kw = dict(parameterization="dip", size=32, iterations=30, lr=0.01, dip_channels=8, dip_input_channels=4,
              dip_skip_channels=2, dip_scales=3)
    r1 = invert_features(t, lite_random, seed=0, **kw)
    r2 = invert_features(t, lite_random, seed=0, **kw)
    r3 = invert_features(t, lite_random, seed=1, **kw)
    assert r1.images.shape == (1, 3, 32, 32)
    # the input noise makes single steps noisy: compare the last five with the first
    assert r1.loss_history[-5:].mean() < 0.7 * r1.loss_history[0]
    assert torch.equal(r1.images, r2.images)
    np.testing.assert_array_equal(r1.loss_history, r2.loss_history)
    assert not torch.equal(r1.images, r3.images)


def test_gradients_reach_image_and_cnn_unchanged(lite_random, pair):
    a, _ = pair
    before = {k: v.clone() for k, v in lite_random.state_dict().items()}
    x = torch.full((1, 3, 32, 32), 0.5, requires_grad=True)
    maps = lite_random(x)
    sum(m.pow(2).mean() for m in maps).backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    with torch.no_grad():
        t = lite_random(a)
    seen = []
    invert_features(t, lite_random, size=32, iterations=3, callback=lambda i, loss, im, idx: seen.append((i, loss)))
    invert_features(t, lite_random, parameterization="dip", size=32, iterations=2, dip_channels=4,
                    dip_input_channels=2, dip_skip_channels=1)
    assert [s[0] for s in seen] == [0, 1, 2]
    after = lite_random.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in lite_random.parameters())


def test_pixel_is_deterministic_and_progress_runs(lite_random, pair, capsys):
    a, b = pair
    with torch.no_grad():
        t = lite_random(torch.cat([a, b]))
    r1 = invert_features(t, lite_random, size=32, iterations=5, progress=True)
    r2 = invert_features(t, lite_random, size=32, iterations=5)
    assert torch.equal(r1.images, r2.images) and r1.seconds > 0


@pytest.mark.parametrize("kwargs, param", [
    (dict(iterations=0), "iterations"),
    (dict(parameterization="vae"), "parameterization"),
    (dict(parameterization="dip", size=36), "size"),
    (dict(input_size=48), "targets"),
    (dict(layer_weights=[1.0]), "layer_weights"),
    (dict(lr=-1.0), "lr"),
    (dict(ema=1.0), "ema"),
])
def test_bad_arguments_name_the_parameter(lite_random, kwargs, param):
    t = [torch.zeros(1, *s) for s in map_shapes(lite_random, 32)]
    kw = dict(size=32, iterations=1)
    kw.update(kwargs)
    with pytest.raises(ConfigError, match=param):
        invert_features(t, lite_random, **kw)


def test_bad_targets_name_the_parameter(lite_random):
    shapes = map_shapes(lite_random, 32)
    with pytest.raises(ConfigError, match="targets.*3 layers"):
        invert_features([torch.zeros(1, *s) for s in shapes[:2]], lite_random, size=32)
    bad = [torch.zeros(1, *shapes[0]), torch.zeros(2, *shapes[1]), torch.zeros(1, *shapes[2])]
    with pytest.raises(ConfigError, match="targets.*batch"):
        invert_features(bad, lite_random, size=32)
    with pytest.raises(ConfigError, match="targets"):
        invert_features(torch.zeros(1, 16, 16, 16), lite_random, size=32)
    assert isinstance(lite_random, FeatureCNN)


def test_lite0_bad_weights_file(tmp_path):
    bad = tmp_path / "efficientnet-lite0-57934424.pth"
    bad.write_bytes(b"garbage")
    with pytest.raises(DataFormatError, match="efficientnet-lite0-57934424.pth"):
        build_feature_cnn("efficientnet-lite0", weights=bad)
    with pytest.raises(MissingWeightsError):
        build_feature_cnn("efficientnet-lite0", weights=tmp_path / "nope.pth")
