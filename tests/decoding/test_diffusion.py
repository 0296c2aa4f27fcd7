"""brainenc.decoding.diffusion on tiny random-init components (CPU, offline)."""
import re

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from brainenc.decoding import _tiny_diffusion as tiny  # noqa: E402
from brainenc.decoding import diffusion as dif  # noqa: E402
from brainenc.exceptions import ConfigError, DataFormatError, MissingWeightsError  # noqa: E402

CTX = 32
SIZE = 64          # pixels: 8 x 8 latents keep the tiny UNet fast


@pytest.fixture(scope="module")
def unet():
    return tiny.tiny_unclip_unet(CTX)


@pytest.fixture(scope="module")
def vae():
    return tiny.tiny_vae()


def _images(b, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, SIZE, SIZE, generator=g)


def _tokens(b, seed, n=4):
    return torch.randn(b, n, CTX, generator=torch.Generator().manual_seed(seed))


def _rec(unet, vae, tokens, init=None, **kw):
    kw = {"num_steps": 6, "start_step": 2, "image_size": SIZE, **kw}
    return dif.unclip_reconstruct(unet, vae, tokens, init, **kw)


# ------------------------------------------------------------------------------------------------ conditioning

def test_size_crop_vector_matches_diffusers_embedding():
    from diffusers.models.embeddings import get_timestep_embedding

    v = dif.size_crop_vector((768, 512), (16, 40), batch=3)
    assert v.shape == (3, 1024)
    ref = get_timestep_embedding(torch.tensor([768.0, 512.0, 16.0, 40.0]), 256, flip_sin_to_cos=True,
                                 downscale_freq_shift=0).reshape(1, -1)
    assert torch.allclose(v, ref.expand(3, -1), atol=1e-5)
    assert not torch.allclose(dif.size_crop_vector((256, 256)), dif.size_crop_vector((768, 768)))


def test_start_step_arithmetic_matches_sgm_euler():
    a = dif.start_step_arithmetic(50, 14)
    assert a["n_denoise"] == 36 and len(a["timesteps"]) == 36
    assert a["start_sigma"] == pytest.approx(3.6010, abs=1e-3)
    assert int(a["timesteps"][0]) == 999 - 14 * 20 and int(a["timesteps"][-1]) == 19   # trailing spacing
    with pytest.raises(ConfigError, match="start_step"):
        dif.start_step_arithmetic(50, 50)
    with pytest.raises(ConfigError, match="start_step"):
        dif.start_step_arithmetic(50, -1)


def test_unet_called_once_per_step_with_cfg_batch(unet, vae):
    calls = []
    h = unet.register_forward_hook(lambda m, args, kwargs, out: calls.append(args[0].shape[0]), with_kwargs=True)
    try:
        _rec(unet, vae, _tokens(2, 0), _images(2, 0), num_steps=50, start_step=14, image_size=32)
        assert calls == [4] * 36
        calls.clear()
        _rec(unet, vae, _tokens(1, 0), None, num_steps=5, guidance_scale=1.0, image_size=32)
        assert calls == [1] * 5         # from noise: all steps, no unconditional pass at scale 1
    finally:
        h.remove()


# ------------------------------------------------------------------------------------------------ the loop

def test_deterministic_per_seed_and_shape_range(unet, vae):
    tok, img = _tokens(2, 1), _images(2, 1)
    a = _rec(unet, vae, tok, img, seed=3)
    b = _rec(unet, vae, tok, img, seed=3)
    c = _rec(unet, vae, tok, img, seed=4)
    assert a.shape == (2, 3, SIZE, SIZE) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.min() >= 0.1 - 1e-6 and a.max() <= 0.9 + 1e-6      # squeeze 0.8
    raw = _rec(unet, vae, tok, img, seed=3, squeeze=None)
    assert raw.min() >= 0 and raw.max() <= 1
    assert torch.allclose(a, (raw - 0.5) * 0.8 + 0.5, atol=1e-6)


def test_conditioning_and_init_image_reach_the_output(unet, vae):
    img = _images(1, 2)
    base = _rec(unet, vae, _tokens(1, 5), img, guidance_scale=5.0)
    assert not torch.allclose(base, _rec(unet, vae, _tokens(1, 6), img, guidance_scale=5.0))
    assert not torch.allclose(base, _rec(unet, vae, _tokens(1, 5), img, guidance_scale=0.0))
    assert not torch.allclose(base, _rec(unet, vae, _tokens(1, 5), _images(1, 3), guidance_scale=5.0))
    assert not torch.allclose(base, _rec(unet, vae, _tokens(1, 5), img, original_size=(768, 768)))
    noise = _rec(unet, vae, _tokens(1, 5), None, num_steps=3)
    assert noise.shape == (1, 3, SIZE, SIZE)


def test_init_image_resized_to_image_size(unet, vae):
    # a 2x larger init image is resized: the output has image_size
    out = _rec(unet, vae, _tokens(1, 0), torch.rand(1, 3, 2 * SIZE, 2 * SIZE))
    assert out.shape == (1, 3, SIZE, SIZE)


def test_validation_errors(unet, vae):
    with pytest.raises(ConfigError, match="tokens"):
        _rec(unet, vae, torch.randn(1, 4, CTX + 1), _images(1, 0))
    with pytest.raises(ConfigError, match="start_step"):
        _rec(unet, vae, _tokens(1, 0), _images(1, 0), num_steps=5, start_step=5)
    with pytest.raises(ConfigError, match="init_images"):
        _rec(unet, vae, _tokens(2, 0), _images(1, 0))
    with pytest.raises(ConfigError, match="image_size"):
        _rec(unet, vae, _tokens(1, 0), _images(1, 0), image_size=30)


# ------------------------------------------------------------------------------------------------ single file

_RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
        "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_ATT = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _res(rest):
    head, _, tail = rest.partition(".")
    return _RES.get(head, head) + "." + tail


def _unet_to_ldm(sd, lpb):
    """Invert diffusers' ``convert_ldm_unet_checkpoint``: diffusers UNet keys -> sgm ``UNetModel`` keys."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = {**DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"], **DIFFUSERS_TO_LDM_MAPPING["unet"]["class_embed_type"]}
    has_attn = {int(k.split(".")[1]) for k in sd if k.startswith("up_blocks.") and ".attentions." in k}
    out = {}
    for k, v in sd.items():
        if k in fixed:
            out[fixed[k]] = v
            continue
        m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", k)
        if m:
            kind, blk, part, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            if kind == "down":
                base = 1 + blk * (lpb + 1)
                name = {"resnets": f"input_blocks.{base + j}.0.{_res(rest)}",
                        "attentions": f"input_blocks.{base + j}.1.{rest}",
                        "downsamplers": f"input_blocks.{base + lpb}.0.op.{rest.removeprefix('conv.')}"}[part]
            else:
                base = blk * (lpb + 1)       # diffusers up blocks have lpb + 1 resnets
                up = 2 if blk in has_attn else 1
                name = {"resnets": f"output_blocks.{base + j}.0.{_res(rest)}",
                        "attentions": f"output_blocks.{base + j}.1.{rest}",
                        "upsamplers": f"output_blocks.{base + lpb}.{up}.{rest}"}[part]
            out[name] = v
            continue
        m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", k)
        if m:
            part, j, rest = m.groups()
            if part == "attentions":
                out[f"middle_block.1.{rest}"] = v
            else:
                out[f"middle_block.{2 * int(j)}.{_res(rest)}"] = v
            continue
        raise AssertionError(f"unmapped UNet key {k}")
    return {"model.diffusion_model." + k: v for k, v in out.items()}


def _vae_to_ldm(sd, n_levels):
    """Invert diffusers' ``convert_ldm_vae_checkpoint``: diffusers VAE keys -> LDM ``first_stage_model`` keys."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    out = {}
    for k, v in sd.items():
        if k in fixed:
            out[fixed[k]] = v
            continue
        m = re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", k)
        if m:
            coder, kind, i, part, j, rest = m.groups()
            lvl = int(i) if kind == "down" else n_levels - 1 - int(i)
            rest = rest.replace("conv_shortcut", "nin_shortcut")
            if part == "resnets":
                out[f"{coder}.{kind}.{lvl}.block.{j}.{rest}"] = v
            else:
                out[f"{coder}.{kind}.{lvl}.{'downsample' if kind == 'down' else 'upsample'}.{rest}"] = v
            continue
        m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)", k)
        if m:
            coder, part, j, rest = m.groups()
            rest = rest.replace("conv_shortcut", "nin_shortcut")
            if part == "resnets":
                out[f"{coder}.mid.block_{int(j) + 1}.{rest}"] = v
            else:
                mod, _, p = rest.rpartition(".")
                out[f"{coder}.mid.attn_1.{_VAE_ATT[mod]}.{p}"] = v[:, :, None, None] if v.ndim == 2 else v
            continue
        raise AssertionError(f"unmapped VAE key {k}")
    return {"first_stage_model." + k: v for k, v in out.items()}


def _write_unclip_files(tmp_path, unet, vae):
    import yaml
    from safetensors.torch import save_file

    state = {**_unet_to_ldm(unet.state_dict(), unet.config.layers_per_block),
             **_vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels)),
             "conditioner.embedders.0.dummy": torch.zeros(3)}       # other keys (the CLIP tower) are ignored
    ckpt, cfg = tmp_path / "unclip6_tiny.safetensors", tmp_path / "unclip6_tiny.yaml"
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(ckpt))
    cfg.write_text(yaml.safe_dump(tiny.tiny_unclip_yaml(CTX)))
    return ckpt, cfg


def test_load_sdxl_unclip_round_trip_from_ldm_layout(tmp_path, unet, vae):
    ckpt, cfg = _write_unclip_files(tmp_path, unet, vae)
    u2, v2 = dif.load_sdxl_unclip(ckpt, cfg)
    assert v2.config.scaling_factor == pytest.approx(0.13025)
    assert u2.config.class_embed_type == "projection" and u2.config.cross_attention_dim == CTX
    g = torch.Generator().manual_seed(0)
    x, tok = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, CTX, generator=g)
    y = dif.size_crop_vector((256, 256), batch=2)
    with torch.no_grad():
        for t in (999, 19):
            a = unet(x, t, encoder_hidden_states=tok, class_labels=y).sample
            b = u2(x, t, encoder_hidden_states=tok, class_labels=y).sample
            assert torch.allclose(a, b, atol=1e-5)
        img = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
        za, zb = vae.encode(img).latent_dist.mean, v2.encode(img).latent_dist.mean
        assert torch.allclose(za, zb, atol=1e-5)
        assert torch.allclose(vae.decode(za).sample, v2.decode(za).sample, atol=1e-5)


def test_load_sdxl_unclip_errors(tmp_path, unet, vae):
    with pytest.raises(MissingWeightsError, match="unclip6_epoch0_step110000.ckpt.*pscotti/mindeyev2"):
        dif.load_sdxl_unclip(tmp_path / "nope.ckpt", tmp_path / "unclip6.yaml")
    ckpt, cfg = _write_unclip_files(tmp_path, unet, vae)
    bad = tmp_path / "garbage.ckpt"
    bad.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(DataFormatError, match="garbage.ckpt"):
        dif.load_sdxl_unclip(bad, cfg)
    badyaml = tmp_path / "bad.yaml"
    badyaml.write_text("model: {params: {}}\n")
    with pytest.raises(DataFormatError, match="bad.yaml"):
        dif.load_sdxl_unclip(ckpt, badyaml)
    from safetensors.torch import save_file
    other = tmp_path / "other.safetensors"
    save_file({"model.diffusion_model.foo": torch.zeros(2), "first_stage_model.bar": torch.zeros(2)}, str(other))
    with pytest.raises(DataFormatError, match="other.safetensors"):
        dif.load_sdxl_unclip(other, cfg)


# ------------------------------------------------------------------------------------------------ pipelines

@pytest.fixture(scope="module")
def sd_pipe():
    return tiny.tiny_sd_img2img_pipeline()


@pytest.fixture(scope="module")
def unclip_pipe():
    return tiny.tiny_stable_unclip_pipeline(image_encoder=False)


def test_img2img_reconstruct(sd_pipe):
    img = _images(2, 0)
    pe = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(0))
    kw = dict(strength=0.5, num_steps=4, guidance_scale=5.0)
    a = dif.img2img_reconstruct(sd_pipe, img, prompt_embeds=pe, seed=1, **kw)
    assert a.shape == (2, 3, SIZE, SIZE) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, dif.img2img_reconstruct(sd_pipe, img, prompt_embeds=pe, seed=1, **kw))
    assert not torch.allclose(a, dif.img2img_reconstruct(sd_pipe, img, prompt_embeds=pe * -1, seed=1, **kw))
    assert not torch.allclose(a, dif.img2img_reconstruct(sd_pipe, img, prompt_embeds=pe, seed=2, **kw))
    p = dif.img2img_reconstruct(sd_pipe, img, prompt="", seed=1, **kw)
    assert p.shape == a.shape
    with pytest.raises(ConfigError, match="prompt_embeds"):
        dif.img2img_reconstruct(sd_pipe, img, prompt_embeds=pe[:, :, :8], **kw)


def test_stable_unclip_reconstruct(unclip_pipe):
    emb = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    img = _images(2, 0)
    kw = dict(num_steps=4, guidance_scale=5.0, image_size=SIZE)
    a = dif.stable_unclip_reconstruct(unclip_pipe, emb, img, start_step=1, seed=1, **kw)
    assert a.shape == (2, 3, SIZE, SIZE) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, dif.stable_unclip_reconstruct(unclip_pipe, emb, img, start_step=1, seed=1, **kw))
    assert not torch.allclose(a, dif.stable_unclip_reconstruct(unclip_pipe, -emb, img, start_step=1, seed=1, **kw))
    assert not torch.allclose(a, dif.stable_unclip_reconstruct(unclip_pipe, emb, _images(2, 9), start_step=1,
                                                               seed=1, **kw))
    n = dif.stable_unclip_reconstruct(unclip_pipe, emb, None, seed=1, noise_level=100, **kw)
    assert n.shape == a.shape and torch.equal(
        n, dif.stable_unclip_reconstruct(unclip_pipe, emb, None, seed=1, noise_level=100, **kw))
    with pytest.raises(ConfigError, match="image_embeds"):
        dif.stable_unclip_reconstruct(unclip_pipe, emb[:, :8], img, **kw)


def test_load_pipeline_offline_round_trip(tmp_path, sd_pipe):
    sd_pipe.save_pretrained(tmp_path / "sd")
    p = dif.load_pipeline("img2img", tmp_path / "sd")
    assert type(p).__name__ == "StableDiffusionImg2ImgPipeline"
    img, pe = _images(1, 0), torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(0))
    kw = dict(prompt_embeds=pe, strength=0.5, num_steps=2, guidance_scale=3.0, seed=0)
    assert torch.allclose(dif.img2img_reconstruct(p, img, **kw), dif.img2img_reconstruct(sd_pipe, img, **kw),
                          atol=1e-5)
    up = tiny.tiny_stable_unclip_pipeline()
    up.save_pretrained(tmp_path / "unclip")
    assert type(dif.load_pipeline("stable_unclip", tmp_path / "unclip")).__name__ == "StableUnCLIPImg2ImgPipeline"
    with pytest.raises(MissingWeightsError, match="missing_dir"):
        dif.load_pipeline("img2img", tmp_path / "missing_dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingWeightsError, match="empty"):
        dif.load_pipeline("stable_unclip", tmp_path / "empty")
    with pytest.raises(ConfigError, match="kind"):
        dif.load_pipeline("sdxl", tmp_path / "sd")
