"""Brain-IT estimators: universal encoder, functional clusters, BIT decoder, transfer (tiny CPU data)."""
import numpy as np
import pytest
import torch

from brainenc import load
from brainenc.decoding.brainit import (BrainITDecoder, FunctionalClusters, UniversalBrainEncoder,
                                       concat_token_scales, maps_to_tokens, sample_voxels)
from brainenc.exceptions import ConfigError, DataFormatError

COUNTS = [40, 55]


def _problem(n=48, seed=0):
    """Two subjects whose voxels read a few token positions of one layer (a known linear encoder)."""
    rng = np.random.default_rng(seed)
    tokens = [rng.normal(size=(n, 9, 6)).astype(np.float32), rng.normal(size=(n, 4, 5)).astype(np.float32)]
    subject = np.arange(n) % 2
    w = [rng.normal(size=(c, 9 * 6)) / 7 for c in COUNTS]
    Y = np.zeros((n, max(COUNTS)), np.float32)
    for i in range(n):
        s = subject[i]
        Y[i, :COUNTS[s]] = w[s] @ tokens[0][i].ravel()
    targets = np.concatenate([tokens[0], tokens[0][:, :3] * 2], axis=1)  # [n, 12, 6]: two "scales"
    return tokens, Y, subject, targets


def _enc(**train):
    return UniversalBrainEncoder(model={"embed_dim": 8, "token_dim": 8, "dropout": 0.0, "voxel_chunk": 16},
                                 train={"epochs": 3, "batch_size": 8, "seed": 0, **train}, voxels_per_example=30,
                                 val_fraction=0.25)


def _bit(loss="mse", **kw):
    return BrainITDecoder(model={"width": 16, "heads": 2, "n_self": 1}, loss=loss, voxels_per_example=50,
                          train={"epochs": 3, "batch_size": 8, "warmup_epochs": 1, "seed": 0}, val_fraction=0.25,
                          **kw)


def test_sample_voxels_is_a_function_of_row_and_epoch():
    a = sample_voxels([3, 7], [0, 1], COUNTS, 20, seed=1, epoch=2)
    b = sample_voxels([7, 3], [1, 0], COUNTS, 20, seed=1, epoch=2)
    np.testing.assert_array_equal(a, b[::-1])
    assert a.shape == (2, 20) and a[0].max() < COUNTS[0] and a[1].max() < COUNTS[1]
    assert not np.array_equal(a, sample_voxels([3, 7], [0, 1], COUNTS, 20, seed=1, epoch=3))


def test_token_scales_tile_channels():
    t, sizes = concat_token_scales([np.ones((2, 3, 2)), 2 * np.ones((2, 1, 4))])
    assert t.shape == (2, 4, 4) and sizes == [3, 1]
    m, sizes = maps_to_tokens([np.arange(2 * 3 * 2 * 2).reshape(2, 3, 2, 2)], dim=5)
    assert m.shape == (2, 4, 5) and sizes == [4]
    np.testing.assert_array_equal(m[..., 3:], m[..., :2])  # channels 0, 1 repeated


def test_encoder_learns_saves_and_transfers(tmp_path):
    tokens, Y, subject, _ = _problem()
    enc = _enc(epochs=6, lr=3e-3).fit(tokens, Y, subject, voxel_counts=COUNTS, subjects=["a", "b"])
    losses = [h["train_loss"] for h in enc.history_]
    assert losses[-1] < losses[0]
    assert enc.voxel_embeddings("b").shape == (55, 8)
    pred = enc.predict(tokens, "a")
    assert pred.shape == (48, 40)
    enc.save_pretrained(tmp_path / "enc")
    back = load(tmp_path / "enc")
    np.testing.assert_array_equal(back.predict(tokens, "a"), pred)

    # transfer: a third subject; only its embeddings (and biases) change, bitwise
    before = {k: v.clone() for k, v in enc.model_.state_dict().items()}
    new = enc.fit_new_subject(tokens, Y[:, :30], name="c", train={"epochs": 2})
    assert new.subjects_ == ["a", "b", "c"] and enc.subjects_ == ["a", "b"]
    after = new.model_.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k  # every pre-existing parameter unchanged
    changed = [k for k in after if k not in before]
    assert sorted(changed) == ["voxel_bias.blocks.2", "voxel_embed.blocks.2"]
    assert new.predict(tokens, "c").shape == (48, 30)
    with pytest.raises(ConfigError, match="already"):
        new.fit_new_subject(tokens, Y[:, :30], name="a")


def test_encoder_rejects_bad_input():
    tokens, Y, subject, _ = _problem()
    with pytest.raises(DataFormatError, match="columns"):
        _enc().fit(tokens, Y[:, :10], subject, voxel_counts=COUNTS)
    with pytest.raises(DataFormatError, match="list of arrays"):
        _enc().fit(tokens[0], Y, subject, voxel_counts=COUNTS)
    with pytest.raises(ConfigError, match="voxels_per_example"):
        UniversalBrainEncoder.from_config({"voxels_per_example": 0})


def test_clusters_assign_nearest_reference():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 5)) * 4
    emb = [centres[rng.integers(0, 3, n)] + rng.normal(size=(n, 5)) * 0.1 for n in (60, 70)]
    cl = FunctionalClusters(n_clusters=3, covariance_type="diag").fit(emb, ["a", "b"])
    assert cl.labels("a").shape == (60,) and cl.sizes().shape == (2, 3)
    assert (cl.sizes() > 0).all()  # every cluster holds voxels of every subject
    new = emb[1][:10] * 1.5  # same directions: the nearest reference voxels are themselves
    labels, nearest = cl.assign(new)
    np.testing.assert_array_equal(nearest, 60 + np.arange(10))
    np.testing.assert_array_equal(labels, cl.labels("b")[:10])


def test_clusters_save_load(tmp_path):
    rng = np.random.default_rng(1)
    cl = FunctionalClusters(n_clusters=2, covariance_type="spherical").fit([rng.normal(size=(20, 3))])
    cl.save_pretrained(tmp_path / "cl")
    back = load(tmp_path / "cl")
    np.testing.assert_array_equal(back.cluster_table(), cl.cluster_table())
    np.testing.assert_array_equal(back.assign(np.eye(3))[1], cl.assign(np.eye(3))[1])


@pytest.mark.parametrize("loss", ["mse", "infonce"])
def test_bit_fits_saves_and_transfers(tmp_path, loss):
    _, Y, subject, targets = _problem()
    clusters = np.arange(sum(COUNTS)) % 4
    kw = {"group_samples": [4, 2]} if loss == "infonce" else {}
    dec = _bit(loss, **kw).fit(Y, subject, targets, voxel_counts=COUNTS, clusters=clusters, n_clusters=4,
                               group_sizes=[9, 3] if loss == "infonce" else None, subjects=["a", "b"])
    assert np.isfinite([h["train_loss"] for h in dec.history_]).all()
    pred = dec.predict(Y[:5, :40], "a")
    assert pred.shape == (5, 12, 6)
    dec.save_pretrained(tmp_path / "bit")
    np.testing.assert_array_equal(load(tmp_path / "bit").predict(Y[:5, :40], "a"), pred)

    before = {k: v.clone() for k, v in dec.model_.state_dict().items()}
    init_from = np.arange(30) + 40  # subject b's first voxels
    new = dec.fit_new_subject(Y[:, :30], targets, name="c", clusters=np.arange(30) % 4, init_from=init_from,
                              train={"epochs": 2})
    after = new.model_.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert [k for k in after if k not in before] == ["voxel_embed.blocks.2"]
    assert not torch.equal(after["voxel_embed.blocks.2"], before["voxel_embed.blocks.1"][:30])  # it trained
    assert new.predict(Y[:3, :30], "c").shape == (3, 12, 6)


def test_bit_augment_rows_train_but_never_validate(monkeypatch):
    from brainenc.training import Trainer

    _, Y, subject, targets = _problem()
    _, Ya, sa, ta = _problem(n=16, seed=1)
    ta = ta * 10 + 5  # synthetic targets far from the real ones: they must not enter the statistics
    clusters = np.arange(sum(COUNTS)) % 4
    seen = []
    real_fit = Trainer.fit

    def spy(self, train, Y=None, val=None, **kw):
        seen.append((len(train["y"]), len(val["y"]), np.asarray(val["target"][:]).max()))
        return real_fit(self, train, Y, val, **kw)

    monkeypatch.setattr(Trainer, "fit", spy)
    kw = dict(voxel_counts=COUNTS, clusters=clusters, n_clusters=4)
    base = _bit().fit(Y, subject, targets, **kw)
    aug = _bit().fit(Y, subject, targets, augment=(Ya, sa, ta), **kw)
    (n_base, v_base, _), (n_aug, v_aug, vmax) = seen
    assert (n_base, v_base) == (36, 12) and (n_aug, v_aug) == (36 + 16, 12)  # validation: the same real rows
    assert vmax <= np.abs(targets).max()
    assert aug.n_augmented_ == 16 and base.n_augmented_ == 0
    np.testing.assert_array_equal(aug.target_mean_, base.target_mean_)
    np.testing.assert_array_equal(aug.target_std_, base.target_std_)
    a, b = aug.model_.state_dict(), base.model_.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the synthetic rows were trained on
    with pytest.raises(DataFormatError, match="'augment' responses"):
        _bit().fit(Y, subject, targets, augment=(Ya[:, :40], sa, ta), **kw)
    with pytest.raises(DataFormatError, match="'augment' targets"):
        _bit().fit(Y, subject, targets, augment=(Ya, sa, ta[:, :5]), **kw)
    with pytest.raises(DataFormatError, match="'subject' indices"):
        _bit().fit(Y, subject, targets, augment=(Ya, sa + 5, ta), **kw)


def test_bit_initialisation_from_nearest_copies_embeddings():
    _, Y, subject, targets = _problem()
    clusters = np.arange(sum(COUNTS)) % 4
    dec = _bit().fit(Y, subject, targets, voxel_counts=COUNTS, clusters=clusters, n_clusters=4)
    new = dec.fit_new_subject(Y[:, :5], targets, name="c", clusters=np.zeros(5, int), init_from=[0, 1, 2, 41, 42],
                              train={"epochs": 1, "lr": 1e-12, "warmup_epochs": 0})
    ref = torch.cat([dec.model_.voxel_embed.table(0)[:3], dec.model_.voxel_embed.table(1)[1:3]])
    torch.testing.assert_close(new.model_.voxel_embed.table(2), ref, atol=1e-6, rtol=0)


def test_bit_rejects_bad_clusters():
    _, Y, subject, targets = _problem()
    with pytest.raises(DataFormatError, match="clusters"):
        _bit().fit(Y, subject, targets, voxel_counts=COUNTS, clusters=np.zeros(3, int), n_clusters=4)
    with pytest.raises(DataFormatError, match="group_sizes"):
        _bit("infonce").fit(Y, subject, targets, voxel_counts=COUNTS, clusters=np.zeros(95, int), n_clusters=4,
                            group_sizes=[5, 5])
