"""Same-process, interleaved sdpa-vs-chunked timing ratio for routing attention (CPU).

Runs sdpa and chunked alternately in ONE process (after a warm-up call each), so machine load hits
both equally, and reports the ratio of medians chunked/sdpa per (D, mode). Time only; for memory use
kernels/bench/bench_routing.py.

    .venv/bin/python kernels/bench/bench_routing_ratio.py --dims 64 --reps 5
    .venv/bin/python kernels/bench/bench_routing_ratio.py --dims 768 --reps 3 --modes fwdbwd
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from brainenc.ops import routing_attention


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--V", type=int, default=20000)
    ap.add_argument("--P", type=int, default=256)
    ap.add_argument("--H", type=int, default=1)
    ap.add_argument("--dims", default="64,768")
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk-size", type=int, default=0, help="0 = automatic")
    ap.add_argument("--impls", default="sdpa,chunked", help="first one is the ratio denominator")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    impls = args.impls.split(",")
    for D in [int(d) for d in args.dims.split(",")]:
        q = torch.randn(args.H, args.V, D)
        w = torch.randn(args.H, args.V, D) * D ** -0.5
        k = torch.randn(args.B, args.H, args.P, D)
        v = torch.randn(args.B, args.H, args.P, D)
        dy = torch.randn(args.B, args.V)
        for mode in args.modes.split(","):
            xs = [t.clone().requires_grad_(mode == "fwdbwd") for t in (q, k, v, w)]

            def call(impl):
                kw = {"backend": impl, "memory_budget": "1T"}
                if impl == "chunked" and args.chunk_size:
                    kw["chunk_size"] = args.chunk_size
                t0 = time.perf_counter()
                if mode == "fwd":
                    with torch.no_grad():
                        routing_attention(*xs, **kw)
                else:
                    for x in xs:
                        x.grad = None
                    routing_attention(*xs, **kw).backward(dy)
                return (time.perf_counter() - t0) * 1e3

            for impl in impls:
                call(impl)  # warm-up
            times = {impl: [] for impl in impls}
            for _ in range(args.reps):
                for impl in impls:
                    times[impl].append(call(impl))
            med = {impl: statistics.median(t) for impl, t in times.items()}
            parts = "  ".join(f"{impl} {med[impl]:.0f} ms" for impl in impls)
            ratios = "  ".join(f"{impl}/{impls[0]} {med[impl] / med[impls[0]]:.3f}" for impl in impls[1:])
            print(f"D={D} {mode:6s} {parts}  |  {ratios}  (chunk={args.chunk_size or 'auto'}, reps={args.reps})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
