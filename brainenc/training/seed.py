"""Seeding and RNG-state capture for bitwise-reproducible training and resume.

Every random source the training loop touches is seeded from one integer and its state is
saved in checkpoints: python ``random``, numpy's global generator, torch's CPU (and CUDA)
generator, and the data-order :class:`torch.Generator`. States are stored as tensors
(safetensors) + JSON, never pickle.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["seed_everything", "capture_rng_state", "restore_rng_state"]


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch (CPU + CUDA) with ``seed``.

    Returns
    -------
    torch.Generator
        A fresh CPU generator seeded with ``seed``, for data order (DataLoader / sampler).
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def capture_rng_state(data_generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Snapshot every RNG.

    Returns
    -------
    tensors : dict name -> Tensor
        ``torch_cpu`` (uint8), ``numpy_keys`` (int64 [624]), ``data_generator`` (uint8), ``cuda_<i>``.
    meta : dict
        JSON-serialisable rest (python state, numpy position / gaussian cache).
    """
    tensors = {"torch_cpu": torch.get_rng_state().clone()}
    if data_generator is not None:
        tensors["data_generator"] = data_generator.get_state().clone()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s.clone()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64).copy())
    version, pstate, gauss_next = random.getstate()
    meta = {"numpy": {"name": name, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "state": list(pstate), "gauss_next": gauss_next}}
    return tensors, meta


def restore_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                      data_generator: torch.Generator | None = None) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(tensors["torch_cpu"].to(torch.uint8))
    if data_generator is not None and "data_generator" in tensors:
        data_generator.set_state(tensors["data_generator"].to(torch.uint8))
    if torch.cuda.is_available():
        states = [tensors[k].to(torch.uint8) for k in sorted(tensors) if k.startswith("cuda_")]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    npm = meta["numpy"]
    np.random.set_state((npm["name"], tensors["numpy_keys"].numpy().astype(np.uint32), npm["pos"], npm["has_gauss"],
                         npm["cached_gaussian"]))
    py = meta["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
