"""Trainer: AdamW + StepLR + grad clipping, best-epoch selection on validation mean Pearson r,
seeded everything, bf16 autocast on CUDA, safetensors+JSON checkpoints with bitwise resume,
DistributedDataParallel under ``torchrun``.

Loss: mean squared error over the *global* batch × voxels. Under DDP each rank computes the sum of
squared errors of its shard divided by the global element count, times the world size, so DDP's
gradient averaging yields exactly the single-process gradient of the same global batch.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from brainenc._utils.io import write_text
from brainenc._utils.logging import get_logger, progress
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
from brainenc.training.data import make_loader
from brainenc.training.ddp import distributed_info
from brainenc.training.losses import mse_sum, pearson_r_torch
from brainenc.training.seed import capture_rng_state, restore_rng_state, seed_everything

__all__ = ["TrainConfig", "TrainResult", "Trainer"]

log = get_logger("training")


@dataclass
class TrainConfig:
    """Optimisation settings (defaults = reference_systems.md a.3).

    Parameters
    ----------
    epochs, batch_size : int
        ``batch_size`` is the global batch (split across DDP ranks).
    lr, weight_decay : float
        AdamW.
    grad_clip : float
        Max global gradient norm; 0 disables clipping.
    lr_step, lr_gamma : int, float
        StepLR: multiply the learning rate by ``lr_gamma`` every ``lr_step`` epochs.
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
    """

    epochs: int = 15
    batch_size: int = 16
    lr: float = 5e-4
    weight_decay: float = 1e-4
    grad_clip: float = 0.1
    lr_step: int = 100
    lr_gamma: float = 0.5
    seed: int = 0
    amp: bool = True
    device: str = "auto"
    eval_batch_size: int = 64
    num_workers: int = 0
    keep_checkpoints: int = 1

    def check(self) -> None:
        for name in ("epochs", "batch_size", "lr_step", "eval_batch_size", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"'{name}' must be >= 1; {getattr(self, name)!r} was provided")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0 or self.num_workers < 0:
            raise ConfigError("'lr' must be > 0 and 'weight_decay', 'grad_clip', 'num_workers' >= 0")


@dataclass
class TrainResult:
    """Outcome of :meth:`Trainer.fit`.

    Attributes
    ----------
    best_epoch : int
        1-based epoch whose weights the model holds after fit (last epoch without validation).
    best_score : float
        Validation mean Pearson r at ``best_epoch`` (nan without validation).
    val_scores : ndarray float32 [V] or None
        Per-voxel validation r at ``best_epoch``.
    history : list of dict
        One record per epoch (``epoch``, ``train_loss``, ``val_r``, ``lr``, ``seconds``).
    """

    best_epoch: int
    best_score: float
    val_scores: np.ndarray | None
    history: list = field(default_factory=list)


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


class Trainer:
    """Fit an ``nn.Module`` mapping inputs [B, ...] to voxel responses [B, V].

    Parameters
    ----------
    model : nn.Module
    config : TrainConfig, optional
    run_dir : path, optional
        Where checkpoints (``checkpoints/``), the best weights (``best/``) and ``metrics.jsonl``
        go; None = in memory only (no resume).
    """

    def __init__(self, model: nn.Module, config: TrainConfig | None = None, *, run_dir: str | Path | None = None):
        self.config = config or TrainConfig()
        self.config.check()
        self.model = model
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.dist = distributed_info()
        self.device = _resolve_device(self.config.device, self.dist.local_rank)

    # ---- helpers ----------------------------------------------------------------------------
    def _autocast(self):
        on = self.config.amp and self.device.type == "cuda"
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=on)

    @torch.no_grad()
    def predict(self, X: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Predictions, float32 [n, V], in input order (model in eval mode)."""
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
        """Per-voxel Pearson r, float32 [V]."""
        pred = torch.from_numpy(self.predict(X))
        return pearson_r_torch(torch.as_tensor(np.asarray(Y, dtype=np.float32)), pred).float().numpy()

    def _write_metrics(self, history: list[dict]) -> None:
        import json

        if self.run_dir is not None and self.dist.rank == 0:
            write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(h, sort_keys=True) + "\n" for h in history))

    # ---- fit --------------------------------------------------------------------------------
    def fit(self, X: np.ndarray, Y: np.ndarray, val: tuple[np.ndarray, np.ndarray] | None = None, *,
            resume: bool = False, callbacks: Sequence[Callable[["Trainer", dict], Any]] = ()) -> TrainResult:
        """Train.

        Parameters
        ----------
        X : array [n, ...]
            Inputs (e.g. tokens [n, n_tokens, dim]); numpy or memmap.
        Y : array [n, V]
        val : (X_val, Y_val), optional
            Validation data for best-epoch selection (mean per-voxel Pearson r).
        resume : bool
            Continue from ``run_dir/checkpoints`` when a checkpoint exists (results are bitwise
            identical to an uninterrupted run on the same device and world size).
        callbacks : sequence of callables ``f(trainer, record)``
            Called on every rank after each epoch's checkpoint is written.

        Returns
        -------
        TrainResult
        """
        cfg = self.config
        if len(X) != len(Y):
            raise DataFormatError(f"X has {len(X)} rows, Y has {len(Y)}")
        if np.asarray(Y[:1]).ndim != 2:
            raise DataFormatError(f"Y must be [n, V]; got shape {np.shape(Y)}")
        if len(X) < self.dist.world_size:
            raise DataFormatError(f"{len(X)} training samples for {self.dist.world_size} processes")
        n_vox = int(np.shape(Y)[1])
        rank, world = self.dist.rank, self.dist.world_size

        gen = seed_everything(cfg.seed)
        model = self.model.to(self.device)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
        history: list[dict] = []
        best_epoch, best_score, best_state, best_r = 0, -math.inf, None, None
        start = 0
        ckpt_root = self.run_dir / "checkpoints" if self.run_dir is not None else None
        folder = latest_checkpoint(ckpt_root) if (resume and ckpt_root is not None) else None
        rng_restore = None
        if folder is not None:
            ck = load_checkpoint(folder, self.device)
            st = ck["state"]
            model.load_state_dict(ck["model"])
            optimizer_from_parts(opt, ck["optimizer_tensors"], st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            history = list(st["history"])
            best_epoch, best_score = int(st["best_epoch"]), float(st["best_score"])
            start = int(st["epoch"])
            if best_epoch > 0:
                best_file = load_tensors(self.run_dir / "best" / "model.safetensors", self.device)
                best_r_t = best_file.pop("__val_r__", None)
                best_state = best_file
                best_r = None if best_r_t is None else best_r_t.cpu().numpy()
            rng_restore = (ck["rng"], st["rng"])
            if rank == 0:
                log.info(f"resuming from {folder} (epoch {start}/{cfg.epochs})")

        train_model: nn.Module = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            train_model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        loader, sampler = make_loader(X, Y, batch_size=cfg.batch_size, generator=gen, rank=rank, world=world,
                                      num_workers=cfg.num_workers)
        if rng_restore is not None:
            restore_rng_state(rng_restore[0], rng_restore[1], gen)

        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            model.train()
            sse = torch.zeros((), dtype=torch.float64)
            count = torch.zeros((), dtype=torch.float64)
            # iterate an explicit iterator: wrapping the DataLoader itself in tqdm creates a second
            # iterator (and a second seed draw from the data generator) on rank 0 only
            batches = iter(loader)
            if rank == 0:
                batches = progress(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", total=len(sampler), unit="batch")
            for step, (x, y) in enumerate(batches):
                n_glob = sampler.last_global_sizes[step]
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                with self._autocast():
                    pred = train_model(x)
                s = mse_sum(pred, y)
                loss = s * (world / (n_glob * n_vox))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                sse += s.detach().double().cpu()
                count += y.numel()
            if world > 1:
                import torch.distributed as dist

                buf = torch.stack([sse, count]).to(self.device if self.device.type == "cuda" else "cpu")
                dist.all_reduce(buf)
                sse, count = buf[0].cpu(), buf[1].cpu()
            lr = opt.param_groups[0]["lr"]
            sched.step()
            record = {"epoch": epoch + 1, "train_loss": float(sse / count.clamp_min(1)), "lr": lr}
            if val is not None:
                r = self.evaluate(val[0], val[1])
                score = float(np.mean(r))
                record["val_r"] = score
                if score > best_score:
                    best_epoch, best_score, best_r = epoch + 1, score, r
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    if self.run_dir is not None and rank == 0:
                        save_tensors(self.run_dir / "best" / "model.safetensors",
                                     {**best_state, "__val_r__": torch.from_numpy(r)},
                                     metadata={"epoch": str(best_epoch), "val_r": repr(score)})
            else:
                best_epoch, best_score = epoch + 1, float("nan")
            record["seconds"] = round(time.perf_counter() - t0, 3)
            history.append(record)
            if ckpt_root is not None and rank == 0:
                rng_t, rng_m = capture_rng_state(gen)
                save_checkpoint(ckpt_root, epoch + 1, model_state=model.state_dict(), optimizer=opt,
                                rng_tensors=rng_t, keep=cfg.keep_checkpoints,
                                state={"history": history, "best_epoch": best_epoch, "best_score": best_score,
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

        if val is not None and best_state is not None:
            model.load_state_dict(best_state)
        self.result_ = TrainResult(best_epoch=best_epoch, best_score=best_score, val_scores=best_r, history=history)
        return self.result_
