"""Backend registry and dispatch for brainenc's custom ops.

Every backend of every op is registered in :data:`OPS` under ``"<op>/<backend>"`` with a
:class:`Constraints` record (devices, dtypes, head-dim limit, optional modules, a memory
estimate and an extra check). ``backend="auto"`` walks the op's preference order and takes the
first backend whose constraints accept the inputs; an explicit backend is always honoured, or
rejected with a one-line :class:`~brainenc.exceptions.ConfigError` naming the constraint.

This module imports torch but never triton: optional modules are looked up with
``importlib.util.find_spec`` so ``import brainenc.ops`` stays cheap and interpreter-safe.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from brainenc._utils.imports import has_module
from brainenc.exceptions import ConfigError
from brainenc.registry import Registry

__all__ = ["OPS", "Constraints", "register_backend", "list_backends", "DEFAULT_MEMORY_BUDGET", "resolve_memory_budget"]

#: name "<op>/<backend>" -> callable implementing the op; meta["constraints"] is a Constraints.
OPS = Registry("op backend")

#: Default working-memory budget (bytes) for ``memory_budget=None``; override with the
#: ``BRAINENC_OPS_MEMORY_BUDGET`` environment variable (bytes, or a number with a K/M/G suffix).
DEFAULT_MEMORY_BUDGET = 1 << 30

_SUFFIX = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _parse_bytes(name: str, value: Any) -> int:
    if isinstance(value, str):
        text = value.strip().upper().removesuffix("IB").removesuffix("B")
        mult = 1
        if text and text[-1] in _SUFFIX:
            mult, text = _SUFFIX[text[-1]], text[:-1]
        try:
            value = float(text) * mult
        except ValueError:
            raise ConfigError(f"'{name}' must be a number of bytes (e.g. 512M, 2G); {value!r} was provided") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"'{name}' must be a positive number of bytes; {value!r} was provided")
    return int(value)


def resolve_memory_budget(memory_budget: Any = None) -> int:
    """Return the working-memory budget in bytes.

    Parameters
    ----------
    memory_budget : int, float, str or None
        Bytes (``2**30``) or a string with a K/M/G suffix (``"512M"``). None reads
        ``BRAINENC_OPS_MEMORY_BUDGET`` and falls back to ``DEFAULT_MEMORY_BUDGET`` (1 GiB).
    """
    if memory_budget is None:
        env = os.environ.get("BRAINENC_OPS_MEMORY_BUDGET")
        if env:
            return _parse_bytes("BRAINENC_OPS_MEMORY_BUDGET", env)
        return DEFAULT_MEMORY_BUDGET
    return _parse_bytes("memory_budget", memory_budget)


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class Constraints:
    """What a backend accepts. Every field is checked by :meth:`violation`.

    Parameters
    ----------
    devices : tuple of str
        Device types (``"cpu"``, ``"cuda"``) the backend runs on.
    dtypes : tuple of torch.dtype
        Accepted input dtypes.
    max_head_dim : int or None
        Largest head dimension D (None = any).
    requires : tuple of str
        Optional modules that must be importable (looked up, not imported).
    memory : callable or None
        ``memory(info) -> bytes``: estimated extra working memory for these inputs; the backend
        is rejected when it exceeds the budget. ``info`` is the dict built by the op.
    check : callable or None
        ``check(info) -> str or None``: any further constraint; returns the reason it fails.
    auto : bool
        Whether ``backend="auto"`` may pick it (the reference backend is never auto-picked).
    """

    devices: tuple = ("cpu", "cuda")
    dtypes: tuple = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    max_head_dim: Optional[int] = None
    requires: tuple = ()
    memory: Optional[Callable[[dict], float]] = None
    check: Optional[Callable[[dict], Optional[str]]] = None
    auto: bool = True
    notes: str = field(default="", compare=False)

    def violation(self, info: dict) -> Optional[str]:
        """Return a one-line reason why ``info`` is rejected, or None when it is accepted.

        ``info`` keys used: ``device`` (torch.device), ``dtype``, ``D``, ``budget`` (bytes).
        """
        dev = info["device"].type
        if dev not in self.devices:
            return f"device {dev!r} not in supported devices {list(self.devices)}"
        if info["dtype"] not in self.dtypes:
            names = [str(d).replace("torch.", "") for d in self.dtypes]
            return f"dtype {str(info['dtype']).replace('torch.', '')} not in supported dtypes {names}"
        if self.max_head_dim is not None and info["D"] > self.max_head_dim:
            return f"head dim D={info['D']} exceeds max_head_dim={self.max_head_dim}"
        for mod in self.requires:
            if not has_module(mod):
                return f"optional module {mod!r} is not installed (pip install {mod})"
        if self.check is not None:
            reason = self.check(info)
            if reason:
                return reason
        if self.memory is not None:
            need = self.memory(info)
            if need > info["budget"]:
                return f"estimated memory {_fmt_bytes(need)} exceeds memory_budget {_fmt_bytes(info['budget'])}"
        return None


def register_backend(op: str, backend: str, constraints: Constraints) -> Callable:
    """Decorator: register ``fn`` as ``backend`` of ``op`` with its ``constraints``."""

    def _add(fn):
        OPS.register(f"{op}/{backend}", fn, op=op, backend=backend, constraints=constraints)
        return fn

    return _add


def list_backends(op: str) -> list[str]:
    """Backend names registered for ``op`` (sorted)."""
    return [name.split("/", 1)[1] for name in OPS.list(f"{op}/*")]


def select_backend(op: str, backend: str, info: dict, preference: tuple[str, ...]) -> str:
    """Resolve ``backend`` for ``op`` given the input ``info``.

    Parameters
    ----------
    op : str
        Op name, e.g. ``"routing_attention"``.
    backend : str
        ``"auto"`` or a registered backend name.
    info : dict
        Input description passed to every :meth:`Constraints.violation`.
    preference : tuple of str
        Auto order, most preferred first.

    Returns
    -------
    str
        The chosen backend name.

    Raises
    ------
    ConfigError
        Unknown backend, an explicit backend whose constraints reject the inputs, or no backend
        accepting them under ``auto``.
    """
    names = list_backends(op)
    if backend != "auto":
        if backend not in names:
            from brainenc._utils.validation import check_option

            check_option("backend", backend, ["auto", *names])
        reason = OPS.meta(f"{op}/{backend}")["constraints"].violation(info)
        if reason:
            raise ConfigError(f"{op} backend {backend!r} cannot run these inputs: {reason}")
        return backend
    reasons = []
    for name in preference:
        cons = OPS.meta(f"{op}/{name}")["constraints"]
        if not cons.auto:
            continue
        reason = cons.violation(info)
        if reason is None:
            return name
        reasons.append(f"{name}: {reason}")
    raise ConfigError(f"{op}: no backend accepts these inputs ({'; '.join(reasons)})")
