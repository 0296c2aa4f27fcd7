"""Soft imports: optional dependencies fail with the exact ``pip install`` to run."""
from __future__ import annotations

import importlib
from types import ModuleType

from brainenc.exceptions import MissingDependencyError

_PIP_NAMES = {
    "open_clip": "open_clip_torch",
    "timm": "timm",
    "triton": "triton",
    "diffusers": "diffusers",
    "himalaya": "himalaya",
    "efficientnet_lite_pytorch": "efficientnet-lite-pytorch",
}


def soft_import(name: str, purpose: str, extra: str | None = None) -> ModuleType:
    """Import ``name`` or raise :class:`MissingDependencyError` saying what to install and why."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        pip_name = _PIP_NAMES.get(name.split(".")[0], name.split(".")[0])
        how = f"pip install 'brainenc[{extra}]'" if extra else f"pip install {pip_name}"
        raise MissingDependencyError(f"{purpose} needs the '{pip_name}' package ({exc}); install it with: {how}") from None


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
