"""SIGKILL at many points of ``brainenc simulate`` / ``prepare`` / ``run``, rerun, and get exactly
what an uninterrupted run writes.

The CLI runs in subprocesses on a tiny simulated subject. Kill points are deterministic: the
``BRAINENC_TEST_KILL_AT=<scope>:<event>:<n>`` hook (:func:`brainenc._utils.io.kill_point`) makes
the process SIGKILL itself at the n-th matching event: inside atomic writes (temporary written,
rename not done), inside the stimuli HDF5 write, at stage boundaries, between training epochs,
after the end.

One reference tree (simulate, prepare, run; uninterrupted, umask 022) is built in ``<tmp>/work``
and moved aside; then the same commands run in ``<tmp>/work`` again (so every absolute path is
the same), killed at each point in turn, each run resuming what the previous one left (umask 002).
After every kill: every file under a final (non-hidden) name either equals the reference file
(after removing the volatile JSON keys below) or is one of the few progress files a resumable
writer keeps under its own name, which must then be readable. After the last run: the same file
set as the reference, every file equal, no temporary or lock file left anywhere (run folder,
data root, NSD root), every file and folder with the mode the umask gives.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

#: the tiny spec of tests/workflows/conftest.py: ridge (2x2-pooled tokens) and routing (3 epochs)
SPEC_KW = {"fits": ("ridge", "routing"), "families": ("floc-faces",), "epochs": 3}


RUN_DIR = "data/runs/tiny/subj01"
NSD = "data/nsd"

#: JSON keys that may differ between a killed-and-resumed run and an uninterrupted one, removed
#: (at any depth) before comparing; everything else, and every non-JSON file, must be identical.
VOLATILE_KEYS = {
    f"{RUN_DIR}/stages/*.json": {
        "started",      # stage start time
        "seconds",      # stage / report durations
        "fit_seconds",  # fitter duration
        "cache_hit",    # provenance: whether this run found the shared cache entry already built
        "resumed",      # provenance: whether the routing fit restarted from a checkpoint
    },
    f"{RUN_DIR}/versions.json": {"written",  # time the file was written
                                 "git"},     # checkout state: other processes may commit meanwhile
    f"{RUN_DIR}/report/report.json": {"seconds"},
    f"{RUN_DIR}/models/*/config.json": {"seconds"},            # per-epoch durations in the history
    f"{RUN_DIR}/train/*/metrics.jsonl": {"seconds"},
    f"{RUN_DIR}/train/*/checkpoints/*/state.json": {"seconds"},
    "data/features/*/*/meta.json": {"seconds"},                # extraction duration
    "data/prepared/*/manifest.json": {"created",     # creation time
                                      "mtime_ns"},   # source files' mtimes (see PreparedKey)
}
#: not compared at all: the run log is appended by every run (a history with timestamps, not a result)
NOT_COMPARED = {f"{RUN_DIR}/logs/run.log"}
#: in index.md / index.html only the "Stages" table rows hold times: "finished <time>" and seconds
_STAGE_ROW = re.compile(r"(finished )\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d( \| |</td><td class='num'>)[0-9.]+")

#: files that a resumable writer keeps under their own name while it works (they legitimately
#: differ from the final state after a kill, and must be readable); only checked after kills
IN_PROGRESS = (
    f"{NSD}/brainenc_simulated.json",          # "complete": false until the simulation finishes
    "data/features/*/.*.partial/progress.json",  # rows flushed so far (in the entry's hidden work folder)
    "data/features/*/.*.partial/*.partial.npy",  # preallocated rows, filled batch by batch
    f"{RUN_DIR}/logs/run.log",                  # appended by every run
    f"{RUN_DIR}/train/*",                       # checkpoints, best-so-far weights, metrics so far
)


def _volatile(rel: str) -> set:
    return set().union(*[keys for pat, keys in VOLATILE_KEYS.items() if fnmatch.fnmatchcase(rel, pat)])


def _drop(obj, keys):
    if isinstance(obj, dict):
        return {k: _drop(v, keys) for k, v in obj.items() if k not in keys}
    if isinstance(obj, list):
        return [_drop(v, keys) for v in obj]
    return obj


def normalized(path: Path, rel: str) -> bytes:
    """File content with the volatile parts removed (see VOLATILE_KEYS, _STAGE_ROW)."""
    raw = path.read_bytes()
    keys = _volatile(rel)
    if keys and rel.endswith(".jsonl"):
        return "\n".join(json.dumps(_drop(json.loads(line), keys), sort_keys=True)
                         for line in raw.decode().splitlines()).encode()
    if keys:
        return json.dumps(_drop(json.loads(raw), keys), sort_keys=True).encode()
    if rel.endswith(("/index.md", "/index.html")):
        return _STAGE_ROW.sub(r"\1<time>\2<seconds>", raw.decode()).encode()
    return raw


class PreparedKey:
    """The prepared-dataset cache key hashes the source files' size and *mtime* (prepare.py keys
    without reading the betas), so the reference tree, simulated at another time, has another
    key, hence another prepared folder name. Both keys are found and the reference's replaced by
    this tree's (in paths and contents) before comparing; nothing else is mapped."""

    def __init__(self, ref: Path, work: Path):
        self.sub = {}
        names = [sorted(p.name for p in (r / "data" / "prepared").glob("subj01-*")) for r in (ref, work)]
        if names[0] and names[1]:
            (a,), (b,) = names  # exactly one prepared folder in each tree
            self.sub = {a.rsplit("-", 1)[1]: b.rsplit("-", 1)[1]}

    def __call__(self, data):
        for a, b in self.sub.items():
            data = data.replace(a, b) if isinstance(data, str) else data.replace(a.encode(), b.encode())
        return data


def _files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file() or p.is_symlink()}


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in Path(rel).parts)


def _readable(p: Path) -> None:
    if p.suffix in (".json",) or p.name == "latest.json":
        json.loads(p.read_text())
    elif p.suffix == ".jsonl":
        [json.loads(line) for line in p.read_text().splitlines()]
    elif p.suffix == ".npy":
        np.load(p, mmap_mode="r", allow_pickle=False)
    elif p.suffix == ".safetensors":
        from safetensors.numpy import load_file

        load_file(str(p))


def check_no_partial(work: Path, ref: Path, label: str) -> None:
    """Every file under a final name equals the reference, or is a readable progress file."""
    key = PreparedKey(ref, work)
    ref_files = {key(rel): p for rel, p in _files(ref).items()}
    for rel, p in _files(work).items():
        if _hidden(rel):
            continue  # temporaries, lock files, prepare's hidden build folder: not final names
        if any(fnmatch.fnmatchcase(rel, pat) for pat in IN_PROGRESS):
            _readable(p)
            continue
        assert rel in ref_files, f"after kill {label}: {rel} is not written by an uninterrupted run"
        assert normalized(p, rel) == key(normalized(ref_files[rel], rel)), \
            f"after kill {label}: {rel} differs from the uninterrupted run's (partial under its final name, or not reproducible)"


def check_modes(root: Path, umask: int) -> None:
    bad = []
    for p in [root, *root.rglob("*")]:
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        got = p.stat().st_mode & 0o777
        if got != want:
            bad.append(f"{p.relative_to(root.parent)}: {oct(got)} (want {oct(want)})")
    assert not bad, f"umask {oct(umask)} not respected:\n" + "\n".join(bad[:20])


class CLI:
    def __init__(self, work: Path, spec: Path, sim: dict):
        self.work, self.spec, self.sim = work, spec, sim

    def __call__(self, *args, kill: str | None = None, umask: int = 0o002, expect: int = 0):
        env = dict(os.environ, BRAINENC_DATA=str(self.work / "data"), BRAINENC_QUIET="1", OMP_NUM_THREADS="1",
                   MPLBACKEND="Agg", TRITON_INTERPRET="1")
        env.pop("BRAINENC_TEST_KILL_AT", None)
        if kill:
            env["BRAINENC_TEST_KILL_AT"] = kill
        cmd = [sys.executable, "-m", "brainenc.cli", *args]
        if args[0] == "run":
            cmd.insert(4, str(self.spec))
        elif args[0] == "simulate":
            cmd += [f"--set={k}={v}" for k, v in self.sim.items()]
        p = subprocess.run(cmd, env=env, cwd=self.work.parent, capture_output=True, text=True, timeout=300,
                           preexec_fn=lambda: os.umask(umask))
        if kill:
            assert p.returncode == -signal.SIGKILL, \
                f"kill point {kill} was never reached (exit {p.returncode}):\n{p.stderr[-3000:]}"
        else:
            assert p.returncode == expect, f"{' '.join(args)} exited {p.returncode}:\n{p.stderr[-3000:]}"
        return p


#: (command, kill point, a temporary the kill must leave behind (glob under <work>) or None)
KILLS = [
    # brainenc simulate: inside the stimuli HDF5 write, then inside a betas write
    ("simulate", "simulate:stimuli:40", f"{NSD}/nsddata_stimuli/stimuli/nsd/.nsd_stimuli.hdf5.*.tmp.hdf5"),
    ("simulate", "simulate:write:betas_session01.nii.gz:1", f"{NSD}/nsddata_betas/**/.betas_session01.nii.gz.*.tmp.nii.gz"),
    # brainenc run (simulate = true) finishes the interrupted simulation: killed in its last file
    ("run", "simulate:write:brainenc_ground_truth_subj01.h5:1", f"{NSD}/.brainenc_ground_truth_subj01.h5.*.tmp.h5"),
    # ... then simulates again completely and is killed inside the prepare stage's cache write
    ("run", "prepare:write:COMPLETE:1", "data/prepared/.tmp-*"),
    # brainenc prepare: inside its cache write
    ("prepare", "prepare:write:manifest.json:1", "data/prepared/.tmp-*"),
    # brainenc run: prepare stage done, killed at its end (record written, features not begun)
    ("run", "prepare:end:1", None),
    # inside the feature cache write (after the 3rd of 8 batches' progress record)
    ("run", "features:write:progress.json:3", "data/features/gabor/.*.partial/.progress.json.*.tmp.json"),
    ("run", "fit.ridge:write:alpha.npy:1", f"{RUN_DIR}/models/ridge/.alpha.npy.*.tmp.npy"),
    # routing training: after epoch 1's checkpoint; inside epoch 2's checkpoint; after training
    ("run", "fit.routing:checkpoint:1", None),
    ("run", "fit.routing:write:optimizer.safetensors:1", f"{RUN_DIR}/train/routing/*/checkpoints/.tmp-epoch-0002-*"),
    ("run", "fit.routing:write:config.json:1", f"{RUN_DIR}/models/.tmp-routing-*/.config.json.*.tmp.json"),
    ("run", "evaluate:write:summary.json:1", f"{RUN_DIR}/scores/.summary.json.*.tmp.json"),
    ("run", "report:write:roi_bars.png:1", f"{RUN_DIR}/report/figures/.roi_bars.png.*.tmp.png"),
    # everything written, the process not yet exited
    ("run", "run:end:1", None),
]


def test_sigkill_anywhere_then_rerun_equals_uninterrupted_run(tmp_path, tiny_spec, tiny_sim):
    spec = tiny_spec(**SPEC_KW)
    work = tmp_path / "work"
    work.mkdir()
    cli = CLI(work, spec, tiny_sim)

    # the reference: uninterrupted, umask 022
    cli("simulate", umask=0o022)
    cli("prepare", umask=0o022)
    cli("run", umask=0o022)
    check_modes(work / "data", 0o022)
    ref = tmp_path / "ref"
    work.rename(ref)
    work.mkdir()

    run_lock = work / RUN_DIR / ".lock"
    sim_lock = work / NSD / ".brainenc_simulate.lock"
    for i, (command, kill, temp) in enumerate(KILLS):
        if i == 3:  # between the kills: prepare refuses an interrupted simulation in one line
            p = cli("prepare", expect=2)
            lines = p.stderr.strip().splitlines()
            assert len(lines) == 1 and "interrupted" in lines[0] and "brainenc simulate" in lines[0], p.stderr
        cli(command, kill=kill)
        if temp is not None:
            assert list(work.glob(temp)), f"kill {kill} left no temporary {temp}: not killed mid-write?"
        if command == "run" and (work / RUN_DIR).is_dir():
            assert run_lock.is_file(), "a killed run leaves its (stale) lock file for the next run to take over"
        if kill.startswith("simulate:"):
            assert sim_lock.is_file(), "a killed simulation leaves its (stale) lock file"
        check_no_partial(work, ref, kill)

    cli("run")  # the last rerun: nothing left to do but finish
    done = _files(work)
    key = PreparedKey(ref, work)
    ref_files = {key(rel): p for rel, p in _files(ref).items()}
    left = sorted(rel for rel in done if _hidden(rel))
    assert not left, f"temporaries or locks left after the successful rerun: {left}"
    assert sorted(done) == sorted(ref_files), (sorted(set(done) ^ set(ref_files)))
    differ = [rel for rel in done if rel not in NOT_COMPARED
              and normalized(done[rel], rel) != key(normalized(ref_files[rel], rel))]
    assert not differ, f"differ from the uninterrupted run: {differ}"
    assert not [p for p in work.rglob(".*")], "hidden files or folders left"
    check_modes(work / "data", 0o002)
    # and the resumes really resumed: the routing fit restarted from a checkpoint
    rec = json.loads((work / RUN_DIR / "stages" / "fit.routing.json").read_text())
    assert rec["outputs"]["resumed"] is True
    shutil.rmtree(ref)
