"""End to end on a tiny simulated subject: run, no-op rerun, config change, crash + resume, report.

Uses the Gabor backbone (no weights, fast) on small images; marked slow (~1 minute on 2 cores).
"""
import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest

from brainenc.workflows import FIT_KINDS, read_stage_record, run_pipeline

pytestmark = pytest.mark.slow

class Crash(RuntimeError):
    pass


def _ran(run_dir, names):
    return {n: read_stage_record(run_dir, n)["started"] for n in names}


def test_quickstart_like_pipeline_end_to_end(tmp_path, monkeypatch, tiny_spec):
    spec = tiny_spec()
    data = tmp_path / "data"
    stages = ["prepare", "features", "fit.ridge", "fit.pooled", "fit.routing", "evaluate", "report"]

    # 1) a crash inside a fit stage keeps the finished stages
    entry = FIT_KINDS.get("ridge")  # "pooled" is a ridge model
    real_fit = entry.fit

    def crashing(ctx, fit, d):
        if fit.name == "pooled":
            raise Crash("killed")
        return real_fit(ctx, fit, d)

    monkeypatch.setitem(FIT_KINDS._items, "ridge", dataclasses.replace(entry, fit=crashing))
    with pytest.raises(Crash):
        run_pipeline(spec, subject="subj01", data_dir=data)
    run_dir = data / "runs" / "tiny" / "subj01"
    assert read_stage_record(run_dir, "fit.ridge") is not None
    assert read_stage_record(run_dir, "fit.pooled") is None and read_stage_record(run_dir, "report") is None
    first = _ran(run_dir, ["prepare", "features", "fit.ridge"])
    monkeypatch.setitem(FIT_KINDS._items, "ridge", entry)

    # 2) the rerun resumes at the first unfinished stage
    out = run_pipeline(spec, subject="subj01", data_dir=data)
    assert out == run_dir
    assert _ran(run_dir, ["prepare", "features", "fit.ridge"]) == first
    for name in ("config.resolved.json", "versions.json", "logs/run.log", "report/index.md", "report/index.html",
                 "report/roi_table.csv", "report/roi_table.md", "scores/summary.json", "models/ridge/model.safetensors",
                 "models/ridge/config.json", "predictions/ridge/test.npy", "report/ground_truth.json"):
        assert (run_dir / name).is_file(), name
    log_text = (run_dir / "logs" / "run.log").read_text()
    assert "run stopped: Crash" in log_text
    versions = json.loads((run_dir / "versions.json").read_text())
    assert versions["brainenc"] and versions["packages"]["numpy"]

    # scores agree with the saved predictions
    from brainenc.datasets.prepare import load_prepared
    from brainenc.metrics import pearson_r

    prep = read_stage_record(run_dir, "prepare")["outputs"]
    ds = load_prepared(prep["prepared"])
    y = np.asarray(ds.responses[ds.splits["test"]])
    pred = np.load(run_dir / "predictions" / "ridge" / "test.npy")
    r = np.load(run_dir / "scores" / "ridge" / "r.npy")
    np.testing.assert_allclose(r, pearson_r(y, pred), atol=1e-5)
    # the r map in subject space holds the same numbers at the voxel indices
    img = nib.load(run_dir / "report" / "maps" / "ridge_r.nii.gz")
    idx = np.asarray(ds.geometry["indices"])
    np.testing.assert_allclose(np.asarray(img.dataobj)[idx[:, 0], idx[:, 1], idx[:, 2]], np.nan_to_num(r), atol=1e-6)
    index = (run_dir / "report" / "index.md").read_text()
    assert "| ROI | n voxels | noise ceiling | ridge mean r |" in index and "pooled NC-norm" in index
    assert "routing NC-norm" in index and (run_dir / "models" / "routing" / "model.safetensors").is_file()
    assert "Comparison with the simulator's ground truth" in index
    # routing interpretation: one attention figure per ROI query, each labelled with its own query
    fig_dir = run_dir / "models" / "routing" / "figures"
    attn = sorted(fig_dir.glob("attention_*.png"))
    assert attn and (fig_dir / "top_images.png").stat().st_size > 1000
    assert "## Interpretation" in index and "../models/routing/figures/attention_" in index
    from PIL import Image

    for p in attn:
        assert Image.open(p).info["Title"] == p.stem[len("attention_"):], p
    for fig in ("roi_bars.png", "pred_vs_measured.png", "ridge_nc_norm_slices.png", "ground_truth_nc.png"):
        assert (run_dir / "report" / "figures" / fig).stat().st_size > 1000, fig

    # 3) same config again: nothing runs
    before = _ran(run_dir, stages)
    run_pipeline(spec, subject="subj01", data_dir=data)
    assert _ran(run_dir, stages) == before

    # 4) a changed fit config reruns that model and what is downstream only
    run_pipeline(spec, subject="subj01", data_dir=data, overrides=["fit.pooled.alphas=[10.0]"])
    after = _ran(run_dir, stages)
    changed = {n for n in stages if after[n] != before[n]}
    assert changed == {"fit.pooled", "evaluate", "report"}
    cfg = json.loads((run_dir / "config.resolved.json").read_text())
    assert cfg["fit"][1]["alphas"] == [10.0]
