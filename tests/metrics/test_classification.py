"""brainenc.metrics.classification: against scikit-learn / scipy and hand-counted confusion matrices."""
import math

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from brainenc.exceptions import ConfigError, DataFormatError
from brainenc.metrics.classification import chance_level, classification_scores, regression_scores


def test_binary_matches_sklearn_and_hand_counts():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    score = y * 0.8 + rng.standard_normal(50)
    pred = (score > 0.4).astype(int)
    s = classification_scores(y, pred, score)
    assert s["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert s["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert s["auroc"] == pytest.approx(skm.roc_auc_score(y, score))
    tp = int(((y == 1) & (pred == 1)).sum())
    fn = int(((y == 1) & (pred == 0)).sum())
    tn = int(((y == 0) & (pred == 0)).sum())
    fp = int(((y == 0) & (pred == 1)).sum())
    assert s["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert s["specificity"] == pytest.approx(tn / (tn + fp))
    assert s["n_samples"] == 50


def test_binary_hand_counted():
    # TP=3 FN=1 TN=2 FP=2
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    p = np.array([1, 1, 1, 0, 0, 0, 1, 1])
    s = classification_scores(y, p)
    assert s["sensitivity"] == 0.75 and s["specificity"] == 0.5
    assert s["accuracy"] == 5 / 8 and s["balanced_accuracy"] == 0.625
    assert math.isnan(s["auroc"])
    # the other class as positive swaps sensitivity and specificity
    s0 = classification_scores(y, p, positive=0)
    assert s0["sensitivity"] == 0.5 and s0["specificity"] == 0.75


def test_binary_probability_columns_and_string_labels():
    y = np.array(["adhd", "tdc", "tdc", "adhd", "tdc", "adhd"])
    proba_adhd = np.array([0.9, 0.2, 0.4, 0.3, 0.1, 0.8])
    proba = np.column_stack([proba_adhd, 1 - proba_adhd])  # columns in sorted order: adhd, tdc
    pred = np.where(proba_adhd > 0.5, "adhd", "tdc")
    s = classification_scores(y, pred, proba, positive="adhd")
    assert s["auroc"] == pytest.approx(skm.roc_auc_score(y == "adhd", proba_adhd))
    s1 = classification_scores(y, pred, proba_adhd, positive="adhd")
    assert s1["auroc"] == pytest.approx(s["auroc"])
    with pytest.raises(ConfigError, match="positive"):
        classification_scores(y, pred, positive=1)


def test_multiclass_macro():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 90)
    logits = rng.standard_normal((90, 3)) + 1.5 * np.eye(3)[y]
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pred = proba.argmax(1)
    s = classification_scores(y, pred, proba)
    assert s["auroc"] == pytest.approx(skm.roc_auc_score(y, proba, multi_class="ovr", average="macro"))
    assert s["sensitivity"] == pytest.approx(skm.recall_score(y, pred, average="macro"))
    assert s["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    cm = skm.confusion_matrix(y, pred)
    spec = [(cm.sum() - cm[k].sum() - cm[:, k].sum() + cm[k, k]) / (cm.sum() - cm[k].sum()) for k in range(3)]
    assert s["specificity"] == pytest.approx(np.mean(spec))
    assert math.isnan(classification_scores(y, pred)["auroc"])


def test_single_class_fold_gives_nan_not_error():
    s = classification_scores([1, 1, 1], [1, 0, 1], [0.9, 0.2, 0.8], labels=[0, 1])
    assert math.isnan(s["auroc"]) and math.isnan(s["specificity"])
    assert s["sensitivity"] == pytest.approx(2 / 3)
    # multiclass with a class absent from y_true: AUROC over the others
    y = np.array([0, 0, 1, 1])
    proba = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1]])
    s = classification_scores(y, proba.argmax(1), proba, labels=[0, 1, 2])
    assert s["auroc"] == pytest.approx(1.0)


def test_bad_inputs():
    with pytest.raises(DataFormatError, match="same length"):
        classification_scores([0, 1], [0, 1, 1])
    with pytest.raises(DataFormatError, match="y_score"):
        classification_scores([0, 1], [0, 1], [[0.1, 0.2, 0.7]])
    with pytest.raises(DataFormatError, match="not in 'labels'"):
        classification_scores([0, 2], [0, 1], labels=[0, 1])


def test_regression_scores_vs_scipy():
    rng = np.random.default_rng(2)
    y = rng.standard_normal(40)
    p = y + 0.5 * rng.standard_normal(40)
    s = regression_scores(y, p)
    assert s["r"] == pytest.approx(stats.pearsonr(y, p)[0])
    assert s["mae"] == pytest.approx(skm.mean_absolute_error(y, p))
    assert s["r2"] == pytest.approx(skm.r2_score(y, p))
    Y = rng.standard_normal((40, 3))
    P = Y + rng.standard_normal((40, 3))
    s2 = regression_scores(Y, P)
    assert s2["r"] == pytest.approx(np.mean([stats.pearsonr(Y[:, j], P[:, j])[0] for j in range(3)]))
    assert s2["r2"] == pytest.approx(skm.r2_score(Y, P))
    assert math.isnan(regression_scores(y, np.ones(40))["r"])


def test_chance_level():
    assert chance_level([0, 1, 1, 1]) == 0.75
    assert chance_level(["a", "b"]) == 0.5
