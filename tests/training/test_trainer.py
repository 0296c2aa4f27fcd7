"""Trainer evidence: loss decreases, bitwise resume after a kill, safetensors-only checkpoints,
seeded data order, ensembling weights."""
import json
import random

import numpy as np
import pytest
import torch
from scipy.special import softmax

from brainenc.exceptions import BrainencError, ConfigError, DataFormatError
from brainenc.models import build_query_set, create_model
from brainenc.training import (
    ArrayDataset,
    GlobalBatchSampler,
    SoftmaxEnsemble,
    TrainConfig,
    Trainer,
    capture_rng_state,
    load_tensors,
    mix_predictions,
    optimizer_from_parts,
    optimizer_to_parts,
    pearson_r_torch,
    restore_rng_state,
    softmax_weights,
)

N_TOK, F, V = 12, 24, 20


@pytest.fixture
def data(toy_regression):
    """(X [40, N_TOK, F], Y [40, V]): Y is token 4's first V features + noise (conftest.py)."""
    return toy_regression(40, 0, n_tok=N_TOK, dim=F, n_vox=V, signal_token=4)


def _model(seed=123, dropout=0.1):
    torch.manual_seed(seed)
    qs = build_query_set("hemis", V, hemi=np.array(["lh"] * 10 + ["rh"] * 10))
    return create_model("routing_encoder_tiny", feature_dim=F, grid=(3, 4), n_voxels=V, dropout=dropout, query_set=qs)


def test_two_steps_lower_the_loss(data):
    X, Y = data
    model = _model(dropout=0.0)
    x, y = torch.from_numpy(X[:16]), torch.from_numpy(Y[:16])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[2] < losses[1] < losses[0]


def test_resume_after_kill_is_bitwise_identical(tmp_path, data, kill):
    X, Y = data
    cfg = TrainConfig(epochs=4, batch_size=8, lr=2e-3, seed=7)
    straight = _model()
    res_a = Trainer(straight, cfg, run_dir=tmp_path / "a").fit(X[:32], Y[:32], (X[32:], Y[32:]))
    with pytest.raises(kill.error):
        Trainer(_model(), cfg, run_dir=tmp_path / "b").fit(X[:32], Y[:32], (X[32:], Y[32:]), callbacks=[kill.after(2)])
    # the "new process": other init, scrambled global RNGs; everything must come from the checkpoint
    torch.manual_seed(999)
    np.random.seed(1)
    random.seed(2)
    resumed = _model(seed=5)
    res_b = Trainer(resumed, cfg, run_dir=tmp_path / "b").fit(X[:32], Y[:32], (X[32:], Y[32:]), resume=True)
    last_a = load_tensors(tmp_path / "a" / "checkpoints" / "epoch-0004" / "model.safetensors")
    last_b = load_tensors(tmp_path / "b" / "checkpoints" / "epoch-0004" / "model.safetensors")
    assert last_a.keys() == last_b.keys()
    for k in last_a:
        assert torch.equal(last_a[k], last_b[k]), k
    for k, v in straight.state_dict().items():  # best-epoch weights held by the models
        assert torch.equal(v, resumed.state_dict()[k]), k
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(res_a.history) == strip(res_b.history)
    assert res_a.best_epoch == res_b.best_epoch
    np.testing.assert_array_equal(res_a.val_scores, res_b.val_scores)
    # dropout was active, so resume had to restore the torch RNG; and training really changed the weights
    first = load_tensors(tmp_path / "b" / "best" / "model.safetensors")
    assert "__val_r__" in first
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]


def test_checkpoint_files_are_safetensors_and_json_only(tmp_path, data):
    X, Y = data
    Trainer(_model(), TrainConfig(epochs=1, batch_size=16), run_dir=tmp_path).fit(X, Y)
    files = sorted(p.name for p in (tmp_path / "checkpoints").rglob("*") if p.is_file())
    assert files == ["latest.json", "model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert not p.read_bytes().startswith(b"\x80"), f"{p} looks like a pickle"


def test_optimizer_state_round_trip(data):
    model = _model(dropout=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    X, Y = data
    for _ in range(2):
        loss = torch.nn.functional.mse_loss(model(torch.from_numpy(X[:4])), torch.from_numpy(Y[:4]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    tensors, struct = optimizer_to_parts(opt)
    struct = json.loads(json.dumps(struct))
    opt2 = torch.optim.AdamW(model.parameters(), lr=5.0)
    optimizer_from_parts(opt2, tensors, struct)
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for k in a["state"][i]:
            assert torch.equal(a["state"][i][k], b["state"][i][k])


def test_rng_capture_restore():
    g = torch.Generator().manual_seed(3)
    tensors, meta = capture_rng_state(g)
    meta = json.loads(json.dumps(meta))
    first = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=g))
    restore_rng_state(tensors, meta, g)
    second = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=g))
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert first[2] == second[2] and torch.equal(first[3], second[3])


def test_global_batches_are_split_across_ranks():
    gens = [torch.Generator().manual_seed(0) for _ in range(3)]
    single = list(GlobalBatchSampler(21, 8, gens[0]))
    r0 = list(GlobalBatchSampler(21, 8, gens[1], rank=0, world=2))
    r1 = list(GlobalBatchSampler(21, 8, gens[2], rank=1, world=2))
    assert [len(b) for b in single] == [8, 8, 5]
    assert [a + b for a, b in zip(r0, r1)] == single
    assert len(GlobalBatchSampler(17, 8, None, world=2)) == 2  # final batch of 1 < world is dropped


def test_pearson_torch_matches_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((30, 5)), rng.standard_normal((30, 5))
    ref = [np.corrcoef(a[:, i], b[:, i])[0, 1] for i in range(5)]
    np.testing.assert_allclose(pearson_r_torch(torch.from_numpy(a), torch.from_numpy(b)).numpy(), ref, rtol=1e-10)


def test_softmax_ensemble_weights():
    rng = np.random.default_rng(0)
    r = rng.uniform(-0.2, 0.8, (3, 7))
    w = softmax_weights(r, tau=40)
    np.testing.assert_allclose(w, softmax(40 * r, axis=0), rtol=1e-12)
    np.testing.assert_allclose(softmax_weights(r, tau=0), 1 / 3)
    preds = rng.standard_normal((3, 4, 7))
    np.testing.assert_allclose(mix_predictions(preds, w), np.einsum("mnv,mv->nv", preds, w), rtol=1e-5)
    # a member that is the truth on some voxels wins those voxels at high tau
    y = rng.standard_normal((50, 6))
    good = y.copy()
    good[:, 3:] = rng.standard_normal((50, 3))
    bad = rng.standard_normal((50, 6))
    bad[:, 3:] = y[:, 3:] + 0.01 * rng.standard_normal((50, 3))
    ens = SoftmaxEnsemble(tau=40).fit([good, bad], y)
    assert (ens.weights_[0, :3] > 0.99).all() and (ens.weights_[1, 3:] > 0.99).all()
    mixed = ens.predict([good, bad])
    assert np.abs(mixed - y).max() < 0.1
    # same-group members are averaged before mixing
    ens2 = SoftmaxEnsemble().fit([good, good, bad], y, groups=["a", "a", "b"])
    assert ens2.weights_.shape == (2, 6)


def _assert_one_line_value_error(err):
    assert isinstance(err, BrainencError) and isinstance(err, ValueError) and "\n" not in str(err)


def test_ensemble_input_errors():
    rng = np.random.default_rng(1)
    y = rng.standard_normal((20, 4))
    preds = [rng.standard_normal((20, 4)) for _ in range(3)]
    cases = [
        (DataFormatError, r"'val_scores' must be \[M, V\] \(members x voxels\); got shape \(4,\)",
         lambda: softmax_weights(np.zeros(4))),
        (DataFormatError, r"'predictions' has 3 members but 'weights' has 2 rows",
         lambda: mix_predictions(preds, np.full((2, 4), 0.5))),
        (DataFormatError, r"'predictions' has 0 members but 'weights' has 0 rows",
         lambda: mix_predictions([], np.zeros((0, 4)))),
        (ConfigError, r"'groups' must have one label per member \(3\); 2 labels were provided",
         lambda: SoftmaxEnsemble().fit(preds, y, groups=["a", "b"])),
        (DataFormatError, r"'predictions' must have the 3 members given to fit; got 2",
         lambda: SoftmaxEnsemble().fit(preds, y, groups=["a", "a", "b"]).predict(preds[:2])),
    ]
    for cls, match, call in cases:
        with pytest.raises(cls, match=match) as exc:
            call()
        _assert_one_line_value_error(exc.value)


def test_array_dataset_rejects_unequal_rows():
    with pytest.raises(DataFormatError, match=r"'X' has 5 rows, 'Y' has 4; they must have the same number of rows") \
            as exc:
        ArrayDataset(np.zeros((5, 2, 3), np.float32), np.zeros((4, 2), np.float32))
    _assert_one_line_value_error(exc.value)


def test_row_subset_reads_memmap_rows_lazily(tmp_path):
    from brainenc.training import RowSubset

    arr = np.arange(60, dtype=np.float32).reshape(10, 3, 2)
    np.save(tmp_path / "a.npy", arr)
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")
    sub = RowSubset(mm, [7, 2, 5])
    assert len(sub) == 3 and sub.shape == (3, 3, 2)
    np.testing.assert_array_equal(sub[np.array([2, 0])], arr[[5, 7]])
    x, = ArrayDataset(sub).__getitems__([1, 2, 0])
    np.testing.assert_array_equal(x.numpy(), arr[[2, 5, 7]])


def test_concat_rows_reads_each_part_for_its_rows(tmp_path):
    from brainenc.training import ConcatRows, RowSubset

    a = np.arange(24, dtype=np.float32).reshape(4, 3, 2)
    np.save(tmp_path / "b.npy", -np.arange(30, dtype=np.float16).reshape(5, 3, 2))
    b = np.load(tmp_path / "b.npy", mmap_mode="r")
    both = np.concatenate([a, np.asarray(b, np.float32)])
    cat = ConcatRows([RowSubset(a, [0, 1, 2, 3]), b])
    assert len(cat) == 9 and cat.shape == (9, 3, 2) and cat.dtype == np.float32
    idx = np.array([8, 0, 4, 3, 4, -1])
    np.testing.assert_array_equal(cat[idx], both[idx])
    np.testing.assert_array_equal(cat[2:7], both[2:7])
    np.testing.assert_array_equal(cat[5], both[5])
    x, = ArrayDataset(cat).__getitems__([6, 1])
    np.testing.assert_array_equal(x.numpy(), both[[6, 1]])
    with pytest.raises(IndexError):
        cat[np.array([9])]
    with pytest.raises(DataFormatError, match="shapes"):
        ConcatRows([a, np.zeros((2, 3, 3))])


# ---- streamed channel statistics (token standardisation) ----------------------------------------
@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])
def test_channel_statistics_match_numpy_for_any_chunking(chunk_rows, tmp_path):
    from brainenc.training import RowSubset, channel_statistics

    rng = np.random.default_rng(0)
    # channels with a large mean relative to their spread: a naive sum of squares would cancel
    x = (rng.standard_normal((53, 6, 4)) * np.array([1e-3, 1.0, 30.0, 2.0]) + np.array([1e3, -5.0, 0.0, 7.0]))
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float16, shape=x.shape)
    mm[:] = x
    for arr, ref in ((x, x), (mm, np.asarray(mm, dtype=np.float64))):
        mean, std = channel_statistics(arr, chunk_rows=chunk_rows)
        flat = ref.reshape(-1, 4)
        np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-12, atol=1e-12 * np.abs(flat).max())
        np.testing.assert_allclose(std, flat.std(0), rtol=1e-9, atol=1e-12 * np.abs(flat).max())
    rows = np.array([50, 3, 17, 4])
    mean, std = channel_statistics(RowSubset(x, rows), chunk_rows=chunk_rows)
    np.testing.assert_allclose(mean, x[rows].reshape(-1, 4).mean(0), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(std, x[rows].reshape(-1, 4).std(0), rtol=1e-9, atol=1e-9)
