"""Triton backend: fused readout-first forward and deterministic two-kernel backward.

triton is imported lazily inside :class:`_TritonRouting` (through
:mod:`brainenc.ops.routing.triton_kernels`), never when this module is imported.

Forward saves only ``y_h`` and ``lse`` ([B, H, V], fp32; fp64 for fp64 inputs under the
interpreter). Backward runs kernel 1 (dq, dw over V-tiles) when q or w needs a gradient and
kernel 2 (dk, dv over P-tiles) only when k or v needs one (``ctx.needs_input_grad``): with frozen
image features the dk/dv pass is skipped entirely.
"""
from __future__ import annotations

import math
import os

import torch

__all__ = ["routing_triton", "triton_check", "triton_memory", "block_sizes"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_check(info: dict) -> str | None:
    """Extra constraint of the triton backend (device / interpreter, float64 only when interpreted)."""
    dev = info["device"].type
    if dev == "cpu" and not _interpreting():
        return "on CPU the triton backend runs only under TRITON_INTERPRET=1 (set before triton is imported)"
    if info["dtype"] == torch.float64 and not _interpreting():
        return "float64 is supported by the triton backend only under TRITON_INTERPRET=1"
    return None


def triton_memory(info: dict) -> float:
    """Working memory in bytes: y_h and lse [B, H, V] fp32 (plus fp32 dy) — O(B*H*V)."""
    return 3 * info["B"] * info["H"] * info["V"] * 4


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def block_sizes(V: int, P: int, D: int, device_type: str) -> dict:
    """Tile sizes. GPU values are starting points from routing_kernel.md §4 (untuned: no GPU run yet).

    Returns
    -------
    dict
        ``BLOCK_V, BLOCK_P, BLOCK_D`` (D-chunk of the score GEMMs) and ``BLOCK_DO`` (D-chunk of the
        dq/dw/dk/dv accumulators); every block is a power of two >= 16 (``tl.dot`` minimum).
    """
    if device_type == "cuda":
        bv = 64 if D > 128 else 128
        bp = 64
    else:  # interpreter: fewer, larger programs are faster (each program costs ~1 ms of Python)
        bv = min(128, max(16, _pow2(V)))
        bp = min(64, max(16, _pow2(P)))
    bd = min(64, max(16, _pow2(D)))
    bdo = min(128, max(16, _pow2(D)))
    return {"BLOCK_V": bv, "BLOCK_P": bp, "BLOCK_D": bd, "BLOCK_DO": bdo}


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


class _TritonRouting(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, w):
        from brainenc.ops.routing import triton_kernels as tk  # lazy: imports triton

        import triton.language as tl

        q, k, v, w = (t.contiguous() for t in (q, k, v, w))
        H, V, D = q.shape
        B, _, P, _ = k.shape
        acc_t = torch.float64 if q.dtype == torch.float64 else torch.float32
        acc = tl.float64 if acc_t == torch.float64 else tl.float32
        yh = torch.empty(B, H, V, dtype=acc_t, device=q.device)
        lse = torch.empty_like(yh)
        bs = block_sizes(V, P, D, q.device.type)
        sm_scale = D ** -0.5
        qk_scale = sm_scale * math.log2(math.e)
        prec = _precision(q.dtype)
        upcast = q.dtype == torch.bfloat16 and _interpreting()
        grid = ((V + bs["BLOCK_V"] - 1) // bs["BLOCK_V"], B, H)
        tk._route_fwd[grid](q, k, v, w, yh, lse, H, V, P, D, qk_scale, ACC=acc, BLOCK_V=bs["BLOCK_V"],
                            BLOCK_P=bs["BLOCK_P"], BLOCK_D=bs["BLOCK_D"], PRECISION=prec, UPCAST=upcast)
        ctx.save_for_backward(q, k, v, w, yh, lse)
        ctx.meta = (bs, sm_scale, qk_scale, prec, acc, upcast)
        y = yh.sum(dim=1) if H > 1 else yh[:, 0]
        return y.to(q.dtype)

    @staticmethod
    def backward(ctx, dy):
        from brainenc.ops.routing import triton_kernels as tk

        q, k, v, w, yh, lse = ctx.saved_tensors
        need_q, need_k, need_v, need_w = ctx.needs_input_grad[:4]
        bs, sm_scale, qk_scale, prec, acc, upcast = ctx.meta
        H, V, D = q.shape
        B, _, P, _ = k.shape
        dy = dy.to(yh.dtype).contiguous()
        n_do = (D + bs["BLOCK_DO"] - 1) // bs["BLOCK_DO"]
        blocks = dict(ACC=acc, BLOCK_V=bs["BLOCK_V"], BLOCK_P=bs["BLOCK_P"], BLOCK_D=bs["BLOCK_D"],
                      BLOCK_DO=bs["BLOCK_DO"], PRECISION=prec, UPCAST=upcast)
        dq = dw = dk = dv = None
        if need_q or need_w:
            dq, dw = torch.empty_like(q), torch.empty_like(w)
            grid = ((V + bs["BLOCK_V"] - 1) // bs["BLOCK_V"], H, n_do)
            tk._route_bwd_dq_dw[grid](q, k, v, w, yh, lse, dy, dq, dw, B, H, V, P, D, qk_scale, sm_scale, **blocks)
        if need_k or need_v:
            dk, dv = torch.empty_like(k), torch.empty_like(v)
            grid = ((P + bs["BLOCK_P"] - 1) // bs["BLOCK_P"], B * H, n_do)
            tk._route_bwd_dk_dv[grid](q, k, v, w, yh, lse, dy, dk, dv, H, V, P, D, qk_scale, sm_scale, **blocks)
        return (dq if need_q else None, dk if need_k else None, dv if need_v else None, dw if need_w else None)


def routing_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, **_) -> torch.Tensor:
    """Fused Triton routing attention (no bias), differentiable in q, k, v, w.

    Parameters
    ----------
    q, w : torch.Tensor, shape [H, V, D]
    k, v : torch.Tensor, shape [B, H, P, D]

    Returns
    -------
    torch.Tensor, shape [B, V], input dtype (fp32 accumulation and softmax inside).
    """
    return _TritonRouting.apply(q, k, v, w)
