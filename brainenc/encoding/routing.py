"""User-facing estimator for the transformer brain encoder with attention routing.

>>> enc = RoutingEncoder(queries="rois", model={"d_model": 64, "n_heads": 4}, train={"epochs": 15})  # doctest: +SKIP
>>> enc.fit(tokens_train, Y_train, grid=(16, 16), roi_labels=ds.roi_labels, roi_names=ds.roi_names,
...         hemi=ds.geometry.get("hemi"))                                    # doctest: +SKIP
>>> r = enc.score(tokens_test, Y_test, metric="r")      # [n_voxels]           doctest: +SKIP
>>> enc.save_pretrained("run/routing"); brainenc.load("run/routing")       # doctest: +SKIP

The hyper-parameters are the constructor's (sklearn style); the architecture is one nested
table (``model``: :class:`brainenc.models.RoutingArchitecture` fields) and the optimisation another
(``train``: :class:`brainenc.training.TrainConfig` fields). Everything that comes from the data (token
width, patch grid, voxel count, ROI labels/names, hemispheres, clusters) is an argument of ``fit``;
a fitted encoder keeps its query set, so a loaded one predicts without them.

Importing this module does not import torch (``brainenc.load`` finds the class through the
estimator registry); torch is imported when an encoder is fitted or loaded.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin

from brainenc._utils.tensors import load_module_state
from brainenc._utils.validation import check_array, check_option
from brainenc.config import nested_config
from brainenc.estimator import (
    CONFIG_FILE,
    EstimatorMixin,
    read_pretrained_config,
    register_estimator,
    to_json_value,
)
from brainenc.exceptions import ConfigError, DataFormatError

__all__ = ["RoutingEncoder", "PRESETS"]

#: constructor parameters that are nested tables (merged key by key by ``from_pretrained`` overrides)
_NESTED = ("model", "train")
#: values of parameters added after a format was written, for configs saved without them
_LEGACY_DEFAULTS = {"standardize_tokens": False, "preset": "paper"}

#: Named configurations: preset -> (RoutingArchitecture fields, TrainConfig fields) over the dataclass
#: defaults, which are the paper's (reference_systems.md a.3). Entries of ``model`` / ``train`` override
#: the preset field by field. The ablation behind ``compact`` is kernels/bench/routing_ablation.py
#: (docs/routing_encoder.md, "Choosing a configuration").
PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # d 768 / 16 heads / FFN 1024, dropout 0.1, final LayerNorm; AdamW 5e-4, clip 0.1, batch 16, 15 epochs:
    # for NSD-scale runs on a GPU that reproduce the paper
    "paper": ({}, {}),
    # a few thousand images on a CPU in minutes: a smaller model, the positional code x10 (the
    # largest gain of the ablation, on early visual voxels), AdamW 1e-3 at a constant rate, clip 1.0
    "compact": ({"d_model": 128, "n_heads": 8, "d_ffn": 256, "positional_scale": 10.0},
                {"epochs": 30, "batch_size": 32, "lr": 1e-3, "grad_clip": 1.0, "schedule": "constant"}),
}


def _infer_grid(n_tokens: int) -> tuple[int, int]:
    s = int(round(math.sqrt(n_tokens)))
    if s * s != n_tokens:
        raise ConfigError(f"'grid' cannot be inferred from {n_tokens} tokens (not a square); pass grid=(h, w)")
    return (s, s)


_ROUTING_HEAD = None


def _routing_head_class(torch):
    """The frozen head wrapping a trained :class:`~brainenc.models.RoutingEncoderModel` (defined on first use)."""
    global _ROUTING_HEAD
    if _ROUTING_HEAD is not None:
        return _ROUTING_HEAD

    class RoutingHead(torch.nn.Module):
        """Frozen routing encoder on patch tokens ``[n, n_tokens, n_features]`` -> ``[n, n_voxels]``."""

        input_kind = "tokens"

        def __init__(self, model, *, grid, n_voxels: int, n_features: int, n_tokens: int, info=None):
            super().__init__()
            self.model = model
            for p in self.model.parameters():
                p.requires_grad_(False)
            self.grid = (int(grid[0]), int(grid[1]))
            self.n_outputs, self.n_features, self.n_tokens = int(n_voxels), int(n_features), int(n_tokens)
            self.info = dict(info or {})
            self.eval()

        def train(self, mode: bool = True):  # noqa: D401 - a fitted encoder has no training mode
            """Stay in eval mode (dropout off) whatever ``mode`` is."""
            return super().train(False)

        def forward(self, tokens):
            if tokens.ndim != 3 or tuple(tokens.shape[1:]) != (self.n_tokens, self.n_features):
                raise DataFormatError(f"routing head: tokens must be [n, {self.n_tokens}, {self.n_features}]; "
                                      f"got {tuple(tokens.shape)}")
            return self.model(tokens.to(torch.float32))

        def describe(self) -> dict:
            return {"estimator": "routing", "input_kind": self.input_kind, "n_features": self.n_features,
                    "n_tokens": self.n_tokens, "grid": list(self.grid), "n_outputs": self.n_outputs,
                    "token_norm": bool(self.model.token_norm), **self.info}

        def extra_repr(self) -> str:
            return f"n_tokens={self.n_tokens}, n_features={self.n_features}, n_outputs={self.n_outputs}"

    _ROUTING_HEAD = RoutingHead
    return RoutingHead


@register_estimator("routing")
class RoutingEncoder(EstimatorMixin, RegressorMixin, BaseEstimator):
    """Transformer brain encoder: learned queries cross-attend to patch tokens, voxels read their query.

    Parameters
    ----------
    queries : {'rois', 'streams', 'hemis', 'voxels', 'custom'}
        Query set (see :func:`brainenc.models.build_query_set`); ``rois``/``streams`` need
        ``roi_labels`` and ``custom`` needs ``clusters`` at fit time.
    combine : {'sum', 'mean', 'first'}
        Rule for voxels in several ROIs (``sum`` as the original).
    families : list of str, optional
        ROI families used by ``queries='rois'`` (default: every family of ``roi_labels``).
    unknown : bool
        One ``unknown`` query per hemisphere for voxels in no ROI.
    preset : {'compact', 'paper'}
        Named configuration that ``model`` and ``train`` start from (:data:`PRESETS`). ``compact``
        (default): d 128, 8 heads, FFN 256, dropout 0.1, final LayerNorm, positional code x10;
        AdamW 1e-3, clip 1.0, batch 32, 30 epochs at a constant learning rate: a good model of a
        few thousand images in minutes on a CPU. ``paper``: the published configuration (d 768,
        16 heads, FFN 1024, dropout 0.1, final LayerNorm; AdamW 5e-4, clip 0.1, batch 16,
        15 epochs), for NSD-scale runs on a GPU.
    model : RoutingArchitecture or mapping, optional
        Architecture (``d_model``, ``n_heads``, ``d_ffn``, ``n_layers``, ``dropout``, ``positional``,
        ``query_self_attn``, ``value_proj``, ``input_proj``, ``final_norm``, ``queries_per_group``,
        ``voxel_variant``, ``voxel_chunk``, ``routing_backend``): a mapping overrides the preset's
        fields one by one; a RoutingArchitecture is used as it is.
    train : TrainConfig or mapping, optional
        Optimisation and execution (``epochs``, ``lr``, ``batch_size``, ``device``, ``amp``,
        ``eval_batch_size``, ...), over the preset as ``model``.
        ``predict`` runs on ``train.device`` with ``train.amp`` and ``train.eval_batch_size``.
    standardize_tokens : bool
        Standardise every token channel with the mean and standard deviation over the training
        rows' tokens (fitted by ``fit``, streamed over the rows; saved with the model and applied
        by ``predict`` and ``attention_maps``). Backbone activations have channel scales that differ
        by orders of magnitude and swamp the positional code; on by default.
    val_fraction : float
        Fraction of the training rows held out for best-epoch selection when ``fit`` gets no
        ``validation_data``, in [0, 1) (0 = no validation: keep the last epoch).
    val_seed : int
        Seed of that random split.
    scoring : {'r2', 'r'}
        Default metric of :meth:`score`.

    Attributes
    ----------
    model_ : RoutingEncoderModel
        The trained network (best epoch), in eval mode.
    query_set_ : QuerySet or None
        Voxel-to-query membership (None for ``queries='voxels'``).
    grid_ : (int, int)
    n_voxels_, n_features_, n_tokens_ : int
    best_epoch_ : int
    token_mean_, token_scale_ : ndarray, float32 [n_features], or None
        Token statistics applied before the model (None with ``standardize_tokens=False``).
    val_scores_ : ndarray, float32 [n_voxels], or None
        Validation Pearson r per voxel at the best epoch (input to ensembling).
    history_ : list of dict
        Per-epoch records of the trainer.
    train_index_ : ndarray, int64 [n_train]
        Rows of the ``fit`` data trained on.
    val_index_ : ndarray, int64 [n_val], or None
        Rows held out for validation (None with ``validation_data`` or ``val_fraction=0``).

    Examples
    --------
    >>> enc = RoutingEncoder(queries="hemis", model={"d_model": 16, "n_heads": 2}, train={"epochs": 2})
    >>> enc.fit(tokens, Y, hemi=hemi).predict(tokens).shape     # doctest: +SKIP
    (n_samples, n_voxels)
    """

    _nested_params = _NESTED  # from_pretrained merges mapping overrides into the saved tables

    def __init__(self, queries: str = "rois", combine: str = "sum", families: Sequence[str] | None = None,
                 unknown: bool = True, preset: str = "compact", model=None, train=None,
                 standardize_tokens: bool = True,
                 val_fraction: float = 0.1, val_seed: int = 0, scoring: str = "r2"):
        self.queries = queries
        self.combine = combine
        self.families = families
        self.unknown = unknown
        self.preset = preset
        self.model = model
        self.train = train
        self.standardize_tokens = standardize_tokens
        self.val_fraction = val_fraction
        self.val_seed = val_seed
        self.scoring = scoring

    # ---- parameters ------------------------------------------------------------------------
    @classmethod
    def _unknown_key_hint(cls, key: str, prefix: str) -> str | None:
        from brainenc.models import RoutingArchitecture
        from brainenc.training import TrainConfig

        for table, c in (("model", RoutingArchitecture), ("train", TrainConfig)):
            if key in {f.name for f in dataclasses.fields(c)}:  # a flat layout: it lives in a nested table
                return f"; it belongs in the '{prefix}{table}' table"
        return None

    def _preset(self, prefix: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
        return PRESETS[check_option(f"{prefix}preset", self.preset, tuple(PRESETS))]

    def _arch(self, prefix: str = ""):
        from brainenc.models import RoutingArchitecture

        return nested_config(RoutingArchitecture, self.model, "model", prefix, base=self._preset(prefix)[0])

    def _train_config(self, prefix: str = ""):
        from brainenc.training import TrainConfig

        return nested_config(TrainConfig, self.train, "train", prefix, base=self._preset(prefix)[1])

    def _check_params(self, prefix: str = ""):
        """Validate every parameter; returns the (RoutingArchitecture, TrainConfig) to fit with."""
        from brainenc.models.queries import COMBINE_RULES, QUERY_KINDS

        check_option(f"{prefix}queries", self.queries, QUERY_KINDS)
        check_option(f"{prefix}combine", self.combine, COMBINE_RULES)
        check_option(f"{prefix}scoring", self.scoring, ("r2", "r"))
        fams = self.families
        if fams is not None and (isinstance(fams, str) or not isinstance(fams, Sequence)
                                 or not all(isinstance(f, str) for f in fams)):
            raise ConfigError(f"'{prefix}families' must be None or a list of ROI family names; {fams!r} was provided")
        for name in ("unknown", "standardize_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"'{prefix}{name}' must be true or false; {getattr(self, name)!r} was provided")
        vf = self.val_fraction
        if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0.0 <= vf < 1.0:
            raise ConfigError(f"'{prefix}val_fraction' must be a number in [0, 1); {vf!r} was provided")
        if isinstance(self.val_seed, bool) or not isinstance(self.val_seed, (int, np.integer)):
            raise ConfigError(f"'{prefix}val_seed' must be an integer; {self.val_seed!r} was provided")
        return self._arch(prefix), self._train_config(prefix)

    # ---- fitting ---------------------------------------------------------------------------
    def fit(self, tokens, Y, *, grid: tuple[int, int] | None = None,
            roi_labels: Mapping[str, np.ndarray] | None = None, roi_names: Mapping[str, Mapping] | None = None,
            hemi: np.ndarray | None = None, clusters: np.ndarray | None = None,
            validation_data: tuple[np.ndarray, np.ndarray] | None = None,
            run_dir: str | Path | None = None, resume: bool = False) -> "RoutingEncoder":
        """Train the encoder.

        Parameters
        ----------
        tokens : array [n_samples, n_tokens, n_features]
            Cached backbone patch tokens (row-major over ``grid``); float16/32, memmaps welcome.
        Y : array [n_samples, n_voxels]
        grid : (h, w), optional
            Patch grid; inferred when ``n_tokens`` is a perfect square.
        roi_labels : dict family -> int array [n_voxels], optional
            ROI label arrays (0 = none), e.g. ``PreparedDataset.roi_labels``; needed for
            ``queries='rois'`` / ``'streams'``.
        roi_names : dict family -> {int: str}, optional
            Label names (``PreparedDataset.roi_names``); missing ones are named ``"<family>-<value>"``.
        hemi : array [n_voxels], optional
            Hemisphere per voxel (``"lh"``/``"rh"``); None = one group.
        clusters : int array [n_voxels], optional
            Labels for ``queries='custom'`` (negative = unknown).
        validation_data : (tokens_val [m, n_tokens, n_features], Y_val [m, n_voxels]), optional
            Held-out data for best-epoch selection (then ``val_fraction`` is not used).
        run_dir : path, optional
            Checkpoints, best weights and ``metrics.jsonl`` (enables ``resume``).
        resume : bool
            Continue an interrupted fit from ``run_dir``.

        Returns
        -------
        self
        """
        arch, train = self._check_params()
        from brainenc.models import RoutingEncoderModel, build_query_set
        from brainenc.training import Trainer, VoxelRegression, channel_statistics, seed_everything
        from brainenc.training.data import RowSubset

        if np.ndim(tokens) != 3:
            raise DataFormatError(f"'tokens' must be [n_samples, n_tokens, n_features]; got shape {np.shape(tokens)}")
        Y = check_array(Y, name="Y", ndim=2, dtype=np.float32)
        n, t, d = tokens.shape
        if Y.shape[0] != n:
            raise DataFormatError(f"'tokens' has {n} samples, 'Y' has {Y.shape[0]}")
        if grid is None:
            grid = _infer_grid(t)
        elif (len(tuple(grid)) != 2
              or not all(isinstance(g, (int, np.integer)) and not isinstance(g, bool) and g >= 1 for g in grid)):
            raise ConfigError(f"'grid' must be (h, w) with positive integer sizes; {grid!r} was provided")
        grid = (int(grid[0]), int(grid[1]))
        if grid[0] * grid[1] != t:
            raise ConfigError(f"'grid' {grid} has {grid[0] * grid[1]} cells but tokens have {t}")
        V = Y.shape[1]
        if validation_data is not None:
            Xv, Yv = validation_data
            Yv = check_array(Yv, name="Y_val", ndim=2, dtype=np.float32)
            if np.shape(Xv)[1:] != (t, d) or Yv.shape != (len(Xv), V):
                raise DataFormatError(f"'validation_data' shapes {np.shape(Xv)}, {Yv.shape} do not match "
                                      f"tokens [*, {t}, {d}] / Y [*, {V}]")
            Xt, Yt, val = tokens, Y, {"x": Xv, "y": Yv}
            train_index, val_index = np.arange(n), None
        else:
            n_val = int(round(self.val_fraction * n))
            perm = np.random.default_rng(self.val_seed).permutation(n)
            vi, ti = np.sort(perm[:n_val]), np.sort(perm[n_val:])
            train_index, val_index = ti, (vi if n_val else None)
            # lazy row views: a memmap of cached tokens is not copied into memory
            Xt, Yt = RowSubset(tokens, ti), Y[ti]
            val = {"x": RowSubset(tokens, vi), "y": Y[vi]} if n_val >= 2 else None
        query_set = build_query_set(self.queries, V, roi_labels=roi_labels, roi_names=roi_names, hemi=hemi,
                                    families=self.families, clusters=clusters, combine=self.combine,
                                    unknown=self.unknown)
        seed_everything(train.seed)  # model init is part of the seeded run
        model = RoutingEncoderModel(arch, feature_dim=int(d), grid=grid, n_voxels=V, query_set=query_set,
                                    token_norm=self.standardize_tokens)
        if self.standardize_tokens:
            mean, std = channel_statistics(Xt)
            # a constant channel keeps scale 1 (it becomes 0 after centring instead of inf/nan)
            std = np.where(std > 1e-6 * max(float(std.max()), 1e-30), std, 1.0)
            model.set_token_stats(mean, std)
        res = Trainer(model, train, objective=VoxelRegression(), run_dir=run_dir).fit(
            {"x": Xt, "y": Yt}, val=val, resume=resume)
        model.eval()
        self.model_, self.query_set_ = model, query_set
        self.grid_ = grid
        self.n_voxels_, self.n_features_, self.n_tokens_ = V, int(d), int(t)
        self.train_index_, self.val_index_ = train_index, val_index
        self.history_ = res.history
        self.best_epoch_ = res.best_epoch
        self.val_scores_ = res.val_scores
        return self

    def _is_fitted(self) -> bool:
        return hasattr(self, "model_")

    @property
    def token_mean_(self) -> np.ndarray | None:
        self._check_fitted()
        return self.model_.token_mean.cpu().numpy() if self.model_.token_norm else None

    @property
    def token_scale_(self) -> np.ndarray | None:
        self._check_fitted()
        return self.model_.token_scale.cpu().numpy() if self.model_.token_norm else None

    def _check_tokens(self, tokens) -> None:
        if np.ndim(tokens) != 3 or tuple(np.shape(tokens)[1:]) != (self.n_tokens_, self.n_features_):
            raise DataFormatError(f"'tokens' must be [n, {self.n_tokens_}, {self.n_features_}]; got {np.shape(tokens)}")

    # ---- inference -------------------------------------------------------------------------
    def predict(self, tokens, batch_size: int | None = None) -> np.ndarray:
        """Predicted responses.

        Parameters
        ----------
        tokens : array [n_samples, n_tokens, n_features]
        batch_size : int, optional
            Default ``train.eval_batch_size``.

        Returns
        -------
        ndarray, float32 [n_samples, n_voxels]
        """
        from brainenc.training import Trainer

        self._check_fitted()
        self._check_tokens(tokens)
        return Trainer(self.model_, self._train_config()).predict(tokens, batch_size)

    def to_torch(self, device=None):
        """The trained network as a frozen torch head on patch tokens (what :meth:`predict` runs).

        A copy of ``model_`` (its token standardisation included: the ``token_mean`` /
        ``token_scale`` buffers are applied inside the module), in eval mode with every parameter
        frozen, wrapped so that it stays in eval mode. It runs in float32 (``predict`` runs under
        ``train.amp`` when that is on; wrap the call in ``torch.autocast`` to match it).

        Parameters
        ----------
        device : str or torch.device, optional
            Where the copy lives (default: the CPU).

        Returns
        -------
        torch.nn.Module
            ``forward(tokens [n, n_tokens, n_features]) -> [n, n_voxels]``; gradients flow back to
            the tokens. Attributes ``input_kind = "tokens"``, ``n_features``, ``n_tokens``,
            ``grid``, ``n_outputs``.

        Raises
        ------
        NotFittedError
            Before ``fit``.
        """
        import copy

        import torch

        self._check_fitted()
        model = copy.deepcopy(self.model_).to(device if device is not None else "cpu")
        return _routing_head_class(torch)(model, grid=self.grid_, n_voxels=self.n_voxels_,
                                          n_features=self.n_features_, n_tokens=self.n_tokens_,
                                          info={"queries": self.queries, "n_queries": len(self.query_names_),
                                                "best_epoch": int(self.best_epoch_)})

    def score(self, tokens, Y, sample_weight=None, *, metric: str | None = None) -> np.ndarray:
        """Per-voxel score of the predictions.

        Unlike scikit-learn regressors, this returns one value **per voxel**, not their mean.

        Parameters
        ----------
        tokens : array [n_samples, n_tokens, n_features]
        Y : array [n_samples, n_voxels]
        sample_weight : None
            Not supported (present for scikit-learn signature compatibility).
        metric : {'r2', 'r'}, optional
            Default ``scoring`` (R², as RidgeEncoder).

        Returns
        -------
        ndarray [n_voxels]
        """
        from brainenc.metrics import pearson_r, r2_score

        if sample_weight is not None:
            raise ConfigError("'sample_weight' is not supported by RoutingEncoder.score")
        metric = check_option("metric", metric or self.scoring, ("r2", "r"))
        Y = check_array(Y, name="Y", ndim=2, dtype=np.float32)
        pred = self.predict(tokens)
        return np.asarray(pearson_r(Y, pred) if metric == "r" else r2_score(Y, pred))

    def attention_maps(self, tokens, *, layer: int = -1, queries=None, per_head: bool = False,
                       batch_size: int = 16) -> np.ndarray:
        """Cross-attention maps of the queries on the patch grid.

        Parameters
        ----------
        tokens : array [n, n_tokens, n_features]
        layer : int
            Decoder layer.
        queries : sequence of int or str, optional
            Query indices or names (``query_names_``); default all (voxel queries: pass a subset).
        per_head : bool
            Keep heads (default: mean over heads, as the original's ``need_weights`` output).
        batch_size : int

        Returns
        -------
        maps : ndarray, float32 [n, q, h, w] or [n, H, q, h, w]
            Each map sums to 1 over the grid.
        """
        import torch

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
        """Query names [Q·K] (``"<roi>#<k>"`` with ``queries_per_group`` K > 1; voxel queries: ``"voxel-<i>"``)."""
        self._check_fitted()
        if self.model_.query_names is not None:
            return list(self.model_.query_names)
        return [f"voxel-{i}" for i in range(self.n_voxels_)]

    # ---- persistence (through EstimatorMixin.save_pretrained / from_pretrained) ---------------
    def _config_json(self) -> dict[str, Any]:
        return self._resolved_config_json()

    def _fitted_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        arrays: dict[str, Any] = {f"model.{k}": v for k, v in self.model_.state_dict().items()}
        if self.query_set_ is not None:
            arrays.update({f"queryset.{k}": v for k, v in self.query_set_.arrays().items()})
        if self.val_scores_ is not None:
            arrays["val_scores"] = np.asarray(self.val_scores_, dtype=np.float32)
        arrays["train_index"] = np.asarray(self.train_index_, dtype=np.int64)
        if self.val_index_ is not None:
            arrays["val_index"] = np.asarray(self.val_index_, dtype=np.int64)
        meta = {"grid": list(self.grid_), "n_voxels": int(self.n_voxels_), "n_features": int(self.n_features_),
                "n_tokens": int(self.n_tokens_), "best_epoch": int(self.best_epoch_), "history": to_json_value(self.history_),
                "query_set": None if self.query_set_ is None else self.query_set_.meta()}
        return arrays, meta

    def _restore_fitted(self, arrays: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
        import torch

        from brainenc.models import QuerySet, RoutingEncoderModel

        qs = None
        if meta["query_set"] is not None:
            qs = QuerySet.from_parts(meta["query_set"], {k[len("queryset."):]: v for k, v in arrays.items()
                                                         if k.startswith("queryset.")})
        grid = (int(meta["grid"][0]), int(meta["grid"][1]))
        with torch.random.fork_rng(devices=[]):  # building the modules draws init values; leave the user's RNG alone
            model = RoutingEncoderModel(self._arch(), feature_dim=int(meta["n_features"]), grid=grid,
                                        n_voxels=int(meta["n_voxels"]), query_set=qs,
                                        token_norm=self.standardize_tokens)
        load_module_state(model, {k[len("model."):]: v for k, v in arrays.items() if k.startswith("model.")},
                          f"in {CONFIG_FILE}")
        model.eval()
        self.model_, self.query_set_ = model, qs
        self.grid_ = grid
        self.n_voxels_, self.n_features_ = int(meta["n_voxels"]), int(meta["n_features"])
        self.n_tokens_ = int(meta["n_tokens"])
        self.best_epoch_, self.history_ = int(meta["best_epoch"]), list(meta["history"])
        self.val_scores_ = arrays["val_scores"] if "val_scores" in arrays else None
        self.train_index_ = arrays["train_index"]
        self.val_index_ = arrays["val_index"] if "val_index" in arrays else None

    @classmethod
    def from_pretrained(cls, directory: str | Path, **params) -> "RoutingEncoder":
        """Load an encoder written by :meth:`save_pretrained` (``config.json`` + ``model.safetensors``).

        Parameters
        ----------
        directory : path
        **params
            Constructor parameters to override. A mapping given for ``model`` or ``train`` updates
            the saved table key by key, e.g. ``train={"device": "cpu"}`` or
            ``model={"routing_backend": "chunked"}`` (execution settings; a changed architecture
            would not fit the saved weights).
        """
        directory = Path(directory).expanduser()
        saved = read_pretrained_config(directory)["config"]
        for key, legacy in _LEGACY_DEFAULTS.items():  # saved before the parameter existed
            if key not in saved:
                params.setdefault(key, legacy)
        return super().from_pretrained(directory, **params)
