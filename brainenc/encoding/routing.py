"""User-facing estimator for the transformer brain encoder with attention routing.

>>> enc = RoutingEncoder({"queries": "rois", "train": {"epochs": 15}}, roi_labels=ds.roi_labels,
...                      roi_names=ds.roi_names, hemi=ds.geometry.get("hemi"))    # doctest: +SKIP
>>> enc.fit(tokens_train, Y_train, grid=(16, 16))                                   # doctest: +SKIP
>>> r = enc.score(tokens_test, Y_test, metric="r")      # [n_voxels]                  doctest: +SKIP
>>> enc.save_pretrained("run/routing"); RoutingEncoder.from_pretrained("run/routing")  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

from brainenc._utils.io import read_json, write_json
from brainenc._utils.validation import check_array, check_option
from brainenc.config import from_dict, to_dict
from brainenc.exceptions import ConfigError, DataFormatError, NotFittedError
from brainenc.models import QuerySet, RoutingEncoderModel, RoutingModelConfig, build_query_set
from brainenc.models.queries import COMBINE_RULES, QUERY_KINDS
from brainenc.training import TrainConfig, Trainer, VoxelRegression, load_tensors, save_tensors, seed_everything
from brainenc.training.data import RowSubset

__all__ = ["RoutingEncoderConfig", "RoutingEncoder"]

_CONFIG_FILE = "config.json"
_WEIGHTS_FILE = "model.safetensors"


@dataclass
class RoutingEncoderConfig:
    """Configuration of :class:`RoutingEncoder` (defaults = the paper's ``rois_all`` model).

    Parameters
    ----------
    queries : {'rois', 'streams', 'hemis', 'voxels', 'custom'}
        Query set (see :func:`brainenc.models.build_query_set`).
    combine : {'sum', 'mean', 'first'}
        Rule for voxels in several ROIs (``sum`` as the original).
    families : list of str, optional
        ROI families used by ``queries='rois'`` (default all label arrays passed in).
    unknown : bool
        One ``unknown`` query per hemisphere for voxels in no ROI.
    d_model, n_heads, d_ffn, n_layers, dropout, positional, query_self_attn, value_proj, input_proj,
    final_norm, voxel_variant, voxel_chunk, routing_backend
        Architecture, see :class:`brainenc.models.RoutingModelConfig`.
    train : TrainConfig
        Optimisation (AdamW 5e-4, wd 1e-4, clip 0.1, batch 16, 15 epochs).
    val_fraction : float
        Fraction of the training rows held out for best-epoch selection when no validation data are
        given (0 = no validation: keep the last epoch).
    val_seed : int
        Seed of that random split (the original's split had none).
    scoring : {'r2', 'r'}
        Default metric of :meth:`RoutingEncoder.score`.
    """

    queries: str = "rois"
    combine: str = "sum"
    families: Optional[list[str]] = None
    unknown: bool = True
    d_model: int = 768
    n_heads: int = 16
    d_ffn: int = 1024
    n_layers: int = 1
    dropout: float = 0.1
    positional: str = "sine"
    query_self_attn: bool = False
    value_proj: bool = True
    input_proj: Optional[bool] = None
    final_norm: bool = True
    voxel_variant: str = "routing"
    voxel_chunk: int = 2048
    routing_backend: str = "auto"
    train: TrainConfig = field(default_factory=TrainConfig)
    val_fraction: float = 0.1
    val_seed: int = 0
    scoring: str = "r2"

    def check(self) -> None:
        check_option("queries", self.queries, QUERY_KINDS)
        check_option("combine", self.combine, COMBINE_RULES)
        check_option("scoring", self.scoring, ("r2", "r"))
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"'val_fraction' must be in [0, 1); {self.val_fraction} was provided")
        self.train.check()

    def model_config(self, feature_dim: int, grid: tuple[int, int], n_voxels: int) -> RoutingModelConfig:
        arch = {f.name: getattr(self, f.name) for f in dataclasses.fields(RoutingModelConfig)
                if hasattr(self, f.name)}
        arch.update(feature_dim=int(feature_dim), grid=tuple(int(g) for g in grid), n_voxels=int(n_voxels),
                    query_mode="voxels" if self.queries == "voxels" else "grouped")
        return from_dict(RoutingModelConfig, arch)


def _infer_grid(n_tokens: int) -> tuple[int, int]:
    s = int(round(math.sqrt(n_tokens)))
    if s * s != n_tokens:
        raise ConfigError(f"cannot infer the patch grid of {n_tokens} tokens (not a square); pass grid=(h, w)")
    return (s, s)


class RoutingEncoder:
    """Transformer brain encoder: learned queries cross-attend to patch tokens, voxels read their query.

    Parameters
    ----------
    config : RoutingEncoderConfig or mapping, optional
    roi_labels : dict family -> int [n_voxels], optional
        ROI label arrays (0 = none), e.g. ``PreparedDataset.roi_labels``; needed for ``rois``/``streams``.
    roi_names : dict family -> {int: str}, optional
    hemi : array [n_voxels], optional
        Hemisphere per voxel (``"lh"``/``"rh"``); None = one group.
    clusters : int array [n_voxels], optional
        Labels for ``queries='custom'``.
    **overrides
        Top-level config keys (e.g. ``queries="voxels"``, ``train={"epochs": 5}``).

    Attributes
    ----------
    model_ : RoutingEncoderModel
    query_set_ : QuerySet or None
    grid_ : (int, int)
    n_voxels_, n_features_ : int
    best_epoch_ : int
    val_scores_ : ndarray float32 [n_voxels] or None
        Validation Pearson r per voxel at the best epoch (input to ensembling).
    history_ : list of dict
    """

    def __init__(self, config: RoutingEncoderConfig | Mapping[str, Any] | None = None, *,
                 roi_labels: Mapping[str, np.ndarray] | None = None, roi_names: Mapping[str, Mapping] | None = None,
                 hemi: np.ndarray | None = None, clusters: np.ndarray | None = None, **overrides):
        base = to_dict(config) if isinstance(config, RoutingEncoderConfig) else dict(config or {})
        base.update(overrides)
        self.config = from_dict(RoutingEncoderConfig, base)
        self.roi_labels = roi_labels
        self.roi_names = roi_names
        self.hemi = hemi
        self.clusters = clusters

    # ---- fitting ---------------------------------------------------------------------------
    def _query_set(self, n_voxels: int) -> QuerySet | None:
        c = self.config
        return build_query_set(c.queries, n_voxels, roi_labels=self.roi_labels, roi_names=self.roi_names,
                               hemi=self.hemi, families=c.families, clusters=self.clusters, combine=c.combine,
                               unknown=c.unknown)

    def fit(self, tokens: np.ndarray, Y: np.ndarray, *, grid: tuple[int, int] | None = None,
            val_fraction: float | None = None, validation_data: tuple[np.ndarray, np.ndarray] | None = None,
            run_dir: str | Path | None = None, resume: bool = False) -> "RoutingEncoder":
        """Train the encoder.

        Parameters
        ----------
        tokens : array [n_samples, n_tokens, n_features]
            Cached backbone patch tokens (row-major over ``grid``); float16/32, memmaps welcome.
        Y : array [n_samples, n_voxels]
        grid : (h, w), optional
            Patch grid; inferred when ``n_tokens`` is a perfect square.
        val_fraction : float, optional
            Overrides ``config.val_fraction`` (ignored when ``validation_data`` is given).
        validation_data : (tokens_val [m, n_tokens, n_features], Y_val [m, n_voxels]), optional
        run_dir : path, optional
            Checkpoints, best weights and ``metrics.jsonl`` (enables ``resume``).
        resume : bool
            Continue an interrupted fit from ``run_dir``.

        Returns
        -------
        self
        """
        c = self.config
        if np.ndim(tokens) != 3:
            raise DataFormatError(f"'tokens' must be [n_samples, n_tokens, n_features]; got shape {np.shape(tokens)}")
        Y = check_array(Y, name="Y", ndim=2, dtype=np.float32)
        n, t, d = tokens.shape
        if Y.shape[0] != n:
            raise DataFormatError(f"'tokens' has {n} samples, 'Y' has {Y.shape[0]}")
        grid = tuple(grid) if grid is not None else _infer_grid(t)
        if grid[0] * grid[1] != t:
            raise ConfigError(f"grid {grid} has {grid[0] * grid[1]} cells but tokens have {t}")
        V = Y.shape[1]
        if validation_data is not None:
            Xv, Yv = validation_data
            Yv = check_array(Yv, name="Y_val", ndim=2, dtype=np.float32)
            if np.shape(Xv)[1:] != (t, d) or Yv.shape != (len(Xv), V):
                raise DataFormatError(f"validation_data shapes {np.shape(Xv)}, {Yv.shape} do not match "
                                      f"tokens [*, {t}, {d}] / Y [*, {V}]")
            Xt, Yt, val = tokens, Y, {"x": Xv, "y": Yv}
            self.train_index_, self.val_index_ = np.arange(n), None
        else:
            frac = c.val_fraction if val_fraction is None else float(val_fraction)
            if not 0.0 <= frac < 1.0:
                raise ConfigError(f"'val_fraction' must be in [0, 1); {frac} was provided")
            n_val = int(round(frac * n))
            perm = np.random.default_rng(c.val_seed).permutation(n)
            vi, ti = np.sort(perm[:n_val]), np.sort(perm[n_val:])
            self.train_index_, self.val_index_ = ti, (vi if n_val else None)
            # lazy row views: a memmap of cached tokens is not copied into memory
            Xt, Yt = RowSubset(tokens, ti), Y[ti]
            val = {"x": RowSubset(tokens, vi), "y": Y[vi]} if n_val >= 2 else None
        self.grid_ = (int(grid[0]), int(grid[1]))
        self.n_voxels_, self.n_features_, self.n_tokens_ = V, int(d), int(t)
        self.query_set_ = self._query_set(V)
        seed_everything(c.train.seed)  # model init is part of the seeded run
        self.model_ = RoutingEncoderModel(c.model_config(d, self.grid_, V), self.query_set_)
        trainer = Trainer(self.model_, c.train, objective=VoxelRegression(), run_dir=run_dir)
        res = trainer.fit({"x": Xt, "y": Yt}, val=val, resume=resume)
        self.model_.eval()
        self.history_ = res.history
        self.best_epoch_ = res.best_epoch
        self.val_scores_ = res.val_scores
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise NotFittedError("this RoutingEncoder is not fitted yet; call fit(tokens, Y) first")

    def _check_tokens(self, tokens) -> None:
        if np.ndim(tokens) != 3 or tuple(np.shape(tokens)[1:]) != (self.n_tokens_, self.n_features_):
            raise DataFormatError(f"'tokens' must be [n, {self.n_tokens_}, {self.n_features_}]; got {np.shape(tokens)}")

    # ---- inference -------------------------------------------------------------------------
    def predict(self, tokens: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Predicted responses, float32 [n_samples, n_voxels]."""
        self._check_fitted()
        self._check_tokens(tokens)
        return Trainer(self.model_, dataclasses.replace(self.config.train)).predict(tokens, batch_size)

    def score(self, tokens: np.ndarray, Y: np.ndarray, metric: str | None = None) -> np.ndarray:
        """Per-voxel score of the predictions, [n_voxels].

        Parameters
        ----------
        tokens : array [n, n_tokens, n_features]
        Y : array [n, n_voxels]
        metric : {'r2', 'r'}, optional
            Default ``config.scoring`` (R², like RidgeEncoder).
        """
        from brainenc.metrics import pearson_r, r2_score

        metric = check_option("metric", metric or self.config.scoring, ("r2", "r"))
        Y = check_array(Y, name="Y", ndim=2, dtype=np.float32)
        pred = self.predict(tokens)
        return np.asarray(pearson_r(Y, pred) if metric == "r" else r2_score(Y, pred))

    def attention_maps(self, tokens: np.ndarray, *, layer: int = -1, queries=None, per_head: bool = False,
                       batch_size: int = 16) -> np.ndarray:
        """Cross-attention maps of the queries on the patch grid.

        Parameters
        ----------
        tokens : array [n, n_tokens, n_features]
        layer : int
            Decoder layer.
        queries : sequence of int or str, optional
            Query indices or names (``query_set_.names``); default all (voxel queries: pass a subset).
        per_head : bool
            Keep heads (default: mean over heads, as the original's ``need_weights`` output).

        Returns
        -------
        maps : float32 [n, q, h, w] or [n, H, q, h, w]
            Each map sums to 1 over the grid.
        """
        self._check_fitted()
        self._check_tokens(tokens)
        idx = None
        if queries is not None:
            names = self.query_names_
            idx = torch.as_tensor([names.index(q) if isinstance(q, str) else int(q) for q in queries], dtype=torch.long)
        dev = next(self.model_.parameters()).device
        out = []
        for s in range(0, len(tokens), batch_size):
            x = torch.as_tensor(np.asarray(tokens[s:s + batch_size], dtype=np.float32), device=dev)
            a = self.model_.attention_maps(x, layer=layer, queries=None if idx is None else idx.to(dev))
            out.append((a if per_head else a.mean(1)).float().cpu())
        a = torch.cat(out).numpy()
        return a.reshape(*a.shape[:-1], *self.grid_)

    @property
    def query_names_(self) -> list[str]:
        """Query names [Q] (voxel queries: ``"voxel-<i>"``)."""
        self._check_fitted()
        if self.query_set_ is not None:
            return list(self.query_set_.names)
        return [f"voxel-{i}" for i in range(self.n_voxels_)]

    # ---- persistence -----------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (weights + query-set arrays) to ``directory``."""
        self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v for k, v in self.model_.state_dict().items()}
        if self.query_set_ is not None:
            tensors.update({f"queryset.{k}": torch.from_numpy(np.ascontiguousarray(v))
                            for k, v in self.query_set_.arrays().items()})
        if self.val_scores_ is not None:
            tensors["val_scores"] = torch.from_numpy(np.asarray(self.val_scores_, dtype=np.float32))
        save_tensors(directory / _WEIGHTS_FILE, tensors, metadata={"format": "brainenc.RoutingEncoder"})
        write_json(directory / _CONFIG_FILE, {
            "class": "RoutingEncoder", "config": to_dict(self.config),
            "model_config": to_dict(self.model_.config),
            "query_set": None if self.query_set_ is None else self.query_set_.meta(),
            "fitted": {"grid": list(self.grid_), "n_voxels": self.n_voxels_, "n_features": self.n_features_,
                       "n_tokens": self.n_tokens_, "best_epoch": self.best_epoch_, "history": self.history_},
        })
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | None = None) -> "RoutingEncoder":
        """Load an encoder written by :meth:`save_pretrained` (no pickle; safetensors + JSON)."""
        directory = Path(directory)
        meta = read_json(directory / _CONFIG_FILE)
        if meta.get("class") != "RoutingEncoder":
            raise DataFormatError(f"{directory / _CONFIG_FILE}: not a RoutingEncoder config")
        tensors = load_tensors(directory / _WEIGHTS_FILE)
        enc = cls(meta["config"])
        qs = None
        if meta["query_set"] is not None:
            arrays = {k[len("queryset."):]: v.numpy() for k, v in tensors.items() if k.startswith("queryset.")}
            qs = QuerySet.from_parts(meta["query_set"], arrays)
        mcfg = from_dict(RoutingModelConfig, meta["model_config"])
        model = RoutingEncoderModel(mcfg, qs)
        state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise DataFormatError(f"{directory / _WEIGHTS_FILE}: weights do not match the config ({exc})") from None
        if device is not None:
            model.to(device)
        model.eval()
        f = meta["fitted"]
        enc.model_, enc.query_set_ = model, qs
        enc.grid_ = (int(f["grid"][0]), int(f["grid"][1]))
        enc.n_voxels_, enc.n_features_, enc.n_tokens_ = int(f["n_voxels"]), int(f["n_features"]), int(f["n_tokens"])
        enc.best_epoch_, enc.history_ = int(f["best_epoch"]), list(f["history"])
        enc.val_scores_ = tensors["val_scores"].numpy() if "val_scores" in tensors else None
        return enc
