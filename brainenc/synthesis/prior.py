"""A small unconditional pixel-space diffusion prior of the simulated subject's scenes.

No pretrained diffusion weights can be downloaded here, so the embedded default of brain-guided
synthesis is a small diffusers ``UNet2DModel`` (ε-prediction, DDPM training) trained on the scenes
the simulated subject sees (:func:`brainenc.datasets._scenes.render_scene`; every image a pure
function of ``(seed, nsd_id)``) at low resolution. :func:`train_prior` trains it with
:class:`brainenc.training.Trainer` (checkpoints, resume, DDP) and :class:`DenoisingObjective`;
:func:`save_prior` writes the weights as one fp16 safetensors file next to a JSON record (UNet and
scheduler configs, training config, data identity, versions, the file's sha256), and
:func:`load_prior` verifies that hash before building the model. The shipped prior
(``brainenc/data/scene_prior32.*``) was made by ``brainenc train-prior`` with the defaults.

Real use: a Stable Diffusion folder of the user's (:func:`brainenc.synthesis.load_sd_prior`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from brainenc._utils.io import sha256_file, write_json
from brainenc._utils.logging import get_logger, progress
from brainenc.config import from_dict, to_dict
from brainenc.exceptions import ConfigError, DataFormatError, MissingWeightsError
from brainenc.training import LossSum, Objective, TrainConfig, Trainer, Validation
from brainenc.training.data import INDEX_KEY

__all__ = ["PriorConfig", "DenoisingObjective", "scene_images", "build_prior_unet", "prior_scheduler_config",
           "train_prior", "save_prior", "PRIOR_TRAIN_DEFAULTS", "load_prior", "SHIPPED_PRIOR", "shipped_prior_path"]

log = get_logger(__name__)

#: name of the prior shipped inside the package (``brainenc/data/<name>.json`` + ``.safetensors``)
SHIPPED_PRIOR = "scene_prior32"


def shipped_prior_path() -> Path:
    """The JSON record of the shipped prior (its weights file lies beside it)."""
    return Path(__file__).resolve().parents[1] / "data" / f"{SHIPPED_PRIOR}.json"


def _diffusers():
    try:
        import diffusers
    except ImportError as err:  # pragma: no cover - diffusers is a declared dependency of the extra
        raise ConfigError("the diffusion prior needs diffusers: pip install 'brainenc[diffusion]'") from err
    return diffusers


#: the prior's optimisation defaults (``PriorConfig.train`` entries override them key by key)
PRIOR_TRAIN_DEFAULTS = {"epochs": 40, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.0, "schedule": "warmup_cosine",
                        "warmup_epochs": 1, "min_lr": 1e-5, "grad_clip": 1.0, "seed": 0, "device": "auto"}


@dataclasses.dataclass
class PriorConfig:
    """What the prior is and what it is trained on (every field changes the weights).

    Attributes
    ----------
    image_size : int
        Side of the square training images (the scenes are resized from 425 px, antialiased).
    block_out_channels : list of int
        ``UNet2DModel`` widths per resolution level (one down/up block each, no attention unless
        ``attention``).
    layers_per_block, norm_num_groups : int
    attention : bool
        Self-attention at the lowest resolution level.
    num_train_timesteps : int
    beta_schedule : {"squaredcos_cap_v2", "linear", "scaled_linear"}
        DDPM noise schedule (cosine suits small images).
    scene_seed : int
        Renderer seed: the simulation's design seed (``SimulationConfig.seed``), so the scenes are the
        simulated subject's own.
    n_images : int
        Number of scenes: the simulated set's images first (its 73k ids in design order), then other
        73k ids of the same renderer.
    flip : bool
        Random horizontal flips (a function of ``(seed, epoch, row)``).
    train : dict
        :class:`brainenc.training.TrainConfig` keys over :data:`PRIOR_TRAIN_DEFAULTS`.
    """

    image_size: int = 32
    block_out_channels: list = dataclasses.field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    norm_num_groups: int = 16
    attention: bool = False
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    scene_seed: int = 0
    n_images: int = 3000
    flip: bool = True
    train: dict = dataclasses.field(default_factory=dict)

    def check(self) -> "PriorConfig":
        if not (isinstance(self.image_size, int) and 8 <= self.image_size <= 512):
            raise ConfigError(f"'image_size' must be an integer in 8..512; {self.image_size!r} was provided")
        n_down = len(self.block_out_channels) - 1
        if not self.block_out_channels or self.image_size % (2 ** n_down):
            raise ConfigError(f"'image_size' {self.image_size} must be divisible by 2^(levels-1) = {2 ** n_down}")
        if any(int(c) % int(self.norm_num_groups) for c in self.block_out_channels):
            raise ConfigError(f"every 'block_out_channels' entry must be divisible by 'norm_num_groups' "
                              f"({self.norm_num_groups}); {self.block_out_channels} was provided")
        if self.beta_schedule not in ("squaredcos_cap_v2", "linear", "scaled_linear"):
            raise ConfigError(f"'beta_schedule' must be squaredcos_cap_v2, linear or scaled_linear; "
                              f"{self.beta_schedule!r} was provided")
        if not (isinstance(self.n_images, int) and self.n_images >= 1):
            raise ConfigError(f"'n_images' must be a positive integer; {self.n_images!r} was provided")
        self.train_config()
        return self

    def train_config(self) -> TrainConfig:
        if not isinstance(self.train, dict):
            raise ConfigError(f"'train' must be a table of TrainConfig keys; {self.train!r} was provided")
        cfg = from_dict(TrainConfig, {**PRIOR_TRAIN_DEFAULTS, **self.train}, _prefix="train.")
        cfg.check()
        return cfg


def scene_images(cfg: PriorConfig, *, show_progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Render the training scenes: ``(images uint8 [n, s, s, 3], nsd_ids int64 [n])`` (73k ids, 0-based).

    The simulated set's own images come first (the ids of :func:`brainenc.datasets.simulate.make_design`
    for ``SimulationConfig(seed=scene_seed)``, shared and subject 1's own), then further ids in
    a seeded order.
    """
    from brainenc.datasets import layout
    from brainenc.datasets._scenes import render_scene
    from brainenc.datasets.simulate import SimulationConfig, make_design

    sim = SimulationConfig(seed=cfg.scene_seed)
    design = make_design(sim)
    own = design["subjectim"][0, design["sim_slots"] - 1] - 1          # 73k ids (0-based) of the simulated set
    rest = np.setdiff1d(np.arange(layout.N_IMAGES_73K), own)
    rest = np.random.default_rng([cfg.scene_seed, 0x9F10]).permutation(rest)
    ids = np.concatenate([own, rest])[:cfg.n_images].astype(np.int64)
    s = cfg.image_size
    out = np.empty((len(ids), s, s, 3), dtype=np.uint8)
    it: Iterable = range(len(ids))
    if show_progress:
        it = progress(it, desc="rendering scenes", total=len(ids), unit="img")
    for i in it:
        img = render_scene(cfg.scene_seed, int(ids[i])).image
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
        x = torch.nn.functional.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        out[i] = x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    return out, ids


def build_prior_unet(cfg: PriorConfig, seed: int = 0):
    """The (random-initialised) ``UNet2DModel`` of ``cfg``."""
    d = _diffusers()
    n = len(cfg.block_out_channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if cfg.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return d.UNet2DModel(sample_size=cfg.image_size, in_channels=3, out_channels=3,
                             layers_per_block=cfg.layers_per_block,
                             block_out_channels=[int(c) for c in cfg.block_out_channels],
                             down_block_types=down, up_block_types=up, norm_num_groups=cfg.norm_num_groups)


def prior_scheduler_config(cfg: PriorConfig) -> dict:
    """The DDPM training schedule (samplers are built from it with ``from_config``)."""
    return {"num_train_timesteps": cfg.num_train_timesteps, "beta_schedule": cfg.beta_schedule,
            "prediction_type": "epsilon", "clip_sample": True, "clip_sample_range": 1.0}


class DenoisingObjective(Objective):
    """DDPM ε-prediction loss: ``mean ‖ε − UNet(√ᾱ_t x + √(1−ᾱ_t) ε, t)‖²`` per image.

    The timestep, the noise and the flip of row ``i`` are a function of ``(seed, stream, epoch, i)``
    alone (the Trainer's randomness contract): the same for any batch composition, any number of
    ranks and after resume. Every image counts equally (``count = b``, ``per_sample = 1``).

    Parameters
    ----------
    alphas_cumprod : Tensor [T]
        The schedule's ᾱ.
    seed : int
    flip : bool
        Random horizontal flips in training (not in validation).
    """

    metric = "val_loss"
    mode = "min"
    keys = ("x",)

    def __init__(self, alphas_cumprod: torch.Tensor, *, seed: int = 0, flip: bool = True):
        self.alphas_cumprod = alphas_cumprod.detach().double().cpu()
        self.seed, self.flip = int(seed), bool(flip)
        self._epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def draws(self, index: torch.Tensor, shape: tuple, *, stream: int, epoch: int):
        """``(t int64 [b], noise float32 [b, *shape], flip bool [b])`` for dataset rows ``index``."""
        T = len(self.alphas_cumprod)
        ts, noise, flips = [], [], []
        for i in index.tolist():
            rng = np.random.default_rng([self.seed, stream, epoch, int(i)])
            ts.append(int(rng.integers(0, T)))
            noise.append(rng.standard_normal(shape, dtype=np.float32))
            flips.append(bool(rng.random() < 0.5))
        return torch.tensor(ts), torch.from_numpy(np.stack(noise)), torch.tensor(flips)

    def _sse(self, model: nn.Module, batch, *, stream: int, epoch: int, flip: bool) -> LossSum:
        x = batch["x"].float()
        dev = x.device
        t, noise, flips = self.draws(batch[INDEX_KEY].cpu(), tuple(x.shape[1:]), stream=stream, epoch=epoch)
        t, noise = t.to(dev), noise.to(dev)
        if flip and self.flip:
            x = torch.where(flips.to(dev)[:, None, None, None], x.flip(-1), x)
        a = self.alphas_cumprod.to(dev)[t].float()[:, None, None, None]
        noisy = a.sqrt() * x + (1 - a).sqrt() * noise
        pred = model(noisy, t).sample.float()
        per_image = ((pred - noise) ** 2).flatten(1).mean(1)
        return LossSum(total=per_image.sum(), count=x.shape[0], per_sample=1)

    def loss(self, model: nn.Module, batch) -> LossSum:
        return self._sse(model, batch, stream=0, epoch=self._epoch, flip=True)

    def validate(self, model: nn.Module, batches) -> Validation:
        total, count = 0.0, 0
        for batch in batches:
            parts = self._sse(model, batch, stream=1, epoch=0, flip=False)
            total += float(parts.total)
            count += int(parts.count)
        return Validation(metrics={"val_loss": total / max(count, 1)})


def _to_model_range(images_u8: np.ndarray) -> np.ndarray:
    return (images_u8.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0).astype(np.float32)


def _versions() -> dict:
    import diffusers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def train_prior(cfg: PriorConfig | None = None, *, run_dir: str | Path | None = None, resume: bool = True,
                val_fraction: float = 0.05) -> tuple[Any, dict]:
    """Train the prior; returns ``(unet, record)``.

    Parameters
    ----------
    cfg : PriorConfig
    run_dir : path, optional
        Trainer checkpoints (``run_dir/checkpoints``): a killed run resumes at its last epoch.
    resume : bool
    val_fraction : float
        Held-out scenes (the last rows) whose denoising loss selects the best epoch.

    Returns
    -------
    unet : diffusers.UNet2DModel (best epoch's weights, eval mode)
    record : dict
        Config, data identity (ids, sha256 of the uint8 images), training history, versions.
    """
    cfg = (cfg or PriorConfig()).check()
    d = _diffusers()
    images, ids = scene_images(cfg)
    data_sha = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()
    x = _to_model_range(images)
    n_val = max(1, int(round(val_fraction * len(x)))) if len(x) > 1 and val_fraction > 0 else 0
    train = {"x": x[:len(x) - n_val]}
    val = {"x": x[len(x) - n_val:]} if n_val else None
    tcfg = cfg.train_config()
    unet = build_prior_unet(cfg, seed=tcfg.seed)
    sched = d.DDPMScheduler(**prior_scheduler_config(cfg))
    obj = DenoisingObjective(sched.alphas_cumprod, seed=tcfg.seed, flip=cfg.flip)
    n_params = sum(p.numel() for p in unet.parameters())
    log.info("train-prior: %d scenes at %d px (%d held out), UNet2DModel %.2f M parameters, %d epochs of %d",
             len(x), cfg.image_size, n_val, n_params / 1e6, tcfg.epochs, tcfg.batch_size)
    t0 = time.perf_counter()
    result = Trainer(unet, tcfg, objective=obj, run_dir=run_dir).fit(train, val=val, resume=resume)
    unet.eval()
    record = {
        "kind": "brainenc.synthesis.prior",
        "config": to_dict(cfg),
        "train_config": to_dict(tcfg),
        "data": {"source": "brainenc.datasets._scenes.render_scene", "scene_seed": cfg.scene_seed,
                 "n_images": int(len(ids)), "n_val": int(n_val), "nsd_ids_sha256":
                 hashlib.sha256(ids.astype("<i8").tobytes()).hexdigest(), "images_sha256": data_sha},
        "n_parameters": int(n_params),
        "train": {"best_epoch": result.best_epoch, "best_val_loss": result.best_score,
                  "history": result.history, "seconds": time.perf_counter() - t0,
                  "steps": int(tcfg.epochs * -(-len(train["x"]) // tcfg.batch_size))},
        "versions": _versions(),
    }
    return unet, record


def save_prior(unet, record: dict, path: str | Path) -> Path:
    """Write ``<path>.safetensors`` (fp16 weights) and ``<path>.json`` (configs, record, sha256), atomically.

    Returns the JSON path.
    """
    from safetensors.torch import save_file

    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    stem.parent.mkdir(parents=True, exist_ok=True)
    weights = stem.with_suffix(".safetensors")
    tmp = weights.with_name(weights.name + ".tmp")
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in unet.state_dict().items()}
    save_file(state, str(tmp), metadata={"format": "pt", "dtype": "float16"})
    tmp.chmod(0o644)
    tmp.replace(weights)
    meta = dict(record)
    meta.update({"weights_file": weights.name, "weights_sha256": sha256_file(weights),
                 "unet_config": {k: v for k, v in dict(unet.config).items() if not k.startswith("_")},
                 "scheduler_config": prior_scheduler_config(from_dict(PriorConfig, record["config"]))
                 if "config" in record else None})
    write_json(stem.with_suffix(".json"), meta)
    return stem.with_suffix(".json")


def load_prior(path: str | Path | None = None, *, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Load a saved prior (default: the shipped one) as a :class:`brainenc.synthesis.Prior`.

    The weights file's sha256 must equal the one recorded in the JSON (a changed or truncated
    file stops here). The prior carries its DDPM training schedule (with x̂0 clipped to the pixel
    range); the sampler is built from it by :func:`brainenc.synthesis.synthesize`
    (``GuidanceConfig.scheduler``): use ``"ddim"`` for this prior. DPM-Solver++ has no x̂0 clipping
    and its samples saturate on the cosine schedule (measured: 99.9 % of pixels at 0 or 255 vs
    1.2 % with DDIM, 25 steps).
    """
    from safetensors.torch import load_file

    from brainenc.synthesis.guidance import Prior

    d = _diffusers()
    path = Path(path) if path is not None else shipped_prior_path()
    if path.suffix != ".json":
        path = path.with_suffix(".json")
    if not path.is_file():
        raise MissingWeightsError(f"{path}: no diffusion prior record here; train one with "
                                  f"`brainenc train-prior --out {path.with_suffix('')}`")
    try:
        meta = json.loads(path.read_text())
        weights = path.with_name(meta["weights_file"])
        expected = meta["weights_sha256"]
        unet_cfg, sched_cfg = meta["unet_config"], meta["scheduler_config"]
    except (ValueError, KeyError, TypeError) as err:
        raise DataFormatError(f"{path}: not a brainenc prior record ({err})") from err
    if not weights.is_file():
        raise MissingWeightsError(f"{weights}: the prior's weights file is missing")
    got = sha256_file(weights)
    if got != expected:
        raise DataFormatError(f"{weights}: sha256 {got[:12]}... does not match the record's {expected[:12]}... "
                              f"(changed or truncated file)")
    unet = d.UNet2DModel(**unet_cfg)
    state = load_file(str(weights))
    unet.load_state_dict({k: v.float() for k, v in state.items()})
    unet.to(device=device, dtype=dtype).eval().requires_grad_(False)
    # pixels live in [-1, 1]: samplers built from this config (DDIM) clip x̂0 there. Without it the
    # cosine schedule's near-zero ᾱ at the first step blows x̂0 up and the samples saturate.
    sch = d.DDPMScheduler(**{**sched_cfg, "clip_sample": True, "clip_sample_range": 1.0})
    identity = {"kind": "pixel-prior", "file": weights.name, "sha256": expected,
                "image_size": int(unet_cfg["sample_size"])}
    return Prior(unet=unet, scheduler=sch, vae=None, prompt_embeds=None, sample_size=int(unet_cfg["sample_size"]),
                 in_channels=int(unet_cfg["in_channels"]), identity=identity)
