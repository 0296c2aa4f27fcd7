"""Transformer brain encoder with attention routing (Adeli, Sun & Kriegeskorte 2025), re-implemented
from the equations in reference_systems.md (a.1); no code of the GPL-3 original is used.

Forward pass (grouped queries: ROIs × hemispheres + unknown, streams, hemispheres, custom clusters)::

    X  = (tokens - μ) / σ                        [B, N, C]   (optional: per-channel statistics of the
                                                             training tokens, buffers of the model)
    F  = input_proj(X)                           [B, N, D]   (identity when feature_dim == d_model)
    P  = s · positional code of the (h, w) grid  [N, D]      (keys only; s = positional_scale)
    t0 = 0,  query_pos = E (learned, N(0, 1))    [Q, D]
    per decoder layer (pre-norm):
        [t += Drop(SelfAttn(LN1(t) + E, LN1(t) + E, LN1(t)))]            optional
        t += Drop(MHA(q = LN2(t) + E, k = F + P, v = F))
        t += Drop(W2 Drop(ReLU(W1 LN3(t) + b1)) + b2)
    Z  = LN_dec(t)                               [B, Q, D]
    ŷ  = grouped per-voxel readout of Z          [B, V]      (models/readout.py)

Voxel queries (no query set: ``query_mode == "voxels"``), two variants:

- ``voxel_variant="routing"`` (default): the linear-readout routing form of routing_kernel.md §1,
  ``y[b,v] = Σ_h w_v^h · softmax_p(q_v^h · k_{b,p}^h / √d_h) v_{b,p}^h + c_v`` with k, v the decoder's
  key/value projections of F (+P on keys). There is **no LayerNorm / FFN between attention and readout**
  (W_o is folded into w). Computed by :func:`brainenc.ops.routing_attention` with
  ``backend=routing_backend`` (``auto``: triton on CUDA, sdpa when it fits the memory budget, else
  the chunked readout-first kernel, whose own backward recomputes per voxel chunk, so [B, V, D] and
  [B, V, P] are never held for the whole brain).
- ``voxel_variant="full"``: the same decoder as the grouped model with one query per voxel (no query
  self-attention), run over voxel chunks under activation checkpointing with the per-voxel einsum
  readout; exact but ~D/P times more work than routing.

The hyper-parameters are a :class:`RoutingArchitecture`; the sizes that come from the data
(``feature_dim``, ``grid``, ``n_voxels`` and the query set, whose absence means one query per voxel)
are constructor arguments of :class:`RoutingEncoderModel`.
"""
from __future__ import annotations

import math
import numbers
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
from brainenc.ops import routing_attention

__all__ = [
    "RoutingArchitecture",
    "CrossAttention",
    "DecoderLayer",
    "RoutingEncoderModel",
]


@dataclass
class RoutingArchitecture:
    """Hyper-parameters of :class:`RoutingEncoderModel` (defaults = reference_systems.md a.3).

    Sizes that come from the data (token width, patch grid, voxel count, query set) are not here:
    they are arguments of :class:`RoutingEncoderModel`.

    Parameters
    ----------
    d_model, n_heads, d_ffn, n_layers : int
        Model width, attention heads (``d_model % n_heads == 0``), FFN width, decoder layers.
    dropout : float
        Residual, FFN and attention dropout, in [0, 1).
    positional : {'sine', 'learned', 'none'}
        Code added to the keys (``sine`` needs ``d_model % 4 == 0``).
    positional_scale : float
        Multiplier of the positional code (> 0). The sine code has amplitude 1 per dimension, about
        the size of standardised projected tokens, and a model trained on a few thousand images
        then barely uses it (issue 17's ablation: scale 0.1, 1 and no code score alike on early
        visual voxels); a larger scale makes spatial attention easy to learn. 1 = the paper.
    query_self_attn : bool
        Self-attention among queries (removed in the paper's final model; grouped queries only).
    value_proj : bool
        Project values with W_v (False: values are the raw tokens split into heads).
    input_proj : bool or None
        Linear map feature_dim -> d_model; None = only when they differ.
    final_norm : bool
        LayerNorm on the decoder output.
    queries_per_group : int
        Learned queries per group (grouped queries only): each voxel reads the concatenation of
        its group's ``K`` output tokens with a ``K * d_model`` readout vector, so voxels of one ROI
        can mix ``K * n_heads`` attention maps (e.g. receptive fields of early visual voxels);
        1 = the paper's one query per ROI.
    voxel_variant : {'routing', 'full'}
        Voxel-query variant (see module docstring).
    voxel_chunk : int
        Voxels per chunk of the ``full`` voxel variant (the ``routing`` variant's working memory
        is bounded by :func:`brainenc.ops.routing_attention` itself).
    routing_backend : str
        ``backend`` of :func:`brainenc.ops.routing_attention` for the ``routing`` voxel variant:
        ``"auto"`` or a registered backend (``reference``, ``sdpa``, ``chunked``, ``triton``).
    """

    d_model: int = 768
    n_heads: int = 16
    d_ffn: int = 1024
    n_layers: int = 1
    dropout: float = 0.1
    positional: str = "sine"
    positional_scale: float = 1.0
    query_self_attn: bool = False
    value_proj: bool = True
    input_proj: Optional[bool] = None
    final_norm: bool = True
    queries_per_group: int = 1
    voxel_variant: str = "routing"
    voxel_chunk: int = 2048
    routing_backend: str = "auto"

    def check(self) -> None:
        """Validate (never modifies a value); raises a one-line ConfigError naming the field."""
        from brainenc.ops import list_backends

        for name in ("d_model", "n_heads", "d_ffn", "n_layers", "queries_per_group", "voxel_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"'{name}' must be an integer >= 1; {value!r} was provided")
        check_option("positional", self.positional, POSITIONAL_KINDS)
        check_option("voxel_variant", self.voxel_variant, ("routing", "full"))
        check_option("routing_backend", self.routing_backend, ["auto", *list_backends("routing_attention")])
        if self.d_model % self.n_heads:
            raise ConfigError(f"'d_model' ({self.d_model}) must be divisible by 'n_heads' ({self.n_heads})")
        if self.positional == "sine" and self.d_model % 4:
            raise ConfigError(f"'d_model' must be divisible by 4 for positional='sine'; {self.d_model} was provided")
        ps = self.positional_scale
        if isinstance(ps, bool) or not isinstance(ps, (int, float)) or not (0.0 < ps < float("inf")):
            raise ConfigError(f"'positional_scale' must be a finite number > 0; {ps!r} was provided")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"'dropout' must be in [0, 1); {self.dropout} was provided")

    def uses_input_proj(self, feature_dim: int) -> bool:
        """Whether tokens of width ``feature_dim`` go through a linear input projection."""
        return feature_dim != self.d_model if self.input_proj is None else bool(self.input_proj)


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
# the model
# --------------------------------------------------------------------------------------------
def _is_size(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


class RoutingEncoderModel(nn.Module):
    """Routing encoder (see module docstring).

    Parameters
    ----------
    arch : RoutingArchitecture, optional
        Hyper-parameters (default: the paper's).
    feature_dim : int
        Width of the cached backbone tokens.
    grid : (int, int)
        Patch grid (h, w); the model takes ``h * w`` tokens, row-major.
    n_voxels : int
    query_set : QuerySet, optional
        Grouped queries (ROIs, streams, hemispheres, custom clusters) with this membership; None =
        one query per voxel (``arch.voxel_variant`` chooses the form).
    token_norm : bool
        Standardise the tokens per channel with the buffers ``token_mean`` / ``token_scale``
        [feature_dim] (set them with :meth:`set_token_stats`; saved in the state dict).

    Attributes
    ----------
    arch : RoutingArchitecture
    feature_dim, n_voxels, n_tokens, n_queries : int
    grid : (int, int)
    query_mode : {'grouped', 'voxels'}
    query_names : list of str or None
        Names of the grouped queries (None for voxel queries).
    """

    def __init__(self, arch: RoutingArchitecture | None = None, *, feature_dim: int, grid: tuple[int, int],
                 n_voxels: int, query_set: QuerySet | None = None, token_norm: bool = False):
        super().__init__()
        arch = RoutingArchitecture() if arch is None else arch
        if not isinstance(arch, RoutingArchitecture):
            raise ConfigError(f"'arch' must be a RoutingArchitecture; {type(arch).__name__} was provided")
        arch.check()
        grid = tuple(grid)
        if len(grid) != 2 or not all(_is_size(g) for g in grid):
            raise ConfigError(f"'grid' must be (h, w) with positive integer sizes; {grid!r} was provided")
        for name, value in (("feature_dim", feature_dim), ("n_voxels", n_voxels)):
            if not _is_size(value):
                raise ConfigError(f"'{name}' must be an integer >= 1; {value!r} was provided")
        grid, feature_dim, n_voxels = (int(grid[0]), int(grid[1])), int(feature_dim), int(n_voxels)
        query_mode = "voxels" if query_set is None else "grouped"
        if query_mode == "voxels" and arch.query_self_attn:
            raise ConfigError("query_self_attn=True is not supported with one query per voxel (V×V attention)")
        if query_mode == "voxels" and arch.queries_per_group != 1:
            raise ConfigError(f"queries_per_group={arch.queries_per_group} needs grouped queries "
                              "(queries='voxels' has one query per voxel)")
        if not arch.value_proj and not arch.uses_input_proj(feature_dim) and feature_dim != arch.d_model:
            raise ConfigError(f"value_proj=False needs feature_dim == d_model or input_proj=True; "
                              f"feature_dim={feature_dim}, d_model={arch.d_model}")
        if query_set is not None and query_set.n_voxels != n_voxels:
            raise ConfigError(f"'query_set' has {query_set.n_voxels} voxels but 'n_voxels' is {n_voxels}")
        self.arch = arch
        self.feature_dim, self.grid, self.n_voxels, self.query_mode = feature_dim, grid, n_voxels, query_mode
        D = arch.d_model
        self.token_norm = bool(token_norm)
        if self.token_norm:
            self.register_buffer("token_mean", torch.zeros(feature_dim))
            self.register_buffer("token_scale", torch.ones(feature_dim))
        self.input_proj = nn.Linear(feature_dim, D) if arch.uses_input_proj(feature_dim) else nn.Identity()
        self.positional = make_positional(arch.positional, grid, D)
        self.n_tokens = grid[0] * grid[1]
        self.routing = query_mode == "voxels" and arch.voxel_variant == "routing"
        if query_set is not None:
            K = arch.queries_per_group
            self.query_names = ([f"{n}#{k}" for n in query_set.names for k in range(K)] if K > 1
                                else list(query_set.names))
            n_q = query_set.n_queries * K
        else:
            self.query_names = None
            n_q = n_voxels
        self.n_queries = n_q
        if self.routing:
            H, dh = arch.n_heads, D // arch.n_heads
            self.kv = CrossAttention(D, arch.n_heads, 0.0, arch.value_proj)  # k_proj / v_proj used
            del self.kv.q_proj, self.kv.out_proj
            self.voxel_query = nn.Parameter(torch.randn(H, n_q, dh))
            bound = 1.0 / math.sqrt(D)
            self.voxel_weight = nn.Parameter(torch.empty(H, n_q, dh).uniform_(-bound, bound))
            self.voxel_bias = nn.Parameter(torch.empty(n_q).uniform_(-bound, bound))
        else:
            self.query_embed = nn.Parameter(torch.randn(n_q, D))
            self.layers = nn.ModuleList(
                DecoderLayer(D, arch.n_heads, arch.d_ffn, arch.dropout, arch.query_self_attn, arch.value_proj)
                for _ in range(arch.n_layers))
            self.final_norm = nn.LayerNorm(D) if arch.final_norm else nn.Identity()
            if query_set is not None:
                self.readout = GroupedReadout(query_set, D * arch.queries_per_group)
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
    @torch.no_grad()
    def set_token_stats(self, mean, scale) -> None:
        """Set the per-channel token statistics (``token_norm=True`` only).

        Parameters
        ----------
        mean, scale : array-like [feature_dim]
            ``scale`` must be finite and > 0.
        """
        if not self.token_norm:
            raise ConfigError("set_token_stats needs a model built with token_norm=True")
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
        if mean.numel() != self.feature_dim or scale.numel() != self.feature_dim:
            raise ConfigError(f"token statistics must have {self.feature_dim} entries; got {mean.numel()}, {scale.numel()}")
        if not (torch.isfinite(mean).all() and torch.isfinite(scale).all() and (scale > 0).all()):
            raise ConfigError("token statistics must be finite with scale > 0")
        self.token_mean.copy_(mean)
        self.token_scale.copy_(scale)

    def memory(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Projected tokens F [B, N, D] and positional code P [N, D] (or None)."""
        if tokens.dim() != 3 or tokens.shape[1] != self.n_tokens or tokens.shape[2] != self.feature_dim:
            raise ConfigError(f"tokens must have shape [B, {self.n_tokens}, {self.feature_dim}]; "
                              f"got {tuple(tokens.shape)}")
        if self.token_norm:
            tokens = (tokens - self.token_mean.to(tokens.dtype)) / self.token_scale.to(tokens.dtype)
        pos = self.positional()
        if pos is not None and self.arch.positional_scale != 1.0:
            pos = pos * self.arch.positional_scale
        return self.input_proj(tokens), pos

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
        if self.query_mode != "grouped":
            raise ConfigError("forward_features is defined for grouped queries; voxel queries go through forward()")
        mem, pos = self.memory(tokens)
        kvs = [layer.cross_attn.project_kv(mem, pos) for layer in self.layers]
        return self._decode(self.query_embed, kvs, tokens.shape[0], need_weights)

    def forward_head(self, z: torch.Tensor) -> torch.Tensor:
        """Grouped readout: z [B, Q·K, D] -> y [B, V] (a group's K tokens are read as one [K·D] vector)."""
        K = self.arch.queries_per_group
        if K > 1:
            z = z.reshape(z.shape[0], z.shape[1] // K, K * z.shape[2])
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
        if self.query_mode == "grouped":
            z, _ = self.forward_features(tokens)
            return self.forward_head(z)
        mem, pos = self.memory(tokens)
        arch = self.arch
        if self.routing:
            k, v = self.kv.project_kv(mem, pos)
            return routing_attention(self.voxel_query, k, v, self.voxel_weight, self.voxel_bias,
                                     backend=arch.routing_backend)
        kv_flat = [t for layer in self.layers for t in layer.cross_attn.project_kv(mem, pos)]
        use_ckpt = torch.is_grad_enabled() and self.training and self.n_voxels > arch.voxel_chunk
        outs = []
        for s in range(0, self.n_voxels, arch.voxel_chunk):
            e = s + arch.voxel_chunk
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
        a = self.arch
        return (f"query_mode={self.query_mode}, n_queries={self.n_queries}, n_voxels={self.n_voxels}, "
                f"d_model={a.d_model}, heads={a.n_heads}, layers={a.n_layers}, "
                f"variant={a.voxel_variant if self.query_mode == 'voxels' else '-'}")
