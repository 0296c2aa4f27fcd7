"""Tests of brainenc.metrics.reconstruction (recon_metrics.md §2-§6) with random-init stand-in networks."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from brainenc.exceptions import ConfigError, DataFormatError, MissingWeightsError
from brainenc.metrics import reconstruction as R

skdata = pytest.importorskip("skimage.data")


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def photos():
    """8 distinct 64x64 uint8 crops of bundled real photos (cat() == chelsea(), so only chelsea is used)."""
    imgs = []
    for im in (skdata.astronaut(), skdata.chelsea(), skdata.coffee()):
        h, w = im.shape[:2]
        for y, x in ((0, 0), (h // 3, w // 3), (h - 128, w - 128)):
            imgs.append(im[y:y + 128:2, x:x + 128:2])
    return np.stack(imgs[:8])


def _blur(im, sigma):
    from skimage.filters import gaussian

    return gaussian(im, sigma=sigma, channel_axis=-1)


# ---------------------------------------------------------------------------------------------- two-way
def _two_way_loop(reals, preds):
    n = len(reals)
    per = []
    for j in range(n):
        cong = np.corrcoef(reals[j], preds[j])[0, 1]
        wins = sum(np.corrcoef(reals[i], preds[j])[0, 1] < cong for i in range(n) if i != j)
        per.append(wins / (n - 1))
    return np.array(per)


def test_two_way_identity_is_one():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(40, 30))
    assert R.two_way_identification(f, f) == 1.0
    assert np.array_equal(R.two_way_identification(f, f, return_avg=False), np.ones(40))


def test_two_way_shuffled_is_chance():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(60, 50))
    perm = np.roll(np.arange(60), 7)
    shuffled = R.two_way_identification(f, f[perm])
    independent = R.two_way_identification(f, rng.normal(size=(60, 50)))
    assert abs(shuffled - 0.5) < 0.08
    assert abs(independent - 0.5) < 0.08


def test_two_way_matches_definition_loop():
    rng = np.random.default_rng(2)
    reals = rng.normal(size=(12, 20))
    preds = reals + rng.normal(scale=2.0, size=reals.shape)
    per = R.two_way_identification(reals, preds, return_avg=False)
    assert np.array_equal(per, _two_way_loop(reals, preds))
    assert 0.0 < per.mean() < 1.0
    # trailing dims are flattened
    assert R.two_way_identification(reals.reshape(12, 4, 5), preds.reshape(12, 4, 5)) == pytest.approx(per.mean())


def test_two_way_ties_count_as_failures():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(2, 16))
    feats = np.stack([a, a, b])  # images 0 and 1 identical: a tie for each other's reconstruction
    per = R.two_way_identification(feats, feats, return_avg=False)
    assert np.array_equal(per, [0.5, 0.5, 1.0])
    assert R.two_way_identification(feats, feats) == pytest.approx(2 / 3)
    # constant (NaN-correlation) features are failures too, never successes
    feats2 = np.stack([a, np.zeros(16), b])
    per2 = R.two_way_identification(feats2, feats2, return_avg=False)
    assert per2[1] == 0.0


def test_two_way_input_errors():
    f = np.ones((3, 4))
    with pytest.raises(DataFormatError):
        R.two_way_identification(f, np.ones((4, 4)))
    with pytest.raises(DataFormatError):
        R.two_way_identification(f[:1], f[:1])
    with pytest.raises(ConfigError, match="'metric'"):
        R.two_way_identification(f, f, metric="cosine")


# ---------------------------------------------------------------------------------------------- PixCorr
def test_pixcorr_perfect_and_input_layouts(photos):
    import torch

    assert R.pixcorr(photos, photos) == pytest.approx(1.0, abs=1e-12)
    noisy = np.clip(photos / 255.0 + np.random.default_rng(0).normal(scale=0.2, size=photos.shape), 0, 1)
    v_np = R.pixcorr(photos, noisy)
    v_t = R.pixcorr(torch.from_numpy(photos).permute(0, 3, 1, 2), torch.from_numpy(noisy).permute(0, 3, 1, 2))
    assert v_np == pytest.approx(v_t, rel=1e-6)
    assert 0.2 < v_np < 0.99
    with pytest.raises(DataFormatError):
        R.pixcorr(photos.transpose(0, 3, 1, 2), photos.transpose(0, 3, 1, 2))  # numpy must be channels-last


def test_pixcorr_is_flattened_pearson_without_resize(photos):
    rng = np.random.default_rng(4)
    pred = photos / 255.0 + rng.normal(scale=0.3, size=photos.shape)
    ref = np.mean([np.corrcoef((photos[i] / 255.0).ravel(), pred[i].ravel())[0, 1] for i in range(len(photos))])
    assert R.pixcorr(photos, pred, resize_first=None, size=64) == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("a,b", [(0.5, 0.1), (3.0, -0.4), (1.0, 0.7)])
def test_pixcorr_affine_invariance(photos, a, b):
    rng = np.random.default_rng(5)
    pred = np.clip(_blur(photos[:4], 1) + rng.normal(scale=0.1, size=photos[:4].shape), 0, 1)
    base = R.pixcorr(photos[:4], pred)
    assert R.pixcorr(photos[:4], a * pred + b) == pytest.approx(base, rel=1e-5, abs=1e-7)
    assert R.pixcorr(photos[:4], -a * pred + b) == pytest.approx(-base, rel=1e-5, abs=1e-7)


# ---------------------------------------------------------------------------------------------- SSIM
@pytest.fixture(scope="module")
def astronaut_pair():
    im = skdata.astronaut()
    return im[None], _blur(im, 6)[None]


def test_ssim_variants_on_real_photo(astronaut_pair):
    gt, blurred = astronaut_pair
    # native 512, no resize: the values measured in diffusers_offline.md §4 (0.5851 / 0.6710)
    two_d = R.ssim(gt, blurred, resize_first=None, size=512)
    col = R.ssim(gt, blurred, resize_first=None, size=512, mode="columnwise_legacy")
    assert two_d == pytest.approx(0.5851, abs=0.01)
    assert col == pytest.approx(0.6710, abs=0.01)
    # the MindEye2 pipeline (256 -> 425): column-wise exceeds 2-D by roughly the §4 margin
    me2 = R.ssim_mindeye2(gt, blurred)
    legacy = R.ssim_columnwise_legacy(gt, blurred)
    assert 0.5 < me2 < 0.75
    assert 0.04 < legacy - me2 < 0.15
    assert R.ssim_mindeye2(gt, gt) == pytest.approx(1.0, abs=1e-9)


def test_ssim_variants_noised_and_unrelated():
    gt = skdata.chelsea()[None]
    rng = np.random.default_rng(6)
    noised = np.clip(_blur(gt[0], 2) + rng.normal(scale=0.05, size=gt[0].shape), 0, 1)[None]
    assert R.ssim_columnwise_legacy(gt, noised) > R.ssim_mindeye2(gt, noised)
    other = skdata.coffee()[None]
    assert R.ssim_mindeye2(gt, other) < R.ssim_mindeye2(gt, noised)


def test_ssim_skimage_equals_structural_similarity_exactly(astronaut_pair):
    from skimage.color import rgb2gray
    from skimage.metrics import structural_similarity

    gt, blurred = astronaut_pair
    g1, g2 = rgb2gray(gt[0] / 255.0), rgb2gray(blurred[0])
    ref = structural_similarity(g2, g1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
    assert R.ssim_skimage(g1, g2) == ref
    ref_col = structural_similarity(g2, g1, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=1.0)
    assert R.ssim_skimage(g1, g2, mode="columnwise_legacy") == ref_col
    # the full pipeline without resizing reduces to the same call on its float32 images (as MindEye2's tensors)
    f1 = rgb2gray((gt[0].astype(np.float32) / 255.0).astype(np.float64))
    f2 = rgb2gray(blurred[0].astype(np.float32).astype(np.float64))
    ref32 = structural_similarity(f2, f1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
    assert R.ssim_mindeye2(gt, blurred, resize_first=None, size=512) == ref32
    assert ref32 == pytest.approx(ref, abs=1e-8)
    with pytest.raises(ConfigError, match="'mode'"):
        R.ssim(gt, blurred, mode="multichannel")


# ---------------------------------------------------------------------------------------------- networks
def test_alexnet_random_identity_and_misaligned(photos):
    assert R.feature_metric("alexnet", 2, photos, photos, weights="random", batch_size=3) == 1.0
    assert R.feature_metric("alexnet", "5", photos, photos, weights="random") == 1.0
    misaligned = R.feature_metric("alexnet", 2, photos, np.roll(photos, 1, axis=0), weights="random")
    assert misaligned < 0.9


def test_feature_metric_errors(photos, tmp_path):
    with pytest.raises(ConfigError, match="'network'"):
        R.feature_metric("vgg", None, photos, photos, weights="random")
    with pytest.raises(ConfigError, match="'layer'"):
        R.feature_metric("alexnet", 3, photos, photos, weights="random")
    with pytest.raises(ConfigError, match="'layer'"):
        R.feature_metric("inception", "fc", photos, photos, weights="random")
    with pytest.raises(MissingWeightsError, match="weights="):
        R.feature_metric("alexnet", 2, photos, photos)
    with pytest.raises(MissingWeightsError, match="not found"):
        R.feature_metric("efficientnet", None, photos, photos, weights=str(tmp_path / "nope.pth"))
    with pytest.raises(ConfigError, match="'batch_size'"):
        R.feature_metric("alexnet", 2, photos, photos, weights="random", batch_size=0)


def test_efficientnet_distance_and_weights_file(photos, tmp_path):
    import torch
    from torchvision.models import efficientnet_b1

    real, pred = photos[:4], np.roll(photos[:4], 1, axis=0)
    assert R.feature_metric("efficientnet", None, real, real, weights="random") == pytest.approx(0.0, abs=1e-9)
    d_random = R.feature_metric("efficientnet", None, real, pred, weights="random", seed=0)
    assert 0.0 < d_random < 2.0
    torch.manual_seed(0)
    sd = efficientnet_b1(weights=None).state_dict()
    path = tmp_path / "effnet.pth"
    torch.save(sd, path)
    d_file = R.feature_metric("effnet", "avgpool", real, pred, weights=str(path))
    assert d_file == pytest.approx(d_random, rel=1e-6)
    bad = tmp_path / "bad.pth"
    torch.save({"w": torch.zeros(1)}, bad)
    with pytest.raises(DataFormatError, match="does not match"):
        R.feature_metric("efficientnet", None, real, pred, weights=str(bad))


def test_inception_random_identity(photos):
    feats = R.extract_features("inception_v3", None, photos[:3], weights="random")
    assert feats.shape == (3, 2048)
    assert R.feature_metric("inception", "avgpool", photos[:3], photos[:3], weights="random") == 1.0


def test_swav_checkpoint_key_remapping(photos, tmp_path):
    import torch
    from torchvision.models import resnet50

    torch.manual_seed(0)
    sd = {f"module.{k}": v for k, v in resnet50(weights=None).state_dict().items() if not k.startswith("fc.")}
    sd["module.projection_head.0.weight"] = torch.zeros(4, 4)  # SwAV extras are ignored (strict=False)
    path = tmp_path / "swav_800ep_pretrain.pth.tar"
    torch.save(sd, path)
    real, pred = photos[:3], photos[[1, 2, 0]]
    assert R.feature_metric("swav", None, real, pred, weights=str(path)) == pytest.approx(
        R.feature_metric("swav", None, real, pred, weights="random", seed=0), rel=1e-6)
    torch.save({k: v for k, v in list(sd.items())[:5]}, path)
    with pytest.raises(DataFormatError, match="lacks"):
        R.feature_metric("swav", None, real, pred, weights=str(path))


def test_clip_plumbing_with_tiny_model(photos):
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    import torch

    torch.manual_seed(0)
    tiny = open_clip.model.CLIP(embed_dim=32,
                                vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=14, image_size=224),
                                text_cfg=CLIPTextCfg(layers=1, width=32, heads=2), quick_gelu=True)
    assert R.feature_metric("clip", None, photos[:5], photos[:5], weights="random", clip_model=tiny) == 1.0


def test_score_reconstructions_runs_each_network_once(photos, monkeypatch):
    calls = []
    orig = R._build_network

    def counting(network, weights, **kw):
        calls.append(network)
        return orig(network, weights, **kw)

    monkeypatch.setattr(R, "_build_network", counting)
    pred = np.clip(_blur(photos, 2), 0, 1)
    out = R.score_reconstructions(photos, pred, metrics=("pixcorr", "ssim", "alexnet2", "alexnet5"),
                                  weights="random", batch_size=4, subjects=[1], repeat_handling="averaged")
    assert calls == ["alexnet"]
    assert out["n"] == len(photos)
    assert set(out["metrics"]) == {"pixcorr", "ssim", "alexnet2", "alexnet5"}
    assert out["metrics"]["alexnet2"] == R.feature_metric("alexnet", 2, photos, pred, weights="random")
    assert out["weights"]["alexnet"]["source"] == "random-init"
    assert out["directions"]["alexnet5"] == "higher"
    assert out["variants"]["ssim"].startswith("2d")
    for key in ("torch", "torchvision", "scikit-image", "open_clip", "numpy"):
        assert key in out["versions"]
    assert out["versions"]["scikit-image"] is not None
    assert out["options"]["blurry_blend"] == 0.0

    # blur blend (§2): 0 == no blurry; 0.25 changes the pixel metrics; compat flips SSIM to column-wise
    blurry = np.clip(_blur(photos, 4), 0, 1)
    same = R.score_reconstructions(photos, pred, metrics=("pixcorr",), blurry=blurry, blurry_blend=0.0)
    assert same["metrics"]["pixcorr"] == pytest.approx(out["metrics"]["pixcorr"], rel=1e-9)
    blended = R.score_reconstructions(photos, pred, metrics=("pixcorr", "ssim"), blurry=blurry,
                                      brain_diffuser_compat=True)
    assert blended["options"]["blurry_blend"] == 0.25
    assert blended["metrics"]["pixcorr"] != out["metrics"]["pixcorr"]
    assert blended["options"]["ssim_mode"] == "columnwise_legacy"

    with pytest.raises(ConfigError, match="'metrics'"):
        R.score_reconstructions(photos, pred, metrics=("fid",))
    with pytest.raises(MissingWeightsError):
        R.score_reconstructions(photos, pred, metrics=("alexnet2",))


def test_weights_identity_records_sha256(photos, tmp_path):
    import hashlib

    import torch
    from torchvision.models import efficientnet_b1

    path = tmp_path / "effnet.pth"
    torch.save(efficientnet_b1(weights=None).state_dict(), path)
    out = R.score_reconstructions(photos[:3], photos[:3], metrics=("effnet",), weights={"efficientnet": str(path)})
    assert out["weights"]["efficientnet"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert out["metrics"]["effnet"] == pytest.approx(0.0, abs=1e-9)
    assert out["directions"]["effnet"] == "lower"


def test_module_import_is_torch_free():
    code = "import sys, brainenc.metrics.reconstruction; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


def test_score_sets_share_real_features_and_n_test(photos):
    from brainenc.metrics import score_reconstruction_sets, score_reconstructions

    n = len(photos)
    res = score_reconstruction_sets(photos, {"same": photos, "reversed": photos[::-1]},
                                    ["pixcorr", "alexnet2"], weights="random", n_test=n - 1)
    assert res["n"] == n - 1 and res["options"]["n_test"] == n - 1
    assert res["sets"]["same"]["metrics"]["alexnet2"] == 1.0
    assert res["sets"]["reversed"]["metrics"]["alexnet2"] < 0.9
    # one set through score_reconstruction_sets == score_reconstructions on the same first n-1 pairs
    single = score_reconstructions(photos[:n - 1], photos[::-1][:n - 1], ["pixcorr", "alexnet2"], weights="random")
    assert single["metrics"] == pytest.approx(res["sets"]["reversed"]["metrics"], rel=1e-9)
    with pytest.raises(DataFormatError, match="n_test"):
        score_reconstruction_sets(photos, {"same": photos}, ["pixcorr"], n_test=n + 1)
    with pytest.raises(ConfigError, match="blurry"):
        score_reconstruction_sets(photos, {"same": photos}, ["pixcorr"], blurry={"other": photos})
