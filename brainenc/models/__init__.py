"""brainenc.models: nn.Modules only (no loops over data, no optimisers).

Registry: ``MODELS`` maps a name to a factory
``f(config: dict | RoutingArchitecture | None, query_set=None, *, feature_dim, grid, n_voxels, **overrides) -> nn.Module``:
hyper-parameters come from ``config`` and ``overrides``, the sizes that come from the data are keywords;
``create_model(name, ...)`` builds one. Tiny variants are registered like the real ones.

>>> m = create_model("routing_encoder_tiny", feature_dim=64, grid=(4, 4), n_voxels=100)  # voxel queries
"""
from __future__ import annotations

from typing import Any, Mapping

from brainenc.config import from_dict, to_dict
from brainenc.exceptions import ConfigError
from brainenc.models.brainit import (
    TINY_BRAINIT,
    TINY_UNIVERSAL_ENCODER,
    BrainIT,
    BrainITArchitecture,
    BrainTokenizer,
    UniversalEncoderArchitecture,
    UniversalEncoderModel,
    VoxelEmbedding,
    segment_softmax,
)
from brainenc.models.brainmae import (
    TINY_BRAINMAE,
    BrainMAEArchitecture,
    BrainMAEFinetuneModel,
    BrainMAEPretrainModel,
    static_graph,
)
from brainenc.models.positional import LearnedPositional2d, SinePositional2d, make_positional, sine_2d
from brainenc.models.queries import COMBINE_RULES, QUERY_KINDS, QuerySet, build_query_set
from brainenc.models.readout import GroupedReadout, dense_readout_reference, per_voxel_readout
from brainenc.models.routing_encoder import CrossAttention, DecoderLayer, RoutingArchitecture, RoutingEncoderModel
from brainenc.registry import Registry

__all__ = [
    "UniversalEncoderArchitecture",
    "UniversalEncoderModel",
    "VoxelEmbedding",
    "BrainITArchitecture",
    "BrainIT",
    "BrainTokenizer",
    "segment_softmax",
    "TINY_UNIVERSAL_ENCODER",
    "TINY_BRAINIT",
    "BrainMAEArchitecture",
    "BrainMAEPretrainModel",
    "BrainMAEFinetuneModel",
    "static_graph",
    "TINY_BRAINMAE",
    "MODELS",
    "create_model",
    "list_models",
    "RoutingArchitecture",
    "RoutingEncoderModel",
    "DecoderLayer",
    "CrossAttention",
    "GroupedReadout",
    "per_voxel_readout",
    "dense_readout_reference",
    "QuerySet",
    "build_query_set",
    "QUERY_KINDS",
    "COMBINE_RULES",
    "sine_2d",
    "SinePositional2d",
    "LearnedPositional2d",
    "make_positional",
]

MODELS = Registry("model")


def _merged(arch_cls, defaults: Mapping[str, Any], config, overrides: Mapping[str, Any]):
    """``arch_cls`` from the variant's ``defaults``, then ``config`` (mapping or instance), then ``overrides``."""
    base = dict(defaults)
    base.update(to_dict(config) if isinstance(config, arch_cls) else dict(config or {}))
    base.update(overrides)
    return from_dict(arch_cls, base)


def _routing_factory(defaults: Mapping[str, Any], voxels_only: bool = False):
    def factory(config: Mapping[str, Any] | RoutingArchitecture | None = None, query_set: QuerySet | None = None, *,
                feature_dim: int, grid: tuple[int, int], n_voxels: int, **overrides) -> RoutingEncoderModel:
        if voxels_only and query_set is not None:
            raise ConfigError("'query_set' must be None for a voxel-query model (one query per voxel)")
        arch = _merged(RoutingArchitecture, defaults, config, overrides)
        return RoutingEncoderModel(arch, feature_dim=feature_dim, grid=grid, n_voxels=n_voxels, query_set=query_set)

    return factory


#: faithful defaults (reference_systems.md a.3): d_model 768, 16 heads, FFN 1024, one layer, sine keys;
#: grouped queries when a query set is given, else one query per voxel
MODELS.register("routing_encoder", _routing_factory({}), description="transformer brain encoder, grouped/voxel queries")
MODELS.register("routing_encoder_voxels", _routing_factory({}, voxels_only=True),
                description="one query per voxel (no query set), linear-readout routing variant")
MODELS.register("routing_encoder_tiny", _routing_factory({"d_model": 32, "n_heads": 4, "d_ffn": 64}),
                description="tiny test variant")


def _brainit_encoder_factory(defaults: Mapping[str, Any]):
    def factory(config: Mapping[str, Any] | UniversalEncoderArchitecture | None = None, query_set=None, *,
                layer_shapes, voxel_counts, **overrides) -> UniversalEncoderModel:
        if query_set is not None:
            raise ConfigError("'query_set' must be None for the Brain-IT universal encoder (one embedding per voxel)")
        arch = _merged(UniversalEncoderArchitecture, defaults, config, overrides)
        return UniversalEncoderModel(arch, layer_shapes=layer_shapes, voxel_counts=voxel_counts)

    return factory


def _brainit_factory(defaults: Mapping[str, Any]):
    def factory(config: Mapping[str, Any] | BrainITArchitecture | None = None, query_set=None, *,
                voxel_counts, n_clusters: int, n_queries: int, out_dim: int, **overrides) -> BrainIT:
        if query_set is not None:
            raise ConfigError("'query_set' must be None for BrainIT (its output queries are learned)")
        arch = _merged(BrainITArchitecture, defaults, config, overrides)
        return BrainIT(arch, voxel_counts=voxel_counts, n_clusters=n_clusters, n_queries=n_queries, out_dim=out_dim)

    return factory


#: Brain-IT (reference_systems.md b.1, b.3): sizes are keywords (layer_shapes + voxel_counts; voxel_counts +
#: n_clusters + n_queries + out_dim); faithful defaults, tiny test variants
MODELS.register("brainit_encoder", _brainit_encoder_factory({}),
                description="Brain-IT universal encoder: per-voxel embeddings query each layer's tokens")
MODELS.register("brainit_encoder_tiny", _brainit_encoder_factory(TINY_UNIVERSAL_ENCODER),
                description="tiny test variant")
MODELS.register("brainit", _brainit_factory({}),
                description="Brain Interaction Transformer: cluster tokenizer + self/cross blocks, output queries")
MODELS.register("brainit_tiny", _brainit_factory(TINY_BRAINIT), description="tiny test variant")


def create_model(name: str, config: Mapping[str, Any] | None = None, query_set: QuerySet | None = None,
                 **kwargs):
    """Build the registered model ``name``.

    Parameters
    ----------
    name : str
    config : mapping or RoutingArchitecture, optional
        Hyper-parameters on top of the variant's defaults.
    query_set : QuerySet, optional
    **kwargs
        The data sizes (``feature_dim``, ``grid``, ``n_voxels``) and hyper-parameter overrides.
    """
    return MODELS.get(name)(config, query_set, **kwargs)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching ``pattern``."""
    return MODELS.list(pattern)
