"""Brain-IT modules (models/brainit.py) against direct dense implementations written here, plus the
multi-scale InfoNCE loss against a per-token loop."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as Fn

from brainenc.config import from_dict
from brainenc.exceptions import ConfigError, DataFormatError
from brainenc.models import MODELS, create_model
from brainenc.models.brainit import (
    TINY_BRAINIT,
    TINY_UNIVERSAL_ENCODER,
    BrainIT,
    BrainITArchitecture,
    BrainTokenizer,
    UniversalEncoderArchitecture,
    UniversalEncoderModel,
    VoxelEmbedding,
    segment_softmax,
)
from brainenc.training.losses import multiscale_infonce

COUNTS = [23, 31, 17]
SHAPES = [(5, 12), (3, 6)]


def _close(actual, expected, atol=1e-6, rtol=1e-5):
    """|actual - expected| <= atol + rtol * |expected| elementwise (float64 comparison)."""
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


def _encoder(**kw) -> UniversalEncoderModel:
    arch = from_dict(UniversalEncoderArchitecture, {**TINY_UNIVERSAL_ENCODER, **kw})
    return UniversalEncoderModel(arch, layer_shapes=SHAPES, voxel_counts=COUNTS)


def _bit(n_clusters=6, n_queries=9, out_dim=5, **kw) -> BrainIT:
    arch = from_dict(BrainITArchitecture, {**TINY_BRAINIT, **kw})
    return BrainIT(arch, voxel_counts=COUNTS, n_clusters=n_clusters, n_queries=n_queries, out_dim=out_dim)


def _batch(b=4, K=20, n_clusters=6, seed=0, subjects=(0, 2, 1, 0, 2, 1)):
    g = torch.Generator().manual_seed(seed)
    subject = torch.tensor(subjects[:b])
    voxel = torch.stack([torch.randint(0, COUNTS[s], (K,), generator=g) for s in subject.tolist()])
    cluster = torch.randint(0, n_clusters, (b, K), generator=g)
    beta = torch.randn(b, K, generator=g)
    tokens = [torch.randn(b, p, d, generator=g) for p, d in SHAPES]
    return beta, subject, voxel, cluster, tokens


# ------------------------------------------------------------------------------------------------
# configs, registry
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, key, value, field", [
    (UniversalEncoderArchitecture, "dropout", 1.0, "dropout"),
    (UniversalEncoderArchitecture, "voxel_chunk", 0, "voxel_chunk"),
    (UniversalEncoderArchitecture, "mlp_ratio", 0.0, "mlp_ratio"),
    (BrainITArchitecture, "heads", 7, "width"),
    (BrainITArchitecture, "n_self", -1, "n_self"),
])
def test_architecture_check_names_the_field(cls, key, value, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        from_dict(cls, {key: value})
    cls().check()  # defaults are valid


def test_registered_models_and_parameter_names():
    enc = create_model("brainit_encoder_tiny", layer_shapes=SHAPES, voxel_counts=COUNTS)
    bit = create_model("brainit_tiny", voxel_counts=COUNTS, n_clusters=4, n_queries=3, out_dim=2)
    assert isinstance(enc, UniversalEncoderModel) and enc.arch.embed_dim == TINY_UNIVERSAL_ENCODER["embed_dim"]
    assert isinstance(bit, BrainIT) and bit.arch.width == TINY_BRAINIT["width"]
    assert {"brainit", "brainit_encoder"} <= set(MODELS.list("brainit*"))
    with pytest.raises(ConfigError, match="query_set"):
        create_model("brainit_tiny", None, object(), voxel_counts=COUNTS, n_clusters=4, n_queries=3, out_dim=2)
    # per-subject blocks are the only parameters named "blocks.<s>" (new-subject transfer trains those alone)
    for model, owners in ((enc, ("voxel_embed.", "voxel_bias.")), (bit, ("voxel_embed.",))):
        names = [n for n, _ in model.named_parameters() if "blocks." in n]
        assert names and all(n.startswith(owners) for n in names)
        assert "voxel_embed.blocks.2" in dict(model.named_parameters())


# ------------------------------------------------------------------------------------------------
# VoxelEmbedding
# ------------------------------------------------------------------------------------------------
def test_voxel_embedding_gathers_rows_of_each_subject_and_grows():
    torch.manual_seed(0)
    emb = VoxelEmbedding(COUNTS, 4)
    assert emb.counts == COUNTS and [tuple(p.shape) for p in emb.blocks] == [(c, 4) for c in COUNTS]
    _, subject, voxel, _, _ = _batch(b=5, K=7)
    out = emb(subject, voxel)
    assert out.shape == (5, 7, 4)
    for i, s in enumerate(subject.tolist()):
        assert torch.equal(out[i], emb.blocks[s].detach()[voxel[i]])
    # one-subject batch (fast path)
    one = emb(torch.tensor([1, 1]), voxel[[2, 2]])
    assert torch.equal(one[0], emb.blocks[1].detach()[voxel[2]])
    # gradients reach exactly the gathered rows of the subjects present
    out.sum().backward()
    assert emb.blocks[0].grad is not None and emb.blocks[1].grad is not None
    used0 = torch.zeros(COUNTS[0], dtype=torch.bool)
    used0[voxel[subject == 0].ravel()] = True
    assert torch.all(emb.blocks[0].grad[~used0] == 0) and torch.all(emb.blocks[0].grad[used0] != 0)

    table = emb.table(1)
    assert not table.requires_grad and torch.equal(table, emb.blocks[1].detach())
    table += 1.0
    assert not torch.equal(table, emb.blocks[1].detach())  # a copy
    init = torch.arange(8 * 4, dtype=torch.float32).reshape(8, 4)
    assert emb.add_subject(8, init) == 3 and emb.counts == COUNTS + [8]
    assert torch.equal(emb(torch.tensor([3, 0]), torch.tensor([[7, 0], [0, 1]]))[0], init[[7, 0]])
    assert emb.add_subject(2) == 4 and emb.table(4).shape == (2, 4)
    with pytest.raises(DataFormatError):
        emb.add_subject(3, torch.zeros(2, 4))
    with pytest.raises(DataFormatError, match="subject"):
        emb(torch.tensor([9]), torch.zeros(1, 2, dtype=torch.long))


# ------------------------------------------------------------------------------------------------
# segment softmax, tokenizer
# ------------------------------------------------------------------------------------------------
def _dense_masked_softmax(scores, segment, n):
    """[b, n, K] masked softmax (the dense reference), read back at each entry's own segment."""
    mask = segment[:, None, :] == torch.arange(n)[None, :, None]
    logits = torch.where(mask, scores.double()[:, None, :], torch.tensor(-math.inf, dtype=torch.float64))
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return p.gather(1, segment[:, None, :])[:, 0]


def test_segment_softmax_equals_dense_masked_softmax():
    torch.manual_seed(0)
    b, K, n = 3, 40, 7
    segment = torch.randint(0, n - 1, (b, K))  # segment n - 1 is empty
    scores = torch.randn(b, K) * 4 + 500.0     # large offset: needs the per-segment max
    out = segment_softmax(scores, segment, n)
    assert out.dtype == torch.float32 and out.shape == (b, K)
    _close(out, _dense_masked_softmax(scores, segment, n), atol=1e-6, rtol=1e-5)
    sums = torch.zeros(b, n, dtype=torch.float64).scatter_add(1, segment, out.double())
    present = torch.zeros(b, n, dtype=torch.bool).scatter(1, segment, True)
    _close(sums[present], torch.ones(int(present.sum())), atol=1e-6, rtol=0)
    # gradient agrees with the dense reference's
    s1 = scores.clone().requires_grad_(True)
    s2 = scores.double().clone().requires_grad_(True)
    w = torch.randn(b, K)
    (segment_softmax(s1, segment, n) * w).sum().backward()
    (_dense_masked_softmax(s2, segment, n) * w.double()).sum().backward()
    _close(s1.grad, s2.grad, atol=1e-6, rtol=1e-4)


def _dense_tokenizer(tok: BrainTokenizer, x, cluster):
    """Masked attention with the [b, C, K] membership mask, float64, from the module's parameters."""
    p = {k: v.detach().double() for k, v in tok.state_dict().items()}
    x = x.double()
    C, w = tok.n_clusters, tok.width
    u = p["cluster_embed"]
    q = u @ p["q.weight"].T + p["q.bias"]
    k = x @ p["k.weight"].T + p["k.bias"]
    v = x @ p["v.weight"].T + p["v.bias"]
    scores = torch.einsum("cw,bkw->bck", q, k) / math.sqrt(w)
    mask = cluster[:, None, :] == torch.arange(C)[None, :, None]
    a = torch.softmax(scores.masked_fill(~mask, -math.inf), dim=-1).nan_to_num(0.0)
    h = a @ v + (u @ p["skip.weight"].T + p["skip.bias"])
    return Fn.layer_norm(torch.relu(h), (w,), p["norm.weight"], p["norm.bias"], eps=tok.norm.eps)


def test_tokenizer_equals_dense_masked_attention_with_an_empty_cluster():
    torch.manual_seed(0)
    b, K, C, w = 2, 30, 5, 16
    tok = BrainTokenizer(w, C)
    with torch.no_grad():  # larger queries than the init, so the attention is far from uniform
        tok.cluster_embed.normal_()
    x = torch.randn(b, K, w)
    cluster = torch.randint(0, C - 1, (b, K))
    cluster[1, cluster[1] == 1] = 0  # cluster C-1 empty in both rows, cluster 1 empty in row 1
    out = tok(x, cluster)
    assert out.shape == (b, C, w)
    ref = _dense_tokenizer(tok, x, cluster)
    _close(out, ref, atol=1e-5, rtol=1e-4)
    # an empty cluster is LN(ReLU(W_skip u_c))
    with torch.no_grad():
        empty = tok.norm(torch.relu(tok.skip(tok.cluster_embed[C - 1])))
    _close(out[0, C - 1], empty, atol=1e-6, rtol=1e-5)
    _close(out[1, 1], tok.norm(torch.relu(tok.skip(tok.cluster_embed[1]))).detach(), atol=1e-6, rtol=1e-5)


def test_cluster_token_depends_only_on_its_member_voxels():
    torch.manual_seed(0)
    bit = _bit(n_clusters=4)
    beta, subject, voxel, cluster, _ = _batch(b=2, K=25, n_clusters=4)
    beta.requires_grad_(True)
    tokens = bit.brain_tokens(beta, subject, voxel, cluster)
    assert tokens.shape == (2, 4, bit.arch.width)
    r = torch.randn(bit.arch.width)  # a random read-out (the sum of a LayerNorm output has zero gradient)
    for i in range(2):
        for c in range(4):
            (g,) = torch.autograd.grad(tokens[i, c] @ r, beta, retain_graph=True)
            member = torch.zeros_like(beta, dtype=torch.bool)
            member[i] = cluster[i] == c
            assert torch.all(g[~member] == 0), (i, c)
            assert member.any() and torch.all(g[member] != 0), (i, c)


# ------------------------------------------------------------------------------------------------
# BIT
# ------------------------------------------------------------------------------------------------
def test_bit_shapes_and_output_queries_are_independent():
    torch.manual_seed(0)
    bit = _bit(n_queries=9, out_dim=5).eval()
    with torch.no_grad():
        bit.queries.normal_()  # queries of order 1 so that attention depends on them
    beta, subject, voxel, cluster, _ = _batch(b=3, K=20)
    with torch.no_grad():
        full = bit(beta, subject, voxel, cluster)
        assert full.shape == (3, 9, 5) and full.dtype == torch.float32
        tol = {"atol": 1e-6 * float(full.abs().max()), "rtol": 1e-5}
        for i in (0, 4, 8):
            one = bit(beta, subject, voxel, cluster, query_index=torch.tensor([i]))
            assert one.shape == (3, 1, 5)
            _close(one[:, 0], full[:, i], **tol)
        per = torch.tensor([[8, 1], [3, 3], [0, 7]])
        sel = bit(beta, subject, voxel, cluster, query_index=per)
        _close(sel, full[torch.arange(3)[:, None], per], **tol)
        # perturbing query j changes output j only
        j = 2
        bit.queries[j] += torch.randn(bit.arch.width)
        moved = bit(beta, subject, voxel, cluster)
    others = [k for k in range(9) if k != j]
    _close(moved[:, others], full[:, others], **tol)
    assert (moved[:, j] - full[:, j]).abs().max() > 1e-3
    with pytest.raises(DataFormatError, match="query_index"):
        bit(beta, subject, voxel, cluster, query_index=torch.zeros(2, 2, dtype=torch.long))


def test_bit_add_subject_and_bf16_autocast():
    torch.manual_seed(0)
    bit = _bit()
    init = torch.randn(11, bit.arch.width)
    s = bit.add_subject(11, init)
    assert s == 3 and bit.voxel_embed.counts == COUNTS + [11]
    torch.testing.assert_close(bit.voxel_embed.table(s), init)
    beta = torch.randn(2, 6)
    voxel = torch.randint(0, 11, (2, 6))
    cluster = torch.randint(0, 6, (2, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bit(beta, torch.tensor([s, s]), voxel, cluster)
    assert out.dtype == torch.float32 and out.shape == (2, 9, 5) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------
# universal encoder
# ------------------------------------------------------------------------------------------------
def _encoder_reference(model: UniversalEncoderModel, tokens, subject, voxel):
    """The b.1 equations written directly (float64, per example, all voxels at once)."""
    p = {k: v.detach().double() for k, v in model.state_dict().items()}
    td = model.arch.token_dim
    out = []
    for i, s in enumerate(subject.tolist()):
        e = p[f"voxel_embed.blocks.{s}"][voxel[i]]                      # [K, ev]
        fs = []
        for l, t in enumerate(tokens):
            pre = f"layers.{l}."

            def ln(x, n, pre=pre):
                return Fn.layer_norm(x, (x.shape[-1],), p[pre + n + ".weight"], p[pre + n + ".bias"])

            T = ln(t[i].double(), "norm_in") @ p[pre + "proj_in.weight"].T + p[pre + "proj_in.bias"]
            Kx = T @ p[pre + "project_x.weight"].T + p[pre + "project_x.bias"] + p[pre + "pos"]
            q = e @ p[pre + "query.weight"].T + p[pre + "query.bias"]
            a = torch.softmax(q @ Kx.T / math.sqrt(td), dim=-1)
            h = ln(a @ T, "norm_out")
            hid = Fn.gelu(h @ p[pre + "mlp.0.weight"].T + p[pre + "mlp.0.bias"])
            fs.append(h + hid @ p[pre + "mlp.2.weight"].T + p[pre + "mlp.2.bias"])
        g = torch.cat(fs, -1)
        W = e @ p["feat_embed"]
        out.append((g * W).sum(-1) + p[f"voxel_bias.blocks.{s}"][voxel[i], 0])
    return torch.stack(out)


def test_universal_encoder_matches_equations_and_chunking():
    torch.manual_seed(0)
    big = _encoder(voxel_chunk=1000).eval()
    small = _encoder(voxel_chunk=7).eval()
    small.load_state_dict(big.state_dict())
    with torch.no_grad():
        for p in big.voxel_bias.blocks:
            p.normal_()
        small.load_state_dict(big.state_dict())
        beta, subject, voxel, _, tokens = _batch(b=4, K=30)
        ref = _encoder_reference(big, tokens, subject, voxel)
        y_big = big(tokens, subject, voxel)
        y_small = small(tokens, subject, voxel)
    assert y_big.shape == (4, 30) and y_big.dtype == torch.float32
    tol = {"atol": 1e-6 * float(ref.abs().max()), "rtol": 1e-5}
    _close(y_big, ref, **tol)
    _close(y_small, y_big, **tol)
    assert big(tokens, subject, voxel[:, :0]).shape == (4, 0)
    with pytest.raises(DataFormatError, match="token layers"):
        big(tokens[:1], subject, voxel)


def test_universal_encoder_checkpoint_gives_the_same_gradients():
    beta, subject, voxel, _, tokens = _batch(b=3, K=26, subjects=(0, 2, 2))
    torch.manual_seed(0)
    plain = _encoder(voxel_chunk=8, dropout=0.25, checkpoint=False).train()
    ckpt = _encoder(voxel_chunk=8, dropout=0.25, checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    target = torch.randn(3, 26)
    grads, outs = [], []
    for model in (plain, ckpt):
        torch.manual_seed(123)  # the same dropout masks (checkpoint restores the RNG when recomputing)
        y = model(tokens, subject, voxel)
        ((y - target) ** 2).mean().backward()
        outs.append(y.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    _close(outs[1], outs[0], atol=1e-6, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        scale = float(grads[0][n].abs().max())
        _close(grads[1][n], grads[0][n], atol=1e-6 * scale + 1e-12, rtol=1e-5)
    assert "voxel_embed.blocks.1" not in grads[0]  # subject 1 absent from the batch: no gradient


def test_universal_encoder_add_subject():
    torch.manual_seed(0)
    enc = _encoder()
    init = torch.randn(9, enc.arch.embed_dim)
    s = enc.add_subject(9, init)
    assert s == 3 and enc.voxel_embed.counts == COUNTS + [9] and enc.voxel_bias.counts == COUNTS + [9]
    assert torch.equal(enc.voxel_embed.table(s), init) and torch.all(enc.voxel_bias.table(s) == 0)
    tokens = [torch.randn(2, p, d) for p, d in SHAPES]
    assert enc(tokens, torch.tensor([s, 0]), torch.randint(0, 9, (2, 5))).shape == (2, 5)


# ------------------------------------------------------------------------------------------------
# multi-scale InfoNCE
# ------------------------------------------------------------------------------------------------
def _infonce_loop(pred, target, sizes, scale):
    pred, target = pred.double(), target.double()
    b, _, d = pred.shape
    total, start = 0.0, 0
    for n in sizes:
        P = [pred[i, start + j] for i in range(b) for j in range(n)]
        T = [target[i, start + j] for i in range(b) for j in range(n)]
        start += n
        N = len(P)
        rows = cols = 0.0
        for i in range(N):
            li = torch.stack([scale * (P[i] @ T[j]) for j in range(N)])
            rows += -(li[i] - torch.logsumexp(li, 0))
            lc = torch.stack([scale * (P[j] @ T[i]) for j in range(N)])
            cols += -(lc[i] - torch.logsumexp(lc, 0))
        total += (rows / N + cols / N) / 2
    return total / len(sizes)


@pytest.mark.parametrize("sizes, scale", [([2, 3], 1.0), ([1, 2, 3], 0.5)])
def test_multiscale_infonce_equals_a_loop(sizes, scale):
    torch.manual_seed(0)
    b, d = 3, 4
    pred = torch.randn(b, sum(sizes), d)
    target = pred + 0.5 * torch.randn(b, sum(sizes), d)
    loss = multiscale_infonce(pred, target, sizes, logit_scale=scale)
    assert loss.shape == () and loss.dtype == torch.float32
    ref = _infonce_loop(pred, target, sizes, scale)
    _close(loss, ref, atol=1e-6, rtol=1e-5)
    # an asymmetric pair: both directions are in the loss
    other = multiscale_infonce(target, pred, sizes, logit_scale=scale)
    _close(other, _infonce_loop(target, pred, sizes, scale), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="group_sizes"):
        multiscale_infonce(pred, target, [sum(sizes) + 1])


# ------------------------------------------------------------------------------------------------
# training smoke tests
# ------------------------------------------------------------------------------------------------
def _train(model, loss_fn, steps=25, lr=3e-3):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_adam_steps_lower_each_models_loss():
    torch.manual_seed(0)
    beta, subject, voxel, cluster, tokens = _batch(b=4, K=20)
    enc = _encoder().train()
    y = torch.randn(4, 20)
    losses = _train(enc, lambda: ((enc(tokens, subject, voxel) - y) ** 2).mean(), lr=1e-2)
    assert losses[-1] < 0.8 * losses[0], losses

    bit = _bit(n_queries=6, out_dim=5).train()
    target = torch.randn(4, 6, 5)
    losses = _train(bit, lambda: ((bit(beta, subject, voxel, cluster) - target) ** 2).mean())
    assert losses[-1] < 0.8 * losses[0], losses

    bit = _bit(n_queries=6, out_dim=5).train()
    qi = torch.tensor([0, 1, 3, 4, 5])
    losses = _train(bit, lambda: multiscale_infonce(bit(beta, subject, voxel, cluster, query_index=qi),
                                                    target[:, qi], [3, 2], logit_scale=1.0))
    assert losses[-1] < 0.9 * losses[0], losses
