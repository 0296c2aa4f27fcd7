"""``FeatureSpec`` and :func:`extract_features`: batched, cached, resumable feature extraction."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np

from brainenc._utils.logging import get_logger, progress
from brainenc._utils.paths import features_root
from brainenc._utils.validation import check_positive
from brainenc.config import from_dict
from brainenc.exceptions import ConfigError
from brainenc.features.cache import (
    CACHE_FORMAT,
    PROGRESS_FILE,
    CacheWriter,
    FeatureSet,
    entry_store,
    feature_key,
    ids_digest,
    load_feature_set,
    safe_dirname,
)
from brainenc.features.images import as_image_source, check_image_ids

__all__ = ["FeatureSpec", "extract_features", "feature_cache_info"]

log = get_logger("features")


@dataclass
class FeatureSpec:
    """What to extract (a pipeline's ``[features]`` table).

    Parameters
    ----------
    backbone : str
        Registry name (:func:`brainenc.features.list_backbones`), ``clip:<model>`` or ``timm:<model>``.
    layer : str or int
        ``"last"``, ``"blocks.<i>"``, an integer block index (negative from the end) or a submodule path.
    tokens : {"patch", "all", "none"}
        ``"patch"``: patch tokens only ``[n, h*w, dim]`` (CLS/register tokens dropped);
        ``"all"``: prefix tokens first, then patches; ``"none"``: store no tokens.
    pooled : {"mean", "cls", "model", "none"}
        ``"mean"``: mean of the layer's patch tokens; ``"cls"``: the layer's first prefix token
        (ViTs only); ``"model"``: the model's own pooled embedding (layer-independent: open_clip
        projected image embedding, timm pre-logits, EfficientNet global average pool); ``"none"``.
    dtype : {"float32", "float16"}
        Storage dtype (computation is float32).
    batch_size : int
    device : str
        ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"``.
    pretrained : str, optional
        Pretrained tag (family default when None); ``"random"`` for random-init weights.
    weights : str, optional
        Local weights file (overrides the tag's file).
    image_size : int, optional
        Input size override (default: the model's own).
    seed : int
        Seed of random-init weights.
    options : dict
        Family-specific factory options (open_clip ``model_cfg``, timm model kwargs, Gabor
        filter-bank parameters).
    """

    backbone: str = "efficientnet-lite0"
    layer: Union[str, int] = "last"
    tokens: Literal["patch", "all", "none"] = "patch"
    pooled: Literal["mean", "cls", "model", "none"] = "mean"
    dtype: Literal["float32", "float16"] = "float32"
    batch_size: int = 32
    device: str = "cpu"
    pretrained: Optional[str] = None
    weights: Optional[str] = None
    image_size: Optional[int] = None
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def check(self) -> "FeatureSpec":
        from brainenc._utils.validation import check_option

        check_option("tokens", self.tokens, ["patch", "all", "none"])
        check_option("pooled", self.pooled, ["mean", "cls", "model", "none"])
        check_option("dtype", self.dtype, ["float32", "float16"])
        check_positive("batch_size", self.batch_size, integer=True)
        if self.image_size is not None:
            check_positive("image_size", self.image_size, integer=True)
        if self.tokens == "none" and self.pooled == "none":
            raise ConfigError("'tokens' and 'pooled' are both 'none': nothing to extract")
        if isinstance(self.layer, bool) or not isinstance(self.layer, (str, int)):
            raise ConfigError(f"'layer' must be a string or an integer; {self.layer!r} was provided")
        return self

    def backbone_kwargs(self) -> dict:
        """Keyword arguments for :func:`brainenc.features.create_backbone`."""
        kw = dict(self.options)
        for name in ("pretrained", "weights", "image_size"):
            if getattr(self, name) is not None:
                kw[name] = getattr(self, name)
        if self.pretrained == "random":
            kw["seed"] = self.seed
        return kw


def _as_spec(spec) -> FeatureSpec:
    if isinstance(spec, FeatureSpec):
        return spec.check()
    if isinstance(spec, dict):
        return from_dict(FeatureSpec, spec)
    if isinstance(spec, str):
        return FeatureSpec(backbone=spec).check()
    raise ConfigError(f"'spec' must be a FeatureSpec, a dict or a backbone name; got {type(spec).__name__}")


def feature_cache_info(backbone, spec: FeatureSpec, source_identity: str, image_ids: np.ndarray,
                       layer: str | None = None) -> dict:
    """The full description hashed into the cache key (written to ``meta.json``).

    ``backbone`` is a :class:`~brainenc.features.Backbone` or a
    :class:`~brainenc.features.backbones.BackboneIdentity` (same ``describe()``); ``layer`` is
    the canonical layer when already resolved.
    """
    return {
        "format": CACHE_FORMAT,
        "backbone": backbone.describe(),
        "layer": layer if layer is not None else backbone.resolve_layer(spec.layer),
        "tokens": spec.tokens,
        "pooled": spec.pooled,
        "dtype": spec.dtype,
        "images": {"source": source_identity, "n": int(image_ids.shape[0]), "ids_sha256": ids_digest(image_ids)},
    }


def _entry_of(root: Path, info: dict) -> tuple[str, Path]:
    key = feature_key(info)
    return key, root / safe_dirname(info["backbone"]["name"]) / key


def _load_hit(folder: Path, key: str) -> tuple[FeatureSet | None, bool]:
    """(feature set, damaged) of a completed entry; (None, False) when there is none."""
    if not (folder / "COMPLETE").is_file():
        return None, False
    try:
        return load_feature_set(folder, cache_hit=True, expect_key=key), False
    except Exception as exc:  # noqa: BLE001 - a damaged entry is recomputed, never returned
        log.warning(f"recomputing damaged feature cache {folder} ({exc})")
        return None, True


def extract_features(images, image_ids, spec: FeatureSpec | dict | str = None, cache_dir=None, *,
                     backbone=None, overwrite: bool = False, show_progress: bool = True) -> FeatureSet:
    """Extract (or load from the cache) the features of ``image_ids``.

    Parameters
    ----------
    images : ImageSource, ndarray or path
        Object with ``read(ids) -> uint8 [n, H, W, 3]`` and ``identity()``
        (:class:`~brainenc.features.HDF5Images`, :class:`~brainenc.features.ArrayImages`), a uint8
        array ``[n_images, H, W, 3]`` or the path of an HDF5 image brick (key ``imgBrick``).
    image_ids : array-like of int, shape (n,)
        0-based ids into ``images``; row ``i`` of the result belongs to ``image_ids[i]``.
        Duplicates are allowed (each is computed); pass unique ids and use
        :meth:`FeatureSet.rows_for` to map trials to rows.
    spec : FeatureSpec, dict or str
        What to extract (a str is a backbone name with defaults). Default: ``FeatureSpec()``.
    cache_dir : str or Path, optional
        Cache root; default ``<data root>/features`` (``BRAINENC_DATA``).
    backbone : Backbone, optional
        A ready backbone (its name must equal ``spec.backbone``); built from ``spec`` otherwise,
        and only on a cache miss: the key is computed without the model (weights by file
        identity + cached content hash, preprocessing and blocks from the family's plan or from
        the identity record of an earlier build; see :mod:`brainenc.features.cache`).
    overwrite : bool
        Recompute even when a completed entry exists.
    show_progress : bool
        Progress bar over batches (also silenced by ``BRAINENC_QUIET=1``).

    Returns
    -------
    FeatureSet
        ``tokens`` [n, n_tokens, dim] and ``pooled`` [n, dim] memory-mapped from the cache.

    Raises
    ------
    CacheLockedError
        When another live process is writing the same entry.

    Notes
    -----
    A killed run leaves ``<backbone>/.<key>.partial/`` (``*.partial.npy`` + ``progress.json``); the
    next call with the same key resumes after the last finished batch. Results are only ever read from folders holding the
    ``COMPLETE`` marker whose ``meta.json`` key equals the requested key.
    """
    from brainenc.features.backbones import LayerNeedsModel, backbone_identity, record_identity

    spec = _as_spec(spec if spec is not None else FeatureSpec())
    source = as_image_source(images)
    n_avail = len(source) if hasattr(source, "__len__") else None
    ids = check_image_ids(image_ids, n_avail)
    if ids.size == 0:
        raise ConfigError("'image_ids' is empty")
    root = Path(cache_dir) if cache_dir is not None else features_root()
    kwargs = spec.backbone_kwargs()
    request = planned = None
    built = None
    if backbone is not None:
        if backbone.name != spec.backbone:
            raise ConfigError(f"backbone {backbone.name!r} does not match spec.backbone {spec.backbone!r}")
        ident = backbone
    else:
        ident, request = backbone_identity(spec.backbone, cache_root=root, **kwargs)
        planned = ident if ident is not None and ident.source == "plan" else None
        if ident is None:  # no plan, or only a build knows the preprocessing (recorded below)
            ident = built = _build(spec, kwargs)
    try:
        layer = ident.resolve_layer(spec.layer)
    except LayerNeedsModel:  # a submodule path never resolved in this cache
        ident = built = _build(spec, kwargs)
        layer = built.resolve_layer(spec.layer)
    info = feature_cache_info(ident, spec, source.identity(), ids, layer=layer)
    key, folder = _entry_of(root, info)
    damaged = False
    if not overwrite:
        hit, damaged = _load_hit(folder, key)
        if hit is not None:
            if built is not None:  # built to learn the identity: keep it for the next hit
                _record(record_identity, root, request, built, spec.layer, layer, needed=planned is None)
            return hit

    # a miss: from here on the built model is the authority on the key
    if backbone is None and built is None:
        built = _build(spec, kwargs)
    model = backbone if backbone is not None else built
    if model is not ident:
        check = feature_cache_info(model, spec, source.identity(), ids)
        if check != info:  # a stale identity record (the next line replaces it)
            log.warning(f"{spec.backbone}: recorded backbone identity differs from the built model; using the model's")
            info, layer = check, check["layer"]
            key, folder = _entry_of(root, info)
            if not overwrite:
                hit, damaged = _load_hit(folder, key)
                if hit is not None:
                    _record(record_identity, root, request, model, spec.layer, layer, needed=planned is None)
                    return hit
    if built is not None:
        _record(record_identity, root, request, model, spec.layer, layer, needed=planned is None)
    return _compute(source, ids, spec, model, info, key, folder, overwrite or damaged, show_progress)


def _build(spec: FeatureSpec, kwargs: dict):
    from brainenc.features.backbones import create_backbone

    return create_backbone(spec.backbone, **kwargs)


def _record(record_identity, root: Path, request, model, spec_layer, layer: str, needed: bool) -> None:
    """Write the identity record of a model built from ``request``.

    Needed when the family's plan does not know the preprocessing/blocks (``needed``) or the
    layer is a submodule path (only a build resolves those).
    """
    from brainenc.features.backbones import resolve_block_layer

    if request is None:
        return
    by_path = resolve_block_layer(spec_layer, len(model.blocks), model.block_prefix, model.name) is None
    if needed or by_path:
        record_identity(root, request, model, {spec_layer: layer} if by_path else {})


def _compute(source, ids, spec: FeatureSpec, backbone, info: dict, key: str, folder: Path, reset: bool,
             show_progress: bool) -> FeatureSet:
    import torch

    from brainenc._utils.device import resolve_device

    device = resolve_device(spec.device)
    layer = info["layer"]
    want_emb = spec.pooled == "model"
    store = entry_store(folder.parent)
    with store.write(folder.name, resumable=True, marker=key + "\n", scratch=(PROGRESS_FILE,)) as entry:
        if reset:
            entry.invalidate()  # also forgets any partial progress
        elif entry.existing is not None:
            hit, damaged = _load_hit(entry.existing, key)  # finished by another process while we got here
            if hit is not None:
                return hit
            entry.invalidate()
        writer = CacheWriter(entry.path, key, len(ids), spec.dtype)
        start = writer.try_resume()
        if start:
            log.info(f"resuming feature extraction at row {start}/{len(ids)} in {entry.path}")
        backbone.to(device)
        bs = int(spec.batch_size)
        starts = list(range(start, len(ids), bs))
        t0 = time.perf_counter()
        bar = progress(starts, desc=f"features {backbone.name} [{layer}]", total=len(starts), unit="batch") \
            if show_progress else starts
        for s in bar:
            batch_ids = ids[s:s + bs]
            x = backbone.preprocess_images(source.read(batch_ids), device=device)
            out = backbone.forward_layer(x, layer, embedding=want_emb)
            tok, pooled = _select(out, spec, backbone.name)
            if writer.tokens is None and writer.pooled is None:
                writer.allocate(None if tok is None else (len(ids),) + tuple(tok.shape[1:]),
                                None if pooled is None else (len(ids),) + tuple(pooled.shape[1:]),
                                out.grid, out.n_prefix if spec.tokens == "all" else 0)
            writer.write(s, tok, pooled)
        dt = time.perf_counter() - t0
        meta = dict(info, key=key, seconds=round(dt, 3), torch=torch.__version__, device=str(device))
        writer.finish(ids, meta)
    if starts:
        log.debug(f"{len(ids) - start} images in {dt:.1f} s ({(len(ids) - start) / max(dt, 1e-9):.1f} img/s)")
    return load_feature_set(folder, cache_hit=False, expect_key=key)


def _select(out, spec: FeatureSpec, name: str):
    """Apply the token and pooling rules to one batch; returns float32 numpy arrays."""
    tokens = out.tokens
    patches = tokens[:, out.n_prefix:]
    tok = None
    if spec.tokens == "patch":
        tok = patches
    elif spec.tokens == "all":
        tok = tokens
    pooled = None
    if spec.pooled == "mean":
        pooled = patches.float().mean(dim=1)
    elif spec.pooled == "cls":
        if out.n_prefix < 1:
            raise ConfigError(f"pooled='cls' needs a class token, but {name} has none at this layer; use 'mean'")
        pooled = tokens[:, 0]
    elif spec.pooled == "model":
        pooled = out.embedding
    to_np = (lambda t: None if t is None else t.detach().float().cpu().numpy())
    return to_np(tok), to_np(pooled)
