"""Chunked backend: readout-first, V-chunked ``torch.autograd.Function`` with its own backward.

Design: routing_kernel.md §2-3. Per chunk of C voxels and for all heads at once::

    S = (s q_c) K^T          [H, C, B*P]   (bmm)
    A = softmax_p(S)         in place (whole P rows live in the chunk, so no online softmax)
    Z = w_c V^T              [H, C, B*P]   (bmm)
    y_h[c, b] = sum_p A * Z  (in place multiply, then a sum over P)

Only ``y_h`` [H, V, B] is saved (whole P rows live in a chunk, so the backward recomputes the
softmax directly and needs no lse). The backward recomputes A and Z per chunk and uses
``dZ = dy * A`` and ``dS = dZ * (Z - y_h)`` (both formed in place in the chunk buffer), then
four GEMMs: ``dq = s dS K``, ``dw = dZ V``, ``dK += dS^T (s q)``, ``dV += dZ^T w``.
S and Z are computed by one batched bmm over a stacked [2H] batch (see :class:`_ChunkedRouting`).

Working memory: one [2H, C, B, P] buffer (allocated once per call and reused by every chunk)
plus O(H*V*B) for y_h and, when k/v need gradients, [H, B*P, D] accumulators. Nothing of size
B*V*P or B*V*D is ever formed. All arithmetic is float32 (float64 for float64 inputs);
outputs and gradients are cast back to the input dtype.
"""
from __future__ import annotations

import torch

from brainenc.ops.routing.reference import compute_dtype

__all__ = ["routing_chunked", "choose_chunk_size", "chunked_memory", "CPU_CHUNK_ELEMENTS", "CUDA_CHUNK_ELEMENTS"]

#: Cache-friendly chunk target on CPU: a chunk buffer of H*C*B*P elements at most this size
#: (2**22 fp32 elements = 16 MiB per half of the stacked buffer; routing_kernel.md §7 measured 1024
#: voxels at B=16, P=256 as the best of 256/1024/4096, and fewer, larger chunks mean fewer thread
#: barriers, which matters on a shared machine).
CPU_CHUNK_ELEMENTS = 1 << 22
#: On CUDA bigger chunks mean fewer, larger kernel launches.
CUDA_CHUNK_ELEMENTS = 1 << 27
#: Smallest chunk the memory estimate assumes (a budget that cannot hold it rejects the backend).
_MIN_CHUNK = 16


def _fixed_bytes(info: dict) -> float:
    cbytes = 8 if info["dtype"] == torch.float64 else 4
    B, H, V, P, D = info["B"], info["H"], info["V"], info["P"], info["D"]
    fixed = H * V * B * cbytes * 2  # y_h (+ the summed output)
    fixed += 2 * B * H * P * D * cbytes  # K, V in compute dtype
    if info["needs_grad"]:
        # dK/dV fp32 accumulators (the gradients themselves, which every backend returns, are not counted)
        fixed += 2 * B * H * P * D * cbytes
    return fixed


def _per_voxel_bytes(info: dict) -> float:
    cbytes = 8 if info["dtype"] == torch.float64 else 4
    # the stacked [Z; S] chunk buffer, plus the dq/dw GEMM output of the chunk
    return (2 * info["H"] * info["B"] * info["P"] + 2 * info["H"] * info["D"]) * cbytes


def chunked_memory(info: dict) -> float:
    """Estimated working memory in bytes with the smallest chunk (what must fit the budget)."""
    return _fixed_bytes(info) + min(info["V"], _MIN_CHUNK) * _per_voxel_bytes(info)


def choose_chunk_size(info: dict) -> int:
    """Voxels per chunk: as large as the memory budget allows, capped at a cache-friendly size.

    Parameters
    ----------
    info : dict
        Input description with ``B, H, V, P, D, dtype, device, needs_grad, budget``.

    Returns
    -------
    int
        Chunk size C, ``1 <= C <= V``. The two chunk buffers take ``2*H*C*B*P*4`` bytes.
    """
    per_voxel = _per_voxel_bytes(info)
    by_budget = int((info["budget"] - _fixed_bytes(info)) // per_voxel)
    target = CUDA_CHUNK_ELEMENTS if info["device"].type == "cuda" else CPU_CHUNK_ELEMENTS
    by_cache = max(_MIN_CHUNK, target // (info["H"] * info["B"] * info["P"]))
    return int(max(1, min(info["V"], by_budget, by_cache)))


def _kv_matrix(x: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
    """[B, H, P, D] -> [H, B*P, D] in the compute dtype (a view when H == 1 and dtype matches)."""
    B, H, P, D = x.shape
    return x.transpose(0, 1).reshape(H, B * P, D).to(cdt)


def _chunk_operands(q, w, c0, c1, scale, cdt):
    """Stacked per-chunk left operands [(w, s*q)] -> [2H, n, D] (small copy)."""
    H = q.shape[0]
    n = c1 - c0
    out = torch.empty(2, H, n, q.shape[-1], dtype=cdt, device=q.device)
    out[0].copy_(w[:, c0:c1])
    out[1].copy_(q[:, c0:c1]).mul_(scale)  # scale after the cast: no bf16 rounding of s*q
    return out.view(2 * H, n, q.shape[-1])


class _ChunkedRouting(torch.autograd.Function):
    """y[b, v] = sum_h y_h[h, v, b]; see the module docstring for the algorithm.

    Both chunk GEMMs run as one batched ``bmm`` over a stacked [2H] batch: rows 0..H-1 hold
    Z = w V^T, rows H..2H-1 hold S = (s q) K^T (one buffer, one call, fewer thread barriers).
    In the backward the same buffer becomes [dS; dZ] in place, so the four gradient GEMMs are
    again two batched calls: [dS; dZ] @ [K; V] -> [dq/s; dw] and [dS; dZ]^T @ [s q; w] -> [dK; dV].
    """

    @staticmethod
    def forward(ctx, q, k, v, w, chunk_size):
        H, V, D = q.shape
        B, _, P, _ = k.shape
        cdt = compute_dtype(q.dtype)
        scale = D ** -0.5
        vk_t = torch.cat([_kv_matrix(v, cdt), _kv_matrix(k, cdt)]).transpose(1, 2)  # [2H, D, B*P]
        yh = torch.empty(H, V, B, dtype=cdt, device=q.device)
        C = min(int(chunk_size), V)
        buf = torch.empty(2 * H * C * B * P, dtype=cdt, device=q.device)
        for c0 in range(0, V, C):
            c1 = min(V, c0 + C)
            n = c1 - c0
            zs = buf[: 2 * H * n * B * P].view(2 * H, n, B * P)
            torch.bmm(_chunk_operands(q, w, c0, c1, scale, cdt), vk_t, out=zs)
            z4, a4 = zs[:H].view(H, n, B, P), zs[H:].view(H, n, B, P)
            torch.softmax(a4, dim=-1, out=a4)
            yh[:, c0:c1] = z4.mul_(a4).sum(dim=-1)
        ctx.save_for_backward(q, k, v, w, yh)
        ctx.chunk = C
        y = yh.sum(dim=0) if H > 1 else yh[0]
        return y.t().contiguous().to(q.dtype)  # [B, V]

    @staticmethod
    def backward(ctx, dy):
        q, k, v, w, yh = ctx.saved_tensors
        need_q, need_k, need_v, need_w = ctx.needs_input_grad[:4]
        H, V, D = q.shape
        B, _, P, _ = k.shape
        cdt = yh.dtype
        scale = D ** -0.5
        C = ctx.chunk
        kmat, vmat = _kv_matrix(k, cdt), _kv_matrix(v, cdt)
        vk_t = torch.cat([vmat, kmat]).transpose(1, 2)  # [2H, D, B*P]
        kv = torch.cat([kmat, vmat])  # [2H, B*P, D]
        dyt = dy.t().to(cdt).contiguous()  # [V, B]
        need_qw, need_kv = need_q or need_w, need_k or need_v
        dqw = torch.empty(2, H, V, D, dtype=cdt, device=q.device) if need_qw else None  # [dq; dw]
        dkv = torch.zeros(2 * H, B * P, D, dtype=cdt, device=q.device) if need_kv else None  # [dK; dV]
        buf = torch.empty(2 * H * C * B * P, dtype=cdt, device=q.device)
        for c0 in range(0, V, C):
            c1 = min(V, c0 + C)
            n = c1 - c0
            ops = _chunk_operands(q, w, c0, c1, scale, cdt)  # [w; s q]
            zs = buf[: 2 * H * n * B * P].view(2 * H, n, B * P)
            torch.bmm(ops, vk_t, out=zs)
            z4, a4 = zs[:H].view(H, n, B, P), zs[H:].view(H, n, B, P)
            torch.softmax(a4, dim=-1, out=a4)
            a4.mul_(dyt[c0:c1].view(1, n, B, 1))  # A -> dZ = dy * A
            z4.sub_(yh[:, c0:c1].unsqueeze(-1)).mul_(a4)  # Z -> dS = dZ * (Z - y_h)
            # zs now holds [dS; dZ]
            if need_qw:
                g = torch.bmm(zs, kv)  # [dS K; dZ V] = [dq / s; dw]
                torch.mul(g[:H], scale, out=dqw[0, :, c0:c1])
                dqw[1, :, c0:c1] = g[H:]
            if need_kv:
                # [dS^T (s q); dZ^T w]: the operand stack is [w; s q], so swap its halves
                dkv.baddbmm_(zs.transpose(1, 2), torch.cat([ops[H:], ops[:H]]))

        def _kv_grad(m, like):
            return m.view(H, B, P, D).transpose(0, 1).to(like.dtype).contiguous()

        return (
            dqw[0].to(q.dtype) if need_q else None,
            _kv_grad(dkv[:H], k) if need_k else None,
            _kv_grad(dkv[H:], v) if need_v else None,
            dqw[1].to(w.dtype) if need_w else None,
            None,
        )


def routing_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, *, chunk_size: int, **_) -> torch.Tensor:
    """Readout-first chunked routing attention (no bias), differentiable in q, k, v, w.

    Parameters
    ----------
    q, w : torch.Tensor, shape [H, V, D]
    k, v : torch.Tensor, shape [B, H, P, D]
    chunk_size : int
        Voxels per chunk (see :func:`choose_chunk_size`).

    Returns
    -------
    torch.Tensor, shape [B, V], input dtype.
    """
    return _ChunkedRouting.apply(q, k, v, w, chunk_size)
