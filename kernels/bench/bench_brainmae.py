"""Benchmark: BrainMAE pretraining throughput and peak memory at Schaefer-400 scale.

Problem: 400 ROIs, 15 s segments at TR 0.8 s (19 time points), batch 32 segments, the documented
default architecture (d 256, FFN 1024, 3 encoder blocks + 1 decoder block, dropout 0.1), one step =
:class:`brainenc.pretraining.brainmae.BrainMAEObjective` loss (masks drawn per row, ratio U(0, 0.8),
λ 0.75) + backward + clip + AdamW. Variants, each in a fresh subprocess (peak RSS from ``os.wait4``):

- ``static_graph``: SG-TSE, ``A = softmax(E Eᵀ/√d)`` computed once per forward, ``A · V`` by matmul (default);
- ``static_graph_sdpa``: the same blocks with ``A · V`` through ``scaled_dot_product_attention``
  (E as queries and keys, diagonal masked) — the anchor for the explicit-matrix path;
- ``self_attention``: every block multi-head self-attention (4 heads, SDPA) — vanilla-BrainMAE.

Segments/s = batch × steps / time of the timed steps. Ratios are against ``static_graph``.

    flock /tmp/brainenc-bench.lock .venv/bin/python kernels/bench/bench_brainmae.py

Writes ``kernels/results/brainmae_<device>.json``.
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
VARIANTS = {"static_graph": {}, "static_graph_sdpa": {"graph_backend": "sdpa"},
            "self_attention": {"encoder": "self_attention"}}


def _child(args) -> None:
    import numpy as np
    import torch

    from brainenc.config import from_dict
    from brainenc.models.brainmae import BrainMAEArchitecture, BrainMAEPretrainModel
    from brainenc.pretraining.brainmae import BrainMAEObjective, segment_length

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    L = segment_length(args.tr, args.seconds)
    arch = from_dict(BrainMAEArchitecture, {"d_model": args.d, **VARIANTS[args.variant]})
    model = BrainMAEPretrainModel(arch, n_rois=args.rois, segment_length=L).to(dev).train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    obj = BrainMAEObjective()
    x = torch.randn(args.batch, args.rois, L, device=dev)
    amp = dev.type == "cuda"

    def step(i):
        batch = {"x": x, "index": torch.arange(i * args.batch, (i + 1) * args.batch)}
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
            parts = obj.loss(model, batch)
        loss = parts.total / parts.count
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    for i in range(args.warmup):
        step(i)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        loss = step(args.warmup + i)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out = {"variant": args.variant, "n_params": n_params, "segment_length": L, "step_seconds": times,
           "median_step_s": float(np.median(times)),
           "segments_per_s": args.batch * args.steps / float(np.sum(times)), "final_loss": float(loss)}
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
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--rois", type=int, default=400)
    p.add_argument("--tr", type=float, default=0.8)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args)
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "BRAINENC_QUIET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    results = []
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--child", "1", "--variant", variant, "--device", args.device,
               "--rois", str(args.rois), "--tr", str(args.tr), "--seconds", str(args.seconds), "--d", str(args.d),
               "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--threads", str(args.threads)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        stdout, stderr = proc.stdout.read(), proc.stderr.read()
        line = next((ln for ln in stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None or os.waitstatus_to_exitcode(status) != 0:
            res = {"variant": variant, "error": stderr[-2000:]}
        else:
            res = json.loads(line[len("RESULT "):])
        res["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: KiB
        res["process_wall_s"] = round(time.perf_counter() - t0, 2)
        print(json.dumps({k: v for k, v in res.items() if k != "step_seconds"}), flush=True)
        results.append(res)
    base = next((r for r in results if r.get("variant") == "static_graph" and "segments_per_s" in r), None)
    ratios = {}
    if base is not None:
        ratios = {r["variant"]: {"throughput_vs_static_graph": r["segments_per_s"] / base["segments_per_s"],
                                 "peak_rss_vs_static_graph": r["peak_rss_mb"] / base["peak_rss_mb"]}
                  for r in results if "segments_per_s" in r}
    payload = {"benchmark": "brainmae_pretraining",
               "problem": {"n_rois": args.rois, "tr_s": args.tr, "segment_s": args.seconds, "d_model": args.d,
                           "d_ffn": 1024, "encoder_blocks": 3, "decoder_blocks": 1, "batch_segments": args.batch,
                           "timed_steps": args.steps, "warmup_steps": args.warmup, "threads": args.threads,
                           "device": args.device, "dtype": "bf16 autocast" if args.device == "cuda" else "float32"},
               "measures": "segments/s over timed loss+backward+clip+AdamW steps; peak RSS of a fresh process "
                           "per variant",
               "machine": _machine(args.device), "results": results, "ratios": ratios,
               "command": " ".join([Path(sys.executable).name, "kernels/bench/bench_brainmae.py"] + sys.argv[1:])}
    out = Path(args.out) if args.out else ROOT / "kernels" / "results" / f"brainmae_{args.device}.json"
    sys.path.insert(0, str(ROOT))
    from brainenc._utils.io import write_json

    write_json(out, payload)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
