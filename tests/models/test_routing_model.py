"""Evidence tests for the routing encoder model (tiny CPU sizes)."""
import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from brainenc.exceptions import ConfigError
import brainenc.models.routing_encoder as routing_module
from brainenc.models import (
    MODELS,
    DecoderLayer,
    GroupedReadout,
    RoutingArchitecture,
    RoutingEncoderModel,
    build_query_set,
    create_model,
    dense_readout_reference,
    sine_2d,
)
from brainenc.ops import list_backends, routing_attention

V, N, F, GRID = 24, 12, 20, (3, 4)


def _labels(seed=0):
    rng = np.random.default_rng(seed)
    return ({"faces": rng.integers(0, 3, V).astype(np.int32), "places": rng.integers(0, 2, V).astype(np.int32)},
            {"faces": {1: "FFA", 2: "OFA"}, "places": {1: "PPA"}},
            np.array(["lh"] * 12 + ["rh"] * 12))


def _model(kind="rois", combine="sum", feature_dim=F, **kw):
    labels, names, hemi = _labels()
    qs = build_query_set(kind, V, roi_labels=labels, roi_names=names, hemi=hemi, combine=combine,
                         clusters=np.arange(V) % 5 - 1)  # None for kind="voxels": one query per voxel
    torch.manual_seed(0)
    arch = dict(d_model=16, n_heads=4, d_ffn=32, dropout=0.0)
    arch.update(kw)
    return create_model("routing_encoder", arch, qs, feature_dim=feature_dim, grid=GRID, n_voxels=V), qs


def test_query_set_rois_names_membership_and_rules():
    labels, names, hemi = _labels()
    qs = build_query_set("rois", V, roi_labels=labels, roi_names=names, hemi=hemi)
    assert qs.names[:4] == ["lh_FFA", "lh_OFA", "lh_PPA", "lh_unknown"]
    assert qs.names[4:] == ["rh_FFA", "rh_OFA", "rh_PPA", "rh_unknown"]
    m = qs.dense()
    # membership equals the label arrays, per hemisphere
    for h, sl in (("lh", slice(0, 12)), ("rh", slice(12, 24))):
        np.testing.assert_array_equal(m[qs.names.index(f"{h}_FFA"), sl], labels["faces"][sl] == 1)
        np.testing.assert_array_equal(m[qs.names.index(f"{h}_PPA"), sl], labels["places"][sl] == 1)
        none = (labels["faces"][sl] == 0) & (labels["places"][sl] == 0)
        np.testing.assert_array_equal(m[qs.names.index(f"{h}_unknown"), sl], none)
    count = (m > 0).sum(0)
    np.testing.assert_array_equal(qs.bias_scale, count)  # sum: bias counted k times
    mean = build_query_set("rois", V, roi_labels=labels, roi_names=names, hemi=hemi, combine="mean")
    np.testing.assert_allclose(mean.dense().sum(0), 1.0, rtol=1e-6)
    first = build_query_set("rois", V, roi_labels=labels, roi_names=names, hemi=hemi, combine="first")
    assert first.one_per_voxel
    # first keeps the earliest query in query order
    fd = first.dense()
    for v in range(V):
        assert np.argmax(fd[:, v]) == np.flatnonzero(m[:, v])[0]


def test_query_set_other_kinds_and_errors():
    labels, names, hemi = _labels()
    assert build_query_set("hemis", V, hemi=hemi).names == ["lh", "rh"]
    cl = np.arange(V) % 5 - 1
    cs = build_query_set("custom", V, clusters=cl)
    assert cs.names == ["cluster-0", "cluster-1", "cluster-2", "cluster-3", "unknown"]
    np.testing.assert_array_equal(cs.voxels_of("unknown"), np.flatnonzero(cl < 0))
    assert build_query_set("voxels", V) is None
    with pytest.raises(ConfigError, match="roi_labels"):
        build_query_set("rois", V)
    with pytest.raises(ConfigError, match="read no query"):
        build_query_set("rois", V, roi_labels=labels, unknown=False)
    with pytest.raises(ConfigError, match="'combine' must be one of"):
        build_query_set("hemis", V, hemi=hemi, combine="max")


@pytest.mark.parametrize("kind", ["rois", "hemis", "custom", "voxels"])
def test_forward_shapes(kind):
    model, qs = _model(kind)
    x = torch.randn(3, N, F)
    y = model(x)
    assert y.shape == (3, V) and torch.isfinite(y).all()
    if kind != "voxels":
        z, attns = model.forward_features(x, need_weights=True)
        assert z.shape == (3, qs.n_queries, 16)
        assert attns[-1].shape == (3, 4, qs.n_queries, N)


def test_voxel_full_variant_chunking_is_exact():
    model, _ = _model("voxels", voxel_variant="full", voxel_chunk=5, n_layers=2)
    x = torch.randn(2, N, F)
    y_chunked = model(x)
    model.arch.voxel_chunk = V
    torch.testing.assert_close(model(x), y_chunked, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("combine", ["sum", "mean", "first"])
def test_grouped_readout_equals_dense_masked_sum(combine):
    labels, names, hemi = _labels(1)
    qs = build_query_set("rois", V, roi_labels=labels, roi_names=names, hemi=hemi, combine=combine)
    torch.manual_seed(1)
    ro = GroupedReadout(qs, 8).double()
    z = torch.randn(3, qs.n_queries, 8, dtype=torch.float64)
    ref = dense_readout_reference(z, torch.as_tensor(qs.dense(), dtype=torch.float64), ro.weight, ro.bias,
                                  torch.as_tensor(qs.bias_scale, dtype=torch.float64))
    torch.testing.assert_close(ro(z), ref, rtol=1e-12, atol=1e-12)
    # and a fully explicit per-voxel loop
    W, c, M = ro.weight.detach(), ro.bias.detach(), qs.dense()
    for v in (0, 7, 23):
        expect = sum(M[r, v] * (z[:, r] @ W[v]) for r in range(qs.n_queries)) + qs.bias_scale[v] * c[v]
        torch.testing.assert_close(ro(z)[:, v], expect, rtol=1e-10, atol=1e-10)


def test_gradient_isolation_grouped():
    model, qs = _model("rois")
    x = torch.randn(2, N, F)
    M = qs.dense() > 0
    for v in (0, 5, 17):
        model.zero_grad()
        model(x)[:, v].sum().backward()
        g = model.query_embed.grad.abs().sum(1)  # [Q]
        assert (g[torch.as_tensor(~M[:, v])] == 0).all(), f"voxel {v} leaks into foreign queries"
        assert (g[torch.as_tensor(M[:, v])] > 0).all()
        gw = model.readout.weight.grad.abs().sum(1)
        assert gw[v] > 0 and (gw[torch.arange(V) != v] == 0).all()


def test_gradient_isolation_is_broken_by_query_self_attention():
    # the isolation test has teeth: with query self-attention every query feeds every voxel.
    # Two layers: in the first layer tgt = 0, so all self-attention values are LN1(0) = beta and
    # the mixing is a no-op; from the second layer on queries really exchange information.
    model, qs = _model("rois", query_self_attn=True, n_layers=2)
    model(torch.randn(2, N, F))[:, 0].sum().backward()
    assert (model.query_embed.grad.abs().sum(1) > 0).all()


def test_gradient_isolation_voxel_routing():
    model, _ = _model("voxels")
    model(torch.randn(2, N, F))[:, 3].sum().backward()
    g = model.voxel_query.grad.abs().sum((0, 2))
    assert g[3] > 0 and (g[torch.arange(V) != 3] == 0).all()


@pytest.mark.parametrize("kind,variant", [("rois", "routing"), ("voxels", "routing"), ("voxels", "full")])
def test_attention_rows_sum_to_one(kind, variant):
    model, _ = _model(kind, voxel_variant=variant)
    a = model.attention_maps(torch.randn(2, N, F))
    assert a.shape[-1] == N and (a >= 0).all()
    torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)))


class _ReferenceLayer(nn.Module):
    """DETR pre-norm decoder layer from torch.nn.MultiheadAttention (independent reference)."""

    def __init__(self, d, h, f, self_attn):
        super().__init__()
        self.sa = nn.MultiheadAttention(d, h, batch_first=True) if self_attn else None
        self.ca = nn.MultiheadAttention(d, h, batch_first=True)
        self.n1, self.n2, self.n3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.l1, self.l2 = nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, tgt, memory, pos, qpos):
        if self.sa is not None:
            t = self.n1(tgt)
            tgt = tgt + self.sa(t + qpos, t + qpos, t)[0]
        t = self.n2(tgt)
        o, w = self.ca(t + qpos, memory + pos, memory, need_weights=True, average_attn_weights=False)
        tgt = tgt + o
        return tgt + self.l2(torch.relu(self.l1(self.n3(tgt)))), w


@pytest.mark.parametrize("self_attn", [False, True])
def test_decoder_layer_equals_multiheadattention_reference(self_attn):
    d, h, f = 16, 4, 24
    torch.manual_seed(3)
    ref = _ReferenceLayer(d, h, f, self_attn).double()
    for p in ref.parameters():  # non-trivial LayerNorm/bias values
        nn.init.normal_(p, std=0.3)
    ours = DecoderLayer(d, h, f, dropout=0.0, self_attn=self_attn).double()
    ca = ours.cross_attn
    W, b = ref.ca.in_proj_weight.data, ref.ca.in_proj_bias.data
    for i, lin in enumerate((ca.q_proj, ca.k_proj, ca.v_proj)):
        lin.weight.data.copy_(W[i * d:(i + 1) * d])
        if lin.bias is not None:  # ours has no key bias: softmax is invariant to it (reference keeps a random one)
            lin.bias.data.copy_(b[i * d:(i + 1) * d])
    ca.out_proj.load_state_dict(ref.ca.out_proj.state_dict())
    if self_attn:
        ours.self_attn.load_state_dict(ref.sa.state_dict())
        ours.norm1.load_state_dict(ref.n1.state_dict())
    for a, r in ((ours.norm2, ref.n2), (ours.norm3, ref.n3), (ours.linear1, ref.l1), (ours.linear2, ref.l2)):
        a.load_state_dict(r.state_dict())
    tgt = torch.randn(2, 5, d, dtype=torch.float64)
    mem = torch.randn(2, 7, d, dtype=torch.float64)
    pos = torch.randn(7, d, dtype=torch.float64)
    qpos = torch.randn(5, d, dtype=torch.float64)
    y_ref, w_ref = ref(tgt, mem, pos, qpos)
    y, w = ours(tgt, mem, pos, qpos, need_weights=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(w, w_ref, rtol=1e-10, atol=1e-10)


def test_sine_code_matches_formula():
    h, w, d = 3, 5, 16
    pos = sine_2d(h, w, d)
    assert pos.shape == (h * w, d)
    grid = pos.reshape(h, w, d)
    # first half encodes the row only, second half the column only
    torch.testing.assert_close(grid[:, :1, : d // 2].expand(h, w, d // 2), grid[:, :, : d // 2])
    torch.testing.assert_close(grid[:1, :, d // 2:].expand(h, w, d // 2), grid[:, :, d // 2:])
    i, j = 2, 3
    y = (i + 1) / (h + 1e-6) * 2 * math.pi
    x = (j + 1) / (w + 1e-6) * 2 * math.pi
    half = d // 2
    for c in range(half):
        f = 10000 ** (2 * (c // 2) / half)
        trig = math.sin if c % 2 == 0 else math.cos
        assert abs(grid[i, j, c].item() - trig(y / f)) < 1e-6
        assert abs(grid[i, j, half + c].item() - trig(x / f)) < 1e-6


def test_sine_code_rejects_a_width_not_divisible_by_4():
    with pytest.raises(ConfigError, match=r"'dim' must be divisible by 4 for the 2-D sine code; 6 was provided") as exc:
        sine_2d(3, 5, 6)
    assert isinstance(exc.value, ValueError) and "\n" not in str(exc.value)


def _naive_routing(q, k, v, w, c):
    a = torch.softmax(torch.einsum("hvd,bhpd->bhvp", q, k) / math.sqrt(q.shape[-1]), -1)
    return torch.einsum("bhvd,hvd->bv", torch.einsum("bhvp,bhpd->bhvd", a, v), w) + c


@pytest.mark.parametrize("backend", ["auto", "reference", "sdpa", "chunked"])
def test_voxel_routing_model_is_the_ops_op_with_its_backend(backend, monkeypatch):
    """The routing voxel model is routing_attention(q, k, v, w, c) on its own projections, with
    ``routing_backend`` passed through, and equals the routing formula written out."""
    model, _ = _model("voxels", routing_backend=backend)
    model.double()
    x = torch.randn(3, N, F, dtype=torch.float64)
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return routing_attention(*args, **kwargs)

    monkeypatch.setattr(routing_module, "routing_attention", spy)
    y = model(x)
    assert calls == [{"backend": backend}]
    k, v = model.kv.project_kv(*model.memory(x))
    naive = _naive_routing(model.voxel_query, k, v, model.voxel_weight, model.voxel_bias)
    torch.testing.assert_close(y, naive, rtol=1e-10, atol=1e-12)
    # gradients flow through the op's backward to every routing parameter
    y.sum().backward()
    for name in ("voxel_query", "voxel_weight", "voxel_bias", "kv.k_proj.weight"):
        assert torch.count_nonzero(model.get_parameter(name).grad) > 0, name


def test_routing_backend_is_validated_against_the_ops_registry():
    assert set(list_backends("routing_attention")) >= {"reference", "sdpa", "chunked"}
    RoutingArchitecture(routing_backend="chunked").check()
    with pytest.raises(ConfigError, match="'routing_backend' must be one of"):
        RoutingArchitecture(routing_backend="einsum").check()  # the removed built-in path


def test_architecture_check_only_validates():
    for arch in (RoutingArchitecture(), RoutingArchitecture(d_model=16, n_heads=4, input_proj=None, positional="none"),
                 RoutingArchitecture(voxel_variant="full", voxel_chunk=3, value_proj=False)):
        before = dataclasses.asdict(arch)
        arch.check()
        assert dataclasses.asdict(arch) == before
    for bad, match in (({"n_heads": 5}, "divisible by 'n_heads'"), ({"d_model": 6, "n_heads": 2}, "divisible by 4"),
                       ({"dropout": 1.0}, "'dropout'"), ({"n_layers": 0}, "'n_layers'"),
                       ({"voxel_variant": "fast"}, "'voxel_variant'")):
        with pytest.raises(ConfigError, match=match):
            RoutingArchitecture(**bad).check()


def test_data_sizes_are_model_arguments():
    arch = RoutingArchitecture(d_model=8, n_heads=2, d_ffn=16)
    qs = build_query_set("hemis", V, hemi=_labels()[2])
    m = RoutingEncoderModel(arch, feature_dim=F, grid=GRID, n_voxels=V, query_set=qs)
    assert (m.query_mode, m.n_queries, m.grid, m.feature_dim, m.n_tokens) == ("grouped", 2, GRID, F, N)
    assert RoutingEncoderModel(arch, feature_dim=F, grid=GRID, n_voxels=V).query_mode == "voxels"
    with pytest.raises(ConfigError, match="'grid'"):
        RoutingEncoderModel(arch, feature_dim=F, grid=(3, 0), n_voxels=V)
    with pytest.raises(ConfigError, match="'feature_dim'"):
        RoutingEncoderModel(arch, feature_dim=0, grid=GRID, n_voxels=V)
    with pytest.raises(ConfigError, match="'query_set' has 24 voxels but 'n_voxels' is 5"):
        RoutingEncoderModel(arch, feature_dim=F, grid=GRID, n_voxels=5, query_set=qs)
    with pytest.raises(ConfigError, match="value_proj=False needs feature_dim == d_model"):
        RoutingEncoderModel(dataclasses.replace(arch, value_proj=False, input_proj=False), feature_dim=F, grid=GRID,
                            n_voxels=V, query_set=qs)
    with pytest.raises(ConfigError, match="'query_set' must be None"):
        create_model("routing_encoder_voxels", feature_dim=F, grid=GRID, n_voxels=V, query_set=qs)


def test_value_proj_off_input_proj_and_registry():
    model, _ = _model("hemis", value_proj=False, input_proj=True)
    assert model.layers[0].cross_attn.v_proj is None and isinstance(model.input_proj, nn.Linear)
    assert model(torch.randn(2, N, F)).shape == (2, V)
    same, _ = _model("hemis", feature_dim=16)
    assert isinstance(same.input_proj, nn.Identity)
    assert {"routing_encoder", "routing_encoder_tiny", "routing_encoder_voxels"} <= set(MODELS.list())
    with pytest.raises(ConfigError, match="unknown key 'd_modle'"):
        create_model("routing_encoder", {"d_modle": 8}, feature_dim=F, grid=GRID, n_voxels=V)
    with pytest.raises(ConfigError, match="self_attn"):
        RoutingEncoderModel(RoutingArchitecture(query_self_attn=True), feature_dim=8, grid=(2, 2), n_voxels=4)
    with pytest.raises(ConfigError, match="tokens must have shape"):
        model(torch.randn(2, N + 1, F))


# ---- several queries per group (issue 17) -------------------------------------------------------
def test_queries_per_group_reads_the_concatenated_group_tokens():
    model, qs = _model("rois", queries_per_group=3)
    K, Q, D = 3, qs.n_queries, 16
    assert model.n_queries == Q * K and model.query_embed.shape == (Q * K, D)
    assert model.query_names[:3] == [f"{qs.names[0]}#{k}" for k in range(K)]
    assert model.readout.weight.shape == (V, K * D)
    x = torch.randn(2, N, F)
    z, attns = model.forward_features(x, need_weights=True)
    assert z.shape == (2, Q * K, D) and attns[0].shape == (2, 4, Q * K, N)
    # voxel v reads [z_{r,0}, ..., z_{r,K-1}] of each of its groups r with one K·D vector w_v
    zcat = z.reshape(2, Q, K * D)
    ref = dense_readout_reference(zcat, torch.as_tensor(qs.dense()), model.readout.weight, model.readout.bias,
                                  torch.as_tensor(qs.bias_scale))
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
    # the K queries of a group are distinct parameters: their attention maps differ
    a = model.attention_maps(x)
    assert not torch.allclose(a[:, :, 0], a[:, :, 1])


def test_queries_per_group_gradient_stays_in_the_voxels_groups():
    model, qs = _model("rois", queries_per_group=2)
    x = torch.randn(2, N, F)
    M = qs.dense() > 0
    v = 5
    model(x)[:, v].sum().backward()
    g = model.query_embed.grad.abs().sum(1).reshape(qs.n_queries, 2)  # [Q, K]
    assert (g[torch.as_tensor(~M[:, v])] == 0).all() and (g[torch.as_tensor(M[:, v])] > 0).all()


def test_queries_per_group_is_rejected_for_voxel_queries_and_validated():
    with pytest.raises(ConfigError, match="queries_per_group=2 needs grouped queries"):
        _model("voxels", queries_per_group=2)
    with pytest.raises(ConfigError, match="'queries_per_group' must be an integer >= 1"):
        RoutingArchitecture(queries_per_group=0).check()


# ---- token standardisation buffers (issue 17) ---------------------------------------------------
def test_token_norm_standardises_before_the_input_projection():
    labels, names, hemi = _labels()
    qs = build_query_set("rois", V, roi_labels=labels, roi_names=names, hemi=hemi)
    arch = RoutingArchitecture(d_model=16, n_heads=4, d_ffn=32, dropout=0.0)
    torch.manual_seed(0)
    normed = RoutingEncoderModel(arch, feature_dim=F, grid=GRID, n_voxels=V, query_set=qs, token_norm=True)
    torch.manual_seed(0)
    plain = RoutingEncoderModel(arch, feature_dim=F, grid=GRID, n_voxels=V, query_set=qs)
    mean, scale = torch.randn(F) * 5, torch.rand(F) * 10 + 0.1
    normed.set_token_stats(mean, scale)
    x = torch.randn(3, N, F)
    torch.testing.assert_close(normed(x), plain((x - mean) / scale), rtol=1e-5, atol=1e-6)
    # the statistics are buffers: saved and restored with the weights, not trained
    sd = normed.state_dict()
    assert {"token_mean", "token_scale"} <= set(sd) and "token_mean" not in dict(normed.named_parameters())
    torch.testing.assert_close(sd["token_scale"], scale)
    with pytest.raises(ConfigError, match="scale > 0"):
        normed.set_token_stats(mean, torch.zeros(F))
    with pytest.raises(ConfigError, match=f"must have {F} entries"):
        normed.set_token_stats(mean[:3], scale[:3])
    with pytest.raises(ConfigError, match="token_norm=True"):
        plain.set_token_stats(mean, scale)


def test_positional_scale_multiplies_the_key_code_only():
    base, _ = _model("rois")
    scaled, _ = _model("rois", positional_scale=3.0)  # same seed: same weights
    x = torch.randn(2, N, F)
    (f1, p1), (f3, p3) = base.memory(x), scaled.memory(x)
    torch.testing.assert_close(f3, f1)
    torch.testing.assert_close(p3, 3.0 * p1)
    assert not torch.allclose(scaled(x), base(x))  # the code reaches the attention
    none, _ = _model("rois", positional="none", positional_scale=5.0)
    assert none.memory(x)[1] is None
    for bad in (0.0, -1.0, float("inf"), True):
        with pytest.raises(ConfigError, match="'positional_scale' must be a finite number > 0"):
            RoutingArchitecture(positional_scale=bad).check()
