"""Chunked backend: readout-first, V-chunked ``torch.autograd.Function`` with its own backward.

Design: routing_kernel.md §2-3. Per chunk of C voxels and for all heads at once::

    S = (s q_c) K^T          [H, C, B*P]   (bmm)
    A = softmax_p(S)         in place (whole P rows live in the chunk, so no online softmax)
    Z = w_c V^T              [H, C, B*P]   (bmm)
    y_h[c, b] = sum_p A * Z  (in place multiply, then a sum over P)

Only ``y_h`` [H, V, B] is saved. The backward recomputes A and Z per chunk and uses
``dZ = dy * A`` and ``dS = dZ * (Z - y_h)`` (both formed in place in the two chunk buffers), then
four GEMMs: ``dq = s dS K``, ``dw = dZ V``, ``dK += dS^T (s q)``, ``dV += dZ^T w``.

Working memory: two [H, C, B, P] buffers (allocated once per call and reused by every chunk)
plus O(H*V*B) for y_h and, when k/v need gradients, [H, B*P, D] accumulators. Nothing of size
B*V*P or B*V*D is ever formed. All arithmetic is float32 (float64 for float64 inputs);
outputs and gradients are cast back to the input dtype.
"""
from __future__ import annotations

import torch

from brainenc.ops.routing.reference import compute_dtype

__all__ = ["routing_chunked", "choose_chunk_size", "chunked_memory", "CPU_CHUNK_ELEMENTS", "CUDA_CHUNK_ELEMENTS"]

#: Cache-friendly chunk target on CPU: a chunk buffer of H*C*B*P elements at most this size
#: (2**21 fp32 elements = 8 MiB; tuned with kernels/bench/bench_routing.py on a 2-core EPYC).
CPU_CHUNK_ELEMENTS = 1 << 21
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
        fixed += 2 * B * H * P * D * cbytes + 2 * H * V * D * cbytes  # dK/dV accumulators, dq/dw
    return fixed


def _per_voxel_bytes(info: dict) -> float:
    cbytes = 8 if info["dtype"] == torch.float64 else 4
    return 2 * info["H"] * info["B"] * info["P"] * cbytes


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


class _ChunkedRouting(torch.autograd.Function):
    """y[b, v] = sum_h y_h[h, v, b]; see the module docstring for the algorithm."""

    @staticmethod
    def forward(ctx, q, k, v, w, chunk_size):
        H, V, D = q.shape
        B, _, P, _ = k.shape
        cdt = compute_dtype(q.dtype)
        scale = D ** -0.5
        kmat, vmat = _kv_matrix(k, cdt), _kv_matrix(v, cdt)
        yh = torch.empty(H, V, B, dtype=cdt, device=q.device)
        C = min(int(chunk_size), V)
        buf_s = torch.empty(H * C * B * P, dtype=cdt, device=q.device)
        buf_z = torch.empty_like(buf_s)
        kt, vt = kmat.transpose(1, 2), vmat.transpose(1, 2)  # [H, D, B*P] views
        for c0 in range(0, V, C):
            c1 = min(V, c0 + C)
            n = c1 - c0
            qc = q[:, c0:c1].to(cdt) * scale  # [H, n, D]
            wc = w[:, c0:c1].to(cdt)
            s = buf_s[: H * n * B * P].view(H, n, B * P)
            z = buf_z[: H * n * B * P].view(H, n, B * P)
            torch.bmm(qc, kt, out=s)
            torch.bmm(wc, vt, out=z)
            a4 = s.view(H, n, B, P)
            torch.softmax(a4, dim=-1, out=a4)
            yh[:, c0:c1] = z.view(H, n, B, P).mul_(a4).sum(dim=-1)
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
        kt, vt = kmat.transpose(1, 2), vmat.transpose(1, 2)
        dyt = dy.t().to(cdt).contiguous()  # [V, B]
        dq = torch.empty(H, V, D, dtype=cdt, device=q.device) if need_q else None
        dw = torch.empty(H, V, D, dtype=cdt, device=q.device) if need_w else None
        dkm = torch.zeros(H, B * P, D, dtype=cdt, device=q.device) if need_k else None
        dvm = torch.zeros(H, B * P, D, dtype=cdt, device=q.device) if need_v else None
        need_ds = need_q or need_k
        buf_s = torch.empty(H * C * B * P, dtype=cdt, device=q.device)
        buf_z = torch.empty_like(buf_s)
        for c0 in range(0, V, C):
            c1 = min(V, c0 + C)
            n = c1 - c0
            qc = q[:, c0:c1].to(cdt) * scale
            wc = w[:, c0:c1].to(cdt)
            s = buf_s[: H * n * B * P].view(H, n, B * P)
            torch.bmm(qc, kt, out=s)
            a4 = s.view(H, n, B, P)
            torch.softmax(a4, dim=-1, out=a4)
            dz4 = a4.mul_(dyt[c0:c1].view(1, n, B, 1))  # dZ = dy * A, in place of A
            dz = s
            if need_ds:
                z = buf_z[: H * n * B * P].view(H, n, B * P)
                torch.bmm(wc, vt, out=z)
                # dS = dZ * (Z - y_h), in place of Z
                z.view(H, n, B, P).sub_(yh[:, c0:c1].unsqueeze(-1)).mul_(dz4)
                ds = z
                if need_q:
                    dq[:, c0:c1] = torch.bmm(ds, kmat).mul_(scale)
                if need_k:
                    dkm.baddbmm_(ds.transpose(1, 2), qc)  # qc already carries the scale
            if need_w:
                dw[:, c0:c1] = torch.bmm(dz, vmat)
            if need_v:
                dvm.baddbmm_(dz.transpose(1, 2), wc)

        def _kv_grad(m, like):
            return m.view(H, B, P, D).transpose(0, 1).to(like.dtype).contiguous()

        return (
            dq.to(q.dtype) if need_q else None,
            _kv_grad(dkm, k) if need_k else None,
            _kv_grad(dvm, v) if need_v else None,
            dw.to(w.dtype) if need_w else None,
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
