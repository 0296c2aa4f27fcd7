"""Ridge decoder: voxels -> any image-feature target (CNN maps, CLIP embeddings or tokens, pixels).

The decoder is the encoding ridge turned around: the voxels are the regressors and every feature
dimension of every target is one ridge problem, with its own penalty chosen by leave-one-out GCV
(default) or K-fold cross-validation on the training rows (the solvers of
``brainenc.encoding._ridge_solvers``, shared with :class:`~brainenc.encoding.RidgeEncoder`).
Targets keep their shapes: fit on ``{"maps.0": [n, 16, 32, 32], "clip": [n, 768]}`` and
``predict`` returns the same names and shapes, so any decoder (this one, Brain-IT) hands the
image stages the same structure.

Example
-------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> V = rng.standard_normal((120, 50))
>>> T = {"emb": V[:, :8] @ rng.standard_normal((8, 4)), "map": rng.standard_normal((120, 2, 3, 3))}
>>> dec = RidgeDecoder(alphas=[1, 10, 100]).fit(V[:100], {k: v[:100] for k, v in T.items()})
>>> {k: v.shape for k, v in dec.predict(V[100:]).items()}
{'emb': (20, 4), 'map': (20, 2, 3, 3)}
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from sklearn.base import BaseEstimator

from brainenc.encoding._ridge_solvers import solve_ridge_cv, solve_ridge_gcv
from brainenc.encoding.ridge import RidgeEncoder, check_xy, fit_standardizer
from brainenc.estimator import EstimatorMixin, register_estimator
from brainenc.exceptions import ConfigError, DataFormatError

__all__ = ["RidgeDecoder", "flatten_targets", "unflatten_targets", "match_train_statistics"]

_SINGLE = "__target__"


def flatten_targets(targets, n_samples: int | None = None) -> tuple[np.ndarray, list[str], list[tuple[int, ...]]]:
    """``targets`` (one array ``[n, ...]`` or a mapping name -> array) as one ``[n, F]`` float matrix.

    Returns the matrix, the target names (``["__target__"]`` for a bare array) and their
    per-sample shapes, which :func:`unflatten_targets` uses to undo the flattening.
    """
    items = targets.items() if isinstance(targets, Mapping) else [(_SINGLE, targets)]
    names, shapes, blocks = [], [], []
    for name, arr in items:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"target names must be non-empty strings; {name!r} was provided")
        a = np.asarray(arr)
        label = "targets" if name == _SINGLE else f"targets[{name!r}]"
        if a.dtype.kind not in "fiu":
            raise DataFormatError(f"'{label}' must be numeric; got dtype {a.dtype}")
        if a.ndim < 2:
            a = a.reshape(-1, 1)
        if n_samples is not None and a.shape[0] != n_samples:
            raise DataFormatError(f"'{label}' has {a.shape[0]} samples but the voxels have {n_samples}")
        if not np.all(np.isfinite(a)):
            raise DataFormatError(f"'{label}' contains NaN or inf")
        names.append(name)
        shapes.append(tuple(int(s) for s in a.shape[1:]))
        blocks.append(a.reshape(a.shape[0], -1).astype(np.float64 if a.dtype == np.float64 else np.float32))
    if not names:
        raise ConfigError("'targets' must hold at least one target")
    return np.concatenate(blocks, axis=1), names, shapes


def unflatten_targets(flat: np.ndarray, names, shapes):
    """Inverse of :func:`flatten_targets`: a bare array for a single unnamed target, else a dict."""
    out, start = {}, 0
    for name, shape in zip(names, shapes):
        size = int(np.prod(shape)) if shape else 1
        out[name] = flat[:, start:start + size].reshape((flat.shape[0],) + tuple(shape))
        start += size
    return out[_SINGLE] if list(names) == [_SINGLE] else out


def match_train_statistics(pred, train, eps: float = 1e-8) -> np.ndarray:
    """Give every feature of ``pred`` [n, ...] the mean and std the training targets ``train`` [m, ...] have.

    Ridge predictions are shrunk towards the mean, so an image optimised to match them drifts
    towards the average image. Brain-Diffuser's recipe (Ozcelik & VanRullen 2023) z-scores each
    predicted feature over the predicted set and rescales it with the training targets' mean and
    std. Only predictions and training targets are used (never the test targets); a feature that
    is constant over ``pred`` gets the training mean.
    """
    p = np.asarray(pred, np.float64)
    t = np.asarray(train, np.float64)
    if p.shape[1:] != t.shape[1:]:
        raise DataFormatError(f"'pred' has per-sample shape {p.shape[1:]} but 'train' has {t.shape[1:]}")
    f = p.reshape(len(p), -1)
    tt = t.reshape(len(t), -1)
    sd = f.std(0)
    z = np.where(sd > eps, (f - f.mean(0)) / np.where(sd > eps, sd, 1.0), 0.0)
    return (z * tt.std(0) + tt.mean(0)).reshape(p.shape).astype(np.asarray(pred).dtype)


@register_estimator("ridge_decoder")
class RidgeDecoder(EstimatorMixin, BaseEstimator):
    """Ridge regression from voxels to image features, one penalty per feature dimension.

    Parameters
    ----------
    alphas : array-like or None
        Candidate penalties; None means ``DEFAULT_ALPHAS`` (``np.logspace(-2, 6, 9)``). With
        ``standardize_voxels`` the scale is that of z-scored voxels, so useful penalties grow with
        the number of voxels (try up to ``1e5`` for thousands of voxels).
    cv : int, splitter, list of (train, test) pairs, or None
        None (default): exact leave-one-out GCV from one decomposition; an int ``k``: contiguous
        K-fold.
    alpha_per_target : bool
        One penalty per feature dimension (default) or one shared penalty.
    standardize_voxels : bool
        Z-score each voxel with the training rows' statistics (stored, reapplied by ``predict``).
    standardize_targets : bool
        Fit on z-scored feature dimensions and map predictions back to the target's scale, so that
        the shared-alpha search and the scoring weigh every dimension alike.
    backend, device, dtype, target_batch_size, verbose
        As :class:`~brainenc.encoding.RidgeEncoder`.

    Attributes
    ----------
    coef_ : ndarray of shape (n_voxels, n_outputs)
    intercept_ : ndarray of shape (n_outputs,)
    best_alphas_ : ndarray of shape (n_outputs,)
    voxel_mean_, voxel_scale_ : ndarray of shape (n_voxels,)
    target_mean_, target_scale_ : ndarray of shape (n_outputs,)
    target_names_ : list of str
    target_shapes_ : list of list of int
    n_features_in_ : int
        Number of voxels.
    """

    _fitted_arrays = ("coef_", "intercept_", "best_alphas_", "voxel_mean_", "voxel_scale_", "target_mean_",
                      "target_scale_")
    _fitted_meta = ("n_features_in_", "target_names_", "target_shapes_", "solver_")

    def __init__(self, alphas=None, cv=None, alpha_per_target: bool = True, standardize_voxels: bool = True,
                 standardize_targets: bool = True, backend: str = "numpy", device: str = "cpu",
                 dtype: str = "float32", target_batch_size: int | None = None, verbose: bool = False):
        self.alphas = alphas
        self.cv = cv
        self.alpha_per_target = alpha_per_target
        self.standardize_voxels = standardize_voxels
        self.standardize_targets = standardize_targets
        self.backend = backend
        self.device = device
        self.dtype = dtype
        self.target_batch_size = target_batch_size
        self.verbose = verbose

    def _ridge(self) -> RidgeEncoder:
        return RidgeEncoder(alphas=self.alphas, cv=self.cv, fit_intercept=True, alpha_per_target=self.alpha_per_target,
                            backend=self.backend, device=self.device, dtype=self.dtype,
                            target_batch_size=self.target_batch_size, verbose=self.verbose)

    def _check_params(self, prefix: str = ""):
        for name in ("standardize_voxels", "standardize_targets"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ConfigError(f"'{prefix}{name}' must be true or false; {getattr(self, name)!r} was provided")
        return self._ridge()._check_params(prefix)

    def fit(self, voxels, targets):
        """Fit the decoder.

        Parameters
        ----------
        voxels : array-like of shape (n_samples, n_voxels)
        targets : array-like of shape (n_samples, ...) or mapping of str to such arrays

        Returns
        -------
        self : RidgeDecoder
        """
        solver, alphas = self._check_params()
        X, _, _ = check_xy(voxels)
        Y, names, shapes = flatten_targets(targets, X.shape[0])
        if X.shape[0] < 3:
            raise DataFormatError(f"'voxels' must hold at least 3 samples to choose a penalty; got {X.shape[0]}")
        vmean, vscale = fit_standardizer(X, self.standardize_voxels)
        X = (X - vmean) / vscale
        tmean, tscale = fit_standardizer(Y, self.standardize_targets)
        Y = (Y - tmean) / tscale
        progress = None
        if self.verbose:
            from brainenc._utils.logging import progress
        common = dict(fit_intercept=True, scoring="r2", alpha_per_target=self.alpha_per_target, backend=self.backend,
                      device=self.device, dtype=self.dtype, target_batch_size=self.target_batch_size,
                      progress=progress)
        if solver == "gcv":
            res = solve_ridge_gcv(X, Y, alphas, **common)
        else:
            res = solve_ridge_cv(X, Y, alphas, self.cv, **common)
        self.coef_ = np.asarray(res["coef"])
        self.intercept_ = np.asarray(res["intercept"])
        self.best_alphas_ = np.asarray(res["best_alphas"])
        self.voxel_mean_, self.voxel_scale_ = vmean, vscale
        self.target_mean_, self.target_scale_ = tmean, tscale
        self.target_names_ = list(names)
        self.target_shapes_ = [list(s) for s in shapes]
        self.n_features_in_ = int(X.shape[1])
        self.solver_ = solver
        return self

    def predict_flat(self, voxels) -> np.ndarray:
        """Predictions as one ``[n_samples, n_outputs]`` matrix in the targets' units."""
        self._check_fitted()
        X, _, _ = check_xy(voxels, n_features=self.n_features_in_)
        X = ((X - self.voxel_mean_) / self.voxel_scale_).astype(self.dtype, copy=False)
        Z = X @ self.coef_.astype(self.dtype, copy=False) + self.intercept_
        return Z * self.target_scale_ + self.target_mean_

    def predict(self, voxels):
        """Predicted targets with their fitted names and shapes (a bare array for a bare target)."""
        return unflatten_targets(self.predict_flat(voxels), self.target_names_,
                                 [tuple(s) for s in self.target_shapes_])

    def score(self, voxels, targets) -> dict[str, float] | float:
        """Mean Pearson r over each target's feature dimensions (per name; a float for a bare target)."""
        from brainenc.metrics import pearson_r

        pred = self.predict_flat(voxels)
        Y, names, shapes = flatten_targets(targets, pred.shape[0])
        if names != self.target_names_ or [list(s) for s in shapes] != self.target_shapes_:
            raise DataFormatError(f"'targets' must have the fitted names and shapes "
                                  f"{dict(zip(self.target_names_, self.target_shapes_))}")
        r = pearson_r(Y, pred)
        out: dict[str, Any] = {}
        start = 0
        for name, shape in zip(names, shapes):
            size = int(np.prod(shape)) if shape else 1
            out[name] = float(np.nanmean(r[start:start + size]))
            start += size
        return out[_SINGLE] if names == [_SINGLE] else out

