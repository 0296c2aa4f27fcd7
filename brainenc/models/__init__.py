"""brainenc.models: nn.Modules only (no loops over data, no optimisers).

Registry: ``MODELS`` maps a name to a factory ``f(config: dict | None, query_set=None, **overrides) -> nn.Module``;
``create_model(name, **overrides)`` builds one. Tiny variants are registered like the real ones.
"""
from __future__ import annotations

from typing import Any, Mapping

from brainenc.config import from_dict, to_dict
from brainenc.models.positional import LearnedPositional2d, SinePositional2d, make_positional, sine_2d
from brainenc.models.queries import COMBINE_RULES, QUERY_KINDS, QuerySet, build_query_set
from brainenc.models.readout import GroupedReadout, dense_readout_reference, per_voxel_readout
from brainenc.models.routing_encoder import (
    CrossAttention,
    DecoderLayer,
    RoutingEncoderModel,
    RoutingModelConfig,
    routing_attention_einsum,
    voxel_routing,
)
from brainenc.registry import Registry

__all__ = [
    "MODELS",
    "create_model",
    "list_models",
    "RoutingModelConfig",
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
    "routing_attention_einsum",
    "voxel_routing",
]

MODELS = Registry("model")


def _routing_factory(defaults: Mapping[str, Any]):
    def factory(config: Mapping[str, Any] | RoutingModelConfig | None = None, query_set: QuerySet | None = None,
                **overrides) -> RoutingEncoderModel:
        base = dict(defaults)
        base.update(to_dict(config) if isinstance(config, RoutingModelConfig) else dict(config or {}))
        base.update(overrides)
        return RoutingEncoderModel(from_dict(RoutingModelConfig, base), query_set)

    return factory


#: faithful defaults (reference_systems.md a.3): d_model 768, 16 heads, FFN 1024, one layer, sine keys
MODELS.register("routing_encoder", _routing_factory({}), description="transformer brain encoder, grouped/voxel queries")
MODELS.register("routing_encoder_voxels", _routing_factory({"query_mode": "voxels"}),
                description="one query per voxel, linear-readout routing variant")
MODELS.register("routing_encoder_tiny", _routing_factory({"d_model": 32, "n_heads": 4, "d_ffn": 64}),
                description="tiny test variant")


def create_model(name: str, config: Mapping[str, Any] | None = None, query_set: QuerySet | None = None,
                 **overrides):
    """Build the registered model ``name`` with ``config`` values and keyword ``overrides``."""
    return MODELS.get(name)(config, query_set, **overrides)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching ``pattern``."""
    return MODELS.list(pattern)
