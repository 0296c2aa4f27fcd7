"""The one safetensors writer/reader of the package (numpy or torch tensors, atomic, no pickle).

``save_tensors`` accepts a mapping of numpy arrays and/or torch tensors: numpy-only mappings are
written with ``safetensors.numpy`` (no torch import), anything holding a torch tensor (bf16
included, which numpy cannot hold) with ``safetensors.torch``. Both produce the same file format.
Metadata values that are not strings are stored as JSON.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from brainenc._utils.io import atomic_path, sort_safetensors_metadata
from brainenc.exceptions import DataFormatError

__all__ = ["save_tensors", "load_tensors", "read_tensor_metadata"]


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def save_tensors(path: str | Path, tensors: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``tensors`` to a safetensors file atomically.

    Parameters
    ----------
    path : path
        Destination (``.safetensors``).
    tensors : mapping of str -> ndarray or torch.Tensor
        Arrays of any shape; made contiguous (torch tensors are moved to CPU).
    metadata : mapping of str -> any, optional
        Stored in the header; non-string values as JSON.

    Returns
    -------
    Path
    """
    path = Path(path)
    meta = {str(k): v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in (metadata or {}).items()}
    if any(_is_torch(v) for v in tensors.values()):
        import torch
        from safetensors.torch import save_file

        # clone: safetensors refuses tensors that share storage (tied weights, views of one buffer)
        data = {k: (v.detach().to("cpu").contiguous().clone() if _is_torch(v)
                    else torch.from_numpy(np.ascontiguousarray(v))) for k, v in tensors.items()}
    else:
        from safetensors.numpy import save_file

        data = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(data, str(tmp), metadata=meta or None)
        sort_safetensors_metadata(tmp)  # the library's metadata order varies between processes
    return path


def load_tensors(path: str | Path, framework: str = "numpy", device: str = "cpu") -> dict[str, Any]:
    """Read a safetensors file.

    Parameters
    ----------
    path : path
    framework : {"numpy", "torch"}
        Return numpy arrays or torch tensors (``device`` applies to torch).

    Returns
    -------
    dict of str -> ndarray or torch.Tensor

    Raises
    ------
    DataFormatError
        Missing, truncated or otherwise unreadable file (the path is named).
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    try:
        if framework == "torch":
            from safetensors.torch import load_file

            return load_file(str(path), device=str(device))
        from safetensors.numpy import load_file

        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several unrelated types
        raise DataFormatError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None


def read_tensor_metadata(path: str | Path) -> dict[str, str]:
    """The header metadata of a safetensors file (strings, as stored)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="numpy") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:  # noqa: BLE001
        raise DataFormatError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None


class WeightsMismatchError(DataFormatError):
    """Saved weights whose names or shapes do not fit the module built from the saved config."""


def load_module_state(module, state: Mapping[str, Any], where: str = "") -> None:
    """``module.load_state_dict(state)`` after checking every name and shape, with a one-line error.

    Parameters
    ----------
    module : torch.nn.Module
    state : mapping of str to array or tensor
        numpy arrays are converted (no copy).
    where : str
        Appended to the message ("in config.json").

    Raises
    ------
    WeightsMismatchError
        Missing, unexpected or mis-shaped entries (the first three named).
    """
    import torch

    state = {k: v if torch.is_tensor(v) else torch.from_numpy(np.asarray(v)) for k, v in state.items()}
    expected = module.state_dict()
    problems = [f"missing {k!r}" for k in expected if k not in state]
    problems += [f"unexpected {k!r}" for k in state if k not in expected]
    problems += [f"{k!r} has shape {tuple(state[k].shape)}, the architecture needs {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if problems:
        raise WeightsMismatchError(f"weights do not fit the architecture{' ' + where if where else ''} "
                                   f"({'; '.join(problems[:3])}{'; ...' if len(problems) > 3 else ''})")
    module.load_state_dict(state)
