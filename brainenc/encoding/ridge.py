"""Voxelwise ridge encoder: a thin scikit-learn shell over ``brainenc.encoding._ridge_solvers``."""
from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin

from brainenc._utils.validation import check_array, check_option
from brainenc.encoding._ridge_solvers import SCORINGS, solve_ridge_cv, solve_ridge_gcv
from brainenc.estimator import EstimatorMixin, register_estimator
from brainenc.exceptions import ConfigError, DataFormatError

__all__ = ["RidgeEncoder", "DEFAULT_ALPHAS", "fit_standardizer", "linear_head"]

#: Default penalty grid: 9 values from 1e-2 to 1e6 (features on the scale of z-scored units).
DEFAULT_ALPHAS = np.logspace(-2, 6, 9)


def check_xy(X, Y=None, *, n_features: int | None = None):
    """Validate X [n, p] (and Y [n, v] or [n]) with one-line errors naming the argument.

    Returns X as an ndarray and Y as a 2-D array (memmaps stay memmaps) plus a flag telling
    whether Y was 1-D.
    """
    X = check_array(X, name="X", ndim=2)
    if X.dtype.kind not in "fiu":
        raise DataFormatError(f"'X' must be numeric; got dtype {X.dtype}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise DataFormatError(f"'X' must be non-empty; got shape {X.shape}")
    if n_features is not None and X.shape[1] != n_features:
        raise DataFormatError(f"'X' has {X.shape[1]} features but the encoder was fitted with {n_features}")
    if Y is None:
        return X, None, False
    Y = check_array(Y, name="Y", ndim=(1, 2))
    if Y.dtype.kind not in "fiu":
        raise DataFormatError(f"'Y' must be numeric; got dtype {Y.dtype}")
    if Y.shape[0] != X.shape[0]:
        raise DataFormatError(f"'X' and 'Y' must have the same number of samples; got {X.shape[0]} and {Y.shape[0]}")
    ravel = Y.ndim == 1
    return X, (Y[:, None] if ravel else Y), ravel


def _unit_rows(X: np.ndarray) -> np.ndarray:
    """Rows of ``X`` divided by their L2 norm (zero rows stay zero)."""
    n = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(n, 1e-12).astype(X.dtype)


def fit_standardizer(X: np.ndarray, enabled: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and scale of the training rows ``X`` [n, p] (zeros and ones when disabled).

    The scale is the population std (``ddof=0``, as ``sklearn.preprocessing.StandardScaler``);
    constant features (std <= 1e-8) keep scale 1. Both are computed in ``X``'s float dtype.
    """
    dt = X.dtype if X.dtype.kind == "f" else np.float64
    if not enabled:
        return np.zeros(X.shape[1], dt), np.ones(X.shape[1], dt)
    mean = X.mean(axis=0)
    sd = X.std(axis=0)
    return mean.astype(dt, copy=False), np.where(sd > 1e-8, sd, 1.0).astype(dt)


_LINEAR_HEAD = None


def _linear_head_class():
    """The :class:`LinearHead` module class, defined on first use (importing this module imports no torch)."""
    global _LINEAR_HEAD
    if _LINEAR_HEAD is not None:
        return _LINEAR_HEAD
    import torch

    class LinearHead(torch.nn.Module):
        """Frozen float32 linear readout ``((X - mean) / scale) @ weight + bias`` on design rows.

        Everything is a buffer (no parameters): it moves with ``.to(device)`` and never trains.

        Attributes
        ----------
        input_kind : str
            ``"design"``: a design matrix [n, n_features] (2-D).
        n_features, n_outputs : int
        standardize : bool
            Whether ``mean`` / ``scale`` are applied (False: the identity, skipped).
        unit_norm : bool
            Rows are L2-normalised first (``RidgeEncoder(unit_norm=True)``).
        """

        input_kind = "design"

        def __init__(self, weight, bias, mean=None, scale=None, *, estimator: str = "", info: dict | None = None,
                     unit_norm: bool = False):
            super().__init__()
            self.unit_norm = bool(unit_norm)
            w = torch.as_tensor(np.asarray(weight, dtype=np.float32))
            if w.ndim != 2:
                raise DataFormatError(f"linear head weights must be [n_features, n_outputs]; got {tuple(w.shape)}")
            b = torch.as_tensor(np.asarray(bias, dtype=np.float32)).reshape(-1)
            if b.numel() != w.shape[1]:
                raise DataFormatError(f"linear head bias has {b.numel()} entries for {w.shape[1]} outputs")
            self.n_features, self.n_outputs = int(w.shape[0]), int(w.shape[1])
            self.standardize = mean is not None
            self.estimator = str(estimator)
            self.info = dict(info or {})
            self.register_buffer("weight", w.contiguous())
            self.register_buffer("bias", b.contiguous())
            if self.standardize:
                self.register_buffer("mean", torch.as_tensor(np.asarray(mean, dtype=np.float32)).reshape(-1))
                self.register_buffer("scale", torch.as_tensor(np.asarray(scale, dtype=np.float32)).reshape(-1))
            self.eval()

        def train(self, mode: bool = True):  # noqa: D401 - a fitted readout has no training mode
            """Stay in eval mode whatever ``mode`` is."""
            return super().train(False)

        def forward(self, X):
            """Responses [n, n_outputs] of design rows ``X`` [n, n_features] (gradients flow to ``X``)."""
            if X.ndim != 2 or X.shape[1] != self.n_features:
                raise DataFormatError(f"{self.estimator or 'linear head'}: input must be [n, {self.n_features}]; "
                                      f"got {tuple(X.shape)}")
            X = X.to(self.weight.dtype)
            if self.unit_norm:
                X = X / X.norm(dim=1, keepdim=True).clamp_min(1e-12)
            if self.standardize:
                X = (X - self.mean) / self.scale
            return X @ self.weight + self.bias

        def describe(self) -> dict:
            return {"estimator": self.estimator, "input_kind": self.input_kind, "n_features": self.n_features,
                    "n_outputs": self.n_outputs, "standardize": self.standardize, "unit_norm": self.unit_norm,
                    **self.info}

        def extra_repr(self) -> str:
            return f"n_features={self.n_features}, n_outputs={self.n_outputs}, standardize={self.standardize}"

    _LINEAR_HEAD = LinearHead
    return LinearHead


def linear_head(weight, bias, mean=None, scale=None, *, estimator: str = "", info: dict | None = None,
                unit_norm: bool = False):
    """A frozen float32 torch head ``((X - mean) / scale) @ weight + bias`` (``mean`` None: no standardisation).

    Parameters
    ----------
    weight : array of shape (n_features, n_outputs)
    bias : array of shape (n_outputs,)
    mean, scale : array of shape (n_features,), optional
    estimator : str
        Registry name of the estimator it comes from (``describe()``).
    info : dict, optional
        Extra entries of ``describe()``.

    Returns
    -------
    torch.nn.Module
        ``forward(X [n, n_features]) -> [n, n_outputs]``; attributes ``input_kind = "design"``,
        ``n_features``, ``n_outputs``; buffers only, eval mode.
    """
    return _linear_head_class()(weight, bias, mean, scale, estimator=estimator, info=info, unit_norm=unit_norm)


@register_estimator("ridge")
class RidgeEncoder(EstimatorMixin, RegressorMixin, BaseEstimator):
    """Voxelwise ridge regression with one penalty per voxel chosen by cross-validation.

    Parameters
    ----------
    alphas : array-like of shape (n_alphas,) or None
        Candidate penalties; None means ``DEFAULT_ALPHAS`` = ``np.logspace(-2, 6, 9)``.
    cv : int, scikit-learn splitter, list of (train, test) index pairs, or None
        K-fold scheme for ``solver="kfold"``. An int ``k`` is ``KFold(k)`` *without* shuffling
        (contiguous folds; fMRI samples close in time are correlated). None selects GCV.
    fit_intercept : bool
        Fit one intercept per voxel (X and Y are centred on each fold's training rows).
    scoring : {"r2", "neg_mse"}
        Validation score averaged over folds to pick alphas (``"neg_mse"`` is himalaya's
        default). GCV always ranks by LOO squared error.
    alpha_per_target : bool
        One alpha per voxel (default) or one shared alpha (best mean score).
    solver : {"auto", "kfold", "gcv"}
        ``"gcv"``: exact leave-one-out errors from one decomposition (as sklearn's RidgeCV with
        ``cv=None``); ``"auto"``: GCV if ``cv is None`` else K-fold.
    backend : {"numpy", "torch"}
        Array library for the solver; torch runs the same code on ``device``.
    device : str
        "cpu" or a torch device such as "cuda" / "cuda:1" (torch backend only).
    dtype : {"float32", "float64"}
        Working dtype of the target-sized products (decompositions always use float64).
    target_batch_size : int or None
        Voxels per batch (bounds peak memory); None picks a batch with a ~256 MiB working set.
    verbose : bool
        Show a progress bar over voxel batches.
    standardize : bool
        Z-score each feature with the training rows' mean and std inside ``fit`` (saved with the
        model and applied by ``predict``); ``coef_`` then refers to the standardised features.
    unit_norm : bool
        L2-normalise every input row first (before ``standardize``), in ``fit``, ``predict`` and
        ``to_torch``: BrainDiVE's encoder is a linear map of the unit-norm CLIP image embedding.

    Attributes
    ----------
    coef_ : ndarray of shape (n_features, n_voxels)
        Weights refit on all samples with each voxel's best alpha (shape (n_features,) if Y was 1-D).
    intercept_ : ndarray of shape (n_voxels,)
    best_alphas_ : ndarray of shape (n_voxels,)
    cv_scores_ : ndarray of shape (n_alphas, n_voxels)
        Mean validation score over folds per alpha (``scoring``), or LOO score for GCV.
    alphas_ : ndarray of shape (n_alphas,)
    n_features_in_ : int
    solver_ : str
        "kfold" or "gcv".
    feature_mean_, feature_scale_ : ndarray of shape (n_features,)
        Standardisation fitted on the training rows (zeros and ones when ``standardize=False``).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X, B = rng.standard_normal((200, 10)), rng.standard_normal((10, 3))
    >>> Y = X @ B + rng.standard_normal((200, 3))
    >>> enc = RidgeEncoder(alphas=[0.1, 1, 10], cv=4).fit(X, Y)
    >>> enc.score(X, Y).shape
    (3,)
    >>> enc.save_pretrained(tmp / "ridge")  # doctest: +SKIP
    >>> brainenc.load(tmp / "ridge").predict(X)  # doctest: +SKIP
    """

    _fitted_arrays = ("coef_", "intercept_", "best_alphas_", "cv_scores_", "alphas_", "feature_mean_",
                      "feature_scale_")
    _fitted_meta = ("n_features_in_", "solver_")

    def __init__(self, alphas=None, cv=5, fit_intercept: bool = True, scoring: str = "r2",
                 alpha_per_target: bool = True, solver: str = "auto", backend: str = "numpy",
                 device: str = "cpu", dtype: str = "float32", target_batch_size: int | None = None,
                 verbose: bool = False, standardize: bool = False, unit_norm: bool = False):
        self.alphas = alphas
        self.cv = cv
        self.fit_intercept = fit_intercept
        self.scoring = scoring
        self.alpha_per_target = alpha_per_target
        self.solver = solver
        self.backend = backend
        self.device = device
        self.dtype = dtype
        self.target_batch_size = target_batch_size
        self.verbose = verbose
        self.standardize = standardize
        self.unit_norm = unit_norm

    def _check_params(self, prefix: str = ""):
        """Validate the parameters (before any data is read); returns the (solver, alphas) to fit with."""
        check_option(f"{prefix}solver", self.solver, ["auto", "kfold", "gcv"])
        check_option(f"{prefix}backend", self.backend, ["numpy", "torch"])
        check_option(f"{prefix}dtype", self.dtype, ["float32", "float64"])
        check_option(f"{prefix}scoring", self.scoring, list(SCORINGS))
        for name in ("fit_intercept", "alpha_per_target", "standardize", "verbose", "unit_norm"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ConfigError(f"'{prefix}{name}' must be true or false; {getattr(self, name)!r} was provided")
        if self.target_batch_size is not None and (
            isinstance(self.target_batch_size, bool) or not isinstance(self.target_batch_size, (int, np.integer))
            or self.target_batch_size < 1
        ):
            raise ConfigError(f"'{prefix}target_batch_size' must be None or an int >= 1; "
                              f"{self.target_batch_size!r} was provided")
        cv = self.cv
        if isinstance(cv, bool) or (isinstance(cv, (int, np.integer)) and cv < 2):
            raise ConfigError(f"'{prefix}cv' must be an int >= 2, a splitter, or None for leave-one-out GCV; "
                              f"{cv!r} was provided")
        solver = self.solver
        if solver == "auto":
            solver = "gcv" if cv is None else "kfold"
        if solver == "kfold" and cv is None:
            raise ConfigError(f"'{prefix}cv' must not be None with solver='kfold' (use solver='gcv' for leave-one-out)")
        alphas = DEFAULT_ALPHAS if self.alphas is None else self.alphas
        try:
            a = np.atleast_1d(np.asarray(alphas, dtype=np.float64))
        except (TypeError, ValueError):
            raise ConfigError(f"'{prefix}alphas' must be None or a list of numbers > 0; {alphas!r} was provided") from None
        if a.ndim != 1 or a.size == 0 or not np.all(np.isfinite(a)) or np.any(a <= 0):
            raise ConfigError(f"'{prefix}alphas' must all be finite and > 0 (a non-empty list, or None for the "
                              f"default grid); {alphas!r} was provided")
        return solver, alphas

    def fit(self, X, Y):
        """Fit per-voxel ridge models.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Stimulus features.
        Y : array-like of shape (n_samples, n_voxels) or (n_samples,)
            Responses; a memmap is read in voxel batches.

        Returns
        -------
        self : RidgeEncoder
        """
        solver, alphas = self._check_params()
        X, Y2, ravel = check_xy(X, Y)
        if self.unit_norm:
            X = _unit_rows(X)
        mean, scale = fit_standardizer(X, self.standardize)
        if self.standardize:
            X = (X - mean) / scale
        progress = None
        if self.verbose:
            from brainenc._utils.logging import progress
        common = dict(fit_intercept=self.fit_intercept, scoring=self.scoring, alpha_per_target=self.alpha_per_target,
                      backend=self.backend, device=self.device, dtype=self.dtype,
                      target_batch_size=self.target_batch_size, progress=progress)
        if solver == "gcv":
            res = solve_ridge_gcv(X, Y2, alphas, **common)
        else:
            res = solve_ridge_cv(X, Y2, alphas, self.cv, **common)
        self.alphas_ = np.atleast_1d(np.asarray(alphas, dtype=np.float64))
        self.coef_ = res["coef"][:, 0] if ravel else res["coef"]
        self.intercept_ = res["intercept"][0] if ravel else res["intercept"]
        self.best_alphas_ = res["best_alphas"]
        self.cv_scores_ = res["cv_scores"]
        self.n_features_in_ = X.shape[1]
        self.solver_ = solver
        self.feature_mean_, self.feature_scale_ = mean, scale
        return self

    def _transform(self, X) -> np.ndarray:
        """Validated X, standardised with the training statistics when ``standardize``."""
        X, _, _ = check_xy(X, n_features=self.n_features_in_)
        if getattr(self, "unit_norm", False):
            X = _unit_rows(X)
        if self.standardize:
            X = (X - self.feature_mean_) / self.feature_scale_
        return X

    def predict(self, X):
        """Predict voxel responses.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        Y_pred : ndarray of shape (n_samples, n_voxels) (or (n_samples,) if fitted on 1-D Y)
        """
        self._check_fitted()
        return self._transform(X).astype(self.dtype, copy=False) @ self.coef_ + self.intercept_

    def to_torch(self):
        """The fitted model as a frozen torch head on design rows (what :meth:`predict` applies).

        ``((X - feature_mean_) / feature_scale_) @ coef_ + intercept_`` in float32 (the
        standardisation only with ``standardize=True``), so it composes with a differentiable
        feature extractor (``brainenc.features.differentiable``) and gradients flow back to ``X``.

        Returns
        -------
        torch.nn.Module
            ``forward(X [n, n_features]) -> [n, n_voxels]`` (``[n, 1]`` when fitted on 1-D ``Y``);
            attributes ``input_kind = "design"``, ``n_features``, ``n_outputs``; no parameters
            (buffers only), eval mode, on the CPU.

        Raises
        ------
        NotFittedError
            Before ``fit``.
        """
        self._check_fitted()
        coef = np.asarray(self.coef_)
        coef = coef[:, None] if coef.ndim == 1 else coef
        mean = scale = None
        if self.standardize:
            mean, scale = self.feature_mean_, self.feature_scale_
        return linear_head(coef, np.atleast_1d(self.intercept_), mean, scale, estimator="ridge",
                           info={"solver": self.solver_}, unit_norm=bool(getattr(self, "unit_norm", False)))

    def score(self, X, Y, sample_weight=None):
        """Per-voxel coefficient of determination R² of the predictions.

        Unlike scikit-learn regressors, this returns one value **per voxel**, not their mean.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        Y : array-like of shape (n_samples, n_voxels)
        sample_weight : None
            Not supported (present for scikit-learn signature compatibility).

        Returns
        -------
        r2 : ndarray of shape (n_voxels,)
            As ``sklearn.metrics.r2_score(Y, Y_pred, multioutput="raw_values")``.
        """
        from brainenc.metrics import r2_score

        if sample_weight is not None:
            raise ConfigError("'sample_weight' is not supported by RidgeEncoder.score")
        self._check_fitted()
        X, Y2, _ = check_xy(X, Y, n_features=self.n_features_in_)
        pred = self.predict(X)
        return np.atleast_1d(r2_score(Y2, pred.reshape(Y2.shape)))
