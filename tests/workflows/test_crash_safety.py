"""Crash-safety building blocks (fast): the kill hook, stale-temporary sweeping, folder locks
(a dead holder is taken over, a live one refused in one line), file modes under the umask,
deterministic safetensors bytes, stage outputs identical in memory and read back, an
interrupted simulation noticed by ``brainenc run``, checkpoint folders never partial.

The end-to-end SIGKILL test of the CLI is ``test_kill_resume.py`` (slow)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from brainenc._utils import io
from brainenc._utils.io import (
    LockedError,
    atomic_path,
    exclusive_lock,
    remove_stale_temps,
    save_npy,
    temp_dir_name,
    temp_prefix,
    write_json,
    write_text,
)
from brainenc.exceptions import DataFormatError


RIDGE_ONLY = """
[pipeline]
name = "tiny"
[prepare]
simulate = true
[features]
backbone = "gabor"
layer = "last"
[[fit]]
name = "ridge"
inputs = { features = "pooled" }
"""


def _spec(tmp_path, extra: str = "") -> Path:
    p = tmp_path / "tiny.toml"
    p.write_text(RIDGE_ONLY.replace("simulate = true", "simulate = true" + extra))
    return p


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _py(code: str, env=None, **kw) -> subprocess.CompletedProcess:
    full = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full, capture_output=True,
                          text=True, timeout=120, **kw)


# ---------------------------------------------------------------------------------- kill hook
KILL_SCRIPT = """
import sys
from brainenc._utils.io import kill_point, kill_scope, write_text
with kill_scope("stage.a"):
    for i in range(5):
        print(i, flush=True)
        kill_point("tick")
    write_text(sys.argv[1] if len(sys.argv) > 1 else "/dev/null", "x")
print("end", flush=True)
"""


@pytest.mark.parametrize("spec, printed, killed", [
    ("stage.a:tick:3", "0 1 2", True),       # the 3rd matching event
    ("stage.*:t*:1", "0", True),            # fnmatch patterns
    ("stage.b:tick:1", "0 1 2 3 4 end", False),  # other scope: never
    ("stage.a:tick:9", "0 1 2 3 4 end", False),  # fewer events than n
    ("", "0 1 2 3 4 end", False),           # unset
])
def test_kill_point_fires_at_the_nth_matching_event(spec, printed, killed):
    p = _py(KILL_SCRIPT, env={"BRAINENC_TEST_KILL_AT": spec})
    assert p.stdout.split() == printed.split()
    assert p.returncode == (-signal.SIGKILL if killed else 0), p.stderr


def test_kill_inside_atomic_write_leaves_only_a_temporary(tmp_path):
    target = tmp_path / "out.txt"
    p = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(target)], capture_output=True, text=True,
                       env=dict(os.environ, BRAINENC_TEST_KILL_AT="stage.a:write:out.txt:1"), timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert not target.exists()
    (tmp,) = tmp_path.iterdir()
    assert tmp.name.startswith(".out.txt.") and tmp.name.endswith(".tmp.txt") and tmp.read_text() == "x"
    assert remove_stale_temps(tmp_path) == [tmp] and not tmp.exists()


def test_bad_kill_spec_is_an_error(monkeypatch):
    monkeypatch.setenv("BRAINENC_TEST_KILL_AT", "nonsense")
    with pytest.raises(ValueError, match="<scope>:<event>:<n>"):
        io.kill_point("x")


# ----------------------------------------------------------------------------- stale temporaries
def test_remove_stale_temps_only_dead_writers_on_this_host(tmp_path):
    dead = _dead_pid()
    live = os.getppid()
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    stale = [sub / f".x.npy.{io._HOST}-{dead}.k3j_9zq1.tmp.npy",
             tmp_path / f".tmp-epoch-0002-{io._HOST}-{dead}-0a1b2c"]
    stale[1].mkdir()
    (stale[1] / "model.safetensors").write_bytes(b"partial")
    kept = [sub / f".x.npy.{io._HOST}-{live}.abcdefgh.tmp.npy",        # writer alive
            sub / f".x.npy.otherhost-{dead}.abcdefgh.tmp.npy",          # another machine: unknown
            sub / ".hidden_user_file", sub / "x.npy", tmp_path / ".tmp-notours"]
    for p in stale[:1] + kept:
        p.write_text("x")
    removed = remove_stale_temps(tmp_path)
    assert sorted(removed) == sorted(stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)
    assert remove_stale_temps(tmp_path / "missing") == []


def test_temp_names_match_the_sweeper():
    assert io._TEMP_FILE_RE.match(temp_prefix("alpha.npy") + "abc_123.tmp.npy")
    assert io._TEMP_DIR_RE.match(temp_dir_name("epoch-0001"))


# ------------------------------------------------------------------------------------- locks
HOLDER = """
import sys, time
from pathlib import Path
from brainenc._utils import io
io._USE_FLOCK = {flock}
with io.exclusive_lock(Path(sys.argv[1]), "test folder"):
    Path(sys.argv[2]).write_text("held")
    time.sleep(120)
"""


def _start_holder(tmp_path, lock, flock: bool):
    ready = tmp_path / f"ready-{flock}"
    p = subprocess.Popen([sys.executable, "-c", HOLDER.format(flock=flock), str(lock), str(ready)])
    for _ in range(600):
        if ready.exists():
            return p
        if p.poll() is not None:
            raise AssertionError("lock holder exited early")
        time.sleep(0.05)
    p.kill()
    raise AssertionError("lock holder never took the lock")


@pytest.mark.parametrize("flock", [True, False], ids=["flock", "pidfile"])
def test_live_lock_blocks_in_one_line_then_killed_holder_is_taken_over(tmp_path, monkeypatch, flock):
    monkeypatch.setattr(io, "_USE_FLOCK", flock)
    lock = tmp_path / "run" / ".lock"
    holder = _start_holder(tmp_path, lock, flock)
    try:
        with pytest.raises(LockedError) as exc:
            with exclusive_lock(lock, "test folder"):
                pass
        msg = str(exc.value)
        assert "\n" not in msg and str(lock) in msg and f"pid {holder.pid}" in msg and "in use" in msg
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock.is_file()  # SIGKILL: the holder could not remove it
    with exclusive_lock(lock, "test folder"):  # stale: taken over at once
        assert lock.read_text().split()[0] == str(os.getpid())
    assert not lock.exists()  # released: removed


@pytest.mark.parametrize("flock", [True, False], ids=["flock", "pidfile"])
def test_lock_file_of_a_dead_pid_is_taken_over(tmp_path, monkeypatch, flock):
    monkeypatch.setattr(io, "_USE_FLOCK", flock)
    lock = tmp_path / ".lock"
    lock.write_text(f"{_dead_pid()} {io._HOST}\n")
    with exclusive_lock(lock):
        pass
    assert not lock.exists()


def test_file_system_without_flock_falls_back_to_a_pid_file(tmp_path, monkeypatch):
    import fcntl

    def no_flock(fd, op):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock = tmp_path / ".lock"
    with exclusive_lock(lock):
        assert lock.read_text().split() == [str(os.getpid()), io._HOST]
        with pytest.raises(LockedError, match=f"pid {os.getpid()}"):  # the pid file holds it
            with exclusive_lock(lock):
                pass
    assert not lock.exists()


def test_pidfile_lock_of_another_host_is_not_stolen(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "_USE_FLOCK", False)
    lock = tmp_path / ".lock"
    lock.write_text(f"{_dead_pid()} someotherhost\n")
    with pytest.raises(LockedError, match="someotherhost"):
        with exclusive_lock(lock):
            pass


def test_run_and_simulate_refuse_a_live_lock(tmp_path):
    from brainenc.datasets.simulate import LOCK_NAME, simulate_subject
    from brainenc.workflows import load_pipeline, run_dir_for, run_pipeline
    from brainenc.workflows.pipeline import LOCK_NAME as RUN_LOCK

    out = tmp_path / "run"
    out.mkdir()
    spec = _spec(tmp_path)
    with exclusive_lock(out / RUN_LOCK):  # another open file description: conflicts in-process too
        with pytest.raises(LockedError, match="run folder"):
            run_pipeline(spec, data_dir=tmp_path / "data", out=out)
    assert not (out / "config.resolved.json").exists()  # refused before any work
    assert run_dir_for(load_pipeline(spec), "subj01", tmp_path, out) == out.resolve()
    nsd = tmp_path / "nsd"
    with exclusive_lock(nsd / LOCK_NAME):
        with pytest.raises(LockedError, match="simulated NSD root"):
            simulate_subject(nsd)
    assert not (nsd / "brainenc_simulated.json").exists()


# ------------------------------------------------------------------------------- file modes
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writers_respect_the_umask(tmp_path, umask):
    import h5py
    import nibabel as nib
    import torch

    from brainenc.report.figures import save_figure
    from brainenc.training.checkpoint import save_tensors
    from brainenc._utils.tensors import save_tensors as save_safetensors
    from matplotlib.figure import Figure

    old = os.umask(umask)
    try:
        paths = [write_json(tmp_path / "a.json", {"x": 1}), write_text(tmp_path / "b.md", "x"),
                 save_npy(tmp_path / "c.npy", np.zeros(3)),
                 save_safetensors(tmp_path / "d.safetensors", {"x": np.zeros(2)}, {"a": "1", "b": "2"}),
                 save_tensors(tmp_path / "e.safetensors", {"x": torch.zeros(2)}, {"a": "1", "b": "2"}),
                 save_figure(Figure(figsize=(1, 1)), tmp_path / "f.png")]
        with atomic_path(tmp_path / "g.h5") as tmp, h5py.File(tmp, "w") as f:
            f["x"] = np.zeros(2)
        with atomic_path(tmp_path / "h.nii.gz") as tmp:
            nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), tmp)
        paths += [tmp_path / "g.h5", tmp_path / "h.nii.gz"]
    finally:
        os.umask(old)
    for p in paths:
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p.name
    assert sorted(q.name for q in tmp_path.iterdir()) == sorted(p.name for p in paths)  # no temporaries


# ------------------------------------------------------------------------- safetensors bytes
ST_SCRIPT = """
import sys
import numpy as np
from brainenc._utils.tensors import save_tensors as save_safetensors
meta = {k: str(i) for i, k in enumerate(["kind", "solver", "alpha", "zeta", "epoch", "metric"])}
save_safetensors(sys.argv[1], {"coef": np.arange(6.0).reshape(2, 3), "b": np.ones(2, np.float32)}, meta)
"""


def test_safetensors_files_are_byte_identical_across_processes(tmp_path):
    # the library writes metadata in a per-process random (HashMap) order; we sort it
    files = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for f in files:
        subprocess.run([sys.executable, "-c", ST_SCRIPT, str(f)], check=True, timeout=120)
    data = {f.read_bytes() for f in files}
    assert len(data) == 1
    from safetensors import safe_open

    with safe_open(str(files[0]), "np") as fh:
        assert fh.metadata()["zeta"] == "3"
        np.testing.assert_array_equal(fh.get_tensor("coef"), np.arange(6.0).reshape(2, 3))


def test_sort_safetensors_metadata_rejects_garbage(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes((8).to_bytes(8, "little") + b"\xff" * 8)
    with pytest.raises(DataFormatError, match="x.safetensors"):
        io.sort_safetensors_metadata(p)


# --------------------------------------------------------------- stage outputs: memory == record
def test_downstream_sees_the_same_outputs_whether_upstream_ran_or_was_read_back(tmp_path):
    from brainenc.workflows.engine import Stage, read_stage_record, run_stages
    from brainenc.workflows.encoding import split_counts_text

    def a(ctx):
        return {"splits": {"train": 650, "test": 100}, "shape": (3, 4), "n": np.int64(5)}

    def b(ctx):
        got = ctx.inputs["a"]
        return {"order": list(got["splits"]), "shape": got["shape"], "n_type": type(got["n"]).__name__,
                "text": split_counts_text(got["splits"])}

    stages = [Stage("a", a), Stage("b", b, deps=["a"])]
    first = run_stages(tmp_path, stages, echo=lambda s: None)  # b gets a's outputs in memory
    rec1 = read_stage_record(tmp_path, "b")["outputs"]
    second = run_stages(tmp_path, stages, force=["b"], echo=lambda s: None)  # b gets them from a's record
    rec2 = read_stage_record(tmp_path, "b")["outputs"]
    assert [r.status for r in second] == ["up to date", "ran"]
    assert rec1 == rec2 == first[1].outputs == second[1].outputs
    assert rec1["text"] == "train 650, test 100" and rec1["shape"] == [3, 4] and rec1["n_type"] == "int"


def test_split_counts_text_has_a_fixed_order():
    from brainenc.workflows.encoding import split_counts_text

    want = "train 650, val 50, test 100, algonauts 3, extra 1"
    assert split_counts_text({"test": 100, "extra": 1, "val": 50, "train": 650, "algonauts": 3}) == want
    assert split_counts_text({"algonauts": 3, "train": 650, "val": 50, "extra": 1, "test": 100}) == want


def test_stage_outputs_json_cannot_hold_fail_naming_the_stage(tmp_path):
    from brainenc.workflows.engine import Stage, read_stage_record, run_stages

    with pytest.raises(TypeError, match="stage 'a'.*set"):
        run_stages(tmp_path, [Stage("a", lambda ctx: {"x": {1, 2}})], echo=lambda s: None)
    assert read_stage_record(tmp_path, "a") is None


# ------------------------------------------------------------------ interrupted simulation
def _fake_interrupted_root(root: Path) -> None:
    from brainenc.datasets import layout

    write_json(root / layout.SIMULATION_MANIFEST, {"subjects": {"subj01": {"n_sessions": 1, "complete": False}}})
    layout.expdesign_path(root).parent.mkdir(parents=True)
    layout.expdesign_path(root).write_bytes(b"x")
    layout.betas_dir(root, "subj01", "func1pt8mm", "betas_fithrf_GLMdenoise_RR").mkdir(parents=True)


def test_run_notices_an_interrupted_simulation(tmp_path, monkeypatch):
    from brainenc.workflows import RunContext, build_stages, load_pipeline, run_stages
    from brainenc.workflows.encoding import _has_subject_data

    nsd = tmp_path / "nsd"
    _fake_interrupted_root(nsd)
    spec = load_pipeline(_spec(tmp_path))
    run = RunContext.create(spec, "subj01", data_dir=tmp_path / "data", nsd_root=nsd)
    assert not _has_subject_data(nsd, "subj01", spec.prepare)  # the folders exist, the simulation is not complete
    calls = []
    monkeypatch.setattr("brainenc.datasets.simulate.simulate_subject", lambda root, cfg: calls.append((root, cfg)))
    run_stages(run.run_dir, build_stages(spec, run), targets=["simulate"])  # simulate = true: simulated again
    assert calls == [(nsd, run.simulation_config(spec.simulation))] and calls[0][1].subject == "subj01"
    spec_off = load_pipeline(_spec(tmp_path), overrides=["prepare.simulate=false"])
    with pytest.raises(DataFormatError) as exc:
        run_stages(run.run_dir, build_stages(spec_off, run), targets=["simulate"])
    assert "interrupted" in str(exc.value) and "brainenc simulate" in str(exc.value)


def test_cli_prepare_refuses_an_interrupted_simulation_in_one_line(tmp_path):
    nsd = tmp_path / "data" / "nsd"
    _fake_interrupted_root(nsd)
    p = subprocess.run([sys.executable, "-m", "brainenc.cli", "prepare", "--data-dir", str(tmp_path / "data")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0] and "brainenc simulate" in lines[0], p.stderr


# ------------------------------------------------------------------------------ checkpoints
def test_checkpoint_folder_is_never_partial(tmp_path, monkeypatch):
    import torch

    from brainenc.training import checkpoint as ck

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rng = {"cpu": torch.get_rng_state()}
    ck.save_checkpoint(tmp_path, 1, model_state=model.state_dict(), optimizer=opt, rng_tensors=rng, state={})
    real = ck.save_tensors

    def failing(path, tensors, metadata=None):
        if Path(path).name == "optimizer.safetensors":
            raise OSError("disk full")
        return real(path, tensors, metadata)

    monkeypatch.setattr(ck, "save_tensors", failing)
    with pytest.raises(OSError):
        ck.save_checkpoint(tmp_path, 2, model_state=model.state_dict(), optimizer=opt, rng_tensors=rng, state={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0001", "latest.json"]
    assert ck.latest_checkpoint(tmp_path).name == "epoch-0001"
    monkeypatch.setattr(ck, "save_tensors", real)
    # a rerun of an epoch whose folder exists (renamed, latest.json not yet updated when killed)
    ck.save_checkpoint(tmp_path, 2, model_state=model.state_dict(), optimizer=opt, rng_tensors=rng, state={})
    ck.save_checkpoint(tmp_path, 2, model_state=model.state_dict(), optimizer=opt, rng_tensors=rng, state={"x": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0002", "latest.json"]
    assert json.loads((tmp_path / "epoch-0002" / "state.json").read_text())["x"] == 1
