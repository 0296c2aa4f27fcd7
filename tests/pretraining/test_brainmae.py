"""BrainMAE pretraining: segmenting, masking statistics, the loss weights, training, estimators."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import cross_val_score

import brainenc
from brainenc.exceptions import ConfigError, DataFormatError
from brainenc.models.brainmae import TINY_BRAINMAE, BrainMAEArchitecture, BrainMAEPretrainModel
from brainenc.config import from_dict
from brainenc.pretraining.brainmae import (
    BrainMAE,
    BrainMAEClassifier,
    BrainMAEObjective,
    BrainMAERegressor,
    draw_roi_mask,
    segment_series,
)
from brainenc.training import TrainConfig, Trainer

TINY = dict(TINY_BRAINMAE)
TRAIN = {"epochs": 3, "batch_size": 8, "device": "cpu", "lr": 3e-3}


def _series(n=6, T=40, R=8, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((T, R)).astype(np.float32) for _ in range(n)]


def _mae(**kw):
    return BrainMAE(tr=2.0, segment_seconds=8.0, model=TINY, train=TRAIN, **kw)


# ---- segmenting and masking -------------------------------------------------------------------
def test_segments_cut_and_zscore():
    x = np.arange(30, dtype=np.float32).reshape(10, 3)
    s = segment_series(x, 4, 4, standardize="none")
    assert s.shape == (2, 3, 4)  # 10 // 4 = 2 segments, last 2 time points dropped
    np.testing.assert_array_equal(s[1, 2], x[4:8, 2])
    z = segment_series(x, 4, 2, standardize="series")
    assert z.shape == (4, 3, 4)
    zs = (x - x.mean(0)) / x.std(0)
    np.testing.assert_allclose(z[3, 0], zs[6:10, 0], rtol=1e-5, atol=1e-6)
    g = segment_series(x, 4, 4, standardize="segment")
    np.testing.assert_allclose(g.mean(-1), 0, atol=1e-5)
    with pytest.raises(DataFormatError, match="fewer than one segment"):
        segment_series(x, 11, 11)


def test_mask_covers_whole_rois_at_the_drawn_ratio():
    R, lo, hi = 40, 0.1, 0.6
    ratios, fracs = [], []
    for row in range(2000):
        m, r = draw_roi_mask(3, 0, 0, row, R, (lo, hi))
        assert m.shape == (R,) and m.sum() == round(r * R)
        ratios.append(r)
        fracs.append(m.mean())
    ratios = np.array(ratios)
    assert lo <= ratios.min() and ratios.max() <= hi
    # U(lo, hi): mean (lo+hi)/2, variance (hi-lo)²/12; the masked fraction tracks the ratio
    assert abs(ratios.mean() - (lo + hi) / 2) < 4 * (hi - lo) / np.sqrt(12 * 2000)
    assert abs(ratios.var() - (hi - lo) ** 2 / 12) < 0.15 * (hi - lo) ** 2 / 12
    assert np.abs(np.array(fracs) - ratios).max() <= 0.5 / R + 1e-12
    # every ROI is masked about equally often
    counts = sum(draw_roi_mask(3, 0, 0, row, R, (lo, hi))[0].astype(int) for row in range(2000))
    assert counts.min() > 0.7 * counts.mean()
    # a function of (seed, stream, epoch, row)
    a = draw_roi_mask(3, 0, 1, 5, R, (lo, hi))[0]
    np.testing.assert_array_equal(a, draw_roi_mask(3, 0, 1, 5, R, (lo, hi))[0])
    assert not all(np.array_equal(a, draw_roi_mask(3, 0, e, 5, R, (lo, hi))[0]) for e in (2, 3, 4))


def test_objective_mask_is_segment_wise_in_the_model_input():
    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, x, mask):
            seen["mask"] = mask
            return torch.zeros_like(x)

    obj = BrainMAEObjective((0.3, 0.3), seed=1)
    x = torch.randn(4, 10, 6)
    obj.loss(Spy(), {"x": x, "index": torch.arange(4)})
    m = seen["mask"]
    assert m.shape == (4, 10) and m.dtype == torch.bool  # one flag per (segment, ROI): all time points
    assert (m.sum(1) == 3).all()


def test_loss_weights_match_direct_computation():
    torch.manual_seed(0)
    lam = 0.75
    model = BrainMAEPretrainModel(from_dict(BrainMAEArchitecture, TINY), n_rois=8, segment_length=5)
    obj = BrainMAEObjective((0.2, 0.7), lam, seed=4)
    obj.set_epoch(2)
    x, idx = torch.randn(6, 8, 5), torch.arange(10, 16)
    parts = obj.loss(model, {"x": x, "index": idx})
    assert parts.count == 6 and parts.per_sample == 1
    m = torch.from_numpy(np.stack([draw_roi_mask(4, 0, 2, int(i), 8, (0.2, 0.7))[0] for i in idx]))
    rec = model(x, m)
    direct = 0.0
    for i in range(6):
        e = (rec[i] - x[i]) ** 2
        direct += lam * e[m[i]].mean() + (1 - lam) * e[~m[i]].mean()
    torch.testing.assert_close(parts.total / parts.count, direct / 6, rtol=1e-5, atol=1e-6)
    # λ matters: another weight changes the loss by exactly the direct difference
    other = BrainMAEObjective((0.2, 0.7), 0.25, seed=4)
    other.set_epoch(2)
    p2 = other.loss(model, {"x": x, "index": idx})
    assert abs(float((p2.total - parts.total).detach())) > 1e-4
    # no masking: plain MSE
    ae = BrainMAEObjective(masking=False)
    p3 = ae.loss(model, {"x": x, "index": idx})
    torch.testing.assert_close(p3.total / 6, ((model(x) - x) ** 2).mean(), rtol=1e-5, atol=1e-6)


def test_training_lowers_the_loss():
    rng = np.random.default_rng(0)
    # structured data: ROI signals are mixtures of 2 latent time courses, so masked ROIs are predictable
    X = []
    for _ in range(8):
        lat = np.cumsum(rng.standard_normal((48, 2)), 0)
        X.append((lat @ rng.standard_normal((2, 8)) + 0.1 * rng.standard_normal((48, 8))).astype(np.float32))
    est = BrainMAE(tr=2.0, segment_seconds=8.0, model=TINY, val_fraction=0.0,
                   train={**TRAIN, "epochs": 12, "schedule": "constant"}).fit(X)
    losses = [h["train_loss"] for h in est.history_]
    assert losses[-1] < 0.8 * losses[0], losses


# ---- estimator --------------------------------------------------------------------------------
def test_fit_transform_graph_and_save_load(tmp_path):
    X = np.stack(_series())
    est = _mae().fit(X)
    Z = est.transform(X)
    assert Z.shape == (6, TINY["d_model"]) and Z.dtype == np.float32
    segs = est.transform(X, level="segment")
    assert len(segs) == 6 and segs[0].shape == (10, TINY["d_model"])  # 40 time points / 4
    np.testing.assert_allclose(Z[0], segs[0].mean(0), rtol=1e-5, atol=1e-6)
    A = est.roi_graph_
    assert A.shape == (8, 8) and np.all(np.diag(A) == 0)
    np.testing.assert_allclose(A.sum(1), 1, atol=1e-6)
    out = est.save_pretrained(tmp_path / "mae")
    loaded = brainenc.load(out)
    assert type(loaded) is BrainMAE and loaded.to_config() == est.to_config()
    np.testing.assert_array_equal(loaded.transform(X), Z)
    np.testing.assert_array_equal(loaded.roi_graph_, A)


def test_finetune_from_pretrained_and_round_trip(tmp_path):
    X = _series(8)
    y = np.array([0, 1] * 4)
    X = [x + 2.0 * lab * np.sin(np.arange(40) / 3)[:, None].astype(np.float32) for x, lab in zip(X, y)]
    pre = _mae(val_fraction=0.0).fit(X).save_pretrained(tmp_path / "mae")
    clf = BrainMAEClassifier(pretrained=str(pre), train=TRAIN).fit(X, y)
    assert clf.tr_ == 2.0 and clf.segment_length_ == 4
    p = clf.predict_proba(X)
    assert p.shape == (8, 2)
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-6)
    # the encoder started from the pretrained weights (not a fresh init)
    frozen = BrainMAEClassifier(pretrained=str(pre), freeze_encoder=True, train=TRAIN).fit(X, y)
    mae = BrainMAE.from_pretrained(pre)
    for k, v in mae.model_.encoder.state_dict().items():
        torch.testing.assert_close(frozen.model_.encoder.state_dict()[k], v)
    out = clf.save_pretrained(tmp_path / "clf")
    loaded = brainenc.load(out)
    np.testing.assert_array_equal(loaded.predict_proba(X), p)
    np.testing.assert_array_equal(loaded.predict(X), clf.predict(X))
    reg = BrainMAERegressor(pretrained=str(pre), train=TRAIN).fit(X, y.astype(float) * 3 + 1)
    pr = reg.predict(X)
    assert pr.shape == (8,)
    np.testing.assert_array_equal(brainenc.load(reg.save_pretrained(tmp_path / "reg")).predict(X), pr)


def test_clone_and_cross_val_score_on_segment_level_inputs():
    # Haxby-like: each sample is one block [n_timepoints, n_rois] with a category label
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1, 2], 8)
    pattern = rng.standard_normal((3, 6)) * 1.5
    X = rng.standard_normal((24, 5, 6)).astype(np.float32) + pattern[y][:, None, :].astype(np.float32)
    clf = BrainMAEClassifier(tr=2.0, segment_seconds=10.0, standardize="none", model=TINY,
                             train={**TRAIN, "epochs": 15})
    c = clone(clf)
    assert c.get_params() == clf.get_params()
    scores = cross_val_score(clf, X, y, cv=3)
    assert scores.shape == (3,) and np.all((0 <= scores) & (scores <= 1))
    assert scores.mean() > 0.5  # chance is 1/3
    reg = BrainMAERegressor(tr=2.0, segment_seconds=10.0, model=TINY, train=TRAIN)
    r2 = cross_val_score(reg, list(X), rng.standard_normal(24), cv=2)
    assert r2.shape == (2,) and np.isfinite(r2).all()


def test_resume_matches_uninterrupted_fit(tmp_path):
    X = np.concatenate([segment_series(s, 4, 4) for s in _series(4)])
    arch = from_dict(BrainMAEArchitecture, TINY)
    cfg = lambda: TrainConfig(**{**TRAIN, "epochs": 4})  # noqa: E731

    def run(run_dir, interrupt):
        torch.manual_seed(0)
        model = BrainMAEPretrainModel(arch, n_rois=8, segment_length=4)
        tr = Trainer(model, cfg(), objective=BrainMAEObjective(seed=2), run_dir=run_dir)

        def stop(trainer, record):
            if interrupt and record["epoch"] == 2:
                raise KeyboardInterrupt

        try:
            tr.fit({"x": X}, callbacks=[stop])
        except KeyboardInterrupt:
            model = BrainMAEPretrainModel(arch, n_rois=8, segment_length=4)
            tr = Trainer(model, cfg(), objective=BrainMAEObjective(seed=2), run_dir=run_dir)
            tr.fit({"x": X}, resume=True)
        return model.state_dict(), tr.result_.history

    ref, h_ref = run(tmp_path / "a", False)
    res, h_res = run(tmp_path / "b", True)
    assert [h["train_loss"] for h in h_ref] == [h["train_loss"] for h in h_res]
    for k in ref:
        torch.testing.assert_close(res[k], ref[k], rtol=0, atol=0)


def test_bad_inputs_raise_one_line_errors():
    est = _mae()
    with pytest.raises(DataFormatError, match="wrap one subject"):
        est.fit(np.zeros((40, 8), np.float32))
    with pytest.raises(DataFormatError, match=r"'X\[1\]' must be \[n_timepoints, n_rois\]"):
        est.fit([np.zeros((40, 8)), np.zeros(40)])
    with pytest.raises(DataFormatError, match="fewer than one segment"):
        est.fit([np.random.default_rng(0).standard_normal((3, 8))])
    bad = _series(2)
    bad[1][5, 3] = np.nan
    with pytest.raises(DataFormatError, match=r"'X\[1\]' contains 1 NaN"):
        est.fit(bad)
    with pytest.raises(DataFormatError, match="ROIs"):
        est.fit([np.zeros((40, 8)), np.zeros((40, 7))])
    with pytest.raises(ConfigError, match="'tr'"):
        BrainMAE(model=TINY).fit(_series(2))
    with pytest.raises(ConfigError, match="'mask_ratio'"):
        _mae(mask_ratio=(0.5, 1.2)).fit(_series(2))
    with pytest.raises(ConfigError, match="'mask_weight'"):
        _mae(mask_weight=2).fit(_series(2))
    with pytest.raises(ConfigError, match="'model.encoder'"):
        BrainMAE(tr=2.0, model={**TINY, "encoder": "bogus"}).fit(_series(2))
    with pytest.raises(ConfigError, match="belongs in the 'train' table"):
        BrainMAE.from_config({"epochs": 3})
    fitted = _mae().fit(_series(3))
    with pytest.raises(DataFormatError, match="fitted on 8"):
        fitted.transform([np.zeros((40, 5))])
    with pytest.raises(ConfigError, match="'freeze_encoder'"):
        BrainMAEClassifier(tr=2.0, freeze_encoder=True).fit(_series(2), [0, 1])
    with pytest.raises(DataFormatError, match="2 classes"):
        BrainMAEClassifier(tr=2.0, model=TINY, train=TRAIN).fit(_series(2), [1, 1])
