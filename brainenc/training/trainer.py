"""Trainer: one training loop for every objective — seeded everything, configurable optimiser and
per-epoch schedule, grad clipping, best-epoch selection on the objective's validation metric, bf16
autocast on CUDA, safetensors+JSON checkpoints with bitwise resume, DistributedDataParallel under
``torchrun``.

What is optimised is an :class:`~brainenc.training.objectives.Objective` (default
:class:`~brainenc.training.objectives.VoxelRegression`: MSE over the global batch × voxels, selection on
the mean per-voxel validation Pearson r). Objectives return a loss as a *sum* of terms and their count;
under DDP rank ``r`` back-propagates ``total_r · W / N`` with ``N`` the term count of the whole global
batch, so DDP's gradient averaging yields exactly the single-process gradient of the same global batch
(the exact rule, also for per-sample varying counts, is in :mod:`brainenc.training.objectives`).

>>> trainer = Trainer(model, TrainConfig(epochs=10), objective=VoxelRegression(), run_dir="run")  # doctest: +SKIP
>>> res = trainer.fit({"x": tokens, "y": Y}, val={"x": tokens_val, "y": Y_val})                   # doctest: +SKIP
>>> res.best_epoch, res.best_score, res.val_scores.shape        # val_r; per-voxel r [V]          # doctest: +SKIP
>>> Trainer(model, cfg).fit(tokens, Y, (tokens_val, Y_val))     # the same, array form            # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from brainenc._utils.device import resolve_device
from brainenc._utils.io import write_text
from brainenc._utils.logging import get_logger, progress
from brainenc._utils.validation import check_option
from brainenc.config import to_dict
from brainenc.exceptions import ConfigError, DataFormatError
from brainenc.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_tensors,
    optimizer_from_parts,
    save_checkpoint,
    save_tensors,
)
from brainenc.training.data import DictDataset, make_dict_loader, make_loader
from brainenc.training.ddp import distributed_info
from brainenc.training.losses import pearson_r_torch
from brainenc.training.objectives import LossSum, Objective, Validation, VoxelRegression
from brainenc.training.optim import OPTIMIZERS, SCHEDULES, build_optimizer, build_scheduler
from brainenc.training.seed import capture_rng_state, restore_rng_state, seed_everything

__all__ = ["TrainConfig", "TrainResult", "Trainer"]

log = get_logger("training")


@dataclass
class TrainConfig:
    """Optimisation settings (defaults = reference_systems.md a.3: AdamW + StepLR).

    Parameters
    ----------
    epochs, batch_size : int
        ``batch_size`` is the global batch (split across DDP ranks).
    lr, weight_decay : float
        Learning rate and weight decay of the optimiser.
    optimizer : {'adamw', 'adam', 'sgd'}
        See :mod:`brainenc.training.optim`.
    betas, eps, amsgrad : (float, float), float, bool
        Adam/AdamW only.
    momentum, nesterov : float, bool
        SGD only.
    schedule : {'step', 'constant', 'cosine', 'warmup_cosine'}
        Per-epoch learning-rate schedule (formulas in :mod:`brainenc.training.optim`).
    lr_step, lr_gamma : int, float
        ``step``: multiply the learning rate by ``lr_gamma`` every ``lr_step`` epochs.
    warmup_epochs : int
        ``warmup_cosine``: linear warm-up epochs (``< epochs``).
    min_lr : float
        ``cosine`` / ``warmup_cosine``: final learning rate (``<= lr``).
    grad_clip : float
        Max global gradient norm; 0 disables clipping.
    seed : int
        Seeds python, numpy, torch and the data-order generator.
    amp : bool
        bf16 autocast when training on CUDA (ignored on CPU).
    device : str
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    eval_batch_size : int
    num_workers : int
        DataLoader workers.
    keep_checkpoints : int
        Number of epoch checkpoints kept.

    Notes
    -----
    A setting that does not apply to the chosen ``optimizer`` / ``schedule`` (e.g. ``momentum`` with
    AdamW, ``lr_step`` with ``cosine``) must keep its default: :meth:`check` rejects it rather than
    ignoring it silently.
    """

    epochs: int = 15
    batch_size: int = 16
    lr: float = 5e-4
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    amsgrad: bool = False
    momentum: float = 0.0
    nesterov: bool = False
    schedule: str = "step"
    lr_step: int = 100
    lr_gamma: float = 0.5
    warmup_epochs: int = 0
    min_lr: float = 0.0
    grad_clip: float = 0.1
    seed: int = 0
    amp: bool = True
    device: str = "auto"
    eval_batch_size: int = 64
    num_workers: int = 0
    keep_checkpoints: int = 1

    # settings -> the optimizers / schedules they apply to (elsewhere they must keep their defaults)
    _OPTIMIZER_ONLY = {"betas": ("adamw", "adam"), "eps": ("adamw", "adam"), "amsgrad": ("adamw", "adam"),
                       "momentum": ("sgd",), "nesterov": ("sgd",)}
    _SCHEDULE_ONLY = {"lr_step": ("step",), "lr_gamma": ("step",), "warmup_epochs": ("warmup_cosine",),
                      "min_lr": ("cosine", "warmup_cosine")}

    def check(self) -> None:
        """Validate (never modifies a value); raises a one-line ConfigError."""
        for name in ("epochs", "batch_size", "lr_step", "eval_batch_size", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"'{name}' must be >= 1; {getattr(self, name)!r} was provided")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0 or self.num_workers < 0:
            raise ConfigError("'lr' must be > 0 and 'weight_decay', 'grad_clip', 'num_workers' >= 0")
        check_option("optimizer", self.optimizer, OPTIMIZERS)
        check_option("schedule", self.schedule, SCHEDULES)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"'betas' must be two numbers in [0, 1); {self.betas!r} was provided")
        if self.eps <= 0 or self.momentum < 0 or self.lr_gamma <= 0:
            raise ConfigError("'eps' and 'lr_gamma' must be > 0 and 'momentum' >= 0")
        if not 0.0 <= self.min_lr <= self.lr:
            raise ConfigError(f"'min_lr' must be in [0, lr={self.lr}]; {self.min_lr!r} was provided")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"'warmup_epochs' must be in [0, epochs={self.epochs}); "
                              f"{self.warmup_epochs!r} was provided")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
        for table, chosen, what in ((self._OPTIMIZER_ONLY, self.optimizer, "optimizer"),
                                    (self._SCHEDULE_ONLY, self.schedule, "schedule")):
            for name, applies in table.items():
                if chosen not in applies and norm(getattr(self, name)) != norm(defaults[name]):
                    raise ConfigError(f"'{name}' applies to {what} {' / '.join(map(repr, applies))} only; "
                                      f"{what}={chosen!r} was given")
        if self.nesterov and self.momentum <= 0:
            raise ConfigError("'nesterov' needs 'momentum' > 0")


@dataclass
class TrainResult:
    """Outcome of :meth:`Trainer.fit`.

    Attributes
    ----------
    best_epoch : int
        1-based epoch whose weights the model holds after fit (last epoch without validation; 0 when
        validation never produced a finite score).
    best_score : float
        The objective's selection metric at ``best_epoch`` (nan without validation).
    val_scores : ndarray or None
        The objective's per-output validation array at ``best_epoch`` (voxel regression: per-voxel
        Pearson r, float32 [V]).
    history : list of dict
        One record per epoch: ``epoch``, ``train_loss`` (``Σ total / Σ count`` over the epoch),
        ``lr``, ``seconds`` and the validation metrics (voxel regression: ``val_r``).
    metric : str
        Name of the selection metric.
    mode : {'max', 'min'}
    """

    best_epoch: int
    best_score: float
    val_scores: np.ndarray | None
    history: list = field(default_factory=list)
    metric: str = "val_r"
    mode: str = "max"


class Trainer:
    """Fit an ``nn.Module`` with an :class:`~brainenc.training.objectives.Objective`.

    Parameters
    ----------
    model : nn.Module
    config : TrainConfig, optional
    objective : Objective, optional
        Default :class:`~brainenc.training.objectives.VoxelRegression` (inputs [B, ...] -> responses [B, V]).
    run_dir : path, optional
        Where checkpoints (``checkpoints/``), the best weights (``best/model.safetensors``, with the
        best epoch's ``scores`` stored as ``__<metric>__``) and ``metrics.jsonl`` go; None = in
        memory only (no resume).
    """

    def __init__(self, model: nn.Module, config: TrainConfig | None = None, *, objective: Objective | None = None,
                 run_dir: str | Path | None = None):
        self.config = config or TrainConfig()
        self.config.check()
        self.objective = objective if objective is not None else VoxelRegression()
        if not isinstance(self.objective, Objective):
            raise ConfigError(f"'objective' must be a brainenc.training.Objective; {type(self.objective).__name__} "
                              f"was provided")
        check_option("mode", self.objective.mode, ("max", "min"))
        self.model = model
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.dist = distributed_info()
        self.device = resolve_device(self.config.device, self.dist.local_rank, name="train.device")

    # ---- helpers ----------------------------------------------------------------------------
    def _autocast(self):
        on = self.config.amp and self.device.type == "cuda"
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=on)

    def _to_device(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    @torch.no_grad()
    def predict(self, X, batch_size: int | None = None) -> np.ndarray:
        """Model outputs in input order (model in eval mode).

        Parameters
        ----------
        X : array [n, ...] or mapping with key ``"x"``
        batch_size : int, optional
            Default ``config.eval_batch_size``.

        Returns
        -------
        float32 [n, ...] (voxel regression: [n, V])
        """
        if isinstance(X, Mapping):
            X = X["x"]
        was = self.model.training
        self.model.eval()
        self.model.to(self.device)
        loader, _ = make_loader(X, None, batch_size=batch_size or self.config.eval_batch_size)
        outs = []
        for (x,) in loader:
            with self._autocast():
                outs.append(self.model(x.to(self.device)).float().cpu())
        self.model.train(was)
        return torch.cat(outs).numpy()

    def evaluate(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """Per-voxel Pearson r of :meth:`predict` against ``Y`` [n, V], float32 [V]."""
        pred = torch.from_numpy(self.predict(X))
        return pearson_r_torch(torch.as_tensor(np.asarray(Y, dtype=np.float32)), pred).float().numpy()

    def validate(self, loader) -> Validation:
        """Run ``objective.validate`` on a validation loader (no grad, autocast, eval mode)."""
        was = self.model.training
        self.model.eval()
        with torch.no_grad(), self._autocast():
            v = self.objective.validate(self.model, (self._to_device(b) for b in loader))
        self.model.train(was)
        metric = self.objective.metric
        if metric not in v.metrics:
            raise ConfigError(f"{type(self.objective).__name__}.validate returned {sorted(v.metrics)}, "
                              f"without its selection metric {metric!r}")
        return v

    def _global_count(self, parts: LossSum, n_glob: int, world: int):
        """``N``: number of loss terms in the whole global batch (see objectives module doc)."""
        if parts.per_sample is not None:
            n = n_glob * int(parts.per_sample)
            return n if n > 0 else 1
        c = parts.count
        if world > 1:
            import torch.distributed as dist

            comm = self.device if self.device.type == "cuda" else torch.device("cpu")
            buf = torch.tensor(float(c), dtype=torch.float64, device=comm)
            dist.all_reduce(buf)
            c = buf.item()
        elif torch.is_tensor(c):
            c = c.item()
        return c if c > 0 else 1

    def _write_metrics(self, history: list[dict]) -> None:
        import json

        if self.run_dir is not None and self.dist.rank == 0:
            write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(h, sort_keys=True) + "\n" for h in history))

    def _as_mappings(self, train, Y, val) -> tuple[Mapping[str, Any], Mapping[str, Any] | None]:
        if isinstance(train, Mapping):
            if Y is not None:
                raise ConfigError("fit(train_mapping, ...) takes no 'Y': put the targets in the mapping "
                                  "(e.g. {'x': X, 'y': Y}), or call fit(X, Y, val=(X_val, Y_val))")
            if val is not None and not isinstance(val, Mapping):
                raise ConfigError(f"'val' must be a mapping with the keys of 'train' when 'train' is a mapping; "
                                  f"got {type(val).__name__}")
            return train, val
        # array form fit(X, Y, (X_val, Y_val)) = {"x": X, "y": Y}
        X = train
        if Y is None:
            raise ConfigError("fit(X, Y) needs 'Y' when 'train' is an array "
                              "(or pass a mapping of named arrays, e.g. {'x': X, 'y': Y})")
        if len(X) != len(Y):
            raise DataFormatError(f"X has {len(X)} rows, Y has {len(Y)}")
        if np.asarray(Y[:1]).ndim != 2:
            raise DataFormatError(f"Y must be [n, V]; got shape {np.shape(Y)}")
        if val is not None:
            if isinstance(val, Mapping) or not hasattr(val, "__len__") or len(val) != 2:
                got = type(val).__name__ + (f" of length {len(val)}" if hasattr(val, "__len__") else "")
                raise ConfigError(f"'val' must be a pair (X_val, Y_val) when 'train' is an array; got {got}")
            val = {"x": val[0], "y": val[1]}
        return {"x": X, "y": Y}, val

    # ---- fit --------------------------------------------------------------------------------
    def fit(self, train, Y=None, val=None, *, resume: bool = False,
            callbacks: Sequence[Callable[["Trainer", dict], Any]] = ()) -> TrainResult:
        """Train.

        Parameters
        ----------
        train : mapping name -> array [n, ...], or array X [n, ...]
            Named training arrays with the objective's keys (``objective.keys``; voxel regression:
            ``{"x": inputs [n, ...], "y": responses [n, V]}``); numpy, memmap or
            :class:`~brainenc.training.RowSubset` (rows are read lazily per batch). The array form
            ``fit(X, Y, (X_val, Y_val))`` means ``fit({"x": X, "y": Y}, val={"x": X_val, "y": Y_val})``.
        Y : array [n, V], optional
            Only with the array form.
        val : mapping (or ``(X_val, Y_val)`` with the array form), optional
            Validation data for best-epoch selection on ``objective.metric`` (``objective.mode``).
        resume : bool
            Continue from ``run_dir/checkpoints`` when a checkpoint exists (results are bitwise
            identical to an uninterrupted run on the same device and world size).
        callbacks : sequence of callables ``f(trainer, record)``
            Called on every rank after each epoch's checkpoint is written.

        Returns
        -------
        TrainResult
        """
        cfg, obj = self.config, self.objective
        train, val = self._as_mappings(train, Y, val)
        train_ds = DictDataset(train, "train")
        obj.check_data(train_ds.arrays, "train")
        val_ds = None
        if val is not None:
            val_ds = DictDataset(val, "val")
            obj.check_data(val_ds.arrays, "val")
        rank, world = self.dist.rank, self.dist.world_size
        if len(train_ds) < world:
            raise DataFormatError(f"{len(train_ds)} training samples for {world} processes")
        metric = obj.metric

        gen = seed_everything(cfg.seed)
        model = self.model.to(self.device)
        opt = build_optimizer(model.parameters(), cfg)
        sched = build_scheduler(opt, cfg)
        history: list[dict] = []
        best_epoch, best_score, best_state, best_scores = 0, obj.worst(), None, None
        start = 0
        ckpt_root = self.run_dir / "checkpoints" if self.run_dir is not None else None
        folder = latest_checkpoint(ckpt_root) if (resume and ckpt_root is not None) else None
        rng_restore = None
        if folder is not None:
            ck = load_checkpoint(folder, self.device)
            st = ck["state"]
            if st.get("metric", metric) != metric:
                raise ConfigError(f"{folder}: checkpoint selects on {st['metric']!r}, this objective on {metric!r}")
            model.load_state_dict(ck["model"])
            optimizer_from_parts(opt, ck["optimizer_tensors"], st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            obj.load_state_dict(st.get("objective", {}))
            history = list(st["history"])
            best_epoch, best_score = int(st["best_epoch"]), float(st["best_score"])
            start = int(st["epoch"])
            if val_ds is not None and best_epoch > 0:
                best_file = load_tensors(self.run_dir / "best" / "model.safetensors", self.device)
                scores_t = best_file.pop(f"__{metric}__", None)
                best_state = best_file
                best_scores = None if scores_t is None else scores_t.cpu().numpy()
            rng_restore = (ck["rng"], st["rng"])
            if rank == 0:
                log.info(f"resuming from {folder} (epoch {start}/{cfg.epochs})")

        train_model: nn.Module = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # a model whose batches leave some parameters without a gradient (one embedding block per
            # subject: a shard without subject s) says so; DDP then finds them each step instead of
            # waiting for their gradients, which would pair different collectives across ranks
            find_unused = bool(getattr(model, "ddp_find_unused_parameters", False))
            train_model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                              find_unused_parameters=find_unused)
        loader, sampler = make_dict_loader(train_ds, batch_size=cfg.batch_size, generator=gen, rank=rank,
                                           world=world, num_workers=cfg.num_workers)
        val_loader = None
        if val_ds is not None:
            val_loader, _ = make_dict_loader(val_ds, batch_size=cfg.eval_batch_size)
        if rng_restore is not None:
            restore_rng_state(rng_restore[0], rng_restore[1], gen)

        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            model.train()
            obj.set_epoch(epoch)
            loss_sum = torch.zeros((), dtype=torch.float64)
            count = torch.zeros((), dtype=torch.float64)
            # iterate an explicit iterator: wrapping the DataLoader itself in tqdm creates a second
            # iterator (and a second seed draw from the data generator) on rank 0 only
            batches = iter(loader)
            if rank == 0:
                batches = progress(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", total=len(sampler), unit="batch")
            for step, batch in enumerate(batches):
                n_glob = sampler.last_global_sizes[step]
                batch = self._to_device(batch)
                with self._autocast():
                    parts = obj.loss(train_model, batch)
                loss = parts.total * (world / self._global_count(parts, n_glob, world))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                loss_sum += parts.total.detach().double().cpu()
                count += parts.count.detach().double().cpu() if torch.is_tensor(parts.count) else parts.count
            if world > 1:
                import torch.distributed as dist

                buf = torch.stack([loss_sum, count]).to(self.device if self.device.type == "cuda" else "cpu")
                dist.all_reduce(buf)
                loss_sum, count = buf[0].cpu(), buf[1].cpu()
            lr = opt.param_groups[0]["lr"]
            sched.step()
            record = {"epoch": epoch + 1, "train_loss": float(loss_sum / count.clamp_min(1)), "lr": lr}
            if val_loader is not None:
                v = self.validate(val_loader)
                score = float(v.metrics[metric])
                record.update({k: float(x) for k, x in v.metrics.items()})
                if obj.better(score, best_score):
                    best_epoch, best_score, best_scores = epoch + 1, score, v.scores
                    best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
                    if self.run_dir is not None and rank == 0:
                        extra = {} if v.scores is None else {f"__{metric}__": torch.from_numpy(np.asarray(v.scores))}
                        save_tensors(self.run_dir / "best" / "model.safetensors", {**best_state, **extra},
                                     metadata={"epoch": str(best_epoch), metric: repr(score)})
            else:
                best_epoch, best_score = epoch + 1, float("nan")
            record["seconds"] = round(time.perf_counter() - t0, 3)
            history.append(record)
            if ckpt_root is not None and rank == 0:
                rng_t, rng_m = capture_rng_state(gen)
                save_checkpoint(ckpt_root, epoch + 1, model_state=model.state_dict(), optimizer=opt,
                                rng_tensors=rng_t, keep=cfg.keep_checkpoints,
                                state={"history": history, "best_epoch": best_epoch, "best_score": best_score,
                                       "metric": metric, "objective": obj.state_dict(),
                                       "scheduler": sched.state_dict(), "rng": rng_m, "config": to_dict(cfg),
                                       "world_size": world})
                self._write_metrics(history)
            if world > 1:
                from brainenc.training.ddp import barrier

                barrier()
            if rank == 0:
                log.debug(f"epoch {epoch + 1}: " + ", ".join(f"{k}={v}" for k, v in record.items()))
            for cb in callbacks:
                cb(self, record)

        if val_loader is not None and best_state is not None:
            model.load_state_dict(best_state)
        self.result_ = TrainResult(best_epoch=best_epoch, best_score=best_score, val_scores=best_scores,
                                   history=history, metric=metric, mode=obj.mode)
        return self.result_
