"""Differentiable image -> feature path: the design matrix of a fitted encoder as a torch module.

>>> itf = ImageToFeatures(create_backbone("efficientnet-lite0"), "blocks.10", "tokens", grid_pool=2)  # doctest: +SKIP
>>> enc = compose(itf, brainenc.load("runs/.../models/ridge").to_torch())                          # doctest: +SKIP
>>> enc(images)            # float [n, 3, H, W] in [0, 1] -> [n, n_voxels], gradients flow to images  # doctest: +SKIP

:class:`ImageToFeatures` computes, from float images in [0, 1], exactly the rows the encoding
pipeline fits on for a feature choice: the backbone's preprocessing (:meth:`Preprocess.transform`,
the implementation the uint8 path also runs), the layer's tokens (:meth:`Backbone.forward_layer`
with ``grad=True``), the token / pooling rules of :func:`~brainenc.features.extract_features`, the
storage rounding of ``FeatureSpec.dtype`` (float16 storage: forward rounded, gradient passed
straight through) and the fitters' input rules (``inputs.features = "pooled"``: the pooled
features; ``"tokens"``: the stored tokens, or :func:`pool_grid_torch` of them with
``grid_pool > 0``, the torch twin of :func:`~brainenc.features.pool_grid`).

:func:`compose` joins it to a fitted estimator's torch head (``est.to_torch()``: ``input_kind``
``"design"`` [n, n_features] for ridge / banded ridge, ``"tokens"`` [n, n_tokens, n_features]
for the routing encoder) into a frozen :class:`ImageEncoder`, adapting the tokens as the fitters
do (ridge on raw tokens: flattened; routing: prefix tokens dropped) and checking the sizes.

This module imports torch (``brainenc.features`` itself does not import it).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from brainenc._utils.validation import check_option
from brainenc.exceptions import ConfigError, DataFormatError

__all__ = ["ImageToFeatures", "ImageEncoder", "compose", "pool_grid_torch"]


def pool_grid_torch(tokens, grid: tuple[int, int], cells: int, n_prefix: int = 0):
    """Torch twin of :func:`brainenc.features.pool_grid` (same regions, order and errors; differentiable).

    Parameters
    ----------
    tokens : torch.Tensor, shape (n, n_prefix + h * w, dim)
    grid : (h, w)
    cells : int
        Output grid size per side (<= h, w).
    n_prefix : int

    Returns
    -------
    torch.Tensor, float32, shape (n, cells * cells * dim)
        Row-major over the ``cells x cells`` regions, channels last, as ``pool_grid``.
    """
    h, w = (int(g) for g in grid)
    t = tokens[:, n_prefix:].to(torch.float32)
    n, hw, d = t.shape
    if hw != h * w:
        raise DataFormatError(f"tokens hold {hw} patches but the grid is {h}x{w}")
    if not 1 <= cells <= min(h, w):
        raise ConfigError(f"'grid_pool' must be in 1..{min(h, w)} for a {h}x{w} grid; {cells} was provided")
    t = t.reshape(n, h, w, d)
    ys = np.linspace(0, h, cells + 1).round().astype(int)
    xs = np.linspace(0, w, cells + 1).round().astype(int)
    cells_out = [t[:, ys[i]:ys[i + 1], xs[j]:xs[j + 1]].mean(dim=(1, 2)) for i in range(cells) for j in range(cells)]
    return torch.stack(cells_out, dim=1).reshape(n, -1)


def _round_storage(t, dtype: str):
    """``t`` rounded as the feature cache stores it (float16: forward rounded, identity gradient)."""
    if dtype == "float16":
        return t + (t.detach().to(torch.float16).to(t.dtype) - t.detach())
    return t


def _check_images(images) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3 \
            or not images.is_floating_point():
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ConfigError(f"images must be a float tensor [n, 3, H, W] with values in [0, 1]; got {got}")


class ImageToFeatures(nn.Module):
    """Images in [0, 1] -> the design rows the encoding pipeline fits on, differentiably.

    Parameters
    ----------
    backbone : Backbone
        A frozen backbone (:func:`brainenc.features.create_backbone`); its module becomes a
        submodule (``.to(device)`` moves it).
    layer : str or int
        As ``FeatureSpec.layer``.
    features : {"pooled", "tokens"}
        The fit's ``inputs.features``.
    pooled : {"mean", "cls", "model"}
        ``FeatureSpec.pooled`` (used with ``features="pooled"``).
    tokens : {"patch", "all"}
        ``FeatureSpec.tokens`` (used with ``features="tokens"``): ``"all"`` keeps the prefix
        tokens first, as the cache stores them.
    grid_pool : int
        The fit's ``inputs.grid_pool`` (``features="tokens"`` only): average the patch tokens on
        a ``grid_pool x grid_pool`` grid (:func:`pool_grid_torch`).
    dtype : {"float32", "float16"}
        ``FeatureSpec.dtype``: the storage rounding applied to the features (forward only; the
        gradient is passed straight through).

    Attributes
    ----------
    output_kind : {"design", "tokens"}
        ``"design"``: ``forward`` returns [n, n_features] (pooled, or grid-pooled tokens);
        ``"tokens"``: [n, n_tokens, dim] tokens as stored (``n_prefix`` prefix tokens first).
    layer : str
        The canonical layer name (``"last"``, ``"blocks.<i>"``, ``"module:<path>"``).

    Notes
    -----
    ``forward(images [n, 3, H, W])``: float images in [0, 1] of any size (resized and cropped by
    the backbone's own preprocessing); computed in float32 on the backbone's device (the images
    are moved there). The module is frozen and always in eval mode.
    """

    def __init__(self, backbone, layer="last", features: str = "pooled", *, pooled: str = "mean",
                 tokens: str = "patch", grid_pool: int = 0, dtype: str = "float32"):
        super().__init__()
        check_option("features", features, ["pooled", "tokens"])
        check_option("pooled", pooled, ["mean", "cls", "model"] + (["none"] if features == "tokens" else []))
        check_option("tokens", tokens, ["patch", "all"] + (["none"] if features == "pooled" else []))
        check_option("dtype", dtype, ["float32", "float16"])
        if isinstance(grid_pool, bool) or not isinstance(grid_pool, (int, np.integer)) or grid_pool < 0:
            raise ConfigError(f"'grid_pool' must be an integer >= 0; {grid_pool!r} was provided")
        if grid_pool and features != "tokens":
            raise ConfigError("'grid_pool' needs features = 'tokens'")
        for attr in ("module", "preprocess", "forward_layer", "resolve_layer", "describe"):
            if not hasattr(backbone, attr):
                raise ConfigError(f"'backbone' must be a brainenc Backbone (create_backbone); "
                                  f"got {type(backbone).__name__}")
        self.backbone = backbone
        self.net = backbone.module  # a registered submodule: parameters, buffers and .to() follow it
        self.layer = backbone.resolve_layer(layer)
        self.features, self.pooled, self.tokens = features, pooled, tokens
        self.grid_pool, self.dtype = int(grid_pool), dtype
        self.output_kind = "design" if (features == "pooled" or self.grid_pool) else "tokens"
        self._shape: dict | None = None
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.eval()

    @classmethod
    def from_spec(cls, spec, features: str = "pooled", grid_pool: int = 0, *, backbone=None, device=None):
        """Build from a ``FeatureSpec`` (or its table) and a fit's ``inputs``.

        Parameters
        ----------
        spec : FeatureSpec or dict
        features, grid_pool
            The fit's ``inputs.features`` / ``inputs.grid_pool``.
        backbone : Backbone, optional
            A ready backbone (its name must equal ``spec.backbone``); built from ``spec`` otherwise.
        device : str or torch.device, optional
            Where the backbone runs (default: ``spec.device``).
        """
        from brainenc.config import from_dict
        from brainenc.features.backbones import create_backbone
        from brainenc.features.extract import FeatureSpec

        spec = spec.check() if isinstance(spec, FeatureSpec) else from_dict(FeatureSpec, dict(spec))
        if features == "pooled" and spec.pooled == "none":
            raise ConfigError("inputs.features = 'pooled' but the feature spec has pooled = 'none'")
        if features == "tokens" and spec.tokens == "none":
            raise ConfigError("inputs.features = 'tokens' but the feature spec has tokens = 'none'")
        if backbone is None:
            backbone = create_backbone(spec.backbone, **spec.backbone_kwargs())
        elif backbone.name != spec.backbone:
            raise ConfigError(f"backbone {backbone.name!r} does not match spec.backbone {spec.backbone!r}")
        from brainenc._utils.device import resolve_device

        backbone.to(resolve_device(device if device is not None else spec.device))
        return cls(backbone, spec.layer, features, pooled=spec.pooled, tokens=spec.tokens, grid_pool=grid_pool,
                   dtype=spec.dtype)

    # ------------------------------------------------------------------ module behaviour
    def train(self, mode: bool = True):  # noqa: D401 - the backbone always stays in eval mode
        """Keep the frozen backbone in eval mode whatever ``mode`` is (BatchNorm uses running stats)."""
        return super().train(False)

    @property
    def device(self):
        return self.backbone.device

    def forward(self, images):
        """Design rows [n, n_features] (``output_kind="design"``) or tokens [n, n_tokens, dim] of ``images``."""
        _check_images(images)
        x = self.backbone.preprocess.transform(images.to(device=self.device, dtype=torch.float32))
        want_emb = self.features == "pooled" and self.pooled == "model"
        out = self.backbone.forward_layer(x, self.layer, embedding=want_emb, grad=True)
        self._remember(out)
        if self.features == "pooled":
            if self.pooled == "mean":
                pooled = out.tokens[:, out.n_prefix:].float().mean(dim=1)
            elif self.pooled == "cls":
                if out.n_prefix < 1:
                    raise ConfigError(f"pooled='cls' needs a class token, but {self.backbone.name} has none at "
                                      "this layer; use 'mean'")
                pooled = out.tokens[:, 0]
            else:
                pooled = out.embedding
            pooled = _round_storage(pooled.float(), self.dtype)
            return pooled.reshape(pooled.shape[0], -1)
        tok = out.tokens if self.tokens == "all" else out.tokens[:, out.n_prefix:]
        tok = _round_storage(tok.float(), self.dtype)
        if self.grid_pool:
            return pool_grid_torch(tok, out.grid, self.grid_pool, out.n_prefix if self.tokens == "all" else 0)
        return tok

    def _remember(self, out) -> None:
        if self._shape is None:
            n_prefix = int(out.n_prefix) if self.tokens == "all" else 0
            self._shape = {"grid": (int(out.grid[0]), int(out.grid[1])), "n_prefix": n_prefix,
                           "n_tokens": int(out.tokens.shape[1]) - (int(out.n_prefix) - n_prefix),
                           "dim": int(out.tokens.shape[2])}

    # ------------------------------------------------------------------ sizes
    def probe(self) -> dict:
        """Output sizes, from one forward pass of a blank image (run once, then remembered).

        Returns
        -------
        dict
            ``grid`` (h, w), ``n_prefix`` (prefix tokens in the output tokens), ``n_tokens``,
            ``dim`` (token width), ``n_features`` (width of a design row, or of a token) and
            ``shape`` (one output row's shape).
        """
        if self._shape is None or "shape" not in self._shape:
            h, w = self.backbone.preprocess.size
            with torch.no_grad():
                y = self.forward(torch.full((1, 3, h, w), 0.5, device=self.device))
            self._shape["shape"] = tuple(int(s) for s in y.shape[1:])
            self._shape["n_features"] = int(y.shape[-1])
        return dict(self._shape)

    @property
    def n_features(self) -> int:
        """Design width (``output_kind="design"``) or token width (``"tokens"``)."""
        return self.probe()["n_features"]

    def describe(self) -> dict:
        return {"backbone": self.backbone.describe(), "layer": self.layer, "features": self.features,
                "pooled": self.pooled, "tokens": self.tokens, "grid_pool": self.grid_pool, "dtype": self.dtype,
                "output_kind": self.output_kind}

    def extra_repr(self) -> str:
        return (f"backbone={self.backbone.name!r}, layer={self.layer!r}, features={self.features!r}, "
                f"grid_pool={self.grid_pool}, dtype={self.dtype!r}")


class ImageEncoder(nn.Module):
    """Frozen image -> voxel-response model: :class:`ImageToFeatures` then a fitted estimator's head.

    Built by :func:`compose`. ``forward(images [n, 3, H, W] float in [0, 1]) -> [n, n_voxels]``;
    every parameter has ``requires_grad=False``, the module stays in eval mode, gradients flow
    back to the images.

    Attributes
    ----------
    features : ImageToFeatures
    head : torch.nn.Module
    adapter : {"none", "flatten", "patches"}
        How the features are handed to the head (``"flatten"``: tokens flattened into a design
        row, as ridge on raw tokens; ``"patches"``: prefix tokens dropped, as the routing fitter).
    n_voxels : int
    info : dict
        Extra entries of :meth:`describe` (the run, fit name, ... when loaded from a run).
    """

    def __init__(self, features: "ImageToFeatures", head, adapter: str, n_voxels: int, info: dict | None = None):
        super().__init__()
        self.features = features
        self.head = head
        self.adapter = adapter
        self.n_voxels = int(n_voxels)
        self.info = dict(info or {})
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # noqa: D401
        """Stay in eval mode whatever ``mode`` is."""
        return super().train(False)

    def forward(self, images):
        """Predicted responses [n, n_voxels] of float images [n, 3, H, W] in [0, 1]."""
        x = self.features(images)
        if self.adapter == "flatten":
            x = x.reshape(x.shape[0], -1)
        elif self.adapter == "patches":
            n_prefix = self.features.probe()["n_prefix"]
            x = x[:, n_prefix:]
        head_dev = _module_device(self.head)
        if head_dev is not None and x.device != head_dev:
            x = x.to(head_dev)
        return self.head(x)

    def describe(self) -> dict:
        head = self.head.describe() if hasattr(self.head, "describe") else {"class": type(self.head).__name__}
        return {**self.info, "features": self.features.describe(), "head": head, "adapter": self.adapter,
                "n_voxels": self.n_voxels}


def _module_device(module):
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return None


def _head_size(head, name: str):
    value = getattr(head, name, None)
    if value is None:
        raise ConfigError(f"the head ({type(head).__name__}) has no '{name}' attribute; use a fitted estimator's "
                          "to_torch()")
    return int(value)


def compose(image_to_features: ImageToFeatures, head, *, info: dict | None = None) -> ImageEncoder:
    """Join a differentiable feature extractor and a fitted estimator's torch head.

    Parameters
    ----------
    image_to_features : ImageToFeatures
    head : torch.nn.Module
        ``estimator.to_torch()``: attributes ``input_kind`` (``"design"`` or ``"tokens"``),
        ``n_features`` (and ``n_tokens`` for token heads), ``n_outputs``.
    info : dict, optional
        Extra entries of :meth:`ImageEncoder.describe`.

    Returns
    -------
    ImageEncoder
        Frozen, eval mode; on the device of ``image_to_features`` (the head is moved there).

    Raises
    ------
    ConfigError
        When the head does not take what the features give (kind or sizes), in one line.
    """
    if not isinstance(image_to_features, ImageToFeatures):
        raise ConfigError(f"'image_to_features' must be an ImageToFeatures; got {type(image_to_features).__name__}")
    kind = getattr(head, "input_kind", None)
    check_option("head.input_kind", kind, ["design", "tokens"])
    itf = image_to_features
    shape = itf.probe()
    what = f"{itf.backbone.name} [{itf.layer}] {itf.features}"
    what += f" grid_pool={itf.grid_pool}" if itf.grid_pool else ""
    if kind == "design":
        want = _head_size(head, "n_features")
        adapter = "none" if itf.output_kind == "design" else "flatten"
        got = int(np.prod(shape["shape"]))
        if got != want:
            raise ConfigError(f"the head takes {want} design features but {what} gives {got}: not the features "
                              "it was fitted on")
    else:
        if itf.output_kind != "tokens":
            raise ConfigError(f"the head takes tokens [n, n_tokens, n_features] but {what} gives design rows; "
                              "use features='tokens' without grid_pool")
        adapter = "patches"
        got = (shape["n_tokens"] - shape["n_prefix"], shape["dim"])
        want = (_head_size(head, "n_tokens"), _head_size(head, "n_features"))
        if got != want:
            raise ConfigError(f"the head takes patch tokens [n, {want[0]}, {want[1]}] but {what} gives "
                              f"[n, {got[0]}, {got[1]}]: not the features it was fitted on")
        grid = getattr(head, "grid", None)
        if grid is not None and tuple(grid) != tuple(shape["grid"]):
            raise ConfigError(f"the head was fitted on a {tuple(grid)} patch grid but {what} gives {shape['grid']}")
    head = head.to(itf.device)
    return ImageEncoder(itf, head, adapter, n_voxels=_head_size(head, "n_outputs"), info=info)
