"""Training objectives: what the :class:`~brainenc.training.Trainer` optimises and selects on.

An objective turns a batch (a dict of tensors from :func:`~brainenc.training.data.make_dict_loader`)
into a loss, and a validation set into metrics. The trainer owns everything else: device, autocast,
DDP, optimiser, schedule, seeding, checkpoints, resume, best-epoch selection.

Contract
--------
``loss(model, batch) -> LossSum``
    ``batch``: ``{name: Tensor [b, ...]}`` on the training device plus ``"index"`` (int64 [b], dataset
    rows), ``b`` = this rank's shard of the global batch. ``model`` is the training module (the DDP
    wrapper under ``torchrun``: call it, reach the bare module through ``model.module`` if needed).
    Runs under the trainer's autocast (bf16 on CUDA when ``amp``): reduce in float32.
    Return the **sum** of the per-term losses over the shard and the number of terms, never a mean:

    - ``total`` : Tensor [] float32, graph attached; ``Σ_terms ℓ`` over this rank's shard;
    - ``count`` : int, float or Tensor []; the number of terms in ``total`` on this rank;
    - ``per_sample`` : int or None; set it when *every* sample contributes exactly this many terms.

    **Normalisation rule (exact under DDP).** The step's loss is the global mean over terms,
    ``L = Σ_r total_r / N`` with ``N = Σ_r count_r`` summed over the ``W`` ranks (the whole global
    batch). Rank ``r`` back-propagates ``total_r · W / N``; DDP averages gradients over ranks, so every
    parameter receives ``∇L`` — the single-process gradient of the same global batch (up to float
    summation order). ``N = n_global · per_sample`` when ``per_sample`` is set (``n_global`` from
    ``GlobalBatchSampler.last_global_sizes``, no communication); otherwise the trainer all-reduces the
    per-rank counts before ``backward`` (one scalar collective per step; e.g. masked reconstruction,
    whose number of masked elements differs per sample). ``N = 0`` (nothing to score in the global
    batch) is taken as 1, i.e. no gradient. To weight every *sample* equally whatever its number of
    terms, return ``total = Σ_samples mean_i`` with ``count = b`` and ``per_sample = 1``.
    Terms that couple samples (a contrastive InfoNCE over the batch) are not sums over one rank's
    shard: such an objective must gather the other ranks' embeddings with a differentiable
    ``torch.distributed.nn.functional.all_gather`` and return the terms of its own rows only
    (``count = b``, ``per_sample = 1``) — the rule above then still gives the global-batch gradient.

``validate(model, batches) -> Validation``
    ``batches``: iterator of the validation batches (same dict layout, all rows in order, every rank
    sees all of them), called under ``torch.no_grad()``, the trainer's autocast and ``model.eval()``;
    ``model`` is the bare module. Returns metrics (floats, must include ``metric``) and optionally a
    per-output array (``scores``; voxel regression: per-voxel r [V], used for ensembling).

``metric``, ``mode``
    Name of the selection metric in ``Validation.metrics`` and whether larger (``"max"``) or smaller
    (``"min"``) is better; the trainer keeps the weights of the best epoch.

``set_epoch(epoch)``, ``state_dict()`` / ``load_state_dict(state)``
    Called at the start of every training epoch (0-based); JSON-serialisable state saved in every
    checkpoint (default: stateless).

Randomness: an objective that draws (masks, noise) must make the draw a function of
``(seed, epoch, batch["index"])`` (see :class:`MaskedReconstruction`), not of a generator advanced per
batch: the draw for a sample is then the same for 1 or N ranks, for any batch composition, and after
resume without extra state.
"""
from __future__ import annotations

import abc

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from brainenc.exceptions import ConfigError, DataFormatError
from brainenc.training.data import INDEX_KEY
from brainenc.training.losses import mse_sum, pearson_r_torch

__all__ = ["LossSum", "Validation", "Objective", "VoxelRegression", "MaskedReconstruction"]

Batch = Mapping[str, torch.Tensor]


@dataclass
class LossSum:
    """A loss as a sum of terms and the number of terms (see the module doc for the rule).

    Attributes
    ----------
    total : Tensor [] float32
        Sum of per-term losses over this rank's shard (graph attached during training).
    count : int, float or Tensor []
        Number of terms in ``total`` on this rank.
    per_sample : int or None
        Terms per sample when the same for every sample (the global count is then known without
        communication); None = the trainer all-reduces ``count`` under DDP.
    """

    total: torch.Tensor
    count: Any
    per_sample: int | None = None


@dataclass
class Validation:
    """Outcome of :meth:`Objective.validate`.

    Attributes
    ----------
    metrics : dict str -> float
        Logged in the epoch record; must include the objective's ``metric``.
    scores : ndarray or None
        Per-output array at this epoch, kept for the best epoch (``TrainResult.val_scores``), e.g.
        per-voxel Pearson r float32 [V].
    """

    metrics: dict
    scores: np.ndarray | None = None


class Objective(abc.ABC):
    """Base class of training objectives (see the module doc for the contract).

    Subclasses set ``metric``, ``mode`` and ``keys`` and implement :meth:`loss`; the default
    :meth:`validate` reports the loss of the validation set as ``val_loss`` (``Σ total / Σ count``).

    Attributes
    ----------
    metric : str
        Selection metric (a key of ``Validation.metrics``).
    mode : {'max', 'min'}
    keys : tuple of str
        Array names every data mapping must contain.
    """

    metric: str = "val_loss"
    mode: str = "min"
    keys: tuple[str, ...] = ("x",)

    # ---- hooks ---------------------------------------------------------------------------------
    def check_data(self, data: Mapping[str, Any], name: str) -> None:
        """Validate a data mapping (``name`` = ``"train"`` / ``"val"``) before training; raise DataFormatError."""
        missing = [k for k in self.keys if k not in data]
        if missing:
            raise DataFormatError(f"'{name}' lacks the arrays {missing} needed by {type(self).__name__} "
                                  f"(it has {sorted(data)})")

    def set_epoch(self, epoch: int) -> None:
        """Called at the start of every training epoch (0-based)."""

    def state_dict(self) -> dict:
        """JSON-serialisable state saved in checkpoints."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""

    def better(self, score: float, best: float) -> bool:
        """Whether ``score`` improves on ``best`` under ``mode`` (NaN never does)."""
        return score > best if self.mode == "max" else score < best

    def worst(self) -> float:
        """Starting value of the best score (-inf for ``max``, +inf for ``min``)."""
        return -math.inf if self.mode == "max" else math.inf

    # ---- the objective -------------------------------------------------------------------------
    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> LossSum:
        """Sum of the loss terms of this rank's shard; see the module doc."""

    def validate(self, model: nn.Module, batches: Iterable[Batch]) -> Validation:
        """Default: ``{"val_loss": Σ total / Σ count}`` over the validation batches."""
        total, count = 0.0, 0.0
        for batch in batches:
            parts = self.loss(model, batch)
            total += float(parts.total.detach().double())
            count += float(parts.count)
        return Validation({"val_loss": total / max(count, 1.0)})


class VoxelRegression(Objective):
    """Regress responses ``y`` [b, V] from inputs ``x`` [b, ...]: MSE over samples × voxels, select on
    the mean per-voxel validation Pearson r (``val_r``, max); ``scores`` = per-voxel r float32 [V].

    Data keys: ``"x"`` (any shape the model takes, e.g. tokens [n, n_tokens, dim]) and ``"y"`` [n, V].
    """

    metric = "val_r"
    mode = "max"
    keys = ("x", "y")

    def check_data(self, data: Mapping[str, Any], name: str) -> None:
        super().check_data(data, name)
        if len(np.shape(data["y"])) != 2:
            raise DataFormatError(f"'{name}[\"y\"]' must be [n, V]; got shape {np.shape(data['y'])}")

    def loss(self, model: nn.Module, batch: Batch) -> LossSum:
        y = batch["y"]
        pred = model(batch["x"])
        return LossSum(mse_sum(pred, y), y.numel(), per_sample=y[0].numel())

    def validate(self, model: nn.Module, batches: Iterable[Batch]) -> Validation:
        preds, ys = [], []
        for batch in batches:
            preds.append(model(batch["x"]).float().cpu())
            ys.append(batch["y"].float().cpu())
        r = pearson_r_torch(torch.cat(ys), torch.cat(preds)).float().numpy()
        return Validation({"val_r": float(np.mean(r))}, scores=r)


class MaskedReconstruction(Objective):
    """Mask random positions of ``x`` and reconstruct them; MSE over the masked elements only.

    ``x`` [b, T, ...]: each of the ``T`` positions (tokens, time points, ROIs) of each sample is
    masked independently with probability ``mask_ratio`` (all trailing features of a masked position
    together; ``x`` [b, T] masks single elements). The model receives ``x`` with masked positions set
    to ``fill`` and returns a reconstruction of ``x``'s shape. Loss terms are the squared errors of the
    masked elements, so the count differs per sample (all-reduced under DDP, see the module doc).
    Selection: ``val_masked_mse`` (min) on validation masks fixed for the whole fit.

    Masks are a function of ``(seed, stream, epoch, row)`` alone (numpy ``SeedSequence``), ``stream``
    0 for training (fresh masks every epoch) and 1 for validation (epoch 0 always).

    Parameters
    ----------
    mask_ratio : float in (0, 1)
    seed : int >= 0
    key : str
        Name of the input array.
    fill : float
        Value written into masked positions.
    """

    metric = "val_masked_mse"
    mode = "min"

    def __init__(self, mask_ratio: float = 0.5, *, seed: int = 0, key: str = "x", fill: float = 0.0):
        if not 0.0 < float(mask_ratio) < 1.0:
            raise ConfigError(f"'mask_ratio' must be in (0, 1); {mask_ratio!r} was provided")
        if int(seed) < 0:
            raise ConfigError(f"'seed' must be >= 0; {seed!r} was provided")
        self.mask_ratio, self.seed, self.key, self.fill = float(mask_ratio), int(seed), key, float(fill)
        self.keys = (key,)
        self._epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def mask(self, index: torch.Tensor, n_positions: int, *, stream: int, epoch: int) -> torch.Tensor:
        """Boolean mask [b, n_positions] (True = masked) for dataset rows ``index`` [b]."""
        rows = [np.random.default_rng([self.seed, stream, epoch, int(i)]).random(n_positions) < self.mask_ratio
                for i in index.tolist()]
        return torch.from_numpy(np.stack(rows))

    def _sse(self, model: nn.Module, batch: Batch, *, stream: int, epoch: int) -> LossSum:
        x = batch[self.key]
        if x.ndim < 2:
            raise DataFormatError(f"'{self.key}' must be [n, T, ...]; got shape {tuple(x.shape)}")
        m = self.mask(batch[INDEX_KEY], x.shape[1], stream=stream, epoch=epoch).to(x.device)
        m = m.view(*m.shape, *([1] * (x.ndim - 2))).expand_as(x)
        rec = model(x.masked_fill(m, self.fill))
        err = (rec.float() - x.float())[m]
        return LossSum(err.pow(2).sum(), int(m.sum()))

    def loss(self, model: nn.Module, batch: Batch) -> LossSum:
        return self._sse(model, batch, stream=0, epoch=self._epoch)

    def validate(self, model: nn.Module, batches: Iterable[Batch]) -> Validation:
        total, count = 0.0, 0
        for batch in batches:
            parts = self._sse(model, batch, stream=1, epoch=0)
            total += float(parts.total.double())
            count += parts.count
        return Validation({"val_masked_mse": total / max(count, 1)})
