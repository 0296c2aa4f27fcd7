"""Toy setup shared by the Trainer tests (test_trainer.py, test_objectives.py).

- ``toy_regression``: factory of seeded voxel-regression data, one informative token + noise;
- ``kill``: an epoch callback that "kills" a run after a given epoch (for resume tests), and the
  exception it raises.
"""
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
