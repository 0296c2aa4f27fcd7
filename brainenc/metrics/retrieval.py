"""Retrieval scores of decoded image features (Brain-IT, MindEye2): predicted feature rows against the
true feature rows of the same images, in the same order.

Pure numpy functions (no torch). Conventions, shared by every function below:

* ``S[i, j] = sim(pred_i, true_j)`` on the flattened rows (any trailing shape ``[n, ...]``); ``kind`` is
  ``"pearson"`` (correlation of the flattened values, as MindEye2's ``np.corrcoef``) or ``"cosine"``
  (no centring). Rows of zero variance (pearson) or zero norm (cosine) give NaN similarities.
* **brain -> image** retrieval asks, for prediction ``i`` (a row of ``S``), which true image it is most
  similar to; **image -> brain** asks, for true image ``j`` (a column), which prediction is most similar.
* Comparisons are strict and NaN fails: the true match must be *strictly* more similar than a distractor
  (a tie is a failure), exactly as :func:`brainenc.metrics.two_way_identification` (``metrics/reconstruction.py``).

:func:`similarity_matrix` works in blocks of feature columns, so its working memory beyond the inputs and
the ``[n, n]`` result is bounded by ``max_bytes`` (default 256 MiB) for any feature size; float16 memmaps
are read block by block and converted to float64 per block (pearson reads each input twice: row means,
then centred products; cosine once). ``n = 1000`` rows of ``256 x 1664`` tokens are ~850 GFLOP of float64
products: tens of seconds on a few cores.
"""
from __future__ import annotations

import numpy as np

from brainenc._utils.validation import check_option
from brainenc.exceptions import ConfigError, DataFormatError

__all__ = ["similarity_matrix", "top1_retrieval", "two_way_identification", "feature_retrieval", "KINDS",
           "DIRECTIONS"]

KINDS = ("pearson", "cosine")
DIRECTIONS = ("brain_to_image", "image_to_brain")

#: default bound on the working memory of :func:`similarity_matrix` (two float64 blocks + one n x n product)
DEFAULT_MAX_BYTES = 256 * 2**20


def _rows(name: str, x) -> np.ndarray:
    a = x if isinstance(x, np.ndarray) else np.asarray(x)
    if a.dtype.kind not in "fiub":
        raise DataFormatError(f"'{name}' must be a numeric array; got dtype {a.dtype}")
    return a


def _pair(pred, true) -> tuple[np.ndarray, np.ndarray]:
    p = _rows("pred", pred)
    t = _rows("true", true)
    if p.shape != t.shape:
        raise DataFormatError(f"'pred' and 'true' must have the same shape [n, ...]; got pred {p.shape} and "
                              f"true {t.shape}")
    if p.ndim < 2:
        raise DataFormatError(f"'pred' and 'true' must be [n, ...] with at least one feature axis; got shape {p.shape}")
    if p.shape[0] < 1 or p[0].size < 1:
        raise DataFormatError(f"'pred' and 'true' hold no rows or no features; got shape {p.shape}")
    n = p.shape[0]
    # a view for C-contiguous inputs (memmaps included); a copy only for non-contiguous ones
    return p.reshape(n, -1), t.reshape(n, -1)


def _block_size(n: int, n_features: int, chunk_features: int | None, max_bytes: int) -> int:
    if chunk_features is not None:
        if isinstance(chunk_features, bool) or not isinstance(chunk_features, (int, np.integer)) or chunk_features < 1:
            raise ConfigError(f"'chunk_features' must be a positive integer or None; {chunk_features!r} was provided")
        return int(min(chunk_features, n_features))
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)) or max_bytes < 1:
        raise ConfigError(f"'max_bytes' must be a positive integer; {max_bytes!r} was provided")
    # three quarters for the two float64 blocks [n, b] (pred, true); the rest for the product tiles
    return int(max(1, min(n_features, (3 * int(max_bytes) // 4) // (16 * n))))


def _tile_rows(n: int, max_bytes: int) -> int:
    """Rows per tile of the block product, so that one tile [r, n] float64 uses a quarter of the budget."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)) or max_bytes < 1:
        raise ConfigError(f"'max_bytes' must be a positive integer; {max_bytes!r} was provided")
    return int(max(1, min(n, (int(max_bytes) // 4) // (8 * n))))


def similarity_matrix(pred, true, kind: str = "pearson", *, chunk_features: int | None = None,
                      max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """``S[i, j] = sim(pred_i, true_j)`` for every prediction row ``i`` and true row ``j``.

    Parameters
    ----------
    pred, true : arrays [n, ...] of the same shape
        Row ``i`` of both belongs to image ``i``; trailing axes are flattened. Any numeric dtype, including
        float16 ``np.memmap`` (read block by block, never converted whole).
    kind : {"pearson", "cosine"}
        Pearson correlation of the flattened rows (as ``scipy.stats.pearsonr`` / ``np.corrcoef``) or cosine
        similarity (no centring).
    chunk_features : int, optional
        Feature columns per block (default: as many as ``max_bytes`` allows).
    max_bytes : int
        Bound on the working memory beyond the inputs and the result: three quarters for the two float64
        blocks ``[n, b]``, one quarter for a tile ``[r, n]`` of their product (``chunk_features``, when
        given, overrides the block width but not the tiles).

    Returns
    -------
    float64 ndarray [n, n], clipped to [-1, 1]; NaN where a row has zero variance (pearson) / zero norm
    (cosine) or holds NaN.
    """
    kind = check_option("kind", kind, KINDS)
    p, t = _pair(pred, true)
    n, f = p.shape
    b = _block_size(n, f, chunk_features, max_bytes)
    r = _tile_rows(n, max_bytes)
    blocks = [(a, min(a + b, f)) for a in range(0, f, b)]
    if kind == "pearson":
        mp = np.zeros(n)
        mt = np.zeros(n)
        for a, e in blocks:
            mp += np.sum(p[:, a:e], axis=1, dtype=np.float64)
            mt += np.sum(t[:, a:e], axis=1, dtype=np.float64)
        mp /= f
        mt /= f
    S = np.zeros((n, n))
    sp = np.zeros(n)
    st = np.zeros(n)
    for a, e in blocks:
        pb = np.array(p[:, a:e], dtype=np.float64)
        tb = np.array(t[:, a:e], dtype=np.float64)
        if kind == "pearson":
            pb -= mp[:, None]
            tb -= mt[:, None]
        sp += np.einsum("ij,ij->i", pb, pb)
        st += np.einsum("ij,ij->i", tb, tb)
        for i in range(0, n, r):
            S[i:i + r] += pb[i:i + r] @ tb.T
        del pb, tb
    with np.errstate(invalid="ignore", divide="ignore"):
        S /= np.sqrt(sp)[:, None]
        S /= np.sqrt(st)[None, :]
    np.clip(S, -1.0, 1.0, out=S)  # NaN stays NaN
    return S


def _square(S) -> np.ndarray:
    s = np.asarray(S, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise DataFormatError(f"'S' must be a square similarity matrix [n, n]; got shape {s.shape}")
    if s.shape[0] < 2:
        raise DataFormatError(f"retrieval needs at least 2 images; got S of shape {s.shape}")
    return s


def top1_retrieval(S, direction: str = "brain_to_image") -> float:
    """Top-1 retrieval accuracy from a similarity matrix ``S[i, j] = sim(pred_i, true_j)``.

    ``"brain_to_image"``: the fraction of predictions ``i`` whose own image is the most similar true row,
    ``argmax_j S[i, j] == i``; ``"image_to_brain"``: the fraction of true rows ``j`` whose own prediction is
    the most similar, ``argmax_i S[i, j] == j``. **Ties fail**: ``i`` counts only if ``S[i, i]`` is the
    *unique* maximum (strictly greater than every distractor), so a constant ``S`` scores 0, not 1/n;
    NaN similarities count as failures. Chance is ``1 / n``.
    """
    direction = check_option("direction", direction, DIRECTIONS)
    s = _square(S)
    if direction == "image_to_brain":
        s = s.T
    off = s.copy()
    np.fill_diagonal(off, -np.inf)
    best_other = np.max(off, axis=1)  # NaN if any distractor is NaN -> comparison False
    return float(np.mean(np.diag(s) > best_other))


def two_way_identification(S) -> float:
    """Two-way identification from a similarity matrix ``S[i, j] = sim(pred_i, true_j)``.

    The fraction of ordered pairs ``i != j`` with ``S[i, i] > S[i, j]``: prediction ``i`` is more similar to
    its own image than to distractor image ``j``. Strict (ties fail) and NaN fails; chance 0.5. Every
    prediction has the same ``n - 1`` distractors, so this equals the mean over predictions of their
    per-image fraction, which is exactly MindEye2's convention as implemented by the reconstruction suite's
    :func:`brainenc.metrics.two_way_identification` (``r[i, j] = corr(gt_i, rec_j)``, success
    ``r[i, j] < r[j, j]``, i.e. the distractors of reconstruction ``j`` are the other ground truths):
    ``two_way_identification(similarity_matrix(pred, true))`` equals
    ``reconstruction.two_way_identification(true, pred)`` for ``kind="pearson"``.
    """
    s = _square(S)
    n = s.shape[0]
    wins = np.diag(s)[:, None] > s  # the diagonal compares x > x: False, never counted
    return float(wins.sum() / (n * (n - 1)))


def feature_retrieval(pred, true, *, kind: str = "pearson", chunk_features: int | None = None,
                      max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    """Top-1 retrieval in both directions and two-way identification of predicted features.

    Parameters
    ----------
    pred, true : arrays [n, ...] of the same shape (see :func:`similarity_matrix`), ``n >= 2``.
    kind : {"pearson", "cosine"}
    chunk_features, max_bytes : see :func:`similarity_matrix`.

    Returns
    -------
    dict
        ``{"n", "top1_brain_to_image", "top1_image_to_brain", "two_way", "chance_top1": 1 / n,
        "chance_two_way": 0.5, "kind"}`` (fractions in [0, 1]; papers report x100).
    """
    kind = check_option("kind", kind, KINDS)
    S = similarity_matrix(pred, true, kind, chunk_features=chunk_features, max_bytes=max_bytes)
    n = S.shape[0]
    if n < 2:
        raise DataFormatError(f"retrieval needs at least 2 images; got {n}")
    out = {
        "n": int(n),
        "top1_brain_to_image": top1_retrieval(S, "brain_to_image"),
        "top1_image_to_brain": top1_retrieval(S, "image_to_brain"),
        "two_way": two_way_identification(S),
        "chance_top1": 1.0 / n,
        "chance_two_way": 0.5,
        "kind": kind,
    }
    return out
