"""BrainMAE networks (Yang et al. 2024, arXiv 2406.17086), re-implemented from the description in
reference_systems.md §(d); the paper has no public code. nn.Modules only (no data loops).

Shapes: ``B`` batch, ``R`` ROIs, ``L`` time points per segment, ``d`` model width, ``S`` segments.

Transient-state encoder (one segment ``x`` [B, R, L])::

    E  = learned ROI embeddings [R, d]   (ablation: fixed 1-d sine code of the ROI index)
    A  = softmax_j( E Eᵀ / √d  with the diagonal set to -inf )   [R, R], the same for every sample
         (``self_loops=True`` keeps the diagonal)
    h  = x W_in + b_in + E               [B, R, d]   (masked ROIs: learned mask token, or x := 0)
    static-graph block (pre-norm):   h += Drop(W_o (A · (LN1(h) W_v)));  h += Drop(FFN(LN2(h)))
    self-attention block (pre-norm): h += Drop(MHSA(LN1(h)));            h += Drop(FFN(LN2(h)))
    z  = LN(h)                           [B, R, d]   segment embedding = mean_R z  [B, d]

Pretraining decoder: ``decoder_layers`` blocks of the encoder's first kind over ``z``, LN, Linear(d, L)
-> reconstruction [B, R, L]. Fine-tuning: segment embeddings [B, S, d] + sine code of the segment
index -> ``temporal_layers`` self-attention blocks (padding masked) -> masked mean over segments ->
LN, dropout, Linear(d, n_outputs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as Fn
from torch import nn

from brainenc._utils.validation import check_option
from brainenc.exceptions import ConfigError

__all__ = ["BrainMAEArchitecture", "ENCODER_KINDS", "ROI_EMBEDDINGS", "MASK_FILLS", "GRAPH_BACKENDS",
           "sine_1d", "static_graph", "StaticGraphBlock", "SelfAttentionBlock", "TransientStateEncoder",
           "SegmentDecoder", "BrainMAEPretrainModel", "BrainMAEFinetuneModel", "TINY_BRAINMAE"]

ENCODER_KINDS = ("static_graph", "self_attention", "adaptive")
ROI_EMBEDDINGS = ("learned", "positional")
MASK_FILLS = ("token", "zero")
GRAPH_BACKENDS = ("matmul", "sdpa")


@dataclass
class BrainMAEArchitecture:
    """Hyper-parameters of the BrainMAE networks (sizes from the data are constructor arguments).

    Parameters
    ----------
    d_model : int
        Width ``d`` of ROI embeddings and tokens (the paper's is not known; 256).
    n_layers : int
        Encoder blocks (SG-TSE: 3).
    encoder : {'static_graph', 'self_attention', 'adaptive'}
        ``static_graph``: every block is static-graph attention (SG-TSE, the default);
        ``self_attention``: every block is multi-head self-attention over ROI tokens (also the
        "no region-aware attention" ablation, vanilla-BrainMAE); ``adaptive``: one static-graph block then
        ``n_layers - 1`` self-attention blocks (our reading of AG-TSE; uncertain).
    n_heads : int
        Heads of the self-attention blocks (``d_model % n_heads == 0``).
    d_ffn : int
        FFN width of every block.
    dropout : float
        Residual/FFN/attention dropout in [0, 1).
    roi_embedding : {'learned', 'positional'}
        ``positional``: a fixed sine code of the ROI index replaces the learned embeddings in the
        tokens and in the graph (PosSG-BrainMAE ablation).
    self_loops : bool
        Keep the diagonal of the graph logits (SG-BrainMAE(SL) ablation); default False: the
        diagonal of ``A`` is exactly 0.
    mask_fill : {'token', 'zero'}
        Masked ROIs enter as a learned mask token (after the input projection) or as a zero signal.
    decoder_layers : int
        Decoder blocks (pretraining only; >= 0).
    temporal_layers, temporal_heads : int
        Self-attention blocks over segment embeddings in the fine-tuning model (0 = mean only).
    head_dropout : float
        Dropout before the fine-tuning head.
    graph_backend : {'matmul', 'sdpa'}
        How ``A · V`` is computed: the explicit softmax matrix (default) or
        ``scaled_dot_product_attention`` with ``E`` as queries and keys (same numbers up to rounding).
    """

    d_model: int = 256
    n_layers: int = 3
    encoder: str = "static_graph"
    n_heads: int = 4
    d_ffn: int = 1024
    dropout: float = 0.1
    roi_embedding: str = "learned"
    self_loops: bool = False
    mask_fill: str = "token"
    decoder_layers: int = 1
    temporal_layers: int = 1
    temporal_heads: int = 4
    head_dropout: float = 0.1
    graph_backend: str = "matmul"

    def check(self) -> None:
        """Validate (one-line ConfigError naming the field)."""
        for name in ("d_model", "n_layers", "n_heads", "d_ffn", "temporal_heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"'{name}' must be an integer >= 1; {v!r} was provided")
        for name in ("decoder_layers", "temporal_layers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"'{name}' must be an integer >= 0; {v!r} was provided")
        check_option("encoder", self.encoder, ENCODER_KINDS)
        check_option("roi_embedding", self.roi_embedding, ROI_EMBEDDINGS)
        check_option("mask_fill", self.mask_fill, MASK_FILLS)
        check_option("graph_backend", self.graph_backend, GRAPH_BACKENDS)
        if self.d_model % self.n_heads or self.d_model % self.temporal_heads:
            raise ConfigError(f"'d_model' ({self.d_model}) must be divisible by 'n_heads' ({self.n_heads}) "
                              f"and 'temporal_heads' ({self.temporal_heads})")
        if self.d_model % 2:
            raise ConfigError(f"'d_model' must be even (sine codes); {self.d_model} was provided")
        for name in ("dropout", "head_dropout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise ConfigError(f"'{name}' must be a number in [0, 1); {v!r} was provided")
        if not isinstance(self.self_loops, bool):
            raise ConfigError(f"'self_loops' must be true or false; {self.self_loops!r} was provided")

    def block_kinds(self) -> list[str]:
        if self.encoder == "adaptive":
            return ["static_graph"] + ["self_attention"] * (self.n_layers - 1)
        return [self.encoder] * self.n_layers


#: tiny test configuration
TINY_BRAINMAE = {"d_model": 16, "n_layers": 2, "n_heads": 2, "d_ffn": 32, "dropout": 0.0, "temporal_heads": 2,
                 "head_dropout": 0.0}


def sine_1d(n: int, d: int) -> torch.Tensor:
    """Sine/cosine code of positions 0..n-1, float32 [n, d] (d even; amplitude 1 per dimension)."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    freq = torch.exp(-math.log(1e4) * torch.arange(0, d, 2, dtype=torch.float64) / d)
    out = torch.zeros(n, d, dtype=torch.float64)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq)
    return out.float()


def static_graph(emb: torch.Tensor, self_loops: bool = False) -> torch.Tensor:
    """Static-graph attention ``A = softmax(E Eᵀ / √d)``, row-stochastic, float32 [R, R].

    Parameters
    ----------
    emb : Tensor [R, d]
        ROI embeddings.
    self_loops : bool
        False: the diagonal logits are -inf before the softmax, so ``diag(A) == 0`` exactly.
    """
    e = emb.float()
    logits = e @ e.T / math.sqrt(e.shape[-1])
    if not self_loops:
        eye = torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
        logits = logits.masked_fill(eye, float("-inf"))
    return torch.softmax(logits, dim=-1)


class _FFN(nn.Module):
    def __init__(self, d: int, d_ffn: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, d_ffn), nn.Linear(d_ffn, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.drop(self.fc2(self.drop(Fn.gelu(self.fc1(self.norm(h))))))


class StaticGraphBlock(nn.Module):
    """Pre-norm static-graph attention block: ``h += Drop(W_o (A · LN(h) W_v))``, then the FFN.

    ``forward(h [B, R, d], graph) -> [B, R, d]`` where ``graph`` is ``A`` [R, R] (``matmul``) or the
    ROI embeddings ``E`` [R, d] (``sdpa``).
    """

    def __init__(self, d: int, d_ffn: int, dropout: float, *, backend: str = "matmul", self_loops: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.value, self.out = nn.Linear(d, d), nn.Linear(d, d)
        self.drop = nn.Dropout(dropout)
        self.ffn = _FFN(d, d_ffn, dropout)
        self.backend, self.self_loops = backend, self_loops

    def forward(self, h: torch.Tensor, graph: torch.Tensor) -> torch.Tensor:
        v = self.value(self.norm(h))
        if self.backend == "sdpa":
            R = graph.shape[0]
            e = graph.to(v.dtype)[None, None].expand(v.shape[0], 1, R, graph.shape[1])
            allow = None if self.self_loops else ~torch.eye(R, dtype=torch.bool, device=v.device)
            mixed = Fn.scaled_dot_product_attention(e, e, v[:, None], attn_mask=allow)[:, 0]
        else:
            mixed = torch.matmul(graph.to(v.dtype), v)
        h = h + self.drop(self.out(mixed))
        return self.ffn(h)


class SelfAttentionBlock(nn.Module):
    """Pre-norm multi-head self-attention block (SDPA), then the FFN.

    ``forward(h [B, N, d], key_valid=None [B, N] bool) -> [B, N, d]``; invalid keys get no attention.
    """

    def __init__(self, d: int, n_heads: int, d_ffn: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.n_heads, self.p = n_heads, dropout
        self.drop = nn.Dropout(dropout)
        self.ffn = _FFN(d, d_ffn, dropout)

    def forward(self, h: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        B, N, d = h.shape
        q, k, v = self.qkv(self.norm(h)).view(B, N, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        mask = None if key_valid is None else key_valid[:, None, None, :]
        a = Fn.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.p if self.training else 0.0)
        h = h + self.drop(self.out(a.transpose(1, 2).reshape(B, N, d)))
        return self.ffn(h)


class TransientStateEncoder(nn.Module):
    """Segment encoder: ``forward(x [B, R, L], mask=None [B, R] bool) -> tokens [B, R, d]``.

    Parameters
    ----------
    arch : BrainMAEArchitecture
    n_rois, segment_length : int
    """

    def __init__(self, arch: BrainMAEArchitecture, *, n_rois: int, segment_length: int):
        super().__init__()
        arch.check()
        if n_rois < 2 and not arch.self_loops:
            raise ConfigError(f"static-graph attention without self-loops needs >= 2 ROIs; got {n_rois}")
        d = arch.d_model
        self.arch, self.n_rois, self.segment_length = arch, int(n_rois), int(segment_length)
        self.input_proj = nn.Linear(self.segment_length, d)
        if arch.roi_embedding == "learned":
            self.roi_embed = nn.Parameter(torch.randn(n_rois, d))
        else:
            self.register_buffer("roi_embed", sine_1d(n_rois, d), persistent=False)
        self.mask_token = nn.Parameter(torch.zeros(d)) if arch.mask_fill == "token" else None
        self.kinds = arch.block_kinds()
        self.blocks = nn.ModuleList([
            StaticGraphBlock(d, arch.d_ffn, arch.dropout, backend=arch.graph_backend, self_loops=arch.self_loops)
            if k == "static_graph" else SelfAttentionBlock(d, arch.n_heads, arch.d_ffn, arch.dropout)
            for k in self.kinds])
        self.norm = nn.LayerNorm(d)

    def graph(self) -> torch.Tensor:
        """The static graph ``A`` float32 [R, R] (rows sum to 1; zero diagonal without self-loops)."""
        with torch.autocast(device_type=self.roi_embed.device.type, enabled=False):
            return static_graph(self.roi_embed, self.arch.self_loops)

    def graph_operand(self) -> torch.Tensor:
        """What the static-graph blocks take: ``A`` (matmul backend) or ``E`` (sdpa backend)."""
        return self.roi_embed if self.arch.graph_backend == "sdpa" else self.graph()

    def run_blocks(self, h: torch.Tensor, blocks, kinds, graph) -> torch.Tensor:
        for kind, blk in zip(kinds, blocks):
            h = blk(h, graph) if kind == "static_graph" else blk(h)
        return h

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None and self.mask_token is None:
            x = x.masked_fill(mask[..., None], 0.0)
        h = self.input_proj(x)
        if mask is not None and self.mask_token is not None:
            h = torch.where(mask[..., None], self.mask_token.to(h.dtype), h)
        h = h + self.roi_embed.to(h.dtype)
        needs_graph = "static_graph" in self.kinds
        h = self.run_blocks(h, self.blocks, self.kinds, self.graph_operand() if needs_graph else None)
        return self.norm(h)


class SegmentDecoder(nn.Module):
    """Pretraining decoder: ``forward(tokens [B, R, d], graph) -> reconstruction [B, R, L]``.

    ``decoder_layers`` blocks of the encoder's first block kind, LayerNorm, Linear(d, L).
    """

    def __init__(self, arch: BrainMAEArchitecture, *, segment_length: int):
        super().__init__()
        d = arch.d_model
        self.kind = arch.block_kinds()[0]
        self.blocks = nn.ModuleList([
            StaticGraphBlock(d, arch.d_ffn, arch.dropout, backend=arch.graph_backend, self_loops=arch.self_loops)
            if self.kind == "static_graph" else SelfAttentionBlock(d, arch.n_heads, arch.d_ffn, arch.dropout)
            for _ in range(arch.decoder_layers)])
        self.norm = nn.LayerNorm(d)
        self.proj = nn.Linear(d, segment_length)

    def forward(self, z: torch.Tensor, graph: torch.Tensor | None) -> torch.Tensor:
        for blk in self.blocks:
            z = blk(z, graph) if self.kind == "static_graph" else blk(z)
        return self.proj(self.norm(z))


class BrainMAEPretrainModel(nn.Module):
    """Encoder + decoder for masked ROI reconstruction.

    ``forward(x [B, R, L], mask=None [B, R] bool) -> reconstruction [B, R, L]``;
    ``embed(x) -> segment embeddings [B, d]`` (mean over ROIs of the encoder tokens, no mask).
    """

    def __init__(self, arch: BrainMAEArchitecture, *, n_rois: int, segment_length: int):
        super().__init__()
        self.encoder = TransientStateEncoder(arch, n_rois=n_rois, segment_length=segment_length)
        self.decoder = SegmentDecoder(arch, segment_length=segment_length)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        z = self.encoder(x, mask)
        graph = self.encoder.graph_operand() if self.decoder.kind == "static_graph" and len(self.decoder.blocks) else None
        return self.decoder(z, graph)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x).mean(1)


class BrainMAEFinetuneModel(nn.Module):
    """Encoder + temporal transformer + linear head.

    ``forward(x [B, S, R, L], valid=None [B, S] bool) -> [B, n_outputs]`` (padded segments, marked
    False in ``valid``, are skipped by the encoder, get no attention and are left out of the mean).
    """

    def __init__(self, arch: BrainMAEArchitecture, *, n_rois: int, segment_length: int, n_outputs: int):
        super().__init__()
        self.encoder = TransientStateEncoder(arch, n_rois=n_rois, segment_length=segment_length)
        d = arch.d_model
        self.temporal = nn.ModuleList([SelfAttentionBlock(d, arch.temporal_heads, arch.d_ffn, arch.dropout)
                                       for _ in range(arch.temporal_layers)])
        self.head_norm = nn.LayerNorm(d)
        self.head_drop = nn.Dropout(arch.head_dropout)
        self.head = nn.Linear(d, n_outputs)

    def segment_embeddings(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[B, S, d]: mean-over-ROI encoder tokens of the valid segments, zeros elsewhere."""
        B, S = x.shape[:2]
        flat = self.encoder(x[valid]).mean(1)
        out = flat.new_zeros(B, S, flat.shape[-1])
        out[valid] = flat
        return out

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        B, S = x.shape[:2]
        if valid is None:
            valid = torch.ones(B, S, dtype=torch.bool, device=x.device)
        valid = valid.bool()
        h = self.segment_embeddings(x, valid)
        if len(self.temporal):
            h = h + sine_1d(S, h.shape[-1]).to(h.device, h.dtype)
            for blk in self.temporal:
                h = blk(h, valid)
        w = valid.to(h.dtype)[..., None]
        pooled = (h * w).sum(1) / w.sum(1).clamp_min(1.0)
        return self.head(self.head_drop(self.head_norm(pooled)))
