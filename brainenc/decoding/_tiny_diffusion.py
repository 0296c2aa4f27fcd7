"""Tiny random-init diffusion components built from configs (no download), for tests and benchmarks.

Every builder seeds torch's global generator before initialising (``torch.manual_seed(seed)``) so that the same
call gives the same weights, then restores the previous RNG state. Each one builds in well under a second.

The unCLIP UNet and VAE are shaped like MindEye2's SDXL-unCLIP ``unclip6`` (projection class embedding fed by
the 1024-d size/crop vector, cross-attention on a token sequence, three levels with attention on the lower two,
4-level VAE with scaling factor 0.13025) but with widths shrunk, and with 32-group norms as in the original
(LDM/sgm) code, so that ``tiny_unclip_yaml`` describes exactly the same networks and
``from_single_file`` rebuilds them.
"""
from __future__ import annotations

import contextlib

from brainenc.exceptions import MissingDependencyError

__all__ = [
    "tiny_unclip_unet",
    "tiny_vae",
    "tiny_unclip_yaml",
    "tiny_sd_img2img_pipeline",
    "tiny_stable_unclip_pipeline",
]


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise MissingDependencyError(
            "diffusion components need diffusers: pip install diffusers transformers") from None
    return diffusers


@contextlib.contextmanager
def _seeded(seed):
    import torch

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def tiny_unclip_unet(cross_attention_dim=32, *, model_channels=32, layers_per_block=1, seed=0):
    """A tiny ``UNet2DConditionModel`` with the structure of MindEye2's ``unclip6`` UNet.

    Parameters
    ----------
    cross_attention_dim : int
        Width of the conditioning tokens (1664 in ``unclip6``).
    model_channels : int
        Base width (320 in ``unclip6``); a multiple of 32 (the LDM code uses 32-group norms).
    layers_per_block : int
        ResNet blocks per level (2 in ``unclip6``).
    seed : int
        Seed of the random initialisation.

    Returns
    -------
    ``diffusers.UNet2DConditionModel``
        In eval mode; ``class_embed_type="projection"`` with a 1024-d input, heads of width 16.
    """
    d = _diffusers()
    mult = [1, 2, 4]
    with _seeded(seed):
        unet = d.UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=layers_per_block,
            block_out_channels=[model_channels * m for m in mult],
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=[model_channels // 16 * m for m in mult],  # head counts (legacy naming), lists
            transformer_layers_per_block=[1, 1, 2], use_linear_projection=True,
            class_embed_type="projection", projection_class_embeddings_input_dim=1024,
            norm_num_groups=32)
    return unet.eval()


def tiny_vae(*, ch=32, layers_per_block=1, seed=0):
    """A tiny 4-level ``AutoencoderKL`` (downsampling factor 8, ``scaling_factor`` 0.13025 as SDXL's).

    Parameters
    ----------
    ch : int
        Width of every level (a multiple of 32).
    layers_per_block : int
        ResNet blocks per encoder level.
    seed : int
        Seed of the random initialisation.

    Returns
    -------
    ``diffusers.AutoencoderKL``
        In eval mode.
    """
    d = _diffusers()
    with _seeded(seed):
        vae = d.AutoencoderKL(
            in_channels=3, out_channels=3, block_out_channels=[ch] * 4, layers_per_block=layers_per_block,
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            latent_channels=4, norm_num_groups=32, sample_size=256, scaling_factor=0.13025)
    return vae.eval()


def tiny_unclip_yaml(cross_attention_dim=32, *, model_channels=32, layers_per_block=1, vae_ch=32,
                     vae_layers_per_block=1):
    """The ``unclip6.yaml``-style original config (as a dict) of ``tiny_unclip_unet`` and ``tiny_vae``.

    Only the fields diffusers' single-file conversion reads are filled in, with the values ``unclip6.yaml``
    has apart from the shrunk widths.

    Returns
    -------
    dict
        ``{"model": {"params": {"scale_factor", "network_config", "first_stage_config"}}}``.
    """
    return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": {
        "scale_factor": 0.13025,
        "disable_first_stage_autocast": True,
        "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "adm_in_channels": 1024, "num_classes": "sequential", "use_checkpoint": True,
            "in_channels": 4, "out_channels": 4, "model_channels": model_channels,
            "attention_resolutions": [4, 2], "num_res_blocks": layers_per_block, "channel_mult": [1, 2, 4],
            "num_head_channels": 16, "use_linear_in_transformer": True, "transformer_depth": [1, 1, 2],
            "context_dim": cross_attention_dim, "spatial_transformer_attn_type": "softmax-xformers",
            "legacy": False}},
        "first_stage_config": {"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper", "params": {
            "embed_dim": 4, "monitor": "val/rec_loss",
            "ddconfig": {"attn_type": "vanilla-xformers", "double_z": True, "z_channels": 4,
                         "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": vae_ch,
                         "ch_mult": [1, 1, 1, 1], "num_res_blocks": vae_layers_per_block,
                         "attn_resolutions": [], "dropout": 0.0},
            "lossconfig": {"target": "torch.nn.Identity"}}},
    }}}


def _sd_unet(d, class_embed_dim=None):
    kw = {}
    if class_embed_dim is not None:
        kw = dict(class_embed_type="projection", projection_class_embeddings_input_dim=class_embed_dim)
    return d.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64],
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=32, attention_head_dim=[2, 4], use_linear_projection=True, norm_num_groups=8, **kw).eval()


def _sd_vae(d):
    return d.AutoencoderKL(
        block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=8, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4).eval()


def _text(text_encoder):
    if not text_encoder:
        return None, None
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    enc = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32)).eval()
    tok = CLIPTokenizer()          # dummy 3-token vocabulary: every word maps to unk (text does not matter here)
    tok.model_max_length = 77
    return enc, tok


def tiny_sd_img2img_pipeline(*, text_encoder=True, seed=0):
    """A tiny SD-2.1-shaped ``StableDiffusionImg2ImgPipeline`` (UNet 0.8 M params, cross-attention width 32).

    Parameters
    ----------
    text_encoder : bool
        Include a tiny ``CLIPTextModel`` and a dummy ``CLIPTokenizer``; with ``False`` both are ``None`` and the
        pipeline must be called with ``prompt_embeds``.
    seed : int
        Seed of the random initialisation.

    Returns
    -------
    ``diffusers.StableDiffusionImg2ImgPipeline``
        ``safety_checker=None``; a DPM-Solver++ scheduler with SD's settings.
    """
    d = _diffusers()
    with _seeded(seed):
        unet, vae = _sd_unet(d), _sd_vae(d)
        enc, tok = _text(text_encoder)
    sched = d.DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon",
        algorithm_type="dpmsolver++", timestep_spacing="leading", steps_offset=1)
    pipe = d.StableDiffusionImg2ImgPipeline(
        vae=vae, text_encoder=enc, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_stable_unclip_pipeline(*, embed_dim=32, text_encoder=True, image_encoder=True, seed=0):
    """A tiny SD-2.1-unCLIP-shaped ``StableUnCLIPImg2ImgPipeline``.

    The UNet takes ``class_labels`` of width ``2 * embed_dim`` (noised pooled image embedding + noise-level
    embedding), as SD-2.1-unclip does with 1024-d ViT-H embeddings.

    Parameters
    ----------
    embed_dim : int
        Width of the pooled image embedding.
    text_encoder : bool
        Include a tiny text encoder and dummy tokenizer (else both ``None``).
    image_encoder : bool
        Include a tiny ``CLIPVisionModelWithProjection`` and a ``CLIPImageProcessor`` (else both ``None``;
        ``brainenc.decoding.diffusion.stable_unclip_reconstruct`` only needs ``image_embeds``).
    seed : int
        Seed of the random initialisation.

    Returns
    -------
    ``diffusers.StableUnCLIPImg2ImgPipeline``
    """
    d = _diffusers()
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer

    with _seeded(seed):
        unet, vae = _sd_unet(d, class_embed_dim=2 * embed_dim), _sd_vae(d)
        enc, tok = _text(text_encoder)
        img_enc = fe = None
        if image_encoder:
            from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

            img_enc = CLIPVisionModelWithProjection(CLIPVisionConfig(
                hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                patch_size=8, projection_dim=embed_dim)).eval()
            fe = CLIPImageProcessor(crop_size=32, size={"shortest_edge": 32})
        normalizer = StableUnCLIPImageNormalizer(embedding_dim=embed_dim)
    noising = d.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    sched = d.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon",
        timestep_spacing="leading", steps_offset=1, clip_sample=False, set_alpha_to_one=False)
    pipe = d.StableUnCLIPImg2ImgPipeline(
        feature_extractor=fe, image_encoder=img_enc, image_normalizer=normalizer, image_noising_scheduler=noising,
        tokenizer=tok, text_encoder=enc, unet=unet, scheduler=sched, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe
