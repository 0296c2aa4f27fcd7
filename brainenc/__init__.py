"""brainenc: encoding and decoding models of the visual brain on NSD-style fMRI.

``import brainenc`` is cheap: it imports neither torch nor h5py. Sub-packages are
loaded on first attribute access (``brainenc.datasets``, ``brainenc.encoding``, ...).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = {
    "config",
    "registry",
    "exceptions",
    "datasets",
    "features",
    "ops",
    "models",
    "training",
    "encoding",
    "metrics",
    "report",
    "workflows",
    "cli",
}

__all__ = sorted(_SUBMODULES | {"__version__"})


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'brainenc' has no attribute {name!r}")


def __dir__():
    return __all__
