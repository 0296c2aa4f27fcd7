"""Optimisers and learning-rate schedules named by :class:`~brainenc.training.TrainConfig` (data, not code).

``optimizer``: ``"adamw"`` (decoupled weight decay), ``"adam"`` (L2 weight decay, optional
``amsgrad``), ``"sgd"`` (optional ``momentum`` / ``nesterov``).

``schedule`` (stepped once per epoch; ``e`` = 0-based epoch, ``E`` = ``epochs``, ``W`` =
``warmup_epochs``, ``m`` = ``min_lr / lr``; the learning rate of epoch ``e`` is ``lr * f(e)``):

- ``"step"``: ``f(e) = lr_gamma ** (e // lr_step)`` (torch ``StepLR``);
- ``"constant"``: ``f(e) = 1``;
- ``"cosine"``: ``f(e) = m + (1 - m) * (1 + cos(pi * e / E)) / 2``;
- ``"warmup_cosine"``: ``f(e) = (e + 1) / (W + 1)`` for ``e < W`` (linear warm-up), then the cosine
  above over the remaining epochs, ``f(e) = m + (1 - m) * (1 + cos(pi * (e - W) / (E - W))) / 2``.

Every scheduler's state is a JSON-serialisable ``state_dict`` (checkpointed for bitwise resume).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Iterable

import torch

if TYPE_CHECKING:  # pragma: no cover
    from brainenc.training.trainer import TrainConfig

__all__ = ["OPTIMIZERS", "SCHEDULES", "build_optimizer", "build_scheduler", "lr_factor"]

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("step", "constant", "cosine", "warmup_cosine")


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: "TrainConfig") -> torch.optim.Optimizer:
    """The optimiser named by ``cfg.optimizer`` with ``cfg``'s hyper-parameters.

    Parameters
    ----------
    params : iterable of Parameter (or param-group dicts)
    cfg : TrainConfig
        Already checked (:meth:`TrainConfig.check`).
    """
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas),
                                 eps=cfg.eps, amsgrad=cfg.amsgrad)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas),
                                eps=cfg.eps, amsgrad=cfg.amsgrad)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                               nesterov=cfg.nesterov)
    raise AssertionError(cfg.optimizer)  # TrainConfig.check rejects other names


def lr_factor(cfg: "TrainConfig") -> Callable[[int], float]:
    """``f(e)``: multiplier of ``cfg.lr`` at 0-based epoch ``e`` for the lambda schedules (see module doc)."""
    m = cfg.min_lr / cfg.lr
    E, W = cfg.epochs, cfg.warmup_epochs

    def cosine(e: int, start: int) -> float:
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * (e - start) / max(1, E - start)))

    if cfg.schedule == "constant":
        return lambda e: 1.0
    if cfg.schedule == "cosine":
        return lambda e: cosine(e, 0)
    if cfg.schedule == "warmup_cosine":
        return lambda e: (e + 1) / (W + 1) if e < W else cosine(e, W)
    raise AssertionError(cfg.schedule)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: "TrainConfig") -> torch.optim.lr_scheduler.LRScheduler:
    """The per-epoch learning-rate schedule named by ``cfg.schedule`` (``"step"`` = torch ``StepLR``)."""
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
