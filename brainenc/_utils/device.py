"""The one device resolver: ``"auto" | "cpu" | "cuda" | "cuda:1" | "mps"`` -> ``torch.device``."""
from __future__ import annotations

from brainenc.exceptions import ConfigError

__all__ = ["resolve_device"]


def resolve_device(device=None, local_rank: int | None = None, *, name: str = "device"):
    """Resolve a device request.

    Parameters
    ----------
    device : str, torch.device or None
        ``None`` or ``"auto"``: CUDA when available, else CPU. ``"cuda"`` without an index takes
        ``local_rank`` (the process's GPU under ``torchrun``) when given.
    local_rank : int, optional
    name : str
        Parameter name used in the error message (e.g. ``"train.device"``).

    Returns
    -------
    torch.device

    Raises
    ------
    ConfigError
        Unparseable name, or CUDA requested where none is available (one line, naming ``name``).
    """
    import torch

    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"'{name}' must be 'auto', 'cpu', 'cuda' or 'cuda:<i>'; {device!r} was provided "
                          f"({exc})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"'{name}' is {str(device)!r} but no CUDA device is available (use 'cpu' or 'auto')")
        if dev.index is None and local_rank is not None:
            dev = torch.device("cuda", local_rank)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"'{name}' is {str(device)!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev
