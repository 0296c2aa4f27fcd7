"""BrainMAE: region-aware masked-autoencoder pretraining of ROI time series, and fine-tuning heads.

>>> mae = BrainMAE(tr=2.0, model={"d_model": 64}, train={"epochs": 10})          # doctest: +SKIP
>>> mae.fit(series)            # list of [n_timepoints_i, n_rois] or [n_subjects, n_timepoints, n_rois]
>>> Z = mae.transform(series)  # [n_subjects, d_model]; mae.roi_graph_ is the learned A [R, R]
>>> mae.save_pretrained("run/brainmae")                                            # doctest: +SKIP
>>> clf = BrainMAEClassifier(pretrained="run/brainmae").fit(series, labels)        # doctest: +SKIP

Pipeline (docs/brainmae.md): each sample's series is z-scored per ROI, cut into segments of
``round(segment_seconds / tr)`` time points (stride ``round(segment_stride_seconds / tr)``; the
remainder is dropped), and segments are the pretraining rows. :class:`BrainMAEObjective` masks whole
ROIs of a segment (ratio ``r ~ U(mask_ratio)`` per segment and epoch, ``round(r · R)`` ROIs) and
minimises ``λ·MSE_masked + (1−λ)·MSE_unmasked`` per segment (mean over segments). Masks are a function
of ``(seed, stream, epoch, row)`` so fits are reproducible and resumable through the Trainer.

This module imports torch (its objectives subclass :class:`brainenc.training.Objective`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, TransformerMixin

from brainenc._utils.logging import get_logger
from brainenc._utils.tensors import WeightsMismatchError, load_module_state
from brainenc._utils.validation import check_option
from brainenc.config import from_dict, nested_config, to_dict
from brainenc.estimator import (
    EstimatorMixin,
    register_estimator,
    to_json_value,
)
from brainenc.exceptions import ConfigError, DataFormatError
from brainenc.training.objectives import Objective

__all__ = ["BrainMAE", "BrainMAEClassifier", "BrainMAERegressor", "BrainMAEObjective", "SupervisedSegments",
           "segment_series", "segment_length", "prepare_series", "draw_roi_mask", "TRAIN_DEFAULTS",
           "STANDARDIZE"]

log = get_logger("pretraining.brainmae")

#: TrainConfig fields BrainMAE starts from (our choice; the paper's optimisation is not known)
TRAIN_DEFAULTS: dict[str, Any] = {"epochs": 30, "batch_size": 32, "lr": 1e-3, "weight_decay": 1e-4,
                                  "grad_clip": 1.0, "schedule": "cosine"}
STANDARDIZE = ("series", "segment", "none")
_NESTED = ("model", "train")


# ---- data preparation ----------------------------------------------------------------------------
def segment_length(tr: float, seconds: float) -> int:
    """Time points per segment: ``max(1, round(seconds / tr))``."""
    return max(1, int(round(float(seconds) / float(tr))))


def prepare_series(X, name: str = "X") -> list[np.ndarray]:
    """Validate ``X`` into a list of float32 arrays [n_timepoints_i, n_rois].

    Parameters
    ----------
    X : list of arrays [n_timepoints_i, n_rois], or array [n_samples, n_timepoints, n_rois]

    Raises
    ------
    DataFormatError
        Wrong number of dimensions, differing ROI counts, NaN/inf, no samples (one line naming ``name``).
    """
    if isinstance(X, np.ndarray) and X.dtype != object:
        if X.ndim != 3:
            hint = " (wrap one subject's series in a list)" if X.ndim == 2 else ""
            raise DataFormatError(f"'{name}' must be a list of [n_timepoints, n_rois] arrays or an array "
                                  f"[n_samples, n_timepoints, n_rois]; got shape {X.shape}{hint}")
        items = list(X)
    elif isinstance(X, (list, tuple, np.ndarray)):
        items = list(X)
    else:
        raise DataFormatError(f"'{name}' must be a list of [n_timepoints, n_rois] arrays or an array "
                              f"[n_samples, n_timepoints, n_rois]; got {type(X).__name__}")
    if not items:
        raise DataFormatError(f"'{name}' holds no samples")
    out = []
    for i, a in enumerate(items):
        a = np.asarray(a)
        if a.ndim != 2:
            raise DataFormatError(f"'{name}[{i}]' must be [n_timepoints, n_rois]; got shape {a.shape}")
        if a.dtype.kind not in "fiu":
            raise DataFormatError(f"'{name}[{i}]' must be numeric; got dtype {a.dtype}")
        a = a.astype(np.float32, copy=False)
        if not np.isfinite(a).all():
            raise DataFormatError(f"'{name}[{i}]' contains {int((~np.isfinite(a)).sum())} NaN/inf values")
        if out and a.shape[1] != out[0].shape[1]:
            raise DataFormatError(f"'{name}[{i}]' has {a.shape[1]} ROIs, '{name}[0]' has {out[0].shape[1]}")
        out.append(a)
    return out


def _zscore(a: np.ndarray, axis: int) -> np.ndarray:
    mean = a.mean(axis, keepdims=True, dtype=np.float64)
    sd = a.std(axis, keepdims=True, dtype=np.float64)
    sd = np.where(sd > 1e-8, sd, 1.0)
    return ((a - mean) / sd).astype(np.float32)


def segment_series(series: np.ndarray, length: int, stride: int, *, standardize: str = "series",
                   name: str = "X") -> np.ndarray:
    """Cut one series into segments.

    Parameters
    ----------
    series : float array [n_timepoints, n_rois]
    length, stride : int
        Segment length and step in time points (non-overlapping when equal).
    standardize : {'series', 'segment', 'none'}
        z-score every ROI over the whole series, over each segment, or not at all.

    Returns
    -------
    float32 [n_segments, n_rois, length]
        ``n_segments = (n_timepoints - length) // stride + 1``; trailing time points are dropped.
    """
    T = series.shape[0]
    if T < length:
        raise DataFormatError(f"'{name}' has {T} time points, fewer than one segment ({length} time points); "
                              f"use a shorter 'segment_seconds' or a longer series")
    if standardize == "series":
        series = _zscore(series, 0)
    win = np.lib.stride_tricks.sliding_window_view(series, length, axis=0)[::stride]  # [n_seg, R, length]
    win = np.ascontiguousarray(win, dtype=np.float32)
    if standardize == "segment":
        win = _zscore(win, 2)
    return win


def draw_roi_mask(seed: int, stream: int, epoch: int, row: int, n_rois: int,
                  ratio_range: tuple[float, float]) -> tuple[np.ndarray, float]:
    """Segment-wise ROI mask of one row: ``r ~ U(ratio_range)``, ``round(r · n_rois)`` ROIs masked.

    A function of ``(seed, stream, epoch, row)`` only (numpy ``SeedSequence``).

    Returns
    -------
    mask : bool [n_rois]
        True = masked (for every time point of the segment).
    ratio : float
        The drawn ratio ``r``.
    """
    rng = np.random.default_rng([int(seed), int(stream), int(epoch), int(row)])
    lo, hi = ratio_range
    r = float(rng.uniform(lo, hi)) if hi > lo else float(lo)
    k = int(round(r * n_rois))
    mask = np.zeros(n_rois, dtype=bool)
    mask[rng.permutation(n_rois)[:k]] = True
    return mask, r


# ---- objectives ----------------------------------------------------------------------------------
class BrainMAEObjective(Objective):
    """Masked ROI reconstruction of segments ``x`` [b, R, L] with the BrainMAE loss.

    Per segment ``i``: ``ℓ_i = λ · mean_{masked}(x̂ − x)² + (1 − λ) · mean_{unmasked}(x̂ − x)²`` (an empty
    term is 0); the loss is the mean of ``ℓ_i`` over segments (``count = b``, ``per_sample = 1``: exact
    under DDP). ``masking=False`` (vanilla-BrainAE ablation): no mask, ``ℓ_i = mean(x̂ − x)²``.
    Validation (fixed masks, stream 1): ``val_loss`` (selection, min), ``val_masked_mse``,
    ``val_unmasked_mse`` (element means over the validation set).

    Parameters
    ----------
    mask_ratio : (float, float)
        Range of the per-segment ratio, ``0 <= lo <= hi < 1``.
    mask_weight : float
        λ in [0, 1].
    masking : bool
    seed : int
    key : str
    """

    metric = "val_loss"
    mode = "min"

    def __init__(self, mask_ratio: tuple[float, float] = (0.0, 0.8), mask_weight: float = 0.75, *,
                 masking: bool = True, seed: int = 0, key: str = "x"):
        lo, hi = _check_ratio(mask_ratio, "mask_ratio")
        _check_unit(mask_weight, "mask_weight")
        self.mask_ratio, self.mask_weight, self.masking = (lo, hi), float(mask_weight), bool(masking)
        self.seed, self.key, self.keys = int(seed), key, (key,)
        self._epoch = 0

    def check_data(self, data, name):
        super().check_data(data, name)
        if len(np.shape(data[self.key])) != 3:
            raise DataFormatError(f"'{name}[{self.key!r}]' must be segments [n, n_rois, length]; "
                                  f"got shape {np.shape(data[self.key])}")

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def mask(self, index, n_rois: int, *, stream: int, epoch: int):
        """Bool tensor [b, n_rois] (True = masked) for dataset rows ``index`` [b]."""
        import torch

        rows = [draw_roi_mask(self.seed, stream, epoch, int(i), n_rois, self.mask_ratio)[0] for i in index.tolist()]
        return torch.from_numpy(np.stack(rows))

    def terms(self, model, batch, *, stream: int, epoch: int):
        """Per-segment squared-error sums and counts: (sse_m [b], n_m [b], sse_u [b], n_u [b]) float32."""
        from brainenc.training.data import INDEX_KEY

        x = batch[self.key]
        if self.masking:
            m = self.mask(batch[INDEX_KEY], x.shape[1], stream=stream, epoch=epoch).to(x.device)
            rec = model(x, m)
        else:
            m = None
            rec = model(x)
        err = (rec.float() - x.float()).pow(2).sum(-1)  # [b, R]
        L = x.shape[-1]
        if m is None:
            zero = err.new_zeros(err.shape[0])
            return zero, zero, err.sum(1), err.new_full((err.shape[0],), float(err.shape[1] * L))
        mf = m.to(err.dtype)
        n_m = mf.sum(1) * L
        return (err * mf).sum(1), n_m, (err * (1 - mf)).sum(1), (1 - mf).sum(1) * L

    def combine(self, sse_m, n_m, sse_u, n_u):
        """``ℓ_i`` [b] from the per-segment sums (see the class doc)."""
        if not self.masking:
            return sse_u / n_u.clamp_min(1)
        lam = self.mask_weight
        return lam * sse_m / n_m.clamp_min(1) + (1 - lam) * sse_u / n_u.clamp_min(1)

    def loss(self, model, batch):
        from brainenc.training.objectives import LossSum

        parts = self.terms(model, batch, stream=0, epoch=self._epoch)
        per = self.combine(*parts)
        return LossSum(per.sum(), per.shape[0], per_sample=1)

    def validate(self, model, batches):
        from brainenc.training.objectives import Validation

        tot, n, sm, nm, su, nu = 0.0, 0, 0.0, 0.0, 0.0, 0.0
        for batch in batches:
            parts = self.terms(model, batch, stream=1, epoch=0)
            tot += float(self.combine(*parts).double().sum())
            n += parts[0].shape[0]
            sm, nm = sm + float(parts[0].double().sum()), nm + float(parts[1].double().sum())
            su, nu = su + float(parts[2].double().sum()), nu + float(parts[3].double().sum())
        return Validation({"val_loss": tot / max(n, 1), "val_masked_mse": sm / max(nm, 1.0),
                           "val_unmasked_mse": su / max(nu, 1.0)})


class SupervisedSegments(Objective):
    """Fine-tuning on samples of segments: ``x`` [b, S, R, L], ``valid`` bool [b, S], ``y``.

    ``task='classification'``: ``y`` int64 [b] class indices, cross-entropy per sample, validation
    ``val_loss`` (selection, min) and ``val_accuracy``. ``task='regression'``: ``y`` [b, k], MSE over
    samples × targets, validation ``val_loss`` (MSE, min).
    """

    metric = "val_loss"
    mode = "min"
    keys = ("x", "valid", "y")

    def __init__(self, task: str):
        self.task = check_option("task", task, ("classification", "regression"))

    def _out(self, model, batch):
        return model(batch["x"], batch["valid"]).float()

    def loss(self, model, batch):
        import torch.nn.functional as Fn

        from brainenc.training.objectives import LossSum

        out, y = self._out(model, batch), batch["y"]
        if self.task == "classification":
            return LossSum(Fn.cross_entropy(out, y, reduction="sum"), y.shape[0], per_sample=1)
        return LossSum((out - y.float()).pow(2).sum(), y.numel(), per_sample=y[0].numel())

    def validate(self, model, batches):
        import torch.nn.functional as Fn

        from brainenc.training.objectives import Validation

        tot, n, correct = 0.0, 0, 0
        for batch in batches:
            out, y = self._out(model, batch), batch["y"]
            if self.task == "classification":
                tot += float(Fn.cross_entropy(out, y, reduction="sum"))
                correct += int((out.argmax(1) == y).sum())
                n += y.shape[0]
            else:
                tot += float((out - y.float()).pow(2).sum())
                n += y.numel()
        metrics = {"val_loss": tot / max(n, 1)}
        if self.task == "classification":
            metrics["val_accuracy"] = correct / max(n, 1)
        return Validation(metrics)


# ---- parameter checks ----------------------------------------------------------------------------
def _check_ratio(value, name: str) -> tuple[float, float]:
    ok = (isinstance(value, (list, tuple)) and len(value) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))
    if not ok or not 0.0 <= value[0] <= value[1] < 1.0:
        raise ConfigError(f"'{name}' must be a pair (lo, hi) with 0 <= lo <= hi < 1; {value!r} was provided")
    return float(value[0]), float(value[1])


def _check_unit(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"'{name}' must be a number in [0, 1]; {value!r} was provided")
    return float(value)


def _check_pos(value, name: str, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not value > 0:
        raise ConfigError(f"'{name}' must be a number > 0; {value!r} was provided")
    return float(value)


def _split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    n_val = int(round(fraction * n))
    if n_val < 1 or n - n_val < 1:
        return np.arange(n), np.arange(0)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


# ---- shared estimator machinery ------------------------------------------------------------------
class _Base(EstimatorMixin, BaseEstimator):
    """Segmenting parameters, nested model/train tables and torch inference shared by the estimators."""

    _arch_base: dict[str, Any] = {}
    _nested_params = _NESTED  # from_pretrained merges mapping overrides into the saved tables

    @classmethod
    def _unknown_key_hint(cls, key: str, prefix: str) -> str | None:
        from brainenc.models.brainmae import BrainMAEArchitecture
        from brainenc.training import TrainConfig

        for table, c in (("model", BrainMAEArchitecture), ("train", TrainConfig)):
            if key in {f.name for f in dataclasses.fields(c)}:
                return f"; it belongs in the '{prefix}{table}' table"
        return None

    def _train_config(self, prefix: str = ""):
        from brainenc.training import TrainConfig

        return nested_config(TrainConfig, self.train, "train", prefix, base=TRAIN_DEFAULTS)

    def _check_common(self, prefix: str) -> None:
        _check_pos(self.tr, f"{prefix}tr", optional=True)
        _check_pos(self.segment_seconds, f"{prefix}segment_seconds", optional=True)
        _check_pos(self.segment_stride_seconds, f"{prefix}segment_stride_seconds", optional=True)
        if self.standardize is not None:
            check_option(f"{prefix}standardize", self.standardize, STANDARDIZE)
        vf = self.val_fraction
        if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0.0 <= vf < 1.0:
            raise ConfigError(f"'{prefix}val_fraction' must be a number in [0, 1); {vf!r} was provided")
        if isinstance(self.val_seed, bool) or not isinstance(self.val_seed, (int, np.integer)):
            raise ConfigError(f"'{prefix}val_seed' must be an integer; {self.val_seed!r} was provided")

    def _segments_of(self, series: list[np.ndarray], name: str) -> list[np.ndarray]:
        return [segment_series(s, self.segment_length_, self.segment_stride_, standardize=self.standardize_,
                               name=f"{name}[{i}]") for i, s in enumerate(series)]

    def _check_rois(self, series: list[np.ndarray], name: str) -> None:
        if series[0].shape[1] != self.n_rois_:
            raise DataFormatError(f"'{name}' has {series[0].shape[1]} ROIs; this model was fitted on {self.n_rois_}")

    def _device(self):
        from brainenc._utils.device import resolve_device

        return resolve_device(self._train_config().device, name="train.device")

    def _autocast(self, dev):
        import torch

        on = self._train_config().amp and dev.type == "cuda"
        return torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=on)

    def _config_json(self) -> dict[str, Any]:
        out = {}
        for key, value in self.get_params(deep=False).items():
            if key == "train":
                value = to_dict(self._train_config())
            elif key == "model":
                value = self._model_json()
            elif dataclasses.is_dataclass(value):
                value = to_dict(value)
            out[key] = to_json_value(value)
        return out

    def _model_json(self):
        return to_dict(self.model) if dataclasses.is_dataclass(self.model) else self.model

    @classmethod
    def from_pretrained(cls, directory: str | Path, **params):
        """Load an estimator written by :meth:`save_pretrained`.

        A mapping given for ``model`` or ``train`` updates the saved table key by key (e.g.
        ``train={"device": "cpu"}``).
        """
        return super().from_pretrained(directory, **params)


def _load_state(module, state: Mapping[str, Any]) -> None:
    load_module_state(module, state)


# ---- BrainMAE (self-supervised) ------------------------------------------------------------------
@register_estimator("brainmae")
class BrainMAE(TransformerMixin, _Base):
    """Self-supervised BrainMAE: pretrain a transient-state encoder by masked ROI reconstruction.

    Parameters
    ----------
    tr : float
        Repetition time in seconds (required by ``fit``).
    segment_seconds : float
        Segment length τ (default 15 s).
    segment_stride_seconds : float, optional
        Step between segment starts (default τ: non-overlapping).
    standardize : {'series', 'segment', 'none'}
        Per-ROI z-score over each sample's whole series (default), over each segment, or none.
    mask_ratio : (float, float)
        Range of the per-segment masking ratio (default (0, 0.8)).
    mask_weight : float
        λ of the loss (default 0.75).
    masking : bool
        False = vanilla-BrainAE ablation (plain autoencoder, MSE over everything).
    model : BrainMAEArchitecture or mapping, optional
        Architecture fields over the defaults of :class:`brainenc.models.brainmae.BrainMAEArchitecture`.
    train : TrainConfig or mapping, optional
        Optimisation fields over :data:`TRAIN_DEFAULTS` (``seed`` also seeds the masks).
    val_fraction : float
        Fraction of the *samples* held out for best-epoch selection (0 = keep the last epoch).
    val_seed : int

    Attributes
    ----------
    model_ : BrainMAEPretrainModel
    n_rois_, segment_length_, segment_stride_ : int
    standardize_ : str
    roi_graph_ : ndarray float32 [n_rois, n_rois]
        The learned static graph ``A`` (rows sum to 1).
    roi_embeddings_ : ndarray float32 [n_rois, d_model]
    best_epoch_ : int
    history_ : list of dict
    """

    def __init__(self, tr: float | None = None, segment_seconds: float = 15.0,
                 segment_stride_seconds: float | None = None, standardize: str = "series",
                 mask_ratio: tuple[float, float] = (0.0, 0.8), mask_weight: float = 0.75, masking: bool = True,
                 model=None, train=None, val_fraction: float = 0.1, val_seed: int = 0):
        self.tr = tr
        self.segment_seconds = segment_seconds
        self.segment_stride_seconds = segment_stride_seconds
        self.standardize = standardize
        self.mask_ratio = mask_ratio
        self.mask_weight = mask_weight
        self.masking = masking
        self.model = model
        self.train = train
        self.val_fraction = val_fraction
        self.val_seed = val_seed

    def _arch(self, prefix: str = ""):
        from brainenc.models.brainmae import BrainMAEArchitecture

        return nested_config(BrainMAEArchitecture, self.model, "model", prefix)

    def _model_json(self):
        return to_dict(self._arch())

    def _check_params(self, prefix: str = ""):
        self._check_common(prefix)
        if self.segment_seconds is None or self.standardize is None:
            raise ConfigError(f"'{prefix}segment_seconds' and '{prefix}standardize' must be set for BrainMAE")
        _check_ratio(self.mask_ratio, f"{prefix}mask_ratio")
        _check_unit(self.mask_weight, f"{prefix}mask_weight")
        if not isinstance(self.masking, bool):
            raise ConfigError(f"'{prefix}masking' must be true or false; {self.masking!r} was provided")
        return self._arch(prefix), self._train_config(prefix)

    def fit(self, X, y=None, *, run_dir: str | Path | None = None, resume: bool = False) -> "BrainMAE":
        """Pretrain on ROI time series.

        Parameters
        ----------
        X : list of arrays [n_timepoints_i, n_rois], or array [n_samples, n_timepoints, n_rois]
        y : ignored
        run_dir : path, optional
            Trainer checkpoints (enables ``resume``).
        resume : bool

        Returns
        -------
        self
        """
        arch, train = self._check_params()
        if self.tr is None:
            raise ConfigError("'tr' must be a number > 0 (seconds per time point); None was provided")
        from brainenc.models.brainmae import BrainMAEPretrainModel
        from brainenc.training import Trainer, seed_everything

        series = prepare_series(X)
        self.segment_length_ = segment_length(self.tr, self.segment_seconds)
        self.segment_stride_ = segment_length(self.tr, self.segment_stride_seconds or self.segment_seconds)
        self.standardize_ = self.standardize
        self.n_rois_ = int(series[0].shape[1])
        segs = self._segments_of(series, "X")
        ti, vi = _split(len(series), self.val_fraction, self.val_seed)
        rows = lambda idx: np.concatenate([segs[i] for i in idx]) if len(idx) else None  # noqa: E731
        train_rows, val_rows = rows(ti), rows(vi)
        log.info("BrainMAE: %d training segments [%d ROIs x %d time points]%s", len(train_rows), self.n_rois_,
                 self.segment_length_, f", {len(val_rows)} validation" if val_rows is not None else "")
        seed_everything(train.seed)
        model = BrainMAEPretrainModel(arch, n_rois=self.n_rois_, segment_length=self.segment_length_)
        obj = BrainMAEObjective(tuple(self.mask_ratio), self.mask_weight, masking=self.masking, seed=train.seed)
        res = Trainer(model, train, objective=obj, run_dir=run_dir).fit(
            {"x": train_rows}, val=None if val_rows is None else {"x": val_rows}, resume=resume)
        model.eval()
        self.model_ = model
        self.best_epoch_, self.history_ = res.best_epoch, res.history
        return self

    def _is_fitted(self) -> bool:
        return hasattr(self, "model_")

    @property
    def roi_graph_(self) -> np.ndarray:
        self._check_fitted()
        import torch

        with torch.no_grad():
            return self.model_.encoder.graph().cpu().numpy()

    @property
    def roi_embeddings_(self) -> np.ndarray:
        self._check_fitted()
        return self.model_.encoder.roi_embed.detach().float().cpu().numpy()

    def transform(self, X, *, level: str = "subject", batch_size: int | None = None):
        """Embeddings of samples or of their segments.

        Parameters
        ----------
        X : list of arrays [n_timepoints_i, n_rois] or array [n_samples, n_timepoints, n_rois]
        level : {'subject', 'segment'}
            ``subject``: mean of the segment embeddings of each sample, float32 [n_samples, d_model];
            ``segment``: list of float32 [n_segments_i, d_model].
        batch_size : int, optional
            Segments per forward pass (default ``train.eval_batch_size``).
        """
        import torch

        self._check_fitted()
        check_option("level", level, ("subject", "segment"))
        series = prepare_series(X)
        self._check_rois(series, "X")
        segs = self._segments_of(series, "X")
        flat = np.concatenate(segs)
        bs = batch_size or self._train_config().eval_batch_size
        dev = self._device()
        self.model_.to(dev).eval()
        out = []
        with torch.no_grad(), self._autocast(dev):
            for s in range(0, len(flat), bs):
                out.append(self.model_.embed(torch.from_numpy(flat[s:s + bs]).to(dev)).float().cpu())
        emb = torch.cat(out).numpy()
        parts = np.split(emb, np.cumsum([len(s) for s in segs])[:-1])
        if level == "segment":
            return parts
        return np.stack([p.mean(0) for p in parts]).astype(np.float32)

    def reconstruct(self, segments, mask=None) -> np.ndarray:
        """Decoder output for prepared segments.

        Parameters
        ----------
        segments : float array [n, n_rois, segment_length]
        mask : bool array [n, n_rois], optional

        Returns
        -------
        float32 [n, n_rois, segment_length]
        """
        import torch

        self._check_fitted()
        dev = self._device()
        self.model_.to(dev).eval()
        x = torch.as_tensor(np.asarray(segments, dtype=np.float32), device=dev)
        m = None if mask is None else torch.as_tensor(np.asarray(mask, dtype=bool), device=dev)
        with torch.no_grad(), self._autocast(dev):
            return self.model_(x, m).float().cpu().numpy()

    def _meta(self) -> dict[str, Any]:
        return {"n_rois": self.n_rois_, "segment_length": self.segment_length_, "segment_stride": self.segment_stride_,
                "standardize": self.standardize_, "tr": float(self.tr), "arch": to_dict(self._arch()),
                "best_epoch": int(self.best_epoch_), "history": to_json_value(self.history_)}

    def _fitted_state(self):
        return {f"model.{k}": v for k, v in self.model_.state_dict().items()}, self._meta()

    def _restore_fitted(self, arrays, meta) -> None:
        import torch

        from brainenc.models.brainmae import BrainMAEArchitecture, BrainMAEPretrainModel

        arch = from_dict(BrainMAEArchitecture, meta["arch"])
        with torch.random.fork_rng(devices=[]):
            model = BrainMAEPretrainModel(arch, n_rois=int(meta["n_rois"]), segment_length=int(meta["segment_length"]))
        _load_state(model, {k[len("model."):]: v for k, v in arrays.items() if k.startswith("model.")})
        model.eval()
        self.model_ = model
        self.n_rois_, self.segment_length_ = int(meta["n_rois"]), int(meta["segment_length"])
        self.segment_stride_, self.standardize_ = int(meta["segment_stride"]), meta["standardize"]
        self.best_epoch_, self.history_ = int(meta["best_epoch"]), list(meta["history"])


# ---- fine-tuning ---------------------------------------------------------------------------------
class _BrainMAEFinetune(_Base):
    """Shared fine-tuning estimator (see :class:`BrainMAEClassifier` / :class:`BrainMAERegressor`)."""

    _task = ""

    def __init__(self, pretrained: str | None = None, tr: float | None = None, segment_seconds: float | None = None,
                 segment_stride_seconds: float | None = None, standardize: str | None = None, model=None,
                 train=None, freeze_encoder: bool = False, val_fraction: float = 0.0, val_seed: int = 0):
        self.pretrained = pretrained
        self.tr = tr
        self.segment_seconds = segment_seconds
        self.segment_stride_seconds = segment_stride_seconds
        self.standardize = standardize
        self.model = model
        self.train = train
        self.freeze_encoder = freeze_encoder
        self.val_fraction = val_fraction
        self.val_seed = val_seed

    def _check_params(self, prefix: str = ""):
        self._check_common(prefix)
        if self.pretrained is not None and not isinstance(self.pretrained, (str, Path)):
            raise ConfigError(f"'{prefix}pretrained' must be None or the folder of a saved BrainMAE; "
                              f"{self.pretrained!r} was provided")
        if not isinstance(self.freeze_encoder, bool):
            raise ConfigError(f"'{prefix}freeze_encoder' must be true or false; {self.freeze_encoder!r} was provided")
        if self.freeze_encoder and self.pretrained is None:
            raise ConfigError(f"'{prefix}freeze_encoder' needs 'pretrained' (a frozen random encoder learns nothing)")
        from brainenc.models.brainmae import BrainMAEArchitecture

        if self.model is not None and not isinstance(self.model, (Mapping, BrainMAEArchitecture)):
            raise ConfigError(f"'{prefix}model' must be None, a BrainMAEArchitecture or a mapping of its fields")
        if self.pretrained is None:
            self._arch_over({}, prefix)
        return self._train_config(prefix)

    def _arch_over(self, base: Mapping[str, Any], prefix: str = ""):
        from brainenc.models.brainmae import BrainMAEArchitecture

        return nested_config(BrainMAEArchitecture, self._model_json(), "model", prefix, base=base)

    def _resolve(self):
        """(arch, n_rois or None, segment length, stride, standardize, encoder state or None)."""
        tr, seg, stride, std = self.tr, self.segment_seconds, self.segment_stride_seconds, self.standardize
        if self.pretrained is None:
            if tr is None:
                raise ConfigError("'tr' must be a number > 0 (seconds per time point) without 'pretrained'")
            L = segment_length(tr, seg or 15.0)
            S = segment_length(tr, stride or seg or 15.0)
            return self._arch_over({}), None, L, S, std or "series", None, tr
        pre = BrainMAE.from_pretrained(self.pretrained, train={"device": "cpu"})
        ptr = float(pre.tr)
        tr = ptr if tr is None else float(tr)
        L = pre.segment_length_ if seg is None else segment_length(tr, seg)
        S = pre.segment_stride_ if stride is None and seg is None else segment_length(tr, stride or seg)
        if L != pre.segment_length_:
            raise ConfigError(f"'segment_seconds' gives {L} time points per segment but the pretrained encoder "
                              f"'{self.pretrained}' takes {pre.segment_length_}")
        std = std or pre.standardize_
        arch = self._arch_over(to_dict(pre._arch()))
        state = {k[len("encoder."):]: v for k, v in pre.model_.state_dict().items() if k.startswith("encoder.")}
        return arch, pre.n_rois_, L, S, std, state, tr

    def _pad(self, segs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        S = max(len(s) for s in segs)
        x = np.zeros((len(segs), S) + segs[0].shape[1:], dtype=np.float32)
        valid = np.zeros((len(segs), S), dtype=bool)
        for i, s in enumerate(segs):
            x[i, :len(s)], valid[i, :len(s)] = s, True
        return x, valid

    def _targets(self, y, n: int):
        """Validated training targets for ``n`` samples (the classifier and regressor define it)."""
        raise TypeError(f"{type(self).__name__} does not define its targets; use BrainMAEClassifier or "
                        "BrainMAERegressor")

    def fit(self, X, y, *, run_dir: str | Path | None = None, resume: bool = False):
        """Fine-tune (or train from scratch) on samples of ROI time series.

        Parameters
        ----------
        X : list of arrays [n_timepoints_i, n_rois], or array [n_samples, n_timepoints, n_rois]
            Subject-level series or single segments (e.g. one block per sample).
        y : array [n_samples] (classifier: labels; regressor: [n_samples] or [n_samples, k] targets)
        run_dir : path, optional
        resume : bool

        Returns
        -------
        self
        """
        train = self._check_params()
        from brainenc.models.brainmae import BrainMAEFinetuneModel
        from brainenc.training import Trainer, seed_everything

        arch, n_rois, L, S, std, state, tr = self._resolve()
        series = prepare_series(X)
        yt = self._targets(y, len(series))
        if n_rois is not None and series[0].shape[1] != n_rois:
            raise DataFormatError(f"'X' has {series[0].shape[1]} ROIs; the pretrained encoder '{self.pretrained}' "
                                  f"was fitted on {n_rois}")
        self.n_rois_, self.segment_length_, self.segment_stride_, self.standardize_ = (
            int(series[0].shape[1]), L, S, std)
        self.tr_, self.arch_ = float(tr), to_dict(arch)
        segs = self._segments_of(series, "X")
        ti, vi = _split(len(series), self.val_fraction, self.val_seed)
        seed_everything(train.seed)
        model = BrainMAEFinetuneModel(arch, n_rois=self.n_rois_, segment_length=L, n_outputs=self.n_outputs_)
        if state is not None:
            try:
                _load_state(model.encoder, state)
            except WeightsMismatchError as exc:
                raise ConfigError(f"'model' does not fit the pretrained encoder '{self.pretrained}': {exc}") from None
        if self.freeze_encoder:
            for p in model.encoder.parameters():
                p.requires_grad_(False)

        def data(idx):
            x, valid = self._pad([segs[i] for i in idx])
            return {"x": x, "valid": valid, "y": yt[idx]}

        res = Trainer(model, train, objective=SupervisedSegments(self._task), run_dir=run_dir).fit(
            data(ti), val=data(vi) if len(vi) else None, resume=resume)
        model.eval()
        self.model_ = model
        self.best_epoch_, self.history_ = res.best_epoch, res.history
        return self

    def _is_fitted(self) -> bool:
        return hasattr(self, "model_")

    def _forward(self, X, batch_size: int | None = None) -> np.ndarray:
        import torch

        self._check_fitted()
        series = prepare_series(X)
        self._check_rois(series, "X")
        segs = self._segments_of(series, "X")
        bs = batch_size or self._train_config().eval_batch_size
        dev = self._device()
        self.model_.to(dev).eval()
        out = []
        with torch.no_grad(), self._autocast(dev):
            for s in range(0, len(segs), bs):
                x, valid = self._pad(segs[s:s + bs])
                out.append(self.model_(torch.from_numpy(x).to(dev), torch.from_numpy(valid).to(dev)).float().cpu())
        return torch.cat(out).numpy()

    def _meta(self) -> dict[str, Any]:
        return {"n_rois": self.n_rois_, "segment_length": self.segment_length_, "segment_stride": self.segment_stride_,
                "standardize": self.standardize_, "tr": self.tr_, "arch": self.arch_, "n_outputs": self.n_outputs_,
                "best_epoch": int(self.best_epoch_), "history": to_json_value(self.history_)}

    def _restore_fitted(self, arrays, meta) -> None:
        import torch

        from brainenc.models.brainmae import BrainMAEArchitecture, BrainMAEFinetuneModel

        arch = from_dict(BrainMAEArchitecture, meta["arch"])
        with torch.random.fork_rng(devices=[]):
            model = BrainMAEFinetuneModel(arch, n_rois=int(meta["n_rois"]), segment_length=int(meta["segment_length"]),
                                          n_outputs=int(meta["n_outputs"]))
        _load_state(model, {k[len("model."):]: v for k, v in arrays.items() if k.startswith("model.")})
        model.eval()
        self.model_ = model
        self.n_rois_, self.segment_length_ = int(meta["n_rois"]), int(meta["segment_length"])
        self.segment_stride_, self.standardize_ = int(meta["segment_stride"]), meta["standardize"]
        self.tr_, self.arch_, self.n_outputs_ = float(meta["tr"]), dict(meta["arch"]), int(meta["n_outputs"])
        self.best_epoch_, self.history_ = int(meta["best_epoch"]), list(meta["history"])


@register_estimator("brainmae_classifier")
class BrainMAEClassifier(ClassifierMixin, _BrainMAEFinetune):
    """BrainMAE fine-tuned for classification (cross-entropy; ``score`` = accuracy).

    Parameters
    ----------
    pretrained : str, optional
        Folder of a saved :class:`BrainMAE`: its encoder weights, architecture, segmenting and
        standardisation are used (``model`` entries override architecture fields that do not change
        weight shapes, e.g. ``temporal_layers``, ``dropout``). None = train from scratch.
    tr : float, optional
        Seconds per time point (default: the pretrained model's; required without ``pretrained``).
    segment_seconds, segment_stride_seconds : float, optional
        Default: the pretrained model's, else 15 s, non-overlapping.
    standardize : {'series', 'segment', 'none'}, optional
        Default: the pretrained model's, else ``'series'``.
    model : BrainMAEArchitecture or mapping, optional
    train : TrainConfig or mapping, optional
        Over :data:`TRAIN_DEFAULTS`.
    freeze_encoder : bool
        Train only the temporal blocks and the head (needs ``pretrained``).
    val_fraction : float
        Fraction of the samples held out for best-epoch selection (default 0: last epoch).
    val_seed : int

    Attributes
    ----------
    classes_ : ndarray [n_classes]
    model_ : BrainMAEFinetuneModel
    """

    _task = "classification"

    def _targets(self, y, n):
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != n:
            raise DataFormatError(f"'y' must be [n_samples={n}] labels; got shape {y.shape}")
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise DataFormatError(f"'y' needs at least 2 classes; got {len(self.classes_)}")
        self.n_outputs_ = len(self.classes_)
        return codes.astype(np.int64)

    def predict_proba(self, X, batch_size: int | None = None) -> np.ndarray:
        """Class probabilities, float32 [n_samples, n_classes] (columns in ``classes_`` order)."""
        z = self._forward(X, batch_size)
        z = z - z.max(1, keepdims=True)
        p = np.exp(z)
        return (p / p.sum(1, keepdims=True)).astype(np.float32)

    def predict(self, X, batch_size: int | None = None) -> np.ndarray:
        """Predicted labels [n_samples]."""
        self._check_fitted()  # before classes_ is read
        return self.classes_[self._forward(X, batch_size).argmax(1)]

    def _fitted_state(self):
        arrays = {f"model.{k}": v for k, v in self.model_.state_dict().items()}
        meta = self._meta()
        meta["classes"] = to_json_value(self.classes_)
        return arrays, meta

    def _restore_fitted(self, arrays, meta):
        super()._restore_fitted(arrays, meta)
        self.classes_ = np.asarray(meta["classes"])


@register_estimator("brainmae_regressor")
class BrainMAERegressor(RegressorMixin, _BrainMAEFinetune):
    """BrainMAE fine-tuned for regression (MSE on z-scored targets; ``score`` = R², sklearn's).

    Parameters are those of :class:`BrainMAEClassifier`. Targets are z-scored with the training
    mean and standard deviation (``y_mean_``, ``y_scale_``) and predictions mapped back.
    ``predict`` returns [n_samples] for 1-d ``y``, else [n_samples, k].
    """

    _task = "regression"

    def _targets(self, y, n):
        y = np.asarray(y, dtype=np.float64)
        if y.ndim not in (1, 2) or len(y) != n:
            raise DataFormatError(f"'y' must be [n_samples={n}] or [n_samples, k]; got shape {y.shape}")
        if not np.isfinite(y).all():
            raise DataFormatError(f"'y' contains {int((~np.isfinite(y)).sum())} NaN/inf values")
        self.y_ndim_ = y.ndim
        y2 = y.reshape(n, -1)
        self.y_mean_ = y2.mean(0)
        sd = y2.std(0)
        self.y_scale_ = np.where(sd > 1e-12, sd, 1.0)
        self.n_outputs_ = y2.shape[1]
        return ((y2 - self.y_mean_) / self.y_scale_).astype(np.float32)

    def predict(self, X, batch_size: int | None = None) -> np.ndarray:
        """Predicted targets, float64 [n_samples] (1-d ``y``) or [n_samples, k]."""
        z = self._forward(X, batch_size).astype(np.float64) * self.y_scale_ + self.y_mean_
        return z[:, 0] if self.y_ndim_ == 1 else z

    def _fitted_state(self):
        arrays = {f"model.{k}": v for k, v in self.model_.state_dict().items()}
        arrays["y_mean"], arrays["y_scale"] = np.asarray(self.y_mean_), np.asarray(self.y_scale_)
        meta = self._meta()
        meta["y_ndim"] = int(self.y_ndim_)
        return arrays, meta

    def _restore_fitted(self, arrays, meta):
        super()._restore_fitted(arrays, meta)
        self.y_mean_, self.y_scale_ = np.asarray(arrays["y_mean"]), np.asarray(arrays["y_scale"])
        self.y_ndim_ = int(meta["y_ndim"])
