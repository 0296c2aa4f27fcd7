"""The ``reconstruct`` task: images from a subject's test-set fMRI, scored with the MindEye2 suite.

Stage graph (per subject, ``runs/<pipeline>/<subject>``)::

    simulate -> prepare -> targets -> decode -> lowlevel [-> semantic] -> evaluate -> report

- ``simulate`` / ``prepare``: the encoding task's stages (data present or simulated; z-scored,
  masked, repeat-averaged betas; the test split is the shared images).
- ``targets``: the frozen CNN's multi-scale maps of every image at ``[targets] input_size``
  (EfficientNet-Lite0 blocks offline, VGG16-BN layers with user weights), and for a semantic
  route the CLIP target of that route (``brainenc.features``), written under ``targets/``.
- ``decode``: a :class:`~brainenc.decoding.RidgeDecoder` fitted on the training rows predicts
  the test images' targets from their voxels, and again from the test voxels in a shuffled order
  (the *shuffled-voxels control*: each image's reconstruction comes from another image's
  response, so its scores estimate chance with everything else unchanged).
- ``lowlevel``: feature inversion (:func:`brainenc.decoding.invert_features`) of the predicted
  maps, in batches; each batch is written when it finishes, so a killed stage resumes at the next.
- ``semantic`` (``[semantic] route != "none"``): a diffusion model started from the low-level
  image and conditioned on the predicted CLIP target (SDXL-unCLIP, Stable unCLIP or img2img).
- ``evaluate``: the metric suite over the final images of the model and of the control
  (:func:`brainenc.metrics.score_reconstruction_sets`), ``metrics.json`` / ``.csv`` / ``.md``.
- ``report``: ``report/index.md`` + ``index.html`` with the metric table, a figure grid and
  one PNG per test image (seen | low-level | final).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from brainenc._utils.io import load_npy, read_json, save_npy, write_json, write_text
from brainenc._utils.logging import get_logger
from brainenc.config import from_dict, to_dict
from brainenc.exceptions import ConfigError, DataFormatError
from brainenc.workflows.engine import Stage, StageContext

__all__ = ["TargetsSection", "DecoderSection", "LowLevelSection", "SemanticSection", "ReconEvaluateSection",
           "ReconReportSection", "SECTIONS", "build_reconstruct_graph", "SEMANTIC_ROUTES"]

log = get_logger("workflows")

SEMANTIC_ROUTES = ("none", "sdxl_unclip", "stable_unclip", "img2img")
CONTROL = "shuffled"
MODEL = "model"


# ----------------------------------------------------------------------------------------------
# spec tables
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ReconPrepare:
    """``[prepare]`` parsed: the PrepareConfig and whether to simulate missing data."""

    config: Any
    simulate: bool = False

    def to_dict(self) -> dict:
        return dict({k: v for k, v in to_dict(self.config).items() if k != "subject"}, simulate=self.simulate)


def parse_prepare(table: dict, prefix: str) -> ReconPrepare:
    """``[prepare]`` as in the encoding task (``simulate`` flag + PrepareConfig keys)."""
    from brainenc.datasets.prepare import PrepareConfig

    prep = dict(table)
    if "subject" in prep:
        raise ConfigError(f"'{prefix}subject': a pipeline spec does not name a subject; it comes from the run")
    simulate = prep.pop("simulate", False)
    if not isinstance(simulate, bool):
        raise ConfigError(f"'{prefix}simulate' must be true or false; {simulate!r} was provided")
    return ReconPrepare(config=from_dict(PrepareConfig, prep, _prefix=prefix), simulate=simulate)


@dataclasses.dataclass
class ReconSimulate:
    """``[simulate]`` parsed: the SimulationConfig (its subject comes from the run)."""

    config: Any

    def to_dict(self) -> dict:
        return {k: v for k, v in to_dict(self.config).items() if k != "subject"}


def parse_simulate(table: dict, prefix: str) -> ReconSimulate:
    """``[simulate]``: SimulationConfig keys (used when ``[prepare] simulate = true``)."""
    from brainenc.datasets.simulate import SimulationConfig

    if "subject" in table:
        raise ConfigError(f"'{prefix}subject': a pipeline spec does not name a subject; it comes from the run")
    return ReconSimulate(from_dict(SimulationConfig, dict(table), _prefix=prefix))


@dataclasses.dataclass
class TargetsSection:
    """``[targets]``: what the decoder predicts.

    Attributes
    ----------
    cnn : {'efficientnet-lite0', 'vgg16_bn'}
        Frozen CNN whose multi-scale maps are the low-level target (Lite0: packaged ImageNet
        weights, offline; VGG16-BN as Brain-IT: ``weights`` = torchvision's state dict).
    layers : list of int or None
        CNN layers (Lite0 block indices / VGG ``features`` indices); None = the CNN's defaults.
    weights : str or None
        CNN weights file (None = packaged weights for Lite0; ``"random"`` = random init, tests).
    input_size : int
        Image size the CNN sees (Brain-IT: 112 for VGG16-BN).
    semantic_backbone : str
        ``brainenc.features`` backbone of the semantic target (``""`` = none; e.g.
        ``"clip:ViT-bigG-14"`` tokens for SDXL-unCLIP, ``"clip:ViT-H-14"`` embedding for Stable unCLIP).
    semantic_output : {'tokens', 'embedding'}
    semantic_options : dict
        Extra backbone options (``pretrained``, ``weights``, ``model_cfg``).
    batch_size : int
    device : str
        Where the CNN runs (here and in the inversion): "cpu" or a torch device such as "cuda".
    """

    cnn: str = "efficientnet-lite0"
    layers: list | None = None
    weights: str | None = None
    input_size: int = 64
    semantic_backbone: str = ""
    semantic_output: str = "tokens"
    semantic_options: dict = dataclasses.field(default_factory=dict)
    batch_size: int = 32
    device: str = "cpu"

    def __post_init__(self):
        if self.cnn not in ("efficientnet-lite0", "vgg16_bn"):
            raise ConfigError(f"'targets.cnn' must be 'efficientnet-lite0' or 'vgg16_bn'; {self.cnn!r} was provided")
        if not (isinstance(self.input_size, int) and 16 <= self.input_size <= 1024):
            raise ConfigError(f"'targets.input_size' must be an integer in 16..1024; {self.input_size!r} was provided")
        if self.semantic_output not in ("tokens", "embedding"):
            raise ConfigError(f"'targets.semantic_output' must be 'tokens' or 'embedding'; "
                              f"{self.semantic_output!r} was provided")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ConfigError(f"'targets.batch_size' must be a positive integer; {self.batch_size!r} was provided")


@dataclasses.dataclass
class DecoderSection:
    """``[decoder]``: :class:`~brainenc.decoding.RidgeDecoder` parameters and the control's seed.

    Attributes
    ----------
    alphas : list of float or None
    cv : int or None
        None = leave-one-out GCV.
    alpha_per_target : bool
    control_seed : int
        Seed of the shuffled-voxels permutation.
    rescale : bool
        Give each predicted feature the training targets' mean and std over the predicted set
        (:func:`~brainenc.decoding.match_train_statistics`, Brain-Diffuser's recipe), separately for
        the model and the control.
    """

    alphas: list | None = None
    cv: int | None = None
    alpha_per_target: bool = True
    control_seed: int = 0
    rescale: bool = False


@dataclasses.dataclass
class LowLevelSection:
    """``[lowlevel]``: feature inversion (:func:`brainenc.decoding.invert_features`).

    Attributes
    ----------
    parameterization : {'pixel', 'dip'}
    size : int
        Output image size.
    iterations : int
    lr : float or None
    tv_weight : float or None
        Smoothness prior of the pixel parameterisation (None = the function's default).
    batch_size : int
        Images per resumable batch.
    seed : int
    options : dict
        Other :func:`~brainenc.decoding.invert_features` keywords (``ema``, ``dip_channels``, ...).
    """

    parameterization: str = "pixel"
    size: int = 64
    iterations: int = 100
    lr: float | None = None
    tv_weight: float | None = None
    batch_size: int = 16
    seed: int = 0
    options: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.parameterization not in ("pixel", "dip"):
            raise ConfigError(f"'lowlevel.parameterization' must be 'pixel' or 'dip'; "
                              f"{self.parameterization!r} was provided")
        for name in ("size", "iterations", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"'lowlevel.{name}' must be a positive integer; {v!r} was provided")


@dataclasses.dataclass
class SemanticSection:
    """``[semantic]``: the diffusion stage (off by default; user weights only).

    Attributes
    ----------
    route : {'none', 'sdxl_unclip', 'stable_unclip', 'img2img'}
        ``sdxl_unclip``: MindEye2's SDXL-unCLIP checkpoint (``checkpoint`` + ``config_yaml``, or a
        diffusers folder with ``unet/`` and ``vae/``) conditioned on predicted bigG tokens, our Euler
        loop from ``start_step``; ``stable_unclip``: a diffusers Stable unCLIP folder conditioned on
        the predicted pooled embedding; ``img2img``: a diffusers SD folder refining the low-level
        image (empty prompt, as Brain-IT's refiner).
    checkpoint, config_yaml, pipeline : str
    num_steps, start_step : int
    guidance_scale : float
    strength : float
        img2img only.
    prompt : str
        img2img only (Brain-IT's refiner: the empty prompt).
    image_size : int
    batch_size : int
    seed : int
    dtype : {'float32', 'float16', 'bfloat16'}
    device : str
    """

    route: str = "none"
    checkpoint: str = ""
    config_yaml: str = ""
    pipeline: str = ""
    num_steps: int = 50
    start_step: int = 14
    guidance_scale: float = 5.0
    strength: float = 0.36
    prompt: str = ""
    image_size: int = 256
    batch_size: int = 4
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"

    def __post_init__(self):
        if self.route not in SEMANTIC_ROUTES:
            raise ConfigError(f"'semantic.route' must be one of {list(SEMANTIC_ROUTES)}; {self.route!r} was provided")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError(f"'semantic.dtype' must be float32, float16 or bfloat16; {self.dtype!r} was provided")
        if self.route == "sdxl_unclip" and not self.checkpoint:
            raise ConfigError("'semantic.checkpoint' is required for route 'sdxl_unclip' (MindEye2's "
                              "unclip6_epoch0_step110000.ckpt, with 'semantic.config_yaml' = unclip6.yaml)")
        if self.route in ("stable_unclip", "img2img") and not self.pipeline:
            raise ConfigError(f"'semantic.pipeline' is required for route {self.route!r} (a local diffusers folder)")


@dataclasses.dataclass
class ReconEvaluateSection:
    """``[evaluate]``: the metric suite (:func:`brainenc.metrics.score_reconstruction_sets`).

    Attributes
    ----------
    metrics : list of str
    weights : str or dict
        ``"random"`` (random-init networks: plumbing and direction only, never a published number)
        or ``{network: path}`` for alexnet / inception / clip / efficientnet / swav.
    clip_model : str
        open_clip architecture of a random-init CLIP (``weights = "random"``).
    n_test : int or None
    blurry_blend : float
        Blend of the low-level image into the final one before scoring when a semantic route ran
        (MindEye2: 0.25).
    batch_size : int
    device : str
        Torch device of the metric networks (``"cuda"`` on a GPU: CLIP ViT-L/14 runs ~1 image/s on 2 CPU
        cores).
    """

    metrics: list = dataclasses.field(default_factory=lambda: ["pixcorr", "ssim", "alexnet2", "alexnet5",
                                                               "inception", "clip", "effnet", "swav"])
    weights: Any = "random"
    clip_model: str = "ViT-L-14-quickgelu"
    n_test: int | None = None
    blurry_blend: float = 0.0
    batch_size: int = 32
    device: str = "cpu"

    def __post_init__(self):
        from brainenc.metrics.reconstruction import METRIC_NAMES

        for m in self.metrics:
            if m not in METRIC_NAMES:
                raise ConfigError(f"'evaluate.metrics' entries must be among {list(METRIC_NAMES)}; {m!r} was provided")
        if not (isinstance(self.weights, dict) or self.weights == "random"):
            raise ConfigError("'evaluate.weights' must be \"random\" or a table {network = \"path\"}; "
                              f"{self.weights!r} was provided")


@dataclasses.dataclass
class ReconReportSection:
    """``[report]``.

    Attributes
    ----------
    n_show : int
        Test images in the figure grid.
    dpi : int
    """

    n_show: int = 12
    dpi: int = 110


SECTIONS = {"prepare": parse_prepare, "simulate": parse_simulate, "targets": TargetsSection,
            "decoder": DecoderSection, "lowlevel": LowLevelSection, "semantic": SemanticSection,
            "evaluate": ReconEvaluateSection, "report": ReconReportSection}


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _images(ds, ids) -> np.ndarray:
    from brainenc.features import HDF5Images

    if ds.stimuli_path is None or not Path(ds.stimuli_path).is_file():
        raise DataFormatError(f"{ds.path}: the prepared dataset has no stimuli file; reconstruction needs the images")
    return HDF5Images(ds.stimuli_path).read(np.asarray(ids))


def _to_float(images_u8, size: int | None):
    """uint8 [n, H, W, 3] -> float tensor [n, 3, size, size] in [0, 1] (bilinear, antialiased)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(images_u8)).permute(0, 3, 1, 2).float() / 255.0
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def _to_u8(images) -> np.ndarray:
    """float [n, 3, H, W] in [0, 1] -> uint8 [n, H, W, 3]."""
    arr = images.detach().cpu().float().clamp(0, 1).permute(0, 2, 3, 1).numpy() if hasattr(images, "detach") \
        else np.asarray(images)
    return np.round(arr * 255.0).astype(np.uint8)


def _fresh_folder(folder: Path, key: str) -> None:
    """Keep ``folder`` only if it was written for stage key ``key`` (a resumed stage); else empty it."""
    import shutil

    marker = folder / "stage_key.txt"
    if folder.exists() and (not marker.is_file() or marker.read_text().strip() != key):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_text(marker, key)


def _rows(ds, split: str) -> np.ndarray:
    if split not in ds.splits:
        raise DataFormatError(f"{ds.path}: the prepared dataset has no {split!r} split (has {sorted(ds.splits)}); "
                              "set [prepare] split so that the shared images are the test set")
    return np.asarray(ds.splits[split])


def _build_cnn(t: TargetsSection):
    from brainenc.decoding.lowlevel import build_feature_cnn

    return build_feature_cnn(t.cnn, layers=t.layers, weights=t.weights, device=t.device)


def _cnn_maps(cnn, images_u8: np.ndarray, size: int, batch_size: int) -> list[np.ndarray]:
    import torch

    out: list[list[np.ndarray]] = []
    with torch.no_grad():
        for s in range(0, len(images_u8), batch_size):
            maps = cnn(_to_float(images_u8[s:s + batch_size], size).to(cnn.device))
            if not out:
                out = [[] for _ in maps]
            for k, m in enumerate(maps):
                out[k].append(m.float().cpu().numpy())
    return [np.concatenate(v, 0) for v in out]


# ----------------------------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------------------------
def _stage_targets(sec: dict, loaded):
    t: TargetsSection = sec["targets"]
    route = sec["semantic"].route

    def body(ctx: StageContext) -> dict:
        ds = loaded.dataset(ctx)
        ids = np.asarray(ds.image_ids)
        folder = ctx.run_dir / "targets"
        _fresh_folder(folder, ctx.key)
        t0 = time.perf_counter()
        cnn = _build_cnn(t)
        maps = []
        log.info("targets: %s maps of %d images at %d px", t.cnn, len(ids), t.input_size)
        from brainenc._utils.logging import progress

        chunks = [maps_chunk for maps_chunk in range(0, len(ids), 256)]
        for s in progress(chunks, desc="targets", unit="chunk"):
            part = _cnn_maps(cnn, _images(ds, ids[s:s + 256]), t.input_size, t.batch_size)
            maps = part if not maps else [np.concatenate([a, b], 0) for a, b in zip(maps, part)]
        files = [save_npy(folder / f"map{k}.npy", m.astype(np.float32)) for k, m in enumerate(maps)]
        rec: dict[str, Any] = {"maps": [str(f) for f in files], "shapes": [list(m.shape[1:]) for m in maps],
                               "cnn": cnn.identity, "image_ids": str(save_npy(folder / "image_ids.npy", ids))}
        if route != "none":
            if not t.semantic_backbone:
                raise ConfigError(f"'targets.semantic_backbone' is required for [semantic] route {route!r}")
            from brainenc.features import FeatureSpec, HDF5Images, extract_features

            opts = dict(t.semantic_options)
            named = {k: opts.pop(k) for k in ("pretrained", "weights", "image_size", "seed", "device") if k in opts}
            spec = FeatureSpec(backbone=t.semantic_backbone, layer="last",
                               tokens="patch" if t.semantic_output == "tokens" else "none",
                               pooled="model" if t.semantic_output == "embedding" else "none",
                               batch_size=t.batch_size, options=opts, **named)
            fs = extract_features(HDF5Images(ds.stimuli_path), np.unique(ids), spec, cache_dir=ctx.run_dir / "features")
            arr = np.asarray(fs.tokens if t.semantic_output == "tokens" else fs.pooled)
            order = np.searchsorted(np.asarray(fs.image_ids), ids)
            files.append(save_npy(folder / "semantic.npy", arr[order].astype(np.float32)))
            rec["semantic"] = str(files[-1])
            rec["semantic_key"] = fs.key
        rec["files"] = [str(f) for f in files]
        rec["seconds"] = time.perf_counter() - t0
        return rec
    return body


def _stage_decode(sec: dict, loaded):
    d: DecoderSection = sec["decoder"]

    def body(ctx: StageContext) -> dict:
        from brainenc.decoding import RidgeDecoder

        ds = loaded.dataset(ctx)
        tr, te = _rows(ds, "train"), _rows(ds, "test")
        rec_t = ctx.inputs["targets"]
        targets = {f"map{k}": load_npy(p) for k, p in enumerate(rec_t["maps"])}
        if "semantic" in rec_t:
            targets["semantic"] = load_npy(rec_t["semantic"])
        Y = np.asarray(ds.responses)
        t0 = time.perf_counter()
        log.info("decode: ridge from %d voxels to %d target arrays on %d training images", Y.shape[1],
                 len(targets), len(tr))
        dec = RidgeDecoder(alphas=d.alphas, cv=d.cv, alpha_per_target=d.alpha_per_target)
        dec.fit(Y[tr], {k: v[tr] for k, v in targets.items()})
        folder = ctx.run_dir / "decode"
        _fresh_folder(folder, ctx.key)
        dec.save_pretrained(folder / "decoder")
        perm = np.random.default_rng(d.control_seed).permutation(len(te))
        while len(te) > 1 and np.any(perm == np.arange(len(te))):  # a derangement: no image keeps its own response
            perm = np.random.default_rng([d.control_seed, int(perm[0])]).permutation(len(te))
        files = [save_npy(folder / "control_permutation.npy", perm)]
        preds = {MODEL: dec.predict(Y[te]), CONTROL: dec.predict(Y[te][perm])}
        if d.rescale:
            from brainenc.decoding import match_train_statistics

            preds = {name: {k: match_train_statistics(v, targets[k][tr]) for k, v in p.items()}
                     for name, p in preds.items()}
        out: dict[str, dict[str, str]] = {}
        for name, pred in preds.items():
            out[name] = {}
            for k, v in pred.items():
                out[name][k] = str(save_npy(folder / f"{name}_{k}.npy", np.asarray(v, np.float32)))
                files.append(Path(out[name][k]))
        scores = dec.score(Y[te], {k: v[te] for k, v in targets.items()})
        scores_ctrl = dec.score(Y[te][perm], {k: v[te] for k, v in targets.items()})
        return {"decoder": str(folder / "decoder"), "predictions": out, "test_rows": te.tolist(),
                "test_image_ids": np.asarray(ds.image_ids)[te].tolist(),
                "target_r": scores, "target_r_control": scores_ctrl, "seconds": time.perf_counter() - t0,
                "files": [str(f) for f in files]}
    return body


def _stage_lowlevel(sec: dict):
    t: TargetsSection = sec["targets"]
    low: LowLevelSection = sec["lowlevel"]

    def body(ctx: StageContext) -> dict:
        import torch

        from brainenc.decoding.lowlevel import invert_features

        preds = ctx.inputs["decode"]["predictions"]
        folder = ctx.run_dir / "lowlevel"
        _fresh_folder(folder, ctx.key)
        cnn = _build_cnn(t)
        kw = dict(low.options)
        for name in ("lr", "tv_weight"):
            if getattr(low, name) is not None:
                kw[name] = getattr(low, name)
        out, files, seconds, iters = {}, [], {}, 0
        for set_name, paths in preds.items():
            maps = [load_npy(paths[f"map{k}"]) for k in range(len(ctx.inputs["targets"]["maps"]))]
            n = len(maps[0])
            sub = folder / set_name
            sub.mkdir(exist_ok=True)
            t0 = time.perf_counter()
            from brainenc._utils.logging import progress

            starts = list(range(0, n, low.batch_size))
            for b, s in enumerate(progress(starts, desc=f"lowlevel {set_name}", unit="batch")):
                path = sub / f"batch{b:04d}.npy"
                if path.is_file():
                    continue  # written atomically when the batch finished: resume after it
                res = invert_features([torch.from_numpy(m[s:s + low.batch_size]).to(cnn.device) for m in maps], cnn,
                                      parameterization=low.parameterization, size=low.size,
                                      iterations=low.iterations, input_size=t.input_size,
                                      seed=low.seed + s, **kw)
                save_npy(path, _to_u8(res.images))
                iters += low.iterations
            imgs = np.concatenate([load_npy(sub / f"batch{b:04d}.npy") for b in range(len(starts))], 0)
            out[set_name] = str(save_npy(folder / f"{set_name}.npy", imgs))
            files.append(Path(out[set_name]))
            seconds[set_name] = time.perf_counter() - t0
        return {"images": out, "seconds": seconds, "files": [str(f) for f in files]}
    return body


def _stage_semantic(sec: dict):
    sem: SemanticSection = sec["semantic"]

    def body(ctx: StageContext) -> dict:
        from brainenc.decoding import diffusion

        import torch

        folder = ctx.run_dir / "semantic"
        _fresh_folder(folder, ctx.key)
        dtype = getattr(torch, sem.dtype)
        if sem.route == "sdxl_unclip":
            unet, vae = diffusion.load_sdxl_unclip(sem.checkpoint, sem.config_yaml or None, dtype=dtype,
                                                   device=sem.device)
        else:
            pipe = diffusion.load_pipeline(sem.route, sem.pipeline, dtype=dtype, device=sem.device)
        low = ctx.inputs["lowlevel"]["images"]
        preds = ctx.inputs["decode"]["predictions"]
        out, files = {}, []
        t0 = time.perf_counter()
        for set_name, low_path in low.items():
            init_u8 = load_npy(low_path)
            cond = load_npy(preds[set_name]["semantic"]) if "semantic" in preds[set_name] else None
            sub = folder / set_name
            sub.mkdir(exist_ok=True)
            starts = list(range(0, len(init_u8), sem.batch_size))
            for b, s in enumerate(starts):
                path = sub / f"batch{b:04d}.npy"
                if path.is_file():
                    continue
                init = _to_float(init_u8[s:s + sem.batch_size], sem.image_size).to(sem.device, dtype)
                c = None if cond is None else torch.from_numpy(cond[s:s + sem.batch_size]).to(sem.device, dtype)
                if sem.route == "sdxl_unclip":
                    img = diffusion.unclip_reconstruct(unet, vae, c, init, num_steps=sem.num_steps,
                                                       start_step=sem.start_step, guidance_scale=sem.guidance_scale,
                                                       image_size=sem.image_size, seed=sem.seed + s)
                elif sem.route == "stable_unclip":
                    img = diffusion.stable_unclip_reconstruct(pipe, c, init, num_steps=sem.num_steps,
                                                              start_step=sem.start_step,
                                                              guidance_scale=sem.guidance_scale, seed=sem.seed + s)
                else:
                    img = diffusion.img2img_reconstruct(pipe, init, prompt=sem.prompt, strength=sem.strength,
                                                        num_steps=sem.num_steps,
                                                        guidance_scale=sem.guidance_scale, seed=sem.seed + s)
                save_npy(path, _to_u8(img))
            imgs = np.concatenate([load_npy(sub / f"batch{b:04d}.npy") for b in range(len(starts))], 0)
            out[set_name] = str(save_npy(folder / f"{set_name}.npy", imgs))
            files.append(out[set_name])
        return {"images": out, "route": sem.route, "seconds": time.perf_counter() - t0, "files": files}
    return body


def _final_images(ctx: StageContext) -> tuple[dict[str, str], dict[str, str] | None]:
    """(final images per set, low-level images per set when a semantic stage ran)."""
    if "semantic" in ctx.inputs:
        return ctx.inputs["semantic"]["images"], ctx.inputs["lowlevel"]["images"]
    return ctx.inputs["lowlevel"]["images"], None


def _stage_evaluate(sec: dict, loaded):
    ev: ReconEvaluateSection = sec["evaluate"]

    def body(ctx: StageContext) -> dict:
        from brainenc.metrics.reconstruction import score_reconstruction_sets

        ds = loaded.dataset(ctx)
        ids = np.asarray(ctx.inputs["decode"]["test_image_ids"])
        real = _images(ds, ids)
        final, blurry = _final_images(ctx)
        preds = {k: load_npy(v) for k, v in final.items()}
        blur = None if blurry is None or ev.blurry_blend == 0 else {k: load_npy(v) for k, v in blurry.items()}
        t0 = time.perf_counter()
        res = score_reconstruction_sets(real, preds, ev.metrics, weights=ev.weights, blurry=blur,
                                        blurry_blend=ev.blurry_blend, clip_model=ev.clip_model, n_test=ev.n_test,
                                        batch_size=ev.batch_size, device=ev.device, subjects=[ctx.run_dir.name],
                                        repeat_handling="responses averaged over repeats before decoding",
                                        progress=True)
        res["seconds"] = time.perf_counter() - t0
        res["chance"] = {m: (0.5 if res["directions"][m] == "higher" and m not in ("pixcorr", "ssim") else None)
                         for m in ev.metrics}
        folder = ctx.run_dir / "evaluate"
        folder.mkdir(exist_ok=True)
        files = [write_json(folder / "metrics.json", res)]
        headers, rows = metric_rows(res)
        files.append(write_text(folder / "metrics.csv", "\n".join(",".join(r) for r in [headers] + rows) + "\n"))
        files.append(write_text(folder / "metrics.md", md_table(headers, rows)))
        return {"metrics": str(files[0]), "sets": {k: v["metrics"] for k, v in res["sets"].items()},
                "n": res["n"], "files": [str(f) for f in files]}
    return body


def md_table(headers, rows) -> str:
    """A GitHub-markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * len(headers)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def metric_rows(res: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows (one per prediction set) of a :func:`score_reconstruction_sets` record."""
    metrics = list(res["directions"])
    arrows = {"higher": "↑", "lower": "↓"}
    headers = ["images"] + [f"{m} {arrows[res['directions'][m]]}" for m in metrics]
    rows = []
    for name, s in res["sets"].items():
        label = {MODEL: "reconstruction", CONTROL: "shuffled-voxels control"}.get(name, name)
        rows.append([label] + [f"{s['metrics'][m]:.3f}" for m in metrics])
    return headers, rows


def _stage_report(sec: dict, run, loaded, title: str):
    rep: ReconReportSection = sec["report"]

    def body(ctx: StageContext) -> dict:
        from brainenc.report.reconstruction import build_reconstruction_report

        ds = loaded.dataset(ctx)
        ids = np.asarray(ctx.inputs["decode"]["test_image_ids"])
        final, blurry = _final_images(ctx)
        images = {"seen": _images(ds, ids),
                  "low-level": load_npy(ctx.inputs["lowlevel"]["images"][MODEL])}
        if blurry is not None:
            images["final"] = load_npy(final[MODEL])
        control = load_npy(final[CONTROL])
        res = read_json(ctx.inputs["evaluate"]["metrics"])
        files = build_reconstruction_report(ctx.run_dir / "report", res, images, control, image_ids=ids,
                                            title=title, subject=run.subject, decode=ctx.inputs["decode"],
                                            n_show=rep.n_show, dpi=rep.dpi, metric_rows=metric_rows(res))
        return {"report": str(ctx.run_dir / "report" / "index.md"), "files": [str(f) for f in files]}
    return body


def missing_files(sec: dict) -> list[str]:
    """Weight / checkpoint paths a reconstruct spec names that do not exist (``"key: path"``)."""
    paths: list[tuple[str, str]] = []
    t, sem, ev = sec["targets"], sec["semantic"], sec["evaluate"]
    if t.weights not in (None, "random"):
        paths.append(("targets.weights", t.weights))
    for k in ("weights",):
        v = t.semantic_options.get(k)
        if sem.route != "none" and v:
            paths.append((f"targets.semantic_options.{k}", v))
    if sem.route == "sdxl_unclip":
        paths.append(("semantic.checkpoint", sem.checkpoint))
        if sem.config_yaml:
            paths.append(("semantic.config_yaml", sem.config_yaml))
    elif sem.route != "none":
        paths.append(("semantic.pipeline", sem.pipeline))
    if isinstance(ev.weights, dict):
        from brainenc.metrics.reconstruction import METRIC_NAMES

        nets = {METRIC_NAMES[m][0] for m in ev.metrics if METRIC_NAMES[m][0]}
        paths += [(f"evaluate.weights.{k}", v) for k, v in ev.weights.items() if v != "random" and k in nets]
    return [f"{k}: {v}" for k, v in paths if not Path(str(v)).expanduser().exists()]


def data_stages(sec: dict, run) -> tuple[Any, list[Stage]]:
    """The encoding task's ``simulate`` and ``prepare`` stages for a sectioned task's ``[prepare]`` /
    ``[simulate]`` tables; returns ``(loaded, [simulate, prepare])`` (``loaded`` opens the prepared data)."""
    from brainenc.workflows.encoding import _Loaded, _stage_prepare, _stage_simulate

    prep = sec["prepare"]
    simulation = sec["simulate"].config
    shim = SimpleNamespace(prepare=prep.config, simulate=prep.simulate, simulation=simulation)
    loaded = _Loaded()
    prepare_cfg = run.prepare_config(prep.config)
    simulate_cfg = {"subject": run.subject, "nsd_root": str(run.nsd_root), "simulate": prep.simulate,
                    "simulation": None if simulation is None else to_dict(run.simulation_config(simulation))}
    return loaded, [
        Stage("simulate", _stage_simulate(shim, run), simulate_cfg, volatile=True),
        Stage("prepare", _stage_prepare(shim, run, loaded), {"prepare": prepare_cfg.key_dict()}, deps=["simulate"]),
    ]


def build_reconstruct_graph(spec, run) -> list[Stage]:
    """The reconstruct task's stages for ``spec`` (its ``sections``) and ``run`` (one subject).

    Every weight file the spec names is checked first: a missing one stops the run before any work
    with one line per file.
    """
    sec = spec.sections
    missing = missing_files(sec)
    if missing:
        from brainenc.exceptions import MissingWeightsError

        raise MissingWeightsError(f"{len(missing)} weight file(s) named in the spec do not exist (weights are never "
                                  "downloaded; fix the paths with --set): " + "; ".join(missing))
    loaded, stages = data_stages(sec, run)
    semantic_on = sec["semantic"].route != "none"
    targets_cfg = {"targets": to_dict(sec["targets"]),
                   "semantic_route": sec["semantic"].route if semantic_on else "none"}
    stages += [
        Stage("targets", _stage_targets(sec, loaded), targets_cfg, deps=["prepare"]),
        Stage("decode", _stage_decode(sec, loaded), to_dict(sec["decoder"]), deps=["prepare", "targets"]),
        Stage("lowlevel", _stage_lowlevel(sec), {"lowlevel": to_dict(sec["lowlevel"])},
              deps=["targets", "decode"]),
    ]
    final_deps = ["lowlevel"]
    if semantic_on:
        stages.append(Stage("semantic", _stage_semantic(sec), to_dict(sec["semantic"]), deps=["decode", "lowlevel"]))
        final_deps.append("semantic")
    stages.append(Stage("evaluate", _stage_evaluate(sec, loaded), to_dict(sec["evaluate"]),
                        deps=["prepare", "decode", *final_deps]))
    stages.append(Stage("report", _stage_report(sec, run, loaded, spec.pipeline.name), to_dict(sec["report"]),
                        deps=["prepare", "decode", "evaluate", *final_deps]))
    return stages

