"""timm models (``timm:<name>[.<tag>]``), including DINOv2 (``timm:vit_base_patch14_dinov2``).

Weights are never downloaded: the pretrained file of the tag must already be in the Hugging
Face cache (``timm/<name>.<tag>``: ``model.safetensors`` or ``pytorch_model.bin``) or in the
torch hub cache (``<torch hub dir>/checkpoints/<file from the tag's url>``), or be passed as
``weights=<path>`` (loaded by timm with the model's checkpoint filter). ``pretrained="random"``
builds a random-init model; extra keyword arguments go to ``timm.create_model`` (``depth=2``,
``img_size=32``... for tiny test models).

Preprocessing follows ``timm.data.resolve_model_data_config`` (input size, interpolation,
mean/std, crop_pct; ``image_size`` overrides the size and is passed to ViTs as ``img_size`` so
position embeddings are resampled). DINOv2's native 518 px is slow; ``image_size=224`` is the
usual choice for fMRI encoding.

Layers: ``blocks.<i>`` = ``model.blocks[i]`` output (ViTs; raw residual stream) or
``model.stages[i]`` (CNNs); ``last`` = ``model.forward_features`` (after the final norm).
Prefix tokens (CLS + registers, ``model.num_prefix_tokens``) come first. The model's own
embedding (pooled rule ``"model"``) is ``forward_head(forward_features(x), pre_logits=True)``.
"""
from __future__ import annotations

import os
from pathlib import Path

from brainenc._utils.imports import soft_import
from brainenc.exceptions import ConfigError, DataFormatError, MissingWeightsError
from brainenc.features.backbones import (
    BACKBONES,
    Backbone,
    BackbonePlan,
    WeightsRef,
    check_weights_path,
    hf_cached_file,
)
from brainenc.features.preprocess import Preprocess

__all__ = ["TimmBackbone", "find_timm_weights", "plan_timm"]


def find_timm_weights(pretrained_cfg, cache_dir=None) -> tuple[Path | None, list[str]]:
    """Locate a timm pretrained checkpoint on this machine without network."""
    cfg = pretrained_cfg.to_dict() if hasattr(pretrained_cfg, "to_dict") else dict(pretrained_cfg)
    looked = []
    if cfg.get("file"):
        looked.append(str(cfg["file"]))
        if os.path.isfile(cfg["file"]):
            return Path(cfg["file"]), looked
    repo = cfg.get("hf_hub_id")
    if repo:
        cands = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
        looked.append(f"Hugging Face cache: {repo}/{' or '.join(cands)}")
        hit = hf_cached_file(repo, cands, cache_dir=cache_dir)
        if hit is not None:
            return hit, looked
    url = cfg.get("url")
    if url:
        import torch.hub

        local = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        looked.append(str(local))
        if local.is_file():
            return local, looked
    return None, looked


class TimmBackbone(Backbone):
    """A timm model; ``blocks`` are ``model.blocks`` (ViTs) or ``model.stages`` (CNNs)."""

    family = "timm"

    def __init__(self, name, module, preprocess, weights_id, config=None):
        super().__init__(name, module, preprocess, weights_id, config)
        blocks = getattr(module, "blocks", None)
        if blocks is None:
            blocks = getattr(module, "stages", None)
        self.blocks = list(blocks) if blocks is not None else []
        self.is_vit = hasattr(module, "num_prefix_tokens") and hasattr(module, "patch_embed")

    def _forward_full(self, x):
        return self.module.forward_head(self.module.forward_features(x), pre_logits=True)

    def _forward_last(self, x, embedding):
        feats = self.module.forward_features(x)
        emb = self.module.forward_head(feats, pre_logits=True) if embedding else None
        return feats, emb

    def _raw_to_tokens(self, raw, x, canonical):
        if raw.ndim == 4:
            if getattr(self.module, "output_fmt", "NCHW") == "NHWC":
                raw = raw.permute(0, 3, 1, 2)
            return super()._raw_to_tokens(raw, x, canonical)
        if raw.ndim == 3 and self.is_vit:
            n_prefix = int(self.module.num_prefix_tokens)
            pe = self.module.patch_embed
            if hasattr(pe, "dynamic_feat_size"):
                h, w = pe.dynamic_feat_size(tuple(x.shape[-2:]))
            else:
                h, w = pe.grid_size
            if raw.shape[1] == h * w:  # e.g. patch_embed output: no prefix yet
                n_prefix = 0
            if raw.shape[1] - n_prefix != h * w:
                raise DataFormatError(
                    f"{self.name}: {raw.shape[1]} tokens do not match {n_prefix} prefix + {h}x{w} patches")
            return raw, n_prefix, (int(h), int(w))
        return super()._raw_to_tokens(raw, x, canonical)


def plan_timm(name: str, pretrained: str | None = None, weights=None, image_size=None, seed: int = 0,
              cache_dir=None, **model_kwargs) -> BackbonePlan:
    """Model name, kwargs and weights file from timm's registry (nothing built).

    The preprocessing, block count and the kwargs the model accepted come from the built model
    (``plan.static`` is False): the feature cache keeps them in an identity record.
    """
    arch = name.split(":", 1)[1]
    timm = soft_import("timm", f"backbone {name!r}", extra="timm")
    base = arch.split(".", 1)[0]
    if not timm.is_model(base):
        import difflib

        close = difflib.get_close_matches(base, timm.list_models(), n=3)
        raise ConfigError(f"unknown timm model {base!r}" + (f"; did you mean {close}?" if close else ""))
    if pretrained not in (None, "random"):
        arch = f"{base}.{pretrained}"
    kwargs = dict(model_kwargs)
    if image_size:
        kwargs.setdefault("img_size", int(image_size))
    random_init = pretrained == "random" and weights is None
    if random_init:
        path = None
    elif weights is not None:
        path = check_weights_path(weights, name)
    else:
        pcfg = timm.models.get_pretrained_cfg(arch)
        if pcfg is None:
            tags = [m for m in timm.list_pretrained(f"{base}*") if m.split(".")[0] == base]
            raise MissingWeightsError(f"{name}: no pretrained tag {arch!r} in timm (known: {', '.join(tags) or 'none'})")
        path, looked = find_timm_weights(pcfg, cache_dir)
        if path is None:
            raise MissingWeightsError(
                f"{name}: pretrained weights for {arch!r} not on this machine (looked in {'; '.join(looked)}); "
                f"brainenc never downloads: fetch them where there is network or pass weights=<path>")
    ref = WeightsRef("random", seed=int(seed)) if path is None else WeightsRef("file", path=path)
    return BackbonePlan(name, TimmBackbone.family, ref, versions={"timm": timm.__version__},
                        extra={"arch": arch, "kwargs": kwargs, "image_size": image_size})


def _make_timm(name: str, **overrides) -> TimmBackbone:
    plan = plan_timm(name, **overrides)
    timm = soft_import("timm", f"backbone {name!r}", extra="timm")
    torch = soft_import("torch", f"backbone {name!r}")
    arch, kwargs, image_size = plan.extra["arch"], dict(plan.extra["kwargs"]), plan.extra["image_size"]
    path = plan.weights.path
    if path is None:
        torch.manual_seed(plan.weights.seed)
        create = dict(pretrained=False)
    else:
        create = dict(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    try:
        model = timm.create_model(arch, **create, **kwargs)
    except TypeError as exc:
        if "img_size" in kwargs and "img_size" in str(exc):
            kwargs.pop("img_size")  # CNNs take any input size
            model = timm.create_model(arch, **create, **kwargs)
        else:
            raise ConfigError(f"{name}: invalid model options {sorted(kwargs)} ({exc})") from None
    data_cfg = timm.data.resolve_model_data_config(model)
    size = tuple(data_cfg["input_size"][-2:])
    if image_size:
        size = (int(image_size), int(image_size))
    elif "img_size" in kwargs:  # model built for another size than its pretrained cfg says
        s = kwargs["img_size"]
        size = (int(s), int(s)) if isinstance(s, int) else tuple(int(v) for v in s)
    crop_mode = data_cfg.get("crop_mode", "center")
    pre = Preprocess(size=size, resize_mode="squash" if crop_mode == "squash" else "shortest",
                     crop_pct=float(data_cfg.get("crop_pct", 1.0) or 1.0),
                     interpolation=data_cfg.get("interpolation", "bicubic") or "bicubic",
                     mean=tuple(data_cfg["mean"]), std=tuple(data_cfg["std"]))
    config = {"library": f"timm=={timm.__version__}", "arch": arch, "model_kwargs": kwargs or None,
              "image_size": image_size}
    return TimmBackbone(name, model, pre, plan.weights.identity(), config)


BACKBONES.register("timm:*", _make_timm, family="timm", weights="user-supplied (HF/torch-hub cache or path)",
                   plan=plan_timm)
BACKBONES.register("timm:vit_base_patch14_dinov2", _make_timm, family="timm", default_tag="lvd142m", plan=plan_timm)
BACKBONES.register("timm:vit_large_patch14_dinov2", _make_timm, family="timm", default_tag="lvd142m", plan=plan_timm)
