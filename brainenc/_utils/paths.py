"""Data-root resolution, the same for every command and function:
argument > ``BRAINENC_DATA`` environment variable > ``~/brainenc_data``."""
from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "BRAINENC_DATA"

__all__ = ["resolve_data_dir", "nsd_root", "prepared_root", "features_root", "runs_root"]


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Return the brainenc data root (not created)."""
    if data_dir:
        return Path(data_dir).expanduser().resolve()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().resolve()
    return (Path.home() / "brainenc_data").resolve()


def nsd_root(data_dir=None) -> Path:
    """Where the NSD release layout lives (``<root>/nsd``: nsddata/, nsddata_betas/, nsddata_stimuli/)."""
    return resolve_data_dir(data_dir) / "nsd"


def prepared_root(data_dir=None) -> Path:
    return resolve_data_dir(data_dir) / "prepared"


def features_root(data_dir=None) -> Path:
    return resolve_data_dir(data_dir) / "features"


def runs_root(data_dir=None) -> Path:
    return resolve_data_dir(data_dir) / "runs"
