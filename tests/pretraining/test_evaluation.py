"""brainenc.pretraining.evaluation: folds, leakage-free cross-validation, edge recovery."""
import json
import math

import numpy as np
import pytest
from scipy import stats
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.feature_selection import SelectKBest, f_classif
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import Pipeline, make_pipeline

from brainenc.exceptions import ConfigError, DataFormatError
from brainenc.metrics.classification import classification_scores
from brainenc.pretraining.baselines import network_pca_lda
from brainenc.pretraining.evaluation import (
    CVResult,
    cross_validate,
    edge_recovery,
    graph_similarity,
    make_folds,
)

# ------------------------------------------------------------------------------------ folds


def test_stratified_folds_proportions_and_partition():
    y = np.array([0] * 30 + [1] * 20)
    folds = make_folds(y, n_splits=5, seed=1)
    assert len(folds) == 5
    all_test = np.concatenate([te for _, te in folds])
    np.testing.assert_array_equal(np.sort(all_test), np.arange(50))
    for tr, te in folds:
        assert tr.dtype == np.int64 and te.dtype == np.int64
        assert np.all(np.diff(tr) > 0) and np.all(np.diff(te) > 0)
        assert not np.intersect1d(tr, te).size and tr.size + te.size == 50
        assert (y[te] == 0).sum() == 6 and (y[te] == 1).sum() == 4
    assert [t.tolist() for _, t in make_folds(y, n_splits=5, seed=1)] == [t.tolist() for _, t in folds]
    assert [t.tolist() for _, t in make_folds(y, n_splits=5, seed=2)] != [t.tolist() for _, t in folds]


def test_group_folds_keep_each_site_in_one_test_fold():
    rng = np.random.default_rng(0)
    sites = rng.choice(["NYU", "PKU", "KKI", "OHSU", "Peking_2", "NI"], size=90)
    y = rng.integers(0, 2, 90)
    folds = make_folds(y, scheme="group", groups=sites, n_splits=3)
    fold_of = {}
    for k, (tr, te) in enumerate(folds):
        assert not set(sites[tr]) & set(sites[te])
        for s in set(sites[te]):
            assert s not in fold_of
            fold_of[s] = k
    assert set(fold_of) == set(sites)
    logo = make_folds(scheme="leave-one-group-out", groups=sites)
    assert len(logo) == 6 and all(np.unique(sites[te]).size == 1 for _, te in logo)


def test_holdout_and_kfold():
    split = np.array(["train"] * 8 + ["test"] * 3 + ["val"])
    (tr, te), = make_folds(scheme="holdout", split=split)
    np.testing.assert_array_equal(tr, np.arange(8))
    np.testing.assert_array_equal(te, [8, 9, 10])
    folds = make_folds(np.zeros(10), scheme="kfold", n_splits=5)
    assert sorted(np.concatenate([t for _, t in folds]).tolist()) == list(range(10))


def test_fold_errors_name_the_parameter():
    y = np.array([0] * 10 + [1] * 3)
    with pytest.raises(ConfigError, match="n_splits"):
        make_folds(y, n_splits=5)
    with pytest.raises(ConfigError, match="groups"):
        make_folds(y, scheme="group")
    with pytest.raises(ConfigError, match="n_splits"):
        make_folds(y, scheme="group", groups=np.array(["a", "b"] * 6 + ["a"]), n_splits=3)
    with pytest.raises(ConfigError, match="split"):
        make_folds(y, scheme="holdout")
    with pytest.raises(DataFormatError, match="test"):
        make_folds(scheme="holdout", split=["train"] * 4)
    with pytest.raises(ConfigError, match="scheme"):
        make_folds(y, scheme="stratifed")
    with pytest.raises(DataFormatError, match="groups"):
        make_folds(y, scheme="group", groups=["a", "b"])


# ------------------------------------------------------------------------------ leakage


class Spy(TransformerMixin, BaseEstimator):
    """Records (in a class-level log: clones are new instances) which subjects each fit saw."""

    log: list = []
    universe: list = []

    def fit(self, X, y=None):
        ids = {id(s): i for i, s in enumerate(Spy.universe)}
        Spy.log.append(sorted(ids[id(s)] for s in X))
        return self

    def transform(self, X):
        return X


def _series(n=40, r=12, t=50, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    xs = []
    for i in range(n):
        x = rng.standard_normal((t, r))
        if y[i]:
            x[:, :3] += rng.standard_normal((t, 1))
        xs.append(x.astype(np.float32))
    return xs, y


def test_no_fold_leakage_spy_sees_only_train_rows():
    xs, y = _series()
    Spy.universe, Spy.log = xs, []
    base = network_pca_lda(density=0.2, select_k=10)
    pipe = Pipeline([("spy", Spy())] + base.steps)
    folds = make_folds(y, n_splits=4, seed=3)
    res = cross_validate(pipe, xs, y, folds, progress=False)
    assert len(Spy.log) == 4
    for (tr, te), seen in zip(folds, Spy.log):
        assert seen == tr.tolist()
        assert not set(seen) & set(te.tolist())
    assert res.tested.all()
    # a factory is called once per fold as well
    Spy.log = []
    cross_validate(lambda: Pipeline([("spy", Spy())] + network_pca_lda(density=0.2).steps), xs, y, folds,
                   progress=False)
    assert [s for s in Spy.log] == [tr.tolist() for tr, _ in folds]


def test_no_fold_leakage_statistical():
    """Noise features + random labels: in-fold selection is at chance; selecting on all data is not."""
    ok, leaky = [], []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        X = rng.standard_normal((60, 5000))
        y = rng.permutation(np.repeat([0, 1], 30))
        folds = make_folds(y, n_splits=5, seed=seed)
        pipe = make_pipeline(SelectKBest(f_classif, k=20), LinearDiscriminantAnalysis())
        ok.append(cross_validate(pipe, X, y, folds, progress=False).pooled["accuracy"])
        X_sel = SelectKBest(f_classif, k=20).fit_transform(X, y)  # the leak: selection saw the test rows
        leaky.append(cross_validate(LinearDiscriminantAnalysis(), X_sel, y, folds, progress=False).pooled["accuracy"])
    assert np.mean(ok) < 0.7 and max(ok) < 0.75
    assert np.mean(leaky) > 0.8


# ------------------------------------------------------------------------------ cross_validate


def test_cross_validate_matches_manual_loop():
    xs, y = _series(n=30, seed=4)
    folds = make_folds(y, n_splits=3, seed=0)
    est = network_pca_lda(density=0.2)
    res = cross_validate(est, xs, y, folds, progress=False)
    assert isinstance(res, CVResult) and res.score_method == "decision_function"
    assert res.scores.shape == (30,) and len(res.fit_seconds) == 3
    for k, (tr, te) in enumerate(folds):
        m = network_pca_lda(density=0.2).fit([xs[i] for i in tr], y[tr])
        pred = m.predict([xs[i] for i in te])
        dec = m.decision_function([xs[i] for i in te])
        np.testing.assert_array_equal(res.predictions[te], pred)
        np.testing.assert_allclose(res.scores[te], dec, rtol=1e-6, atol=1e-9)
        assert res.fold_scores[k] == pytest.approx(classification_scores(y[te], pred, dec))
    summ = res.summary()
    acc = [f["accuracy"] for f in res.fold_scores]
    assert summ["accuracy"]["mean"] == pytest.approx(np.mean(acc))
    assert summ["accuracy"]["std"] == pytest.approx(np.std(acc))
    assert summ["auroc"]["n_folds"] == 3
    assert res.pooled["accuracy"] == pytest.approx((res.predictions == y).mean())
    json.dumps(res.to_json())


def test_cross_validate_holdout_untested_rows():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((20, 4))
    y = (X[:, 0] > 0).astype(int)
    split = np.array(["train"] * 14 + ["test"] * 6)
    res = cross_validate(LogisticRegression(), X, y, make_folds(scheme="holdout", split=split), progress=False)
    assert (res.predictions[:14] == -1).all() and res.tested.tolist() == [False] * 14 + [True] * 6
    assert np.isnan(res.scores[:14]).all() and np.isfinite(res.scores[14:]).all()
    d = res.to_json()
    assert d["scores"][0] is None
    json.dumps(d)


def test_cross_validate_multiclass_proba_and_regression_and_fit_params():
    rng = np.random.default_rng(6)
    X = rng.standard_normal((60, 5))
    y3 = np.argmax(X[:, :3] + 0.5 * rng.standard_normal((60, 3)), 1)
    folds = make_folds(y3, n_splits=3)
    res = cross_validate(LogisticRegression(), X, y3, folds, method="predict_proba", progress=False)
    assert res.scores.shape == (60, 3) and res.fold_scores[0]["auroc"] > 0.6
    np.testing.assert_allclose(res.scores.sum(1), 1.0)

    age = X @ np.array([1.0, 0.5, 0, 0, 0]) + 0.1 * rng.standard_normal(60) + 10.3
    folds = make_folds(scheme="kfold", n_splits=3, labels=age)
    reg = cross_validate(Ridge(alpha=1.0), X, age, folds, progress=False)
    assert reg.task == "regression" and reg.scores is None
    assert reg.summary()["r"]["mean"] > 0.9

    class WeightSpy(LogisticRegression):
        seen = []

        def fit(self, X, y, sample_weight=None):
            WeightSpy.seen.append(len(sample_weight))
            return super().fit(X, y, sample_weight=sample_weight)

    folds = make_folds(y3, n_splits=3)
    cross_validate(WeightSpy(), X, y3, folds, fit_params={"sample_weight": np.ones(60)}, progress=False)
    assert WeightSpy.seen == [tr.size for tr, _ in folds]


def test_cross_validate_errors():
    X = np.zeros((10, 2))
    with pytest.raises(DataFormatError, match="'X' has"):
        cross_validate(LogisticRegression(), X, np.zeros(9), [(np.arange(5), np.arange(5, 9))], progress=False)
    with pytest.raises(ConfigError, match="method"):
        cross_validate(LogisticRegression(), X, np.zeros(10), [], method="proba", progress=False)
    with pytest.raises(DataFormatError, match="overlap"):
        cross_validate(LogisticRegression(), X, np.arange(10) % 2, [(np.arange(6), np.arange(5, 10))],
                       progress=False)


# ------------------------------------------------------------------------------ edge recovery


def _planted_fc(n=80, r=20, effect=0.35, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    iu, ju = np.triu_indices(r, 1)
    base = 0.3 * rng.standard_normal(iu.size)
    truth_vec = np.zeros(iu.size, bool)
    truth_vec[rng.choice(iu.size, 15, replace=False)] = True
    fc = np.zeros((n, r, r))
    for i in range(n):
        z = base + 0.2 * rng.standard_normal(iu.size) + effect * truth_vec * y[i]
        fc[i, iu, ju] = fc[i, ju, iu] = np.tanh(z)
        fc[i, np.arange(r), np.arange(r)] = 1.0
    truth = np.zeros((r, r), bool)
    truth[iu[truth_vec], ju[truth_vec]] = True
    return fc, y, truth


def test_edge_recovery_planted_difference():
    fc, y, truth = _planted_fc()
    out = edge_recovery(fc, y, truth)
    assert out["n_true"] == 15 and out["n_edges"] == 190
    assert out["recall"] >= 0.9 and out["precision"] >= 0.8 and out["auroc"] > 0.95
    assert out["t"].shape == (20, 20) and np.allclose(out["t"], out["t"].T) and np.all(np.diag(out["t"]) == 0)
    assert out["detected"].dtype == bool and not out["detected"].diagonal().any()
    # t matches scipy Welch on one edge
    z = np.arctanh(fc[:, 0, 1])
    assert out["t"][0, 1] == pytest.approx(stats.ttest_ind(z[y == 1], z[y == 0], equal_var=False).statistic)
    # lower-triangle truth is the same truth
    assert edge_recovery(fc, y, truth.T)["recall"] == out["recall"]


def test_edge_recovery_null_is_fdr_controlled():
    detections = []
    for seed in range(3):
        fc, y, truth = _planted_fc(effect=0.0, seed=seed)
        out = edge_recovery(fc, y, truth)
        detections.append(out["n_detected"])
        assert out["recall"] <= 0.2
    assert sum(detections) <= 3
    raw = edge_recovery(fc, y, truth, correction="none")
    assert raw["n_detected"] >= out["n_detected"]
    with pytest.raises(ConfigError, match="correction"):
        edge_recovery(fc, y, truth, correction="holm")


def test_graph_similarity():
    rng = np.random.default_rng(7)
    a = rng.standard_normal((10, 10))
    a = a + a.T
    b = a + 0.5 * rng.standard_normal((10, 10))
    iu = np.triu_indices(10, 1)
    bs = (b + b.T) / 2
    assert graph_similarity(a, b) == pytest.approx(stats.pearsonr(a[iu], bs[iu])[0])
    assert graph_similarity(a, b, method="spearman") == pytest.approx(stats.spearmanr(a[iu], bs[iu])[0])
    assert graph_similarity(a, a) == pytest.approx(1.0)
    assert math.isnan(graph_similarity(a, np.ones((10, 10))))
    with pytest.raises(DataFormatError):
        graph_similarity(a, b[:5, :5])
