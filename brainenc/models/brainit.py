"""Brain-IT networks (Beliy, Zalcher et al., arXiv 2510.25976) and the Universal Brain Encoder they
build on (arXiv 2406.12179), re-implemented from the equations in reference_systems.md §(b.1, b.3).
The original repository has no licence: none of its code is used. nn.Modules only (no data loops).

Shapes: ``b`` batch, ``K`` voxels addressed by an example (sampled, possibly with repeats), ``S``
subjects, ``V_s`` voxels of subject ``s``, ``L`` feature layers, ``P_l`` tokens of layer ``l``,
``C`` clusters, ``M`` output queries, ``w`` BIT width.

Voxels are addressed by ``(subject index, local voxel id)``: every subject has its own block of
learned per-voxel vectors (:class:`VoxelEmbedding`), so a new subject is one more block.

Universal encoder (b.1), per example and voxel ``v`` with embedding ``e_v`` [embed_dim]::

    T_l   = Linear(LN(tokens_l))                          [b, P_l, token_dim]
    K_l   = project_x(T_l) + pos_l                        pos_l learned [P_l, token_dim]
    q_v^l = Linear_l(e_v)                                 [token_dim]
    a     = softmax_p(q_v^l · K_l[p] / sqrt(token_dim))   (float32)
    f_v^l = Σ_p a_p T_l[p];   h = Drop(LN(f));   f_v^l = h + MLP(h)
    g_v   = concat_l f_v^l                                [L * token_dim]
    W_v   = e_v @ feat_embed                              feat_embed [embed_dim, L * token_dim]
    ŷ_v   = <g_v, W_v> + c_v                              c_v learned per-voxel bias (per subject block)

computed over chunks of ``voxel_chunk`` voxels, so [b, K, P_l] is never held for all K voxels.

BIT (b.3)::

    x_v  = β_v e'_v                                        voxel tokens [b, K, w] (own VoxelEmbedding)
    h_c  = Σ_{v in c} α_v (Wv x_v + bv) + W_skip u_c,  α = softmax over the members of c of q_c·k_v/√w,
           q_c = Wq u_c + bq,  k_v = Wk x_v + bk  (computed with Wk, Wv moved onto the cluster side)
    b_c  = LN(ReLU(h_c))                                   brain tokens [b, C, w]  (BrainTokenizer)
    X    = X0 (learned [M, w], or rows query_index of it)
    X    = Cross_0(X, b);  for i in 1..n_self:  b = Self_i(b);  X = Cross_i(X, b)
    out  = Linear(LN(X))                                   [b, M, out_dim]

with ``Self`` a pre-norm ViT block (MHSA + MLP) and ``Cross`` ``X += W_o Attn(q = heads(X), k, v =
Linear(LN(b))); X += MLP(LN(X))``: the queries are split into heads without any projection or norm
(as the reference), each block has its own output projection ``W_o``, and the queries never attend
to each other, so any subset of them can be computed alone (``query_index``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as Fn
from torch import nn
from torch.utils.checkpoint import checkpoint

from brainenc.exceptions import ConfigError, DataFormatError

__all__ = [
    "UniversalEncoderArchitecture",
    "BrainITArchitecture",
    "VoxelEmbedding",
    "UniversalEncoderModel",
    "segment_softmax",
    "BrainTokenizer",
    "BrainIT",
    "TINY_UNIVERSAL_ENCODER",
    "TINY_BRAINIT",
]


def _check_int(obj, names, minimum: int) -> None:
    for name in names:
        v = getattr(obj, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ConfigError(f"'{name}' must be an integer >= {minimum}; {v!r} was provided")


def _check_fraction(obj, name: str) -> None:
    v = getattr(obj, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
        raise ConfigError(f"'{name}' must be a number in [0, 1); {v!r} was provided")


def _check_ratio(obj, name: str) -> None:
    v = getattr(obj, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v < float("inf"):
        raise ConfigError(f"'{name}' must be a finite number > 0; {v!r} was provided")


@dataclass
class UniversalEncoderArchitecture:
    """Hyper-parameters of :class:`UniversalEncoderModel` (sizes from the data are constructor arguments).

    Parameters
    ----------
    embed_dim : int
        Width ``e_v`` of the learned per-voxel vectors (reference: 256).
    token_dim : int
        Width of each layer's projected tokens (reference: 128).
    dropout : float
        Dropout after the per-layer LN (reference: 0.25).
    mlp_ratio : float
        Hidden width of the residual MLP = ``round(token_dim * mlp_ratio)``.
    voxel_chunk : int
        Voxels per attention chunk; [b, chunk, P_l] is the largest attention tensor.
    checkpoint : bool
        Recompute each chunk in the backward pass while training (activation memory for time).
    """

    embed_dim: int = 256
    token_dim: int = 128
    dropout: float = 0.25
    mlp_ratio: float = 1.0
    voxel_chunk: int = 2048
    checkpoint: bool = False

    def check(self) -> None:
        """Validate (never modifies a value); raises a one-line ConfigError naming the field."""
        _check_int(self, ("embed_dim", "token_dim", "voxel_chunk"), 1)
        _check_fraction(self, "dropout")
        _check_ratio(self, "mlp_ratio")
        if not isinstance(self.checkpoint, bool):
            raise ConfigError(f"'checkpoint' must be a bool; {self.checkpoint!r} was provided")

    @property
    def mlp_hidden(self) -> int:
        """Hidden width of the residual MLP."""
        return max(1, int(round(self.token_dim * self.mlp_ratio)))


@dataclass
class BrainITArchitecture:
    """Hyper-parameters of :class:`BrainIT` (reference b.3: width 512, 8 heads, 5 blocks).

    Parameters
    ----------
    width : int
        Token width ``w`` of voxel tokens, brain tokens and output queries.
    heads : int
        Attention heads of the self- and cross-attention blocks (``width % heads == 0``).
    n_self : int
        Pre-norm self-attention blocks over the brain tokens (``n_self + 1`` cross blocks); >= 0.
    mlp_ratio : float
        MLP hidden width = ``round(width * mlp_ratio)`` in every block.
    dropout : float
        Dropout on attention weights and residual branches.
    """

    width: int = 512
    heads: int = 8
    n_self: int = 5
    mlp_ratio: float = 4.0
    dropout: float = 0.0

    def check(self) -> None:
        """Validate (never modifies a value); raises a one-line ConfigError naming the field."""
        _check_int(self, ("width", "heads"), 1)
        _check_int(self, ("n_self",), 0)
        _check_ratio(self, "mlp_ratio")
        _check_fraction(self, "dropout")
        if self.width % self.heads:
            raise ConfigError(f"'width' ({self.width}) must be divisible by 'heads' ({self.heads})")

    @property
    def mlp_hidden(self) -> int:
        """Hidden width of every block's MLP."""
        return max(1, int(round(self.width * self.mlp_ratio)))


#: tiny test variants (registered as ``brainit_encoder_tiny`` / ``brainit_tiny``)
TINY_UNIVERSAL_ENCODER = {"embed_dim": 16, "token_dim": 8, "dropout": 0.0, "voxel_chunk": 64}
TINY_BRAINIT = {"width": 32, "heads": 4, "n_self": 2, "mlp_ratio": 2.0}


# --------------------------------------------------------------------------------------------
# per-subject voxel vectors
# --------------------------------------------------------------------------------------------
class VoxelEmbedding(nn.Module):
    """Learned per-voxel vectors, one Parameter block per subject (``blocks[s]``: [counts[s], dim]).

    A subject's voxel is addressed by (subject index, local voxel id). Parameters are named
    ``blocks.<s>``, so one subject's block can be trained alone (new-subject transfer).

    Parameters
    ----------
    counts : int sequence [S]
        Voxels of each subject (each >= 1).
    dim : int
    init_std : float
        Standard deviation of the normal initialisation (0: zeros, e.g. for a bias).
    """

    def __init__(self, counts: Sequence[int], dim: int, init_std: float = 0.02):
        super().__init__()
        counts = [int(c) for c in counts]
        if not counts or min(counts) < 1:
            raise ConfigError(f"'counts' must list >= 1 voxels per subject; {counts} was provided")
        if int(dim) < 1:
            raise ConfigError(f"'dim' must be >= 1; {dim!r} was provided")
        if not init_std >= 0.0:
            raise ConfigError(f"'init_std' must be >= 0; {init_std!r} was provided")
        self.dim, self.init_std = int(dim), float(init_std)
        self.blocks = nn.ParameterList([nn.Parameter(self._init(c)) for c in counts])

    def _init(self, n: int, like: Optional[torch.Tensor] = None) -> torch.Tensor:
        kw = {} if like is None else {"device": like.device, "dtype": like.dtype}
        return torch.randn(n, self.dim, **kw) * self.init_std

    @property
    def counts(self) -> list[int]:
        """Voxels per subject, ``[V_0, ..., V_{S-1}]``."""
        return [int(p.shape[0]) for p in self.blocks]

    def forward(self, subject: torch.Tensor, voxel: torch.Tensor) -> torch.Tensor:
        """Gather each example's voxel vectors from its subject's block.

        Parameters
        ----------
        subject : LongTensor [b]
            Subject index of each example (``0 <= subject < S``).
        voxel : LongTensor [b, K]
            Local voxel ids (``0 <= voxel[i] < counts[subject[i]]``; repeats allowed).

        Returns
        -------
        Tensor [b, K, dim] in the blocks' dtype.
        """
        if voxel.dim() != 2 or subject.shape != (voxel.shape[0],):
            raise DataFormatError(f"'subject' must be [b] and 'voxel' [b, K]; got {tuple(subject.shape)} and "
                                  f"{tuple(voxel.shape)}")
        present = torch.unique(subject).tolist()
        if present and (present[0] < 0 or present[-1] >= len(self.blocks)):
            raise DataFormatError(f"subject indices must be in 0..{len(self.blocks) - 1}; got {present}")
        if len(present) == 1:
            return Fn.embedding(voxel, self.blocks[present[0]])
        ref = self.blocks[0]
        out = torch.zeros(*voxel.shape, self.dim, device=ref.device, dtype=ref.dtype)
        for s in present:  # one gather per subject present; the blocks are never concatenated
            rows = (subject == s).nonzero().squeeze(1)
            out = out.index_copy(0, rows, Fn.embedding(voxel[rows], self.blocks[s]))
        return out

    def add_subject(self, n: int, init: Optional[torch.Tensor] = None) -> int:
        """Append a block of ``n`` voxels (random, or ``init`` [n, dim]); returns its subject index."""
        n = int(n)
        if n < 1:
            raise ConfigError(f"a new subject needs >= 1 voxels; {n} was provided")
        ref = self.blocks[0]
        if init is None:
            value = self._init(n, ref)
        else:
            init = torch.as_tensor(init)
            if tuple(init.shape) != (n, self.dim):
                raise DataFormatError(f"'init' must be [{n}, {self.dim}]; got {tuple(init.shape)}")
            value = init.detach().to(device=ref.device, dtype=ref.dtype).clone()
        self.blocks.append(nn.Parameter(value))
        return len(self.blocks) - 1

    def table(self, subject: int) -> torch.Tensor:
        """A detached copy of subject ``subject``'s block, [counts[subject], dim]."""
        return self.blocks[int(subject)].detach().clone()

    def extra_repr(self) -> str:
        return f"counts={self.counts}, dim={self.dim}"


# --------------------------------------------------------------------------------------------
# universal encoder (b.1)
# --------------------------------------------------------------------------------------------
class _LayerReader(nn.Module):
    """One feature layer of the universal encoder: token projection, keys, per-voxel attention read."""

    def __init__(self, n_tokens: int, dim: int, arch: UniversalEncoderArchitecture):
        super().__init__()
        td = arch.token_dim
        self.norm_in = nn.LayerNorm(dim)
        self.proj_in = nn.Linear(dim, td)
        self.project_x = nn.Linear(td, td)
        self.pos = nn.Parameter(torch.empty(n_tokens, td))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.query = nn.Linear(arch.embed_dim, td)
        self.norm_out = nn.LayerNorm(td)
        self.drop = nn.Dropout(arch.dropout)
        self.mlp = nn.Sequential(nn.Linear(td, arch.mlp_hidden), nn.GELU(), nn.Linear(arch.mlp_hidden, td))
        self.scale = 1.0 / math.sqrt(td)

    def memory(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [b, P, D] -> (values T [b, P, td], keys K [b, P, td])."""
        T = self.proj_in(self.norm_in(tokens))
        return T, self.project_x(T) + self.pos

    def read(self, e: torch.Tensor, T: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
        """e [b, k, embed_dim] -> f [b, k, td] (softmax in float32)."""
        q = self.query(e)
        a = torch.softmax(torch.matmul(q, K.transpose(1, 2)).float() * self.scale, dim=-1)
        f = torch.matmul(a.to(T.dtype), T)
        h = self.drop(self.norm_out(f))
        return h + self.mlp(h)


class UniversalEncoderModel(nn.Module):
    """Universal brain encoder (reference b.1): images' layer tokens -> responses of addressed voxels.

    See the module docstring for the equations. Besides the reference's readout ``<g_v, W_v>`` every
    voxel has a learned bias ``c_v`` (zero at initialisation), stored per subject like the embeddings
    (``voxel_bias.blocks.<s>`` [V_s, 1]) so that a new subject adds one block of each.

    Parameters
    ----------
    arch : UniversalEncoderArchitecture
    layer_shapes : sequence of (n_tokens P_l, dim D_l)
        One entry per feature layer, in the order of ``tokens`` in :meth:`forward`.
    voxel_counts : int sequence [S]
        Voxels per subject.

    Attributes
    ----------
    voxel_embed : VoxelEmbedding
        ``e_v`` (dim ``embed_dim``).
    voxel_bias : VoxelEmbedding
        ``c_v`` (dim 1).
    feat_embed : Parameter [embed_dim, L * token_dim]
    """

    #: one embedding block per subject: a batch (or a DDP shard) without subject s leaves its block
    #: without a gradient (read by :class:`~brainenc.training.Trainer` under DDP)
    ddp_find_unused_parameters = True

    def __init__(self, arch: UniversalEncoderArchitecture, *, layer_shapes: Sequence[tuple[int, int]],
                 voxel_counts: Sequence[int]):
        super().__init__()
        arch.check()
        shapes = [(int(p), int(d)) for p, d in layer_shapes]
        if not shapes or min(min(s) for s in shapes) < 1:
            raise ConfigError(f"'layer_shapes' must list (n_tokens, dim) >= 1 per layer; {shapes} was provided")
        self.arch, self.layer_shapes = arch, shapes
        self.voxel_embed = VoxelEmbedding(voxel_counts, arch.embed_dim)
        self.voxel_bias = VoxelEmbedding(voxel_counts, 1, init_std=0.0)
        self.layers = nn.ModuleList(_LayerReader(p, d, arch) for p, d in shapes)
        width = len(shapes) * arch.token_dim
        # e_v ~ 0.02 and g_v ~ 1: this std gives predictions of order 0.3 at initialisation
        self.feat_embed = nn.Parameter(torch.randn(arch.embed_dim, width) / math.sqrt(width))

    def _chunk(self, subject: torch.Tensor, voxel: torch.Tensor, *memory: torch.Tensor) -> torch.Tensor:
        e = self.voxel_embed(subject, voxel)
        g = torch.cat([layer.read(e, memory[2 * i], memory[2 * i + 1]) for i, layer in enumerate(self.layers)], -1)
        W = torch.matmul(e, self.feat_embed)
        return (g.float() * W.float()).sum(-1) + self.voxel_bias(subject, voxel)[..., 0].float()

    def forward(self, tokens: Sequence[torch.Tensor], subject: torch.Tensor, voxel: torch.Tensor) -> torch.Tensor:
        """Predicted responses of the addressed voxels.

        Parameters
        ----------
        tokens : sequence of Tensor [b, P_l, D_l]
            One entry per layer of ``layer_shapes``.
        subject : LongTensor [b]
        voxel : LongTensor [b, K]
            Local voxel ids of each example's subject.

        Returns
        -------
        Tensor float32 [b, K]
        """
        if len(tokens) != len(self.layers):
            raise DataFormatError(f"expected {len(self.layers)} token layers; got {len(tokens)}")
        for i, (t, (p, d)) in enumerate(zip(tokens, self.layer_shapes)):
            if t.dim() != 3 or tuple(t.shape[1:]) != (p, d) or t.shape[0] != voxel.shape[0]:
                raise DataFormatError(f"tokens[{i}] must be [{voxel.shape[0]}, {p}, {d}]; got {tuple(t.shape)}")
        memory = [x for layer, t in zip(self.layers, tokens) for x in layer.memory(t)]
        n = voxel.shape[1]
        if n == 0:
            return memory[0].new_zeros(voxel.shape[0], 0, dtype=torch.float32)
        use_ckpt = self.arch.checkpoint and self.training and torch.is_grad_enabled()
        step = self.arch.voxel_chunk
        outs = []
        for s in range(0, n, step):
            v = voxel[:, s:s + step]
            if use_ckpt:
                outs.append(checkpoint(self._chunk, subject, v, *memory, use_reentrant=False))
            else:
                outs.append(self._chunk(subject, v, *memory))
        return outs[0] if len(outs) == 1 else torch.cat(outs, 1)

    def add_subject(self, n: int, init: Optional[torch.Tensor] = None) -> int:
        """Append a subject of ``n`` voxels (embeddings random or ``init`` [n, embed_dim], bias 0)."""
        s = self.voxel_embed.add_subject(n, init)
        s_bias = self.voxel_bias.add_subject(n, torch.zeros(int(n), 1))
        assert s == s_bias
        return s


# --------------------------------------------------------------------------------------------
# brain tokenizer (b.3)
# --------------------------------------------------------------------------------------------
def segment_softmax(scores: torch.Tensor, segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Softmax over the entries of each (row, segment) pair.

    ``out[i, k] = exp(s[i, k]) / Σ_{j: segment[i, j] = segment[i, k]} exp(s[i, j])``, stabilised by
    the per-segment maximum (``scatter_reduce`` amax, not differentiated: the shift cancels), then
    ``exp`` and ``scatter_add`` sums. Memory O(b·K + b·n_segments); [b, n_segments, K] is never formed.

    Parameters
    ----------
    scores : Tensor [b, K]
    segment : LongTensor [b, K]
        Segment of each entry, in ``0 .. n_segments - 1``.
    n_segments : int

    Returns
    -------
    Tensor float32 [b, K]
        Each non-empty (row, segment) sums to 1.
    """
    if scores.shape != segment.shape or scores.dim() != 2:
        raise DataFormatError(f"'scores' and 'segment' must both be [b, K]; got {tuple(scores.shape)} and "
                              f"{tuple(segment.shape)}")
    s = scores.float()
    b = s.shape[0]
    with torch.no_grad():
        peak = s.new_full((b, int(n_segments)), -float("inf")).scatter_reduce(1, segment, s, "amax")
    ex = torch.exp(s - peak.gather(1, segment))
    den = s.new_zeros(b, int(n_segments)).scatter_add(1, segment, ex)
    return ex / den.gather(1, segment)


class BrainTokenizer(nn.Module):
    """Brain tokenizer (reference b.3): cluster ``c``'s learned query ``u_c`` attends over its member voxels.

    Single head like PyG ``TransformerConv`` with root weight (all linear maps with bias)::

        q_c = Wq u_c,  k_v = Wk x_v,  val_v = Wv x_v
        α   = segment_softmax(q_{c(v)} · k_v / √width, segment = c(v))
        h_c = Σ_{v in c} α_v val_v + W_skip u_c        (an empty cluster: h_c = W_skip u_c)
        b_c = LN(ReLU(h_c))

    Computed without applying ``Wk`` / ``Wv`` to the K voxel tokens (the same numbers, by linearity):
    ``q_c · k_v = (Wkᵀ q_c) · x_v + q_c · bk``, so the [C, w] rows ``Wkᵀ q_c`` are gathered per voxel
    ([b, K, w]); and ``Σ α_v val_v = Wv (Σ α_v x_v) + bv Σ α_v``, so the messages ``α_v x_v`` are summed
    per cluster (``index_add``) before the value map. Work and memory are linear in K with O(b·K·w)
    elementwise work (no K·w² matmul) and no [b, C, K] tensor; everything runs in float32
    (autocast off).

    Parameters
    ----------
    width : int
    n_clusters : int

    Attributes
    ----------
    cluster_embed : Parameter [n_clusters, width]
        ``u``.
    q, k, v, skip : nn.Linear
        ``Wq``, ``Wk``, ``Wv``, ``W_skip`` (width -> width, with bias).
    norm : nn.LayerNorm
    """

    def __init__(self, width: int, n_clusters: int):
        super().__init__()
        if int(width) < 1 or int(n_clusters) < 1:
            raise ConfigError(f"'width' and 'n_clusters' must be >= 1; {width!r}, {n_clusters!r} were provided")
        self.width, self.n_clusters = int(width), int(n_clusters)
        self.cluster_embed = nn.Parameter(torch.empty(self.n_clusters, self.width))
        nn.init.trunc_normal_(self.cluster_embed, std=0.02)
        self.q = nn.Linear(self.width, self.width)
        self.k = nn.Linear(self.width, self.width)
        self.v = nn.Linear(self.width, self.width)
        self.skip = nn.Linear(self.width, self.width)
        self.norm = nn.LayerNorm(self.width)

    def forward(self, x: torch.Tensor, cluster: torch.Tensor) -> torch.Tensor:
        """Brain tokens.

        Parameters
        ----------
        x : Tensor [b, K, width]
            Voxel tokens.
        cluster : LongTensor [b, K]
            Cluster of each voxel, in ``0 .. n_clusters - 1``.

        Returns
        -------
        Tensor float32 [b, n_clusters, width]
        """
        b, n, w = x.shape
        C = self.n_clusters
        if w != self.width or cluster.shape != (b, n):
            raise DataFormatError(f"'x' must be [b, K, {self.width}] and 'cluster' [b, K]; got {tuple(x.shape)} "
                                  f"and {tuple(cluster.shape)}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            u = self.cluster_embed.float()
            q = Fn.linear(u, self.q.weight.float(), self.q.bias.float())          # [C, w]
            qk = q @ self.k.weight.float()                                        # [C, w]  rows Wkᵀ q_c
            qb = q @ self.k.bias.float()                                          # [C]     q_c · bk
            xf = x.float()
            scores = ((Fn.embedding(cluster, qk) * xf).sum(-1) + qb[cluster]) / math.sqrt(w)
            alpha = segment_softmax(scores, cluster, C)                           # [b, K]
            flat = (cluster + C * torch.arange(b, device=cluster.device)[:, None]).reshape(-1)
            pooled = xf.new_zeros(b * C, w).index_add(0, flat, (alpha.unsqueeze(-1) * xf).reshape(b * n, w))
            mass = alpha.new_zeros(b * C).index_add(0, flat, alpha.reshape(-1))  # Σ_{v in c} α_v (1, or 0 if empty)
            h = (Fn.linear(pooled, self.v.weight.float()) + mass[:, None] * self.v.bias.float()).view(b, C, w)
            h = h + Fn.linear(u, self.skip.weight.float(), self.skip.bias.float())
            return Fn.layer_norm(torch.relu(h), (w,), self.norm.weight.float(), self.norm.bias.float(), self.norm.eps)


# --------------------------------------------------------------------------------------------
# BIT blocks
# --------------------------------------------------------------------------------------------
def _mlp(width: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width))


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    """[b, n, w] -> [b, h, n, w / h]."""
    b, n, w = x.shape
    return x.reshape(b, n, h, w // h).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """[b, h, n, d] -> [b, n, h * d]."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class _Block(nn.Module):
    """What both block kinds share: ``x += Drop(W_o Attn(q, k, v)); x += Drop(MLP(LN(x)))``.

    ``n_in`` projections of width ``w`` come from one ``Linear(w, n_in * w)`` applied to ``LN(input)``.
    """

    def __init__(self, arch: BrainITArchitecture, n_in: int):
        super().__init__()
        w = arch.width
        self.heads, self.p = arch.heads, arch.dropout
        self.norm_in, self.norm_mlp = nn.LayerNorm(w), nn.LayerNorm(w)
        self.inp = nn.Linear(w, n_in * w)
        self.proj = nn.Linear(w, w)
        self.drop = nn.Dropout(arch.dropout)
        self.mlp = _mlp(w, arch.mlp_hidden, arch.dropout)
        self.n_in = n_in

    def _projections(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.inp(self.norm_in(x)).chunk(self.n_in, dim=-1)

    def _update(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        a = Fn.scaled_dot_product_attention(_heads(q, self.heads), _heads(k, self.heads), _heads(v, self.heads),
                                            dropout_p=self.p if self.training else 0.0)
        x = x + self.drop(self.proj(_merge(a)))
        return x + self.drop(self.mlp(self.norm_mlp(x)))


class _SelfBlock(_Block):
    """Pre-norm ViT block over the brain tokens: ``q, k, v = Linear(LN(x))``."""

    def __init__(self, arch: BrainITArchitecture):
        super().__init__(arch, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._update(x, *self._projections(x))


class _CrossBlock(_Block):
    """Output queries over the brain tokens: ``q = X`` (no projection or norm), ``k, v = Linear(LN(tokens))``.

    Each query attends to the brain tokens only, never to the other queries.
    """

    def __init__(self, arch: BrainITArchitecture):
        super().__init__(arch, 2)

    def forward(self, X: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self._update(X, X, *self._projections(tokens))


class BrainIT(nn.Module):
    """Brain Interaction Transformer (reference b.3): sampled voxel values -> output tokens.

    See the module docstring. Linear weights are initialised ViT-style (truncated normal, std
    0.02, zero bias), as are the output queries ``X0`` and cluster embeddings.

    Parameters
    ----------
    arch : BrainITArchitecture
    voxel_counts : int sequence [S]
        Voxels per subject (the decoder's own voxel embeddings ``e'_v``, dim ``width``).
    n_clusters : int
        Functional clusters ``C`` (reference: 128).
    n_queries : int
        Output queries ``M`` (256 semantic, 7190 low-level).
    out_dim : int
        Width of each output token (1664 bigG, 512 VGG).

    Attributes
    ----------
    voxel_embed : VoxelEmbedding
    tokenizer : BrainTokenizer
    queries : Parameter [n_queries, width]
        ``X0``.
    self_layers, cross_layers : ModuleList
        ``n_self`` and ``n_self + 1`` blocks.
    """

    #: one embedding block per subject: a batch (or a DDP shard) without subject s leaves its block
    #: without a gradient (read by :class:`~brainenc.training.Trainer` under DDP)
    ddp_find_unused_parameters = True

    def __init__(self, arch: BrainITArchitecture, *, voxel_counts: Sequence[int], n_clusters: int, n_queries: int,
                 out_dim: int):
        super().__init__()
        arch.check()
        if int(n_queries) < 1 or int(out_dim) < 1:
            raise ConfigError(f"'n_queries' and 'out_dim' must be >= 1; {n_queries!r}, {out_dim!r} were provided")
        self.arch = arch
        self.n_clusters, self.n_queries, self.out_dim = int(n_clusters), int(n_queries), int(out_dim)
        w = arch.width
        self.voxel_embed = VoxelEmbedding(voxel_counts, w)
        self.tokenizer = BrainTokenizer(w, self.n_clusters)
        self.self_layers = nn.ModuleList(_SelfBlock(arch) for _ in range(arch.n_self))
        self.cross_layers = nn.ModuleList(_CrossBlock(arch) for _ in range(arch.n_self + 1))
        self.queries = nn.Parameter(torch.empty(self.n_queries, w))
        self.norm_out = nn.LayerNorm(w)
        self.head = nn.Linear(w, self.out_dim)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.queries, std=0.02)

    def brain_tokens(self, beta: torch.Tensor, subject: torch.Tensor, voxel: torch.Tensor,
                     cluster: torch.Tensor) -> torch.Tensor:
        """Tokenizer output ``b`` [b, C, width] (before the self-attention blocks).

        Parameters
        ----------
        beta : Tensor [b, K]
            Response of each addressed voxel.
        subject : LongTensor [b]
        voxel : LongTensor [b, K]
            Local voxel ids.
        cluster : LongTensor [b, K]
            Cluster of each addressed voxel.
        """
        if beta.shape != voxel.shape:
            raise DataFormatError(f"'beta' and 'voxel' must both be [b, K]; got {tuple(beta.shape)} and "
                                  f"{tuple(voxel.shape)}")
        e = self.voxel_embed(subject, voxel)
        return self.tokenizer(beta.unsqueeze(-1).to(e.dtype) * e, cluster)

    def _queries(self, b: int, query_index: Optional[torch.Tensor]) -> torch.Tensor:
        X0 = self.queries
        if query_index is None:
            return X0.unsqueeze(0).expand(b, -1, -1)
        if query_index.dim() == 1:
            return X0[query_index].unsqueeze(0).expand(b, -1, -1)
        if query_index.dim() == 2 and query_index.shape[0] == b:
            return X0[query_index]
        raise DataFormatError(f"'query_index' must be [m] or [{b}, m]; got {tuple(query_index.shape)}")

    def forward(self, beta: torch.Tensor, subject: torch.Tensor, voxel: torch.Tensor, cluster: torch.Tensor,
                query_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Predicted output tokens.

        Parameters
        ----------
        beta, subject, voxel, cluster
            As :meth:`brain_tokens`.
        query_index : LongTensor [m] or [b, m], optional
            Output queries to compute (the same for the batch, or per example); all when None.
            Queries are independent, so row ``j`` equals row ``query_index[j]`` of the full output.

        Returns
        -------
        Tensor float32 [b, m or n_queries, out_dim]
        """
        tokens = self.brain_tokens(beta, subject, voxel, cluster)
        X = self._queries(tokens.shape[0], query_index)
        X = self.cross_layers[0](X, tokens)
        for blk, cross in zip(self.self_layers, self.cross_layers[1:]):
            tokens = blk(tokens)
            X = cross(X, tokens)
        return self.head(self.norm_out(X)).float()

    def add_subject(self, n: int, init: Optional[torch.Tensor] = None) -> int:
        """Append a subject of ``n`` voxels (embeddings random or ``init`` [n, width]); returns its index."""
        return self.voxel_embed.add_subject(n, init)
