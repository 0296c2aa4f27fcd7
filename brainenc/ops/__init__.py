"""brainenc.ops: the only entry point to custom kernels.

``routing_attention`` (voxel-to-patch routing attention with a fused per-voxel readout) dispatches
over the backends registered in :data:`OPS` (``"routing_attention/<backend>"``, each with declared
:class:`Constraints`). Importing this package imports torch but never triton; the triton backend
imports it lazily when it runs. See docs/ops.md.
"""
from brainenc.ops._dispatch import OPS, Constraints, list_backends, register_backend, resolve_memory_budget
from brainenc.ops.routing import (
    AUTO_ORDER,
    routing_attention,
    routing_attention_multi,
    select_routing_backend,
)

__all__ = [
    "OPS",
    "Constraints",
    "AUTO_ORDER",
    "list_backends",
    "register_backend",
    "resolve_memory_budget",
    "routing_attention",
    "routing_attention_multi",
    "select_routing_backend",
]
