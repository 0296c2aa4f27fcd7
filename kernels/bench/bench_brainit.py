"""Benchmark: Brain-IT (BIT) training at NSD scale and the brain tokenizer's memory in the number of voxels.

1. ``bit``: one BIT training step = forward + MSE + backward + AdamW step of :class:`brainenc.models.
   brainit.BrainIT` at the reference's semantic-branch size (reference_systems.md b.3/b.5): 8 subjects ×
   40 000 voxels in the VoxelEmbedding (width 512: 164 M embedding parameters), 15 000 voxels drawn per
   example with replacement, 128 clusters (a fixed random labelling per subject, as a GMM's), width 512,
   8 heads, 5 self blocks (6 cross blocks), 256 output queries × 1664 (bigG tokens), random targets.
   Samples/s = batch × timed steps / their time.
2. ``tokenizer``: forward + backward of :class:`BrainTokenizer` alone (batch 4, width 512, 128 clusters,
   input tokens requiring grad) for K sampled voxels, ours (segment softmax + scatter_add: linear in
   K, no [b, C, K]) against the dense masked-attention anchor (``[b, C, K]`` scores, membership mask,
   softmax over K, ``A @ V``), same parameters, same run; the two agree (``check``).

Every configuration runs in two fresh subprocesses: one for the timings (default allocator), one for the
memory with ``MALLOC_MMAP_THRESHOLD_=65536`` (RSS then follows live bytes; with glibc's default reuse
the same configuration's peak moved by up to 25 % between runs; those peaks are kept as
``*_default_malloc``). Memory on CPU: ``ru_maxrss`` of the child at the end
minus its value after imports and a tiny warm-up call (``peak_mb``; it includes the inputs, parameters,
gradients and optimiser state built afterwards; ``step_peak_mb`` subtracts the value measured just
before the first full step as well). On CUDA: ``torch.cuda.max_memory_allocated`` (``peak_mb``:
everything allocated; ``step_peak_mb``: minus what was allocated before the first step), bf16 autocast
for the BIT step as in the Trainer.

    flock /tmp/brainenc-bench.lock .venv/bin/python kernels/bench/bench_brainit.py            # ~3-4 min on 2 cores
    .venv/bin/python kernels/bench/bench_brainit.py --quick                                   # smoke run, no file
    .venv/bin/python kernels/bench/bench_brainit.py --device cuda --batch 32 --steps 10

Writes ``kernels/results/brainit_<device>.json`` (not with ``--quick`` unless ``--out`` is given).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: freed large buffers go back to the OS at once, so ru_maxrss tracks the peak of live bytes
#: (glibc's default reuse made the same configuration's peak differ by up to 25 % between runs)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def _dense_tokenizer(tok, x, cluster):
    """Anchor: masked attention with the [b, C, K] membership mask (module's parameters)."""
    import torch

    u = tok.cluster_embed
    q, k, v = tok.q(u), tok.k(x), tok.v(x)
    scores = torch.einsum("cw,bkw->bck", q, k) / math.sqrt(tok.width)
    member = cluster[:, None, :] == torch.arange(tok.n_clusters, device=x.device)[None, :, None]
    a = torch.softmax(scores.masked_fill(~member, -float("inf")), dim=-1)
    a = a.masked_fill(~member.any(-1, keepdim=True), 0.0)  # empty clusters: no message
    h = torch.matmul(a, v) + tok.skip(u)
    return tok.norm(torch.relu(h))


def _child_tokenizer(args, dev) -> dict:
    import numpy as np
    import torch

    from brainenc.models.brainit import BrainTokenizer

    tok = BrainTokenizer(args.width, args.clusters).to(dev)
    fn = tok if args.impl == "ours" else (lambda x, c: _dense_tokenizer(tok, x, c))
    r = torch.randn(args.width, device=dev)

    def call(K):
        g = torch.Generator(device="cpu").manual_seed(K)
        x = torch.randn(args.tok_batch, K, args.width, generator=g).to(dev).requires_grad_(True)
        c = torch.randint(0, args.clusters, (args.tok_batch, K), generator=g).to(dev)
        return x, c

    def step(x, c):
        out = fn(x, c)
        (out @ r).sum().backward()
        return out

    step(*call(16))  # autograd start-up, kernels
    _sync(dev)
    base = _rss_mb()
    x, c = call(args.k)
    before = _rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        alloc0 = torch.cuda.memory_allocated()
    times = []
    for i in range(1 + args.reps):
        x.grad = None
        tok.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        step(x, c)
        _sync(dev)
        if i:  # the first call is the memory measurement
            times.append(time.perf_counter() - t0)
    out = {"kind": "tokenizer", "impl": args.impl, "K": args.k, "step_seconds": times,
           "median_s": float(np.median(times))}
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
        out.update(peak_mb=peak / 2**20, step_peak_mb=(peak - alloc0) / 2**20)
    else:
        peak = _rss_mb()
        out.update(peak_mb=peak - base, step_peak_mb=peak - before, rss_after_imports_mb=base)
    if args.impl == "ours" and args.k == args.check_k:  # agreement with the anchor on this K
        with torch.no_grad():
            ours, dense = tok(x, c), _dense_tokenizer(tok, x, c)
        out["max_abs_diff_vs_dense"] = float((ours - dense).abs().max())
    return out


def _child_bit(args, dev) -> dict:
    import numpy as np
    import torch

    from brainenc.config import from_dict
    from brainenc.models.brainit import BrainIT, BrainITArchitecture

    base = _rss_mb()
    arch = from_dict(BrainITArchitecture, {"width": args.width, "heads": args.heads, "n_self": args.n_self})
    counts = [args.voxels] * args.subjects
    model = BrainIT(arch, voxel_counts=counts, n_clusters=args.clusters, n_queries=args.queries,
                    out_dim=args.out_dim).to(dev).train()
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = sum(p.numel() for p in model.voxel_embed.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
    g = torch.Generator(device="cpu").manual_seed(0)
    labels = torch.randint(0, args.clusters, (args.subjects, args.voxels), generator=g).to(dev)
    amp = dev.type == "cuda"

    def batch():
        subject = torch.randint(0, args.subjects, (args.batch,), generator=g)
        voxel = torch.randint(0, args.voxels, (args.batch, args.k), generator=g)  # with replacement
        beta = torch.randn(args.batch, args.k, generator=g)
        target = torch.randn(args.batch, args.queries, args.out_dim, generator=g)
        subject, voxel, beta, target = (t.to(dev) for t in (subject, voxel, beta, target))
        return beta, subject, voxel, labels[subject[:, None], voxel], target

    def step():
        beta, subject, voxel, cluster, target = batch()
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
            pred = model(beta, subject, voxel, cluster)
        loss = ((pred.float() - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    _sync(dev)
    before = _rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        alloc0 = torch.cuda.memory_allocated()
    for _ in range(args.warmup):
        step()
    _sync(dev)
    times, losses = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step())
        _sync(dev)
        times.append(time.perf_counter() - t0)
    out = {"kind": "bit", "batch": args.batch, "n_params": n_params, "n_embedding_params": n_embed,
           "step_seconds": times,
           "median_step_s": float(np.median(times)), "samples_per_s": args.batch * args.steps / float(np.sum(times)),
           "losses": losses}
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
        out.update(peak_mb=peak / 2**20, step_peak_mb=(peak - alloc0) / 2**20)
    else:
        peak = _rss_mb()
        out.update(peak_mb=peak - base, step_peak_mb=peak - before, rss_after_imports_mb=base,
                   model_rss_mb=before - base)
    return out


def _child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    if args.child == "bit":
        args.batch = int(args.batch)
    res = _child_bit(args, dev) if args.child == "bit" else _child_tokenizer(args, dev)
    res["torch_threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(res), flush=True)


def _child_once(args, kind: str, extra: list[str], env_extra: dict) -> dict:
    keys = ("device", "threads", "width", "heads", "n_self", "clusters", "subjects", "voxels", "k", "batch",
            "queries", "out_dim", "steps", "warmup", "tok_batch", "reps", "check_k")
    cmd = [sys.executable, __file__, "--child", kind]
    for key in keys:
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    cmd += extra
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "BRAINENC_QUIET": "1", **env_extra,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        res = {"kind": kind, "args": extra, "error": proc.stderr[-2000:]}
    else:
        res = json.loads(line[len("RESULT "):])
    res["process_wall_s"] = round(time.perf_counter() - t0, 2)
    return res


def _run(args, kind: str, extra: list[str]) -> dict:
    """One configuration, twice: timings from a child with glibc's default allocator, memory from a
    child with :data:`MALLOC_ENV` (which keeps RSS on live bytes but slows small-K calls several-fold
    by mapping and unmapping every buffer). Both peaks are kept."""
    res = _child_once(args, kind, extra, {})
    if "error" not in res and args.device == "cpu":
        mem = _child_once(args, kind, extra, MALLOC_ENV)
        if "error" in mem:
            res["memory_run_error"] = mem["error"]
        else:
            for key in ("peak_mb", "step_peak_mb", "model_rss_mb"):
                if key in res:
                    res[key + "_default_malloc"] = res[key]
                    res[key] = mem[key]
            res["memory_run_median_s"] = mem.get("median_s", mem.get("median_step_s"))
            res["process_wall_s"] += mem["process_wall_s"]
    print(json.dumps({k: v for k, v in res.items() if k not in ("step_seconds", "losses")}), flush=True)
    return res


def _fit(ks, ys, unit: str = "mb") -> dict:
    """Least-squares line ``y = a + b K`` with R², and the growth ratio against K's."""
    import numpy as np

    ks, ys = np.asarray(ks, float), np.asarray(ys, float)
    slope, intercept = np.polyfit(ks, ys, 1)
    resid = ys - (intercept + slope * ks)
    r2 = 1.0 - float(resid @ resid) / float(((ys - ys.mean()) ** 2).sum())
    return {f"slope_{unit}_per_1000_voxels": 1000 * float(slope), f"intercept_{unit}": float(intercept), "r2": r2,
            "growth_ratio": float(ys[-1] / ys[0]), "k_ratio": float(ks[-1] / ks[0])}


def _machine(device: str, threads: int) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_brainmae import _machine as machine  # the shared machine-info fields of the other benches

    info = machine(device)
    info["bench_threads"] = threads
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="small sizes, one timed step/rep; no results file")
    p.add_argument("--parts", default="bit,tokenizer")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--n-self", type=int, default=5)
    p.add_argument("--clusters", type=int, default=128)
    p.add_argument("--subjects", type=int, default=8)
    p.add_argument("--voxels", type=int, default=40_000)
    p.add_argument("--k", type=int, default=15_000, help="voxels drawn per example (BIT step)")
    p.add_argument("--batch", default="2,4", help="BIT batch sizes (comma-separated; one child each)")
    p.add_argument("--queries", type=int, default=256)
    p.add_argument("--out-dim", type=int, default=1664)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--tok-batch", type=int, default=4)
    p.add_argument("--tok-ks", default="1000,2000,4000,8000,15000")
    p.add_argument("--tok-extra-clusters", type=int, default=512,
                   help="also run both tokenizers at the largest K with this many clusters (0: skip)")
    p.add_argument("--reps", type=int, default=3, help="timed tokenizer calls after the memory call")
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--impl", default="ours", help=argparse.SUPPRESS)
    p.add_argument("--check-k", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args)
        return
    if args.quick:
        args.voxels, args.k, args.steps, args.warmup, args.reps, args.batch = 2000, 1000, 1, 1, 1, "2"
        args.tok_ks, args.tok_extra_clusters = "500,1000", 256
    ks = [int(k) for k in args.tok_ks.split(",")]
    args.check_k = ks[0]
    parts = args.parts.split(",")
    t_start = time.perf_counter()
    bit = [_run(argparse.Namespace(**{**vars(args), "batch": int(bs)}), "bit", [])
           for bs in str(args.batch).split(",")] if "bit" in parts else []
    tok = {"ours": [], "dense": []}
    if "tokenizer" in parts:
        for K in ks:
            for impl in ("ours", "dense"):
                extra = ["--impl", impl]
                kargs = argparse.Namespace(**{**vars(args), "k": K})
                tok[impl].append(_run(kargs, "tokenizer", extra))
    tok_clusters = []
    if "tokenizer" in parts and args.tok_extra_clusters:
        for impl in ("ours", "dense"):
            kargs = argparse.Namespace(**{**vars(args), "k": ks[-1], "clusters": args.tok_extra_clusters})
            tok_clusters.append({**_run(kargs, "tokenizer", ["--impl", impl]), "clusters": args.tok_extra_clusters})
    summary = {}
    ok = {impl: [r for r in rows if "peak_mb" in r] for impl, rows in tok.items()}
    if len(ok["ours"]) == len(ks) >= 2:
        summary["ours_memory_fit"] = _fit(ks, [r["peak_mb"] for r in ok["ours"]])
        summary["ours_step_memory_fit"] = _fit(ks, [r["step_peak_mb"] for r in ok["ours"]])
        summary["ours_time_fit_s"] = _fit(ks, [r["median_s"] for r in ok["ours"]], "s")
        per = summary["ours_step_memory_fit"]["slope_mb_per_1000_voxels"] * 2**20 / 1000 / args.tok_batch
        summary["ours_step_bytes_per_voxel_token"] = per
        summary["ours_step_width_vectors_per_voxel_token"] = per / (4 * args.width)  # float32 [width] rows
    if len(ok["dense"]) == len(ks) >= 2:
        summary["dense_memory_fit"] = _fit(ks, [r["peak_mb"] for r in ok["dense"]])
        summary["dense_step_memory_fit"] = _fit(ks, [r["step_peak_mb"] for r in ok["dense"]])
        summary["dense_time_fit_s"] = _fit(ks, [r["median_s"] for r in ok["dense"]], "s")
    if ok["ours"] and len(ok["ours"]) == len(ok["dense"]):
        summary["dense_over_ours"] = [
            {"K": o["K"], "memory": d["peak_mb"] / o["peak_mb"], "step_memory": d["step_peak_mb"] / o["step_peak_mb"],
             "time": d["median_s"] / o["median_s"]} for o, d in zip(ok["ours"], ok["dense"])]
    if len(tok_clusters) == 2 and all("peak_mb" in r for r in tok_clusters) and ok["ours"] and ok["dense"]:
        o, d = tok_clusters
        summary["clusters_effect_at_max_K"] = {
            "clusters": [args.clusters, args.tok_extra_clusters],
            "ours_step_peak_mb": [ok["ours"][-1]["step_peak_mb"], o["step_peak_mb"]],
            "dense_step_peak_mb": [ok["dense"][-1]["step_peak_mb"], d["step_peak_mb"]],
            "ours_median_s": [ok["ours"][-1]["median_s"], o["median_s"]],
            "dense_median_s": [ok["dense"][-1]["median_s"], d["median_s"]]}
    payload = {
        "benchmark": "brainit",
        "config": {"device": args.device, "threads": args.threads, "quick": args.quick, "child_env": MALLOC_ENV,
                   "dtype": "bf16 autocast" if args.device == "cuda" else "float32",
                   "bit": {"subjects": args.subjects, "voxels_per_subject": args.voxels, "voxels_per_example": args.k,
                           "sampling": "uniform with replacement", "clusters": args.clusters, "width": args.width,
                           "heads": args.heads, "n_self": args.n_self, "cross_blocks": args.n_self + 1,
                           "mlp_ratio": 4.0, "queries": args.queries, "out_dim": args.out_dim, "loss": "mse",
                           "optimizer": "AdamW lr 5e-4 wd 0.05", "batch": [int(x) for x in str(args.batch).split(",")],
                           "warmup_steps": args.warmup,
                           "timed_steps": args.steps},
                   "tokenizer": {"batch": args.tok_batch, "width": args.width, "clusters": args.clusters, "K": ks,
                                 "timed_reps": args.reps, "mode": "forward + backward (input requires grad)"}},
        "measures": "timings from a child with the default allocator, memory from a second child with "
                    "MALLOC_MMAP_THRESHOLD_=65536 (CPU); BIT: samples/s over timed forward+MSE+backward+AdamW steps; tokenizer: median seconds of "
                    "forward+backward calls; memory: CPU ru_maxrss of a fresh child minus its value after imports "
                    "(peak_mb) and minus its value just before the first full step (step_peak_mb); CUDA "
                    "max_memory_allocated",
        "machine": _machine(args.device, args.threads),
        "results": {"bit": bit, "tokenizer": tok, "tokenizer_more_clusters": tok_clusters},
        "summary": summary,
        "total_wall_s": round(time.perf_counter() - t_start, 1),
        "command": " ".join([Path(sys.executable).name, "kernels/bench/bench_brainit.py"] + sys.argv[1:]),
    }
    print(json.dumps(summary, indent=1))
    if args.quick and args.out is None:
        return
    out = Path(args.out) if args.out else ROOT / "kernels" / "results" / f"brainit_{args.device}.json"
    sys.path.insert(0, str(ROOT))
    from brainenc._utils.io import write_json

    write_json(out, payload)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
