"""Benchmark: training throughput and peak memory of routing encoders at NSD scale.

Problem: V = 40 000 voxels (two hemispheres of 20 000), 256 patch tokens (16 × 16 grid), token dim
768, the paper's architecture (d_model 768, 16 heads, FFN 1024, one decoder layer, sine keys), MSE
loss, AdamW, grad clipping 0.1 — i.e. one ``Trainer`` step. Models:

- ``rois``: 2 × (24 ROIs + unknown) = 50 queries, grouped readout (``sum`` rule, overlapping ROI
  families drawn at random with the NSD family structure);
- ``voxels``: one query per voxel, linear-readout routing variant (``brainenc.ops.routing_attention``,
  ``backend="auto"``);
- ``voxels_full`` (only with ``--models``): one query per voxel through the full decoder
  (LN/FFN between attention and readout), V-chunked with checkpointing.

Each model runs in a fresh subprocess (warm-up steps, then timed steps on random tokens); the parent
reads the child's peak RSS from ``os.wait4`` (``ru_maxrss``); on CUDA the child also reports
``torch.cuda.max_memory_allocated``. Samples/s = batch × steps / time of the timed steps
(forward + backward + clip + AdamW step).

CPU (recorded JSON; hold the shared lock on the 2-core machine)::

    flock /tmp/brainenc-bench.lock .venv/bin/python kernels/bench/bench_routing_encoder.py

GPU (H100 class; bf16 autocast as in the Trainer, larger batch)::

    .venv/bin/python kernels/bench/bench_routing_encoder.py --device cuda --batch 32 --steps 20

Writes ``kernels/results/routing_encoder_<device>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _child(args) -> None:
    import numpy as np
    import torch

    from brainenc.models import build_query_set, create_model

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    V, grid, D = args.voxels, (16, 16), 768
    rng = np.random.default_rng(0)
    hemi = np.where(np.arange(V) < V // 2, "lh", "rh")
    qs = None
    if args.model == "rois":
        # five families as in NSD/Algonauts (7 + 4 + 5 + 3 + 5 = 24 ROIs); ~40 % of voxels in some ROI
        sizes = {"prf-visualrois": 7, "floc-bodies": 4, "floc-faces": 5, "floc-places": 3, "floc-words": 5}
        labels = {f: np.where(rng.random(V) < 0.08 * n / 4, rng.integers(1, n + 1, V), 0).astype(np.int32)
                  for f, n in sizes.items()}
        qs = build_query_set("rois", V, roi_labels=labels, hemi=hemi, combine="sum")
        model = create_model("routing_encoder", feature_dim=D, grid=grid, n_voxels=V, query_set=qs)
    elif args.model == "voxels":  # no query set: one query per voxel
        model = create_model("routing_encoder_voxels", feature_dim=D, grid=grid, n_voxels=V,
                             routing_backend=args.backend)
    else:
        model = create_model("routing_encoder_voxels", feature_dim=D, grid=grid, n_voxels=V,
                             voxel_variant="full", voxel_chunk=args.chunk)
    model.to(dev).train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-4)
    x = torch.randn(args.batch, grid[0] * grid[1], D, device=dev)
    y = torch.randn(args.batch, V, device=dev)
    amp = dev.type == "cuda"

    def step():
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
            pred = model(x)
        loss = (pred.float() - y).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        return loss

    for _ in range(args.warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out = {"model": args.model, "n_params": n_params, "n_queries": (qs.n_queries if qs is not None else V),
           "step_seconds": times, "median_step_s": float(np.median(times)),
           "samples_per_s": args.batch * args.steps / float(np.sum(times)), "final_loss": float(loss)}
    if args.model == "voxels":
        from brainenc.ops import select_routing_backend

        try:
            k = torch.zeros(args.batch, 16, 256, 48, device=dev, requires_grad=True)
            q = torch.zeros(16, V, 48, device=dev, requires_grad=True)
            out["routing_backend_selected"] = str(select_routing_backend(q, k, k, q, None))
        except Exception as exc:  # noqa: BLE001 - informational only
            out["routing_backend_selected"] = f"unknown ({type(exc).__name__})"
    if dev.type == "cuda":
        out["cuda_max_memory_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(out), flush=True)


def _machine(device: str) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "processor": platform.processor(), "cpu_count": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
        with open("/proc/meminfo") as fh:
            info["mem_total_gb"] = round(int(fh.readline().split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--models", default="rois,voxels", help="comma list of rois, voxels, voxels_full")
    p.add_argument("--voxels", type=int, default=40000)
    p.add_argument("--batch", type=int, default=None, help="default 4 on CPU, 32 on CUDA")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backend", default="auto", help="routing backend for the voxel model")
    p.add_argument("--chunk", type=int, default=2048, help="voxel chunk of voxels_full")
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.batch is None:
        args.batch = 32 if args.device == "cuda" else 4
    if args.child:
        _child(args)
        return
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device is visible on this machine")
    results = []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "BRAINENC_QUIET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for model in args.models.split(","):
        cmd = [sys.executable, __file__, "--child", "1", "--model", model, "--device", args.device,
               "--voxels", str(args.voxels), "--batch", str(args.batch), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads), "--backend", args.backend,
               "--chunk", str(args.chunk)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        stdout, stderr = proc.stdout.read(), proc.stderr.read()
        wall = time.perf_counter() - t0
        line = next((ln for ln in stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None or os.waitstatus_to_exitcode(status) != 0:
            res = {"model": model, "error": stderr[-2000:]}
        else:
            res = json.loads(line[len("RESULT "):])
        res["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: KiB
        res["process_wall_s"] = round(wall, 2)
        print(json.dumps({k: v for k, v in res.items() if k != "step_seconds"}), flush=True)
        results.append(res)
    payload = {"benchmark": "routing_encoder_training",
               "problem": {"n_voxels": args.voxels, "n_tokens": 256, "token_dim": 768, "d_model": 768, "heads": 16,
                           "ffn": 1024, "layers": 1, "batch": args.batch, "timed_steps": args.steps,
                           "warmup_steps": args.warmup, "threads": args.threads, "device": args.device,
                           "dtype": "bf16 autocast" if args.device == "cuda" else "float32"},
               "measures": "samples/s over timed fwd+bwd+clip+AdamW steps; peak RSS of a fresh process per model",
               "machine": _machine(args.device), "results": results,
               "command": " ".join([Path(sys.executable).name, "kernels/bench/bench_routing_encoder.py"] + sys.argv[1:])}
    out = Path(args.out) if args.out else ROOT / "kernels" / "results" / f"routing_encoder_{args.device}.json"
    sys.path.insert(0, str(ROOT))
    from brainenc._utils.io import write_json

    write_json(out, payload)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
