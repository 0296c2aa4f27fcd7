"""Reference backend: plain einsum -> softmax -> einsum -> readout (the ground truth).

It materialises the attention weights [B, H, V, P] and the attention output [B, H, V, D];
use it for tests and small problems only (``backend="auto"`` never picks it).
"""
from __future__ import annotations

import torch

__all__ = ["routing_reference", "compute_dtype"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for an input dtype: float64 stays float64, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def routing_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, **_) -> torch.Tensor:
    """Routing attention by the definition, summed over heads (no bias).

    Parameters
    ----------
    q, w : torch.Tensor, shape [H, V, D]
        Voxel queries and readout weights.
    k, v : torch.Tensor, shape [B, H, P, D]
        Patch keys and values.

    Returns
    -------
    torch.Tensor, shape [B, V]
        ``sum_h w_v^h . softmax_p(q_v^h . k_bp^h / sqrt(D)) v_bp^h`` in the input dtype
        (computed in float32, or float64 for float64 inputs).
    """
    cdt = compute_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5
    scores = torch.einsum("hvd,bhpd->bhvp", q.to(cdt), k.to(cdt)) * scale
    attn = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhvp,bhpd->bhvd", attn, v.to(cdt))
    y = torch.einsum("bhvd,hvd->bv", out, w.to(cdt))
    return y.to(q.dtype)
