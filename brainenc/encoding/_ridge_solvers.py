"""Ridge regression algorithms as plain functions (himalaya style), numpy or torch.

The estimators in :mod:`brainenc.encoding.ridge` and :mod:`brainenc.encoding.banded` are thin
shells over :func:`solve_ridge`, :func:`solve_ridge_cv`, :func:`solve_ridge_gcv` and
:func:`solve_banded_ridge_cv`.

Algorithm of the K-fold solver (why it is fast)
-----------------------------------------------
For each fold, with ``Xtr`` (n_tr x p) and ``n_tr > p``, the Gram matrix ``Xtrᵀ Xtr`` is obtained
as ``Xᵀ X - Xvaᵀ Xva`` (float64, p x p) and eigendecomposed, ``Xtrᵀ Xtr = V diag(s²) Vᵀ``.
``Xtrᵀ Ytr`` is likewise ``Xᵀ Y - Xvaᵀ Yva``, so the only n x p x v product over all samples
(``Xᵀ Y``) is computed once per target batch and shared by all folds and the refit. With
``B = Vᵀ Xtrᵀ Ytr`` (p x v, once per fold) the validation prediction for ridge penalty ``α`` is
``A · diag(1/(s²+α)) · B`` with ``A = Xva V``; per alpha only a p x v scaling and one matmul remain,
and never an ``[n_alphas, n_val, v]`` tensor. When ``p < n_val`` even that matmul is replaced by the
quadratic form ``‖Yva‖² - 2⟨AᵀYva, D⟩ + ⟨D, (AᵀA) D⟩`` with ``D = diag(1/(s²+α)) B``, which costs
p² per voxel instead of n_val·p. When ``n_tr <= p`` the fold is solved in the dual (eigh of the
n_tr x n_tr kernel), with the same prediction form. Decompositions are computed in float64 (they are
small) and cast to the working dtype; the target-sized products run in the working dtype (float32
BLAS by default). Targets are processed in batches, so peak memory is
``O(n·batch + p·batch + p²·n_folds)`` beyond the inputs. The refit on all samples uses each voxel's
own alpha through a per-voxel weight matrix ``W[r, j] = 1/(s_r² + α_j)``: one matmul, no grouping.

Intercepts: X and Y are centred on the whole data once (this does not change any fit but keeps
float32 sums well conditioned), and every fold is centred on its *training* rows by exact rank-one
corrections of the shared products.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from brainenc._utils.validation import check_option
from brainenc.exceptions import ConfigError

__all__ = [
    "get_backend",
    "check_cv_splits",
    "solve_ridge",
    "solve_ridge_cv",
    "solve_ridge_gcv",
    "solve_banded_ridge_cv",
    "default_target_batch_size",
]

SCORINGS = ("r2", "neg_mse")


# --------------------------------------------------------------------------------------------
# backend shim: numpy arrays and torch tensors share operators (@, *, .sum(0), .T, indexing);
# only creation, decomposition and conversion differ.


class _NumpyOps:
    name = "numpy"

    def __init__(self, device: str = "cpu"):
        if str(device) != "cpu":
            raise ConfigError(f"'device' must be 'cpu' with backend='numpy'; {device!r} was provided")
        self.device = "cpu"

    def dtype(self, name: str):
        return np.dtype(name)

    def asarray(self, x, dtype: str):
        return np.asarray(x, dtype=np.dtype(dtype))

    def index(self, idx):
        return np.asarray(idx, dtype=np.int64)

    def to_numpy(self, x) -> np.ndarray:
        return np.asarray(x)

    def eigh(self, a):
        with _eigh_threads(a.shape[0], self):
            return np.linalg.eigh(a)

    def clip_min(self, x, lo: float):
        return np.maximum(x, lo)

    def log(self, x):
        return np.log(x)


class _TorchOps:
    name = "torch"

    def __init__(self, device: str = "cpu"):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"'device' is {device!r} but torch sees no CUDA device")

    def dtype(self, name: str):
        return {"float32": self.torch.float32, "float64": self.torch.float64}[name]

    def asarray(self, x, dtype: str):
        t = self.torch
        if isinstance(x, t.Tensor):
            return x.to(device=self.device, dtype=self.dtype(dtype))
        x = np.asarray(x)
        if not x.flags.writeable:  # memmaps / read-only views: torch warns on those
            x = np.array(x)
        return t.as_tensor(x, device=self.device).to(self.dtype(dtype))

    def index(self, idx):
        return self.torch.as_tensor(np.asarray(idx, dtype=np.int64), device=self.device)

    def to_numpy(self, x) -> np.ndarray:
        return x.detach().cpu().numpy()

    def eigh(self, a):
        with _eigh_threads(a.shape[0], self):
            return self.torch.linalg.eigh(a)

    def clip_min(self, x, lo: float):
        return self.torch.clamp(x, min=lo)

    def log(self, x):
        return self.torch.log(x)


#: Below this size, CPU eigendecompositions run single-threaded: LAPACK's tridiagonal reduction
#: (BLAS-2, a barrier per column) gains little from 2-4 threads at p ~ 1000 and slows down by
#: 5-8x when the cores are oversubscribed (measured: 1024 x 1024 float64, 0.5 s on 1 thread vs
#: 3.8 CPU-s / 16 s wall on 2 threads on a loaded 2-core machine).
EIGH_SINGLE_THREAD_MAX = 2048


class _eigh_threads:
    def __init__(self, size: int, ops):
        self.active = size <= EIGH_SINGLE_THREAD_MAX and str(getattr(ops, "device", "cpu")) == "cpu"
        self.ops = ops

    def __enter__(self):
        if not self.active:
            return self
        from threadpoolctl import threadpool_limits

        if self.ops.name == "torch":
            # read before threadpool_limits: it also caps the OpenMP runtime torch reports
            self._torch_threads = self.ops.torch.get_num_threads()
        self._limits = threadpool_limits(1)
        if self.ops.name == "torch":
            self.ops.torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self.active:
            self._limits.restore_original_limits()
            if self.ops.name == "torch":
                self.ops.torch.set_num_threads(self._torch_threads)
        return False


def get_backend(backend: str = "numpy", device: str = "cpu"):
    """Return the array-operations shim for ``backend`` ("numpy" or "torch") on ``device``."""
    check_option("backend", backend, ["numpy", "torch"])
    return _NumpyOps(device) if backend == "numpy" else _TorchOps(device)


# --------------------------------------------------------------------------------------------
# helpers


def check_cv_splits(cv: Any, n_samples: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Turn ``cv`` into a list of (train, validation) index arrays.

    Parameters
    ----------
    cv : int, scikit-learn splitter, or iterable of (train, test) index pairs
        An int ``k`` means ``KFold(k)`` without shuffling (contiguous folds: fMRI samples are
        temporally correlated, shuffling leaks).
    n_samples : int

    Returns
    -------
    splits : list of (int64 array, int64 array)
    """
    if isinstance(cv, (bool, np.bool_)):
        raise ConfigError(f"'cv' must be an int >= 2, a splitter or a list of (train, test) pairs; {cv!r} was provided")
    if isinstance(cv, (int, np.integer)):
        if cv < 2 or cv > n_samples:
            raise ConfigError(f"'cv' must be an int in [2, n_samples={n_samples}]; {cv!r} was provided")
        from sklearn.model_selection import KFold

        pairs = KFold(int(cv)).split(np.zeros((n_samples, 1)))
    elif hasattr(cv, "split"):
        pairs = cv.split(np.zeros((n_samples, 1)))
    elif isinstance(cv, Iterable):
        pairs = cv
    else:
        raise ConfigError(f"'cv' must be an int >= 2, a splitter or a list of (train, test) pairs; {cv!r} was provided")
    out = []
    for k, pair in enumerate(pairs):
        try:
            train, test = pair
        except (TypeError, ValueError):
            raise ConfigError(f"'cv' entry {k} is not a (train, test) pair") from None
        train = np.asarray(train)
        test = np.asarray(test)
        if train.dtype == bool:
            train = np.flatnonzero(train)
        if test.dtype == bool:
            test = np.flatnonzero(test)
        train = train.astype(np.int64)
        test = test.astype(np.int64)
        if train.size < 2 or test.size < 1:
            raise ConfigError(f"'cv' split {k} has {train.size} train / {test.size} validation samples (need >= 2 / >= 1)")
        if train.min() < 0 or test.min() < 0 or train.max() >= n_samples or test.max() >= n_samples:
            raise ConfigError(f"'cv' split {k} has indices outside [0, {n_samples})")
        out.append((train, test))
    if not out:
        raise ConfigError("'cv' produced no splits")
    return out


def default_target_batch_size(n_samples: int, n_features: int, itemsize: int = 4, budget_bytes: int = 1 << 28) -> int:
    """Targets per batch so that the per-batch working set stays near ``budget_bytes`` (256 MiB).

    The working set per target is about ``n_samples`` (the batch of Y) plus 8 vectors of length
    ``n_features`` (shared products, rotated products, scaled copies) in the working dtype.
    """
    per_target = itemsize * (n_samples + 8 * max(n_features, 1))
    return int(max(256, budget_bytes // per_target))


def _batches(n_targets: int, batch: int | None):
    batch = n_targets if batch is None else max(1, int(batch))
    for start in range(0, n_targets, batch):
        yield slice(start, min(start + batch, n_targets))


def _check_alphas(alphas) -> np.ndarray:
    a = np.atleast_1d(np.asarray(alphas, dtype=np.float64))
    if a.ndim != 1 or a.size == 0:
        raise ConfigError(f"'alphas' must be a non-empty 1-D sequence of positive numbers; got shape {a.shape}")
    if not np.all(np.isfinite(a)) or np.any(a <= 0):
        raise ConfigError(f"'alphas' must all be finite and > 0; got min {a.min()!r}")
    return a


def _select(scores: np.ndarray, alphas: np.ndarray, alpha_per_target: bool) -> np.ndarray:
    """Index of the best alpha per target; ties go to the larger alpha (as himalaya)."""
    s = scores + (np.log(alphas) * 1e-10)[:, None]
    s = np.where(np.isnan(s), -np.inf, s)
    if alpha_per_target:
        return np.argmax(s, axis=0)
    return np.full(scores.shape[1], int(np.argmax(s.mean(1))), dtype=np.int64)


@dataclass
class _Prepared:
    """X centred (working dtype and float64) plus its column means, on the backend."""

    Xc: Any  # (n, p) working dtype
    X64: Any  # (n, p) float64
    x_mean: np.ndarray  # (p,) float64
    n: int
    p: int


def _prepare_X(ops, X, fit_intercept: bool, dtype: str) -> _Prepared:
    X = np.asarray(X)
    x_mean = X.mean(0, dtype=np.float64) if fit_intercept else np.zeros(X.shape[1])
    X64 = ops.asarray(X, "float64")
    if fit_intercept:
        X64 = X64 - ops.asarray(x_mean, "float64")
    return _Prepared(Xc=X64.to(ops.dtype(dtype)) if ops.name == "torch" else X64.astype(dtype), X64=X64,
                     x_mean=x_mean, n=X.shape[0], p=X.shape[1])


def _y_batch(ops, Y: np.ndarray, sl: slice, fit_intercept: bool, dtype: str):
    """Batch of targets on the backend, centred on the whole data; returns (Yb, y_mean float64)."""
    Ynp = np.asarray(Y[:, sl])
    y_mean = Ynp.mean(0, dtype=np.float64) if fit_intercept else np.zeros(Ynp.shape[1])
    Yb = ops.asarray(Ynp, dtype)
    if fit_intercept:
        Yb = Yb - ops.asarray(y_mean, dtype)
    return Yb, y_mean


# --------------------------------------------------------------------------------------------
# per-fold bases


@dataclass
class _Fold:
    kind: str  # "primal" or "dual"
    train: Any
    val: Any
    n_tr: int
    n_va: int
    s2: Any  # (r,) working dtype
    V: Any = None  # primal: (p, r)
    U: Any = None  # dual: (n_tr, r)
    A: Any = None  # (n_va, r) validation rows in the eigenbasis (predict route)
    G: Any = None  # (r, r) AᵀA (quadratic route)
    Xva: Any = None  # (n_va, p) working dtype (primal)
    mx: Any = None  # (p,) training-row mean of centred X (primal, intercept)
    sva: Any = None  # (p,) validation-row sum of centred X (primal, intercept)
    quad: bool = False


def _prepare_folds(ops, P: _Prepared, splits, fit_intercept: bool, dtype: str, score_method: str) -> list[_Fold]:
    check_option("score_method", score_method, ["auto", "quadratic", "predict"])
    cast = (lambda a: a.to(ops.dtype(dtype))) if ops.name == "torch" else (lambda a: a.astype(dtype))
    K = None
    folds = []
    for train_np, val_np in splits:
        train, val = ops.index(train_np), ops.index(val_np)
        n_tr, n_va = len(train_np), len(val_np)
        Xva64 = P.X64[val]
        if n_tr > P.p:
            if K is None:
                K = P.X64.T @ P.X64
            Gva = Xva64.T @ Xva64
            Gtr = K - Gva
            sva = Xva64.sum(0)
            mx = None
            if fit_intercept:
                mx = (P.X64.sum(0) - sva) / n_tr
                Gtr = Gtr - n_tr * (mx[:, None] * mx[None, :])
                # (Xva - mx)ᵀ(Xva - mx) from the uncentred product: no second n_val x p x p matmul
                Gva = Gva - sva[:, None] * mx[None, :] - mx[:, None] * sva[None, :] + n_va * (mx[:, None] * mx[None, :])
            s2, V = ops.eigh(Gtr)
            s2 = ops.clip_min(s2, 0.0)
            quad = score_method == "quadratic" or (score_method == "auto" and P.p < n_va)
            f = _Fold("primal", train, val, n_tr, n_va, cast(s2), V=cast(V), Xva=cast(Xva64), quad=quad,
                      mx=cast(mx) if mx is not None else None, sva=cast(sva) if fit_intercept else None)
            if quad:
                f.G = cast(V.T @ (Gva @ V))
            else:
                f.A = cast(((Xva64 - mx) if fit_intercept else Xva64) @ V)
        else:
            Xtr64 = P.X64[train]
            if fit_intercept:
                mx = Xtr64.mean(0)
                Xtr64 = Xtr64 - mx
                Xva64 = Xva64 - mx
            s2, U = ops.eigh(Xtr64 @ Xtr64.T)
            s2 = ops.clip_min(s2, 0.0)
            f = _Fold("dual", train, val, n_tr, n_va, cast(s2), U=cast(U), A=cast((Xva64 @ Xtr64.T) @ U))
        folds.append(f)
    return folds


def _fold_scores(ops, f: _Fold, Yb, XtY, sY, alphas: np.ndarray, fit_intercept: bool, scoring: str, dtype: str) -> np.ndarray:
    """Validation scores of one fold for all alphas, shape (n_alphas, n_targets_batch), float64."""
    Yva = Yb[f.val]
    sYva = Yva.sum(0)
    my = (sY - sYva) / f.n_tr if fit_intercept else None
    yva_c = Yva - Yva.mean(0)
    sstot = ops.to_numpy((yva_c * yva_c).sum(0)).astype(np.float64)
    del yva_c
    if f.kind == "primal":
        XvaY = f.Xva.T @ Yva
        T = XtY - XvaY
        if fit_intercept:
            T = T - f.n_tr * (f.mx[:, None] * my[None, :])
        B = f.V.T @ T
        del T
        if f.quad:
            Cm = XvaY
            if fit_intercept:
                Cm = Cm - f.sva[:, None] * my[None, :] - f.mx[:, None] * sYva[None, :] + f.n_va * (f.mx[:, None] * my[None, :])
            CB = (f.V.T @ Cm) * B
            del Cm, XvaY
            yy = (Yva * Yva).sum(0)
            if fit_intercept:
                yy = yy - 2 * my * sYva + f.n_va * my * my
        else:
            del XvaY
            Yvac = Yva - my if fit_intercept else Yva
    else:
        Ytr = Yb[f.train]
        if fit_intercept:
            Ytr = Ytr - my
            Yvac = Yva - my
        else:
            Yvac = Yva
        B = f.U.T @ Ytr
        del Ytr
    out = np.empty((len(alphas), Yb.shape[1]))
    for i, alpha in enumerate(alphas):
        w = 1.0 / (f.s2 + float(alpha))
        D = B * w[:, None]
        if f.quad:
            ssr = yy - 2 * (w @ CB) + (D * (f.G @ D)).sum(0)
        else:
            R = Yvac - f.A @ D
            ssr = (R * R).sum(0)
        ssr = ops.to_numpy(ssr).astype(np.float64)
        if scoring == "r2":
            with np.errstate(invalid="ignore", divide="ignore"):
                out[i] = np.where(sstot > 0, 1.0 - ssr / np.where(sstot > 0, sstot, 1.0), 0.0)
        else:
            out[i] = -ssr / f.n_va
    return out


# --------------------------------------------------------------------------------------------
# refit on all samples with per-target alphas


@dataclass
class _FullBasis:
    kind: str
    s2: Any
    V: Any = None  # primal (p, p)
    U: Any = None  # dual (n, n)


def _full_basis(ops, P: _Prepared, dtype: str) -> _FullBasis:
    cast = (lambda a: a.to(ops.dtype(dtype))) if ops.name == "torch" else (lambda a: a.astype(dtype))
    if P.n > P.p:
        s2, V = ops.eigh(P.X64.T @ P.X64)
        return _FullBasis("primal", cast(ops.clip_min(s2, 0.0)), V=cast(V))
    s2, U = ops.eigh(P.X64 @ P.X64.T)
    return _FullBasis("dual", cast(ops.clip_min(s2, 0.0)), U=cast(U))


def _refit_batch(ops, fb: _FullBasis, P: _Prepared, Yb, XtY, alpha_b: np.ndarray, dtype: str):
    """Coefficients (p, nb) on the backend for per-target alphas ``alpha_b`` (nb,)."""
    a = ops.asarray(alpha_b, dtype)
    W = 1.0 / (fb.s2[:, None] + a[None, :])
    if fb.kind == "primal":
        if XtY is None:
            XtY = P.Xc.T @ Yb
        return fb.V @ ((fb.V.T @ XtY) * W)
    return P.Xc.T @ (fb.U @ ((fb.U.T @ Yb) * W))


def _intercept(P: _Prepared, y_mean: np.ndarray, coef: np.ndarray, fit_intercept: bool) -> np.ndarray:
    if not fit_intercept:
        return np.zeros(coef.shape[1], dtype=coef.dtype)
    return (y_mean - P.x_mean @ coef.astype(np.float64)).astype(coef.dtype)


def _refit_into(coef: np.ndarray, intercept: np.ndarray, sl: slice, ops, fb: _FullBasis, P: _Prepared, Yb,
                XtY, alpha_b: np.ndarray, y_mean: np.ndarray, fit_intercept: bool, dtype: str) -> None:
    """Refit target batch ``sl`` with alphas ``alpha_b`` and store its coefficients and intercepts."""
    c = ops.to_numpy(_refit_batch(ops, fb, P, Yb, XtY, alpha_b, dtype))
    coef[:, sl] = c
    intercept[sl] = _intercept(P, y_mean, c, fit_intercept)


# --------------------------------------------------------------------------------------------
# public solvers


def solve_ridge(X, Y, alpha=1.0, *, fit_intercept: bool = True, backend: str = "numpy", device: str = "cpu",
                dtype: str = "float32", target_batch_size: int | None = None):
    """Ridge regression with a fixed penalty (one value, or one per target).

    Minimises ``‖Y - X b - c‖² + α ‖b‖²`` per target (``c`` only with ``fit_intercept``), as
    ``sklearn.linear_model.Ridge``.

    Parameters
    ----------
    X : array of shape (n_samples, n_features)
    Y : array of shape (n_samples, n_targets)
    alpha : float or array of shape (n_targets,)
    fit_intercept : bool
    backend, device, dtype, target_batch_size
        See :class:`brainenc.encoding.RidgeEncoder`.

    Returns
    -------
    coef : array of shape (n_features, n_targets)
    intercept : array of shape (n_targets,)
    """
    ops = get_backend(backend, device)
    check_option("dtype", dtype, ["float32", "float64"])
    n_targets = Y.shape[1]
    alpha = np.broadcast_to(np.asarray(alpha, dtype=np.float64), (n_targets,))
    if np.any(~np.isfinite(alpha)) or np.any(alpha < 0):
        raise ConfigError("'alpha' must be finite and >= 0")
    P = _prepare_X(ops, X, fit_intercept, dtype)
    fb = _full_basis(ops, P, dtype)
    coef = np.empty((P.p, n_targets), dtype=dtype)
    intercept = np.empty(n_targets, dtype=dtype)
    batch = target_batch_size or default_target_batch_size(P.n, P.p, np.dtype(dtype).itemsize)
    for sl in _batches(n_targets, batch):
        Yb, y_mean = _y_batch(ops, Y, sl, fit_intercept, dtype)
        _refit_into(coef, intercept, sl, ops, fb, P, Yb, None, alpha[sl], y_mean, fit_intercept, dtype)
    return coef, intercept


def solve_ridge_cv(X, Y, alphas, cv=5, *, fit_intercept: bool = True, scoring: str = "r2",
                   alpha_per_target: bool = True, backend: str = "numpy", device: str = "cpu",
                   dtype: str = "float32", target_batch_size: int | None = None,
                   score_method: str = "auto", return_weights: bool = True, progress=None):
    """Ridge with the penalty chosen per target by K-fold cross-validation.

    Parameters
    ----------
    X : array of shape (n_samples, n_features)
    Y : array of shape (n_samples, n_targets)
        May be a memmap: only ``target_batch_size`` columns are materialised at a time.
    alphas : array of shape (n_alphas,)
    cv : int, splitter or list of (train, test) index pairs
        See ``check_cv_splits``.
    fit_intercept : bool
        Centre X and Y on each fold's training rows (and on all rows for the refit).
    scoring : {"r2", "neg_mse"}
        Per-fold validation score, averaged over folds (``"neg_mse"`` = himalaya's default
        ``l2_neg_loss``).
    alpha_per_target : bool
        If False, one alpha (best mean score over targets) for all targets.
    backend, device, dtype, target_batch_size
        See :class:`brainenc.encoding.RidgeEncoder`.
    score_method : {"auto", "quadratic", "predict"}
        How validation errors are computed in primal folds (module docstring); "auto" picks the
        cheaper one. Both give the same numbers up to rounding.
    return_weights : bool
        Refit on all samples with each target's best alpha.
    progress : callable or None
        ``progress(iterable, desc=..., total=...)`` wrapper over target batches.

    Returns
    -------
    result : dict
        ``coef`` (n_features, n_targets) or None, ``intercept`` (n_targets,) or None,
        ``best_alphas`` (n_targets,), ``cv_scores`` (n_alphas, n_targets) float64.
    """
    check_option("scoring", scoring, SCORINGS)
    check_option("dtype", dtype, ["float32", "float64"])
    alphas = _check_alphas(alphas)
    ops = get_backend(backend, device)
    X = np.asarray(X)
    n, n_targets = Y.shape
    splits = check_cv_splits(cv, n)
    P = _prepare_X(ops, X, fit_intercept, dtype)
    folds = _prepare_folds(ops, P, splits, fit_intercept, dtype, score_method)
    fb = _full_basis(ops, P, dtype) if return_weights else None
    cv_scores = np.zeros((len(alphas), n_targets))
    coef = np.empty((P.p, n_targets), dtype=dtype) if return_weights else None
    intercept = np.empty(n_targets, dtype=dtype) if return_weights else None
    refit_now = return_weights and alpha_per_target
    batch = target_batch_size or default_target_batch_size(n, P.p, np.dtype(dtype).itemsize)
    batches = list(_batches(n_targets, batch))
    it = progress(batches, desc="ridge cv", total=len(batches)) if progress else batches
    need_xty = any(f.kind == "primal" for f in folds) or (fb is not None and fb.kind == "primal")
    for sl in it:
        Yb, y_mean = _y_batch(ops, Y, sl, fit_intercept, dtype)
        XtY = P.Xc.T @ Yb if need_xty else None
        sY = Yb.sum(0)
        acc = np.zeros((len(alphas), sl.stop - sl.start))
        for f in folds:
            acc += _fold_scores(ops, f, Yb, XtY, sY, alphas, fit_intercept, scoring, dtype)
        cv_scores[:, sl] = acc / len(folds)
        if refit_now:
            best = alphas[_select(cv_scores[:, sl], alphas, True)]
            _refit_into(coef, intercept, sl, ops, fb, P, Yb, XtY if fb.kind == "primal" else None, best,
                        y_mean, fit_intercept, dtype)
        del Yb, XtY
    best_alphas = alphas[_select(cv_scores, alphas, alpha_per_target)]
    if return_weights and not refit_now:
        for sl in _batches(n_targets, batch):
            Yb, y_mean = _y_batch(ops, Y, sl, fit_intercept, dtype)
            _refit_into(coef, intercept, sl, ops, fb, P, Yb, None, best_alphas[sl], y_mean, fit_intercept, dtype)
    return {"coef": coef, "intercept": intercept, "best_alphas": best_alphas, "cv_scores": cv_scores}


def solve_ridge_gcv(X, Y, alphas, *, fit_intercept: bool = True, scoring: str = "neg_mse",
                    alpha_per_target: bool = True, backend: str = "numpy", device: str = "cpu",
                    dtype: str = "float32", target_batch_size: int | None = None,
                    return_weights: bool = True, progress=None):
    """Ridge with the penalty chosen per target by efficient leave-one-out (GCV) errors.

    Exact LOO residuals ``e_i / (1 - H_ii)`` from one eigendecomposition of ``XᵀX`` (or of ``XXᵀ``
    when ``n_samples <= n_features``), as ``sklearn.linear_model.RidgeCV(cv=None)``; the
    intercept is unpenalised (``H`` gains ``1/n``). Per alpha the cost is one
    (n x r)(r x batch) matmul.

    Parameters
    ----------
    X : array of shape (n_samples, n_features)
    Y : array of shape (n_samples, n_targets)
    alphas : array of shape (n_alphas,)
    scoring : {"neg_mse", "r2"}
        ``-mean(loo²)`` or ``1 - sum(loo²) / SS_tot``; both pick the same alpha per target.
    Other parameters as :func:`solve_ridge_cv`.

    Returns
    -------
    result : dict
        As :func:`solve_ridge_cv`; ``cv_scores`` (n_alphas, n_targets) are LOO scores.
    """
    check_option("scoring", scoring, SCORINGS)
    check_option("dtype", dtype, ["float32", "float64"])
    alphas = _check_alphas(alphas)
    ops = get_backend(backend, device)
    n, n_targets = Y.shape
    P = _prepare_X(ops, X, fit_intercept, dtype)
    fb = _full_basis(ops, P, dtype)
    cast = (lambda a: a.to(ops.dtype(dtype))) if ops.name == "torch" else (lambda a: a.astype(dtype))
    s2_np = ops.to_numpy(fb.s2).astype(np.float64)
    keep_np = np.flatnonzero(s2_np > s2_np.max() * max(P.n, P.p) * np.finfo(np.float64).eps)
    keep = ops.index(keep_np)
    s2k = fb.s2[keep]
    if fb.kind == "primal":
        # U = Xc V / s for the non-null directions; Uᵀ Y = (V / s)ᵀ XᵀY is cheaper than Uᵀ Y.
        Vs = fb.V[:, keep] / (s2k ** 0.5)[None, :]
        U = P.Xc @ Vs
    else:
        U = fb.U[:, keep]
        Vs = None
    U2 = U * U
    h_all = [s2k / (s2k + float(a)) for a in alphas]
    denom = []
    for h in h_all:
        hd = U2 @ h
        if fit_intercept:
            hd = hd + 1.0 / n
        denom.append(1.0 - hd)
    cv_scores = np.zeros((len(alphas), n_targets))
    coef = np.empty((P.p, n_targets), dtype=dtype) if return_weights else None
    intercept = np.empty(n_targets, dtype=dtype) if return_weights else None
    batch = target_batch_size or default_target_batch_size(n, P.p, np.dtype(dtype).itemsize)
    batches = list(_batches(n_targets, batch))
    it = progress(batches, desc="ridge gcv", total=len(batches)) if progress else batches
    for sl in it:
        Yb, y_mean = _y_batch(ops, Y, sl, fit_intercept, dtype)
        XtY = P.Xc.T @ Yb if fb.kind == "primal" else None
        Z = Vs.T @ XtY if Vs is not None else U.T @ Yb
        if scoring == "r2":
            yc = Yb - Yb.mean(0)
            sstot = ops.to_numpy((yc * yc).sum(0)).astype(np.float64)
            del yc
        for i, h in enumerate(h_all):
            E = (Yb - U @ (Z * h[:, None])) / denom[i][:, None]
            sse = ops.to_numpy((E * E).sum(0)).astype(np.float64)
            if scoring == "r2":
                with np.errstate(invalid="ignore", divide="ignore"):
                    cv_scores[i, sl] = np.where(sstot > 0, 1.0 - sse / np.where(sstot > 0, sstot, 1.0), 0.0)
            else:
                cv_scores[i, sl] = -sse / n
            del E
        if return_weights and alpha_per_target:
            best = alphas[_select(cv_scores[:, sl], alphas, True)]
            _refit_into(coef, intercept, sl, ops, fb, P, Yb, XtY, best, y_mean, fit_intercept, dtype)
    best_alphas = alphas[_select(cv_scores, alphas, alpha_per_target)]
    if return_weights and not alpha_per_target:
        for sl in _batches(n_targets, batch):
            Yb, y_mean = _y_batch(ops, Y, sl, fit_intercept, dtype)
            _refit_into(coef, intercept, sl, ops, fb, P, Yb, None, best_alphas[sl], y_mean, fit_intercept, dtype)
    del cast
    return {"coef": coef, "intercept": intercept, "best_alphas": best_alphas, "cv_scores": cv_scores}


def solve_banded_ridge_cv(Xs: Sequence, Y, gammas, alphas, cv=5, *, fit_intercept: bool = True,
                          scoring: str = "neg_mse", backend: str = "numpy", device: str = "cpu",
                          dtype: str = "float32", target_batch_size: int | None = None,
                          score_method: str = "auto", progress=None):
    """Banded (group) ridge: one penalty per feature space, chosen per target by K-fold CV.

    Solves ``min_b ‖Y - Σ_k X_k b_k‖² + Σ_k (α / γ_k) ‖b_k‖²`` by scaling band ``k`` by
    ``sqrt(γ_k)`` and running the K-fold ridge solver over ``alphas`` for each candidate band
    weighting ``γ`` (rows of ``gammas``, on the simplex). Per target, the (γ, α) pair with the best
    mean validation score wins; a later γ replaces the current best only if it improves the score by
    more than the dtype's machine epsilon (himalaya's ``solve_group_ridge_random_search`` rule,
    so the same ``gammas`` give the same choices).

    Parameters
    ----------
    Xs : sequence of arrays of shape (n_samples, n_features_k)
        One array per band (feature space).
    Y : array of shape (n_samples, n_targets)
    gammas : array of shape (n_candidates, n_bands)
        Band weightings to try.
    alphas : array of shape (n_alphas,)
    scoring : {"neg_mse", "r2"}
    Other parameters as :func:`solve_ridge_cv`.

    Returns
    -------
    result : dict
        ``coef`` (sum n_features_k, n_targets) on the *unscaled* features, ``intercept``
        (n_targets,), ``best_gammas`` (n_bands, n_targets), ``best_alphas`` (n_targets,),
        ``band_alphas`` (n_bands, n_targets) = best_alpha / best_gamma (inf where γ = 0),
        ``cv_scores`` (n_candidates, n_targets) best-over-alphas score per candidate.
    """
    check_option("scoring", scoring, SCORINGS)
    alphas = _check_alphas(alphas)
    gammas = np.asarray(gammas, dtype=np.float64)
    n_bands = len(Xs)
    if gammas.ndim != 2 or gammas.shape[1] != n_bands or np.any(gammas < 0) or np.any(gammas.sum(1) <= 0):
        raise ConfigError(f"'gammas' must be a non-negative array of shape (n_candidates, {n_bands}); got shape {gammas.shape}")
    X = np.concatenate([np.asarray(x) for x in Xs], axis=1)
    sizes = [np.asarray(x).shape[1] for x in Xs]
    band_of = np.repeat(np.arange(n_bands), sizes)
    n, n_targets = Y.shape
    splits = check_cv_splits(cv, n)
    eps = np.finfo(np.dtype(dtype)).eps
    best = np.full(n_targets, -np.inf)
    best_g = np.zeros(n_targets, dtype=np.int64)
    best_a = np.ones(n_targets)
    cv_scores = np.zeros((len(gammas), n_targets))
    it = progress(range(len(gammas)), desc="banded ridge", total=len(gammas)) if progress else range(len(gammas))
    for g in it:
        scale = np.sqrt(gammas[g])[band_of]
        res = solve_ridge_cv(X * scale, Y, alphas, splits, fit_intercept=fit_intercept, scoring=scoring,
                             backend=backend, device=device, dtype=dtype, target_batch_size=target_batch_size,
                             score_method=score_method, return_weights=False)
        idx = _select(res["cv_scores"], alphas, True)
        sc = res["cv_scores"][idx, np.arange(n_targets)]
        cv_scores[g] = sc
        mask = sc > best + eps
        best[mask] = sc[mask]
        best_g[mask] = g
        best_a[mask] = alphas[idx[mask]]
    coef = np.empty((X.shape[1], n_targets), dtype=dtype)
    intercept = np.empty(n_targets, dtype=dtype)
    for g in np.unique(best_g):
        cols = np.flatnonzero(best_g == g)
        scale = np.sqrt(gammas[g])[band_of]
        c, b = solve_ridge(X * scale, Y[:, cols], best_a[cols], fit_intercept=fit_intercept, backend=backend,
                           device=device, dtype=dtype, target_batch_size=target_batch_size)
        coef[:, cols] = c * scale[:, None].astype(dtype)
        intercept[cols] = b
    best_gammas = gammas[best_g].T
    with np.errstate(divide="ignore"):
        band_alphas = best_a[None, :] / best_gammas
    return {"coef": coef, "intercept": intercept, "best_gammas": best_gammas, "best_alphas": best_a,
            "band_alphas": band_alphas, "cv_scores": cv_scores}
