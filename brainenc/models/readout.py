"""Per-voxel linear readouts from query tokens that never build [B, V, Q] or [B, V, V].

Grouped readout (ROI / stream / hemisphere / custom queries), with sparse membership ``M [Q, V]``:

    ŷ[b, v] = Σ_r M[r, v] (z[b, r] · w_v) + s_v c_v  =  w_v · (Σ_r M[r, v] z[b, r]) + s_v c_v

computed query by query: for query r with voxels ``I_r``, ``z[:, r] @ W[I_r]ᵀ`` gives [B, |I_r|];
the pieces are weighted and scattered into ŷ with ``index_add``. Work and memory are
O(B · nnz · D) and O(nnz · D + B · nnz) — the dense original builds ``Z Wᵀ`` as [B, Q, V].

Per-voxel readout (one query token per voxel, voxel-query "full" variant):
``ŷ[b, v] = z[b, v] · w_v + c_v`` as an einsum (the original's [B, V, V] product + diagonal is
O(B V²); reference_systems.md a.1).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from brainenc.models.queries import QuerySet

__all__ = ["GroupedReadout", "per_voxel_readout", "dense_readout_reference"]


class GroupedReadout(nn.Module):
    """Linear readout of each voxel from the query tokens it belongs to.

    Parameters
    ----------
    query_set : QuerySet
        Membership (Q queries, V voxels, combine rule already applied as weights).
    d_model : int
        Token width D.

    Attributes
    ----------
    weight : Parameter [V, D]
        Per-voxel readout vectors ``w_v`` (init U(-1/√D, 1/√D), as nn.Linear).
    bias : Parameter [V]
        Per-voxel bias ``c_v``.
    """

    def __init__(self, query_set: QuerySet, d_model: int):
        super().__init__()
        self.n_voxels = int(query_set.n_voxels)
        self.n_queries = int(query_set.n_queries)
        bound = 1.0 / math.sqrt(d_model)
        self.weight = nn.Parameter(torch.empty(self.n_voxels, d_model).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(self.n_voxels).uniform_(-bound, bound))
        order = np.lexsort((query_set.voxel_index, query_set.query_index))
        qi = query_set.query_index[order]
        offsets = np.searchsorted(qi, np.arange(self.n_queries + 1))
        self.offsets = [int(o) for o in offsets]  # python ints: no device sync in the loop
        self.register_buffer("pair_voxel", torch.as_tensor(query_set.voxel_index[order], dtype=torch.long), persistent=False)
        self.register_buffer("pair_weight", torch.as_tensor(query_set.weight[order], dtype=torch.float32), persistent=False)
        self.register_buffer("bias_scale", torch.as_tensor(query_set.bias_scale, dtype=torch.float32), persistent=False)
        self._unit_weights = bool(np.all(query_set.weight == 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Read out voxels.

        Parameters
        ----------
        z : Tensor [B, Q, D]
            Query output tokens.

        Returns
        -------
        y : Tensor [B, V]
        """
        B = z.shape[0]
        # one gather for all pairs (query-sorted): its backward is a single index_add into [V, D]
        # (a gather per query would allocate and scatter a full [V, D] gradient Q times)
        # (a gather per query would allocate and scatter a full [V, D] gradient Q times). split/unbind
        # (not slicing) keep the backward to one concatenation instead of Q zero-filled copies.
        w_pairs = self.weight.index_select(0, self.pair_voxel).to(z.dtype)  # [nnz, D]
        sizes = [self.offsets[r + 1] - self.offsets[r] for r in range(self.n_queries)]
        pieces = [z_r @ w_r.T for z_r, w_r, n in zip(z.unbind(1), torch.split(w_pairs, sizes), sizes) if n]
        vals = torch.cat(pieces, dim=1)  # [B, nnz]
        if not self._unit_weights:
            vals = vals * self.pair_weight.to(vals.dtype)
        base = (self.bias * self.bias_scale).to(vals.dtype).unsqueeze(0).expand(B, -1)
        return base.index_add(1, self.pair_voxel, vals)


def per_voxel_readout(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y[b, v] = z[b, v] · w_v + c_v``.

    Parameters
    ----------
    z : Tensor [B, V, D]
    weight : Tensor [V, D]
    bias : Tensor [V], optional

    Returns
    -------
    y : Tensor [B, V]
    """
    y = torch.einsum("bvd,vd->bv", z, weight.to(z.dtype))
    return y if bias is None else y + bias.to(y.dtype)


def dense_readout_reference(z: torch.Tensor, membership: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            bias_scale: torch.Tensor) -> torch.Tensor:
    """Naive masked sum over a dense [B, V, Q] tensor (tests and toy sizes only).

    Parameters
    ----------
    z : Tensor [B, Q, D]
    membership : Tensor [Q, V]
        Weighted membership ``M``.
    weight : Tensor [V, D]
    bias, bias_scale : Tensor [V]

    Returns
    -------
    y : Tensor [B, V]
    """
    per_token = torch.einsum("bqd,vd->bvq", z, weight)  # [B, V, Q]: every voxel read from every token
    return (per_token * membership.T.unsqueeze(0)).sum(-1) + bias * bias_scale
