"""Subject-level scores for group classification and phenotype regression.

Pure numpy / scikit-learn (no torch). These score the out-of-fold predictions of the network
baselines and of any classifier evaluated with :func:`brainenc.pretraining.evaluation.cross_validate`:
accuracy, balanced accuracy, sensitivity, specificity and AUROC (the quantities the ADHD-200 /
ABIDE literature reports), plus MAE / Pearson r / R² for continuous targets.

Undefined quantities are NaN, never an error: a cross-validation fold whose test rows hold a
single class has no AUROC, and a class absent from ``y_true`` has no recall.
"""
from __future__ import annotations

import warnings

import numpy as np

from brainenc.exceptions import ConfigError, DataFormatError

__all__ = ["classification_scores", "regression_scores", "chance_level"]


def _as_1d(name: str, a) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise DataFormatError(f"'{name}' must be 1-D [n_samples]; got shape {arr.shape}")
    return arr


def _binary_auc(y_bin: np.ndarray, score: np.ndarray) -> float:
    """AUROC of ``score`` for the boolean target ``y_bin``; NaN when one class is missing."""
    from sklearn.metrics import roc_auc_score

    ok = np.isfinite(score)
    y_bin, score = y_bin[ok], score[ok]
    if y_bin.size == 0 or y_bin.all() or not y_bin.any():
        return float("nan")
    return float(roc_auc_score(y_bin, score))


def classification_scores(y_true, y_pred, y_score=None, *, labels=None, positive=1) -> dict[str, float]:
    """Accuracy, balanced accuracy, sensitivity, specificity and AUROC of a classifier.

    Parameters
    ----------
    y_true, y_pred : array-like [n_samples]
        True and predicted class labels (ints or strings).
    y_score : array-like [n_samples] or [n_samples, n_classes], optional
        Continuous scores for the AUROC. Binary: the decision function / probability of the
        ``positive`` class [n], or class probabilities [n, 2] (columns in ``labels`` order).
        Multiclass: per-class scores / probabilities [n, K] (columns in ``labels`` order).
        Without it, ``auroc`` is NaN.
    labels : array-like, optional
        All classes, in the order of the ``y_score`` columns. Default: the sorted union of
        ``y_true`` and ``y_pred`` (or ``0..K-1`` when ``y_score`` has K columns and the labels
        are integers in that range).
    positive : label, default 1
        The positive class of a binary problem (sensitivity = its recall; specificity = the
        recall of the other class). Ignored for more than two classes.

    Returns
    -------
    dict of str -> float
        ``accuracy``, ``balanced_accuracy`` (mean recall over the classes present in
        ``y_true``, as :func:`sklearn.metrics.balanced_accuracy_score`), ``sensitivity``,
        ``specificity``, ``auroc`` and ``n_samples``. Multiclass: sensitivity / specificity are
        macro averages of per-class recall / per-class specificity, and auroc is the macro
        one-vs-rest AUROC. A quantity that is undefined on these rows (e.g. AUROC when
        ``y_true`` holds a single class) is NaN.

    Examples
    --------
    >>> s = classification_scores([0, 0, 1, 1], [0, 1, 1, 1], [0.1, 0.6, 0.7, 0.9])
    >>> s["accuracy"], s["sensitivity"], s["specificity"], s["auroc"]
    (0.75, 1.0, 0.5, 1.0)
    """
    yt = _as_1d("y_true", y_true)
    yp = _as_1d("y_pred", y_pred)
    if yt.shape != yp.shape:
        raise DataFormatError(f"'y_true' and 'y_pred' must have the same length; got {yt.size} and {yp.size}")
    if yt.size == 0:
        raise DataFormatError("'y_true' is empty")
    score = None
    if y_score is not None:
        score = np.asarray(y_score, dtype=np.float64)
        if score.ndim not in (1, 2) or score.shape[0] != yt.size:
            raise DataFormatError(
                f"'y_score' must be [n_samples] or [n_samples, n_classes] with n_samples={yt.size}; "
                f"got shape {score.shape}")
        if score.ndim == 2 and score.shape[1] == 1:
            score = score[:, 0]
    if labels is None:
        classes = np.unique(np.concatenate([yt, yp]))
        if score is not None and score.ndim == 2 and score.shape[1] != classes.size:
            k = score.shape[1]
            if np.issubdtype(classes.dtype, np.integer) and classes.min() >= 0 and classes.max() < k:
                classes = np.arange(k)
            else:
                raise DataFormatError(
                    f"'y_score' has {k} columns but the labels hold {classes.size} classes; pass 'labels'")
    else:
        classes = np.asarray(labels)
        if classes.ndim != 1 or classes.size < 2 or np.unique(classes).size != classes.size:
            raise ConfigError(f"'labels' must be at least 2 distinct classes; got {labels!r}")
        unknown = np.setdiff1d(np.concatenate([yt, yp]), classes)
        if unknown.size:
            raise DataFormatError(f"labels {unknown.tolist()!r} are not in 'labels' {classes.tolist()!r}")
    if score is not None and score.ndim == 2 and score.shape[1] != classes.size:
        raise DataFormatError(f"'y_score' has {score.shape[1]} columns for {classes.size} classes")
    k = classes.size

    # confusion matrix C[i, j] = #(true = classes[i], pred = classes[j])
    ti = np.searchsorted(classes, yt) if _sorted(classes) else _index(classes, yt)
    pi = np.searchsorted(classes, yp) if _sorted(classes) else _index(classes, yp)
    cm = np.zeros((max(k, 1), max(k, 1)), dtype=np.int64)
    np.add.at(cm, (ti, pi), 1)
    n = yt.size
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(1).astype(np.float64)          # true count per class
    predicted = cm.sum(0).astype(np.float64)
    neg = n - support
    tn = n - support - predicted + tp
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        spec = np.where(neg > 0, tn / neg, np.nan)
    present = support > 0
    out: dict[str, float] = {
        "accuracy": float(tp.sum() / n),
        "balanced_accuracy": float(np.mean(recall[present])) if present.any() else float("nan"),
    }
    if k == 2:
        if positive not in classes.tolist():
            raise ConfigError(f"'positive' must be one of the classes {classes.tolist()!r}; {positive!r} was provided")
        pos = classes.tolist().index(positive)
        out["sensitivity"] = float(recall[pos])
        out["specificity"] = float(recall[1 - pos])
        if score is None:
            out["auroc"] = float("nan")
        else:
            s = score[:, pos] if score.ndim == 2 else score
            out["auroc"] = _binary_auc(ti == pos, s)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out["sensitivity"] = float(np.nanmean(recall)) if np.isfinite(recall).any() else float("nan")
            out["specificity"] = float(np.nanmean(spec)) if np.isfinite(spec).any() else float("nan")
        if score is None or score.ndim != 2:
            out["auroc"] = float("nan")
        else:
            aucs = np.array([_binary_auc(ti == c, score[:, c]) for c in range(k)])
            # sklearn's macro one-vs-rest AUROC needs every class in y_true; here a missing class is skipped
            out["auroc"] = float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")
    out["n_samples"] = float(n)
    return out


def _sorted(classes: np.ndarray) -> bool:
    try:
        return bool(np.all(classes[:-1] < classes[1:]))
    except TypeError:
        return False


def _index(classes: np.ndarray, values: np.ndarray) -> np.ndarray:
    lut = {c: i for i, c in enumerate(classes.tolist())}
    return np.array([lut[v] for v in values.tolist()], dtype=np.int64)


def regression_scores(y_true, y_pred) -> dict[str, float]:
    """Mean absolute error, Pearson r and R² of continuous predictions.

    Parameters
    ----------
    y_true, y_pred : array-like [n_samples] or [n_samples, n_targets]

    Returns
    -------
    dict of str -> float
        ``mae``, ``r`` (Pearson; the mean over columns for 2-D targets; NaN when either side is
        constant), ``r2`` (:func:`sklearn.metrics.r2_score` per column, averaged), ``n_samples``.

    Examples
    --------
    >>> s = regression_scores([1.0, 2.0, 3.0], [1.0, 2.0, 4.0])
    >>> round(s["mae"], 4), round(s["r"], 4)
    (0.3333, 0.982)
    """
    yt = np.asarray(y_true, dtype=np.float64)
    yp = np.asarray(y_pred, dtype=np.float64)
    if yt.shape != yp.shape:
        raise DataFormatError(f"'y_true' and 'y_pred' must have the same shape; got {yt.shape} and {yp.shape}")
    if yt.ndim == 1:
        yt, yp = yt[:, None], yp[:, None]
    if yt.ndim != 2 or yt.shape[0] < 2:
        raise DataFormatError(f"need at least 2 samples of 1-D or 2-D targets; got shape {np.shape(y_true)}")
    n = yt.shape[0]
    dt = yt - yt.mean(0)
    dp = yp - yp.mean(0)
    den = np.sqrt((dt ** 2).sum(0) * (dp ** 2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(den > 0, (dt * dp).sum(0) / np.where(den > 0, den, 1.0), np.nan)
        ss_tot = (dt ** 2).sum(0)
        r2 = np.where(ss_tot > 0, 1.0 - ((yt - yp) ** 2).sum(0) / np.where(ss_tot > 0, ss_tot, 1.0), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return {"mae": float(np.abs(yt - yp).mean()),
                "r": float(np.nanmean(r)) if np.isfinite(r).any() else float("nan"),
                "r2": float(np.nanmean(r2)) if np.isfinite(r2).any() else float("nan"),
                "n_samples": float(n)}


def chance_level(labels) -> float:
    """Accuracy of always predicting the majority class (the fraction of the largest class).

    >>> chance_level([0, 0, 0, 1])
    0.75
    """
    y = _as_1d("labels", labels)
    if y.size == 0:
        raise DataFormatError("'labels' is empty")
    _, counts = np.unique(y, return_counts=True)
    return float(counts.max() / y.size)
