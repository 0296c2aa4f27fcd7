"""Pluggable objectives, optimisers/schedules by name and the dict data bridge of the Trainer.

Evidence: the array and dict forms of voxel regression train bitwise alike; a masked-reconstruction
objective (per-sample varying term counts) learns, selects its best epoch by "min", resumes bitwise
after a kill and matches a 2-process DDP run; schedules match closed forms / torch's schedulers;
configs reject unknown names in one line.
"""
import dataclasses
import importlib.util
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from brainenc.config import from_dict
from brainenc.exceptions import ConfigError, DataFormatError
from brainenc.training import (
    DictDataset,
    GlobalBatchSampler,
    LossSum,
    MaskedReconstruction,
    Objective,
    RowSubset,
    TrainConfig,
    Trainer,
    Validation,
    VoxelRegression,
    build_optimizer,
    build_scheduler,
    load_tensors,
    make_dict_loader,
    make_loader,
)

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("ddp_worker_objectives", HERE / "ddp_worker_objectives.py")
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)

N_TOK, F, V = 6, 8, 5


@pytest.fixture
def reg_data(toy_regression):
    """``reg_data(n=30, seed=0) -> (X [n, N_TOK, F], Y [n, V])``: Y is token 2's first V features + noise."""
    return lambda n=30, seed=0: toy_regression(n, seed, n_tok=N_TOK, dim=F, n_vox=V, signal_token=2)


class _Reg(nn.Module):
    def __init__(self, dropout=0.1):
        super().__init__()
        self.a = nn.Linear(F, 8)
        self.drop = nn.Dropout(dropout)
        self.b = nn.Linear(8 * N_TOK, V)

    def forward(self, x):
        return self.b(self.drop(torch.relu(self.a(x))).flatten(1))


def _reg_model(seed=1, dropout=0.1):
    torch.manual_seed(seed)
    return _Reg(dropout)


def _strip(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- voxel regression: the dict API is the array API --------------------------------------------
def test_voxel_regression_dict_form_equals_array_form(reg_data):
    X, Y = reg_data()
    cfg = TrainConfig(epochs=3, batch_size=8, lr=3e-3, seed=5, device="cpu")
    ma, mb = _reg_model(), _reg_model()
    ra = Trainer(ma, cfg).fit(X[:24], Y[:24], (X[24:], Y[24:]))
    rb = Trainer(mb, cfg, objective=VoxelRegression()).fit({"x": X[:24], "y": Y[:24]}, val={"x": X[24:], "y": Y[24:]})
    _assert_same_state(ma.state_dict(), mb.state_dict())
    assert _strip(ra.history) == _strip(rb.history)
    assert (ra.best_epoch, ra.best_score, ra.metric, ra.mode) == (rb.best_epoch, rb.best_score, "val_r", "max")
    np.testing.assert_array_equal(ra.val_scores, rb.val_scores)
    # val_r is the mean per-voxel Pearson r of the best weights' predictions
    pred = Trainer(mb, cfg).predict(X[24:])
    r = [np.corrcoef(Y[24:, v], pred[:, v])[0, 1] for v in range(V)]
    np.testing.assert_allclose(rb.val_scores, r, rtol=1e-5, atol=1e-6)
    assert rb.best_score == pytest.approx(np.mean(r), abs=1e-6)


def test_voxel_regression_loss_is_the_global_mean_squared_error(reg_data):
    X, Y = reg_data(10)
    model = _reg_model(dropout=0.0)
    batch = {"x": torch.from_numpy(X), "y": torch.from_numpy(Y)}
    parts = VoxelRegression().loss(model, batch)
    assert parts.count == 10 * V and parts.per_sample == V
    ref = nn.functional.mse_loss(model(batch["x"]), batch["y"], reduction="sum")
    torch.testing.assert_close(parts.total, ref, rtol=1e-6, atol=0)


def test_fit_argument_errors(reg_data):
    X, Y = reg_data(12)
    tr = Trainer(_reg_model(), TrainConfig(epochs=1, device="cpu"))
    # calling fit the wrong way is a ConfigError naming the argument (still a ValueError, one line)
    for args, kwargs, match in [
        (({"x": X, "y": Y}, Y), {}, r"fit\(train_mapping, \.\.\.\) takes no 'Y'"),
        ((X,), {}, r"fit\(X, Y\) needs 'Y' when 'train' is an array"),
        (({"x": X, "y": Y},), {"val": (X, Y)}, r"'val' must be a mapping with the keys of 'train' when 'train' is a "
                                               r"mapping; got tuple"),
        ((X, Y), {"val": {"x": X, "y": Y}}, r"'val' must be a pair \(X_val, Y_val\) when 'train' is an array; "
                                            r"got dict of length 2"),
        ((X, Y), {"val": (X, Y, Y)}, r"'val' must be a pair .*; got tuple of length 3"),
        ((X, Y), {"val": 3}, r"'val' must be a pair .*; got int$"),
    ]:
        with pytest.raises(ConfigError, match=match) as exc:
            tr.fit(*args, **kwargs)
        assert isinstance(exc.value, ValueError) and "\n" not in str(exc.value)
    with pytest.raises(DataFormatError, match=r"lacks the arrays \['y'\]"):
        tr.fit({"x": X})
    with pytest.raises(DataFormatError, match="differ in length"):
        tr.fit({"x": X, "y": Y[:5]})
    with pytest.raises(DataFormatError, match=r"must be \[n, V\]"):
        tr.fit({"x": X, "y": Y[:, 0]})
    with pytest.raises(DataFormatError, match="X has 12 rows, Y has 5"):
        tr.fit(X, Y[:5])
    with pytest.raises(ConfigError, match="'objective' must be"):
        Trainer(_reg_model(), objective="mse")


# ---- masked reconstruction -----------------------------------------------------------------------
def test_masks_depend_on_row_epoch_and_seed_only():
    obj = MaskedReconstruction(0.5, seed=4)
    a = obj.mask(torch.tensor([3, 7, 9]), 50, stream=0, epoch=2)
    b = obj.mask(torch.tensor([9, 3]), 50, stream=0, epoch=2)
    assert a.shape == (3, 50) and a.dtype == torch.bool
    assert torch.equal(a[[2, 0]], b)  # same row -> same mask, whatever the batch
    assert not torch.equal(a, obj.mask(torch.tensor([3, 7, 9]), 50, stream=0, epoch=3))  # fresh every epoch
    assert not torch.equal(a, obj.mask(torch.tensor([3, 7, 9]), 50, stream=1, epoch=2))  # validation stream
    assert not torch.equal(a, MaskedReconstruction(0.5, seed=5).mask(torch.tensor([3, 7, 9]), 50, stream=0, epoch=2))
    assert len(set(a.sum(1).tolist())) > 1  # the number of masked positions differs per sample
    big = obj.mask(torch.arange(200), 50, stream=0, epoch=0)
    assert abs(big.float().mean().item() - 0.5) < 0.02


def test_masked_loss_counts_masked_elements_only():
    x = torch.from_numpy(W.make_data(8))
    model = W.make_model()
    obj = MaskedReconstruction(0.4, seed=2, fill=-3.0)
    obj.set_epoch(1)
    batch = {"x": x, "index": torch.arange(8)}
    parts = obj.loss(model, batch)
    m = obj.mask(batch["index"], W.T, stream=0, epoch=1)
    m3 = m[:, :, None].expand_as(x)
    rec = model(torch.where(m3, torch.tensor(-3.0), x))
    ref = ((rec - x) ** 2 * m3).sum()
    torch.testing.assert_close(parts.total, ref, rtol=1e-6, atol=1e-6)
    assert parts.count == int(m.sum()) * W.D and parts.per_sample is None
    # the reconstruction of visible positions does not enter the loss
    shifted = lambda inp: model(inp) + 100.0 * (~m3)  # noqa: E731
    torch.testing.assert_close(obj.loss(shifted, batch).total, ref, rtol=1e-6, atol=1e-6)


def test_masked_reconstruction_learns_and_selects_the_minimum(tmp_path):
    x = W.make_data(40)
    model = W.make_model()
    obj = MaskedReconstruction(0.5, seed=1)
    cfg = TrainConfig(epochs=6, batch_size=8, lr=1e-2, seed=0, device="cpu", grad_clip=1.0)
    tr = Trainer(model, cfg, objective=obj, run_dir=tmp_path)
    res = tr.fit({"x": x[:32]}, val={"x": x[32:]})
    losses = [h["train_loss"] for h in res.history]
    vals = [h["val_masked_mse"] for h in res.history]
    assert losses[-1] < 0.5 * losses[0]
    assert res.metric == "val_masked_mse" and res.mode == "min" and res.val_scores is None
    assert res.best_epoch == int(np.argmin(vals)) + 1 and res.best_score == min(vals)
    # the model holds the best epoch's weights, and its validation metric is reproduced
    loader, _ = make_dict_loader({"x": x[32:]}, batch_size=64)
    assert tr.validate(loader).metrics["val_masked_mse"] == res.best_score
    best = load_tensors(tmp_path / "best" / "model.safetensors")
    _assert_same_state(best, model.state_dict())


class _Scripted(Objective):
    """Validation metric read from a script, to test selection by min / max."""

    keys = ("x", "y")

    def __init__(self, values, mode):
        self.values, self.mode, self.metric, self.calls = list(values), mode, "score", 0

    def loss(self, model, batch):
        return VoxelRegression().loss(model, batch)

    def validate(self, model, batches):
        list(batches)
        self.calls += 1
        return Validation({"score": self.values[self.calls - 1]}, scores=np.full(3, float(self.calls), np.float32))


@pytest.mark.parametrize("mode, best", [("min", 2), ("max", 3)])
def test_best_epoch_follows_the_objective_mode(tmp_path, mode, best, reg_data):
    X, Y = reg_data(20)
    cfg = TrainConfig(epochs=4, batch_size=8, lr=1e-2, seed=0, device="cpu", keep_checkpoints=4)
    model = _reg_model()
    res = Trainer(model, cfg, objective=_Scripted([3.0, 1.0, 5.0, 2.0], mode), run_dir=tmp_path).fit(
        {"x": X[:16], "y": Y[:16]}, val={"x": X[16:], "y": Y[16:]})
    assert res.best_epoch == best and res.best_score == [3.0, 1.0, 5.0, 2.0][best - 1]
    np.testing.assert_array_equal(res.val_scores, np.full(3, float(best)))
    epoch_w = load_tensors(tmp_path / "checkpoints" / f"epoch-{best:04d}" / "model.safetensors")
    _assert_same_state(epoch_w, model.state_dict())
    best_file = load_tensors(tmp_path / "best" / "model.safetensors")
    np.testing.assert_array_equal(best_file.pop("__score__").numpy(), res.val_scores)
    _assert_same_state(best_file, epoch_w)


def test_default_validate_is_the_loss_ratio(reg_data):
    class PlainMSE(Objective):
        keys = ("x", "y")

        def loss(self, model, batch):
            return LossSum(((model(batch["x"]) - batch["y"]) ** 2).sum(), batch["y"].numel())

    X, Y = reg_data(13)
    model = _reg_model(dropout=0.5)
    tr = Trainer(model, TrainConfig(eval_batch_size=4, device="cpu"), objective=PlainMSE())
    loader, _ = make_dict_loader({"x": X, "y": Y}, batch_size=4)
    v = tr.validate(loader)
    model.eval()
    with torch.no_grad():
        ref = nn.functional.mse_loss(model(torch.from_numpy(X)), torch.from_numpy(Y)).item()
    assert v.metrics["val_loss"] == pytest.approx(ref, rel=1e-6)
    assert model.training is False  # validate restores the previous mode (eval here)


def test_masked_resume_after_kill_is_bitwise_identical(tmp_path, kill):
    x = W.make_data(30)
    cfg = TrainConfig(epochs=4, batch_size=8, lr=5e-3, seed=2, device="cpu", optimizer="sgd", momentum=0.9,
                      schedule="warmup_cosine", warmup_epochs=1, min_lr=1e-4)
    data, val = {"x": x[:24]}, {"x": x[24:]}
    straight = W.make_model(dropout=0.2)  # dropout: resume must restore the torch RNG too
    res_a = Trainer(straight, cfg, objective=MaskedReconstruction(0.5, seed=3), run_dir=tmp_path / "a").fit(data, val=val)
    with pytest.raises(kill.error):
        Trainer(W.make_model(dropout=0.2), cfg, objective=MaskedReconstruction(0.5, seed=3),
                run_dir=tmp_path / "b").fit(data, val=val, callbacks=[kill.after(2)])
    torch.manual_seed(999)
    np.random.seed(1)
    random.seed(2)
    resumed = W.make_model(seed=9, dropout=0.2)
    res_b = Trainer(resumed, cfg, objective=MaskedReconstruction(0.5, seed=3), run_dir=tmp_path / "b").fit(
        data, val=val, resume=True)
    for name in ("model", "optimizer"):
        _assert_same_state(load_tensors(tmp_path / "a" / "checkpoints" / "epoch-0004" / f"{name}.safetensors"),
                           load_tensors(tmp_path / "b" / "checkpoints" / "epoch-0004" / f"{name}.safetensors"))
    _assert_same_state(straight.state_dict(), resumed.state_dict())
    assert _strip(res_a.history) == _strip(res_b.history) and res_a.best_epoch == res_b.best_epoch
    assert len({h["lr"] for h in res_a.history}) == 4  # the schedule moved the lr every epoch
    st = json.loads((tmp_path / "b" / "checkpoints" / "epoch-0004" / "state.json").read_text())
    assert st["metric"] == "val_masked_mse"


def test_resume_without_validation_is_bitwise_identical(tmp_path, reg_data, kill):
    # before the objective refactor, resuming a run without validation looked for best/ weights that
    # are only written with validation and crashed
    X, Y = reg_data()
    cfg = TrainConfig(epochs=3, batch_size=8, lr=2e-3, seed=4, device="cpu")
    straight = _reg_model()
    res_a = Trainer(straight, cfg, run_dir=tmp_path / "a").fit(X, Y)
    with pytest.raises(kill.error):
        Trainer(_reg_model(), cfg, run_dir=tmp_path / "b").fit(X, Y, callbacks=[kill.after(1)])
    resumed = _reg_model(seed=3)
    res_b = Trainer(resumed, cfg, run_dir=tmp_path / "b").fit(X, Y, resume=True)
    _assert_same_state(straight.state_dict(), resumed.state_dict())
    assert _strip(res_a.history) == _strip(res_b.history) and res_b.best_epoch == 3
    assert not (tmp_path / "b" / "best").exists()


@pytest.mark.slow
def test_masked_reconstruction_torchrun_two_processes_match_single_process(tmp_path, torchrun):
    single = tmp_path / "single"
    single.mkdir()
    one = W.run(str(single))
    multi = tmp_path / "multi"
    multi.mkdir()
    torchrun(HERE / "ddp_worker_objectives.py", multi)
    a = load_tensors(single / "weights.safetensors")
    b = load_tensors(multi / "weights.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        # float32 all-reduce sums shard gradients in another order than one process (as test_ddp.py)
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"parameter {k} differs")
    two = json.loads((multi / "history.json").read_text())
    for ra, rb in zip(one["history"], two["history"]):
        # train_loss: global Σ sse / Σ count all-reduced over ranks; val on the full set on every rank
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-5)
        assert rb["val_masked_mse"] == pytest.approx(ra["val_masked_mse"], rel=1e-5)
    assert one["best_epoch"] == two["best_epoch"]
    init = W.make_model().state_dict()
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-3  # it trained: the match is not vacuous


# ---- optimisers and schedules --------------------------------------------------------------------
def test_default_optimizer_and_schedule_are_adamw_steplr():
    model = _reg_model()
    cfg = TrainConfig()
    opt = build_optimizer(model.parameters(), cfg)
    ref = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    assert type(opt) is torch.optim.AdamW and opt.state_dict()["param_groups"] == ref.state_dict()["param_groups"]
    sched = build_scheduler(opt, cfg)
    assert type(sched) is torch.optim.lr_scheduler.StepLR and (sched.step_size, sched.gamma) == (100, 0.5)


@pytest.mark.parametrize("name, cls, extra", [
    ("adam", torch.optim.Adam, {"amsgrad": True, "betas": (0.8, 0.9)}),
    ("sgd", torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
])
def test_named_optimizers_match_torch(name, cls, extra):
    model = _reg_model()
    cfg = TrainConfig(optimizer=name, lr=1e-3, weight_decay=0.01, **extra)
    opt = build_optimizer(model.parameters(), cfg)
    ref = cls(model.parameters(), lr=1e-3, weight_decay=0.01, **extra)
    assert type(opt) is cls and opt.state_dict()["param_groups"] == ref.state_dict()["param_groups"]


def _lrs(cfg):
    p = nn.Parameter(torch.zeros(1))
    opt = build_optimizer([p], cfg)
    sched = build_scheduler(opt, cfg)
    out = []
    for _ in range(cfg.epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedules_match_their_formulas_and_torch():
    E, lr = 6, 0.1
    assert _lrs(TrainConfig(epochs=E, lr=lr, schedule="constant")) == [lr] * E
    # cosine to min_lr 0 = torch's CosineAnnealingLR(T_max=epochs)
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    ref_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=E)
    ref = []
    for _ in range(E):
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        ref_sched.step()
    np.testing.assert_allclose(_lrs(TrainConfig(epochs=E, lr=lr, schedule="cosine")), ref, rtol=1e-12, atol=1e-15)
    got = _lrs(TrainConfig(epochs=E, lr=lr, schedule="warmup_cosine", warmup_epochs=2, min_lr=0.01))
    m = 0.01 / lr
    want = [lr / 3, 2 * lr / 3] + [lr * (m + (1 - m) * 0.5 * (1 + math.cos(math.pi * k / 4))) for k in range(4)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert _lrs(TrainConfig(epochs=5, lr=lr, lr_step=2, lr_gamma=0.1)) == pytest.approx([lr, lr, lr / 10, lr / 10, lr / 100])


def test_config_rejects_unknown_names_and_misplaced_settings():
    with pytest.raises(ConfigError, match=r"'optimizer' must be one of \{'adamw', 'adam', 'sgd'\}; 'adan'"):
        from_dict(TrainConfig, {"optimizer": "adan"})
    with pytest.raises(ConfigError, match=r"'schedule' must be one of \{'step', 'constant', 'cosine', 'warmup_cosine'\}"):
        from_dict(TrainConfig, {"schedule": "cosin"})
    with pytest.raises(ConfigError, match="'momentum' applies to optimizer 'sgd' only; optimizer='adamw'"):
        TrainConfig(momentum=0.9).check()
    with pytest.raises(ConfigError, match="'lr_step' applies to schedule 'step' only"):
        TrainConfig(schedule="cosine", lr_step=5).check()
    with pytest.raises(ConfigError, match="'warmup_epochs' must be in"):
        TrainConfig(schedule="warmup_cosine", epochs=3, warmup_epochs=3).check()
    with pytest.raises(ConfigError, match="'nesterov' needs"):
        TrainConfig(optimizer="sgd", nesterov=True).check()
    with pytest.raises(ConfigError, match="'min_lr'"):
        TrainConfig(schedule="cosine", min_lr=1.0).check()
    for bad in ({"betas": [0.9]}, {"eps": 0.0}, {"lr_gamma": 0.0}):
        with pytest.raises(ConfigError):
            from_dict(TrainConfig, bad)
    for msg in ("adan", "cosin"):
        try:
            from_dict(TrainConfig, {"optimizer" if msg == "adan" else "schedule": msg})
        except ConfigError as exc:
            assert "\n" not in str(exc)


def test_check_never_changes_a_value():
    betas = [0.8, 0.95]  # a list, as TrainConfig(...) may be given one directly
    configs = [TrainConfig(), TrainConfig(optimizer="adam", betas=betas, amsgrad=True, schedule="cosine", min_lr=1e-5),
               TrainConfig(optimizer="sgd", momentum=0.5, schedule="warmup_cosine", warmup_epochs=3)]
    for cfg in configs:
        before = dataclasses.asdict(cfg)
        kept = cfg.betas
        cfg.check()
        assert dataclasses.asdict(cfg) == before and cfg.betas is kept
    assert configs[1].betas is betas


# ---- dict data bridge ----------------------------------------------------------------------------
def test_dict_dataset_reads_memmap_rows_lazily_with_dtypes(tmp_path):
    arr = np.arange(60, dtype=np.float16).reshape(10, 3, 2)
    np.save(tmp_path / "a.npy", arr)
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")
    labels = np.arange(10, dtype=np.int32) * 2
    ds = DictDataset({"x": RowSubset(mm, [7, 2, 5, 9]), "y": labels[[7, 2, 5, 9]], "ok": np.arange(4) % 2 == 0})
    assert len(ds) == 4 and isinstance(ds.arrays["x"], RowSubset)  # no copy of the memmap
    b = ds.__getitems__([3, 0, 1])
    assert sorted(b) == ["index", "ok", "x", "y"]
    assert b["x"].dtype == torch.float32 and b["y"].dtype == torch.int64 and b["ok"].dtype == torch.bool
    np.testing.assert_array_equal(b["x"].numpy(), arr[[9, 7, 2]].astype(np.float32))
    np.testing.assert_array_equal(b["y"].numpy(), [18, 14, 4])
    np.testing.assert_array_equal(b["index"].numpy(), [3, 0, 1])
    with pytest.raises(DataFormatError, match="reserved"):
        DictDataset({"x": arr, "index": labels})
    with pytest.raises(DataFormatError, match="x has 10, y has 4 rows"):
        DictDataset({"x": arr, "y": labels[:4]})


def test_dict_loader_has_the_same_global_order_as_the_array_loader(reg_data):
    X, Y = reg_data(21)
    ga, gb = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    la, _ = make_loader(X, Y, batch_size=8, generator=ga)
    lb, sb = make_dict_loader({"x": X, "y": Y}, batch_size=8, generator=gb)
    for _ in range(2):  # two epochs
        for (x, y), b in zip(la, lb):
            assert torch.equal(x, b["x"]) and torch.equal(y, b["y"])
            np.testing.assert_array_equal(b["x"].numpy(), X[b["index"].numpy()])
    assert sb.last_global_sizes == [8, 8, 5]
    # two ranks: shards of each global batch concatenate to the single-process batch
    singles = [b["index"] for b in make_dict_loader({"x": X}, batch_size=8, generator=torch.Generator().manual_seed(3))[0]]
    shards = [[b["index"] for b in make_dict_loader({"x": X}, batch_size=8, generator=torch.Generator().manual_seed(3),
                                                    rank=r, world=2)[0]] for r in (0, 1)]
    assert all(torch.equal(torch.cat([a, b]), s) for a, b, s in zip(*shards, singles))
    assert len(GlobalBatchSampler(21, 8, None, world=2)) == 3
