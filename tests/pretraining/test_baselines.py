"""brainenc.pretraining.baselines: graph features vs numpy / networkx, pipelines vs hand-built sklearn."""
import networkx as nx
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.decomposition import PCA
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.feature_selection import SelectKBest, f_classif
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from brainenc.exceptions import ConfigError, DataFormatError
from brainenc.pretraining.baselines import (
    BASELINES,
    ConnectivityFeatures,
    NetworkFeatures,
    correlation_matrices,
    fc_classifier,
    make_baseline,
    network_pca_lda,
    node_features,
    threshold_networks,
)


def _series(n=12, t=60, r=16, seed=0, effect=0.0):
    """Subjects with a shared 2-block structure; label-1 subjects get extra coupling of ROIs 0-3."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    xs = []
    for i in range(n):
        common = rng.standard_normal((t, 2))
        x = rng.standard_normal((t, r)) + 0.8 * common[:, (np.arange(r) >= r // 2).astype(int)]
        if effect and y[i]:
            x[:, :4] += effect * rng.standard_normal((t, 1))
        xs.append(x.astype(np.float32))
    return xs, y


def _hand_adjacency(x, density):
    r = np.corrcoef(x.T.astype(np.float64))
    iu, ju = np.triu_indices(r.shape[0], 1)
    w = r[iu, ju]
    k = int(round(density * w.size))
    keep = np.zeros(w.size, bool)
    keep[np.argsort(-w, kind="stable")[:k]] = True
    a = np.zeros_like(r, dtype=bool)
    a[iu[keep], ju[keep]] = True
    return a | a.T


def test_correlation_matrices_match_corrcoef_and_ragged_lengths():
    xs, _ = _series(n=5)
    xs[2] = xs[2][:40]  # a different length
    fc = correlation_matrices(xs)
    assert fc.dtype == np.float32 and fc.shape == (5, 16, 16)
    for i, x in enumerate(xs):
        np.testing.assert_allclose(fc[i], np.corrcoef(x.T), atol=1e-6)
    z = correlation_matrices(xs, fisher=True)
    off = ~np.eye(16, dtype=bool)
    np.testing.assert_allclose(z[0][off], np.arctanh(np.corrcoef(xs[0].T)[off]), atol=1e-5)
    assert np.all(np.diag(z[0]) == 0)
    with pytest.raises(DataFormatError, match="ROIs"):
        correlation_matrices([xs[0], xs[1][:, :5]])


def test_degree_triangles_clustering_vs_numpy_and_networkx():
    xs, _ = _series(n=3, r=20, seed=3)
    density = 0.15
    nf = NetworkFeatures(density=density).fit(xs)
    F = nf.transform(xs)
    assert F.dtype == np.float32 and F.shape == (3, 60)
    names = nf.get_feature_names_out()
    assert names[0] == "degree_0" and names[20] == "triangles_0" and names[40] == "clustering_0"
    for i, x in enumerate(xs):
        a = _hand_adjacency(x, density)
        g = nx.from_numpy_array(a.astype(int))
        np.testing.assert_array_equal(F[i, :20], a.sum(1))
        af = a.astype(float)
        np.testing.assert_array_equal(F[i, 20:40], np.diag(af @ af @ af) / 2)
        np.testing.assert_array_equal(F[i, 20:40], [nx.triangles(g)[j] for j in range(20)])
        np.testing.assert_allclose(F[i, 40:], [nx.clustering(g)[j] for j in range(20)], rtol=1e-6)
    assert F[:, 20:40].sum() > 0  # non-trivial graphs


def test_absolute_threshold_and_abs_values():
    xs, _ = _series(n=2, r=12, seed=4)
    fc = correlation_matrices(xs)
    adj = threshold_networks(fc, threshold="absolute", r0=0.2)
    for i in range(2):
        r = np.corrcoef(xs[i].T)
        expect = r > 0.2
        np.fill_diagonal(expect, False)
        np.testing.assert_array_equal(adj[i], expect)
    F = NetworkFeatures(threshold="absolute", r0=0.2, features=("degree",)).fit_transform(xs)
    np.testing.assert_array_equal(F, adj.sum(2))
    adj_abs = threshold_networks(fc, threshold="absolute", r0=0.2, absolute_values=True)
    assert adj_abs.sum() >= adj.sum()


@pytest.mark.parametrize("density", [0.05, 0.1, 0.37])
def test_proportional_threshold_keeps_density(density):
    xs, _ = _series(n=4, r=25, seed=5)
    adj = threshold_networks(correlation_matrices(xs), density=density)
    e = 25 * 24 / 2
    n_edges = adj.sum((1, 2)) / 2
    assert np.all(np.abs(n_edges - density * e) <= 1)
    assert np.all(adj == adj.transpose(0, 2, 1)) and not adj[:, np.arange(25), np.arange(25)].any()


def test_sparse_triangles_equal_dense():
    rng = np.random.default_rng(6)
    a = rng.random((3, 60, 60)) < 0.2
    a = np.triu(a, 1)
    a = a | a.transpose(0, 2, 1)
    d = node_features(a, sparse=False)
    s = node_features(a, sparse=True)
    for k in d:
        np.testing.assert_allclose(s[k], d[k])
    xs, _ = _series(n=3, r=20)
    np.testing.assert_array_equal(NetworkFeatures(sparse=True).fit_transform(xs),
                                  NetworkFeatures(sparse=False).fit_transform(xs))


def test_include_fc_and_fc_input():
    xs, _ = _series(n=3, r=10)
    fc = correlation_matrices(xs)
    F = NetworkFeatures(include_fc=True, density=0.2).fit_transform(xs)
    iu, ju = np.triu_indices(10, 1)
    assert F.shape == (3, 30 + 45)
    np.testing.assert_allclose(F[:, 30:], fc[:, iu, ju])
    F2 = NetworkFeatures(include_fc=True, density=0.2, input="fc").fit_transform(fc)
    np.testing.assert_array_equal(F, F2)
    nf = NetworkFeatures(features=(), include_fc=True).fit(xs)
    assert nf.get_feature_names_out()[0] == "fc_0_1"


def test_params_validated_and_clone():
    xs, _ = _series(n=2)
    for kw, name in [({"density": 0}, "density"), ({"threshold": "top"}, "threshold"),
                     ({"features": ("degree", "betweenness")}, "features"), ({"sparse": "yes"}, "sparse"),
                     ({"threshold": "absolute", "r0": 2.0}, "r0"), ({"input": "matrix"}, "input")]:
        with pytest.raises(ConfigError, match=name):
            NetworkFeatures(**kw).fit(xs)
    nf = NetworkFeatures(density=0.3, features=("triangles",))
    c = clone(nf)
    assert c.get_params() == nf.get_params()
    with pytest.raises(DataFormatError):
        NetworkFeatures().fit(np.zeros((10, 5)))
    with pytest.raises(ConfigError, match="density"):
        network_pca_lda(density=1.5)
    with pytest.raises(ConfigError, match="select_k"):
        network_pca_lda(select_k=0)
    with pytest.raises(ConfigError, match="classifier"):
        network_pca_lda(classifier="rf")
    with pytest.raises(ConfigError, match="kind"):
        fc_classifier(kind="covariances")


def _atol(a):
    return 1e-6 * max(1.0, float(np.abs(a).max()))


@pytest.mark.parametrize("select_k", [None, 12])
def test_network_pca_lda_equals_hand_built_pipeline(select_k):
    xs, y = _series(n=30, r=16, seed=7, effect=1.0)
    train, test = np.arange(0, 30, 3), None
    train = np.setdiff1d(np.arange(30), np.arange(0, 30, 3))
    test = np.arange(0, 30, 3)
    pipe = network_pca_lda(density=0.2, select_k=select_k)
    pipe.fit([xs[i] for i in train], y[train])
    Xte = [xs[i] for i in test]

    nf = NetworkFeatures(density=0.2).fit(xs)
    Ftr, Fte = nf.transform([xs[i] for i in train]), nf.transform(Xte)
    sc = StandardScaler().fit(Ftr)
    Ztr, Zte = sc.transform(Ftr), sc.transform(Fte)
    if select_k:
        sel = SelectKBest(f_classif, k=select_k).fit(Ztr, y[train])
        Ztr, Zte = sel.transform(Ztr), sel.transform(Zte)
    k = min(len(train) - 1, Ztr.shape[1], 50)
    pca = PCA(n_components=k, random_state=0).fit(Ztr)
    lda = LinearDiscriminantAnalysis().fit(pca.transform(Ztr), y[train])
    assert pipe.named_steps["pca"].n_components_ == k
    ref = lda.decision_function(pca.transform(Zte))
    got = pipe.decision_function(Xte)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=_atol(ref))
    np.testing.assert_array_equal(pipe.predict(Xte), lda.predict(pca.transform(Zte)))


@pytest.mark.parametrize("classifier", ["logreg", "svm"])
def test_fc_classifier_equals_hand_built_pipeline(classifier):
    from nilearn.connectome import ConnectivityMeasure

    xs, y = _series(n=24, r=10, seed=8, effect=1.0)
    train, test = np.arange(16), np.arange(16, 24)
    pipe = fc_classifier(kind="correlation", classifier=classifier, C=0.5)
    pipe.fit([xs[i] for i in train], y[train])
    cm = ConnectivityMeasure(kind="correlation", vectorize=True, discard_diagonal=True)
    Ftr = cm.fit_transform([xs[i] for i in train])
    Fte = cm.transform([xs[i] for i in test])
    sc = StandardScaler().fit(Ftr)
    clf = (LogisticRegression(C=0.5, max_iter=2000) if classifier == "logreg" else LinearSVC(C=0.5, random_state=0))
    clf.fit(sc.transform(Ftr), y[train])
    ref = clf.decision_function(sc.transform(Fte))
    got = pipe.decision_function([xs[i] for i in test])
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=_atol(ref))
    np.testing.assert_array_equal(pipe.predict([xs[i] for i in test]), clf.predict(sc.transform(Fte)))


@pytest.mark.parametrize("kind", ["correlation", "partial correlation", "tangent"])
def test_connectivity_features_equal_nilearn(kind):
    from nilearn.connectome import ConnectivityMeasure

    xs, _ = _series(n=10, r=8, seed=9)
    cf = ConnectivityFeatures(kind=kind).fit(xs[:6])
    cm = ConnectivityMeasure(kind=kind, vectorize=True, discard_diagonal=True).fit(xs[:6])
    np.testing.assert_allclose(cf.transform(xs[6:]), cm.transform(xs[6:]), rtol=1e-10, atol=1e-12)
    assert cf.transform(xs).shape == (10, 28)
    assert len(cf.get_feature_names_out()) == 28
    if kind == "tangent":  # the group mean depends on the fitting subjects
        other = ConnectivityFeatures(kind=kind).fit(xs[2:8])
        assert not np.allclose(other.transform(xs[8:]), cf.transform(xs[8:]))
    with pytest.raises(ConfigError, match="kind"):
        ConnectivityFeatures(kind="covariances").fit(xs)


def test_registry_and_make_baseline():
    assert {"dey_pca_lda", "fc_logreg", "fc_svm"} <= set(BASELINES.list())
    p = make_baseline("fc_svm", kind="partial correlation", C=0.1)
    assert isinstance(p.named_steps["clf"], LinearSVC) and p.named_steps["features"].kind == "partial correlation"
    assert isinstance(make_baseline("fc_logreg").named_steps["clf"], LogisticRegression)
    p = make_baseline("dey_pca_lda", density=0.05, select_k=10)
    assert list(p.named_steps) == ["features", "scale", "select", "pca", "clf"]
    clone(p)
    with pytest.raises(ConfigError, match="Did you mean 'dey_pca_lda'"):
        make_baseline("dey_pca_lad")
    with pytest.raises(ConfigError, match="Did you mean 'density'"):
        make_baseline("dey_pca_lda", desnity=0.1)


def test_network_pca_ridge_fits():
    xs, _ = _series(n=20, r=10)
    age = np.linspace(8, 20, 20)
    p = make_baseline("dey_pca_ridge", density=0.2, alpha=10.0).fit(xs, age)
    assert p.predict(xs).shape == (20,)


def test_mean_logreg_equals_a_hand_built_pipeline():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from brainenc.pretraining.baselines import make_baseline

    rng = np.random.default_rng(3)
    X = [rng.standard_normal((int(rng.integers(6, 12)), 7)).astype(np.float32) + (i % 2) * 0.5 for i in range(30)]
    y = np.arange(30) % 2
    ours = make_baseline("mean_logreg").fit(X[:20], y[:20])
    means = np.stack([x.mean(0) for x in X])
    sc = StandardScaler().fit(means[:20])
    ref = LogisticRegression(max_iter=2000).fit(sc.transform(means[:20]), y[:20])
    np.testing.assert_allclose(ours.predict_proba(X[20:]), ref.predict_proba(sc.transform(means[20:])),
                               rtol=1e-5, atol=1e-6)
