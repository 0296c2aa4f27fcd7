"""Triton kernels for readout-first routing attention (routing_kernel.md §4).

This module imports triton at module level; it is imported only by
:mod:`brainenc.ops.routing.triton_backend` when the triton backend actually runs, so
``import brainenc.ops`` never imports triton. Under ``TRITON_INTERPRET=1`` (set before triton is
first imported, see tests/conftest.py) the kernels run on CPU tensors through triton's interpreter.

Layouts (all contiguous): q, w [H, V, D]; k, v [B, H, P, D]; dy [B, V]; y_h, lse [B, H, V]
(lse in the log2 domain). Scores use ``qk_scale = log2(e)/sqrt(D)`` so the softmax is computed
with ``exp2``.

* ``_route_fwd``      grid (cdiv(V, BLOCK_V), B, H): online softmax over P-blocks carrying
  (m, l, acc) per voxel; S = q k^T and Z = w v^T accumulated over D-chunks; stores y_h and lse.
* ``_route_bwd_dq_dw`` grid (cdiv(V, BLOCK_V), H, cdiv(D, BLOCK_DO)): owns its voxels for every b,
  loops over b and P-blocks, recomputes S and Z, accumulates dq and dw for one D-output chunk.
* ``_route_bwd_dk_dv`` grid (cdiv(P, BLOCK_P), B*H, cdiv(D, BLOCK_DO)): owns its patches, loops over
  V-blocks, accumulates dk and dv. Neither backward kernel uses atomics: deterministic.

``UPCAST`` (constexpr) converts loaded tiles to the accumulator dtype before ``tl.dot``. It is set
only for bfloat16 under the interpreter, whose ``tl.dot`` multiplies bfloat16's uint16 storage as
integers (triton 3.8 ``interpreter.py`` ``create_dot``); on GPU bf16 tiles go to the tensor cores as-is.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["_route_fwd", "_route_bwd_dq_dw", "_route_bwd_dk_dv"]


@triton.jit
def _scores(q_base, w_base, k_base, v_base, offs_v, mask_v, offs_p, mask_p, D,
            ACC: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
            PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """S = q_tile k_tile^T and Z = w_tile v_tile^T, [BLOCK_V, BLOCK_P], accumulated over D-chunks."""
    s = tl.zeros([BLOCK_V, BLOCK_P], dtype=ACC)
    z = tl.zeros([BLOCK_V, BLOCK_P], dtype=ACC)
    offs_d0 = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + offs_d0
        mask_d = offs_d < D
        m_vd = mask_v[:, None] & mask_d[None, :]
        m_pd = mask_p[:, None] & mask_d[None, :]
        qt = tl.load(q_base + offs_v[:, None] * D + offs_d[None, :], mask=m_vd, other=0.0)
        wt = tl.load(w_base + offs_v[:, None] * D + offs_d[None, :], mask=m_vd, other=0.0)
        kt = tl.load(k_base + offs_p[:, None] * D + offs_d[None, :], mask=m_pd, other=0.0)
        vt = tl.load(v_base + offs_p[:, None] * D + offs_d[None, :], mask=m_pd, other=0.0)
        if UPCAST:
            qt, wt, kt, vt = qt.to(ACC), wt.to(ACC), kt.to(ACC), vt.to(ACC)
        s = tl.dot(qt, tl.trans(kt), s, input_precision=PRECISION, out_dtype=ACC)
        z = tl.dot(wt, tl.trans(vt), z, input_precision=PRECISION, out_dtype=ACC)
    return s, z


@triton.jit
def _route_fwd(Q, K, Vv, W, YH, LSE, H, V, P, D, qk_scale,
               ACC: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid_v = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V
    qw_off = h.to(tl.int64) * V * D
    kv_off = (b * H + h).to(tl.int64) * P * D
    m_i = tl.full([BLOCK_V], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_V], dtype=ACC)
    acc = tl.zeros([BLOCK_V], dtype=ACC)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < P
        s, z = _scores(Q + qw_off, W + qw_off, K + kv_off, Vv + kv_off, offs_v, mask_v, offs_p, mask_p, D,
                       ACC, BLOCK_V, BLOCK_P, BLOCK_D, PRECISION, UPCAST)
        s = tl.where(mask_p[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        pm = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pm, 1)
        acc = acc * alpha + tl.sum(pm * z, 1)
        m_i = m_new
    out_off = (b * H + h).to(tl.int64) * V + offs_v
    tl.store(YH + out_off, acc / l_i, mask=mask_v)
    tl.store(LSE + out_off, m_i + tl.math.log2(l_i), mask=mask_v)


@triton.jit
def _route_bwd_dq_dw(Q, K, Vv, W, YH, LSE, DY, DQ, DW, B, H, V, P, D, qk_scale, sm_scale,
                     ACC: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_DO: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid_v = tl.program_id(0)
    h = tl.program_id(1)
    pid_d = tl.program_id(2)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    mask_do = offs_do < D
    qw_off = h.to(tl.int64) * V * D
    dq = tl.zeros([BLOCK_V, BLOCK_DO], dtype=ACC)
    dw = tl.zeros([BLOCK_V, BLOCK_DO], dtype=ACC)
    for b in range(0, B):
        kv_off = (b * H + h).to(tl.int64) * P * D
        row_off = (b * H + h).to(tl.int64) * V + offs_v
        lse = tl.load(LSE + row_off, mask=mask_v, other=0.0)
        yh = tl.load(YH + row_off, mask=mask_v, other=0.0)
        dy = tl.load(DY + b * V + offs_v, mask=mask_v, other=0.0)
        for p0 in range(0, P, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            mask_p = offs_p < P
            s, z = _scores(Q + qw_off, W + qw_off, K + kv_off, Vv + kv_off, offs_v, mask_v, offs_p, mask_p, D,
                           ACC, BLOCK_V, BLOCK_P, BLOCK_D, PRECISION, UPCAST)
            a = tl.where(mask_p[None, :], tl.math.exp2(s * qk_scale - lse[:, None]), 0.0)
            dz = a * dy[:, None]
            ds = dz * (z - yh[:, None])
            m_pd = mask_p[:, None] & mask_do[None, :]
            kt = tl.load(K + kv_off + offs_p[:, None] * D + offs_do[None, :], mask=m_pd, other=0.0)
            vt = tl.load(Vv + kv_off + offs_p[:, None] * D + offs_do[None, :], mask=m_pd, other=0.0)
            if UPCAST:
                kt, vt = kt.to(ACC), vt.to(ACC)
            dq = tl.dot(ds.to(kt.dtype), kt, dq, input_precision=PRECISION, out_dtype=ACC)
            dw = tl.dot(dz.to(vt.dtype), vt, dw, input_precision=PRECISION, out_dtype=ACC)
    out = qw_off + offs_v[:, None] * D + offs_do[None, :]
    m_out = mask_v[:, None] & mask_do[None, :]
    tl.store(DQ + out, (dq * sm_scale).to(DQ.dtype.element_ty), mask=m_out)
    tl.store(DW + out, dw.to(DW.dtype.element_ty), mask=m_out)


@triton.jit
def _route_bwd_dk_dv(Q, K, Vv, W, YH, LSE, DY, DK, DV, H, V, P, D, qk_scale, sm_scale,
                     ACC: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_DO: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid_p = tl.program_id(0)
    bh = tl.program_id(1)
    pid_d = tl.program_id(2)
    b = bh // H
    h = bh % H
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    mask_do = offs_do < D
    qw_off = h.to(tl.int64) * V * D
    kv_off = bh.to(tl.int64) * P * D
    dk = tl.zeros([BLOCK_P, BLOCK_DO], dtype=ACC)
    dv = tl.zeros([BLOCK_P, BLOCK_DO], dtype=ACC)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        row_off = bh.to(tl.int64) * V + offs_v
        lse = tl.load(LSE + row_off, mask=mask_v, other=0.0)
        yh = tl.load(YH + row_off, mask=mask_v, other=0.0)
        dy = tl.load(DY + b * V + offs_v, mask=mask_v, other=0.0)
        s, z = _scores(Q + qw_off, W + qw_off, K + kv_off, Vv + kv_off, offs_v, mask_v, offs_p, mask_p, D,
                       ACC, BLOCK_V, BLOCK_P, BLOCK_D, PRECISION, UPCAST)
        keep = mask_v[:, None] & mask_p[None, :]
        a = tl.where(keep, tl.math.exp2(s * qk_scale - lse[:, None]), 0.0)
        dz = a * dy[:, None]
        ds = dz * (z - yh[:, None])
        m_vd = mask_v[:, None] & mask_do[None, :]
        qt = tl.load(Q + qw_off + offs_v[:, None] * D + offs_do[None, :], mask=m_vd, other=0.0)
        wt = tl.load(W + qw_off + offs_v[:, None] * D + offs_do[None, :], mask=m_vd, other=0.0)
        if UPCAST:
            qt, wt = qt.to(ACC), wt.to(ACC)
        dk = tl.dot(tl.trans(ds.to(qt.dtype)), qt, dk, input_precision=PRECISION, out_dtype=ACC)
        dv = tl.dot(tl.trans(dz.to(wt.dtype)), wt, dv, input_precision=PRECISION, out_dtype=ACC)
    out = kv_off + offs_p[:, None] * D + offs_do[None, :]
    m_out = mask_p[:, None] & mask_do[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=m_out)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=m_out)
