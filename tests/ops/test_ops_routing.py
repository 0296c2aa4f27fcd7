"""routing_attention backends against the einsum reference: outputs and all gradients.

Tolerances, per tensor: max |got - ref| <= TOL * max |ref| + ATOL * max M, where M (``magnitudes``)
is the same sum evaluated on absolute values (|q||k| logits, |w||v| readout, |dy| ...): the sum of
the |terms| that the exact result adds up, and cancels, which bounds every rounding error.
TOL: float64 1e-10 (every backend is exact up to rounding), float32 2e-5, float16 1e-2, bfloat16
4e-2 (low-precision inputs are compared with the float64 reference evaluated on the same rounded
inputs). ATOL is the accumulation dtype's share: 1e-13 for float64 (a priori bound n*u*M with
n <= ~300 terms and u = 1.1e-16 is ~3e-14; measured <= 1.3e-16 * M with AVX-512, AVX2 and no-SIMD
ATen kernels at 1-3 threads), 1e-7 for float32 accumulation (measured <= 7e-8 * M). It is what lets
a gradient whose exact value is 0 (P = 1: the softmax Jacobian is 0, so dq = dk = 0 and only
rounding of terms of size ~M remains) pass on every CPU, while a backend that is wrong by 1e-6 of
M still fails. M is 10-120x max |ref| at the shapes here, so ATOL loosens no check by more than
~1e-11 (float64) / 1.2e-5 (float32) relative. The low-precision shapes have P > 1 (no cancelling
gradient), so there TOL * max |ref| governs.
The triton backend runs under TRITON_INTERPRET=1 (tests/conftest.py) at tiny shapes.
"""
from __future__ import annotations

import pytest
import torch

from brainenc.ops import routing_attention
from brainenc.ops.routing.reference import routing_reference

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}
# absolute part, in units of max M (see the module docstring); by accumulation dtype
ATOL = {torch.float64: 1e-13, torch.float32: 1e-7, torch.float16: 1e-7, torch.bfloat16: 1e-7}
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


def magnitudes(inputs, dy):
    """M for y, dq, dk, dv, dw (and dc with a bias): the reference's sums over |terms|, float64.

    Each product of the forward and backward is taken over absolute values, and the softmax
    weights a are scaled by L = 1 + |q||k|/sqrt(D) (a rounding error of eps in a logit moves a by
    a*L*eps). For dq and dk this includes both terms of the softmax Jacobian a*(da - sum_p a*da),
    which cancel exactly when P = 1.
    """
    q, k, v, w, c = [t.detach().double() if t is not None else None for t in inputs]
    ady = dy.detach().double().abs()
    scale = q.shape[-1] ** -0.5
    a = torch.softmax(torch.einsum("hvd,bhpd->bhvp", q, k) * scale, dim=-1)
    aL = a * (1.0 + torch.einsum("hvd,bhpd->bhvp", q.abs(), k.abs()) * scale)
    o = torch.einsum("bhvp,bhpd->bhvd", aL, v.abs())
    y = torch.einsum("bhvd,hvd->bv", o, w.abs())
    da = ady[:, None, :, None] * torch.einsum("hvd,bhpd->bhvp", w.abs(), v.abs())
    ds = aL * (da + (a * da).sum(-1, keepdim=True))
    out = [
        y if c is None else y + c.abs(),
        torch.einsum("bhvp,bhpd->hvd", ds, k.abs()) * scale,
        torch.einsum("bhvp,hvd->bhpd", ds, q.abs()) * scale,
        torch.einsum("bhvp,bv,hvd->bhpd", aL, ady, w.abs()),
        torch.einsum("bv,bhvd->hvd", ady, o),
    ]
    return out if c is None else out + [ady.sum(0)]


def assert_close(got, want, mag, tol, atol, what="", names=("y", "dq", "dk", "dv", "dw", "dc")):
    """max |got - want| <= tol * max |want| + atol * max mag, per tensor (module docstring)."""
    assert len(got) == len(want) == len(mag)
    for name, a, b, m in zip(names, got, want, mag):
        err = float((a - b).abs().max())
        bound = tol * float(b.abs().max()) + atol * float(m.max())
        assert err <= bound, (f"{what} {name}: max error {err:.2e} > {bound:.2e} = {tol:.0e} * max|ref| "
                              f"{float(b.abs().max()):.2e} + {atol:.0e} * max M {float(m.max()):.2e}")


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
    f64 = torch.float64
    assert_close(got, reference64(inputs, dy), magnitudes(inputs, dy), TOL[f64], ATOL[f64], backend)


def test_tolerance_still_catches_errors_on_a_zero_gradient():
    # P = 1: dq and dk are exactly 0, so only the ATOL * max M part can apply; an error of 1e-6 M fails
    inputs, dy = make_inputs(1, 3, 5, 1, 3)
    want, mag = reference64(inputs, dy), magnitudes(inputs, dy)
    for i in (1, 2):
        assert float(want[i].abs().max()) <= 1e-15 * float(mag[i].max()) and float(mag[i].max()) > 0.1
    assert_close(want, want, mag, TOL[torch.float64], ATOL[torch.float64])
    for i in (1, 2):
        bad = list(want)
        bad[i] = want[i] + 1e-6 * float(mag[i].max())
        with pytest.raises(AssertionError, match=["dq", "dk"][i - 1]):
            assert_close(bad, want, mag, TOL[torch.float64], ATOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["reference", "sdpa", "chunked", "triton"])
def test_low_precision_matches_float64_reference(backend, dtype):
    inputs, dy = make_inputs(2, 2, 45, 21, 16, dtype=dtype, seed=3)
    y, got = run(inputs, dy, backend)
    assert y.dtype == dtype
    assert_close(got, reference64(inputs, dy), magnitudes(inputs, dy), TOL[dtype], ATOL[dtype], f"{backend} {dtype}")


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 37, 1000])
def test_chunked_chunk_boundaries(chunk_size):
    inputs, dy = make_inputs(2, 2, 37, 11, 6, seed=5)
    _, got = run(inputs, dy, "chunked", chunk_size=chunk_size)
    assert_close(got, reference64(inputs, dy), magnitudes(inputs, dy), 1e-12, ATOL[torch.float64],
                 f"chunk {chunk_size}")


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
    assert_close(got, reference64(inputs, dy), magnitudes(inputs, dy), 1e-12, ATOL[torch.float64],
                 f"workers {workers} chunk {chunk_size}")


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
    assert_close(g1, g0, magnitudes(inputs, dy), 1e-5, ATOL[torch.float32], "2 workers vs 1")


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
    want, mag = reference64([q, k, v, w, c], dy), magnitudes([q, k, v, w, c], dy)
    sel = (0, 1, 4, 5)  # y, dq, dw, dc
    assert_close([y.detach(), qg.grad, wg.grad, cg.grad], [want[i] for i in sel], [mag[i] for i in sel],
                 1e-10, ATOL[torch.float64], backend, names=("y", "dq", "dw", "dc"))


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
    want, mag = reference64([t.cpu() for t in inputs], dy), magnitudes([t.cpu() for t in inputs], dy)
    assert_close([g.cpu() for g in got], want, mag, TOL[torch.bfloat16], ATOL[torch.bfloat16], f"cuda {backend} D={D}")


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_triton_fp32_and_determinism():
    inputs, dy = make_inputs(8, 2, 5000, 200, 48, dtype=torch.float32, seed=22)
    inputs = [t.cuda() for t in inputs]
    _, g1 = run(inputs, dy.cuda(), "triton")
    _, g2 = run(inputs, dy.cuda(), "triton")
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
    want, mag = reference64([t.cpu() for t in inputs], dy), magnitudes([t.cpu() for t in inputs], dy)
    # TF32 tensor-core dots when torch allows TF32 matmuls, IEEE fp32 otherwise
    assert_close([g.cpu() for g in g1], want, mag, 5e-3 if torch.backends.cuda.matmul.allow_tf32 else 1e-4,
                 ATOL[torch.float32], "cuda fp32")
