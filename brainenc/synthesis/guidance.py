"""Brain-guided diffusion (BrainDiVE; Luo, Henderson, Wehbe, Tarr, NeurIPS 2023, arXiv 2306.03089).

A frozen diffusion model (:class:`Prior`: a Stable Diffusion UNet + VAE with the empty prompt, or a small
pixel-space ``UNet2DModel``) is steered at every sampling step by the gradient of a voxel-wise encoding model's
predicted response (:class:`~brainenc.synthesis.objectives.ResponseObjective`) through the one-step estimate of
the clean image, classifier-guidance style:

.. code-block:: text

    eps   = UNet(x_t, t)                                   (no grad; + self-attention guidance when sag_scale > 0)
    x0    = (x − √(1−ᾱ_t)·ε(x)) / √ᾱ_t                     (second UNet pass, with grad, at x = x_t)
    x̃     = √(1−ᾱ_t)·x0 + (1 − √(1−ᾱ_t))·x
    loss  = −scale · Σ_images objective(encoder(decode(x̃)))
    g     = −∂loss/∂x ;   eps' = eps − √(1−ᾱ_t)·g ;   x_{t−1} = scheduler.step(eps', t, x_t)

Our own loop over ``unet`` + ``scheduler.step`` (diffusers has no maintained classifier-guidance hook): the
equations are written from the paper and reference notes, not from BrainDiVE's code. The self-attention
guidance (SAG, Hong et al. 2022) pieces are adapted from diffusers' ``StableDiffusionSAGPipeline``
(Apache-2.0, ``diffusers/pipelines/deprecated/stable_diffusion_sag``): the attention-store processor, the
mask from the mid-block self-attention and the 9×9 σ=1 Gaussian blur.

brainenc never downloads weights: :func:`load_sd_prior` reads a local diffusers folder. diffusers is imported
only when a function needs it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainenc.exceptions import ConfigError, MissingDependencyError, MissingWeightsError

__all__ = [
    "Prior",
    "GuidanceConfig",
    "SCHEDULERS",
    "load_sd_prior",
    "make_scheduler",
    "initial_noise",
    "guided_step",
    "synthesize",
    "rerank",
]

#: ``GuidanceConfig.scheduler`` names -> diffusers scheduler classes (built with ``from_config`` of the prior's).
SCHEDULERS = {"dpm-multistep": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16}

_SD_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_SD_HINT = ("a local diffusers-format Stable Diffusion folder with model_index.json, unet/, vae/, text_encoder/, "
            "tokenizer/ and scheduler/ (e.g. stabilityai/stable-diffusion-2-1-base, an epsilon-prediction model)")


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise MissingDependencyError(
            "brain-guided synthesis needs diffusers: pip install diffusers transformers") from None
    return diffusers


def _progress(total, progress, desc):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc)


# ----------------------------------------------------------------------------------------------------------------
# the frozen generative model
# ----------------------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class Prior:
    """A frozen diffusion model to guide: ε-prediction UNet, noise schedule, optional VAE.

    Two kinds:

    - **latent** (Stable Diffusion): ``unet`` a ``UNet2DConditionModel``, ``vae`` an ``AutoencoderKL``,
      ``prompt_embeds`` the text-encoder output of the empty prompt (``[1, L, D]``, expanded to the batch);
      built by :func:`load_sd_prior`.
    - **pixel**: ``unet`` a ``UNet2DModel`` on 3-channel images in [-1, 1], ``vae=None``,
      ``prompt_embeds=None`` (the embedded default prior of :mod:`brainenc.synthesis.prior`).

    Construction validates the combination and puts ``unet`` and ``vae`` in eval mode with gradients off
    (in place): guidance gradients flow to the latents only.

    Parameters
    ----------
    unet : ``diffusers.UNet2DConditionModel`` or ``diffusers.UNet2DModel``
        ε-prediction network; ``out_channels == in_channels`` (no learned variance).
    scheduler : diffusers scheduler
        The model's training noise schedule (``alphas_cumprod``); its ``config.prediction_type`` must be
        ``"epsilon"``. Samplers are built from its config (:func:`make_scheduler`); it is never stepped itself.
    vae : ``diffusers.AutoencoderKL``, optional
        Latent decoder; ``None`` for a pixel-space prior.
    prompt_embeds : torch.Tensor, optional
        ``[1, L, cross_attention_dim]`` for a conditional UNet (required), ``None`` otherwise.
    sample_size : int, optional
        Spatial size of the UNet input; default ``unet.config.sample_size``.
    in_channels : int, optional
        Channels of the UNet input; default ``unet.config.in_channels``.
    identity : dict
        What model and weights these are (JSON-able), copied into synthesis records.

    Raises
    ------
    ConfigError
        Not a UNet / scheduler, ``prediction_type`` other than ``"epsilon"`` (e.g. SD-2.1-768's
        ``v_prediction``), learned variance, missing or mismatched ``prompt_embeds``, VAE latent channels !=
        ``in_channels``, a pixel prior without 3 channels, a non-square ``sample_size``.
    """

    unet: Any
    scheduler: Any
    vae: Any = None
    prompt_embeds: torch.Tensor | None = None
    sample_size: int | None = None
    in_channels: int | None = None
    identity: dict = field(default_factory=dict)

    def __post_init__(self):
        ucfg = getattr(self.unet, "config", None)
        if ucfg is None or not isinstance(self.unet, torch.nn.Module):
            raise ConfigError(f"Prior.unet must be a diffusers UNet2DConditionModel or UNet2DModel, "
                              f"got {type(self.unet).__name__}")
        scfg = getattr(self.scheduler, "config", None)
        if scfg is None or not hasattr(self.scheduler, "alphas_cumprod"):
            raise ConfigError(f"Prior.scheduler must be a diffusers noise scheduler (DDPM, DDIM, DPM-Solver, ...), "
                              f"got {type(self.scheduler).__name__}")
        pred = scfg.get("prediction_type", "epsilon")
        if pred != "epsilon":
            raise ConfigError(f"Prior.scheduler prediction_type must be 'epsilon', got {pred!r}: guidance assumes an "
                              f"epsilon-prediction model (SD-2.1-base, not SD-2.1-768 v-prediction)")
        size = self.sample_size if self.sample_size is not None else ucfg.get("sample_size")
        if isinstance(size, (tuple, list)):
            if len(size) != 2 or size[0] != size[1]:
                raise ConfigError(f"Prior.sample_size must be square, got {tuple(size)}")
            size = size[0]
        if size is None or int(size) != size or size < 1:
            raise ConfigError(f"Prior.sample_size must be a positive integer, got {size!r}")
        self.sample_size = int(size)
        ch = self.in_channels if self.in_channels is not None else ucfg.get("in_channels")
        if ch != ucfg.get("in_channels"):
            raise ConfigError(f"Prior.in_channels={ch} but the UNet takes {ucfg.get('in_channels')} channels")
        self.in_channels = int(ch)
        if ucfg.get("out_channels", ch) != ch:
            raise ConfigError(f"Prior.unet has out_channels={ucfg.get('out_channels')} != in_channels={ch}: "
                              f"learned-variance models are not supported (epsilon prediction only)")
        cross = ucfg.get("cross_attention_dim")
        if cross is not None:
            pe = self.prompt_embeds
            if not torch.is_tensor(pe) or pe.ndim != 3 or pe.shape[0] != 1 or \
                    (isinstance(cross, int) and pe.shape[-1] != cross):
                shape = tuple(pe.shape) if torch.is_tensor(pe) else type(pe).__name__
                raise ConfigError(f"Prior.prompt_embeds must be [1, L, {cross}] (the empty prompt's text embedding) "
                                  f"for a conditional UNet, got {shape}")
        elif self.prompt_embeds is not None:
            raise ConfigError("Prior.prompt_embeds must be None for an unconditional UNet2DModel")
        if self.vae is not None:
            vcfg = getattr(self.vae, "config", None)
            if vcfg is None or not hasattr(self.vae, "decode") or vcfg.get("scaling_factor") is None:
                raise ConfigError(f"Prior.vae must be a diffusers AutoencoderKL, got {type(self.vae).__name__}")
            if vcfg.get("latent_channels") != self.in_channels:
                raise ConfigError(f"Prior.vae has latent_channels={vcfg.get('latent_channels')} but the UNet takes "
                                  f"{self.in_channels} channels")
            self.vae.eval().requires_grad_(False)
        elif self.in_channels != 3:
            raise ConfigError(f"a pixel-space Prior (vae=None) needs a 3-channel UNet, got in_channels="
                              f"{self.in_channels}")
        if not isinstance(self.identity, dict):
            raise ConfigError(f"Prior.identity must be a dict, got {type(self.identity).__name__}")
        self.unet.eval().requires_grad_(False)

    # ---------------------------------------------------------------------------------------------- properties
    @property
    def conditional(self) -> bool:
        """Whether the UNet takes ``encoder_hidden_states`` (a Stable Diffusion UNet)."""
        return self.unet.config.get("cross_attention_dim") is not None

    @property
    def latent(self) -> bool:
        """Whether images come from a VAE (else the UNet works on pixels)."""
        return self.vae is not None

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (1 for a pixel prior)."""
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        """Side of the decoded images in pixels."""
        return self.sample_size * self.vae_scale_factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(in_channels, sample_size, sample_size)`` of one UNet input."""
        return (self.in_channels, self.sample_size, self.sample_size)

    # ---------------------------------------------------------------------------------------------- maths
    def alpha_bar(self, t) -> float:
        """``ᾱ_t`` (``alphas_cumprod[t]``) of the training schedule, as a Python float."""
        i = int(t)
        ac = self.scheduler.alphas_cumprod
        if not 0 <= i < len(ac):
            raise ConfigError(f"timestep t={i} outside the schedule [0, {len(ac)})")
        return float(ac[i])

    def eps(self, x, t):
        """ε-prediction of the UNet at ``(x, t)`` (no ``scale_model_input``: DPM-Solver and DDIM need none).

        Parameters
        ----------
        x : torch.Tensor
            ``[n, in_channels, sample_size, sample_size]``; cast to the UNet's dtype for the call.
        t : int or torch.Tensor
            Timestep (scalar).

        Returns
        -------
        torch.Tensor
            ``[n, in_channels, S, S]`` in ``x``'s dtype; differentiable when grad mode is on.
        """
        dt = self.dtype
        tt = torch.as_tensor(t, device=x.device)
        if self.prompt_embeds is not None:
            ctx = self.prompt_embeds.to(device=x.device, dtype=dt).expand(x.shape[0], -1, -1)
            out = self.unet(x.to(dt), tt, encoder_hidden_states=ctx).sample
        else:
            out = self.unet(x.to(dt), tt).sample
        return out.to(x.dtype)

    def decode(self, x0):
        """Images in [0, 1] from clean latents / pixels.

        VAE prior: ``clamp(vae.decode(x0 / scaling_factor).sample / 2 + 0.5, 0, 1)``; pixel prior:
        ``clamp(x0 / 2 + 0.5, 0, 1)``. Differentiable (inside the clamp range).

        Returns
        -------
        torch.Tensor
            float32 ``[n, 3, image_size, image_size]``.
        """
        if self.vae is None:
            img = x0.float() / 2 + 0.5
        else:
            z = (x0 / self.vae.config.scaling_factor).to(next(self.vae.parameters()).dtype)
            img = self.vae.decode(z).sample.float() / 2 + 0.5
        return img.clamp(0, 1)

    def to(self, device=None, dtype=None) -> Prior:
        """Move / cast the modules and ``prompt_embeds`` in place; returns ``self``."""
        for m in (self.unet, self.vae):
            if m is None:
                continue
            if device is not None:
                m.to(device=device)
            if dtype is not None and next(m.parameters()).dtype != dtype:  # no-op casts skipped (diffusers logs)
                m.to(dtype=dtype)
        if self.prompt_embeds is not None:
            self.prompt_embeds = self.prompt_embeds.to(**{k: v for k, v in (("device", device), ("dtype", dtype))
                                                          if v is not None})
        return self

    def describe(self) -> dict:
        """JSON-able record: kind, classes, sizes, dtype and ``identity``."""
        return {"kind": "latent" if self.latent else "pixel", "unet": type(self.unet).__name__,
                "vae": None if self.vae is None else type(self.vae).__name__, "conditional": self.conditional,
                "sample_size": self.sample_size, "in_channels": self.in_channels, "image_size": self.image_size,
                "scheduler": type(self.scheduler).__name__, "dtype": str(self.dtype).replace("torch.", ""),
                "identity": dict(self.identity)}


# ----------------------------------------------------------------------------------------------------------------
# loading Stable Diffusion from a local folder
# ----------------------------------------------------------------------------------------------------------------

def _first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _weights_identity(sub: Path, variant):
    """``sha256:`` of the weight file(s) diffusers/transformers would load from ``sub`` (sharded: of the digests)."""
    from brainenc.features.backbones import weights_file_identity

    suffix = re.escape(f".{variant}") if variant else ""
    found = {}
    for stem in ("diffusion_pytorch_model", "model", "pytorch_model"):
        for ext in ("safetensors", "bin"):
            pat = re.compile(rf"^{stem}{suffix}(-\d+-of-\d+)?\.{ext}$")
            files = sorted(p for p in sub.iterdir() if pat.match(p.name))
            if files and not found:
                found = {p.name: weights_file_identity(p) for p in files}
    if not found:
        return None
    if len(found) == 1:
        return next(iter(found.values()))
    return "sha256:" + hashlib.sha256("|".join(f"{k}={v}" for k, v in sorted(found.items())).encode()).hexdigest()


def _tensor_digest(t):
    return "sha256:" + hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def load_sd_prior(folder, *, dtype=torch.float32, device="cpu", scheduler="dpm-multistep", variant=None,
                  hash_weights=True):
    """A :class:`Prior` from a local diffusers-format Stable Diffusion folder (offline).

    Loads ``unet/``, ``vae/``, ``tokenizer/``, ``text_encoder/`` and ``scheduler/`` with
    ``local_files_only=True``, computes the empty prompt's text embedding once (tokenised to
    ``tokenizer.model_max_length`` as ``StableDiffusionPipeline.encode_prompt`` does, in float32 on CPU) and
    drops the text encoder. Any SD checkpoint with epsilon prediction works; BrainDiVE used
    ``stabilityai/stable-diffusion-2-1-base`` in float16.

    Parameters
    ----------
    folder : str or os.PathLike
        The folder (``save_pretrained`` layout or a downloaded hub snapshot).
    dtype : torch.dtype
        dtype of the UNet and VAE (float16 only on CUDA; see :class:`GuidanceConfig`).
    device : str or torch.device
        Where to put the models.
    scheduler : {"dpm-multistep", "ddim"}
        Class of ``Prior.scheduler``, built from ``scheduler/scheduler_config.json`` (the noise schedule);
        sampling uses ``GuidanceConfig.scheduler``.
    variant : str, optional
        Weight-file variant (``"fp16"`` for ``*.fp16.safetensors``).
    hash_weights : bool
        Put the sha256 of the UNet, VAE and text-encoder weight files in ``identity`` (hashed once per file
        and memoised; a few seconds for SD-2.1's 3.5 GB UNet the first time).

    Returns
    -------
    Prior
        Latent prior; ``identity`` holds ``kind``, ``folder``, ``variant``, the weight hashes and a digest of the
        empty-prompt embedding.

    Raises
    ------
    MissingWeightsError
        The folder does not exist, lacks one of the subfolders, or a part cannot be loaded (one line naming
        the folder and what to supply).
    ConfigError
        Unknown ``scheduler``; a v-prediction checkpoint (``prediction_type``).
    """
    d = _diffusers()
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError:
        raise MissingDependencyError("load_sd_prior needs transformers: pip install transformers") from None
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {scheduler!r}")
    folder = Path(os.path.expanduser(os.fspath(folder)))
    if not folder.is_dir():
        raise MissingWeightsError(f"Stable Diffusion folder not found: {folder}; supply {_SD_HINT}")
    missing = [f"{p}/" for p in _SD_PARTS if not (folder / p).is_dir()]
    if missing:
        raise MissingWeightsError(f"{folder}: incomplete Stable Diffusion folder (missing {', '.join(missing)}); "
                                  f"supply {_SD_HINT}")

    def load(sub, fn):
        try:
            return fn()
        except (OSError, ValueError) as exc:  # missing/partial files: OSError; unreadable configs: ValueError
            raise MissingWeightsError(f"{folder}: cannot load {sub}/ ({type(exc).__name__}: {_first_line(exc)}); "
                                      f"supply {_SD_HINT}") from None

    kw = {"local_files_only": True, "variant": variant}
    unet = load("unet", lambda: d.UNet2DConditionModel.from_pretrained(folder, subfolder="unet", dtype=dtype, **kw))
    vae = load("vae", lambda: d.AutoencoderKL.from_pretrained(folder, subfolder="vae", dtype=dtype, **kw))
    sch_cls = getattr(d, SCHEDULERS[scheduler])
    sch = load("scheduler", lambda: sch_cls.from_pretrained(folder, subfolder="scheduler", local_files_only=True))
    tok = load("tokenizer", lambda: CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer",
                                                                  local_files_only=True))
    if len(tok) < 1000:  # transformers 5 builds a 3-token dummy when tokenizer/ holds no vocabulary files
        raise MissingWeightsError(f"{folder}: tokenizer/ has no vocabulary (vocab.json + merges.txt or "
                                  f"tokenizer.json; got {len(tok)} tokens); supply {_SD_HINT}")
    text = load("text_encoder", lambda: CLIPTextModel.from_pretrained(
        folder, subfolder="text_encoder", dtype=torch.float32, **kw))
    ids = tok([""], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    mask = ids.attention_mask if getattr(text.config, "use_attention_mask", False) else None
    with torch.no_grad():
        embeds = text.eval()(ids.input_ids, attention_mask=mask)[0]
    del text
    identity = {"kind": "stable-diffusion", "folder": str(folder.resolve()), "variant": variant,
                "prompt": "", "prompt_embeds": _tensor_digest(embeds)}
    if hash_weights:
        identity["weights"] = {sub: _weights_identity(folder / sub, variant) for sub in ("unet", "vae", "text_encoder")}
    prior = Prior(unet=unet, scheduler=sch, vae=vae, prompt_embeds=embeds, identity=identity)
    return prior.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------------------

def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


def _sag_capable(unet):
    mid = getattr(unet, "mid_block", None)
    return unet.config.get("cross_attention_dim") is not None and type(mid).__name__ == "UNetMidBlock2DCrossAttn"


@dataclass
class GuidanceConfig:
    """Settings of one brain-guided sampling run (BrainDiVE's defaults where they transfer).

    Parameters
    ----------
    steps : int
        Sampling steps (BrainDiVE: 50 DPM-Solver++ steps).
    scale : float
        Brain-guidance scale: ``g = scale · ∇_x Σ_images objective``. BrainDiVE used 130 with its CLIP-ViT-B/16
        encoder on z-scored responses (README: ≈100 for OpenCLIP ViT-B, ≈150 for EVA02-CLIP), the default here;
        the right value depends on the encoder's output scale and on the prior (latent gradients of a VAE prior
        differ from pixel gradients), so calibrate it on a few seeds against the unguided run. 0 = no guidance.
    scheduler : {"dpm-multistep", "ddim"}
        Sampler, built with ``from_config`` of the prior's scheduler: ``DPMSolverMultistepScheduler``
        (dpmsolver++, deterministic) or ``DDIMScheduler`` (eta 0).
    sag_scale : float
        Self-attention guidance scale (BrainDiVE: 0.75); 0 disables it. Only for conditional UNets with a
        ``UNetMidBlock2DCrossAttn`` mid block (Stable Diffusion); costs one more UNet forward per step.
    gradient_checkpointing : bool
        Recompute UNet and VAE activations in the backward pass (less memory, more time; for 512² on GPU).
    dtype : {"float32", "float16"}
        dtype of the prior's UNet and VAE during the run (the prior is cast in place when it differs);
        float16 only on CUDA. Latents, the guidance arithmetic and the images given to the encoder are float32.
    batch_size : int
        Images sampled together. Results do not depend on it (per-seed noise, per-image gradients).
    augment : int
        Not in BrainDiVE (which guides without augmentation). ``k`` > 0: the guidance objective is the
        mean over ``k`` randomly shifted copies of the decoded image (shifts up to ``max_shift`` of the
        image side, replicate padding; the same shifts for every image of a step, drawn from the
        timestep), which keeps the gradient from exploiting pixel-exact patterns of the guiding encoder
        (adversarial images that a held-out encoder does not confirm).
    max_shift : float
        Largest shift, as a fraction of the image side (in [0, 0.5)).
    """

    steps: int = 50
    scale: float = 130.0
    scheduler: str = "dpm-multistep"
    sag_scale: float = 0.0
    gradient_checkpointing: bool = False
    dtype: str = "float32"
    batch_size: int = 4
    augment: int = 0
    max_shift: float = 0.125

    def check(self, prior: Prior | None = None) -> GuidanceConfig:
        """Validate the settings, and their combination with ``prior`` when given; returns ``self``.

        Raises
        ------
        ConfigError
            One line naming the parameter: ``steps`` < 1 or above the training schedule, negative or
            non-finite ``scale`` / ``sag_scale``, unknown ``scheduler`` or ``dtype``, ``batch_size`` < 1,
            ``sag_scale`` > 0 on a prior without a cross-attention mid block (e.g. a pixel prior), float16 on
            a CPU prior, gradient checkpointing on a model that does not support it.
        """
        if not _is_int(self.steps) or self.steps < 1:
            raise ConfigError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not _is_number(self.scale) or self.scale < 0:
            raise ConfigError(f"scale must be a finite number >= 0, got {self.scale!r}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {self.scheduler!r}")
        if not _is_number(self.sag_scale) or self.sag_scale < 0:
            raise ConfigError(f"sag_scale must be a finite number >= 0, got {self.sag_scale!r}")
        if not isinstance(self.gradient_checkpointing, (bool, np.bool_)):
            raise ConfigError(f"gradient_checkpointing must be true or false, got {self.gradient_checkpointing!r}")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not _is_int(self.augment) or self.augment < 0:
            raise ConfigError(f"augment must be an integer >= 0, got {self.augment!r}")
        if not _is_number(self.max_shift) or not 0 <= self.max_shift < 0.5:
            raise ConfigError(f"max_shift must be in [0, 0.5), got {self.max_shift!r}")
        if prior is None:
            return self
        if not isinstance(prior, Prior):
            raise ConfigError(f"prior must be a brainenc.synthesis.Prior, got {type(prior).__name__}")
        n_train = len(prior.scheduler.alphas_cumprod)
        if self.steps > n_train:
            raise ConfigError(f"steps={self.steps} exceeds the prior's {n_train} training timesteps")
        if self.sag_scale > 0 and not _sag_capable(prior.unet):
            raise ConfigError(f"sag_scale={self.sag_scale} needs a conditional UNet with a UNetMidBlock2DCrossAttn "
                              f"mid block; this prior's {type(prior.unet).__name__} has "
                              f"{type(getattr(prior.unet, 'mid_block', None)).__name__} (set sag_scale=0)")
        if self.dtype == "float16" and prior.device.type == "cpu":
            raise ConfigError("dtype='float16' runs only on CUDA; the prior is on cpu (use dtype='float32')")
        if self.gradient_checkpointing:
            for name, m in (("unet", prior.unet), ("vae", prior.vae)):
                if m is not None and not getattr(m, "_supports_gradient_checkpointing", False):
                    raise ConfigError(f"gradient_checkpointing=True but the prior's {name} "
                                      f"({type(m).__name__}) does not support it")
        return self

    def to_dict(self) -> dict:
        """The settings as plain data."""
        return dataclasses.asdict(self)


def make_scheduler(name, base):
    """A fresh sampler of kind ``name`` with the noise schedule of ``base`` (``cls.from_config(base.config)``).

    Raises
    ------
    ConfigError
        Unknown name; a stochastic (SDE) DPM-Solver variant (per-image noise would depend on the batch).
    """
    if name not in SCHEDULERS:
        raise ConfigError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {name!r}")
    sch = getattr(_diffusers(), SCHEDULERS[name]).from_config(base.config)
    if str(sch.config.get("algorithm_type", "")).startswith("sde"):
        raise ConfigError(f"the prior's scheduler config has algorithm_type={sch.config.algorithm_type!r}: only "
                          f"deterministic samplers are supported (dpmsolver++ / dpmsolver)")
    if sch.config.get("prediction_type", "epsilon") != "epsilon":
        raise ConfigError(f"prediction_type must be 'epsilon', got {sch.config.prediction_type!r}")
    return sch


# ----------------------------------------------------------------------------------------------------------------
# one guided step
# ----------------------------------------------------------------------------------------------------------------

def _check_responses(y, n):
    if not torch.is_tensor(y) or y.ndim != 2 or y.shape[0] != n:
        shape = tuple(y.shape) if torch.is_tensor(y) else type(y).__name__
        raise ConfigError(f"the encoder must return responses [n={n}, V] as a tensor, got {shape}")


def _objective_values(objective, y, n):
    v = objective(y)
    if not torch.is_tensor(v) or v.shape != (n,):
        shape = tuple(v.shape) if torch.is_tensor(v) else type(v).__name__
        raise ConfigError(f"the objective must return a tensor [n={n}] (one value per image), got {shape}")
    return v


def _shifted(img, t, k, max_shift):
    """``k`` shifted copies of ``img`` [n, 3, H, W] -> [k*n, 3, H, W] (copy-major), shifts drawn from ``t``."""
    H, W = img.shape[-2:]
    gen = torch.Generator().manual_seed(int(t) * 7919 + 17)
    my, mx = int(round(max_shift * H)), int(round(max_shift * W))
    pad = torch.nn.functional.pad(img, (mx, mx, my, my), mode="replicate")
    out = []
    for _ in range(k):
        dy = int(torch.randint(-my, my + 1, (), generator=gen)) if my else 0
        dx = int(torch.randint(-mx, mx + 1, (), generator=gen)) if mx else 0
        out.append(pad[..., my + dy:my + dy + H, mx + dx:mx + dx + W])
    return torch.cat(out)


def guided_step(prior, x_t, t, encoder, objective, scale, *, eps=None, augment=0, max_shift=0.125):
    """One brain-guided correction of the ε-prediction (BrainDiVE's guidance step).

    .. code-block:: text

        ε    = UNet(x_t, t)                        (no grad; or ``eps`` when given, e.g. after SAG)
        x̂0   = (x − √(1−ᾱ_t)·ε(x)) / √ᾱ_t          (second UNet pass, with grad, at x = x_t)
        x̃    = √(1−ᾱ_t)·x̂0 + (1 − √(1−ᾱ_t))·x
        loss = −scale · Σ_k objective(encoder(prior.decode(x̃)))_k
        g    = −∂loss/∂x ;   ε' = ε − √(1−ᾱ_t)·g

    The loss is the **sum** over the images of the batch (not the mean), so the gradient of image ``k``
    depends on image ``k`` only and not on the batch size: a batch of 8 gives the same images as 8 runs of 1.
    Gradients are taken with respect to ``x`` only (``torch.autograd.grad``); no parameter gradient is stored.
    Freeze the encoder (``requires_grad_(False)``, eval mode) to save memory; :func:`synthesize` does.

    Parameters
    ----------
    prior : Prior
    x_t : torch.Tensor
        ``[n, C, S, S]`` current latents (float32 recommended).
    t : int or torch.Tensor
        Current timestep.
    encoder : torch.nn.Module
        Maps images float32 ``[n, 3, H, W]`` in [0, 1] to responses ``[n, V]`` (does its own resizing and
        normalisation); must be differentiable.
    objective : callable
        ``[n, V]`` -> ``[n]`` (e.g. :class:`~brainenc.synthesis.objectives.ResponseObjective`), larger = better.
    scale : float
        Guidance scale.
    eps : torch.Tensor, optional
        The step's base ε (e.g. SAG-corrected); default one no-grad UNet pass.
    augment, max_shift : int, float
        See :class:`GuidanceConfig` (0: BrainDiVE's step exactly).

    Returns
    -------
    tuple
        ``(eps_corrected, info)``: ``eps_corrected`` like ``x_t`` (detached); ``info`` has ``objective``
        (``[n]``, the objective on the decoded ``x̃`` at this step), ``grad_norm`` (``[n]``, ‖g‖ per image) and
        ``alpha_bar`` (float).

    Raises
    ------
    ConfigError
        The encoder or objective returns the wrong shape, or the encoder's output carries no gradient.
    """
    n = x_t.shape[0]
    a = prior.alpha_bar(t)
    sb, sa = math.sqrt(1.0 - a), math.sqrt(a)
    if eps is None:
        with torch.no_grad():
            eps = prior.eps(x_t, t)
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        e = prior.eps(x, t)
        x0 = (x - sb * e) / sa
        x_tilde = sb * x0 + (1.0 - sb) * x
        img = prior.decode(x_tilde)
        if augment:
            y = encoder(_shifted(img, t, int(augment), float(max_shift)))
            _check_responses(y, n * int(augment))
            value = _objective_values(objective, y, n * int(augment)).reshape(int(augment), n).mean(0)
        else:
            y = encoder(img)
            _check_responses(y, n)
            value = _objective_values(objective, y, n)
        loss = -float(scale) * value.sum()
        if not loss.requires_grad:
            raise ConfigError("the encoder's output carries no gradient: it must be a differentiable torch module "
                              "(no torch.no_grad, .detach() or numpy inside)")
        (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    g = torch.zeros_like(x) if grad is None else -grad
    eps_new = (eps - sb * g.to(eps.dtype)).detach()
    info = {"objective": value.detach().float(), "grad_norm": g.detach().flatten(1).norm(dim=1).float(),
            "alpha_bar": a}
    return eps_new, info


# ----------------------------------------------------------------------------------------------------------------
# self-attention guidance (adapted from diffusers' StableDiffusionSAGPipeline, Apache-2.0)
# ----------------------------------------------------------------------------------------------------------------

class _SAGStore:
    """Attention processor for the mid block's first self-attention: records the attention probabilities
    while ``capture`` is on, otherwise defers to the original processor.

    Adapted from diffusers' ``CrossAttnStoreProcessor`` (Apache-2.0,
    ``pipelines/deprecated/stable_diffusion_sag/pipeline_stable_diffusion_sag.py``).
    """

    def __init__(self, inner):
        self.inner = inner
        self.capture = False
        self.probs = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if not self.capture:
            return self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                              attention_mask=attention_mask, **kwargs)
        b, seq, _ = hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq, b)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        self.probs = attn.get_attention_scores(attn.head_to_batch_dim(query), key, attention_mask)
        out = attn.batch_to_head_dim(torch.bmm(self.probs, value))
        return attn.to_out[1](attn.to_out[0](out))


def _gaussian_blur_2d(img, kernel_size=9, sigma=1.0):
    """Depthwise Gaussian blur with reflect padding (as diffusers' SAG ``gaussian_blur_2d``)."""
    import torch.nn.functional as F

    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel_size, device=img.device, dtype=torch.float32)
    k1 = torch.exp(-0.5 * (x / sigma) ** 2)
    k1 = (k1 / k1.sum()).to(img.dtype)
    k2 = (k1[:, None] * k1[None, :]).expand(img.shape[1], 1, kernel_size, kernel_size)
    pad = kernel_size // 2
    return F.conv2d(F.pad(img, [pad, pad, pad, pad], mode="reflect"), k2, groups=img.shape[1])


class _SAG:
    """Installs the store processor and a map-size hook on the mid block for one run; restores on exit."""

    def __init__(self, unet):
        self.block = unet.mid_block.attentions[0]
        self.attn = self.block.transformer_blocks[0].attn1
        self.heads = self.attn.heads
        self.map_size = None

    def __enter__(self):
        self.original = self.attn.processor
        self.store = _SAGStore(self.original)
        self.attn.set_processor(self.store)

        def hook(module, inputs, output):
            self.map_size = output[0].shape[-2:]

        self.handle = self.block.register_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        self.attn.set_processor(self.original)
        return False

    def base_eps(self, prior, x, t):
        """No-grad ε at (x, t) with the self-attention map recorded."""
        self.store.capture = True
        try:
            return prior.eps(x, t)
        finally:
            self.store.capture = False

    def guide(self, prior, x, t, eps, sag_scale):
        """``eps + sag_scale · (eps − ε(degraded))`` (SAG without CFG: the conditional branch)."""
        import torch.nn.functional as F

        a = prior.alpha_bar(t)
        sa, sb = math.sqrt(a), math.sqrt(1.0 - a)
        x0 = (x - sb * eps) / sa
        probs = self.store.probs
        b, c, h, w = x0.shape
        _, hw1, hw2 = probs.shape
        mh, mw = self.map_size
        mask = probs.reshape(b, self.heads, hw1, hw2).mean(1).sum(1) > 1.0
        mask = mask.reshape(b, 1, mh, mw).expand(b, c, mh, mw).to(x0.dtype)
        mask = F.interpolate(mask, (h, w))
        degraded = _gaussian_blur_2d(x0) * mask + x0 * (1 - mask)
        degraded = sa * degraded + sb * eps  # re-noise to the level of t (scheduler.add_noise for VP schedules)
        self.store.probs = None
        return eps + sag_scale * (eps - prior.eps(degraded, t))


# ----------------------------------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _frozen(module):
    """Eval mode and no parameter gradients for the duration; the previous state is restored."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    modes = [(m, m.training) for m in module.modules()]
    module.eval().requires_grad_(False)
    try:
        yield module
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def _checkpointing(prior, on):
    models = [m for m in (prior.unet, prior.vae) if m is not None] if on else []
    before = [(m, m.is_gradient_checkpointing) for m in models]
    for m in models:
        m.enable_gradient_checkpointing()
    try:
        yield
    finally:
        for m, was in before:
            if not was:
                m.disable_gradient_checkpointing()


def _check_seeds(seeds):
    arr = np.asarray(seeds if not isinstance(seeds, (int, np.integer)) else [seeds])
    if arr.ndim != 1 or arr.size == 0 or not (arr.dtype.kind in "iu"):
        raise ConfigError(f"seeds must be a non-empty 1-D sequence of integers, got {arr.dtype} {arr.shape}")
    if arr.min() < 0 or arr.max() >= 2**63:
        raise ConfigError("seeds must be integers in [0, 2**63)")
    return arr.astype(np.int64)


def initial_noise(prior, seeds, device=None):
    """Initial noise ``[len(seeds), C, S, S]`` float32: row ``k`` is ``randn`` of ``torch.Generator(seed_k)``.

    Drawn on the CPU (then moved to ``device``, default the prior's), so a seed gives the same noise on every
    device and in every batch.
    """
    seeds = _check_seeds(seeds)
    rows = [torch.randn((1, *prior.latent_shape), generator=torch.Generator().manual_seed(int(s)),
                        dtype=torch.float32) for s in seeds]
    return torch.cat(rows).to(prior.device if device is None else device)


def _to_uint8(img):
    return (img * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def synthesize(prior, encoder, objective, seeds, config=None, *, guided=True, progress=False):
    """Sample images that maximise ``objective(encoder(image))`` (BrainDiVE), or the unguided control.

    For each batch of ``config.batch_size`` seeds: the sampler is reset (``set_timesteps``; multistep state),
    the initial noise is :func:`initial_noise` of the seeds, then at every timestep ``ε`` = UNet (+ SAG when
    ``sag_scale`` > 0), corrected by :func:`guided_step` when ``guided``, and ``x`` = ``scheduler.step``.
    ``guided=False`` runs the same loop without the gradient: the unguided images of the same seeds, the
    control to compare against. Image ``k`` depends only on its seed, not on the batch it is in (up to
    floating-point differences of batched kernels).

    Parameters
    ----------
    prior : Prior
        Cast in place to ``config.dtype`` when its dtype differs.
    encoder : torch.nn.Module
        Images float32 ``[n, 3, H, W]`` in [0, 1] -> responses ``[n, V]``; put in eval mode with frozen
        parameters for the run (restored afterwards).
    objective : callable
        ``[n, V]`` -> ``[n]``, e.g. :class:`~brainenc.synthesis.objectives.ResponseObjective`.
    seeds : sequence of int
        One image per seed.
    config : GuidanceConfig, optional
        Default ``GuidanceConfig()``; validated against ``prior`` first.
    guided : bool
        Brain guidance on (``config.scale``) or off (the unguided control).
    progress : bool
        Show a tqdm bar over batches × steps.

    Returns
    -------
    dict
        ``images`` uint8 ``[n, H, W, 3]``; ``values`` float32 ``[n]``, the objective of the encoder on the
        final (uint8-quantised) images, the numbers to rerank by; ``seeds`` int64 ``[n]``; ``step_values``
        float32 ``[n, steps]`` (the objective on each step's x̃, guided runs only, else ``None``);
        ``guided``; ``config`` (dict); ``objective`` (``describe()`` when it has one); ``prior``
        (``Prior.describe()``); ``seconds``.

    Raises
    ------
    ConfigError
        Invalid ``config`` or combination with ``prior`` (:meth:`GuidanceConfig.check`), bad seeds, an encoder
        that is not a torch module or returns the wrong shape.
    """
    t0 = time.perf_counter()
    if not isinstance(prior, Prior):
        raise ConfigError(f"prior must be a brainenc.synthesis.Prior, got {type(prior).__name__}")
    config = (GuidanceConfig() if config is None else config)
    if not isinstance(config, GuidanceConfig):
        raise ConfigError(f"config must be a GuidanceConfig, got {type(config).__name__}")
    config.check(prior)
    if not isinstance(encoder, torch.nn.Module):
        raise ConfigError(f"encoder must be a torch.nn.Module, got {type(encoder).__name__}")
    if not callable(objective):
        raise ConfigError(f"objective must be callable ([n, V] -> [n]), got {type(objective).__name__}")
    seeds = _check_seeds(seeds)
    dtype = _DTYPES[config.dtype]
    if prior.dtype != dtype:
        prior.to(dtype=dtype)
    device = prior.device
    sch = make_scheduler(config.scheduler, prior.scheduler)
    n, bs, steps = len(seeds), int(config.batch_size), int(config.steps)
    images, values = [], []
    step_values = np.zeros((n, steps), np.float32) if guided else None
    n_batches = -(-n // bs)
    bar = _progress(n_batches * steps, progress, "BrainDiVE" if guided else "unguided")
    sag = _SAG(prior.unet) if config.sag_scale > 0 else contextlib.nullcontext()
    try:
        with _frozen(encoder), _checkpointing(prior, config.gradient_checkpointing and guided), sag as s:
            for start in range(0, n, bs):
                batch = seeds[start:start + bs]
                sch.set_timesteps(steps, device=device)
                x = initial_noise(prior, batch, device) * sch.init_noise_sigma
                for i, t in enumerate(sch.timesteps):
                    with torch.no_grad():
                        if s is not None:
                            eps = s.guide(prior, x, t, s.base_eps(prior, x, t), config.sag_scale)
                        else:
                            eps = prior.eps(x, t)
                    if guided:
                        eps, info = guided_step(prior, x, t, encoder, objective, config.scale, eps=eps,
                                                  augment=config.augment, max_shift=config.max_shift)
                        step_values[start:start + len(batch), i] = info["objective"].cpu().numpy()
                    x = sch.step(eps, t, x).prev_sample
                    if bar is not None:
                        bar.update(1)
                with torch.no_grad():
                    u8 = _to_uint8(prior.decode(x))
                    final = torch.from_numpy(u8).to(device).permute(0, 3, 1, 2).float() / 255
                    y = encoder(final)
                    _check_responses(y, len(batch))
                    v = _objective_values(objective, y, len(batch))
                images.append(u8)
                values.append(v.float().cpu().numpy())
    finally:
        if bar is not None:
            bar.close()
    describe = getattr(objective, "describe", None)
    return {"images": np.concatenate(images), "values": np.concatenate(values).astype(np.float32),
            "seeds": seeds, "step_values": step_values, "guided": bool(guided), "config": config.to_dict(),
            "objective": describe() if callable(describe) else None, "prior": prior.describe(),
            "seconds": time.perf_counter() - t0}


def rerank(values, keep_fraction=0.2):
    """Indices of the best ``keep_fraction`` of the images by objective value (BrainDiVE / NeuroGen: top 20 %).

    Parameters
    ----------
    values : array-like
        ``[n]`` objective values (e.g. ``synthesize(...)["values"]``, or a held-out encoder's).
    keep_fraction : float
        In (0, 1]; ``ceil(keep_fraction · n)`` images are kept, at least 1.

    Returns
    -------
    numpy.ndarray
        int64 indices, best first; ties keep index order (stable); NaN values rank last.

    Raises
    ------
    ConfigError
        ``values`` not a non-empty 1-D array, ``keep_fraction`` outside (0, 1].
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ConfigError(f"values must be a non-empty 1-D array, got shape {v.shape}")
    if not _is_number(keep_fraction) or not 0 < keep_fraction <= 1:
        raise ConfigError(f"keep_fraction must be in (0, 1], got {keep_fraction!r}")
    k = max(1, math.ceil(keep_fraction * v.size - 1e-9))
    return np.argsort(-v, kind="stable")[:k].astype(np.int64)
