"""Image generation from decoded CLIP features with latent diffusion models.

Two routes:

- **SDXL-unCLIP** (MindEye2's ``unclip6`` checkpoint, the route Brain-IT uses): ``load_sdxl_unclip`` converts
  the generative-models (sgm) checkpoint with diffusers' ``from_single_file`` and ``unclip_reconstruct`` runs
  our own Euler loop (sgm's ``EulerEDMSampler`` + ``VanillaCFG``), conditioned on a 256-token CLIP sequence plus the
  size/crop vector of ``size_crop_vector``, optionally starting from a low-level image at ``start_step``.
- **diffusers pipelines** for users who have SD-2.1-unclip or SD img2img weights as a local diffusers folder:
  ``load_pipeline``, ``stable_unclip_reconstruct`` (pooled image embedding) and
  ``img2img_reconstruct`` (predicted text-space tokens).

brainenc never downloads weights: everything is read from local paths. diffusers is imported lazily.
"""
from __future__ import annotations

import math
import os

import torch

from brainenc.exceptions import ConfigError, DataFormatError, MissingDependencyError, MissingWeightsError

__all__ = [
    "size_crop_vector",
    "euler_scheduler",
    "start_step_arithmetic",
    "load_sdxl_unclip",
    "unclip_reconstruct",
    "load_pipeline",
    "stable_unclip_reconstruct",
    "img2img_reconstruct",
]

_UNCLIP_HINT = ("MindEye2's unclip6_epoch0_step110000.ckpt and unclip6.yaml "
                "(HF dataset pscotti/mindeyev2)")


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise MissingDependencyError(
            "image generation needs diffusers: pip install diffusers transformers") from None
    return diffusers


# ----------------------------------------------------------------------------------------------------------------
# conditioning and step arithmetic
# ----------------------------------------------------------------------------------------------------------------

def _sinusoid(values, dim=256, max_period=10000.0):
    """cos-first sinusoidal embedding of each value: ``[cos(v f_k), sin(v f_k)]``, ``f_k = P^(-k / (dim/2))``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = values.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def size_crop_vector(original_size=(256, 256), crop_coords_top_left=(0, 0), batch=1):
    """The SDXL vector condition ``[original_size, crop_coords_top_left]`` of ``unclip6`` (1024-d).

    Each of the four numbers ``(H, W, top, left)`` gets a 256-d cos-first sinusoidal embedding (sgm's
    ``ConcatTimestepEmbedderND(256)``, equal to diffusers' ``get_timestep_embedding(v, 256,
    flip_sin_to_cos=True, downscale_freq_shift=0)``); the four are concatenated.

    Parameters
    ----------
    original_size : tuple of int
        ``(H, W)``. Brain-IT uses 256; MindEye2's own reconstruction code uses 768.
    crop_coords_top_left : tuple of int
        ``(top, left)``.
    batch : int
        Number of rows (all identical).

    Returns
    -------
    torch.Tensor
        ``[batch, 1024]`` float32, to pass as the UNet's ``class_labels``.
    """
    if len(original_size) != 2 or len(crop_coords_top_left) != 2:
        raise ConfigError("original_size and crop_coords_top_left must be pairs (H, W) and (top, left)")
    if int(batch) < 1:
        raise ConfigError(f"batch must be >= 1, got {batch}")
    vals = torch.tensor([*original_size, *crop_coords_top_left], dtype=torch.float32)
    return _sinusoid(vals, 256).reshape(1, -1).repeat(int(batch), 1)


def euler_scheduler():
    """sgm's ``LegacyDDPMDiscretization`` + ``EulerEDMSampler`` as a diffusers ``EulerDiscreteScheduler``.

    Scaled-linear betas 0.00085-0.012, epsilon prediction, **trailing** timestep spacing (the only spacing whose
    sigmas match sgm's).

    Returns
    -------
    ``diffusers.EulerDiscreteScheduler``
    """
    d = _diffusers()
    return d.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    prediction_type="epsilon", timestep_spacing="trailing")


def start_step_arithmetic(num_steps=50, start_step=14, scheduler=None):
    """Which part of the ``num_steps`` discretisation a run starting at ``start_step`` covers.

    Parameters
    ----------
    num_steps : int
        Number of steps of the full discretisation (``unclip6.yaml``: 50).
    start_step : int
        Index of the first step run (Brain-IT: 14); ``0 <= start_step < num_steps``.
    scheduler : ``diffusers.EulerDiscreteScheduler``, optional
        Scheduler to set up (default ``euler_scheduler``); ``set_timesteps(num_steps)`` is called on it.

    Returns
    -------
    dict
        ``n_denoise`` (steps run, ``num_steps - start_step``), ``start_sigma`` (float, ``sigmas[start_step]``),
        ``timesteps`` (the timesteps run) and ``scheduler`` (set up, with ``set_begin_index(start_step)``).
    """
    num_steps, start_step = _check_steps(num_steps, start_step)
    sch = euler_scheduler() if scheduler is None else scheduler
    sch.set_timesteps(num_steps)
    sch.set_begin_index(start_step)
    return {"n_denoise": num_steps - start_step, "start_sigma": float(sch.sigmas[start_step]),
            "timesteps": sch.timesteps[start_step:], "scheduler": sch}


def _check_steps(num_steps, start_step):
    if int(num_steps) != num_steps or num_steps < 1:
        raise ConfigError(f"num_steps must be a positive integer, got {num_steps}")
    if int(start_step) != start_step or not 0 <= start_step < num_steps:
        raise ConfigError(f"start_step must satisfy 0 <= start_step < num_steps={num_steps}, got {start_step}")
    return int(num_steps), int(start_step)


# ----------------------------------------------------------------------------------------------------------------
# SDXL-unCLIP (unclip6) route
# ----------------------------------------------------------------------------------------------------------------

def _read_yaml(config_yaml):
    import yaml

    try:
        with open(config_yaml) as fh:
            cfg = yaml.safe_load(fh)
        cfg["model"]["params"]["network_config"]["params"]
        cfg["model"]["params"]["first_stage_config"]["params"]["ddconfig"]
    except (yaml.YAMLError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"{config_yaml}: not an unclip6-style sgm config "
                              f"(needs model.params.network_config and first_stage_config): {exc}") from None
    return cfg


def load_sdxl_unclip(checkpoint, config_yaml, *, dtype=torch.float32, device="cpu"):
    """Load MindEye2's SDXL-unCLIP UNet and VAE from the original (sgm) checkpoint, locally.

    Both go through diffusers' ``from_single_file(state_dict, original_config=yaml)``: the UNet becomes a
    ``UNet2DConditionModel`` with ``class_embed_type="projection"`` (the 1024-d size/crop vector), the VAE an
    ``AutoencoderKL`` whose ``scaling_factor`` comes from the yaml (0.13025). The checkpoint is read once
    (``.ckpt`` via ``torch.load(weights_only=True)``, or ``.safetensors``); other keys (the CLIP conditioner) are
    ignored. Nothing is downloaded.

    Parameters
    ----------
    checkpoint : str or os.PathLike
        ``unclip6_epoch0_step110000.ckpt`` (or a file with the same ``model.diffusion_model.*`` /
        ``first_stage_model.*`` layout), or a folder holding the converted models as diffusers
        ``unet/`` and ``vae/`` subfolders (``save_pretrained``; ``config_yaml`` is then unused).
    config_yaml : str or os.PathLike or None
        ``unclip6.yaml``.
    dtype : torch.dtype
        Parameter dtype (float32 on CPU; float16/bfloat16 on GPU).
    device : str or torch.device
        Where to put the models.

    Returns
    -------
    tuple
        ``(unet, vae)`` in eval mode with gradients off.

    Raises
    ------
    MissingWeightsError
        A file does not exist.
    DataFormatError
        A file cannot be read or converted.
    """
    d = _diffusers()
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    checkpoint = os.path.expanduser(os.fspath(checkpoint))
    if os.path.isdir(checkpoint):  # the same models already converted and saved with save_pretrained
        models = []
        for cls, sub in ((d.UNet2DConditionModel, "unet"), (d.AutoencoderKL, "vae")):
            try:
                m = cls.from_pretrained(checkpoint, subfolder=sub, torch_dtype=dtype, local_files_only=True)
            except (OSError, ValueError) as exc:
                raise MissingWeightsError(f"{checkpoint}: no diffusers '{sub}/' folder ({type(exc).__name__}); "
                                          f"supply {_UNCLIP_HINT}") from None
            models.append(m.to(device).eval().requires_grad_(False))
        return models[0], models[1]
    config_yaml = None if config_yaml is None else os.path.expanduser(os.fspath(config_yaml))
    if config_yaml is None:
        raise MissingWeightsError(f"SDXL-unCLIP config yaml not given for {checkpoint}; supply {_UNCLIP_HINT}")
    for path, what in ((checkpoint, "checkpoint"), (config_yaml, "config yaml")):
        if not os.path.isfile(path):
            raise MissingWeightsError(f"SDXL-unCLIP {what} not found: {path}; supply {_UNCLIP_HINT}")
    checkpoint, config_yaml = os.fspath(checkpoint), os.fspath(config_yaml)
    cfg = _read_yaml(config_yaml)
    try:
        state = load_single_file_checkpoint(checkpoint, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 (pickle, safetensors and zip errors have no common base)
        raise DataFormatError(f"{checkpoint}: cannot read the checkpoint: {type(exc).__name__}: {exc}") from None
    if not any(k.startswith("model.diffusion_model.") for k in state):
        raise DataFormatError(f"{checkpoint}: no 'model.diffusion_model.*' keys: not an sgm/LDM checkpoint")
    if not any(k.startswith(("first_stage_model.", "vae.")) for k in state):
        raise DataFormatError(f"{checkpoint}: no 'first_stage_model.*' keys: the VAE is missing")
    models = []
    for cls in (d.UNet2DConditionModel, d.AutoencoderKL):
        try:
            m = cls.from_single_file(state, original_config=cfg, dtype=dtype, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 (diffusers raises ValueError, KeyError, RuntimeError ...)
            raise DataFormatError(f"{checkpoint}: diffusers cannot convert it to a {cls.__name__} with "
                                  f"{config_yaml}: {type(exc).__name__}: {exc}") from None
        models.append(m.to(device).eval().requires_grad_(False))
    return models[0], models[1]


def _as_images(images, name, batch=None):
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ConfigError(f"{name} must be a [B, 3, H, W] tensor in [0, 1], got {shape}")
    if batch is not None and images.shape[0] != batch:
        raise ConfigError(f"{name} has batch {images.shape[0]} but the conditioning has batch {batch}")
    return images


def _encode_init(vae, images, image_size, dtype, device):
    import torch.nn.functional as F

    x = images.to(device=device, dtype=torch.float32)
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False).clamp(0, 1)
    x = (x * 2 - 1).to(vae.dtype)
    return (vae.encode(x).latent_dist.mean * vae.config.scaling_factor).to(dtype)


def _decode(vae, latents, squeeze):
    img = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample.float()
    img = ((img + 1) / 2).clamp(0, 1)
    if squeeze is not None:
        img = (img - 0.5) * squeeze + 0.5
    return img


def _generator(seed, device):
    return torch.Generator(device=device).manual_seed(int(seed))


def _randn(shape, gen, device, dtype):
    return torch.randn(shape, generator=gen, device=gen.device, dtype=torch.float32).to(device=device, dtype=dtype)


def _progress(it, progress, desc):
    if not progress:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return it
    return tqdm(it, desc=desc)


def _init_latents(vae, init_images, b, lat_shape, offset_noise, arith, image_size, gen, device,
                  dtype):
    sch = arith["scheduler"]
    noise = _randn((b, *lat_shape), gen, device, dtype)
    if init_images is None:
        return noise * sch.init_noise_sigma
    z = _encode_init(vae, init_images, image_size, dtype, device)
    if offset_noise:
        noise = noise + offset_noise * _randn((b, lat_shape[0], 1, 1), gen, device, dtype)
    return z + noise * arith["start_sigma"]


@torch.no_grad()
def unclip_reconstruct(unet, vae, tokens, init_images=None, *, num_steps=50, start_step=14, guidance_scale=5.0,
                       offset_noise=0.04, original_size=None, image_size=256, squeeze=0.8, seed=0,
                       uncond="gaussian", progress=False):
    """Generate images from CLIP token sequences with the SDXL-unCLIP UNet (Brain-IT / MindEye2 recipe).

    Steps: the init image is resized to ``image_size`` and VAE-encoded (``latent_dist.mean * scaling_factor``);
    noise ``(n + offset_noise * n_c) * sigmas[start_step]`` is added (``n_c``: one value per channel); the Euler
    scheduler of ``euler_scheduler`` runs ``timesteps[start_step:]`` with classifier-free guidance
    ``e_u + guidance_scale * (e_c - e_u)``, the unconditional tokens being Gaussian noise of the tokens' shape;
    ``class_labels`` is ``size_crop_vector``. Output ``(x + 1) / 2`` clamped to [0, 1], then squeezed
    towards 0.5: ``(x - 0.5) * squeeze + 0.5``.

    Parameters
    ----------
    unet, vae : ``diffusers`` models
        From ``load_sdxl_unclip`` (or any ``UNet2DConditionModel`` with a 1024-d projection class embedding).
    tokens : torch.Tensor
        ``[B, L, unet.config.cross_attention_dim]`` (``unclip6``: ``[B, 256, 1664]`` ViT-bigG tokens).
    init_images : torch.Tensor, optional
        ``[B, 3, H, W]`` in [0, 1] (e.g. the deep-image-prior low-level image). ``None`` starts from pure noise
        (``x = n * init_noise_sigma``) and runs all ``num_steps`` steps (``start_step`` is ignored).
    num_steps : int
        Steps of the full discretisation (50).
    start_step : int
        First step run when ``init_images`` is given (Brain-IT: 14, i.e. 36 steps from sigma 3.60).
    guidance_scale : float
        CFG scale (5.0). At 1.0 the unconditional pass is skipped.
    offset_noise : float
        Std of the per-channel offset noise added at the start (0.04); 0 disables it.
    original_size : tuple of int, optional
        ``(H, W)`` of the size condition; default ``(image_size, image_size)`` (Brain-IT: 256; MindEye2: 768).
    image_size : int
        Pixel size generated (256: latents 32 x 32); a multiple of 8.
    squeeze : float or None
        Contrast squeeze (0.8 maps [0, 1] to [0.1, 0.9]); ``None`` leaves the image as decoded.
    seed : int
        Seed of a private ``torch.Generator`` (the global RNG is not touched): same seed, same output.
    uncond : {"gaussian", "zeros"}
        Unconditional tokens for CFG: seeded standard Gaussian noise (Brain-IT) or zeros.
    progress : bool
        Show a tqdm bar.

    Returns
    -------
    torch.Tensor
        ``[B, 3, image_size, image_size]`` float32 in [0, 1], on the UNet's device.
    """
    ctx_dim = unet.config.cross_attention_dim
    if not torch.is_tensor(tokens) or tokens.ndim != 3 or tokens.shape[-1] != ctx_dim:
        shape = tuple(tokens.shape) if torch.is_tensor(tokens) else type(tokens).__name__
        raise ConfigError(f"tokens must be [B, L, {ctx_dim}] (unet.config.cross_attention_dim), got {shape}")
    num_steps, start_step = _check_steps(num_steps, start_step)
    if uncond not in ("gaussian", "zeros"):
        raise ConfigError(f"uncond must be 'gaussian' or 'zeros', got {uncond!r}")
    if int(image_size) % 8 or image_size < 8:
        raise ConfigError(f"image_size must be a positive multiple of 8, got {image_size}")
    if squeeze is not None and not 0 < squeeze <= 1:
        raise ConfigError(f"squeeze must be in (0, 1] or None, got {squeeze}")
    b = tokens.shape[0]
    if init_images is None:
        start_step = 0
    else:
        _as_images(init_images, "init_images", b)
    device, dtype = unet.device, unet.dtype
    gen = _generator(seed, device)
    arith = start_step_arithmetic(num_steps, start_step)
    sch = arith["scheduler"]
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    lat_shape = (unet.config.in_channels, image_size // factor, image_size // factor)

    x = _init_latents(vae, init_images, b, lat_shape, offset_noise, arith, image_size, gen, device,
                      dtype)
    tokens = tokens.to(device=device, dtype=dtype)
    size = tuple(original_size) if original_size is not None else (image_size, image_size)
    y = size_crop_vector(size, (0, 0), b).to(device=device, dtype=dtype)
    cfg = guidance_scale != 1.0
    if cfg:
        unc = _randn(tokens.shape, gen, device, dtype) if uncond == "gaussian" else torch.zeros_like(tokens)
        ctx, y = torch.cat([unc, tokens]), torch.cat([y, y])
    else:
        ctx = tokens
    for t in _progress(arith["timesteps"], progress, "unCLIP"):
        x_in = torch.cat([x, x]) if cfg else x
        eps = unet(sch.scale_model_input(x_in, t), t, encoder_hidden_states=ctx, class_labels=y).sample
        if cfg:
            e_u, e_c = eps.chunk(2)
            eps = e_u + guidance_scale * (e_c - e_u)
        x = sch.step(eps, t, x).prev_sample.to(dtype)
    return _decode(vae, x, squeeze)


# ----------------------------------------------------------------------------------------------------------------
# diffusers pipelines (SD-2.1-unclip, SD img2img), for users with local diffusers folders
# ----------------------------------------------------------------------------------------------------------------

_PIPELINES = {"stable_unclip": "StableUnCLIPImg2ImgPipeline", "img2img": "StableDiffusionImg2ImgPipeline"}


def load_pipeline(kind, path, *, dtype=torch.float32, device="cpu"):
    """Load a diffusers pipeline from a local folder (``model_index.json``, ``unet/``, ``vae/``, ...), offline.

    Parameters
    ----------
    kind : {"stable_unclip", "img2img"}
        ``StableUnCLIPImg2ImgPipeline`` (e.g. SD-2.1-unclip) or ``StableDiffusionImg2ImgPipeline``.
    path : str or os.PathLike
        Local diffusers folder (written by ``save_pretrained`` or downloaded by the user).
    dtype : torch.dtype
        ``torch_dtype`` of the models.
    device : str or torch.device
        Where to put the pipeline.

    Returns
    -------
    ``diffusers.DiffusionPipeline``
        With no safety checker and the progress bar off.

    Raises
    ------
    MissingWeightsError
        The folder does not exist or lacks files.
    """
    if kind not in _PIPELINES:
        raise ConfigError(f"kind must be one of {sorted(_PIPELINES)}, got {kind!r}")
    d = _diffusers()
    cls = getattr(d, _PIPELINES[kind])
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isdir(path):
        raise MissingWeightsError(f"{kind} pipeline folder not found: {path}; supply a local diffusers folder "
                                  f"(model_index.json, unet/, vae/, ...) for {cls.__name__}")
    kw = {"safety_checker": None, "requires_safety_checker": False} if kind == "img2img" else {}
    try:
        pipe = cls.from_pretrained(os.fspath(path), local_files_only=True, dtype=dtype, **kw)
    except OSError as exc:
        raise MissingWeightsError(f"{path}: cannot load a {cls.__name__} from it ({exc}".splitlines()[0]
                                  + "); supply a complete local diffusers folder") from None
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _empty_prompt_embeds(pipe, batch, device, dtype):
    """Text-encoder embedding of the empty prompt (or zeros ``[B, 77, cross_attention_dim]`` without one)."""
    if getattr(pipe, "text_encoder", None) is not None and getattr(pipe, "tokenizer", None) is not None:
        pe, _ = pipe.encode_prompt([""] * batch, device, 1, False)
        return pe.to(dtype)
    return torch.zeros(batch, 77, pipe.unet.config.cross_attention_dim, device=device, dtype=dtype)


def _strength_to_start(num_steps, strength, start_step):
    if start_step is not None and strength is not None:
        raise ConfigError("give strength or start_step, not both")
    if start_step is None:
        if not 0 < strength <= 1:
            raise ConfigError(f"strength must be in (0, 1], got {strength}")
        start_step = num_steps - min(num_steps, max(1, int(round(num_steps * strength))))
    return start_step


@torch.no_grad()
def stable_unclip_reconstruct(pipe, image_embeds, init_images=None, *, num_steps=20, strength=None,
                              start_step=None, guidance_scale=10.0, noise_level=0, offset_noise=0.0,
                              image_size=None, squeeze=None, seed=0, progress=False):
    """Generate images from predicted *pooled* CLIP image embeddings with a Stable-unCLIP pipeline.

    The embeddings are noised at ``noise_level`` and concatenated with a noise-level embedding by the pipeline's
    own ``noise_image_embeddings``, then fed as UNet ``class_labels`` (zeros for the unconditional branch, as the
    pipeline does); the text conditioning is the empty prompt. The pipeline itself is an image *variation*
    pipeline (no img2img), so the denoising loop is ours, on a copy of ``pipe.scheduler``: from pure noise when
    ``init_images`` is ``None``, else from the VAE-encoded init image noised to the start step.

    Parameters
    ----------
    pipe : ``diffusers.StableUnCLIPImg2ImgPipeline``
        E.g. from ``load_pipeline`` (``image_encoder`` may be ``None``).
    image_embeds : torch.Tensor
        ``[B, D]``, ``D = unet class-embedding input / 2`` (SD-2.1-unclip: 1024, ViT-H).
    init_images : torch.Tensor, optional
        ``[B, 3, H, W]`` in [0, 1].
    num_steps : int
        Scheduler steps of the full discretisation.
    strength, start_step : float or int, optional
        Where to start with ``init_images``: ``start_step`` directly, or ``strength`` (fraction of the steps run,
        ``start_step = num_steps - round(num_steps * strength)``). Default: half the steps.
    guidance_scale : float
        CFG scale; at or below 1 the unconditional pass is skipped.
    noise_level : int
        Noise level of the image embedding (0-999).
    offset_noise : float
        Per-channel offset noise at the start (0 disables it).
    image_size : int, optional
        Pixel size; default ``unet.config.sample_size * vae_scale_factor``.
    squeeze : float, optional
        Optional contrast squeeze ``(x - 0.5) * squeeze + 0.5``.
    seed : int
        Seed of a private ``torch.Generator``.
    progress : bool
        Show a tqdm bar.

    Returns
    -------
    torch.Tensor
        ``[B, 3, image_size, image_size]`` float32 in [0, 1].
    """
    unet, vae = pipe.unet, pipe.vae
    emb_in = unet.config.projection_class_embeddings_input_dim
    if not torch.is_tensor(image_embeds) or image_embeds.ndim != 2 or (emb_in and 2 * image_embeds.shape[1] != emb_in):
        shape = tuple(image_embeds.shape) if torch.is_tensor(image_embeds) else type(image_embeds).__name__
        raise ConfigError(f"image_embeds must be [B, {emb_in // 2 if emb_in else 'D'}], got {shape}")
    if not 0 <= int(noise_level) < pipe.image_noising_scheduler.config.num_train_timesteps:
        raise ConfigError(f"noise_level must be in [0, {pipe.image_noising_scheduler.config.num_train_timesteps}), "
                          f"got {noise_level}")
    b = image_embeds.shape[0]
    if init_images is None:
        start = 0
    else:
        _as_images(init_images, "init_images", b)
        start = num_steps // 2 if (strength is None and start_step is None) else \
            _strength_to_start(num_steps, strength, start_step)
    num_steps, start = _check_steps(num_steps, start)
    image_size = image_size or unet.config.sample_size * pipe.vae_scale_factor
    if int(image_size) % pipe.vae_scale_factor:
        raise ConfigError(f"image_size must be a multiple of {pipe.vae_scale_factor}, got {image_size}")
    device, dtype = unet.device, unet.dtype
    gen = _generator(seed, device)
    sch = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sch.set_timesteps(num_steps, device=device)
    timesteps = sch.timesteps[start * sch.order:]

    lat_shape = (unet.config.in_channels, image_size // pipe.vae_scale_factor, image_size // pipe.vae_scale_factor)
    noise = _randn((b, *lat_shape), gen, device, dtype)
    if init_images is None:
        x = noise * sch.init_noise_sigma
    else:
        if offset_noise:
            noise = noise + offset_noise * _randn((b, lat_shape[0], 1, 1), gen, device, dtype)
        z = _encode_init(vae, init_images, image_size, dtype, device)
        if hasattr(sch, "set_begin_index"):
            sch.set_begin_index(start * sch.order)
        x = sch.add_noise(z, noise, timesteps[:1].repeat(b))
    emb = pipe.noise_image_embeddings(image_embeds.to(device=device, dtype=dtype), int(noise_level),
                                      noise=_randn(image_embeds.shape, gen, device, dtype))
    text = _empty_prompt_embeds(pipe, b, device, dtype)
    cfg = guidance_scale > 1.0
    if cfg:
        emb, text = torch.cat([torch.zeros_like(emb), emb]), torch.cat([text, text])
    for t in _progress(timesteps, progress, "stable unCLIP"):
        x_in = torch.cat([x, x]) if cfg else x
        eps = unet(sch.scale_model_input(x_in, t), t, encoder_hidden_states=text, class_labels=emb).sample
        if cfg:
            e_u, e_c = eps.chunk(2)
            eps = e_u + guidance_scale * (e_c - e_u)
        x = sch.step(eps, t, x, generator=gen).prev_sample.to(dtype) if _takes_generator(sch) else \
            sch.step(eps, t, x).prev_sample.to(dtype)
    return _decode(vae, x, squeeze)


def _takes_generator(sch):
    import inspect

    return "generator" in inspect.signature(sch.step).parameters


@torch.no_grad()
def img2img_reconstruct(pipe, init_images, *, prompt_embeds=None, prompt=None, negative_prompt_embeds=None,
                        strength=0.72, num_steps=50, guidance_scale=7.5, seed=0):
    """Refine low-level images with a Stable Diffusion img2img pipeline, conditioned on predicted text tokens.

    Calls the pipeline's own ``__call__(image=..., strength=..., prompt_embeds=..., output_type="pt")``: it
    VAE-encodes the images, noises them to ``strength`` and runs the last ``int(num_steps * strength)`` steps.

    Parameters
    ----------
    pipe : ``diffusers.StableDiffusionImg2ImgPipeline``
        E.g. from ``load_pipeline``.
    init_images : torch.Tensor
        ``[B, 3, H, W]`` in [0, 1] (H, W multiples of 8).
    prompt_embeds : torch.Tensor, optional
        ``[B, 77, D]`` predicted CLIP text-encoder hidden states (``D = unet.config.cross_attention_dim``).
    prompt : str or list of str, optional
        A text prompt instead of ``prompt_embeds`` (needs the pipeline's text encoder).
    negative_prompt_embeds : torch.Tensor, optional
        Unconditional embeddings for CFG; default the empty prompt's (zeros without a text encoder).
    strength : float
        Fraction of the schedule run, in (0, 1].
    num_steps : int
        Steps of the full schedule.
    guidance_scale : float
        CFG scale.
    seed : int
        Seed of a private ``torch.Generator``.

    Returns
    -------
    torch.Tensor
        ``[B, 3, H, W]`` float32 in [0, 1].
    """
    b = _as_images(init_images, "init_images").shape[0]
    if (prompt_embeds is None) == (prompt is None):
        raise ConfigError("give exactly one of prompt_embeds and prompt")
    if not 0 < strength <= 1:
        raise ConfigError(f"strength must be in (0, 1], got {strength}")
    if int(num_steps * strength) < 1:
        raise ConfigError(f"num_steps * strength must be >= 1, got {num_steps} * {strength}")
    unet = pipe.unet
    device, dtype = unet.device, unet.dtype
    kw = {}
    if prompt_embeds is not None:
        dim = unet.config.cross_attention_dim
        if not torch.is_tensor(prompt_embeds) or prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != dim \
                or prompt_embeds.shape[0] != b:
            shape = tuple(prompt_embeds.shape) if torch.is_tensor(prompt_embeds) else type(prompt_embeds).__name__
            raise ConfigError(f"prompt_embeds must be [{b}, 77, {dim}], got {shape}")
        kw["prompt_embeds"] = prompt_embeds.to(device=device, dtype=dtype)
        if guidance_scale > 1.0:
            neg = negative_prompt_embeds
            if neg is None:
                neg = _empty_prompt_embeds(pipe, b, device, dtype)
                if neg.shape[1] != prompt_embeds.shape[1]:
                    neg = torch.zeros_like(kw["prompt_embeds"])
            kw["negative_prompt_embeds"] = neg.to(device=device, dtype=dtype)
    else:
        kw["prompt"] = [prompt] * b if isinstance(prompt, str) else list(prompt)
        if negative_prompt_embeds is not None:
            raise ConfigError("negative_prompt_embeds needs prompt_embeds, not prompt")
    out = pipe(image=init_images.to(device=device, dtype=torch.float32).clamp(0, 1), strength=strength,
               num_inference_steps=int(num_steps), guidance_scale=guidance_scale, output_type="pt",
               generator=_generator(seed, device), **kw)
    return out.images.float().clamp(0, 1)
