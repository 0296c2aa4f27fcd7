"""brainenc: encoding and decoding models of the visual brain on NSD-style fMRI.

``import brainenc`` is cheap: it imports neither torch nor h5py. Sub-packages are
loaded on first attribute access (``brainenc.datasets``, ``brainenc.encoding``, ...).
"""
from __future__ import annotations

import importlib

from brainenc._version import __version__

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
    "pretraining",
    "decoding",
    "synthesis",
    "metrics",
    "report",
    "workflows",
    "cli",
    "estimator",
}

#: packages whose estimators ``load`` can return (imported on first ``load``)
_ESTIMATOR_PACKAGES = ("brainenc.encoding", "brainenc.pretraining", "brainenc.decoding")

__all__ = sorted(_SUBMODULES | {"__version__", "load", "set_log_level"})


def set_log_level(level) -> None:
    """Set the level of brainenc's log messages (``"DEBUG"``, ``"INFO"``, ``"WARNING"``...)."""
    from brainenc._utils.logging import set_log_level as _set

    _set(level)


def load(directory, **params):
    """Load any brainenc estimator saved with ``save_pretrained(directory)``.

    The class is read from ``directory/config.json`` and looked up in the estimator registry;
    ``params`` override constructor parameters (e.g. ``device="cuda"``).

    Examples
    --------
    >>> enc = brainenc.load("runs/quickstart/subj01/models/ridge")  # doctest: +SKIP
    >>> enc.predict(X)  # doctest: +SKIP
    """
    from brainenc.estimator import load_estimator

    _import_estimators()
    return load_estimator(directory, **params)


def _import_estimators():
    """Import the packages that register estimators; returns the registry (``brainenc.estimator.ESTIMATORS``)."""
    from brainenc.estimator import ESTIMATORS

    for pkg in _ESTIMATOR_PACKAGES:
        importlib.import_module(pkg)
    return ESTIMATORS


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'brainenc' has no attribute {name!r}")


def __dir__():
    return __all__
