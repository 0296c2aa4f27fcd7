"""``load_differentiable_encoder``: a finished run's fitted models as image -> response torch modules.

Runs the tiny simulated pipeline of ``conftest.py`` (Gabor backbone, 64 px) up to its fit stages
(ridge on 2x2-pooled tokens, ridge on pooled features, routing on patch tokens, 1 epoch) and
checks that each composed module, fed the stimulus images, gives the predictions the fit stage
saved; marked slow (a pipeline run, ~15 s on 2 cores).
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import brainenc
from brainenc.exceptions import ConfigError, DataFormatError
from brainenc.features import HDF5Images
from brainenc.workflows import read_stage_record, run_pipeline
from brainenc.workflows.differentiable import differentiable_encoder, list_fits, load_differentiable_encoder
from conftest import tiny_spec_text


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffrun")
    spec = root / "tiny.toml"
    spec.write_text(tiny_spec_text(name="tiny-diff", fits=("ridge", "pooled", "routing"), epochs=1))
    return run_pipeline(spec, subject="subj01", data_dir=root / "data", stages=["fit"])


def _test_images(run_dir, n=4):
    from brainenc.datasets.prepare import load_prepared

    ds = load_prepared(read_stage_record(run_dir, "prepare")["outputs"]["prepared"])
    rows = ds.splits["test"][:n]
    imgs = HDF5Images(ds.stimuli_path).read(np.asarray(ds.image_ids)[rows])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0, rows.size


def _saved(run_dir, name, n):
    rel = read_stage_record(run_dir, f"fit.{name}")["outputs"]["predictions"]["test"]
    return np.load(run_dir / rel)[:n]


@pytest.mark.slow
@pytest.mark.parametrize("name, estimator, layout", [("ridge", "ridge", (2, "none")), ("pooled", "ridge", (0, "none")),
                                                      ("routing", "routing", (0, "patches"))])
def test_run_models_reproduce_the_saved_predictions(finished_run, name, estimator, layout):
    run_dir = finished_run
    enc = load_differentiable_encoder(run_dir, name)
    images, n = _test_images(run_dir)
    x = images.clone().requires_grad_(True)
    out = enc(x)
    ref = _saved(run_dir, name, n).astype(np.float64)
    got = out.detach().numpy().astype(np.float64)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(ref.std()) + 1e-7)
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in enc.parameters())
    d = enc.describe()
    assert d["fit"] == name and d["estimator"] == estimator and d["identity_checked"] is True
    assert d["backbone"]["name"] == "gabor" and d["backbone"]["weights"] == "fixed:gabor-energy-v1"
    assert d["layer"] == "last" and d["inputs"]["grid_pool"] == layout[0] and enc.adapter == layout[1]
    assert d["model_dir"].endswith(f"models/{name}")
    json.dumps(d)  # a record


@pytest.mark.slow
def test_model_folder_errors_and_identity_check(finished_run, tmp_path):
    run_dir = finished_run
    assert list_fits(run_dir) == ["ridge", "pooled", "routing"]
    enc = load_differentiable_encoder(run_dir / "models" / "pooled")  # the model folder names the fit
    assert enc.describe()["fit"] == "pooled"
    with pytest.raises(ConfigError, match=r"^unknown fit 'ridgee' in .*; available: ridge, pooled, routing$"):
        load_differentiable_encoder(run_dir, "ridgee")
    with pytest.raises(ConfigError, match="has 3 fits; pass fit_name"):
        load_differentiable_encoder(run_dir)
    with pytest.raises(ConfigError, match="does not match the model folder"):
        load_differentiable_encoder(run_dir / "models" / "pooled", "ridge")
    with pytest.raises(DataFormatError, match="not a run folder"):
        load_differentiable_encoder(tmp_path)
    brainenc.load(run_dir / "models" / "pooled").save_pretrained(tmp_path / "lone")
    with pytest.raises(DataFormatError, match="outside a run folder"):
        load_differentiable_encoder(tmp_path / "lone")

    # a backbone other than the recorded one is refused
    feat = read_stage_record(run_dir, "features")
    meta = json.loads((Path(feat["outputs"]["path"]) / "meta.json").read_text())
    spec = dict(feat["config"], options=dict(feat["config"]["options"], n_orientations=2))
    with pytest.raises(DataFormatError, match="not the one the model was fitted on .*config"):
        differentiable_encoder(run_dir / "models" / "pooled", spec,
                               expect_identity={"backbone": meta["backbone"], "layer": meta["layer"]})
    # the lower-level call without a run: same numbers as the run's loader
    images, n = _test_images(run_dir, 2)
    low = differentiable_encoder(brainenc.load(run_dir / "models" / "ridge"), feat["config"],
                                 inputs={"features": "tokens", "grid_pool": 2})
    assert torch.equal(low(images), load_differentiable_encoder(run_dir, "ridge")(images))

    # a model fitted on an earlier features stage is refused
    rec_path = run_dir / "stages" / "fit.pooled.json"
    saved = rec_path.read_text()
    rec = json.loads(saved)
    rec["deps"]["features"] = "0" * 16
    rec_path.write_text(json.dumps(rec))
    try:
        with pytest.raises(DataFormatError, match="fitted on other features"):
            load_differentiable_encoder(run_dir, "pooled")
    finally:
        rec_path.write_text(saved)
