"""Benchmark: brainenc RidgeEncoder vs himalaya RidgeCV vs scikit-learn RidgeCV, same data, same run.

Problem (issue 4): n_train=8000, n_test=1000, n_features=1024, n_voxels=20000, 8 alphas, 5 folds
(KFold without shuffling, identical for brainenc and himalaya), float32, 2 threads, fit_intercept=True.
scikit-learn's ``RidgeCV(alpha_per_target=True)`` only supports ``cv=None`` (efficient
leave-one-out / GCV), so it is timed in that mode — a different (cheaper per alpha) selection rule.

Each solver runs in a fresh subprocess that loads the same ``.npy`` files; the parent measures the
child's wall time of ``fit`` (reported by the child) and its peak RSS (``os.wait4`` rusage
``ru_maxrss`` of that child). Test R² per voxel of every solver is compared.

CPU (what the recorded JSON comes from; run under the shared lock on the 2-core machine)::

    flock /tmp/brainenc-bench.lock .venv/bin/python kernels/bench/bench_ridge.py

GPU mode (H100 class; whole-brain-sized problem n_voxels=40000, n_features=4096, brainenc torch
backend on CUDA vs himalaya ``torch_cuda``; scikit-learn is CPU-only and skipped)::

    .venv/bin/python kernels/bench/bench_ridge.py --device cuda

Writes ``kernels/results/ridge_cpu.json`` (or ``ridge_cuda.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------ data


def make_data(out: Path, n_train: int, n_test: int, n_features: int, n_voxels: int, seed: int = 0) -> dict:
    """Synthetic NSD-like data: low-rank features with a decaying spectrum, Y = X B + noise.

    X = G diag(s) Q with s_j = j^-0.75 (effective rank ~ a few hundred, like PCA'd CNN features)
    plus a per-feature offset; B is dense; per-voxel SNR ~ U(0, 1) so the R² spread resembles
    visual cortex (many near-zero voxels, a tail up to ~0.5); Y has a per-voxel offset.
    """
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    s = np.arange(1, n_features + 1, dtype=np.float64) ** -0.75
    q, _ = np.linalg.qr(rng.standard_normal((n_features, n_features)))
    X = (rng.standard_normal((n, n_features)) * s) @ q.T
    X = (X / X.std(0) + rng.standard_normal(n_features)).astype(np.float32)
    snr = rng.uniform(0.0, 1.0, n_voxels)
    Y = np.empty((n, n_voxels), dtype=np.float32)
    Xq = (X.astype(np.float64) @ q).astype(np.float32)  # weights drawn in the rotated basis: X (q B) = (X q) B
    for a in range(0, n_voxels, 2000):
        b = min(a + 2000, n_voxels)
        B = (rng.standard_normal((n_features, b - a)) * (s[:, None] ** 0.5)).astype(np.float32)
        sig = (Xq @ B).astype(np.float64)
        sig /= sig.std(0)
        Y[:, a:b] = sig * np.sqrt(snr[a:b]) + rng.standard_normal((n, b - a)) + rng.standard_normal(b - a) * 3
    np.save(out / "X_train.npy", X[:n_train])
    np.save(out / "X_test.npy", X[n_train:])
    np.save(out / "Y_train.npy", Y[:n_train])
    np.save(out / "Y_test.npy", Y[n_train:])
    return {"feature_spectrum": "j^-0.75", "snr": "U(0,1) per voxel", "fit_intercept": True, "seed": seed}


# ------------------------------------------------------------------------------------ workers


def _limit_threads(n: int):
    from threadpoolctl import threadpool_limits

    threadpool_limits(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def _cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def worker(method: str, data: Path, alphas: np.ndarray, n_folds: int, threads: int, device: str, out: Path):
    from sklearn.model_selection import KFold

    X = np.load(data / "X_train.npy")
    Y = np.load(data / "Y_train.npy")
    Xt = np.load(data / "X_test.npy")
    Yt = np.load(data / "Y_test.npy")
    cv = KFold(n_folds)  # contiguous folds, no shuffling, same for brainenc and himalaya
    sync = lambda: None  # noqa: E731
    if method.startswith("brainenc"):
        backend = method.split("-")[1]
        if backend == "torch":
            import torch  # noqa: F401

            if device == "cuda":
                sync = torch.cuda.synchronize
        _limit_threads(threads)
        from brainenc.encoding.ridge import RidgeEncoder

        # scoring="neg_mse" is himalaya's default selection rule (l2_neg_loss), so both pick the same alphas
        model = RidgeEncoder(alphas=alphas, cv=cv, fit_intercept=True, backend=backend, scoring="neg_mse",
                             device=device if backend == "torch" else "cpu", dtype="float32")
        t0, c0 = time.perf_counter(), _cpu_s()
        model.fit(X, Y)
        sync()
        fit_s, fit_cpu_s = time.perf_counter() - t0, _cpu_s() - c0
        pred = model.predict(Xt)
        best = model.best_alphas_
    elif method == "himalaya":
        import torch
        from himalaya.backend import get_backend, set_backend
        from himalaya.ridge import RidgeCV

        set_backend("torch_cuda" if device == "cuda" else "torch", on_error="raise")
        if device == "cuda":
            sync = torch.cuda.synchronize
        _limit_threads(threads)
        be = get_backend()
        model = RidgeCV(alphas=alphas.astype(np.float32), cv=cv, fit_intercept=True)
        t0, c0 = time.perf_counter(), _cpu_s()
        model.fit(X, Y)
        sync()
        fit_s, fit_cpu_s = time.perf_counter() - t0, _cpu_s() - c0
        pred = be.to_numpy(model.predict(Xt))
        best = be.to_numpy(model.best_alphas_)
    elif method == "sklearn":
        from sklearn.linear_model import RidgeCV

        _limit_threads(threads)
        # alpha_per_target=True requires cv=None (efficient LOO/GCV) in scikit-learn
        model = RidgeCV(alphas=alphas, alpha_per_target=True, fit_intercept=True, cv=None)
        t0, c0 = time.perf_counter(), _cpu_s()
        model.fit(X, Y)
        fit_s, fit_cpu_s = time.perf_counter() - t0, _cpu_s() - c0
        pred = model.predict(Xt)
        best = np.asarray(model.alpha_)
    else:
        raise SystemExit(f"unknown method {method!r}")
    from brainenc.metrics import r2_score

    r2 = np.asarray(r2_score(Yt, np.asarray(pred, dtype=np.float64)))
    np.save(out / f"{method}_r2.npy", r2)
    np.save(out / f"{method}_alphas.npy", np.asarray(best, dtype=np.float64))
    info = {"fit_s": fit_s, "fit_cpu_s": round(fit_cpu_s, 2), "loadavg_1min_after": round(os.getloadavg()[0], 2)}
    if device == "cuda":
        import torch

        info["gpu_peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print("RESULT " + json.dumps(info), flush=True)


# ------------------------------------------------------------------------------------ parent


def _peak_rss_child(method: str, args, data: Path) -> dict:
    """Run ``method`` in a child process; measure its own peak RSS with wait4 (ru_maxrss, KiB)."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(args.threads)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["BRAINENC_QUIET"] = "1"
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--data", str(data), "--threads",
           str(args.threads), "--device", args.device, "--n-alphas", str(args.n_alphas), "--n-folds",
           str(args.n_folds), "--alpha-min", str(args.alpha_min), "--alpha-max", str(args.alpha_max)]
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env, text=True)
        _, status, rusage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read(), fe.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{method} failed (exit {proc.returncode}):\n{err[-3000:]}")
    line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    res["process_wall_s"] = round(wall, 2)
    res["peak_rss_gib"] = round(rusage.ru_maxrss / 2**20, 3)  # Linux: KiB
    res["fit_s"] = round(res["fit_s"], 2)
    return res


def machine_info() -> dict:
    import scipy
    import sklearn

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "numpy": np.__version__, "scipy": scipy.__version__, "sklearn": sklearn.__version__}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        import himalaya

        info["himalaya"] = himalaya.__version__
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = sorted({f"{d.get('internal_api')} {d.get('version')}" for d in threadpool_info()})
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu"] = next(l.split(":", 1)[1].strip() for l in fh if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--n-train", type=int, default=8000)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--n-features", type=int, default=None, help="default 1024 (cpu) / 4096 (cuda)")
    ap.add_argument("--n-voxels", type=int, default=None, help="default 20000 (cpu) / 40000 (cuda)")
    ap.add_argument("--n-alphas", type=int, default=8)
    ap.add_argument("--alpha-min", type=float, default=-2.0, help="log10 of the smallest alpha")
    ap.add_argument("--alpha-max", type=float, default=5.0, help="log10 of the largest alpha")
    ap.add_argument("--n-folds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default=None, help="comma list; default brainenc-numpy,brainenc-torch,himalaya,sklearn (cpu)")
    ap.add_argument("--out", default=None, help="JSON path (default kernels/results/ridge_<device>.json)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    alphas = np.logspace(args.alpha_min, args.alpha_max, args.n_alphas)

    if args.worker:
        data = Path(args.data)
        worker(args.worker, data, alphas, args.n_folds, args.threads, args.device, data)
        return 0

    gpu = args.device == "cuda"
    n_features = args.n_features or (4096 if gpu else 1024)
    n_voxels = args.n_voxels or (40000 if gpu else 20000)
    methods = (args.methods.split(",") if args.methods else
               (["brainenc-torch", "himalaya"] if gpu else ["brainenc-numpy", "brainenc-torch", "himalaya", "sklearn"]))
    out_path = Path(args.out) if args.out else ROOT / "kernels" / "results" / f"ridge_{args.device}.json"
    with tempfile.TemporaryDirectory(prefix="bench_ridge_") as tmp:
        data = Path(tmp)
        t0 = time.perf_counter()
        data_info = make_data(data, args.n_train, args.n_test, n_features, n_voxels)
        print(f"data generated in {time.perf_counter() - t0:.1f}s", flush=True)
        results = {}
        for m in methods:
            print(f"running {m} ...", flush=True)
            results[m] = _peak_rss_child(m, args, data)
            r2 = np.load(data / f"{m}_r2.npy")
            a = np.load(data / f"{m}_alphas.npy")
            results[m].update(test_r2_mean=float(r2.mean()), test_r2_median=float(np.median(r2)))
            results[m]["_r2"], results[m]["_alphas"] = r2, a
            print(f"  {m}: fit {results[m]['fit_s']} s, peak RSS {results[m]['peak_rss_gib']} GiB, "
                  f"test R2 mean {r2.mean():.5f}", flush=True)
    ours = "brainenc-torch" if gpu else "brainenc-numpy"
    comparisons = {}
    for m in methods:
        if m == ours or ours not in results:
            continue
        d = np.abs(results[ours]["_r2"] - results[m]["_r2"])
        comparisons[f"{ours}_vs_{m}"] = {
            "speedup_fit": round(results[m]["fit_s"] / results[ours]["fit_s"], 2),
            "speedup_fit_cpu_time": round(results[m]["fit_cpu_s"] / results[ours]["fit_cpu_s"], 2),
            "rss_ratio": round(results[ours]["peak_rss_gib"] / results[m]["peak_rss_gib"], 3),
            "test_r2_mean_abs_diff": float(abs(results[ours]["test_r2_mean"] - results[m]["test_r2_mean"])),
            "test_r2_voxel_max_abs_diff": float(d.max()),
            "frac_voxels_r2_within_1e-4": float((d <= 1e-4).mean()),
            "frac_same_alpha": float(np.isclose(results[ours]["_alphas"], results[m]["_alphas"], rtol=1e-4).mean()),
        }
    for m in results.values():
        m.pop("_r2")
        m.pop("_alphas")
    targets = {}
    if not gpu and "himalaya" in results and "sklearn" in results:
        ch = comparisons[f"{ours}_vs_himalaya"]
        cs = comparisons[f"{ours}_vs_sklearn"]
        targets = {
            ">=3x faster than himalaya": ch["speedup_fit"] >= 3.0,
            ">=1.3x faster than sklearn": cs["speedup_fit"] >= 1.3,
            "peak RSS <= 0.5 x sklearn": cs["rss_ratio"] <= 0.5,
            "test R2 (mean) equal to himalaya within 1e-4": ch["test_r2_mean_abs_diff"] <= 1e-4,
        }
    record = {
        "benchmark": "ridge",
        "command": "flock /tmp/brainenc-bench.lock .venv/bin/python kernels/bench/bench_ridge.py"
                   + (" --device cuda" if gpu else ""),
        "problem": {"n_train": args.n_train, "n_test": args.n_test, "n_features": n_features, "n_voxels": n_voxels,
                    "alphas": alphas.tolist(), "n_folds": args.n_folds, "cv": "KFold(5), no shuffle",
                    "dtype": "float32", "threads": args.threads, "device": args.device, **data_info},
        "notes": {
            "sklearn": "RidgeCV(alpha_per_target=True) only supports cv=None (efficient LOO/GCV), so it runs GCV, not 5-fold",
            "himalaya": "RidgeCV, backend 'torch' (CPU) or 'torch_cuda', same KFold, default batching",
            "fit_cpu_s": "user+sys CPU seconds of the child during fit() (all threads); less sensitive than wall time "
                         "to other jobs on a shared machine",
            "fit_s": "wall time of fit() inside the child; peak_rss_gib: ru_maxrss of the child (includes the loaded data, "
                     "~0.36 GiB, and imported libraries)",
        },
        "results": results,
        "comparisons": comparisons,
        "targets_met": targets,
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    sys.path.insert(0, str(ROOT))
    from brainenc._utils.io import write_json

    write_json(out_path, record)
    print(json.dumps({"comparisons": comparisons, "targets_met": targets}, indent=2))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
