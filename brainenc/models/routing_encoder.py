"""Transformer brain encoder with attention routing (Adeli, Sun & Kriegeskorte 2025), re-implemented
from the equations in reference_systems.md (a.1); no code of the GPL-3 original is used.

Forward pass (grouped queries: ROIs × hemispheres + unknown, streams, hemispheres, custom clusters)::

    F  = input_proj(tokens)                      [B, N, D]   (identity when feature_dim == d_model)
    P  = positional code of the (h, w) grid      [N, D]      (keys only)
    t0 = 0,  query_pos = E (learned, N(0, 1))    [Q, D]
    per decoder layer (pre-norm):
        [t += Drop(SelfAttn(LN1(t) + E, LN1(t) + E, LN1(t)))]            optional
        t += Drop(MHA(q = LN2(t) + E, k = F + P, v = F))
        t += Drop(W2 Drop(ReLU(W1 LN3(t) + b1)) + b2)
    Z  = LN_dec(t)                               [B, Q, D]
    ŷ  = grouped per-voxel readout of Z          [B, V]      (models/readout.py)

Voxel queries (``query_mode="voxels"``), two variants:

- ``voxel_variant="routing"`` (default): the linear-readout routing form of routing_kernel.md §1,
  ``y[b,v] = Σ_h w_v^h · softmax_p(q_v^h · k_{b,p}^h / √d_h) v_{b,p}^h + c_v`` with k, v the decoder's
  key/value projections of F (+P on keys). There is **no LayerNorm / FFN between attention and readout**
  (W_o is folded into w). Computed by ``brainenc.ops.routing_attention`` when that op is installed,
  otherwise by :func:`routing_attention_einsum` (readout-first, V-chunked, checkpointed), so [B, V, D]
  and [B, V, P] are never held for the whole brain.
- ``voxel_variant="full"``: the same decoder as the grouped model with one query per voxel (no query
  self-attention), run over voxel chunks under activation checkpointing with the per-voxel einsum
  readout; exact but ~D/P times more work than routing.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as Fn
from torch import nn
from torch.utils.checkpoint import checkpoint

from brainenc._utils.validation import check_option
from brainenc.exceptions import ConfigError
from brainenc.models.positional import POSITIONAL_KINDS, make_positional
from brainenc.models.queries import QuerySet
from brainenc.models.readout import GroupedReadout, per_voxel_readout

__all__ = [
    "RoutingModelConfig",
    "CrossAttention",
    "DecoderLayer",
    "RoutingEncoderModel",
    "routing_attention_einsum",
    "voxel_routing",
]


@dataclass
class RoutingModelConfig:
    """Architecture of :class:`RoutingEncoderModel` (defaults = reference_systems.md a.3).

    Parameters
    ----------
    feature_dim : int
        Width of the cached backbone tokens.
    grid : (int, int)
        Patch grid (h, w); ``h * w`` must equal the number of tokens.
    n_voxels : int
    query_mode : {'grouped', 'voxels'}
        Grouped queries (membership from a :class:`QuerySet`) or one query per voxel.
    d_model, n_heads, d_ffn, n_layers : int
    dropout : float
        Residual, FFN and attention dropout.
    positional : {'sine', 'learned', 'none'}
        Code added to the keys.
    query_self_attn : bool
        Self-attention among queries (removed in the paper's final model; grouped mode only).
    value_proj : bool
        Project values with W_v (False: values are the raw tokens split into heads).
    input_proj : bool or None
        Linear map feature_dim -> d_model; None = only when they differ.
    final_norm : bool
        LayerNorm on the decoder output.
    voxel_variant : {'routing', 'full'}
        Voxel-query variant (see module docstring).
    voxel_chunk : int
        Voxels per chunk in the voxel-query paths.
    routing_backend : str
        Passed to ``brainenc.ops.routing_attention``; ``"einsum"`` forces the built-in reference.
    """

    feature_dim: int = 768
    grid: tuple[int, ...] = (16, 16)  # (h, w); tuple[int, ...] because config._coerce swaps fixed-tuple items
    n_voxels: int = 1
    query_mode: str = "grouped"
    d_model: int = 768
    n_heads: int = 16
    d_ffn: int = 1024
    n_layers: int = 1
    dropout: float = 0.1
    positional: str = "sine"
    query_self_attn: bool = False
    value_proj: bool = True
    input_proj: Optional[bool] = None
    final_norm: bool = True
    voxel_variant: str = "routing"
    voxel_chunk: int = 2048
    routing_backend: str = "auto"

    def check(self) -> None:
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise ConfigError(f"'grid' must be (h, w) with positive sizes; {self.grid!r} was provided")
        check_option("query_mode", self.query_mode, ("grouped", "voxels"))
        check_option("positional", self.positional, POSITIONAL_KINDS)
        check_option("voxel_variant", self.voxel_variant, ("routing", "full"))
        if self.d_model % self.n_heads:
            raise ConfigError(f"'d_model' ({self.d_model}) must be divisible by 'n_heads' ({self.n_heads})")
        if self.positional == "sine" and self.d_model % 4:
            raise ConfigError(f"'d_model' must be divisible by 4 for positional='sine'; {self.d_model} was provided")
        if self.query_mode == "voxels" and self.query_self_attn:
            raise ConfigError("query_self_attn=True is not supported with one query per voxel (V×V attention)")
        if not self.value_proj and not self.uses_input_proj and self.feature_dim != self.d_model:
            raise ConfigError("value_proj=False needs feature_dim == d_model or input_proj=True")
        if self.n_layers < 1 or self.voxel_chunk < 1 or self.n_voxels < 1:
            raise ConfigError("'n_layers', 'voxel_chunk' and 'n_voxels' must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"'dropout' must be in [0, 1); {self.dropout} was provided")

    @property
    def uses_input_proj(self) -> bool:
        return self.feature_dim != self.d_model if self.input_proj is None else bool(self.input_proj)


# --------------------------------------------------------------------------------------------
# attention blocks
# --------------------------------------------------------------------------------------------
class CrossAttention(nn.Module):
    """Multi-head cross-attention with separately callable key/value projection.

    Weight layout matches ``nn.MultiheadAttention`` (q/k/v projections = rows of its
    ``in_proj_weight``, then ``out_proj``), so weights can be copied from it; the key bias is
    omitted because it cannot change the attention (outputs are identical with any key bias).

    Parameters
    ----------
    d_model, n_heads : int
    dropout : float
        Dropout on the attention weights.
    value_proj : bool
        Project values (False: values are the inputs split into heads).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, value_proj: bool = True):
        super().__init__()
        self.d_model, self.n_heads, self.d_head = d_model, n_heads, d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        # No key bias: q·b_k is the same for every key, so softmax cancels it (its true gradient is
        # exactly 0 and AdamW would turn float noise in that gradient into lr-sized steps).
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model) if value_proj else None
        self.out_proj = nn.Linear(d_model, d_model)
        self.attn_drop = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        return x.view(B, N, self.n_heads, self.d_head).transpose(1, 2)  # [B, H, N, dh]

    def project_kv(self, memory: torch.Tensor, pos: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys ``(F + P) W_k`` and values ``F W_v``, each [B, H, N, d_head]."""
        key_in = memory if pos is None else memory + pos.to(memory.dtype)
        k = self._heads(self.k_proj(key_in))
        v = self._heads(self.v_proj(memory) if self.v_proj is not None else memory)
        return k, v

    def attend(self, query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, need_weights: bool = False):
        """Attend with pre-projected keys/values.

        Parameters
        ----------
        query : Tensor [B, Q, D] (or [1, Q, D], broadcast over the batch)
        k, v : Tensor [B, H, N, d_head]
        need_weights : bool

        Returns
        -------
        out : Tensor [B, Q, D]
        attn : Tensor [B, H, Q, N] (post-softmax, before dropout) or None
        """
        B = k.shape[0]
        q = self._heads(self.q_proj(query))  # [b, H, Q, dh]
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.d_head)  # [B, H, Q, N]
        attn = scores.softmax(dim=-1)
        o = torch.matmul(self.attn_drop(attn), v)  # [B, H, Q, dh]
        o = o.transpose(1, 2).reshape(B, -1, self.d_model)
        return self.out_proj(o), (attn if need_weights else None)

    def forward(self, query, memory, pos=None, need_weights: bool = False):
        k, v = self.project_kv(memory, pos)
        return self.attend(query, k, v, need_weights)


class DecoderLayer(nn.Module):
    """Pre-norm DETR decoder layer (optional query self-attention, cross-attention, ReLU FFN).

    Parameters
    ----------
    d_model, n_heads, d_ffn : int
    dropout : float
    self_attn : bool
    value_proj : bool
    """

    def __init__(self, d_model: int, n_heads: int, d_ffn: int, dropout: float = 0.1, self_attn: bool = False,
                 value_proj: bool = True):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True) if self_attn else None
        self.norm1 = nn.LayerNorm(d_model) if self_attn else None
        self.cross_attn = CrossAttention(d_model, n_heads, dropout, value_proj)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.drop_sa = nn.Dropout(dropout)
        self.drop_ca = nn.Dropout(dropout)
        self.drop_ffn = nn.Dropout(dropout)
        self.drop_out = nn.Dropout(dropout)

    def forward_kv(self, tgt: torch.Tensor, query_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   need_weights: bool = False):
        """Layer forward with the cross-attention keys/values already projected.

        Parameters
        ----------
        tgt : Tensor [B, Q, D]
        query_pos : Tensor [Q, D]
        k, v : Tensor [B, H, N, d_head]

        Returns
        -------
        tgt : Tensor [B, Q, D]
        attn : Tensor [B, H, Q, N] or None
        """
        if self.self_attn is not None:
            t2 = self.norm1(tgt)
            qk = t2 + query_pos
            tgt = tgt + self.drop_sa(self.self_attn(qk, qk, t2, need_weights=False)[0])
        t2 = self.norm2(tgt)
        o, attn = self.cross_attn.attend(t2 + query_pos, k, v, need_weights)
        tgt = tgt + self.drop_ca(o)
        t2 = self.norm3(tgt)
        tgt = tgt + self.drop_out(self.linear2(self.drop_ffn(Fn.relu(self.linear1(t2)))))
        return tgt, attn

    def forward(self, tgt, memory, pos=None, query_pos=None, need_weights: bool = False):
        """Layer forward: tgt [B, Q, D], memory [B, N, D], pos [N, D] or None, query_pos [Q, D]."""
        k, v = self.cross_attn.project_kv(memory, pos)
        if query_pos is None:
            query_pos = torch.zeros_like(tgt[0])
        return self.forward_kv(tgt, query_pos, k, v, need_weights)


# --------------------------------------------------------------------------------------------
# voxel-query routing (linear-readout form)
# --------------------------------------------------------------------------------------------
def _routing_chunk(q, k, v, w):
    # readout-first: z[b,h,v,p] = w_v^h · v_{b,p}^h ; y_h = Σ_p softmax(q·k s)_p z_p
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = torch.einsum("hvd,bhpd->bhvp", q, k) * scale
    z = torch.einsum("hvd,bhpd->bhvp", w, v)
    return (s.softmax(-1) * z).sum(-1).sum(1)  # [B, C]


def routing_attention_einsum(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
                             c: torch.Tensor | None = None, *, chunk: int = 2048) -> torch.Tensor:
    """Reference voxel-query routing, V-chunked with activation checkpointing.

    ``y[b, v] = Σ_h w_v^h · Σ_p softmax_p(q_v^h · k_{b,p}^h / √D) v_{b,p}^h + c_v``

    Parameters
    ----------
    q, w : Tensor [H, V, D]
    k, v : Tensor [B, H, P, D]
    c : Tensor [V], optional
    chunk : int
        Voxels per chunk; live memory ≈ 2 · B · H · chunk · P floats.

    Returns
    -------
    y : Tensor [B, V]
    """
    H, V, D = q.shape
    outs = []
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, w))
    for s in range(0, V, chunk):
        qs, ws = q[:, s:s + chunk], w[:, s:s + chunk]
        if grad and V > chunk:
            outs.append(checkpoint(_routing_chunk, qs, k, v, ws, use_reentrant=False))
        else:
            outs.append(_routing_chunk(qs, k, v, ws))
    y = torch.cat(outs, dim=1)
    return y if c is None else y + c.to(y.dtype)


def voxel_routing(q, k, v, w, c=None, *, backend: str = "auto", chunk: int = 2048) -> torch.Tensor:
    """Dispatch voxel-query routing to ``brainenc.ops.routing_attention`` when available.

    ``backend="einsum"`` forces :func:`routing_attention_einsum`; any other value is passed to
    the op (``"auto"`` falls back to the einsum path when ``brainenc.ops`` has no op yet).
    Shapes as in :func:`routing_attention_einsum`.
    """
    if backend != "einsum":
        try:
            from brainenc.ops import routing_attention
        except ImportError:
            routing_attention = None
        if routing_attention is not None:
            return routing_attention(q, k, v, w, c, backend=backend)
        if backend != "auto":
            raise ConfigError(f"routing_backend={backend!r} needs brainenc.ops.routing_attention, which is not available")
    return routing_attention_einsum(q, k, v, w, c, chunk=chunk)


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
class RoutingEncoderModel(nn.Module):
    """Routing encoder (see module docstring).

    Parameters
    ----------
    config : RoutingModelConfig
    query_set : QuerySet or None
        Required for ``query_mode='grouped'``; ignored for voxel queries.
    """

    def __init__(self, config: RoutingModelConfig, query_set: QuerySet | None = None):
        super().__init__()
        config.check()
        self.config = config
        D = config.d_model
        self.input_proj = nn.Linear(config.feature_dim, D) if config.uses_input_proj else nn.Identity()
        self.positional = make_positional(config.positional, config.grid, D)
        self.n_tokens = config.grid[0] * config.grid[1]
        self.routing = config.query_mode == "voxels" and config.voxel_variant == "routing"
        if config.query_mode == "grouped":
            if query_set is None:
                raise ConfigError("query_mode='grouped' needs a QuerySet (see brainenc.models.build_query_set)")
            if query_set.n_voxels != config.n_voxels:
                raise ConfigError(f"query set has {query_set.n_voxels} voxels, config has {config.n_voxels}")
            self.query_names = list(query_set.names)
            n_q = query_set.n_queries
        else:
            self.query_names = None
            n_q = config.n_voxels
        self.n_queries = n_q
        if self.routing:
            H, dh = config.n_heads, D // config.n_heads
            self.kv = CrossAttention(D, config.n_heads, 0.0, config.value_proj)  # k_proj / v_proj used
            del self.kv.q_proj, self.kv.out_proj
            self.voxel_query = nn.Parameter(torch.randn(H, n_q, dh))
            bound = 1.0 / math.sqrt(D)
            self.voxel_weight = nn.Parameter(torch.empty(H, n_q, dh).uniform_(-bound, bound))
            self.voxel_bias = nn.Parameter(torch.empty(n_q).uniform_(-bound, bound))
        else:
            self.query_embed = nn.Parameter(torch.randn(n_q, D))
            self.layers = nn.ModuleList(
                DecoderLayer(D, config.n_heads, config.d_ffn, config.dropout, config.query_self_attn, config.value_proj)
                for _ in range(config.n_layers))
            self.final_norm = nn.LayerNorm(D) if config.final_norm else nn.Identity()
            if config.query_mode == "grouped":
                self.readout = GroupedReadout(query_set, D)
            else:
                bound = 1.0 / math.sqrt(D)
                self.voxel_weight = nn.Parameter(torch.empty(n_q, D).uniform_(-bound, bound))
                self.voxel_bias = nn.Parameter(torch.empty(n_q).uniform_(-bound, bound))
        self._reset_transformer()

    def _reset_transformer(self) -> None:
        # Xavier-uniform on the transformer's matrices (as DETR); readout/queries keep their own init.
        mods = [self.input_proj] + ([self.kv] if self.routing else list(self.layers))
        for m in mods:
            for name, p in m.named_parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)

    # ---- pieces -------------------------------------------------------------------------
    def memory(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Projected tokens F [B, N, D] and positional code P [N, D] (or None)."""
        if tokens.dim() != 3 or tokens.shape[1] != self.n_tokens or tokens.shape[2] != self.config.feature_dim:
            raise ConfigError(f"tokens must have shape [B, {self.n_tokens}, {self.config.feature_dim}]; "
                              f"got {tuple(tokens.shape)}")
        return self.input_proj(tokens), self.positional()

    def _decode(self, query_pos, kvs, B, need_weights=False):
        tgt = torch.zeros(B, query_pos.shape[0], query_pos.shape[1], dtype=kvs[0][0].dtype, device=query_pos.device)
        qp = query_pos.to(tgt.dtype)
        attns = []
        for layer, (k, v) in zip(self.layers, kvs):
            tgt, a = layer.forward_kv(tgt, qp, k, v, need_weights)
            attns.append(a)
        return self.final_norm(tgt), attns

    def forward_features(self, tokens: torch.Tensor, need_weights: bool = False):
        """Decoder output tokens for grouped queries.

        Parameters
        ----------
        tokens : Tensor [B, N, feature_dim]
        need_weights : bool

        Returns
        -------
        z : Tensor [B, Q, D]
        attns : list (one per layer) of Tensor [B, H, Q, N] or None
        """
        if self.config.query_mode != "grouped":
            raise ConfigError("forward_features is defined for grouped queries; voxel queries go through forward()")
        mem, pos = self.memory(tokens)
        kvs = [layer.cross_attn.project_kv(mem, pos) for layer in self.layers]
        return self._decode(self.query_embed, kvs, tokens.shape[0], need_weights)

    def forward_head(self, z: torch.Tensor) -> torch.Tensor:
        """Grouped readout: z [B, Q, D] -> y [B, V]."""
        return self.readout(z)

    def _full_voxel_chunk(self, qpos, w, c, *kv_flat):
        kvs = [(kv_flat[2 * i], kv_flat[2 * i + 1]) for i in range(len(kv_flat) // 2)]
        z, _ = self._decode(qpos, kvs, kv_flat[0].shape[0])
        return per_voxel_readout(z, w, c)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Predict voxel responses.

        Parameters
        ----------
        tokens : Tensor [B, N, feature_dim]
            Frozen backbone patch tokens (row-major over the (h, w) grid).

        Returns
        -------
        y : Tensor [B, V]
        """
        cfg = self.config
        if cfg.query_mode == "grouped":
            z, _ = self.forward_features(tokens)
            return self.forward_head(z)
        mem, pos = self.memory(tokens)
        if self.routing:
            k, v = self.kv.project_kv(mem, pos)
            return voxel_routing(self.voxel_query, k, v, self.voxel_weight, self.voxel_bias,
                                 backend=cfg.routing_backend, chunk=cfg.voxel_chunk)
        kv_flat = [t for layer in self.layers for t in layer.cross_attn.project_kv(mem, pos)]
        use_ckpt = torch.is_grad_enabled() and self.training and cfg.n_voxels > cfg.voxel_chunk
        outs = []
        for s in range(0, cfg.n_voxels, cfg.voxel_chunk):
            e = s + cfg.voxel_chunk
            args = (self.query_embed[s:e], self.voxel_weight[s:e], self.voxel_bias[s:e], *kv_flat)
            if use_ckpt:
                outs.append(checkpoint(self._full_voxel_chunk, *args, use_reentrant=False))
            else:
                outs.append(self._full_voxel_chunk(*args))
        return torch.cat(outs, dim=1)

    @torch.no_grad()
    def attention_maps(self, tokens: torch.Tensor, layer: int = -1, queries: torch.Tensor | None = None) -> torch.Tensor:
        """Post-softmax cross-attention weights of one decoder layer.

        Parameters
        ----------
        tokens : Tensor [B, N, feature_dim]
        layer : int
            Decoder layer (grouped / full voxel mode; the routing variant has one attention).
        queries : LongTensor [q], optional
            Subset of queries (voxels) to return; default all (avoid for whole-brain voxel queries).

        Returns
        -------
        attn : Tensor [B, H, q, N]
            Rows sum to 1 over the N patch tokens (row-major on the grid).
        """
        mem, pos = self.memory(tokens)
        if self.routing:
            k, _ = self.kv.project_kv(mem, pos)
            q = self.voxel_query if queries is None else self.voxel_query[:, queries]
            s = torch.einsum("hvd,bhpd->bhvp", q, k) / math.sqrt(q.shape[-1])
            return s.softmax(-1)
        kvs = [l.cross_attn.project_kv(mem, pos) for l in self.layers]
        qpos = self.query_embed if queries is None else self.query_embed[queries]
        _, attns = self._decode(qpos, kvs, tokens.shape[0], need_weights=True)
        return attns[layer]

    def extra_repr(self) -> str:
        c = self.config
        return (f"query_mode={c.query_mode}, n_queries={self.n_queries}, n_voxels={c.n_voxels}, d_model={c.d_model}, "
                f"heads={c.n_heads}, layers={c.n_layers}, variant={c.voxel_variant if c.query_mode == 'voxels' else '-'}")


def config_replace(config: RoutingModelConfig, **changes) -> RoutingModelConfig:
    """Copy of ``config`` with ``changes`` applied and checked."""
    new = dataclasses.replace(config, **changes)
    new.check()
    return new
