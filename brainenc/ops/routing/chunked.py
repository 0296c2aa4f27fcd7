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
    """[B, H, P, D] -> [H, B*P, D] in the compute dtype, contiguous."""
    B, H, P, D = x.shape
    return x.transpose(0, 1).reshape(H, B * P, D).to(cdt).contiguous()


def _linear_fn(device: torch.device, cdt: torch.dtype):
    """``f(a [n, D], m [N, D]) -> a @ m^T [n, N]`` for the S / Z chunk GEMMs.

    On CPU in float32 this is oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, exact fp32,
    measured ~20 % faster than MKL's ``mm`` for these reduction-dim-D GEMMs); ``torch.mm`` elsewhere
    (float64, CUDA, builds without oneDNN).
    """
    if device.type == "cpu" and cdt == torch.float32 and _HAS_ONEDNN_LINEAR:
        lp = torch.ops.mkldnn._linear_pointwise
        return lambda a, m: lp(a, m, None, "none", [], "")
    return lambda a, m: torch.mm(a, m.t())


def _probe_onednn_linear() -> bool:
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        a, m = torch.randn(3, 5), torch.randn(4, 5)
        out = torch.ops.mkldnn._linear_pointwise(a, m, None, "none", [], "")
        return bool(out.shape == (3, 4) and torch.allclose(out, a @ m.t(), rtol=1e-5, atol=1e-5))
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return False


_HAS_ONEDNN_LINEAR = _probe_onednn_linear()


class _ChunkedRouting(torch.autograd.Function):
    """y[b, v] = sum_h y_h[h, v, b]; see the module docstring for the algorithm.

    Per chunk and head: S = (s q) K^T and Z = w V^T as two [n, B*P] GEMMs, softmax in place,
    y_h = rowwise <A, Z> (one batched dot). The backward turns the same two buffers into dZ and dS in
    place and runs four GEMMs with plain (non-transposed) output layouts: dq = dS (s K),
    dw = dZ V, and dK^T += (s q)^T dS, dV^T += w^T dZ into [H, D, B*P] accumulators (transposed
    once at the end: the transposed-output form is ~20 % faster than accumulating dS^T (s q)).
    """

    @staticmethod
    def forward(ctx, q, k, v, w, chunk_size):
        H, V, D = q.shape
        B, _, P, _ = k.shape
        cdt = compute_dtype(q.dtype)
        scale = D ** -0.5
        lin = _linear_fn(q.device, cdt)
        kmat, vmat = _kv_matrix(k, cdt), _kv_matrix(v, cdt)
        yh = torch.empty(H, V, B, dtype=cdt, device=q.device)
        C = min(int(chunk_size), V)
        for c0 in range(0, V, C):
            c1 = min(V, c0 + C)
            n = c1 - c0
            for h in range(H):
                qs = q[h, c0:c1].to(cdt).mul(scale)  # scale after the cast: no bf16 rounding of s*q
                s = lin(qs, kmat[h])  # [n, B*P]
                a3 = s.view(n * B, P)
                torch.softmax(a3, dim=-1, out=a3)
                z = lin(w[h, c0:c1].to(cdt), vmat[h])
                # y_h[c, b] = <A[c, b, :], Z[c, b, :]> as one batched dot (no [n, B, P] temporary)
                torch.bmm(z.view(n * B, 1, P), a3.view(n * B, P, 1), out=yh[h, c0:c1].view(n * B, 1, 1))
                del s, z, a3
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
        dev = q.device
        lin = _linear_fn(dev, cdt)
        kmat, vmat = _kv_matrix(k, cdt), _kv_matrix(v, cdt)
        ks = kmat * scale if need_q else None  # dq = dS (s K): no scaling pass over dq
        if need_q or need_k:
            # Z - y_h straight out of the GEMM: [w | y_h] @ [V | -E]^T with E[b*P + p, b] = 1 adds B
            # columns to the reduction and saves a full elementwise pass over the chunk buffer
            sel = torch.repeat_interleave(torch.eye(B, dtype=cdt, device=q.device), P, dim=0)  # [B*P, B]
            vaug = torch.cat([vmat, -sel.expand(H, B * P, B)], dim=-1)  # [H, B*P, D + B]
        dyt = dy.t().to(cdt).contiguous()  # [V, B]
        need_ds = need_q or need_k  # dS (hence the Z recompute) is needed only for dq / dK
        dq = torch.empty(H, V, D, dtype=cdt, device=dev) if need_q else None
        dw = torch.empty(H, V, D, dtype=cdt, device=dev) if need_w else None
        dkt = torch.zeros(H, D, B * P, dtype=cdt, device=dev) if need_k else None  # dK^T
        dvt = torch.zeros(H, D, B * P, dtype=cdt, device=dev) if need_v else None  # dV^T
        for c0 in range(0, V, C):
            c1 = min(V, c0 + C)
            n = c1 - c0
            dyc = dyt[c0:c1].view(n, B, 1)
            for h in range(H):
                qs = q[h, c0:c1].to(cdt).mul(scale)
                wc = w[h, c0:c1].to(cdt)
                a = lin(qs, kmat[h])  # S [n, B*P]
                a3 = a.view(n, B, P)
                torch.softmax(a3, dim=-1, out=a3)
                a3.mul_(dyc)  # A -> dZ = dy * A
                if need_ds:
                    z = lin(torch.cat([wc, yh[h, c0:c1]], dim=1), vaug[h])  # Z - y_h
                    z.view(n, B, P).mul_(a3)  # -> dS = dZ * (Z - y_h)
                    if need_q:
                        torch.mm(z, ks[h], out=dq[h, c0:c1])
                    if need_k:
                        dkt[h].addmm_(qs.t(), z)
                    del z
                if need_w:
                    torch.mm(a, vmat[h], out=dw[h, c0:c1])
                if need_v:
                    dvt[h].addmm_(wc.t(), a)
                del a, a3

        def _kv_grad(mt, like):  # [H, D, B*P] -> [B, H, P, D]
            return mt.view(H, D, B, P).permute(2, 0, 3, 1).to(like.dtype).contiguous()

        return (
            dq.to(q.dtype) if need_q else None,
            _kv_grad(dkt, k) if need_k else None,
            _kv_grad(dvt, v) if need_v else None,
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
