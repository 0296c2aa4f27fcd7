"""brainenc.metrics.retrieval: against brute-force Python loops (scipy's pearsonr), chunking, chance levels
and input handling."""
import math
import tracemalloc

import numpy as np
import pytest
from scipy import stats

from brainenc.exceptions import ConfigError, DataFormatError
from brainenc.metrics import reconstruction
from brainenc.metrics.retrieval import (
    feature_retrieval,
    similarity_matrix,
    top1_retrieval,
    two_way_identification,
)


def _pair(n=7, shape=(3, 5), noise=1.0, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    true = rng.standard_normal((n, *shape))
    pred = true + noise * rng.standard_normal((n, *shape))
    return pred.astype(dtype), true.astype(dtype)


def _brute_similarity(pred, true, kind):
    n = pred.shape[0]
    a = pred.reshape(n, -1).astype(np.float64)
    b = true.reshape(n, -1).astype(np.float64)
    S = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            if kind == "pearson":
                S[i, j] = stats.pearsonr(a[i], b[j])[0]
            else:
                S[i, j] = float(np.dot(a[i], b[j]) / (np.linalg.norm(a[i]) * np.linalg.norm(b[j])))
    return S


def _brute_top1(S, direction):
    n = S.shape[0]
    hits = 0
    for k in range(n):
        own = S[k, k]
        others = [S[k, j] if direction == "brain_to_image" else S[j, k] for j in range(n) if j != k]
        hits += all(own > o for o in others)
    return hits / n


def _brute_two_way(S):
    n = S.shape[0]
    wins = sum(S[i, i] > S[i, j] for i in range(n) for j in range(n) if i != j)
    return wins / (n * (n - 1))


@pytest.mark.parametrize("kind", ["pearson", "cosine"])
def test_similarity_matches_brute_force(kind):
    pred, true = _pair(n=7, shape=(3, 5), noise=1.5)
    S = similarity_matrix(pred, true, kind)
    assert S.dtype == np.float64 and S.shape == (7, 7)
    np.testing.assert_allclose(S, _brute_similarity(pred, true, kind), rtol=1e-12, atol=1e-13)


def test_pearson_matches_np_corrcoef_blocks():
    pred, true = _pair(n=9, shape=(20,), noise=2.0, seed=3)
    S = similarity_matrix(pred, true, "pearson")
    np.testing.assert_allclose(S, np.corrcoef(pred, true)[:9, 9:], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_match_brute_force_loops(seed):
    pred, true = _pair(n=12, shape=(4, 6), noise=3.0, seed=seed)  # noisy: some retrievals fail
    S = similarity_matrix(pred, true)
    b2i = top1_retrieval(S, "brain_to_image")
    i2b = top1_retrieval(S, "image_to_brain")
    tw = two_way_identification(S)
    assert b2i == pytest.approx(_brute_top1(S, "brain_to_image"))
    assert i2b == pytest.approx(_brute_top1(S, "image_to_brain"))
    assert tw == pytest.approx(_brute_two_way(S))
    # the argmax reading of the definitions (no ties in continuous random data)
    assert b2i == pytest.approx(np.mean(np.argmax(S, axis=1) == np.arange(12)))
    assert i2b == pytest.approx(np.mean(np.argmax(S, axis=0) == np.arange(12)))
    res = feature_retrieval(pred, true)
    assert res == {"n": 12, "top1_brain_to_image": b2i, "top1_image_to_brain": i2b, "two_way": tw,
                   "chance_top1": 1 / 12, "chance_two_way": 0.5, "kind": "pearson"}


def test_directions_differ_on_an_asymmetric_matrix():
    S = np.array([[0.9, 0.1, 0.0],
                  [0.95, 0.5, 0.2],   # prediction 1 is closer to image 0 -> b->i fails for 1
                  [0.0, 0.1, 0.8]])
    assert top1_retrieval(S, "brain_to_image") == pytest.approx(2 / 3)
    # column 0: 0.9 < 0.95 -> image 0 retrieves prediction 1: fails; columns 1, 2 succeed
    assert top1_retrieval(S, "image_to_brain") == pytest.approx(2 / 3)
    assert two_way_identification(S) == pytest.approx(_brute_two_way(S))
    S2 = S.copy()
    S2[1, 0] = 0.3
    S2[2] = [0.95, 0.1, 0.99]  # prediction 2 still prefers its own image, but steals image 0
    assert top1_retrieval(S2, "brain_to_image") == pytest.approx(1.0)
    assert top1_retrieval(S2, "image_to_brain") == pytest.approx(2 / 3)


def test_ties_and_nan_fail():
    S = np.array([[0.5, 0.5, 0.1],
                  [0.2, 0.7, 0.1],
                  [0.1, 0.1, 0.4]])
    # row 0 ties with distractor 1: not a unique max, so not counted
    assert top1_retrieval(S, "brain_to_image") == pytest.approx(2 / 3)
    assert two_way_identification(S) == pytest.approx(5 / 6)  # the tie (0, 1) is the only lost pair
    assert top1_retrieval(np.ones((4, 4))) == 0.0
    assert two_way_identification(np.ones((4, 4))) == 0.0
    S[2, 0] = np.nan
    assert top1_retrieval(S, "brain_to_image") == pytest.approx(1 / 3)
    assert two_way_identification(S) == pytest.approx(4 / 6)


def test_two_way_equals_the_reconstruction_convention():
    pred, true = _pair(n=15, shape=(8, 3), noise=2.5, seed=5)
    ours = two_way_identification(similarity_matrix(pred, true, "pearson"))
    theirs = reconstruction.two_way_identification(true, pred)
    assert ours == pytest.approx(theirs, abs=1e-12)


@pytest.mark.parametrize("kind", ["pearson", "cosine"])
@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_equals_unchunked(kind, chunk):
    pred, true = _pair(n=11, shape=(16, 8), noise=1.0, seed=2)
    full = similarity_matrix(pred, true, kind)
    np.testing.assert_allclose(similarity_matrix(pred, true, kind, chunk_features=chunk), full, rtol=1e-12,
                               atol=1e-13)
    # a budget small enough to force many blocks and product tiles
    np.testing.assert_allclose(similarity_matrix(pred, true, kind, max_bytes=4096), full, rtol=1e-12, atol=1e-13)


def test_perfect_predictions_score_one():
    _, true = _pair(n=20, shape=(5, 7), seed=4)
    res = feature_retrieval(true.copy(), true)
    assert res["top1_brain_to_image"] == 1.0
    assert res["top1_image_to_brain"] == 1.0
    assert res["two_way"] == 1.0
    res = feature_retrieval(true * 3.0 + 1.0, true)  # pearson: invariant to a positive affine map
    assert res["top1_brain_to_image"] == res["two_way"] == 1.0
    assert feature_retrieval(true * 3.0, true, kind="cosine")["two_way"] == 1.0


@pytest.mark.parametrize("kind", ["pearson", "cosine"])
def test_random_predictions_are_at_chance(kind):
    n, f = 2000, 32
    rng = np.random.default_rng(11)
    res = feature_retrieval(rng.standard_normal((n, f)), rng.standard_normal((n, f)), kind=kind)
    # top-1: n (nearly independent) rows, each a success with p = 1/n: binomial sd sqrt(p (1-p) / n)
    p = 1 / n
    sd = math.sqrt(p * (1 - p) / n)
    for key in ("top1_brain_to_image", "top1_image_to_brain"):
        assert abs(res[key] - p) <= 4 * sd, (key, res[key])
    # two-way: the n(n-1) pairs are not independent (a row's pairs share S[i, i]); its per-row fraction
    # is a [0, 1] variable with mean 1/2, whose variance is at most that of one Bernoulli(1/2) trial, so
    # the binomial sd of n trials with p = 1/2 bounds the sd of the mean over rows.
    sd2 = math.sqrt(0.5 * 0.5 / n)
    assert abs(res["two_way"] - 0.5) <= 4 * sd2, res["two_way"]
    assert res["chance_top1"] == pytest.approx(1 / n) and res["chance_two_way"] == 0.5


def test_float16_memmap_input(tmp_path):
    pred, true = _pair(n=10, shape=(6, 4), noise=0.8, seed=6, dtype=np.float16)
    mm = {}
    for name, arr in (("pred", pred), ("true", true)):
        m = np.lib.format.open_memmap(tmp_path / f"{name}.npy", mode="w+", dtype=np.float16, shape=arr.shape)
        m[:] = arr
        m.flush()
        mm[name] = np.load(tmp_path / f"{name}.npy", mmap_mode="r")
    S = similarity_matrix(mm["pred"], mm["true"], chunk_features=5)
    np.testing.assert_allclose(S, _brute_similarity(pred.astype(np.float64), true.astype(np.float64), "pearson"),
                               rtol=1e-12, atol=1e-13)
    res = feature_retrieval(mm["pred"], mm["true"])
    assert res["n"] == 10 and 0.0 <= res["two_way"] <= 1.0


def test_working_memory_is_bounded(tmp_path):
    n, f = 100, 40_000  # float16 memmaps of 8 MB each; the float64 copies would be 32 MB each
    rng = np.random.default_rng(7)
    paths = []
    for name in ("pred", "true"):
        m = np.lib.format.open_memmap(tmp_path / f"{name}.npy", mode="w+", dtype=np.float16, shape=(n, f))
        m[:] = rng.standard_normal((n, f)).astype(np.float16)
        m.flush()
        del m
        paths.append(tmp_path / f"{name}.npy")
    pred, true = (np.load(p, mmap_mode="r") for p in paths)
    budget = 4 * 2**20
    tracemalloc.start()
    try:
        S = similarity_matrix(pred, true, max_bytes=budget)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # budget + the result and a few [n] vectors (tracemalloc sees numpy's allocations, not the page cache)
    assert peak <= budget + S.nbytes + 64 * 1024, peak
    ref = np.corrcoef(np.asarray(pred, np.float64), np.asarray(true, np.float64))[:n, n:]
    np.testing.assert_allclose(S, ref, rtol=1e-10, atol=1e-12)


def test_shape_mismatch_is_a_one_line_error():
    with pytest.raises(DataFormatError) as exc:
        similarity_matrix(np.zeros((5, 3, 4)), np.zeros((5, 12)))
    msg = str(exc.value)
    assert "(5, 3, 4)" in msg and "(5, 12)" in msg and "\n" not in msg
    with pytest.raises(DataFormatError, match=r"\(4, 8\).*\(5, 8\)"):
        feature_retrieval(np.zeros((4, 8)), np.zeros((5, 8)))


def test_bad_arguments():
    S = np.eye(3)
    with pytest.raises(ConfigError, match="direction"):
        top1_retrieval(S, "brain2image")
    with pytest.raises(ConfigError, match="kind"):
        similarity_matrix(np.ones((3, 2)), np.ones((3, 2)), "euclid")
    with pytest.raises(DataFormatError, match="square"):
        two_way_identification(np.zeros((3, 4)))
    with pytest.raises(DataFormatError, match="at least 2"):
        feature_retrieval(np.ones((1, 4)), np.ones((1, 4)))
    with pytest.raises(DataFormatError, match="feature axis"):
        similarity_matrix(np.ones(4), np.ones(4))
    with pytest.raises(ConfigError, match="chunk_features"):
        similarity_matrix(np.ones((3, 2)), np.ones((3, 2)), chunk_features=0)


def test_constant_rows_give_nan_and_fail():
    pred, true = _pair(n=5, shape=(6,), noise=0.1)
    pred[2] = 1.0  # zero variance: pearson undefined
    S = similarity_matrix(pred, true)
    assert np.isnan(S[2]).all() and np.isfinite(np.delete(S, 2, axis=0)).all()
    assert top1_retrieval(S, "brain_to_image") == pytest.approx(4 / 5)
    # every image meets the NaN prediction as a distractor: an undefined comparison is a lost one
    assert top1_retrieval(S, "image_to_brain") == 0.0
    assert two_way_identification(S) == pytest.approx(_brute_two_way(S))
