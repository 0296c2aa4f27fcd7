"""Notebook-style: every ``models/<name>/`` of a run loads with ``brainenc.load`` and reproduces
the pipeline's saved predictions bit for bit from inputs rebuilt outside the pipeline.

Runs a tiny simulated subject with the Gabor backbone (ridge on pooled patch grids, ridge on
pooled features, routing on patch tokens); marked slow (~30 s on 2 cores). Also: ``[evaluate]
cap = -1`` (no cap) stays -1 in the spec and means no cap where the scores are computed.
"""
import dataclasses

import numpy as np
import pytest

import brainenc
from brainenc.workflows import parse_pipeline, read_stage_record, run_pipeline
from brainenc.workflows.spec import EvaluateConfig

TAIL = """
[evaluate]
cap = -1

[report]
n_best_voxels = 4
n_slices = 4
maps = ["r"]
"""


@pytest.mark.parametrize("cap, effective", [(None, 1.0), (1.0, 1.0), (2.5, 2.5), (0.0, 0.0), (-1, None), (-1.0, None)])
def test_evaluate_check_keeps_cap_and_negative_means_none(cap, effective):
    data = {"pipeline": {"name": "t"}, "fit": [{"name": "ridge", "alphas": [1.0]}]}
    if cap is not None:
        data["evaluate"] = {"cap": cap}
    spec = parse_pipeline(data)  # runs check()
    ev = spec.evaluate
    expect = 1.0 if cap is None else cap
    assert ev.cap == expect and spec.resolved()["evaluate"]["cap"] == expect
    before = dataclasses.replace(ev)
    ev.check()
    assert ev == before  # check() validates, never rewrites
    assert ev.effective_cap == effective
    assert EvaluateConfig(cap=None).effective_cap is None


@pytest.mark.slow
def test_saved_models_load_and_reproduce_the_pipeline_predictions(tmp_path, tiny_spec):
    from brainenc.datasets.prepare import load_prepared
    from brainenc.encoding import RidgeEncoder
    from brainenc.encoding.routing import RoutingEncoder
    from brainenc.features import load_feature_set, pool_grid

    spec = tiny_spec(name="tiny-load", fits=("ridge", "pooled", "raw", "routing"), epochs=1, tail=TAIL)
    run_dir = run_pipeline(spec, subject="subj01", data_dir=tmp_path / "data")

    # what a notebook has: the run folder. The dataset and the feature cache entry it used:
    ds = load_prepared(read_stage_record(run_dir, "prepare")["outputs"]["prepared"])
    (fs_path,) = read_stage_record(run_dir, "features")["outputs"]["files"]
    fs = load_feature_set(fs_path)
    rows = fs.rows_for(ds.image_ids)  # feature row of every dataset row
    test = ds.splits["test"]
    assert test.size > 0

    def saved(name):  # the file the fit stage recorded
        rel = read_stage_record(run_dir, f"fit.{name}")["outputs"]["predictions"]["test"]
        return np.load(run_dir / rel)

    # ridge on 2x2-pooled patch tokens: the model standardises its raw inputs itself
    enc = brainenc.load(run_dir / "models" / "ridge")
    assert isinstance(enc, RidgeEncoder) and enc.standardize
    X = pool_grid(np.asarray(fs.tokens)[rows], fs.grid, 2, fs.n_prefix)
    pred = enc.predict(X[test])
    assert pred.dtype == np.float32 and np.array_equal(pred, saved("ridge"))
    # the per-voxel best alphas written next to the model are the model's own
    assert np.array_equal(np.load(run_dir / "models" / "ridge" / "alpha.npy"), enc.best_alphas_)

    # ridge on pooled features, with and without standardisation
    for name, standardize in (("pooled", True), ("raw", False)):
        enc = brainenc.load(run_dir / "models" / name)
        assert isinstance(enc, RidgeEncoder) and enc.standardize is standardize
        if not standardize:
            assert not enc.feature_mean_.any() and (enc.feature_scale_ == 1).all()
        pred = enc.predict(np.asarray(fs.pooled)[rows][test])
        assert np.array_equal(pred, saved(name)), name

    # routing: the patch tokens without the prefix tokens
    enc = brainenc.load(run_dir / "models" / "routing")
    assert isinstance(enc, RoutingEncoder)
    tokens = np.asarray(fs.tokens)[rows][:, fs.n_prefix:]
    pred = np.asarray(enc.predict(tokens[test]), dtype=np.float32)
    assert np.array_equal(pred, saved("routing"))

    # [evaluate] cap = -1: kept as written in the resolved config, no cap when scoring
    import json

    assert json.loads((run_dir / "config.resolved.json").read_text())["evaluate"]["cap"] == -1
    assert json.loads((run_dir / "scores" / "summary.json").read_text())["options"]["cap"] is None
