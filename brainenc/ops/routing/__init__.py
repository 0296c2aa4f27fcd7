"""Voxel-to-patch routing attention with a fused per-voxel readout.

Per head h (heads summed), batch item b, voxel v::

    y[b, v] = sum_h  w_v^h . sum_p softmax_p(q_v^h . k_bp^h / sqrt(D)) v_bp^h  +  c_v

Backends (``brainenc.ops.OPS`` entries ``routing_attention/<name>``):

========== ============================================================ ==========================
backend    what                                                         constraints
========== ============================================================ ==========================
reference  einsum -> softmax -> einsum -> readout (ground truth)        memory ~ B*H*V*(2P+D); never auto
sdpa       ``F.scaled_dot_product_attention`` + einsum readout          memory ~ 4*B*H*V*D*4 bytes
chunked    readout-first V-chunked autograd.Function, own backward      memory O(B*H*V + chunk)
triton     fused Triton fwd + deterministic 2-kernel bwd                CUDA (or CPU under TRITON_INTERPRET=1)
========== ============================================================ ==========================

``backend="auto"``: on CUDA triton (if installed), else sdpa if it fits the memory budget, else
chunked; on CPU sdpa if it fits, else chunked.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from brainenc.exceptions import ConfigError, DataFormatError
from brainenc.ops._dispatch import OPS, Constraints, register_backend, resolve_memory_budget, select_backend
from brainenc.ops.routing.chunked import choose_chunk_size, choose_workers, chunked_memory, routing_chunked
from brainenc.ops.routing.reference import routing_reference
from brainenc.ops.routing.sdpa import routing_sdpa, sdpa_memory
from brainenc.ops.routing.triton_backend import routing_triton, triton_check, triton_memory

__all__ = ["routing_attention", "routing_attention_multi", "select_routing_backend", "AUTO_ORDER"]

OP = "routing_attention"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _reference_memory(info: dict) -> float:
    bhv = info["B"] * info["H"] * info["V"]
    return bhv * (2 * info["P"] + info["D"]) * 4 * (2 if info["needs_grad"] else 1)


register_backend(OP, "reference", Constraints(dtypes=_FLOATS, memory=_reference_memory, auto=False,
                                              notes="ground truth; materialises [B,H,V,P]"))(routing_reference)
register_backend(OP, "sdpa", Constraints(dtypes=_FLOATS, memory=sdpa_memory,
                                         notes="torch SDPA + readout; O(B*H*V*D) memory"))(routing_sdpa)
register_backend(OP, "chunked", Constraints(dtypes=_FLOATS, memory=chunked_memory,
                                            notes="readout-first V-chunked autograd.Function"))(routing_chunked)
register_backend(OP, "triton", Constraints(
    devices=("cuda", "cpu"), dtypes=_FLOATS, requires=("triton",), memory=triton_memory, check=triton_check,
    notes="fused Triton kernels; CPU only under TRITON_INTERPRET=1"))(routing_triton)

#: Preference order of ``backend="auto"`` per device type.
AUTO_ORDER = {"cuda": ("triton", "sdpa", "chunked"), "cpu": ("sdpa", "chunked")}


def _check_tensor(name: str, x, ndim: int, shape_doc: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise DataFormatError(f"routing_attention: '{name}' must be a torch.Tensor of shape {shape_doc}; got {type(x).__name__}")
    if x.ndim != ndim:
        raise DataFormatError(f"routing_attention: '{name}' must have shape {shape_doc}; got {tuple(x.shape)}")
    if x.dtype not in _FLOATS:
        raise DataFormatError(f"routing_attention: '{name}' must be float16/bfloat16/float32/float64; got {x.dtype}")
    if x.numel() == 0:
        raise DataFormatError(f"routing_attention: '{name}' must be non-empty; got shape {tuple(x.shape)}")


def _check_inputs(q, k, v, w, c) -> tuple[int, int, int, int, int]:
    """Validate shapes, dtypes and devices; return (B, H, V, P, D)."""
    _check_tensor("q", q, 3, "[H, V, D]")
    H, V, D = q.shape
    _check_tensor("w", w, 3, "[H, V, D]")
    _check_tensor("k", k, 4, "[B, H, P, D]")
    _check_tensor("v", v, 4, "[B, H, P, D]")
    B, _, P, _ = k.shape
    if tuple(w.shape) != (H, V, D):
        raise DataFormatError(f"routing_attention: 'w' must have the shape of q {tuple(q.shape)}; got {tuple(w.shape)}")
    if k.shape[1] != H or k.shape[3] != D:
        raise DataFormatError(f"routing_attention: 'k' must have shape [B, H={H}, P, D={D}] to match q; got {tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise DataFormatError(f"routing_attention: 'v' must have the shape of k {tuple(k.shape)}; got {tuple(v.shape)}")
    named = [("w", w), ("k", k), ("v", v)]
    if c is not None:
        _check_tensor("c", c, 1, "[V]")
        if c.shape[0] != V:
            raise DataFormatError(f"routing_attention: 'c' must have shape [V={V}]; got {tuple(c.shape)}")
        named.append(("c", c))
    for name, x in named:
        if x.dtype != q.dtype:
            raise DataFormatError(f"routing_attention: '{name}' has dtype {x.dtype} but q has {q.dtype}; all inputs must share one dtype")
        if x.device != q.device:
            raise DataFormatError(f"routing_attention: '{name}' is on {x.device} but q is on {q.device}; all inputs must share one device")
    return B, H, V, P, D


def _check_workers(workers):
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers <= 0):
        raise ConfigError(f"'workers' must be a positive integer; {workers!r} was provided")
    return workers


def _info(q, k, v, w, c, memory_budget, workers=None) -> dict:
    B, H, V, P, D = _check_inputs(q, k, v, w, c)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, w))
    return {"B": B, "H": H, "V": V, "P": P, "D": D, "dtype": q.dtype, "device": q.device,
            "needs_grad": needs_grad, "budget": resolve_memory_budget(memory_budget), "workers": workers}


def select_routing_backend(q, k, v, w, c=None, *, backend: str = "auto", memory_budget=None, workers=None) -> str:
    """Name of the backend :func:`routing_attention` would use for these inputs.

    Parameters are those of :func:`routing_attention`. Raises the same errors.
    """
    info = _info(q, k, v, w, c, memory_budget, _check_workers(workers))
    order = AUTO_ORDER.get(info["device"].type, ("chunked",))
    return select_backend(OP, backend, info, order)


def routing_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    c: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    memory_budget=None,
    workers: Optional[int] = None,
) -> torch.Tensor:
    """Voxel-query routing attention with a fused per-voxel linear readout.

    ``y[b, v] = sum_h w[h, v] . sum_p softmax_p(q[h, v] . k[b, h, p] / sqrt(D)) v[b, h, p] + c[v]``

    Parameters
    ----------
    q : torch.Tensor, shape [H, V, D]
        One learned query per head and voxel (shared across the batch).
    k : torch.Tensor, shape [B, H, P, D]
        Keys of the P patch tokens of each image.
    v : torch.Tensor, shape [B, H, P, D]
        Values of the patch tokens.
    w : torch.Tensor, shape [H, V, D]
        Per-voxel readout weights (fold any linear output projection into it).
    c : torch.Tensor, shape [V], optional
        Per-voxel bias.
    backend : {"auto", "reference", "sdpa", "chunked", "triton"}
        Implementation. ``"auto"`` picks by device and memory (module docstring); an explicit name
        is always honoured or rejected with a one-line :class:`~brainenc.exceptions.ConfigError` naming the constraint.
    chunk_size : int, optional
        Voxels per chunk for ``backend="chunked"`` (default: from ``memory_budget`` and cache size).
    memory_budget : int or str, optional
        Working-memory budget in bytes (or ``"512M"``, ``"2G"``); default 1 GiB or
        ``BRAINENC_OPS_MEMORY_BUDGET``. Backends whose estimate exceeds it are rejected.
    workers : int, optional
        CPU chunk streams for ``backend="chunked"``, each single-threaded with its own buffers
        (default ``torch.get_num_threads()``; 1 = one stream using torch's intra-op threads).
        Results are deterministic for a given value. Ignored on CUDA.

    Returns
    -------
    torch.Tensor, shape [B, V]
        In the input dtype. Softmax and accumulation run in float32 (float64 for float64 input).

    Raises
    ------
    DataFormatError
        Inputs that are not tensors, or with wrong shapes, a non-float dtype, mixed dtypes or
        devices (a ``ValueError``; the message names the argument).
    ConfigError
        Unknown backend, a backend whose constraints reject the inputs, bad ``chunk_size`` /
        ``memory_budget``.

    Examples
    --------
    >>> import torch
    >>> from brainenc.ops import routing_attention
    >>> q, w = torch.randn(2, 100, 16), torch.randn(2, 100, 16)
    >>> k, v = torch.randn(3, 2, 10, 16), torch.randn(3, 2, 10, 16)
    >>> routing_attention(q, k, v, w, torch.zeros(100)).shape
    torch.Size([3, 100])
    """
    info = _info(q, k, v, w, c, memory_budget, _check_workers(workers))
    order = AUTO_ORDER.get(info["device"].type, ("chunked",))
    name = select_backend(OP, backend, info, order)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ConfigError(f"'chunk_size' must be a positive integer; {chunk_size!r} was provided")
    for arg, val in (("chunk_size", chunk_size), ("workers", workers)):
        if val is not None and backend not in ("auto", "chunked"):
            raise ConfigError(f"'{arg}' applies only to backend 'chunked'; backend {backend!r} was requested")
    kwargs = {}
    if name == "chunked":
        n_workers = choose_workers(info)
        kwargs["workers"] = n_workers
        kwargs["chunk_size"] = choose_chunk_size(info, n_workers) if chunk_size is None else chunk_size
    y = OPS.get(f"{OP}/{name}")(q, k, v, w, **kwargs)
    if c is not None:
        y = y + c
    return y


def routing_attention_multi(
    qs: Sequence[torch.Tensor],
    ks,
    vs,
    ws: Sequence[torch.Tensor],
    cs: Optional[Sequence[Optional[torch.Tensor]]] = None,
    **kwargs,
) -> list[torch.Tensor]:
    """Routing attention for several subjects with different voxel counts (one call per subject).

    Parameters
    ----------
    qs, ws : sequence of torch.Tensor, each [H, V_s, D]
        Per-subject voxel queries and readout weights (V_s may differ between subjects).
    ks, vs : torch.Tensor [B, H, P, D] or sequence of them
        Patch keys/values, either shared by every subject (one tensor) or one per subject
        (each subject may see its own images, so B may differ too).
    cs : sequence of (torch.Tensor [V_s] or None), optional
        Per-subject biases.
    **kwargs
        ``backend``, ``chunk_size``, ``memory_budget``, ``workers`` as in :func:`routing_attention`
        (applied to each subject; ``auto`` decides per subject).

    Returns
    -------
    list of torch.Tensor, each [B_s, V_s]
    """
    n = len(qs)
    if len(ws) != n:
        raise DataFormatError(f"routing_attention_multi: 'ws' has {len(ws)} entries but 'qs' has {n}")
    ks = [ks] * n if isinstance(ks, torch.Tensor) else list(ks)
    vs = [vs] * n if isinstance(vs, torch.Tensor) else list(vs)
    cs = [None] * n if cs is None else list(cs)
    for name, seq in (("ks", ks), ("vs", vs), ("cs", cs)):
        if len(seq) != n:
            raise DataFormatError(f"routing_attention_multi: '{name}' has {len(seq)} entries but 'qs' has {n}")
    return [routing_attention(qs[i], ks[i], vs[i], ws[i], cs[i], **kwargs) for i in range(n)]
