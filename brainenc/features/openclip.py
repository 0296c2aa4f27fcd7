"""OpenCLIP image towers (``clip:ViT-B-32``, ``clip:ViT-L-14``, ``clip:ViT-bigG-14``, any open_clip model).

Weights are never downloaded. ``pretrained`` names an open_clip tag (defaults below); the
matching file must already be on this machine: in the Hugging Face cache (``HF_HOME`` /
``cache_dir``), in open_clip's URL cache (``~/.cache/clip``), or given explicitly as
``weights=<path>`` (the tag then still decides QuickGELU and the preprocessing statistics).
``pretrained="random"`` builds a random-init model (tests; ``model_cfg`` may shrink it).

Layers: ``blocks.<i>`` = output of ``visual.transformer.resblocks[i]`` (residual stream, before
``ln_post``); ``last`` = output of the last block with ``ln_post`` applied to every token (the
representation the pooling head sees). open_clip versions differ in the layout the transformer
runs in: ``batch_first=True`` (NLD, open_clip >= 2.24) or (seq, batch, dim) (LND, older
versions); hook outputs are converted to NLD using ``visual.transformer.batch_first`` (LND when
the attribute is absent) and checked against the expected token count.

The model's own embedding (pooled rule ``"model"``) is the projected image embedding
``model.encode_image`` returns (unnormalised).
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
    pop_unknown,
)
from brainenc.features.preprocess import Preprocess

__all__ = ["OpenCLIPBackbone", "DEFAULT_TAGS", "find_openclip_weights", "plan_openclip", "build_clip_model",
           "zero_shot_classify", "ZERO_SHOT_CATEGORIES"]

#: default pretrained tag per model name
DEFAULT_TAGS = {
    "ViT-B-32": "openai",
    "ViT-B-16": "openai",
    "ViT-L-14": "openai",
    "ViT-H-14": "laion2b_s32b_b79k",
    "ViT-bigG-14": "laion2b_s39b_b160k",
}


def find_openclip_weights(arch: str, tag_cfg: dict, cache_dir=None) -> tuple[Path | None, list[str]]:
    """Locate the weights of an open_clip pretrained tag on this machine without network.

    Returns
    -------
    path : Path or None
    looked : list of str
        Human-readable places that were checked (for the error message).
    """
    looked = []
    if tag_cfg.get("file"):
        looked.append(str(tag_cfg["file"]))
        if os.path.isfile(tag_cfg["file"]):
            return Path(tag_cfg["file"]), looked
    hub = tag_cfg.get("hf_hub") or ""
    if hub:
        from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

        repo, fname = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
        fname = fname or HF_WEIGHTS_NAME
        cands = []
        if fname == HF_WEIGHTS_NAME:
            cands.append(HF_SAFE_WEIGHTS_NAME)
        elif fname.endswith((".bin", ".pth")):
            cands.append(fname[:-4] + ".safetensors")
        cands.append(fname)
        looked.append(f"Hugging Face cache: {repo}/{' or '.join(cands)}")
        hit = hf_cached_file(repo, cands, cache_dir=cache_dir)
        if hit is not None:
            return hit, looked
    url = tag_cfg.get("url") or ""
    if url:
        local = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        looked.append(str(local))
        if local.is_file():
            return local, looked
    return None, looked


class OpenCLIPBackbone(Backbone):
    """Image tower of an open_clip model (``module`` is ``model.visual``)."""

    family = "open_clip"

    def __init__(self, name, module, preprocess, weights_id, config=None):
        super().__init__(name, module, preprocess, weights_id, config)
        v = module
        if hasattr(v, "transformer") and hasattr(v, "class_embedding"):
            self.kind = "vit"
            self.blocks = list(v.transformer.resblocks)
            self.block_prefix = "blocks"
        elif hasattr(v, "trunk"):  # timm trunk inside open_clip (SigLIP, ConvNeXt towers)
            self.kind = "timm"
            trunk = v.trunk
            self.blocks = list(getattr(trunk, "blocks", None) or getattr(trunk, "stages", []))
        elif hasattr(v, "layer4"):  # ModifiedResNet (RN50 CLIP)
            self.kind = "resnet"
            self.blocks = [v.layer1, v.layer2, v.layer3, v.layer4]
        else:
            raise ConfigError(f"{name}: unsupported open_clip image tower {type(v).__name__}")

    @property
    def batch_first(self) -> bool:
        """Layout the ViT transformer runs in (False = (seq, batch, dim), older open_clip)."""
        return bool(getattr(self.module.transformer, "batch_first", False))

    def _forward_full(self, x):
        out = self.module(x)
        return out[0] if isinstance(out, (tuple, list)) else out

    def _forward_last(self, x, embedding):
        if self.kind == "vit":
            raw, emb = self._forward_hooked(x, self.blocks[-1], embedding)
            tokens = self._vit_to_nld(raw, x.shape[0], inside_transformer=True)
            return self.module.ln_post(tokens), emb
        if self.kind == "timm":
            trunk = self.module.trunk
            feats = trunk.forward_features(x)
            emb = self._forward_full(x) if embedding else None
            return feats, emb
        raw, emb = self._forward_hooked(x, self.blocks[-1], embedding)
        return raw, emb

    def _vit_to_nld(self, raw, n: int, inside_transformer: bool):
        if raw.ndim != 3:
            raise DataFormatError(f"{self.name}: expected a 3-D token tensor, got shape {tuple(raw.shape)}")
        t = raw if (self.batch_first or not inside_transformer) else raw.transpose(0, 1)
        if t.shape[0] != n:
            raise DataFormatError(
                f"{self.name}: token layout mismatch: batch of {n} images but layer output {tuple(raw.shape)} "
                f"(transformer.batch_first={self.batch_first})")
        return t

    def _raw_to_tokens(self, raw, x, canonical):
        n = x.shape[0]
        if self.kind == "resnet" or raw.ndim == 4:
            return super()._raw_to_tokens(raw, x, canonical)
        if self.kind == "timm":
            n_prefix = int(getattr(self.module.trunk, "num_prefix_tokens", 0))
            tokens = raw
        else:
            inside = canonical.startswith("blocks.") or canonical.startswith("module:transformer.")
            tokens = raw if canonical == "last" else self._vit_to_nld(raw, n, inside)
            n_prefix = 1
        n_patch = tokens.shape[1] - n_prefix
        ph, pw = self._patch_size()
        h, w = x.shape[-2] // ph, x.shape[-1] // pw
        if h * w != n_patch:
            raise DataFormatError(
                f"{self.name}: {n_patch} patch tokens do not match a {h}x{w} grid for input {tuple(x.shape[-2:])}")
        return tokens, n_prefix, (int(h), int(w))

    def _patch_size(self):
        if self.kind == "timm":
            ps = self.module.trunk.patch_embed.patch_size
        else:
            ps = self.module.patch_size
        return (ps, ps) if isinstance(ps, int) else tuple(ps)


def _preprocess_from_cfg(cfg: dict, image_size=None) -> Preprocess:
    size = cfg.get("size", 224)
    if image_size:
        size = image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    mode = cfg.get("resize_mode", "shortest")
    return Preprocess(size=size, resize_mode=mode, crop_pct=1.0, interpolation=cfg.get("interpolation", "bicubic"),
                      mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), fill=float(cfg.get("fill_color", 0)) / 255.0)


def plan_openclip(name: str, pretrained: str | None = None, weights=None, image_size=None, seed: int = 0,
                  model_cfg: dict | None = None, cache_dir=None, **options) -> BackbonePlan:
    """Tag, weights file and config of an open_clip tower, from open_clip's registry (nothing built).

    The preprocessing and block count come from the built model (``plan.static`` is False): the
    feature cache keeps them in an identity record after the first build.
    """
    pop_unknown(options, set(), name)
    arch = name.split(":", 1)[1]
    open_clip = soft_import("open_clip", f"backbone {name!r}", extra="clip")
    from open_clip.factory import get_model_config

    if get_model_config(arch) is None:
        import difflib

        close = difflib.get_close_matches(arch, open_clip.list_models(), n=3)
        raise ConfigError(f"unknown open_clip model {arch!r}" + (f"; did you mean {close}?" if close else ""))
    random_init = pretrained == "random"
    if model_cfg and not random_init and weights is None:
        raise ConfigError(f"{name}: 'model_cfg' changes the architecture; use it with pretrained='random' or weights=<path>")
    tag = None if random_init else (pretrained or DEFAULT_TAGS.get(arch))
    tag_cfg = {}
    if tag is not None:
        tag_cfg = open_clip.get_pretrained_cfg(arch, tag) or {}
        if not tag_cfg and weights is None:
            tags = open_clip.list_pretrained_tags_by_model(arch)
            raise ConfigError(f"{name}: unknown pretrained tag {tag!r}; known tags: {', '.join(tags) or '(none)'}")
    elif not random_init and weights is None:
        raise MissingWeightsError(f"{name}: no default pretrained tag; pass pretrained=<tag> or weights=<path>")

    if weights is not None:
        path = check_weights_path(weights, name)
    elif random_init:
        path = None
    else:
        path, looked = find_openclip_weights(arch, tag_cfg, cache_dir)
        if path is None:
            raise MissingWeightsError(
                f"{name} (tag {tag!r}): weights not on this machine (looked in {'; '.join(looked)}); "
                f"brainenc never downloads: fetch them where there is network (e.g. huggingface-cli download) "
                f"or pass weights=<path to the .safetensors/.bin file>")
    kwargs = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (model_cfg or {}).items()}
    if image_size and "vision_cfg" in kwargs:  # model_cfg would override force_image_size
        kwargs["vision_cfg"]["image_size"] = int(image_size)
    config = {"library": f"open_clip=={open_clip.__version__}", "arch": arch, "tag": tag,
              "quick_gelu": bool(tag_cfg.get("quick_gelu", False)), "model_cfg": kwargs or None,
              "image_size": image_size}
    ref = WeightsRef("random", seed=int(seed)) if path is None else WeightsRef("file", path=path)
    return BackbonePlan(name, OpenCLIPBackbone.family, ref, versions={"open_clip": open_clip.__version__},
                        config=config, extra={"tag_cfg": tag_cfg, "kwargs": kwargs, "random_init": random_init})


def _make_openclip(name: str, cache_dir=None, **overrides) -> OpenCLIPBackbone:
    plan = plan_openclip(name, cache_dir=cache_dir, **overrides)
    open_clip = soft_import("open_clip", f"backbone {name!r}", extra="clip")
    torch = soft_import("torch", f"backbone {name!r}")
    arch, tag_cfg, kwargs = plan.config["arch"], plan.extra["tag_cfg"], plan.extra["kwargs"]
    image_size = plan.config["image_size"]
    pp_overlay = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
    if plan.extra["random_init"]:
        torch.manual_seed(plan.weights.seed)
    path = plan.weights.path
    model = open_clip.create_model(
        arch,
        pretrained=str(path) if path is not None else None,
        force_quick_gelu=plan.config["quick_gelu"],
        force_preprocess_cfg=pp_overlay or None,
        force_image_size=image_size,
        pretrained_text=False,
        cache_dir=cache_dir,
        **kwargs,
    )
    visual = model.visual
    pre_cfg = dict(open_clip.get_model_preprocess_cfg(model))
    del model  # drop the text tower
    pre = _preprocess_from_cfg(pre_cfg, image_size)
    return OpenCLIPBackbone(name, visual, pre, plan.weights.identity(), plan.config)


def build_clip_model(arch: str = "ViT-L-14-quickgelu", *, weights=None, seed: int = 0, device: str = "cpu"):
    """A whole open_clip CLIP model (image and text towers) for metrics that call ``encode_image``.

    ``weights=None`` builds ``arch`` with random weights (seeded, without touching the global RNG);
    a path to OpenAI's TorchScript file (``ViT-L-14.pt``) goes through ``open_clip.load_openai_model``,
    the only loader that accepts those archives; any other file is an open_clip checkpoint for ``arch``.
    """
    open_clip = soft_import("open_clip", "CLIP metric network", extra="clip")
    torch = soft_import("torch", "CLIP metric network")
    if weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = open_clip.create_model(arch, pretrained=None)
        return model.to(device).eval()
    path = check_weights_path(weights, f"CLIP model {arch!r}")
    try:
        model = open_clip.load_openai_model(str(path), precision="fp32", device=device)
    except RuntimeError:
        model = open_clip.create_model(arch, pretrained=str(path))
    return model.to(device).eval()


#: BrainDiVE's five categories and the prompts of the zero-shot classifier (CLIP's "a photo of ..." template)
ZERO_SHOT_CATEGORIES = {"faces": "a photo of a face", "places": "a photo of a place",
                        "bodies": "a photo of a body", "words": "a photo of words", "food": "a photo of food"}


def zero_shot_classify(images, model=None, *, arch: str = "ViT-B-32-quickgelu", weights=None, categories=None,
                       batch_size: int = 32, device: str = "cpu", seed: int = 0):
    """CLIP zero-shot category of each image (BrainDiVE §4's 5-way specificity test).

    Parameters
    ----------
    images : uint8 array [n, H, W, 3]
    model : open_clip CLIP model, optional
        Built with :func:`build_clip_model` (``arch``, ``weights``, ``seed``) when None; random weights
        (``weights=None``) test the plumbing only.
    categories : mapping name -> prompt, optional
        Default :data:`ZERO_SHOT_CATEGORIES`.

    Returns
    -------
    dict
        ``labels`` (the category names in order), ``probs`` float32 [n, k] (softmax of the scaled cosine
        similarities), ``pred`` int64 [n].
    """
    import numpy as np

    open_clip = soft_import("open_clip", "CLIP zero-shot classification", extra="clip")
    torch = soft_import("torch", "CLIP zero-shot classification")
    cats = dict(categories or ZERO_SHOT_CATEGORIES)
    if not cats:
        raise ConfigError("'categories' must name at least one category")
    model = model if model is not None else build_clip_model(arch, weights=weights, seed=seed, device=device)
    dev = next(model.parameters()).device
    vis = model.visual
    size = vis.image_size if isinstance(vis.image_size, (tuple, list)) else (vis.image_size, vis.image_size)
    mean = getattr(vis, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(vis, "image_std", None) or open_clip.OPENAI_DATASET_STD
    pre = Preprocess(size=tuple(int(v) for v in size), resize_mode="shortest", interpolation="bicubic",
                     mean=tuple(mean), std=tuple(std))
    tok = open_clip.get_tokenizer(arch)
    with torch.no_grad():
        text = model.encode_text(tok(list(cats.values())).to(dev)).float()
        text = text / text.norm(dim=-1, keepdim=True)
        scale = float(model.logit_scale.exp()) if hasattr(model, "logit_scale") else 100.0
        probs = []
        arr = np.asarray(images)
        for s in range(0, len(arr), batch_size):
            f = model.encode_image(pre(arr[s:s + batch_size], device=dev)).float()
            f = f / f.norm(dim=-1, keepdim=True)
            probs.append((scale * f @ text.T).softmax(-1).cpu().numpy())
    probs = np.concatenate(probs).astype(np.float32)
    return {"labels": list(cats), "probs": probs, "pred": probs.argmax(1).astype(np.int64)}


BACKBONES.register("clip:*", _make_openclip, family="open_clip", weights="user-supplied (tag in local cache or path)",
                   plan=plan_openclip)
for _arch in ("ViT-B-32", "ViT-L-14", "ViT-bigG-14"):
    BACKBONES.register(f"clip:{_arch}", _make_openclip, family="open_clip", default_tag=DEFAULT_TAGS[_arch],
                       plan=plan_openclip)
