"""Benchmark: classical connectome baselines on an ADHD-200-sized simulated cohort (CPU).

Cohort (generated here with numpy, independent of the other brainenc modules): 950 subjects x
400 ROIs x 200 TRs, float32. Each subject's ROIs belong to 8 blocks ("networks") that share a
latent time course (block-structured covariance, per-subject loading jitter) plus unit noise;
label-1 subjects (half) get one extra latent time course added, with a small amplitude, to 10 ROIs
of block 0 and 10 of block 1 (a planted group difference in within- and between-network coupling).

Timed per baseline, each in a fresh subprocess (peak RSS = ``ru_maxrss`` of that child via
``os.wait4``; it includes the loaded cohort, ~0.3 GiB, and the imported libraries):

* ``dey_pca_lda``        network features (density 0.1: degree, triangles, clustering) -> PCA -> LDA
* ``fc_logreg``          correlation -> standardise -> logistic regression
* ``fc_logreg_tangent``  tangent space (group mean fitted in-fold) -> logistic regression
* ``fc_svm_partial``     partial correlation -> linear SVM

``features_s``: the feature step's ``fit_transform`` on all subjects once. ``cv_s``: 5-fold
stratified :func:`brainenc.pretraining.evaluation.cross_validate` (features recomputed in every
fold, as the pipeline does). Plus sparse vs dense triangle counting at 400 ROIs and at a
voxel-level size (5000 nodes, density 0.01).

CPU (what the recorded JSON comes from; run under the shared lock on the 2-core machine)::

    flock /tmp/brainenc-bench.lock .venv/bin/python kernels/bench/bench_network_baselines.py
    .venv/bin/python kernels/bench/bench_network_baselines.py --quick      # 100 x 100 x 100 smoke run

Writes ``kernels/results/network_baselines_cpu.json`` (``--quick``: ``$TMPDIR/network_baselines_quick.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
BENCH = Path(__file__).resolve().parent

BASELINE_SPECS = {
    "dey_pca_lda": ("dey_pca_lda", {"density": 0.1}),
    "fc_logreg": ("fc_logreg", {"kind": "correlation"}),
    "fc_logreg_tangent": ("fc_logreg", {"kind": "tangent"}),
    "fc_svm_partial": ("fc_svm", {"kind": "partial correlation"}),
}


# ------------------------------------------------------------------------------------ data


def make_cohort(n_subjects: int, n_rois: int, n_timepoints: int, *, n_blocks: int = 8, effect: float = 0.35,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """[N, T, R] float32 series with block structure and a planted label effect; labels [N]."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n_subjects) % 2)
    block = (np.arange(n_rois) * n_blocks) // n_rois
    m = max(2, min(10, n_rois // n_blocks // 2))
    planted = np.concatenate([np.flatnonzero(block == 0)[:m], np.flatnonzero(block == 1)[:m]])
    X = np.empty((n_subjects, n_timepoints, n_rois), dtype=np.float32)
    for i in range(n_subjects):
        f = rng.standard_normal((n_timepoints, n_blocks))
        lam = 0.6 + 0.1 * rng.standard_normal(n_rois)
        x = f[:, block] * lam + rng.standard_normal((n_timepoints, n_rois))
        if y[i]:
            x[:, planted] += effect * rng.standard_normal((n_timepoints, 1))
        X[i] = x
    info = {"n_blocks": n_blocks, "block_loading": "0.6 + 0.1 N(0,1) per subject and ROI", "noise_sd": 1.0,
            "planted_rois": planted.tolist(), "planted_amplitude": effect, "label_balance": float(y.mean()),
            "seed": seed}
    return X, y, info


# ------------------------------------------------------------------------------------ workers


def _limit_threads(n: int):
    from threadpoolctl import threadpool_limits

    threadpool_limits(n)


def _cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def worker_baseline(spec: str, data: Path, n_folds: int, max_folds: int | None, threads: int) -> dict:
    _limit_threads(threads)
    from sklearn.base import clone

    from brainenc.pretraining.baselines import make_baseline
    from brainenc.pretraining.evaluation import cross_validate, make_folds

    arr = np.load(data / "X.npy")
    y = np.load(data / "y.npy")
    X = list(arr)  # subject views [T, R]
    name, params = BASELINE_SPECS[spec]
    pipe = make_baseline(name, **params)
    feats = clone(pipe.steps[0][1])
    t0, c0 = time.perf_counter(), _cpu_s()
    F = feats.fit_transform(X)
    features_s, features_cpu = time.perf_counter() - t0, _cpu_s() - c0
    n_features = int(F.shape[1])
    del F
    folds = make_folds(y, scheme="stratified", n_splits=n_folds, seed=0)
    run = folds if not max_folds else folds[:max_folds]
    t0, c0 = time.perf_counter(), _cpu_s()
    res = cross_validate(pipe, X, y, run, progress=False)
    cv_s, cv_cpu = time.perf_counter() - t0, _cpu_s() - c0
    summ = res.summary()
    out = {"baseline": name, "params": params, "n_features": n_features,
           "features_s": round(features_s, 2), "features_cpu_s": round(features_cpu, 2),
           "cv_s": round(cv_s, 2), "cv_cpu_s": round(cv_cpu, 2), "folds_run": len(run), "n_folds": n_folds,
           "fold_fit_s": [round(s, 2) for s in res.fit_seconds],
           "fold_predict_s": [round(s, 2) for s in res.predict_seconds],
           "cv_accuracy_mean": summ["accuracy"]["mean"], "cv_accuracy_std": summ["accuracy"]["std"],
           "cv_balanced_accuracy_mean": summ["balanced_accuracy"]["mean"],
           "cv_auroc_mean": summ["auroc"]["mean"], "pooled": res.pooled}
    if len(run) < n_folds:
        out["cv_s_extrapolated_all_folds"] = round(cv_s * n_folds / len(run), 1)
    return out


def worker_triangles(n_subjects: int, n_rois: int, n_timepoints: int, density: float, dense: bool,
                     threads: int) -> dict:
    _limit_threads(threads)
    from brainenc.pretraining.baselines import correlation_matrices, node_features, threshold_networks

    X, _, _ = make_cohort(n_subjects, n_rois, n_timepoints, seed=1)
    t0 = time.perf_counter()
    fc = correlation_matrices(list(X))
    corr_s = time.perf_counter() - t0
    del X
    t0 = time.perf_counter()
    adj = threshold_networks(fc, density=density)
    thr_s = time.perf_counter() - t0
    del fc
    t0 = time.perf_counter()
    sp = node_features(adj, features=("triangles",), sparse=True)["triangles"]
    sparse_s = time.perf_counter() - t0
    out = {"n_subjects": n_subjects, "n_nodes": n_rois, "n_timepoints": n_timepoints, "density": density,
           "mean_degree": float(adj.sum(2).mean()), "correlation_s": round(corr_s, 3),
           "threshold_s": round(thr_s, 3), "triangles_sparse_s": round(sparse_s, 3),
           "triangles_sparse_s_per_subject": round(sparse_s / n_subjects, 4)}
    if dense:
        t0 = time.perf_counter()
        de = node_features(adj, features=("triangles",), sparse=False)["triangles"]
        dense_s = time.perf_counter() - t0
        out.update(triangles_dense_s=round(dense_s, 3), triangles_dense_s_per_subject=round(dense_s / n_subjects, 4),
                   sparse_speedup=round(dense_s / sparse_s, 2), sparse_equals_dense=bool(np.array_equal(sp, de)))
    return out


# ------------------------------------------------------------------------------------ parent


def _child(args_list: list[str], threads: int) -> dict:
    """Run this script as a worker in a fresh process; return its RESULT plus wall time and peak RSS."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["BRAINENC_QUIET"] = "1"
    cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(threads)] + args_list
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env, text=True)
        _, status, rusage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        code = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read(), fe.read()
    if code != 0:
        raise RuntimeError(f"worker {args_list} failed (exit {code}):\n{err[-3000:]}")
    line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    res["process_wall_s"] = round(wall, 2)
    res["peak_rss_gib"] = round(rusage.ru_maxrss / 2**20, 3)  # Linux: KiB
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=950)
    ap.add_argument("--rois", type=int, default=400)
    ap.add_argument("--timepoints", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="100 subjects x 100 ROIs x 100 TRs smoke run")
    ap.add_argument("--effect", type=float, default=0.35, help="amplitude of the planted label-1 component")
    ap.add_argument("--n-folds", type=int, default=5)
    ap.add_argument("--max-folds", default="fc_logreg_tangent=2",
                    help="comma list baseline=k: run only the first k folds of that baseline (time extrapolated)")
    ap.add_argument("--baselines", default=",".join(BASELINE_SPECS))
    ap.add_argument("--voxel-nodes", type=int, default=5000)
    ap.add_argument("--voxel-subjects", type=int, default=2)
    ap.add_argument("--voxel-density", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tri", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    max_folds = {k: int(v) for k, v in (kv.split("=") for kv in args.max_folds.split(",") if kv)}

    if args.worker == "triangles":
        n, r, t, dens, dense = args.tri.split(",")
        res = worker_triangles(int(n), int(r), int(t), float(dens), dense == "1", args.threads)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    if args.worker:
        res = worker_baseline(args.worker, Path(args.data), args.n_folds, max_folds.get(args.worker), args.threads)
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    if args.quick:
        args.subjects, args.rois, args.timepoints = 100, 100, 100
        args.voxel_nodes, args.voxel_subjects = 1000, 2
    out_path = Path(args.out) if args.out else (
        Path(tempfile.gettempdir()) / "network_baselines_quick.json" if args.quick
        else ROOT / "kernels" / "results" / "network_baselines_cpu.json")
    results, triangles = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench_netbase_") as tmp:
        data = Path(tmp)
        t0 = time.perf_counter()
        X, y, data_info = make_cohort(args.subjects, args.rois, args.timepoints, effect=args.effect)
        np.save(data / "X.npy", X)
        np.save(data / "y.npy", y)
        del X
        print(f"cohort {args.subjects}x{args.timepoints}x{args.rois} generated in {time.perf_counter() - t0:.1f}s",
              flush=True)
        for spec in args.baselines.split(","):
            print(f"running {spec} ...", flush=True)
            results[spec] = _child(["--worker", spec, "--data", str(data), "--n-folds", str(args.n_folds),
                                    "--max-folds", args.max_folds], args.threads)
            r = results[spec]
            print(f"  {spec}: features {r['features_s']} s, CV({r['folds_run']}/{r['n_folds']} folds) {r['cv_s']} s, "
                  f"acc {r['cv_accuracy_mean']:.3f}, AUROC {r['cv_auroc_mean']:.3f}, peak RSS {r['peak_rss_gib']} GiB",
                  flush=True)
    for label, (n, r, dens, dense) in {
        "roi_level": (min(args.subjects, 100), args.rois, 0.1, True),
        "voxel_level": (args.voxel_subjects, args.voxel_nodes, args.voxel_density, True),
    }.items():
        print(f"triangles {label} ({n} subjects x {r} nodes, density {dens}) ...", flush=True)
        triangles[label] = _child(["--worker", "triangles", "--tri", f"{n},{r},{args.timepoints},{dens},{int(dense)}"],
                                  args.threads)
        print(f"  {triangles[label]}", flush=True)

    sys.path.insert(0, str(BENCH))
    from bench_ridge import machine_info  # noqa: E402

    record = {
        "benchmark": "network_baselines",
        "command": " ".join([".venv/bin/python", "kernels/bench/bench_network_baselines.py"] + list(argv or sys.argv[1:])),
        "problem": {"n_subjects": args.subjects, "n_rois": args.rois, "n_timepoints": args.timepoints,
                    "dtype": "float32", "cv": f"StratifiedKFold({args.n_folds}, shuffle, seed 0)",
                    "threads": args.threads, **data_info},
        "notes": {
            "features_s": "feature step fit_transform on all subjects once (wall); *_cpu_s: user+sys CPU seconds",
            "cv_s": "cross_validate over the folds run (features recomputed per fold, as the pipeline does); "
                    "cv_s_extrapolated_all_folds = cv_s * n_folds / folds_run when fewer folds were run",
            "peak_rss_gib": "ru_maxrss of the worker process (includes the cohort array, ~0.3 GiB at full size, and "
                            "the imported libraries: importing brainenc.pretraining imports torch, ~0.7 GiB)",
            "chance": "labels balanced: chance accuracy 0.5",
            **({"fc_logreg_tangent": "not run in this record: at 950 x 400 on the shared 2-core machine nilearn's "
                                     "tangent feature step (geometric mean of 950 covariances) alone ran > 12 min "
                                     "(killed); run it with --baselines fc_logreg_tangent --max-folds "
                                     "fc_logreg_tangent=1 on a quieter machine"}
               if "fc_logreg_tangent" not in results else {}),
        },
        "results": results,
        "triangles": triangles,
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    sys.path.insert(0, str(ROOT))
    from brainenc._utils.io import write_json

    write_json(out_path, record)
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
