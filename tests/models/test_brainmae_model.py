"""BrainMAE modules: static-graph attention against a direct implementation, ablation switches."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from brainenc.exceptions import ConfigError
from brainenc.config import from_dict
from brainenc.models.brainmae import (
    TINY_BRAINMAE,
    BrainMAEArchitecture,
    BrainMAEFinetuneModel,
    BrainMAEPretrainModel,
    StaticGraphBlock,
    TransientStateEncoder,
    sine_1d,
    static_graph,
)


def _arch(**kw):
    return from_dict(BrainMAEArchitecture, {**TINY_BRAINMAE, **kw})


def _np_graph(E, self_loops):
    logits = E.astype(np.float64) @ E.T.astype(np.float64) / np.sqrt(E.shape[1])
    if not self_loops:
        np.fill_diagonal(logits, -np.inf)
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True)


def test_static_graph_matches_numpy_and_has_zero_diagonal():
    torch.manual_seed(0)
    E = torch.randn(7, 16)
    A = static_graph(E).numpy()
    ref = _np_graph(E.numpy(), False)
    np.testing.assert_allclose(A, ref, rtol=1e-5, atol=1e-6)
    assert np.all(np.diag(A) == 0.0)
    np.testing.assert_allclose(A.sum(1), 1.0, rtol=0, atol=1e-6)


def test_self_loops_put_mass_on_the_diagonal():
    torch.manual_seed(0)
    E = torch.randn(7, 16)
    A = static_graph(E, self_loops=True).numpy()
    np.testing.assert_allclose(A, _np_graph(E.numpy(), True), rtol=1e-5, atol=1e-6)
    # E_i·E_i ≈ d ≫ E_i·E_j: the diagonal dominates each row
    assert np.diag(A).min() > 0.2 and np.all(np.diag(A) > A.max(1) - 1e-7)
    enc = TransientStateEncoder(_arch(self_loops=True), n_rois=7, segment_length=4)
    assert float(enc.graph().detach().diagonal().min()) > 0


def test_static_graph_block_equals_direct_formula_and_sdpa_backend():
    torch.manual_seed(1)
    d, R = 16, 6
    blk = StaticGraphBlock(d, 32, 0.0).eval()
    h, E = torch.randn(3, R, d), torch.randn(R, d)
    A = static_graph(E)
    u = torch.nn.functional.layer_norm(h, (d,), blk.norm.weight, blk.norm.bias)
    v = u @ blk.value.weight.T + blk.value.bias
    mixed = torch.einsum("ij,bjd->bid", A, v)
    h1 = h + mixed @ blk.out.weight.T + blk.out.bias
    ref = blk.ffn(h1)
    torch.testing.assert_close(blk(h, A), ref, rtol=1e-5, atol=1e-5)
    sd = StaticGraphBlock(d, 32, 0.0, backend="sdpa").eval()
    sd.load_state_dict(blk.state_dict())
    torch.testing.assert_close(sd(h, E), ref, rtol=1e-4, atol=1e-5)


def test_graph_is_the_same_for_every_sample_and_masked_rois_are_hidden():
    torch.manual_seed(0)
    enc = TransientStateEncoder(_arch(n_layers=1), n_rois=5, segment_length=4).eval()
    x = torch.randn(2, 5, 4)
    m = torch.zeros(2, 5, dtype=torch.bool)
    m[:, 2] = True
    x2 = x.clone()
    x2[:, 2] = 100.0  # masked ROI content must not reach the output
    torch.testing.assert_close(enc(x, m), enc(x2, m))
    assert not torch.allclose(enc(x), enc(x2))


@pytest.mark.parametrize("kw", [{}, {"encoder": "self_attention"}, {"encoder": "adaptive"},
                                {"roi_embedding": "positional"}, {"mask_fill": "zero"}, {"decoder_layers": 0}])
def test_variants_run_and_shapes(kw):
    torch.manual_seed(0)
    arch = _arch(**kw)
    pre = BrainMAEPretrainModel(arch, n_rois=6, segment_length=5)
    x = torch.randn(3, 6, 5)
    m = torch.rand(3, 6) < 0.5
    assert pre(x, m).shape == (3, 6, 5) and pre.embed(x).shape == (3, TINY_BRAINMAE["d_model"])
    if kw.get("roi_embedding") == "positional":
        assert "encoder.roi_embed" not in dict(pre.named_parameters())
        torch.testing.assert_close(pre.encoder.roi_embed, sine_1d(6, 16))
    ft = BrainMAEFinetuneModel(arch, n_rois=6, segment_length=5, n_outputs=3).eval()
    xs = torch.randn(2, 4, 6, 5)
    valid = torch.tensor([[True, True, False, False], [True, True, True, True]])
    out = ft(xs, valid)
    assert out.shape == (2, 3)
    xs2 = xs.clone()
    xs2[0, 2:] = 50.0  # padded segments do not matter
    torch.testing.assert_close(ft(xs2, valid), out)


def test_architecture_validation():
    with pytest.raises(ConfigError, match="'encoder'"):
        _arch(encoder="bogus")
    with pytest.raises(ConfigError, match="n_heads"):
        _arch(n_heads=3)
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(BrainMAEArchitecture, {"d_modl": 8})
    with pytest.raises(ConfigError, match="2 ROIs"):
        TransientStateEncoder(_arch(), n_rois=1, segment_length=3)
