"""brainenc.synthesis.guidance on tiny random-init priors (CPU, offline, no downloads)."""
import gzip
import json
import math
import os

import numpy as np
import pytest
import torch

d = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers.models.unets.unet_2d import UNet2DOutput  # noqa: E402

from brainenc.exceptions import ConfigError, MissingWeightsError  # noqa: E402
from brainenc.synthesis import (  # noqa: E402
    GuidanceConfig,
    Prior,
    ResponseObjective,
    guided_step,
    initial_noise,
    load_sd_prior,
    make_scheduler,
    rerank,
    synthesize,
)

CTX = 32


# ------------------------------------------------------------------------------------------------ fixtures
def _seeded(seed, fn):
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return fn()
    finally:
        torch.random.set_rng_state(state)


def _sd_unet():
    return d.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64],
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=CTX, attention_head_dim=[2, 4], use_linear_projection=True, norm_num_groups=8)


def _sd_vae():
    return d.AutoencoderKL(block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=8,
                           latent_channels=4, down_block_types=["DownEncoderBlock2D"] * 4,
                           up_block_types=["UpDecoderBlock2D"] * 4)


def _sd_scheduler(**kw):
    return d.DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         prediction_type="epsilon", algorithm_type="dpmsolver++",
                                         timestep_spacing="leading", steps_offset=1, **kw)


class ResidualUNet(d.UNet2DModel):
    """A pixel UNet whose ε is roughly its input plus a small random residual: like a denoiser of near-constant
    images, it keeps the random-init prior's images inside [0, 1], so guidance gradients are not clamped away."""

    def forward(self, sample, timestep, *args, **kwargs):
        return UNet2DOutput(sample=sample + 0.1 * super().forward(sample, timestep).sample)


def _pixel_unet():
    return ResidualUNet(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                        norm_num_groups=8)


@pytest.fixture(scope="module")
def sd():
    unet, vae, pe = _seeded(0, lambda: (_sd_unet(), _sd_vae(), torch.randn(1, 77, CTX)))
    return Prior(unet=unet, scheduler=_sd_scheduler(), vae=vae, prompt_embeds=pe, identity={"test": "tiny-sd"})


@pytest.fixture(scope="module")
def pixel():
    return Prior(unet=_seeded(0, _pixel_unet), scheduler=d.DDPMScheduler(), identity={"test": "tiny-pixel"})


class RegionMeans(torch.nn.Module):
    """Stand-in encoder, V = 4: mean red of the top-left quadrant, mean green, mean blue of the bottom-right
    quadrant, mean brightness."""

    def forward(self, img):
        h = img.shape[-1] // 2
        return torch.stack([img[:, 0, :h, :h].mean((1, 2)), img[:, 1].mean((1, 2)), img[:, 2, h:, h:].mean((1, 2)),
                            img.mean((1, 2, 3))], 1)


class ConvEncoder(torch.nn.Module):
    """A fixed random conv net (V = 6) with a parameter that requires grad (synthesize must freeze it)."""

    def __init__(self):
        super().__init__()
        self.net = _seeded(1, lambda: torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
            torch.nn.Linear(32, 6), torch.nn.Dropout(0.5)))

    def forward(self, img):
        return self.net(torch.nn.functional.interpolate(img, size=16, mode="bilinear", align_corners=False))


ROI = ResponseObjective.roi(np.array([True, False, False, False]), name="red-top-left")


def _cfg(**kw):
    return GuidanceConfig(**{"steps": 4, "batch_size": 3, **kw})


# ------------------------------------------------------------------------------------------------ guided step
def _reference_step(unet, decode, prompt_embeds, scheduler, x_t, t, encoder, objective, scale):
    """The c.2 equations written out with torch.autograd directly."""
    kw = {} if prompt_embeds is None else {"encoder_hidden_states": prompt_embeds.expand(x_t.shape[0], -1, -1)}
    with torch.no_grad():
        eps = unet(x_t, t, **kw).sample
    a = scheduler.alphas_cumprod[int(t)].double()
    sb, sa = torch.sqrt(1 - a).item(), torch.sqrt(a).item()
    x = x_t.clone().requires_grad_(True)
    e = unet(x, t, **kw).sample
    x0 = (x - sb * e) / sa
    xt = sb * x0 + (1 - sb) * x
    loss = -scale * objective(encoder(decode(xt))).sum()
    loss.backward()
    g = -x.grad
    return eps - sb * g, g


@pytest.mark.parametrize("kind", ["sd", "pixel"])
@pytest.mark.parametrize("t", [801, 101])
def test_guided_step_matches_the_equations(kind, t, request):
    prior = request.getfixturevalue(kind)
    enc = RegionMeans()
    x_t = torch.randn(2, *prior.latent_shape, generator=torch.Generator().manual_seed(3))
    t = torch.tensor(t)
    if prior.vae is not None:
        def decode(z):
            return (prior.vae.decode(z / prior.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    else:
        def decode(z):
            return (z / 2 + 0.5).clamp(0, 1)
    scale = 50.0
    want, g = _reference_step(prior.unet, decode, prior.prompt_embeds, prior.scheduler, x_t, t, enc, ROI, scale)
    got, info = guided_step(prior, x_t, t, enc, ROI, scale)
    assert g.abs().max() > 1e-4                         # a real gradient, not one clamped to zero
    tol = 1e-5 * want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=tol)
    assert info["objective"].shape == (2,) and info["grad_norm"].shape == (2,)
    torch.testing.assert_close(info["grad_norm"], g.flatten(1).norm(dim=1), rtol=1e-4, atol=1e-6)
    assert info["alpha_bar"] == pytest.approx(float(prior.scheduler.alphas_cumprod[int(t)]))
    # scale 0: the plain ε
    eps0, _ = guided_step(prior, x_t, t, enc, ROI, 0.0)
    with torch.no_grad():
        torch.testing.assert_close(eps0, prior.eps(x_t, t))


def test_guided_step_per_image_gradient_does_not_depend_on_the_batch(sd):
    enc = RegionMeans()
    x = torch.randn(3, *sd.latent_shape, generator=torch.Generator().manual_seed(4))
    t = torch.tensor(501)
    both, _ = guided_step(sd, x, t, enc, ROI, 100.0)
    one, _ = guided_step(sd, x[1:2], t, enc, ROI, 100.0)
    # float32 kernels differ with the batch size (and the ISA): tolerance scaled to the quantity
    torch.testing.assert_close(both[1:2], one, rtol=1e-4, atol=1e-5 * float(one.abs().max()))


def test_gradient_checkpointing_gives_the_same_step(sd):
    enc = ConvEncoder()
    obj = ResponseObjective.contrast([0, 1], [2, 3], n_voxels=6)
    x = torch.randn(2, *sd.latent_shape, generator=torch.Generator().manual_seed(5))
    t = torch.tensor(701)
    plain, info = guided_step(sd, x, t, enc.eval(), obj, 500.0)
    sd.unet.enable_gradient_checkpointing()
    sd.vae.enable_gradient_checkpointing()
    try:
        ckpt, info2 = guided_step(sd, x, t, enc, obj, 500.0)
    finally:
        sd.unet.disable_gradient_checkpointing()
        sd.vae.disable_gradient_checkpointing()
    assert info["grad_norm"].min() > 0
    torch.testing.assert_close(ckpt, plain, rtol=1e-5, atol=1e-5 * plain.abs().max().item())
    # synthesize turns it on for the run only
    out = synthesize(sd, enc, obj, [0], _cfg(steps=2, gradient_checkpointing=True, scale=10.0))
    assert out["images"].shape == (1, 64, 64, 3)
    assert not sd.unet.is_gradient_checkpointing and not sd.vae.is_gradient_checkpointing


def test_guided_step_rejects_a_non_differentiable_encoder_and_bad_shapes(sd):
    x = torch.randn(1, *sd.latent_shape)

    class Detached(torch.nn.Module):
        def forward(self, img):
            return RegionMeans()(img).detach()

    class Flat(torch.nn.Module):
        def forward(self, img):
            return img.mean((1, 2, 3))

    with pytest.raises(ConfigError, match="carries no gradient"):
        guided_step(sd, x, 500, Detached(), ROI, 1.0)
    with pytest.raises(ConfigError, match=r"responses \[n=1, V\]"):
        guided_step(sd, x, 500, Flat(), ROI, 1.0)
    with pytest.raises(ConfigError, match=r"objective must return a tensor \[n=1\]"):
        guided_step(sd, x, 500, RegionMeans(), lambda y: y.sum(), 1.0)
    with pytest.raises(ConfigError, match="outside the schedule"):
        guided_step(sd, x, 1000, RegionMeans(), ROI, 1.0)


# ------------------------------------------------------------------------------------------------ synthesize
@pytest.mark.parametrize("kind, scale, scheduler", [("sd", 1000.0, "dpm-multistep"), ("pixel", 100.0, "dpm-multistep"),
                                                    ("pixel", 100.0, "ddim")])
def test_guidance_raises_the_objective_against_the_unguided_run(kind, scale, scheduler, request):
    prior = request.getfixturevalue(kind)
    seeds = [0, 1, 2]
    cfg = _cfg(scale=scale, scheduler=scheduler)
    guided = synthesize(prior, RegionMeans(), ROI, seeds, cfg)
    control = synthesize(prior, RegionMeans(), ROI, seeds, cfg, guided=False)
    assert guided["values"].mean() > control["values"].mean() + 0.05, (guided["values"], control["values"])
    assert guided["step_values"].shape == (3, 4) and control["step_values"] is None
    # the recorded values are the encoder's objective on the returned uint8 images
    imgs = torch.from_numpy(guided["images"]).permute(0, 3, 1, 2).float() / 255
    np.testing.assert_allclose(guided["values"], ROI(RegionMeans()(imgs)).numpy(), rtol=1e-6)


def test_result_record(sd):
    enc = ConvEncoder()
    p = next(enc.parameters())
    out = synthesize(sd, enc, ResponseObjective.voxels([1, 3], n_voxels=6), np.array([7, 8]), _cfg(steps=2, scale=5.0))
    assert out["images"].dtype == np.uint8 and out["images"].shape == (2, 64, 64, 3)
    assert out["values"].dtype == np.float32 and out["values"].shape == (2,)
    assert out["seeds"].tolist() == [7, 8] and out["seeds"].dtype == np.int64
    assert out["guided"] is True and out["seconds"] > 0
    rec = {k: out[k] for k in ("config", "objective", "prior")}
    assert json.loads(json.dumps(rec)) == rec
    assert rec["config"]["steps"] == 2 and rec["objective"]["kind"] == "voxels"
    assert rec["prior"]["kind"] == "latent" and rec["prior"]["image_size"] == 64
    assert rec["prior"]["identity"] == {"test": "tiny-sd"}
    assert p.requires_grad and enc.training           # the encoder's state is restored


def _same_image(x, y):
    """Equal up to float differences of batched kernels (ISA / batch size dependent): <= 2 uint8 levels,
    and on average far below one level."""
    d = np.abs(x.astype(int) - y.astype(int))
    return d.max() <= 2 and d.mean() < 0.05


@pytest.mark.parametrize("kind", ["sd", "pixel"])
def test_determinism_and_batch_independence(kind, request):
    prior = request.getfixturevalue(kind)
    cfg3, cfg1 = _cfg(scale=100.0), _cfg(scale=100.0, batch_size=1)
    a = synthesize(prior, RegionMeans(), ROI, [5, 6, 7], cfg3)
    b = synthesize(prior, RegionMeans(), ROI, [5, 6, 7], cfg3)
    assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["values"], b["values"])
    one = synthesize(prior, RegionMeans(), ROI, [6], cfg1)
    torch.testing.assert_close(initial_noise(prior, [5, 6, 7])[1:2], initial_noise(prior, [6]), rtol=0, atol=0)
    assert _same_image(a["images"][1], one["images"][0])
    other = synthesize(prior, RegionMeans(), ROI, [5, 9, 7], cfg3)
    assert _same_image(a["images"][[0, 2]], other["images"][[0, 2]])
    assert not _same_image(a["images"][1], other["images"][1])
    # a batch size that does not divide the seeds
    two = synthesize(prior, RegionMeans(), ROI, [5, 6, 7], _cfg(scale=100.0, batch_size=2))
    assert _same_image(a["images"], two["images"])


def test_sag_runs_changes_the_output_and_restores_the_processor(sd):
    attn = sd.unet.mid_block.attentions[0].transformer_blocks[0].attn1
    before = attn.processor
    seeds = [0, 1]
    for guided in (False, True):
        plain = synthesize(sd, RegionMeans(), ROI, seeds, _cfg(scale=100.0), guided=guided)
        sag = synthesize(sd, RegionMeans(), ROI, seeds, _cfg(scale=100.0, sag_scale=0.75), guided=guided)
        assert sag["images"].shape == plain["images"].shape
        assert np.abs(sag["images"].astype(int) - plain["images"]).max() > 0
        assert attn.processor is before
    again = synthesize(sd, RegionMeans(), ROI, seeds, _cfg(scale=100.0, sag_scale=0.75))
    assert np.array_equal(again["images"], sag["images"])


def test_float16_on_cpu_and_other_dtype_rules(sd):
    with pytest.raises(ConfigError, match="float16.*only on CUDA"):
        synthesize(sd, RegionMeans(), ROI, [0], _cfg(dtype="float16"))


@pytest.mark.parametrize("kw, match", [
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"steps": 2.5}, "steps must be an integer"),
    ({"scale": -1.0}, "scale must be a finite number >= 0"),
    ({"scale": float("nan")}, "scale must be a finite number"),
    ({"scheduler": "euler"}, "scheduler must be one of"),
    ({"sag_scale": -0.5}, "sag_scale must be"),
    ({"gradient_checkpointing": "yes"}, "gradient_checkpointing must be"),
    ({"dtype": "bfloat16"}, "dtype must be one of"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
])
def test_config_check_rejections(kw, match):
    with pytest.raises(ConfigError, match=match) as e:
        GuidanceConfig(**kw).check()
    assert "\n" not in str(e.value)


def test_config_check_against_the_prior(sd, pixel):
    assert GuidanceConfig().check(sd) is not None
    with pytest.raises(ConfigError, match="sag_scale=0.75 needs a conditional UNet.*UNetMidBlock2D ") as e:
        GuidanceConfig(sag_scale=0.75).check(pixel)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="float16"):
        GuidanceConfig(dtype="float16").check(pixel)
    with pytest.raises(ConfigError, match="steps=1001 exceeds"):
        GuidanceConfig(steps=1001).check(pixel)
    with pytest.raises(ConfigError, match="must be a brainenc.synthesis.Prior"):
        GuidanceConfig().check("prior")


def test_synthesize_argument_errors(sd):
    with pytest.raises(ConfigError, match="encoder must be a torch.nn.Module"):
        synthesize(sd, lambda x: x, ROI, [0], _cfg())
    with pytest.raises(ConfigError, match="seeds must be a non-empty"):
        synthesize(sd, RegionMeans(), ROI, [], _cfg())
    with pytest.raises(ConfigError, match="seeds must be a non-empty"):
        synthesize(sd, RegionMeans(), ROI, [0.5], _cfg())
    with pytest.raises(ConfigError, match="config must be a GuidanceConfig"):
        synthesize(sd, RegionMeans(), ROI, [0], {"steps": 2})
    with pytest.raises(ConfigError, match="responses must be"):
        synthesize(sd, RegionMeans(), ResponseObjective.voxels([0], n_voxels=9), [0], _cfg(steps=1))


def test_prior_validation(sd, pixel):
    v = d.DDPMScheduler(prediction_type="v_prediction")
    with pytest.raises(ConfigError, match="prediction_type must be 'epsilon', got 'v_prediction'"):
        Prior(unet=pixel.unet, scheduler=v)
    with pytest.raises(ConfigError, match="prompt_embeds must be"):
        Prior(unet=sd.unet, scheduler=sd.scheduler, vae=sd.vae)
    with pytest.raises(ConfigError, match=rf"\[1, L, {CTX}\]"):
        Prior(unet=sd.unet, scheduler=sd.scheduler, vae=sd.vae, prompt_embeds=torch.zeros(1, 77, CTX + 1))
    with pytest.raises(ConfigError, match="must be None for an unconditional"):
        Prior(unet=pixel.unet, scheduler=pixel.scheduler, prompt_embeds=torch.zeros(1, 77, CTX))
    with pytest.raises(ConfigError, match="pixel-space Prior .* needs a 3-channel UNet"):
        Prior(unet=sd.unet, scheduler=sd.scheduler, prompt_embeds=sd.prompt_embeds)
    with pytest.raises(ConfigError, match="must be a diffusers noise scheduler"):
        Prior(unet=pixel.unet, scheduler=object())
    with pytest.raises(ConfigError, match="Prior.unet must be"):
        Prior(unet=object(), scheduler=pixel.scheduler)
    with pytest.raises(ConfigError, match="sample_size must be square"):
        Prior(unet=pixel.unet, scheduler=pixel.scheduler, sample_size=(16, 8))
    assert sd.image_size == 64 and sd.latent_shape == (4, 8, 8) and sd.conditional and sd.latent
    assert pixel.image_size == 16 and pixel.latent_shape == (3, 16, 16) and not pixel.conditional
    assert not any(p.requires_grad for p in sd.unet.parameters()) and not sd.unet.training


def test_make_scheduler_copies_the_schedule(sd):
    ddim = make_scheduler("ddim", sd.scheduler)
    assert type(ddim).__name__ == "DDIMScheduler"
    torch.testing.assert_close(ddim.alphas_cumprod, sd.scheduler.alphas_cumprod)
    with pytest.raises(ConfigError, match="only deterministic samplers"):
        make_scheduler("dpm-multistep", _sd_scheduler().__class__.from_config(
            {**_sd_scheduler().config, "algorithm_type": "sde-dpmsolver++"}))


def test_rerank():
    v = np.array([0.1, 0.5, 0.5, np.nan, 0.9, -1.0, 0.5, 0.2, 0.3, 0.0])
    assert rerank(v, 0.2).tolist() == [4, 1]
    assert rerank(v, 0.4).tolist() == [4, 1, 2, 6]
    assert rerank(v, 1.0).tolist()[-1] == 3          # NaN last
    assert rerank(v, 0.01).tolist() == [4]           # at least one
    assert rerank(list(range(1000)), 0.2).size == 200
    assert rerank([3.0, 3.0, 3.0], 0.5).tolist() == [0, 1]
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="keep_fraction must be in"):
            rerank(v, bad)
    with pytest.raises(ConfigError, match="non-empty 1-D"):
        rerank([], 0.2)


# ------------------------------------------------------------------------------------------------ load_sd_prior
def _clip_tokenizer():
    """The real CLIP BPE rebuilt from open_clip's bundled vocabulary (no download), as SD-2 uses it."""
    open_clip = pytest.importorskip("open_clip")
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    bpe = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, pad_token="!")
    tok.model_max_length = 77
    return tok


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    from transformers import CLIPTextConfig, CLIPTextModel

    def build():
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=CTX, intermediate_size=37,
                                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                            projection_dim=CTX)).eval()
        return d.StableDiffusionPipeline(vae=_sd_vae(), text_encoder=text, tokenizer=_clip_tokenizer(),
                                         unet=_sd_unet(), scheduler=_sd_scheduler(), safety_checker=None,
                                         feature_extractor=None, requires_safety_checker=False)

    pipe = _seeded(0, build)
    folder = tmp_path_factory.mktemp("sd") / "tiny-sd"
    pipe.save_pretrained(folder)
    return folder, pipe


def test_load_sd_prior_round_trip(sd_folder):
    folder, pipe = sd_folder
    prior = load_sd_prior(folder)
    assert isinstance(prior, Prior) and prior.latent and prior.conditional and prior.image_size == 64
    for a, b in zip(prior.unet.state_dict().values(), pipe.unet.state_dict().values()):
        assert torch.equal(a, b)
    want, _ = pipe.encode_prompt([""], "cpu", 1, False)
    assert prior.prompt_embeds.shape == (1, 77, CTX)
    torch.testing.assert_close(prior.prompt_embeds, want, rtol=0, atol=0)
    ident = prior.identity
    assert ident["kind"] == "stable-diffusion" and ident["folder"] == str(folder.resolve())
    assert all(str(ident["weights"][k]).startswith("sha256:") for k in ("unet", "vae", "text_encoder"))
    assert type(prior.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert json.loads(json.dumps(prior.describe())) == prior.describe()
    out = synthesize(prior, RegionMeans(), ROI, [0], _cfg(steps=2, scale=10.0))
    assert out["images"].shape == (1, 64, 64, 3)
    ddim = load_sd_prior(folder, scheduler="ddim", hash_weights=False)
    assert type(ddim.scheduler).__name__ == "DDIMScheduler" and "weights" not in ddim.identity


def test_load_sd_prior_reads_the_hub_tokenizer_layout(sd_folder, tmp_path):
    """SD-2.1-base ships tokenizer/vocab.json + merges.txt (no tokenizer.json)."""
    import shutil

    folder, pipe = sd_folder
    copy = tmp_path / "hub-layout"
    shutil.copytree(folder, copy)
    tok = pipe.tokenizer
    (copy / "tokenizer" / "tokenizer.json").unlink()
    (copy / "tokenizer" / "vocab.json").write_text(json.dumps(tok.get_vocab()))
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    lines = [m if isinstance(m, str) else " ".join(m) for m in merges]
    (copy / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n")
    prior = load_sd_prior(copy, hash_weights=False)
    torch.testing.assert_close(prior.prompt_embeds, load_sd_prior(folder, hash_weights=False).prompt_embeds)
    # and without any vocabulary file: refused, not a silent 3-token dummy tokenizer
    (copy / "tokenizer" / "vocab.json").unlink()
    (copy / "tokenizer" / "merges.txt").unlink()
    with pytest.raises(MissingWeightsError, match="tokenizer/ has no vocabulary"):
        load_sd_prior(copy, hash_weights=False)


def test_load_sd_prior_missing_or_incomplete_folder(sd_folder, tmp_path):
    import shutil

    missing = tmp_path / "nowhere" / "sd21"
    with pytest.raises(MissingWeightsError) as e:
        load_sd_prior(missing)
    msg = str(e.value)
    assert "\n" not in msg and str(missing) in msg and "stable-diffusion-2-1-base" in msg and "unet/" in msg
    folder, _ = sd_folder
    part = tmp_path / "partial"
    shutil.copytree(folder, part)
    shutil.rmtree(part / "text_encoder")
    with pytest.raises(MissingWeightsError, match=r"incomplete Stable Diffusion folder \(missing text_encoder/\)"):
        load_sd_prior(part)
    shutil.copytree(folder / "text_encoder", part / "text_encoder")
    for f in (part / "unet").glob("diffusion_pytorch_model*"):
        f.unlink()
    with pytest.raises(MissingWeightsError, match=r"cannot load unet/ \(OSError") as e:
        load_sd_prior(part)
    assert "\n" not in str(e.value) and str(part) in str(e.value)


def test_load_sd_prior_rejects_v_prediction(sd_folder, tmp_path):
    import shutil

    folder, _ = sd_folder
    v = tmp_path / "v-pred"
    shutil.copytree(folder, v)
    cfg_path = v / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "prediction_type": "v_prediction"}))
    with pytest.raises(ConfigError, match="prediction_type must be 'epsilon', got 'v_prediction'"):
        load_sd_prior(v, hash_weights=False)
    with pytest.raises(ConfigError, match="scheduler must be one of"):
        load_sd_prior(folder, scheduler="pndm")


def test_initial_noise_is_per_seed():
    p = Prior(unet=_seeded(0, _pixel_unet), scheduler=d.DDPMScheduler())
    a = initial_noise(p, [3, 4])
    assert a.shape == (2, 3, 16, 16) and a.dtype == torch.float32
    torch.testing.assert_close(a[0], torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))[0])
    assert math.isclose(float(a.std()), 1.0, abs_tol=0.2)
