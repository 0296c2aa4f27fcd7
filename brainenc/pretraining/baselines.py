"""Classical connectome baselines for subject classification (scikit-learn pipelines).

* :func:`network_pca_lda` — Dey, Rao & Shah 2012 ("Exploiting the brain's network structure in
  identifying ADHD subjects"): per-subject binarised functional network (proportional or absolute
  threshold on Pearson r), node features (degree, 3-cycle participation = triangles, clustering),
  optionally the upper-triangle FC ("traditional" features), a feature mask learned inside the
  fold (``SelectKBest``), PCA and linear discriminant analysis.
* :func:`fc_classifier` — vectorised connectivity (correlation / partial correlation / tangent,
  nilearn's :class:`~nilearn.connectome.ConnectivityMeasure`) -> standardise -> logistic regression
  or linear SVM.

Every data-dependent step (the tangent space's group mean, the scaler, the feature mask, PCA) is a
:class:`~sklearn.pipeline.Pipeline` step, so it is fitted on the training rows of a fold only when
the pipeline is cross-validated (:func:`brainenc.pretraining.evaluation.cross_validate` or
:func:`sklearn.model_selection.cross_validate`). Inputs ``X`` are lists of subject time series
(``[n_timepoints_i, n_rois]`` each, e.g. :attr:`brainenc.datasets.Cohort.series`); scikit-learn's
indexing slices lists, so cross-validation works on them unchanged.

No torch here (the package ``__init__`` imports torch for BrainMAE; this module does not).
"""
from __future__ import annotations

import functools
import inspect
import numbers
from typing import Callable, Sequence

import numpy as np
from scipy import sparse as sp
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from brainenc._utils.validation import check_option
from brainenc.exceptions import ConfigError, DataFormatError
from brainenc.registry import Registry

__all__ = [
    "MeanActivity",
    "mean_classifier",
    "correlation_matrices",
    "threshold_networks",
    "node_features",
    "NetworkFeatures",
    "ConnectivityFeatures",
    "AdaptivePCA",
    "network_pca_lda",
    "network_pca_ridge",
    "fc_classifier",
    "BASELINES",
    "make_baseline",
]

NODE_FEATURES = ("degree", "triangles", "clustering")
FC_KINDS = ("correlation", "partial correlation", "tangent")
CLASSIFIERS = ("lda", "logreg", "svm")
_MAX_CHUNK = 64  # subjects per vectorised block ...
_CHUNK_BYTES = 256 << 20  # ... bounded so a float64 [chunk, R, R] temporary stays under ~256 MiB


def _chunk(n_rois: int) -> int:
    return int(max(1, min(_MAX_CHUNK, _CHUNK_BYTES // (8 * n_rois * n_rois))))


# ------------------------------------------------------------------------------------ inputs


def _check_series(series, name: str = "X") -> list[np.ndarray]:
    """A list of 2-D [T_i, R] arrays with the same R (a 3-D array is split along axis 0)."""
    if isinstance(series, np.ndarray) and series.ndim == 3:
        series = list(series)
    if isinstance(series, np.ndarray) and series.ndim == 2:
        raise DataFormatError(f"'{name}' must be a list of [n_timepoints, n_rois] arrays (one per subject); "
                              f"got one 2-D array of shape {series.shape}")
    try:
        out = [np.asarray(s) for s in series]
    except TypeError:
        raise DataFormatError(f"'{name}' must be a list of [n_timepoints, n_rois] arrays; got {type(series).__name__}") from None
    if not out:
        raise DataFormatError(f"'{name}' holds no subjects")
    r = None
    for i, s in enumerate(out):
        if s.ndim != 2:
            raise DataFormatError(f"'{name}'[{i}] must be 2-D [n_timepoints, n_rois]; got shape {s.shape}")
        if s.shape[0] < 2:
            raise DataFormatError(f"'{name}'[{i}] has {s.shape[0]} time points; need at least 2")
        if r is None:
            r = s.shape[1]
        elif s.shape[1] != r:
            raise DataFormatError(f"'{name}'[{i}] has {s.shape[1]} ROIs; subject 0 has {r}")
    if r < 3:
        raise DataFormatError(f"'{name}' has {r} ROIs; need at least 3")
    return out


def _check_fc(fc, name: str = "X") -> np.ndarray:
    arr = np.asarray(fc) if not isinstance(fc, list) else np.stack([np.asarray(a) for a in fc])
    if arr.ndim != 3 or arr.shape[1] != arr.shape[2]:
        raise DataFormatError(f"'{name}' must be correlation matrices [n_subjects, n_rois, n_rois]; got shape {arr.shape}")
    if arr.shape[1] < 3:
        raise DataFormatError(f"'{name}' has {arr.shape[1]} ROIs; need at least 3")
    return arr


def correlation_matrices(series, *, fisher: bool = False) -> np.ndarray:
    """Pearson correlation matrix of every subject's ROI time series.

    Parameters
    ----------
    series : list of ndarray [n_timepoints_i, n_rois]
        One array per subject (lengths may differ; subjects of equal length are computed as one
        batched matrix product).
    fisher : bool, default False
        Return Fisher z = arctanh(r) (off-diagonal clipped to ``|r| <= 1 - 1e-7``; diagonal 0).

    Returns
    -------
    ndarray float32 [n_subjects, n_rois, n_rois]
        Symmetric, unit diagonal (0 with ``fisher``). A constant ROI correlates 0 with everything.
    """
    xs = _check_series(series, "series")
    n, r = len(xs), xs[0].shape[1]
    out = np.empty((n, r, r), dtype=np.float32)
    by_len: dict[int, list[int]] = {}
    for i, s in enumerate(xs):
        by_len.setdefault(s.shape[0], []).append(i)
    step = _chunk(r)
    for idx in by_len.values():
        for a in range(0, len(idx), step):
            block = idx[a:a + step]
            x = np.stack([xs[i] for i in block]).astype(np.float64)          # [b, T, R]
            x -= x.mean(1, keepdims=True)
            sd = np.sqrt((x * x).sum(1, keepdims=True))
            x /= np.where(sd > 0, sd, 1.0)
            c = np.matmul(x.transpose(0, 2, 1), x)                          # [b, R, R]
            np.clip(c, -1.0, 1.0, out=c)
            diag = np.arange(r)
            c[:, diag, diag] = 1.0
            out[block] = c
    if fisher:
        np.clip(out, -1 + 1e-7, 1 - 1e-7, out=out)
        np.arctanh(out, out=out)
        out[:, np.arange(r), np.arange(r)] = 0.0
    return out


# ------------------------------------------------------------------------------ thresholding


def threshold_networks(fc, *, threshold: str = "proportional", density: float = 0.1, r0: float = 0.3,
                       absolute_values: bool = False) -> np.ndarray:
    """Binarise connectivity matrices into undirected graphs (no self-loops).

    Parameters
    ----------
    fc : ndarray [n_subjects, n_rois, n_rois]
        Symmetric connectivity (Pearson r).
    threshold : {"proportional", "absolute"}
        "proportional": keep each subject's ``round(density * R(R-1)/2)`` strongest edges (ties
        broken by position; exactly that many edges). "absolute": keep edges with weight > ``r0``.
    density, r0 : float
    absolute_values : bool, default False
        Rank / threshold ``|r|`` instead of ``r`` (anti-correlations become edges too).

    Returns
    -------
    ndarray bool [n_subjects, n_rois, n_rois]
        Symmetric adjacency with a False diagonal.
    """
    fc = _check_fc(fc, "fc")
    check_option("threshold", threshold, ("proportional", "absolute"))
    n, r, _ = fc.shape
    iu, ju = np.triu_indices(r, 1)
    e = iu.size
    out = np.zeros((n, r, r), dtype=bool)
    if threshold == "proportional":
        k = int(round(float(density) * e))
        k = min(max(k, 0), e)
    step = _chunk(r)
    for a in range(0, n, step):
        w = fc[a:a + step][:, iu, ju]
        if absolute_values:
            w = np.abs(w)
        w = np.nan_to_num(w, nan=-np.inf)
        if threshold == "absolute":
            keep = w > r0
        else:
            keep = np.zeros(w.shape, dtype=bool)
            if k == e:
                keep[:] = True
            elif k > 0:
                top = np.argpartition(w, e - k, axis=1)[:, e - k:]
                np.put_along_axis(keep, top, True, axis=1)
        blk = out[a:a + step]
        blk[:, iu, ju] = keep
        blk[:, ju, iu] = keep
    return out


def _triangles_dense(adj: np.ndarray) -> np.ndarray:
    """diag(A^3) / 2 per node, batched dense: rowsum((A @ A) * A) / 2 ([b, R, R] -> [b, R])."""
    a = adj.astype(np.float32)  # (A @ A) entries <= R are exact in float32; the row sums accumulate in float64
    return (np.matmul(a, a) * a).sum(2, dtype=np.float64) / 2.0


def _triangles_sparse(adj: np.ndarray) -> np.ndarray:
    """diag(A^3) / 2 per node with scipy.sparse: ((A @ A) .* A) row sums / 2, no dense R^3 product."""
    out = np.empty(adj.shape[:2], dtype=np.float64)
    for i, a in enumerate(adj):
        m = sp.csr_matrix(a, dtype=np.float64)
        out[i] = np.asarray((m @ m).multiply(m).sum(1)).ravel() / 2.0
    return out


def node_features(adj, *, features: Sequence[str] = NODE_FEATURES, sparse: bool | str = "auto") -> dict[str, np.ndarray]:
    """Per-node graph features of binary undirected graphs.

    Parameters
    ----------
    adj : ndarray bool [n_subjects, n_rois, n_rois]
        Symmetric adjacency without self-loops (e.g. from :func:`threshold_networks`).
    features : sequence of {"degree", "triangles", "clustering"}
        "degree": number of neighbours; "triangles": 3-cycles through the node, diag(A^3)/2;
        "clustering": local clustering coefficient 2 T / (k (k - 1)) (0 when k < 2, as networkx).
    sparse : bool or "auto"
        Count triangles with scipy.sparse products (``auto``: when n_rois > 500).

    Returns
    -------
    dict of str -> ndarray float64 [n_subjects, n_rois]
    """
    adj = np.asarray(adj)
    if adj.ndim != 3 or adj.shape[1] != adj.shape[2]:
        raise DataFormatError(f"'adj' must be [n_subjects, n_rois, n_rois]; got shape {adj.shape}")
    adj = adj.astype(bool, copy=False)
    feats = list(features)
    for f in feats:
        check_option("features", f, NODE_FEATURES)
    use_sparse = (adj.shape[1] > 500) if sparse == "auto" else bool(sparse)
    out: dict[str, np.ndarray] = {}
    deg = adj.sum(2).astype(np.float64)
    tri = None
    if "triangles" in feats or "clustering" in feats:
        tri = np.empty(adj.shape[:2], dtype=np.float64)
        step = _chunk(adj.shape[1])
        for a in range(0, adj.shape[0], step):
            blk = adj[a:a + step]
            tri[a:a + step] = _triangles_sparse(blk) if use_sparse else _triangles_dense(blk)
    for f in feats:
        if f == "degree":
            out[f] = deg
        elif f == "triangles":
            out[f] = tri
        else:
            den = deg * (deg - 1.0)
            out[f] = np.divide(2.0 * tri, den, out=np.zeros_like(tri), where=den > 0)
    return out


# ------------------------------------------------------------------------------ transformers


class NetworkFeatures(TransformerMixin, BaseEstimator):
    """Graph features of each subject's binarised functional network (Dey et al. 2012).

    Per subject: Pearson correlation of the ROI (or voxel) time series, a binary graph by a
    proportional (top ``density`` fraction of edges) or absolute (r > ``r0``) threshold, then per
    node the degree, the number of triangles (3-cycles, the best feature in Dey et al.) and the
    clustering coefficient; optionally the upper-triangle FC itself.

    The transform is per subject (nothing is learned from the group), so fitting only records the
    number of ROIs; the learned steps of a baseline follow it in the pipeline.

    Parameters
    ----------
    threshold : {"proportional", "absolute"}, default "proportional"
    density : float in (0, 1], default 0.1
        Fraction of the R(R-1)/2 edges kept per subject (proportional threshold), ranked by r.
    r0 : float, default 0.3
        Edge if r > r0 (absolute threshold).
    features : tuple of {"degree", "triangles", "clustering"}, default all three
        Node features, concatenated per kind (all nodes of the first kind, then the next).
    include_fc : bool, default False
        Append the upper-triangle FC (r values, row-major ``i < j``): the "traditional" features.
    sparse : bool or "auto", default "auto"
        Count triangles with scipy.sparse (``((A @ A) .* A)`` row sums; no dense R^3 product);
        "auto" = when n_rois > 500.
    absolute_values : bool, default False
        Threshold ``|r|`` instead of ``r``.
    input : {"series", "fc"}, default "series"
        "fc": ``X`` is already correlation matrices [n_subjects, R, R].

    Attributes
    ----------
    n_rois_ : int
    n_features_out_ : int
    feature_kinds_ : list of str

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> X = [rng.standard_normal((50, 20)).astype(np.float32) for _ in range(4)]
    >>> NetworkFeatures(density=0.2).fit_transform(X).shape
    (4, 60)
    """

    def __init__(self, threshold: str = "proportional", density: float = 0.1, r0: float = 0.3,
                 features: Sequence[str] = NODE_FEATURES, include_fc: bool = False,
                 sparse: bool | str = "auto", absolute_values: bool = False, input: str = "series"):
        self.threshold = threshold
        self.density = density
        self.r0 = r0
        self.features = features
        self.include_fc = include_fc
        self.sparse = sparse
        self.absolute_values = absolute_values
        self.input = input

    def _check_params(self) -> None:
        check_option("threshold", self.threshold, ("proportional", "absolute"))
        check_option("input", self.input, ("series", "fc"))
        if self.sparse not in ("auto", True, False):
            raise ConfigError(f"'sparse' must be True, False or 'auto'; {self.sparse!r} was provided")
        if self.threshold == "proportional":
            if not isinstance(self.density, numbers.Real) or not 0.0 < float(self.density) <= 1.0:
                raise ConfigError(f"'density' must be a fraction in (0, 1]; {self.density!r} was provided")
        elif not isinstance(self.r0, numbers.Real) or not -1.0 <= float(self.r0) < 1.0:
            raise ConfigError(f"'r0' must be a correlation in [-1, 1); {self.r0!r} was provided")
        feats = [self.features] if isinstance(self.features, str) else list(self.features)
        for f in feats:
            check_option("features", f, NODE_FEATURES)
        if len(set(feats)) != len(feats):
            raise ConfigError(f"'features' lists a kind twice: {tuple(feats)!r}")
        if not feats and not self.include_fc:
            raise ConfigError("'features' is empty and 'include_fc' is False: no features to compute")

    def _fc(self, X) -> np.ndarray:
        if self.input == "fc":
            return _check_fc(X).astype(np.float32, copy=False)
        return correlation_matrices(X)

    def _n_rois(self, X) -> int:
        if self.input == "fc":
            return _check_fc(X).shape[1]
        return _check_series(X)[0].shape[1]

    def fit(self, X, y=None):
        """Validate the parameters and record the number of ROIs."""
        self._check_params()
        self.n_rois_ = self._n_rois(X)
        self.feature_kinds_ = [self.features] if isinstance(self.features, str) else list(self.features)
        r = self.n_rois_
        self.n_features_out_ = len(self.feature_kinds_) * r + (r * (r - 1) // 2 if self.include_fc else 0)
        return self

    def transform(self, X) -> np.ndarray:
        """Features of every subject: float32 ``[n_subjects, n_features_out_]``."""
        check_is_fitted(self, "n_rois_")
        r = self.n_rois_
        n = len(X)
        out = np.empty((n, self.n_features_out_), dtype=np.float32)
        iu, ju = np.triu_indices(r, 1)
        step = _chunk(r)
        for a in range(0, n, step):
            fc = self._fc(X[a:a + step])
            if fc.shape[1] != r:
                raise DataFormatError(f"'X' has {fc.shape[1]} ROIs; the transformer was fitted on {r}")
            b = fc.shape[0]
            col = 0
            if self.feature_kinds_:
                adj = threshold_networks(fc, threshold=self.threshold, density=self.density, r0=self.r0,
                                         absolute_values=self.absolute_values)
                feats = node_features(adj, features=self.feature_kinds_, sparse=self.sparse)
                for kind in self.feature_kinds_:
                    out[a:a + b, col:col + r] = feats[kind]
                    col += r
            if self.include_fc:
                out[a:a + b, col:] = fc[:, iu, ju]
        return out

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        """``<kind>_<node>`` for node features, then ``fc_<i>_<j>``."""
        check_is_fitted(self, "n_rois_")
        names = [f"{kind}_{i}" for kind in self.feature_kinds_ for i in range(self.n_rois_)]
        if self.include_fc:
            iu, ju = np.triu_indices(self.n_rois_, 1)
            names += [f"fc_{i}_{j}" for i, j in zip(iu.tolist(), ju.tolist())]
        return np.asarray(names, dtype=object)


class ConnectivityFeatures(TransformerMixin, BaseEstimator):
    """Vectorised subject connectivity (nilearn ``ConnectivityMeasure``) as a pipeline step.

    Wraps nilearn's ``ConnectivityMeasure`` with ``vectorize=True,
    discard_diagonal=True``. The "tangent" kind estimates a group mean covariance in ``fit``, which
    is why this is a transformer: inside a pipeline, that mean comes from the training fold only.

    Parameters
    ----------
    kind : {"correlation", "partial correlation", "tangent"}, default "correlation"
    cov_estimator : sklearn covariance estimator, optional
        Default (None): nilearn's ``LedoitWolf(store_precision=False)``.
    standardize : bool, default True
        Passed to ``ConnectivityMeasure`` (z-score each ROI's time series).

    Attributes
    ----------
    measure_ : nilearn.connectome.ConnectivityMeasure
        The fitted measure.
    n_rois_ : int
    """

    def __init__(self, kind: str = "correlation", cov_estimator=None, standardize: bool = True):
        self.kind = kind
        self.cov_estimator = cov_estimator
        self.standardize = standardize

    def _measure(self):
        from nilearn.connectome import ConnectivityMeasure

        return ConnectivityMeasure(cov_estimator=self.cov_estimator, kind=self.kind, vectorize=True,
                                   discard_diagonal=True, standardize=self.standardize)

    def fit(self, X, y=None):
        """Fit the connectivity measure (the group mean for "tangent") on these subjects."""
        check_option("kind", self.kind, FC_KINDS)
        xs = _check_series(X)
        self.n_rois_ = xs[0].shape[1]
        self.measure_ = self._measure().fit(xs)
        return self

    def transform(self, X) -> np.ndarray:
        """Upper-triangle connectivity per subject [n_subjects, R(R-1)/2]."""
        check_is_fitted(self, "measure_")
        xs = _check_series(X)
        if xs[0].shape[1] != self.n_rois_:
            raise DataFormatError(f"'X' has {xs[0].shape[1]} ROIs; the transformer was fitted on {self.n_rois_}")
        return self.measure_.transform(xs)

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        check_is_fitted(self, "n_rois_")
        iu, ju = np.triu_indices(self.n_rois_, 1)
        return np.asarray([f"{self.kind.replace(' ', '_')}_{i}_{j}" for i, j in zip(iu.tolist(), ju.tolist())],
                          dtype=object)


class AdaptivePCA(TransformerMixin, BaseEstimator):
    """PCA whose number of components is chosen from the training data at ``fit``.

    Parameters
    ----------
    n_components : int or None, default None
        None: ``min(n_train - 1, n_features, max_components)``. An int larger than
        ``min(n_train, n_features)`` is clipped to it.
    max_components : int, default 50
    svd_solver : str, default "auto"
    random_state : int, default 0

    Attributes
    ----------
    pca_ : sklearn.decomposition.PCA
    n_components_ : int
    """

    def __init__(self, n_components: int | None = None, max_components: int = 50, svd_solver: str = "auto",
                 random_state: int | None = 0):
        self.n_components = n_components
        self.max_components = max_components
        self.svd_solver = svd_solver
        self.random_state = random_state

    def fit(self, X, y=None):
        from sklearn.decomposition import PCA

        X = np.asarray(X)
        if X.ndim != 2:
            raise DataFormatError(f"'X' must be 2-D [n_samples, n_features]; got shape {X.shape}")
        n, p = X.shape
        if self.n_components is None:
            if not isinstance(self.max_components, numbers.Integral) or self.max_components < 1:
                raise ConfigError(f"'max_components' must be a positive int; {self.max_components!r} was provided")
            k = min(n - 1, p, int(self.max_components))
        else:
            if not isinstance(self.n_components, numbers.Integral) or self.n_components < 1:
                raise ConfigError(f"'n_components' must be a positive int or None; {self.n_components!r} was provided")
            k = min(int(self.n_components), n, p)
        k = max(k, 1)
        self.pca_ = PCA(n_components=k, svd_solver=self.svd_solver, random_state=self.random_state).fit(X)
        self.n_components_ = k
        self.n_features_in_ = p
        return self

    def transform(self, X):
        check_is_fitted(self, "pca_")
        return self.pca_.transform(X)

    def get_feature_names_out(self, input_features=None):
        check_is_fitted(self, "pca_")
        return np.asarray([f"pca{i}" for i in range(self.n_components_)], dtype=object)


# ------------------------------------------------------------------------------ pipelines


def _classifier(name: str, C: float = 1.0):
    check_option("classifier", name, CLASSIFIERS)
    if name == "lda":
        from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

        return LinearDiscriminantAnalysis()
    if name == "logreg":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=C, max_iter=2000)
    from sklearn.svm import LinearSVC

    return LinearSVC(C=C, random_state=0)


def _check_select_k(select_k):
    if select_k is None or select_k == "all":
        return select_k
    if not isinstance(select_k, numbers.Integral) or isinstance(select_k, bool) or select_k < 1:
        raise ConfigError(f"'select_k' must be None, 'all' or a positive int; {select_k!r} was provided")
    return int(select_k)


def _network_steps(threshold, density, r0, features, include_fc, select_k, n_components, sparse, score_func):
    from sklearn.feature_selection import SelectKBest
    from sklearn.preprocessing import StandardScaler

    feats = NetworkFeatures(threshold=threshold, density=density, r0=r0, features=tuple(features),
                            include_fc=include_fc, sparse=sparse)
    feats._check_params()  # fail at construction, not in the first fold
    steps = [("features", feats), ("scale", StandardScaler())]
    select_k = _check_select_k(select_k)
    if select_k is not None:
        steps.append(("select", SelectKBest(score_func, k=select_k)))
    if n_components is not None and (not isinstance(n_components, numbers.Integral) or n_components < 1):
        raise ConfigError(f"'n_components' must be a positive int or None; {n_components!r} was provided")
    steps.append(("pca", AdaptivePCA(n_components=n_components)))
    return steps


def network_pca_lda(*, threshold: str = "proportional", density: float = 0.1, r0: float = 0.3,
                    features: Sequence[str] = NODE_FEATURES, include_fc: bool = False,
                    select_k: int | str | None = None, n_components: int | None = None,
                    classifier: str = "lda", C: float = 1.0, sparse: bool | str = "auto"):
    """Dey, Rao & Shah 2012 network baseline: graph features -> scale -> mask -> PCA -> LDA.

    Parameters
    ----------
    threshold, density, r0, features, include_fc, sparse
        See :class:`NetworkFeatures`.
    select_k : int, "all" or None, default None
        Learned feature mask: ``SelectKBest(f_classif, k=select_k)`` on the standardised features
        (fitted on the training fold only). None: no selection step.
    n_components : int or None, default None
        PCA components; None: ``min(n_train - 1, n_features, 50)`` at fit (:class:`AdaptivePCA`).
    classifier : {"lda", "logreg", "svm"}, default "lda"
        ``LinearDiscriminantAnalysis()``, ``LogisticRegression(C, max_iter=2000)`` or
        ``LinearSVC(C, random_state=0)``.
    C : float, default 1.0
        Inverse regularisation of "logreg" / "svm".

    Returns
    -------
    sklearn.pipeline.Pipeline
        Steps ``features``, ``scale``, [``select``], ``pca``, ``clf``.
    """
    from sklearn.feature_selection import f_classif
    from sklearn.pipeline import Pipeline

    steps = _network_steps(threshold, density, r0, features, include_fc, select_k, n_components, sparse, f_classif)
    steps.append(("clf", _classifier(classifier, C)))
    return Pipeline(steps)


def network_pca_ridge(*, threshold: str = "proportional", density: float = 0.1, r0: float = 0.3,
                      features: Sequence[str] = NODE_FEATURES, include_fc: bool = False,
                      select_k: int | str | None = None, n_components: int | None = None,
                      alpha: float = 1.0, sparse: bool | str = "auto"):
    """Regression variant of :func:`network_pca_lda` (e.g. age): ... -> PCA -> Ridge(alpha).

    The feature mask (``select_k``) uses ``f_regression``.
    """
    from sklearn.feature_selection import f_regression
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline

    if not isinstance(alpha, numbers.Real) or alpha < 0:
        raise ConfigError(f"'alpha' must be a non-negative number; {alpha!r} was provided")
    steps = _network_steps(threshold, density, r0, features, include_fc, select_k, n_components, sparse, f_regression)
    steps.append(("clf", Ridge(alpha=alpha)))
    return Pipeline(steps)


def fc_classifier(kind: str = "correlation", classifier: str = "logreg", C: float = 1.0, cov_estimator=None):
    """Connectivity classifier: ConnectivityFeatures(kind) -> StandardScaler -> LogReg / LinearSVC.

    Parameters
    ----------
    kind : {"correlation", "partial correlation", "tangent"}, default "correlation"
    classifier : {"logreg", "svm"}, default "logreg"
        ``LogisticRegression(C, max_iter=2000)`` or ``LinearSVC(C, random_state=0)`` (AUROC from
        its decision function).
    C : float, default 1.0
    cov_estimator : sklearn covariance estimator, optional
        Default: nilearn's LedoitWolf.

    Returns
    -------
    sklearn.pipeline.Pipeline
        Steps ``features``, ``scale``, ``clf``.
    """
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    check_option("kind", kind, FC_KINDS)
    check_option("classifier", classifier, ("logreg", "svm"))
    if not isinstance(C, numbers.Real) or C <= 0:
        raise ConfigError(f"'C' must be a positive number; {C!r} was provided")
    return Pipeline([("features", ConnectivityFeatures(kind=kind, cov_estimator=cov_estimator)),
                     ("scale", StandardScaler()),
                     ("clf", _classifier(classifier, C))])


class MeanActivity(TransformerMixin, BaseEstimator):
    """Each sample's time-averaged ROI pattern (float32 [N, R]): the standard MVPA feature of a block.

    Stateless (``fit`` only records the ROI count), so it is the same inside or outside a fold.
    """

    def fit(self, X, y=None):
        self.n_rois_ = _check_series(X)[0].shape[1]
        return self

    def transform(self, X):
        series = _check_series(X)
        if series[0].shape[1] != getattr(self, "n_rois_", series[0].shape[1]):
            raise DataFormatError(f"X has {series[0].shape[1]} ROIs; the transformer was fitted on {self.n_rois_}")
        return np.stack([s.mean(0) for s in series]).astype(np.float32)


def mean_classifier(classifier: str = "logreg", C: float = 1.0):
    """Block-mean activity pattern -> StandardScaler -> LogReg / LinearSVC (the MVPA reference).

    Not a network measure: it tells whether a model of the time series beats simply averaging it.
    """
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    check_option("classifier", classifier, ("logreg", "svm"))
    if not isinstance(C, numbers.Real) or C <= 0:
        raise ConfigError(f"'C' must be a positive number; {C!r} was provided")
    return Pipeline([("features", MeanActivity()), ("scale", StandardScaler()), ("clf", _classifier(classifier, C))])


# ------------------------------------------------------------------------------ registry


BASELINES = Registry("baseline")
BASELINES.register("dey_pca_lda", network_pca_lda, task="classification",
                   description="Dey et al. 2012: network degree/triangles/clustering -> PCA -> LDA")
BASELINES.register("dey_pca_ridge", network_pca_ridge, task="regression",
                   description="network features -> PCA -> ridge regression")
BASELINES.register("fc_logreg", functools.partial(fc_classifier, classifier="logreg"), task="classification",
                   description="vectorised connectivity -> standardise -> logistic regression")
BASELINES.register("fc_svm", functools.partial(fc_classifier, classifier="svm"), task="classification",
                   description="vectorised connectivity -> standardise -> linear SVM")
BASELINES.register("mean_logreg", mean_classifier, task="classification",
                   description="time-averaged ROI pattern -> standardise -> logistic regression (MVPA)")


def make_baseline(name: str, **params):
    """Build the registered baseline pipeline ``name`` with ``params`` (keyword arguments of its factory).

    >>> make_baseline("fc_logreg", kind="tangent").named_steps["features"].kind
    'tangent'
    """
    import difflib

    factory: Callable = BASELINES.get(name)
    accepted = [p for p in inspect.signature(factory).parameters]
    for key in params:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"baseline {name!r} has no parameter {key!r}.{hint} Known: {', '.join(accepted)}")
    return factory(**params)
