"""Banded ridge: one penalty per feature space (e.g. two backbone layers), chosen per voxel."""
from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin

from brainenc._utils.validation import check_option
from brainenc.encoding._ridge_solvers import SCORINGS, solve_banded_ridge_cv
from brainenc.encoding.ridge import DEFAULT_ALPHAS, check_xy, linear_head
from brainenc.estimator import EstimatorMixin, register_estimator
from brainenc.exceptions import ConfigError, DataFormatError

__all__ = ["BandedRidgeEncoder", "make_band_gammas"]


def make_band_gammas(n_iter: int, n_bands: int, concentration=(0.1, 1.0), random_state=0) -> np.ndarray:
    """Candidate band weightings on the simplex (himalaya's random search).

    Draws ``n_iter`` Dirichlet samples, cycling through ``concentration`` (0.1 favours one band,
    1.0 is uniform on the simplex, ``inf`` gives equal weights); the first candidate is always the
    equal weighting. Same numbers as ``himalaya.kernel_ridge.generate_dirichlet_samples`` for the
    same integer ``random_state``.

    Parameters
    ----------
    n_iter : int
    n_bands : int
    concentration : float or sequence of float
    random_state : int, numpy RandomState or None

    Returns
    -------
    gammas : ndarray of shape (n_iter, n_bands)
        Rows sum to 1.
    """
    if not isinstance(n_iter, (int, np.integer)) or n_iter < 1:
        raise ConfigError(f"'n_iter' must be an int >= 1; {n_iter!r} was provided")
    rs = random_state if isinstance(random_state, np.random.RandomState) else np.random.RandomState(random_state)
    conc = np.atleast_1d(np.asarray(concentration, dtype=np.float64))
    per = int(np.ceil(n_iter / len(conc)))
    parts = []
    for c in conc:
        if np.isinf(c):
            parts.append(np.full((per, n_bands), 1.0 / n_bands))
        else:
            parts.append(rs.dirichlet([c] * n_bands, per))
    # interleave concentrations [c0, c1, c0, c1, ...] as himalaya does
    g = np.stack(parts, axis=1).reshape(len(conc) * per, n_bands)[:n_iter].copy()
    g[0] = 1.0 / n_bands
    return g


@register_estimator("banded_ridge")
class BandedRidgeEncoder(EstimatorMixin, RegressorMixin, BaseEstimator):
    """Banded ridge regression over several feature spaces, per-voxel band penalties by CV.

    Model per voxel: ``y ≈ Σ_k X_k b_k + c`` with penalty ``Σ_k (α / γ_k) ‖b_k‖²``. The band
    weighting ``γ`` (on the simplex) is searched over ``gammas`` (or ``n_iter`` Dirichlet samples)
    and ``α`` over ``alphas``; each (γ, α) is scored with the K-fold ridge solver of
    :class:`RidgeEncoder`. Equivalent to ``himalaya.ridge.BandedRidgeCV`` with the random-search
    solver (same candidates → same choices); the per-band penalties are exposed directly as
    ``band_alphas_`` (himalaya's ``deltas_ = log(γ/α)`` is also provided).

    Parameters
    ----------
    alphas : array-like of shape (n_alphas,) or None
        Global penalties; None means ``np.logspace(-2, 6, 9)``.
    gammas : array-like of shape (n_candidates, n_bands) or None
        Explicit band weightings to try (e.g. a grid of ratios); overrides ``n_iter``.
    n_iter : int
        Number of random band weightings when ``gammas`` is None.
    concentration : float or tuple of float
        Dirichlet concentrations cycled through for the random candidates.
    random_state : int or None
    band_sizes : sequence of int or None
        Needed only when ``X`` is one 2-D array: the number of columns of each band, in order.
        When ``X`` is a list of arrays (one per band) it must be None.
    cv, fit_intercept, backend, device, dtype, target_batch_size, verbose
        As :class:`RidgeEncoder`.
    scoring : {"r2", "neg_mse"}

    Attributes
    ----------
    coef_ : ndarray of shape (n_features_total, n_voxels)
        Weights on the unscaled, concatenated features.
    intercept_ : ndarray of shape (n_voxels,)
    best_gammas_ : ndarray of shape (n_bands, n_voxels)
    best_alphas_ : ndarray of shape (n_voxels,)
    band_alphas_ : ndarray of shape (n_bands, n_voxels)
        Effective penalty of each band, ``best_alphas_ / best_gammas_`` (inf: band switched off).
    deltas_ : ndarray of shape (n_bands, n_voxels)
        ``log(best_gammas_ / best_alphas_)`` (himalaya convention).
    gammas_ : ndarray of shape (n_candidates, n_bands)
        The candidates that were tried.
    cv_scores_ : ndarray of shape (n_candidates, n_voxels)
        Best-over-alphas mean validation score per candidate.
    band_sizes_ : tuple of int
    """

    _fitted_arrays = ("coef_", "intercept_", "best_gammas_", "best_alphas_", "band_alphas_", "deltas_", "gammas_",
                      "cv_scores_")
    _fitted_meta = ("band_sizes_", "n_features_in_")

    def _restore_fitted(self, arrays, meta):
        super()._restore_fitted(arrays, meta)
        self.band_sizes_ = tuple(int(b) for b in self.band_sizes_)

    def __init__(self, alphas=None, gammas=None, n_iter: int = 20, concentration=(0.1, 1.0), random_state=0,
                 band_sizes=None, cv=5, fit_intercept: bool = True, scoring: str = "r2", backend: str = "numpy",
                 device: str = "cpu", dtype: str = "float32", target_batch_size: int | None = None,
                 verbose: bool = False):
        self.alphas = alphas
        self.gammas = gammas
        self.n_iter = n_iter
        self.concentration = concentration
        self.random_state = random_state
        self.band_sizes = band_sizes
        self.cv = cv
        self.fit_intercept = fit_intercept
        self.scoring = scoring
        self.backend = backend
        self.device = device
        self.dtype = dtype
        self.target_batch_size = target_batch_size
        self.verbose = verbose

    def _split_bands(self, X, sizes=None):
        if isinstance(X, (list, tuple)):
            if self.band_sizes is not None:
                raise ConfigError("'band_sizes' must be None when X is a list of per-band arrays")
            if len(X) < 1:
                raise DataFormatError("'X' must hold at least one band")
            arrs = [check_xy(x)[0] for x in X]
            n = {a.shape[0] for a in arrs}
            if len(n) != 1:
                raise DataFormatError(f"all bands of 'X' must have the same number of samples; got {sorted(n)}")
            got = tuple(a.shape[1] for a in arrs)
            if sizes is not None and got != tuple(sizes):
                raise DataFormatError(f"'X' bands have {got} features but the encoder was fitted with {tuple(sizes)}")
            return arrs
        X = check_xy(X)[0]
        bs = sizes if sizes is not None else self.band_sizes
        if bs is None:
            raise ConfigError("'band_sizes' is required when X is a single 2-D array (or pass a list of per-band arrays)")
        bs = [int(b) for b in bs]
        if any(b < 1 for b in bs) or sum(bs) != X.shape[1]:
            raise DataFormatError(f"'band_sizes' {tuple(bs)} must be positive and sum to X.shape[1] = {X.shape[1]}")
        edges = np.cumsum([0] + bs)
        return [X[:, a:b] for a, b in zip(edges[:-1], edges[1:])]

    def _check_params(self, prefix: str = "") -> None:
        """Validate the data-independent parameters (``fit`` and ``from_config``)."""
        check_option(f"{prefix}scoring", self.scoring, list(SCORINGS))
        check_option(f"{prefix}dtype", self.dtype, ["float32", "float64"])
        check_option(f"{prefix}backend", self.backend, ["numpy", "torch"])

    def fit(self, X, Y):
        """Fit the banded ridge model.

        Parameters
        ----------
        X : list of arrays of shape (n_samples, n_features_k), or array of shape (n_samples, n_features_total)
            One array per band, or the concatenation with ``band_sizes``.
        Y : array-like of shape (n_samples, n_voxels)

        Returns
        -------
        self : BandedRidgeEncoder
        """
        self._check_params()
        Xs = self._split_bands(X)
        _, Y2, ravel = check_xy(Xs[0], Y)
        if ravel:
            raise DataFormatError("'Y' must be 2-D (n_samples, n_voxels) for BandedRidgeEncoder")
        if self.gammas is not None:
            gammas = np.asarray(self.gammas, dtype=np.float64)
        else:
            gammas = make_band_gammas(self.n_iter, len(Xs), self.concentration, self.random_state)
        alphas = DEFAULT_ALPHAS if self.alphas is None else self.alphas
        progress = None
        if self.verbose:
            from brainenc._utils.logging import progress
        res = solve_banded_ridge_cv(Xs, Y2, gammas, alphas, self.cv, fit_intercept=self.fit_intercept,
                                    scoring=self.scoring, backend=self.backend, device=self.device, dtype=self.dtype,
                                    target_batch_size=self.target_batch_size, progress=progress)
        self.coef_ = res["coef"]
        self.intercept_ = res["intercept"]
        self.best_gammas_ = res["best_gammas"]
        self.best_alphas_ = res["best_alphas"]
        self.band_alphas_ = res["band_alphas"]
        with np.errstate(divide="ignore"):
            self.deltas_ = np.log(self.best_gammas_ / self.best_alphas_[None, :])
        self.gammas_ = gammas
        self.cv_scores_ = res["cv_scores"]
        self.band_sizes_ = tuple(x.shape[1] for x in Xs)
        self.n_features_in_ = sum(self.band_sizes_)
        return self

    def predict(self, X):
        """Predict voxel responses.

        Parameters
        ----------
        X : list of arrays of shape (n_samples, n_features_k), or array of shape (n_samples, n_features_total)

        Returns
        -------
        Y_pred : ndarray of shape (n_samples, n_voxels)
        """
        self._check_fitted()
        Xs = self._split_bands(X, self.band_sizes_)
        Xc = np.concatenate([x.astype(self.dtype, copy=False) for x in Xs], axis=1)
        return Xc @ self.coef_ + self.intercept_

    def to_torch(self):
        """The fitted model as a frozen torch head on the concatenated bands (what :meth:`predict` applies).

        ``X @ coef_ + intercept_`` in float32 on the bands concatenated in order (``band_sizes_``;
        no standardisation: the weights refer to the unscaled features).

        Returns
        -------
        torch.nn.Module
            ``forward(X [n, n_features_total]) -> [n, n_voxels]``; attributes
            ``input_kind = "design"``, ``n_features``, ``n_outputs``, ``band_sizes``; buffers
            only, eval mode, on the CPU.

        Raises
        ------
        NotFittedError
            Before ``fit``.
        """
        self._check_fitted()
        head = linear_head(self.coef_, self.intercept_, estimator="banded_ridge",
                           info={"band_sizes": list(self.band_sizes_)})
        head.band_sizes = tuple(self.band_sizes_)
        return head

    def score(self, X, Y, sample_weight=None):
        """Per-voxel R² of the predictions.

        Parameters
        ----------
        X : list of arrays or array, as in :meth:`predict`
        Y : array-like of shape (n_samples, n_voxels)
        sample_weight : None
            Not supported.

        Returns
        -------
        r2 : ndarray of shape (n_voxels,)
            One value per voxel (not the mean, unlike scikit-learn regressors).
        """
        from brainenc.metrics import r2_score

        if sample_weight is not None:
            raise ConfigError("'sample_weight' is not supported by BandedRidgeEncoder.score")
        pred = self.predict(X)
        Y = np.asarray(Y)
        if Y.shape != pred.shape:
            raise DataFormatError(f"'Y' must have shape {pred.shape}; got {Y.shape}")
        return np.atleast_1d(r2_score(Y, pred))
