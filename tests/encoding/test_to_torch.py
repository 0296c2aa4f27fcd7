"""``to_torch()`` of the fitted encoders: a frozen float32 head that computes what ``predict`` computes.

Reference: each estimator's own numpy / trainer ``predict`` on the same inputs (float64 solvers vs
the float32 head: tolerances scaled to the predictions, ``atol = 1e-4 * std(pred)`` + ``rtol 1e-4``).
"""
import numpy as np
import pytest
import torch

import brainenc
from brainenc.encoding import BandedRidgeEncoder, RidgeEncoder
from brainenc.encoding.routing import RoutingEncoder
from brainenc.exceptions import DataFormatError, NotFittedError


def _close(head_out, pred, rtol=1e-4):
    pred = np.asarray(pred, dtype=np.float64)
    out = head_out.detach().cpu().numpy().astype(np.float64)
    assert out.shape == pred.shape
    np.testing.assert_allclose(out, pred, rtol=rtol, atol=1e-4 * float(pred.std()) + 1e-7)


def _frozen(head):
    assert not head.training
    head.train()  # a fitted head never leaves eval mode
    assert not head.training
    assert all(not p.requires_grad for p in head.parameters())


def _ridge_data(n=80, p=12, v=7, seed=0):
    rng = np.random.default_rng(seed)
    X = (rng.standard_normal((n, p)) * rng.uniform(0.1, 20, p) + rng.uniform(-5, 5, p)).astype(np.float32)
    Y = (X @ rng.standard_normal((p, v)) + rng.standard_normal((n, v))).astype(np.float32)
    return X, Y


@pytest.mark.parametrize("standardize", [True, False])
@pytest.mark.parametrize("cv", [3, None])
def test_ridge_head_equals_predict(tmp_path, standardize, cv):
    X, Y = _ridge_data()
    enc = RidgeEncoder(alphas=[0.1, 10.0, 1000.0], cv=cv, standardize=standardize).fit(X[:60], Y[:60])
    head = enc.to_torch()
    assert head.input_kind == "design" and head.n_features == 12 and head.n_outputs == 7
    assert head.standardize is standardize
    _frozen(head)
    assert all(b.dtype == torch.float32 for b in head.buffers())
    _close(head(torch.from_numpy(X[60:])), enc.predict(X[60:]))
    # the saved model gives the same head
    enc.save_pretrained(tmp_path / "r")
    head2 = brainenc.load(tmp_path / "r").to_torch()
    for (k, a), (k2, b) in zip(head.state_dict().items(), head2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_ridge_head_gradient_is_the_standardised_coefficients():
    X, Y = _ridge_data()
    enc = RidgeEncoder(alphas=[1.0], cv=3, standardize=True).fit(X, Y)
    head = enc.to_torch()
    x = torch.from_numpy(X[:4]).requires_grad_(True)
    head(x)[:, 2].sum().backward()
    expect = enc.coef_[:, 2] / enc.feature_scale_
    np.testing.assert_allclose(x.grad.numpy(), np.broadcast_to(expect, (4, 12)), rtol=1e-5, atol=1e-7)


def test_ridge_head_one_dimensional_target_and_errors():
    X, Y = _ridge_data()
    enc = RidgeEncoder(alphas=[1.0, 10.0], cv=3, standardize=True).fit(X, Y[:, 0])
    head = enc.to_torch()
    assert head.n_outputs == 1
    _close(head(torch.from_numpy(X)), enc.predict(X)[:, None])
    with pytest.raises(DataFormatError, match=r"\[n, 12\]"):
        head(torch.zeros(2, 11))
    with pytest.raises(NotFittedError):
        RidgeEncoder().to_torch()


def test_banded_head_equals_predict():
    rng = np.random.default_rng(1)
    X1 = rng.standard_normal((70, 5)).astype(np.float32)
    X2 = (3 * rng.standard_normal((70, 8))).astype(np.float32)
    Y = (X1 @ rng.standard_normal((5, 6)) + 0.1 * X2 @ rng.standard_normal((8, 6))
         + rng.standard_normal((70, 6))).astype(np.float32)
    enc = BandedRidgeEncoder(alphas=[0.1, 10.0], n_iter=4, cv=3).fit([X1[:50], X2[:50]], Y[:50])
    head = enc.to_torch()
    assert head.input_kind == "design" and head.n_features == 13 and head.band_sizes == (5, 8)
    assert not head.standardize
    _frozen(head)
    Xc = np.concatenate([X1[50:], X2[50:]], axis=1)
    _close(head(torch.from_numpy(Xc)), enc.predict([X1[50:], X2[50:]]))
    with pytest.raises(NotFittedError):
        BandedRidgeEncoder().to_torch()


N_TOK, F, V = 16, 24, 20


def _routing(standardize_tokens=True, queries="hemis"):
    rng = np.random.default_rng(0)
    X = (rng.standard_normal((40, N_TOK, F)) * rng.uniform(0.5, 30, F) + 2.0).astype(np.float32)
    Y = (X[:, 5, :V] / 10 + 0.3 * rng.standard_normal((40, V))).astype(np.float32)
    hemi = np.where(np.arange(V) < V // 2, "lh", "rh")
    enc = RoutingEncoder(queries=queries, model=dict(d_model=16, n_heads=2, d_ffn=32, dropout=0.1),
                         train={"epochs": 2, "batch_size": 8, "lr": 3e-3, "device": "cpu", "amp": False},
                         standardize_tokens=standardize_tokens, val_fraction=0.0)
    return enc.fit(X[:32], Y[:32], hemi=hemi), X


@pytest.mark.parametrize("standardize_tokens, queries", [(True, "hemis"), (False, "voxels")])
def test_routing_head_equals_predict(tmp_path, standardize_tokens, queries):
    enc, X = _routing(standardize_tokens, queries)
    before = {k: v.clone() for k, v in enc.model_.state_dict().items()}
    head = enc.to_torch()
    assert head.input_kind == "tokens" and (head.n_tokens, head.n_features, head.n_outputs) == (N_TOK, F, V)
    assert head.grid == (4, 4) and head.model.token_norm is standardize_tokens
    _frozen(head)
    assert head.model is not enc.model_  # a copy: freezing it leaves the estimator alone
    assert any(p.requires_grad for p in enc.model_.parameters())
    tok = torch.from_numpy(X[32:]).requires_grad_(True)
    out = head(tok)
    _close(out, enc.predict(X[32:]))
    out.sum().backward()
    assert torch.isfinite(tok.grad).all() and tok.grad.abs().sum() > 0
    assert all(torch.equal(before[k], v) for k, v in enc.model_.state_dict().items())
    # from the saved folder
    enc.save_pretrained(tmp_path / "e")
    head2 = brainenc.load(tmp_path / "e").to_torch()
    _close(head2(torch.from_numpy(X[32:])), enc.predict(X[32:]))
    with pytest.raises(DataFormatError, match="tokens must be"):
        head(torch.zeros(2, N_TOK + 1, F))


def test_routing_head_not_fitted():
    with pytest.raises(NotFittedError):
        RoutingEncoder().to_torch()


def test_ridge_unit_norm_rows_in_fit_predict_and_head():
    import torch

    from brainenc.encoding import RidgeEncoder

    rng = np.random.default_rng(1)
    X = rng.standard_normal((80, 12)) * rng.uniform(0.5, 3.0, (80, 1))   # rows of different norms
    Y = X / np.linalg.norm(X, axis=1, keepdims=True) @ rng.standard_normal((12, 5))
    est = RidgeEncoder(alphas=[1e-3, 1.0], cv=4, unit_norm=True, standardize=True).fit(X, Y)
    ref = RidgeEncoder(alphas=[1e-3, 1.0], cv=4, standardize=True).fit(X / np.linalg.norm(X, axis=1, keepdims=True), Y)
    p = est.predict(X)
    np.testing.assert_allclose(p, ref.predict(X / np.linalg.norm(X, axis=1, keepdims=True)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(est.predict(3.0 * X), p, rtol=1e-5, atol=1e-6)     # scale-free
    head = est.to_torch()
    with torch.no_grad():
        h = head(torch.from_numpy(X).float()).numpy()
    np.testing.assert_allclose(h, p, rtol=1e-4, atol=1e-4 * p.std())
    assert head.describe()["unit_norm"] is True
