"""Toy setup shared by the Trainer tests (test_trainer.py, test_objectives.py).

- ``toy_regression``: factory of seeded voxel-regression data, one informative token + noise;
- ``kill``: an epoch callback that "kills" a run after a given epoch (for resume tests), and the
  exception it raises;
- ``torchrun``: runs a worker script under ``torchrun --standalone --nproc_per_node=2`` (gloo, CPU, one
  thread per rank) and fails the test with the ranks' stderr if it does not exit 0.
"""
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest


def _toy_regression(n, seed=0, *, n_tok, dim, n_vox, signal_token):
    """``X`` float32 [n, n_tok, dim] ~ N(0, 1); ``Y`` float32 [n, n_vox] = the first ``n_vox``
    features of token ``signal_token`` + 0.2 N(0, 1) noise (one ``default_rng(seed)`` draws both)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, n_tok, dim)).astype(np.float32)
    Y = (X[:, signal_token, :n_vox] + 0.2 * rng.standard_normal((n, n_vox))).astype(np.float32)
    return X, Y


@pytest.fixture
def toy_regression():
    """``toy_regression(n, seed=0, *, n_tok, dim, n_vox, signal_token) -> (X, Y)``."""
    return _toy_regression


class KilledRun(Exception):
    """Raised by ``kill.after(epoch)`` once that epoch's checkpoint is written."""


def _kill_after(epoch):
    def cb(trainer, record):
        if record["epoch"] == epoch:
            raise KilledRun
    return cb


@pytest.fixture
def kill():
    """``kill.after(epoch)``: Trainer callback raising ``kill.error`` after ``epoch``."""
    return SimpleNamespace(after=_kill_after, error=KilledRun)


def _torchrun_two_ranks(script: Path, *args: str, timeout: int = 300) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BRAINENC_QUIET": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture
def torchrun():
    """``torchrun(script, *args)``: ``script`` under 2 torchrun ranks; asserts it exited 0."""
    return _torchrun_two_ranks
