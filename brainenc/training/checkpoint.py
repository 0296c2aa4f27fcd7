"""Checkpoints as safetensors + JSON (no pickle anywhere).

A checkpoint folder holds ``model.safetensors``, ``optimizer.safetensors`` (every tensor of the
optimizer state, keyed ``"<param index>.<name>"``), ``rng.safetensors`` and ``state.json`` (epoch,
history, optimizer param groups and non-tensor state, scheduler state, RNG metadata). A folder is
written under a temporary name (:func:`brainenc._utils.io.temp_dir_name`), renamed to
``epoch-NNNN`` when complete, and only then is ``latest.json`` atomically pointed at it, so a
process killed mid-write leaves the previous checkpoint valid and no partial epoch folder (its
temporary is removed by the next run's :func:`brainenc._utils.io.remove_stale_temps`).
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from brainenc._utils.io import kill_point, read_json, temp_dir_name, write_json
from brainenc._utils.tensors import load_tensors as _load_tensors, save_tensors as _save_tensors
from brainenc.exceptions import DataFormatError

__all__ = ["save_tensors", "load_tensors", "optimizer_to_parts", "optimizer_from_parts", "save_checkpoint",
           "load_checkpoint", "latest_checkpoint"]


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Atomic safetensors write (the package's one writer, ``brainenc._utils.tensors.save_tensors``)."""
    return _save_tensors(path, tensors, metadata)


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file as torch tensors on ``device`` (error names the file)."""
    return _load_tensors(path, framework="torch", device=str(device))


def optimizer_to_parts(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors and a JSON structure."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        entry = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v
                entry[k] = {"tensor": f"{idx}.{k}"}
            else:
                entry[k] = {"value": v}
        state[str(idx)] = entry
    groups = []
    for g in sd["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    return tensors, {"state": state, "param_groups": groups}


def optimizer_from_parts(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], struct: dict[str, Any]) -> None:
    """Load parts written by :func:`optimizer_to_parts` into ``optimizer``."""
    state = {}
    for idx, entry in struct["state"].items():
        state[int(idx)] = {k: (tensors[v["tensor"]] if "tensor" in v else v["value"]) for k, v in entry.items()}
    groups = []
    for g in struct["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(root: str | Path, epoch: int, *, model_state: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, rng_tensors: dict[str, torch.Tensor], state: dict[str, Any],
                    keep: int = 1) -> Path:
    """Write ``root/epoch-NNNN/`` (e.g. ``epoch-0007``) and point ``root/latest.json`` at it; keep the ``keep`` newest.

    Returns
    -------
    Path of the checkpoint folder.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"epoch-{epoch:04d}"
    # build under a temporary name (swept by remove_stale_temps if we are killed), rename, then
    # point latest.json at it: no partial folder is ever visible under an epoch name
    tmp = root / temp_dir_name(folder.name)
    tmp.mkdir()
    try:
        save_tensors(tmp / "model.safetensors", model_state)
        opt_tensors, opt_struct = optimizer_to_parts(optimizer)
        save_tensors(tmp / "optimizer.safetensors", opt_tensors)
        save_tensors(tmp / "rng.safetensors", rng_tensors)
        write_json(tmp / "state.json", {**state, "epoch": epoch, "optimizer": opt_struct})
        aside = None
        if folder.exists():  # an earlier attempt at this epoch: set it aside, remove it after
            aside = root / temp_dir_name(folder.name + "-old")
            os.rename(folder, aside)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_json(root / "latest.json", {"folder": folder.name, "epoch": epoch})
    old = sorted(p for p in root.glob("epoch-*") if p.is_dir() and p != folder)
    doomed = [aside] if aside is not None else []
    for p in old[: max(0, len(old) - (keep - 1))]:
        with contextlib.suppress(OSError):  # renamed first: never a half-deleted epoch folder
            doomed.append(p.rename(root / temp_dir_name(p.name + "-old")))
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    kill_point("checkpoint")  # crash tests: between two epochs, the checkpoint complete
    return folder


def latest_checkpoint(root: str | Path) -> Path | None:
    """Folder named by ``root/latest.json``, or None when there is no checkpoint."""
    pointer = Path(root) / "latest.json"
    if not pointer.is_file():
        return None
    folder = Path(root) / read_json(pointer)["folder"]
    if not (folder / "state.json").is_file():
        raise DataFormatError(f"{pointer}: names {folder.name}, which has no state.json")
    return folder


def load_checkpoint(folder: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint folder.

    Returns
    -------
    dict with ``model`` (tensors), ``optimizer_tensors``, ``rng`` (tensors) and ``state`` (JSON).
    """
    folder = Path(folder)
    return {"model": load_tensors(folder / "model.safetensors", device),
            "optimizer_tensors": load_tensors(folder / "optimizer.safetensors", device),
            "rng": load_tensors(folder / "rng.safetensors"),
            "state": read_json(folder / "state.json")}
