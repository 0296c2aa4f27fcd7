"""Subject-level evaluation: folds, leakage-free cross-validation, and ground-truth edge recovery.

* :func:`make_folds` — stratified / k-fold / leave-site-out (GroupKFold, LeaveOneGroupOut) /
  official hold-out folds over subjects, validated (disjoint, covering, sorted int64 indices).
* :func:`cross_validate` — clone-and-fit per fold on the training rows only, out-of-fold
  predictions and scores, per-fold :func:`~brainenc.metrics.classification.classification_scores`.
  Works for any object with ``fit`` / ``predict`` (sklearn pipelines, brainenc's torch
  estimators) and for ``X`` given as a list of subject time series.
* :func:`edge_recovery` / :func:`graph_similarity` — on simulated cohorts with a planted group
  difference: which edges a mass-univariate test detects, against the truth.

No torch here.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from typing import Any

import numpy as np

from brainenc._utils.validation import check_option
from brainenc.exceptions import ConfigError, DataFormatError
from brainenc.metrics.classification import classification_scores, regression_scores

__all__ = ["make_folds", "cross_validate", "CVResult", "edge_recovery", "graph_similarity", "FOLD_SCHEMES"]

FOLD_SCHEMES = ("stratified", "kfold", "group", "leave-one-group-out", "holdout")


# ------------------------------------------------------------------------------------ folds


def _n_from(*arrays) -> int | None:
    for a in arrays:
        if a is not None:
            return len(a)
    return None


def make_folds(labels=None, *, scheme: str = "stratified", n_splits: int = 5, groups=None, split=None,
               seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Subject-level train/test folds.

    Parameters
    ----------
    labels : array-like [n_subjects], optional
        Class per subject (required for "stratified").
    scheme : {"stratified", "kfold", "group", "leave-one-group-out", "holdout"}
        "stratified": :class:`~sklearn.model_selection.StratifiedKFold` (shuffled with ``seed``);
        "kfold": shuffled :class:`~sklearn.model_selection.KFold`; "group": GroupKFold over
        ``groups`` (e.g. sites: every site is in exactly one test fold, i.e. leave-site(s)-out);
        "leave-one-group-out": one fold per group; "holdout": the official split, train rows
        where ``split == "train"`` and test rows where ``split == "test"`` (other values, e.g.
        "val", are in neither).
    n_splits : int, default 5
    groups : array-like [n_subjects], optional
        Group (site) per subject, for the group schemes.
    split : array-like of str [n_subjects], optional
        For "holdout".
    seed : int, default 0

    Returns
    -------
    list of (train, test)
        Sorted int64 index arrays; train and test are disjoint, and (except for "holdout") the
        test sets partition all subjects.
    """
    check_option("scheme", scheme, FOLD_SCHEMES)
    n = _n_from(labels, groups, split)
    if n is None:
        raise ConfigError(f"'labels' is required for scheme {scheme!r}" if scheme in ("stratified", "kfold")
                          else f"'{'split' if scheme == 'holdout' else 'groups'}' is required for scheme {scheme!r}")
    for name, a in (("labels", labels), ("groups", groups), ("split", split)):
        if a is not None:
            if np.ndim(a) != 1:
                raise DataFormatError(f"'{name}' must be 1-D [n_subjects]; got shape {np.shape(a)}")
            if len(a) != n:
                raise DataFormatError(f"'{name}' has {len(a)} entries; expected {n} (one per subject)")
    if scheme != "holdout" and scheme != "leave-one-group-out":
        if not isinstance(n_splits, (int, np.integer)) or isinstance(n_splits, bool) or n_splits < 2:
            raise ConfigError(f"'n_splits' must be an int >= 2; {n_splits!r} was provided")
    idx = np.arange(n)
    if scheme == "stratified":
        from sklearn.model_selection import StratifiedKFold

        if labels is None:
            raise ConfigError("'labels' is required for scheme 'stratified'")
        _, counts = np.unique(np.asarray(labels), return_counts=True)
        if n_splits > counts.min():
            raise ConfigError(f"'n_splits'={n_splits} exceeds the smallest class count ({counts.min()}) "
                              "for scheme 'stratified'")
        raw = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(idx, np.asarray(labels))
    elif scheme == "kfold":
        from sklearn.model_selection import KFold

        if n_splits > n:
            raise ConfigError(f"'n_splits'={n_splits} exceeds the number of subjects ({n})")
        raw = KFold(n_splits=n_splits, shuffle=True, random_state=seed).split(idx)
    elif scheme in ("group", "leave-one-group-out"):
        from sklearn.model_selection import GroupKFold, LeaveOneGroupOut

        if groups is None:
            raise ConfigError(f"'groups' is required for scheme {scheme!r}")
        g = np.asarray(groups)
        n_groups = np.unique(g).size
        if scheme == "group":
            if n_splits > n_groups:
                raise ConfigError(f"'n_splits'={n_splits} exceeds the number of groups ({n_groups}) for scheme 'group'")
            raw = GroupKFold(n_splits=n_splits).split(idx, groups=g)
        else:
            if n_groups < 2:
                raise ConfigError(f"'groups' must hold at least 2 groups for scheme {scheme!r}; got {n_groups}")
            raw = LeaveOneGroupOut().split(idx, groups=g)
    else:
        if split is None:
            raise ConfigError("'split' is required for scheme 'holdout'")
        s = np.char.lower(np.char.strip(np.asarray(split).astype(str)))
        train, test = np.flatnonzero(s == "train"), np.flatnonzero(s == "test")
        if train.size == 0 or test.size == 0:
            raise DataFormatError(f"'split' must mark some subjects 'train' and some 'test'; "
                                  f"found {train.size} train and {test.size} test")
        raw = [(train, test)]
    folds = [(np.sort(np.asarray(tr, dtype=np.int64)), np.sort(np.asarray(te, dtype=np.int64))) for tr, te in raw]
    _check_folds(folds, n, covering=scheme != "holdout")
    return folds


def _check_folds(folds, n: int, *, covering: bool) -> None:
    seen = np.zeros(n, dtype=np.int64)
    for k, (tr, te) in enumerate(folds):
        if tr.size == 0 or te.size == 0:
            raise DataFormatError(f"fold {k} has an empty train or test set")
        if np.intersect1d(tr, te).size:
            raise DataFormatError(f"fold {k}: train and test rows overlap")
        if tr.min() < 0 or te.min() < 0 or tr.max() >= n or te.max() >= n:
            raise DataFormatError(f"fold {k} indexes rows outside [0, {n})")
        seen[te] += 1
    if covering and not np.all(seen == 1):
        raise DataFormatError("the test folds do not partition the subjects exactly once")


# ------------------------------------------------------------------------------ cross-validation


@dataclasses.dataclass
class CVResult:
    """Out-of-fold results of :func:`cross_validate`.

    Attributes
    ----------
    fold_scores : list of dict
        Metric -> value on each fold's test rows.
    predictions : ndarray [n_subjects]
        Out-of-fold prediction per subject; -1 (integer labels), NaN (regression / float labels)
        or None (string labels) for subjects that were never tested.
    scores : ndarray [n_subjects] or [n_subjects, n_classes] or None
        Out-of-fold continuous scores (binary: the positive class's decision function or
        probability; multiclass: one column per class in ``classes`` order). NaN where untested.
    tested : ndarray bool [n_subjects]
    fit_seconds : list of float
    predict_seconds : list of float
    folds : list of (train, test)
    task : str
        "classification" or "regression".
    classes : ndarray or None
    pooled : dict
        Metrics over all tested subjects' pooled out-of-fold predictions.
    score_method : str or None
        The method the scores came from ("decision_function", "predict_proba") or None.
    """

    fold_scores: list
    predictions: np.ndarray
    scores: np.ndarray | None
    tested: np.ndarray
    fit_seconds: list
    predict_seconds: list = dataclasses.field(default_factory=list)
    folds: list = dataclasses.field(default_factory=list)
    task: str = "classification"
    classes: np.ndarray | None = None
    pooled: dict = dataclasses.field(default_factory=dict)
    score_method: str | None = None

    def summary(self) -> dict[str, dict[str, float]]:
        """Metric -> {"mean", "std", "min", "max", "n_folds"} over folds (NaN folds skipped).

        ``std`` is the population standard deviation over the folds with a finite value.
        """
        out: dict[str, dict[str, float]] = {}
        keys = []
        for fs in self.fold_scores:
            keys += [k for k in fs if k not in keys]
        for k in keys:
            v = np.array([fs.get(k, np.nan) for fs in self.fold_scores], dtype=np.float64)
            v = v[np.isfinite(v)]
            if v.size:
                out[k] = {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
                          "max": float(v.max()), "n_folds": int(v.size)}
            else:
                out[k] = {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n_folds": 0}
        return out

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (NaN -> None, arrays -> lists)."""
        return _jsonable({
            "task": self.task,
            "classes": None if self.classes is None else self.classes.tolist(),
            "summary": self.summary(),
            "pooled": self.pooled,
            "fold_scores": self.fold_scores,
            "fit_seconds": self.fit_seconds,
            "predict_seconds": self.predict_seconds,
            "predictions": self.predictions.tolist(),
            "scores": None if self.scores is None else self.scores.tolist(),
            "tested": self.tested.tolist(),
            "score_method": self.score_method,
            "folds": [{"train": tr.tolist(), "test": te.tolist()} for tr, te in self.folds],
        })


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def _index(X, rows: np.ndarray):
    from sklearn.utils import _safe_indexing

    return _safe_indexing(X, rows)


def _new_estimator(estimator_or_factory):
    if hasattr(estimator_or_factory, "fit"):
        from sklearn.base import clone

        try:
            return clone(estimator_or_factory, safe=False)
        except (TypeError, RuntimeError):
            return copy.deepcopy(estimator_or_factory)
    if callable(estimator_or_factory):
        est = estimator_or_factory()
        if not hasattr(est, "fit"):
            raise ConfigError("'estimator_or_factory' must be an estimator or a callable returning one; "
                              f"the factory returned {type(est).__name__}")
        return est
    raise ConfigError("'estimator_or_factory' must be an estimator (with fit/predict) or a factory; "
                      f"got {type(estimator_or_factory).__name__}")


def _quiet() -> bool:
    return os.environ.get("BRAINENC_QUIET", "0") in ("1", "true", "yes")


def cross_validate(estimator_or_factory, X, y, folds, *, fit_params: dict | None = None, method: str = "auto",
                   task: str = "auto", progress: bool = True) -> CVResult:
    """Fit a fresh copy of the estimator on each fold's training rows and score its test rows.

    Parameters
    ----------
    estimator_or_factory : estimator or callable
        An object with ``fit`` / ``predict`` (cloned per fold with :func:`sklearn.base.clone`;
        deep-copied when it cannot be cloned) or a zero-argument callable returning a new one.
        Every step of a pipeline is thus fitted on the training rows only.
    X : list of subject arrays, ndarray or DataFrame
        Indexed per fold with scikit-learn's ``_safe_indexing`` (lists stay lists).
    y : array-like [n_subjects]
    folds : list of (train, test)
        From :func:`make_folds` (or any integer index pairs).
    fit_params : dict, optional
        Extra keyword arguments of ``fit``; arrays with one entry per subject (e.g.
        ``sample_weight``) are sliced to the training rows, other values are passed unchanged.
    method : {"auto", "decision_function", "predict_proba", "none"}, default "auto"
        Where continuous scores (for AUROC) come from; "auto" = ``decision_function`` when the
        estimator has it, else ``predict_proba``, else none.
    task : {"auto", "classification", "regression"}, default "auto"
        "auto": regression when the estimator is a scikit-learn regressor or ``y`` holds
        non-integer floats; classification otherwise.
    progress : bool, default True
        tqdm bar over folds (also off under ``BRAINENC_QUIET=1``).

    Returns
    -------
    CVResult
    """
    check_option("method", method, ("auto", "decision_function", "predict_proba", "none"))
    check_option("task", task, ("auto", "classification", "regression"))
    y = np.asarray(y)
    if y.ndim != 1 and not (task == "regression" and y.ndim == 2):
        raise DataFormatError(f"'y' must be 1-D [n_subjects]; got shape {y.shape}")
    n = y.shape[0]
    try:
        n_x = len(X)
    except TypeError:
        raise DataFormatError(f"'X' must be indexable by subject; got {type(X).__name__}") from None
    if n_x != n:
        raise DataFormatError(f"'X' has {n_x} subjects but 'y' has {n}")
    folds = [(np.asarray(tr, dtype=np.int64), np.asarray(te, dtype=np.int64)) for tr, te in folds]
    if not folds:
        raise ConfigError("'folds' is empty")
    _check_folds(folds, n, covering=False)
    if task == "auto":
        from sklearn.base import is_regressor

        est0 = estimator_or_factory if hasattr(estimator_or_factory, "fit") else None
        float_y = np.issubdtype(y.dtype, np.floating) and not np.all(np.mod(y[np.isfinite(y)], 1) == 0)
        task = "regression" if (est0 is not None and is_regressor(est0)) or float_y else "classification"
    fit_params = dict(fit_params or {})

    classes = np.unique(y) if task == "classification" else None
    if task == "regression":
        predictions = np.full(y.shape, np.nan, dtype=np.float64)
    elif np.issubdtype(y.dtype, np.integer) or y.dtype == bool:
        predictions = np.full(n, -1, dtype=np.int64)
    elif np.issubdtype(y.dtype, np.floating):
        predictions = np.full(n, np.nan, dtype=np.float64)
    else:
        predictions = np.full(n, None, dtype=object)
    binary = classes is not None and classes.size == 2
    scores = None
    used_method = None
    tested = np.zeros(n, dtype=bool)
    fold_scores, fit_s, pred_s = [], [], []

    from tqdm.auto import tqdm

    it = tqdm(folds, desc="cv folds", unit="fold", disable=(not progress) or _quiet(), leave=False)
    for tr, te in it:
        est = _new_estimator(estimator_or_factory)
        kw = {k: (_index(v, tr) if _per_subject(v, n) else v) for k, v in fit_params.items()}
        t0 = time.perf_counter()
        est.fit(_index(X, tr), y[tr], **kw)
        fit_s.append(time.perf_counter() - t0)
        Xte = _index(X, te)
        t0 = time.perf_counter()
        pred = np.asarray(est.predict(Xte))
        fold_score = None
        if task == "classification" and method != "none":
            m = method
            if m == "auto":
                m = ("decision_function" if hasattr(est, "decision_function")
                     else "predict_proba" if hasattr(est, "predict_proba") else None)
            if m is not None:
                if not hasattr(est, m):
                    raise ConfigError(f"'method'={method!r} but {type(est).__name__} has no {m}()")
                used_method = m
                fold_score = _align_scores(np.asarray(getattr(est, m)(Xte), dtype=np.float64), est, classes, y[tr],
                                           m)
        pred_s.append(time.perf_counter() - t0)
        predictions[te] = pred.reshape(predictions[te].shape) if task == "regression" else pred.ravel()
        tested[te] = True
        if fold_score is not None:
            if scores is None:
                shape = (n,) if binary else (n, classes.size)
                scores = np.full(shape, np.nan, dtype=np.float64)
            scores[te] = fold_score
        if task == "regression":
            fold_scores.append(regression_scores(y[te], predictions[te]))
        else:
            fold_scores.append(_clf_scores(y[te], pred.ravel(), fold_score, classes))
    if task == "regression":
        pooled = regression_scores(y[tested], predictions[tested]) if tested.sum() >= 2 else {}
    else:
        pooled = _clf_scores(y[tested], predictions[tested], None if scores is None else scores[tested], classes)
    return CVResult(fold_scores=fold_scores, predictions=predictions, scores=scores, tested=tested,
                    fit_seconds=fit_s, predict_seconds=pred_s, folds=folds, task=task, classes=classes,
                    pooled=pooled, score_method=used_method)


def _per_subject(v, n: int) -> bool:
    return isinstance(v, (np.ndarray, list)) and len(v) == n and not isinstance(v, str)


def _clf_scores(yt, yp, score, classes) -> dict:
    positive = classes[-1] if classes.size == 2 else 1
    return classification_scores(yt, yp, score, labels=classes, positive=positive)


def _align_scores(s: np.ndarray, est, classes: np.ndarray, y_train: np.ndarray, method: str) -> np.ndarray:
    """Scores in the global class order: binary -> [n] (score of classes[-1]); multiclass -> [n, K]."""
    est_classes = getattr(est, "classes_", None)
    est_classes = np.unique(y_train) if est_classes is None else np.asarray(est_classes)
    k = classes.size
    if s.ndim == 2 and s.shape[1] == 1:
        s = s[:, 0]
    if s.ndim == 1:
        # a binary decision function / probability: the score of est_classes[-1]
        if k == 2:
            return s if est_classes.size < 2 or est_classes[-1] == classes[-1] else -s
        full = np.full((s.shape[0], k), np.nan)
        if est_classes.size == 2:
            pos = int(np.searchsorted(classes, est_classes[-1]))
            neg = int(np.searchsorted(classes, est_classes[0]))
            full[:, pos] = s
            full[:, neg] = -s if method == "decision_function" else 1.0 - s
        return full
    if s.shape[1] != est_classes.size:
        raise DataFormatError(f"{method}() returned {s.shape[1]} columns for {est_classes.size} classes")
    cols = np.searchsorted(classes, est_classes)
    if k == 2:
        return s[:, list(cols).index(1)] if 1 in cols else (-s[:, 0] if method == "decision_function" else 1 - s[:, 0])
    full = np.full((s.shape[0], k), np.nan)
    full[:, cols] = s
    return full


# ------------------------------------------------------------------------------ edge recovery


def _upper(a: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise DataFormatError(f"'{name}' must be a square [R, R] matrix; got shape {a.shape}")
    return np.triu_indices(a.shape[0], 1)


def _sym(vec: np.ndarray, iu, ju, r: int, dtype) -> np.ndarray:
    m = np.zeros((r, r), dtype=dtype)
    m[iu, ju] = vec
    m[ju, iu] = vec
    return m


def edge_recovery(fc, labels, truth, *, alpha: float = 0.05, fisher: bool = True,
                  correction: str = "fdr_bh") -> dict[str, Any]:
    """Detect group-different edges with per-edge Welch t-tests and score them against the truth.

    Parameters
    ----------
    fc : ndarray [n_subjects, R, R]
        Subject connectivity (Pearson r; only the upper triangle is used).
    labels : array-like [n_subjects]
        Two groups; t > 0 means the larger label has the larger connectivity.
    truth : ndarray bool [R, R]
        Edges that truly differ (symmetrised: ``truth | truth.T``; the diagonal is ignored).
    alpha : float, default 0.05
        Edges with q < alpha are detected.
    fisher : bool, default True
        Test Fisher z = arctanh(r) rather than r.
    correction : {"fdr_bh", "bonferroni", "none"}, default "fdr_bh"
        Benjamini–Hochberg (:func:`scipy.stats.false_discovery_control`), Bonferroni, or raw p.

    Returns
    -------
    dict
        ``precision`` (NaN when nothing is detected), ``recall`` (NaN when ``truth`` is empty),
        ``f1``, ``n_true``, ``n_detected``, ``n_true_positive``, ``n_edges``, ``auroc`` (``|t|`` vs
        truth; NaN when truth is empty or full), and symmetric [R, R] arrays with a zero diagonal:
        ``t`` (float), ``q`` (float; 1 on the diagonal), ``detected`` (bool).
    """
    from scipy import stats

    check_option("correction", correction, ("fdr_bh", "bonferroni", "none"))
    if not 0.0 < float(alpha) < 1.0:
        raise ConfigError(f"'alpha' must be in (0, 1); {alpha!r} was provided")
    fc = np.asarray(fc, dtype=np.float64)
    if fc.ndim != 3 or fc.shape[1] != fc.shape[2]:
        raise DataFormatError(f"'fc' must be [n_subjects, R, R]; got shape {fc.shape}")
    y = np.asarray(labels)
    if y.shape != (fc.shape[0],):
        raise DataFormatError(f"'labels' must have one entry per subject ({fc.shape[0]}); got shape {y.shape}")
    classes = np.unique(y)
    if classes.size != 2:
        raise DataFormatError(f"'labels' must hold exactly 2 groups; got {classes.size}")
    truth = np.asarray(truth).astype(bool)
    r = fc.shape[1]
    if truth.shape != (r, r):
        raise DataFormatError(f"'truth' must be [{r}, {r}]; got shape {truth.shape}")
    iu, ju = _upper(truth, "truth")
    tv = (truth | truth.T)[iu, ju]
    e = fc[:, iu, ju]
    if fisher:
        e = np.arctanh(np.clip(e, -1 + 1e-7, 1 - 1e-7))
    g1, g0 = e[y == classes[1]], e[y == classes[0]]
    if g1.shape[0] < 2 or g0.shape[0] < 2:
        raise DataFormatError("each group needs at least 2 subjects")
    t, p = stats.ttest_ind(g1, g0, axis=0, equal_var=False)
    t = np.nan_to_num(t, nan=0.0)
    p = np.where(np.isfinite(p), p, 1.0)
    if correction == "fdr_bh":
        q = stats.false_discovery_control(p, method="bh")
    elif correction == "bonferroni":
        q = np.minimum(p * p.size, 1.0)
    else:
        q = p
    det = q < alpha
    n_true, n_det = int(tv.sum()), int(det.sum())
    tp = int((det & tv).sum())
    precision = tp / n_det if n_det else math.nan
    recall = tp / n_true if n_true else math.nan
    if n_det and n_true and (precision + recall) > 0:
        f1 = 2 * precision * recall / (precision + recall)
    else:
        f1 = 0.0 if (n_det or n_true) else math.nan
    if 0 < n_true < tv.size:
        from sklearn.metrics import roc_auc_score

        auroc = float(roc_auc_score(tv, np.abs(t)))
    else:
        auroc = math.nan
    q_full = _sym(q, iu, ju, r, np.float64)
    np.fill_diagonal(q_full, 1.0)
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1), "n_true": n_true,
            "n_detected": n_det, "n_true_positive": tp, "n_edges": int(tv.size), "auroc": auroc,
            "t": _sym(t, iu, ju, r, np.float64), "q": q_full, "detected": _sym(det, iu, ju, r, bool)}


def graph_similarity(a, b, *, method: str = "pearson") -> float:
    """Correlation of two connectivity matrices over their off-diagonal entries.

    Both are symmetrised (``(A + A.T) / 2``) and compared on the upper triangle.

    Parameters
    ----------
    a, b : ndarray [R, R]
    method : {"pearson", "spearman"}, default "pearson"

    Returns
    -------
    float
        NaN when either matrix is constant off the diagonal.
    """
    from scipy import stats

    check_option("method", method, ("pearson", "spearman"))
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise DataFormatError(f"'a' and 'b' must have the same shape; got {a.shape} and {b.shape}")
    iu, ju = _upper(a, "a")
    if iu.size < 2:
        raise DataFormatError(f"need at least 3 nodes; got shape {a.shape}")
    va = ((a + a.T) / 2)[iu, ju]
    vb = ((b + b.T) / 2)[iu, ju]
    if np.ptp(va) == 0 or np.ptp(vb) == 0:
        return math.nan
    fn = stats.pearsonr if method == "pearson" else stats.spearmanr
    return float(fn(va, vb)[0])
