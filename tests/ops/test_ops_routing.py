"""routing_attention backends against the einsum reference: outputs and all gradients.

Tolerances (max abs error / max |reference|, per tensor):
float64 1e-10 (every backend is exact up to rounding), float32 2e-5, float16 1e-2, bfloat16 4e-2
(low-precision inputs are compared with the float64 reference evaluated on the same rounded inputs).
The triton backend runs under TRITON_INTERPRET=1 (tests/conftest.py) at tiny shapes.
"""
from __future__ import annotations

import pytest
import torch

from brainenc.ops import routing_attention
from brainenc.ops.routing.reference import routing_reference

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}
BACKENDS = ["reference", "sdpa", "chunked", "triton"]


def make_inputs(B, H, V, P, D, dtype=torch.float64, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(H, V, D, generator=g, dtype=torch.float64) * 1.5
    w = torch.randn(H, V, D, generator=g, dtype=torch.float64) * D ** -0.5
    k = torch.randn(B, H, P, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, P, D, generator=g, dtype=torch.float64)
    c = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    dy = torch.randn(B, V, generator=g, dtype=torch.float64)
    cast = [t.to(dtype) if t is not None else None for t in (q, k, v, w, c)]
    return cast, dy.to(dtype)


def run(inputs, dy, backend, grad=True, **kw):
    """Output and gradients (q, k, v, w, c) of one backend, all in float64 for comparison."""
    xs = [t.detach().clone().requires_grad_(grad) if t is not None else None for t in inputs]
    y = routing_attention(*xs, backend=backend, **kw)
    if grad:
        y.backward(dy)
    grads = [x.grad for x in xs if x is not None] if grad else []
    return y, [y.detach().double()] + [gr.double() for gr in grads]


def reference64(inputs, dy):
    up = [t.detach().double() if t is not None else None for t in inputs]
    return run(up, dy.double(), "reference")[1]


def assert_close(got, want, tol, what=""):
    names = ["y", "dq", "dk", "dv", "dw", "dc"]
    assert len(got) == len(want)
    for name, a, b in zip(names, got, want):
        scale = max(float(b.abs().max()), 1e-6)
        err = float((a - b).abs().max()) / scale
        assert err <= tol, f"{what} {name}: relative error {err:.2e} > {tol:.0e}"


def test_reference_matches_the_definition():
    (q, k, v, w, c), _ = make_inputs(2, 2, 9, 5, 4)
    y = routing_reference(q, k, v, w)
    want = torch.zeros(2, 9, dtype=torch.float64)
    for b in range(2):
        for h in range(2):
            for vox in range(9):
                logits = torch.stack([q[h, vox] @ k[b, h, p] for p in range(5)]) / 2.0
                a = torch.exp(logits - logits.max())
                a = a / a.sum()
                o = sum(a[p] * v[b, h, p] for p in range(5))
                want[b, vox] += w[h, vox] @ o
    torch.testing.assert_close(y, want, rtol=0, atol=1e-12)


# odd V, P, D; H > 1; V above the interpreter tile (128) and P above its tile (64) for masking
SHAPES = [
    pytest.param((2, 1, 37, 19, 24), id="B2H1V37P19D24"),
    pytest.param((3, 2, 130, 70, 20), id="B3H2V130P70D20"),
    pytest.param((1, 3, 5, 1, 3), id="B1H3V5P1D3"),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", ["sdpa", "chunked", "triton"])
def test_float64_matches_reference(backend, shape):
    inputs, dy = make_inputs(*shape)
    kw = {"chunk_size": 16} if backend == "chunked" else {}
    _, got = run(inputs, dy, backend, **kw)
    assert_close(got, reference64(inputs, dy), TOL[torch.float64], backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["reference", "sdpa", "chunked", "triton"])
def test_low_precision_matches_float64_reference(backend, dtype):
    inputs, dy = make_inputs(2, 2, 45, 21, 16, dtype=dtype, seed=3)
    y, got = run(inputs, dy, backend)
    assert y.dtype == dtype
    assert_close(got, reference64(inputs, dy), TOL[dtype], f"{backend} {dtype}")


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 37, 1000])
def test_chunked_chunk_boundaries(chunk_size):
    inputs, dy = make_inputs(2, 2, 37, 11, 6, seed=5)
    _, got = run(inputs, dy, "chunked", chunk_size=chunk_size)
    assert_close(got, reference64(inputs, dy), 1e-12, f"chunk {chunk_size}")


def test_chunked_gradcheck():
    (q, k, v, w, c), _ = make_inputs(2, 2, 7, 5, 3, seed=7)
    xs = [t.clone().requires_grad_() for t in (q, k, v, w, c)]

    def fn(*a):
        return routing_attention(*a, backend="chunked", chunk_size=3)

    assert torch.autograd.gradcheck(fn, xs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("chunk_size", [4, 16])
def test_chunked_parallel_workers_match_reference(workers, chunk_size):
    # several heads, odd sizes, a ragged last chunk; every worker gets chunks at chunk 4
    inputs, dy = make_inputs(3, 2, 45, 13, 7, seed=31)
    _, got = run(inputs, dy, "chunked", chunk_size=chunk_size, workers=workers)
    assert_close(got, reference64(inputs, dy), 1e-12, f"workers {workers} chunk {chunk_size}")


def test_chunked_parallel_gradcheck():
    (q, k, v, w, c), _ = make_inputs(2, 2, 9, 5, 3, seed=32)
    xs = [t.clone().requires_grad_() for t in (q, k, v, w, c)]

    def fn(*a):
        return routing_attention(*a, backend="chunked", chunk_size=2, workers=3)

    assert torch.autograd.gradcheck(fn, xs, eps=1e-6, atol=1e-7)


def test_chunked_parallel_is_deterministic_and_restores_threads():
    inputs, dy = make_inputs(4, 1, 300, 20, 16, dtype=torch.float32, seed=33)
    threads = torch.get_num_threads()
    _, g1 = run(inputs, dy, "chunked", chunk_size=16, workers=2)
    _, g2 = run(inputs, dy, "chunked", chunk_size=16, workers=2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
    assert torch.get_num_threads() == threads
    # one worker (intra-op threads) agrees to fp32 rounding
    _, g0 = run(inputs, dy, "chunked", chunk_size=16, workers=1)
    assert_close(g1, g0, 1e-5, "2 workers vs 1")


def test_chunked_parallel_frozen_keys_values():
    (q, k, v, w, c), dy = make_inputs(2, 1, 40, 9, 5, seed=34)
    qg, wg = q.clone().requires_grad_(), w.clone().requires_grad_()
    routing_attention(qg, k, v, wg, backend="chunked", chunk_size=8, workers=2).backward(dy)
    want = reference64([q, k, v, w, c], dy)
    torch.testing.assert_close(qg.grad, want[1], rtol=0, atol=1e-10)
    torch.testing.assert_close(wg.grad, want[4], rtol=0, atol=1e-10)


def test_chunked_rejects_double_backward():
    (q, k, v, w, _), dy = make_inputs(1, 1, 6, 4, 3, seed=35)
    qg = q.clone().requires_grad_()
    y = routing_attention(qg, k, v, w, backend="chunked")
    (g,) = torch.autograd.grad(y, qg, dy, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_triton_gradcheck_interpreted():
    (q, k, v, w, c), _ = make_inputs(1, 1, 5, 3, 2, seed=8)
    xs = [t.clone().requires_grad_() for t in (q, k, v, w, c)]
    assert torch.autograd.gradcheck(lambda *a: routing_attention(*a, backend="triton"), xs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["sdpa", "chunked", "triton"])
def test_no_bias_and_no_grad(backend):
    inputs, _ = make_inputs(2, 1, 20, 9, 8, bias=False)
    with torch.no_grad():
        y = routing_attention(*inputs, backend=backend)
    torch.testing.assert_close(y, routing_reference(*inputs[:4]), rtol=0, atol=1e-10)
    assert not y.requires_grad


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_frozen_keys_values_skip_their_gradients(backend, monkeypatch):
    if backend == "triton":
        from brainenc.ops.routing import triton_kernels

        class _Forbidden:
            def __getitem__(self, grid):
                raise AssertionError("dK/dV kernel launched although k and v need no grad")

        monkeypatch.setattr(triton_kernels, "_route_bwd_dk_dv", _Forbidden())
    (q, k, v, w, c), dy = make_inputs(2, 2, 33, 10, 8, seed=11)
    qg, wg, cg = (t.clone().requires_grad_() for t in (q, w, c))
    y = routing_attention(qg, k, v, wg, cg, backend=backend)
    y.backward(dy)
    assert k.grad is None and v.grad is None
    want = reference64([q, k, v, w, c], dy)
    assert_close([y.detach(), qg.grad, wg.grad, cg.grad], [want[0], want[1], want[4], want[5]], 1e-10)


def test_only_keys_need_grad_chunked():
    (q, k, v, w, c), dy = make_inputs(2, 1, 21, 6, 5, seed=12)
    kg = k.clone().requires_grad_()
    routing_attention(q, kg, v, w, backend="chunked", chunk_size=8).backward(dy)
    want = reference64([q, k, v, w, c], dy)
    torch.testing.assert_close(kg.grad, want[2], rtol=0, atol=1e-10)


def test_triton_backward_is_deterministic():
    inputs, dy = make_inputs(3, 2, 70, 33, 20, dtype=torch.float32, seed=13)
    _, g1 = run(inputs, dy, "triton")
    _, g2 = run(inputs, dy, "triton")
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("D", [64, 768])
@pytest.mark.parametrize("backend", ["triton", "chunked", "sdpa"])
def test_cuda_bf16_matches_reference(backend, D):
    inputs, dy = make_inputs(4, 1, 3000, 257, D, dtype=torch.bfloat16, seed=21)
    inputs = [t.cuda() for t in inputs]
    _, got = run(inputs, dy.cuda(), backend)
    want = reference64([t.cpu() for t in inputs], dy)
    assert_close([g.cpu() for g in got], want, TOL[torch.bfloat16], f"cuda {backend} D={D}")


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_triton_fp32_and_determinism():
    inputs, dy = make_inputs(8, 2, 5000, 200, 48, dtype=torch.float32, seed=22)
    inputs = [t.cuda() for t in inputs]
    _, g1 = run(inputs, dy.cuda(), "triton")
    _, g2 = run(inputs, dy.cuda(), "triton")
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
    want = reference64([t.cpu() for t in inputs], dy)
    # TF32 tensor-core dots when torch allows TF32 matmuls, IEEE fp32 otherwise
    assert_close([g.cpu() for g in g1], want, 5e-3 if torch.backends.cuda.matmul.allow_tf32 else 1e-4, "cuda fp32")
