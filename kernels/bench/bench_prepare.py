"""Benchmark: time and peak memory of ``brainenc prepare`` on a full-size-shaped subject.

Writes a fake subj01 in the NSD layout with the real shapes of one subject (func1pt8mm grid
81 x 104 x 83, nsdgeneral = 15724 voxels, int16 NIfTI ``betas_sessionNN.nii.gz`` (X, Y, Z, 750), zeros
outside an ellipsoid brainmask, a full-size ``nsd_expdesign.mat``), but only ``--sessions`` sessions
(declared through ``brainenc_simulated.json``); each session shows 250 images 3 times. Then, each in a fresh subprocess whose peak RSS is read
from ``os.wait4`` (``ru_maxrss``):

- ``prepare_subject`` with ``n_sessions`` = 1 .. ``--sessions`` (default choices: nsdgeneral, per-session
  z-score, averaged repeats, shared1000; ncsnr computed from the betas, the costlier path), and the
  second (cache-hit) call;
- the anchor: the usual notebook loader for one session (``np.asarray(nib.load(p).dataobj)`` then mask,
  as brain-diffuser/MindEye2 do per session), for the per-session memory it needs.

The per-session cost is the least-squares slope of wall time over the session counts; a 40-session
estimate is ``intercept + 40 * slope`` (an extrapolation, stated as such in the JSON). Peak RSS does
not grow with sessions by design (one session in memory at a time) — the JSON shows it per count.

Run (the 2-core machine is shared: hold the lock)::

    flock /tmp/brainenc-bench.lock .venv/bin/python kernels/bench/bench_prepare.py

Writes ``kernels/results/prepare_cpu.json``. The fake layout (~0.5 GB per session) is written to a
temporary folder and removed unless ``--keep``.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
GRID = (81, 104, 83)
N_NSDGENERAL = 15724
TPS = 750
GLM = "betas_fithrf_GLMdenoise_RR"


def _write_nifti_stream(path: Path, brain: np.ndarray, rng, session: int) -> None:
    """int16 (X, Y, Z, 750) NIfTI-1 written trial by trial into a gzip stream (bounded memory)."""
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.int16)
    hdr.set_data_shape(GRID + (TPS,))
    hdr.set_zooms((1.8, 1.8, 1.8, 4 / 3))
    hdr.set_xyzt_units("mm", "sec")
    aff = np.diag([1.8, 1.8, 1.8, 1.0])
    aff[:3, 3] = -((np.asarray(GRID) + 1) / 2 - 1) * 1.8
    hdr.set_qform(aff, code=1)
    hdr.set_sform(aff, code=1)
    hdr["vox_offset"] = 352
    n_in = int(brain.sum())
    flat_brain = brain.ravel(order="F")
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb", compresslevel=1) as fh:
        fh.write(hdr.binaryblock)
        fh.write(b"\x00" * (352 - len(hdr.binaryblock)))
        vol = np.zeros(flat_brain.size, dtype="<i2")
        for _ in range(TPS):
            vol[flat_brain] = (rng.standard_normal(n_in) * 300 * 1.5 + 300 * session).astype("<i2")
            fh.write(vol.tobytes())


def write_layout(root: Path, n_sessions: int, seed: int = 0) -> dict:
    import nibabel as nib
    import scipy.io

    rng = np.random.default_rng(seed)
    # each session shows 250 slots 3 times (as the simulator does), so every trial belongs to a 3-repeat
    # image whatever the number of sessions: the ncsnr pass costs per session what it costs at 40 sessions
    slots = rng.permutation(np.arange(1, 10001)).reshape(40, 250)
    mo = np.concatenate([rng.permutation(np.repeat(b, 3)) for b in slots])[None, :].astype(np.float64)
    ids = rng.permutation(np.arange(1, 73001))
    subjectim = np.zeros((8, 10000))
    sharedix = np.sort(ids[:1000])
    subjectim[:, :1000] = sharedix
    for s in range(8):
        subjectim[s, 1000:] = rng.choice(ids[1000:], 9000, replace=False)
    exp = root / "nsddata" / "experiments" / "nsd" / "nsd_expdesign.mat"
    exp.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(exp, {"masterordering": mo, "subjectim": subjectim, "sharedix": sharedix[None, :].astype(float),
                           "stimpattern": np.zeros((40, 12, 75)), "basiccnt": np.zeros((3, 40))})
    (root / "brainenc_simulated.json").write_text(json.dumps({"subjects": {"subj01": {"n_sessions": n_sessions}}}))
    ii, jj, kk = np.meshgrid(*(np.arange(n) for n in GRID), indexing="ij")
    c = (np.asarray(GRID) - 1) / 2
    r2 = ((ii - c[0]) / (GRID[0] / 2)) ** 2 + ((jj - c[1]) / (GRID[1] / 2)) ** 2 + ((kk - c[2]) / (GRID[2] / 2)) ** 2
    brain = r2 < 0.9
    # nsdgeneral: the N_NSDGENERAL brain voxels closest to the back of the head (y = 0)
    order = np.argsort(np.where(brain, jj + 0.01 * r2, np.inf).ravel(), kind="stable")[:N_NSDGENERAL]
    nsdg = np.where(brain, 0, -1).astype(np.int16).ravel()
    nsdg[order] = 1
    nsdg = nsdg.reshape(GRID)
    pp = root / "nsddata" / "ppdata" / "subj01" / "func1pt8mm"
    (pp / "roi").mkdir(parents=True, exist_ok=True)
    aff = np.diag([1.8, 1.8, 1.8, 1.0])
    nib.save(nib.Nifti1Image(nsdg, aff), str(pp / "roi" / "nsdgeneral.nii.gz"))
    nib.save(nib.Nifti1Image(brain.astype(np.int16), aff), str(pp / "brainmask.nii.gz"))
    bdir = root / "nsddata_betas" / "ppdata" / "subj01" / "func1pt8mm" / GLM
    t0 = time.perf_counter()
    for s in range(1, n_sessions + 1):
        _write_nifti_stream(bdir / f"betas_session{s:02d}.nii.gz", brain, rng, s)
    return {"brain_voxels": int(brain.sum()), "nsdgeneral_voxels": int((nsdg > 0).sum()),
            "write_s": time.perf_counter() - t0,
            "session_file_bytes": (bdir / "betas_session01.nii.gz").stat().st_size}


CHILD_PREPARE = r"""
import json, sys, time
from brainenc.datasets.prepare import PrepareConfig, prepare_subject
root, cache, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
t0 = time.perf_counter()
ds = prepare_subject(root, PrepareConfig(n_sessions=n, ncsnr="compute"), cache_root=cache)
print(json.dumps({"wall_s": time.perf_counter() - t0, "cache_hit": ds.cache_hit, "n_samples": ds.n_samples,
                  "n_voxels": ds.n_voxels}))
"""

CHILD_ANCHOR = r"""
import json, sys, time
import nibabel as nib, numpy as np
root = sys.argv[1]
t0 = time.perf_counter()
mask = np.asarray(nib.load(root + "/nsddata/ppdata/subj01/func1pt8mm/roi/nsdgeneral.nii.gz").dataobj) > 0
beta = np.asarray(nib.load(root + "/nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_session01.nii.gz").dataobj)
x = beta[mask].T.astype(np.float32) / 300
print(json.dumps({"wall_s": time.perf_counter() - t0, "shape": list(x.shape)}))
"""


def run_child(code: str, *args: str) -> dict:
    env = dict(os.environ, BRAINENC_QUIET="1", BRAINENC_LOGLEVEL="WARNING", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, text=True)
    t0 = time.perf_counter()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out, err = proc.stdout.read(), proc.stderr.read()
    if status != 0:
        raise RuntimeError(f"child failed ({status}): {err[-2000:]}")
    res = json.loads(out.strip().splitlines()[-1])
    res.update({"process_wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024.0})
    return res


def machine_info() -> dict:
    import nibabel
    import psutil

    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "processor": platform.processor(), "mem_total_gb": psutil.virtual_memory().total / 2**30,
            "numpy": np.__version__, "nibabel": nibabel.__version__,
            "load_avg_at_start": list(os.getloadavg())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=4, help="sessions written (default 4)")
    ap.add_argument("--workdir", default=None, help="where to write the fake layout (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the fake layout")
    ap.add_argument("--out", default=str(ROOT / "kernels" / "results" / "prepare_cpu.json"))
    args = ap.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="brainenc-bench-prepare-"))
    root, cache = work / "nsd", work / "prepared"
    info = machine_info()
    try:
        layout_info = write_layout(root, args.sessions)
        print(f"wrote {args.sessions} sessions in {layout_info['write_s']:.1f} s "
              f"({layout_info['session_file_bytes'] / 2**20:.0f} MiB each)", flush=True)
        anchor = run_child(CHILD_ANCHOR, str(root))
        print(f"anchor (1 session, dataobj + mask): {anchor['wall_s']:.1f} s, {anchor['peak_rss_mb']:.0f} MB", flush=True)
        runs = []
        for n in range(1, args.sessions + 1):
            r = run_child(CHILD_PREPARE, str(root), str(cache), str(n))
            r["n_sessions"] = n
            runs.append(r)
            print(f"prepare {n} session(s): {r['wall_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        hit = run_child(CHILD_PREPARE, str(root), str(cache), str(args.sessions))
        print(f"cache hit: {hit['wall_s']:.2f} s (cache_hit={hit['cache_hit']})", flush=True)
        ns = np.array([r["n_sessions"] for r in runs], float)
        ts = np.array([r["wall_s"] for r in runs])
        slope, intercept = np.polyfit(ns, ts, 1) if ns.size > 1 else (ts[0], 0.0)
        result = {
            "benchmark": "prepare",
            "command": "flock /tmp/brainenc-bench.lock .venv/bin/python kernels/bench/bench_prepare.py"
                       + (f" --sessions {args.sessions}" if args.sessions != 4 else ""),
            "machine": info,
            "layout": {"grid": GRID, "trials_per_session": TPS, "format": "nifti (int16, gzip level 1)",
                       "sessions_written": args.sessions, **layout_info},
            "choices": {"mask": "nsdgeneral", "zscore": True, "repeats": "average", "split": "shared1000",
                        "ncsnr": "compute"},
            "anchor_one_session": anchor,
            "prepare_runs": runs,
            "cache_hit": hit,
            "per_session_s": float(slope),
            "fixed_s": float(intercept),
            "extrapolated_40_sessions_s": float(intercept + 40 * slope),
            "extrapolation_note": "40-session time = fixed + 40 x per-session slope fitted over 1..N sessions; "
                                  "not measured. Peak RSS is per run (one session in memory at a time). "
                                  "Temporary disk at 40 sessions: 30000 x 15724 float32 single-trial file = 1.9 GB.",
            "peak_rss_mb_max": max(r["peak_rss_mb"] for r in runs),
            "load_avg_at_end": list(os.getloadavg()),
        }
        out = Path(args.out)
        sys.path.insert(0, str(ROOT))
        from brainenc._utils.io import write_json

        write_json(out, result)
        print(f"per session {slope:.2f} s; 40 sessions ~ {intercept + 40 * slope:.0f} s (extrapolated); "
              f"peak RSS {result['peak_rss_mb_max']:.0f} MB -> {out}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
