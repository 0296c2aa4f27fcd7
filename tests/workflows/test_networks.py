"""The networks task: spec tables, the stage graph on a tiny simulated cohort, resume, no test-fold
data in pretraining."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from brainenc.exceptions import ConfigError
from brainenc.workflows import load_pipeline, parse_pipeline, run_pipeline

TINY_ARCH = {"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ffn": 32, "temporal_heads": 2, "dropout": 0.0}


def tiny_spec(tmp_path: Path, *, pretrained: bool = True, extra: str = "") -> Path:
    arch = ", ".join(f"{k} = {json.dumps(v)}" for k, v in TINY_ARCH.items())
    text = f"""
[pipeline]
name = "net_tiny"
task = "networks"

[cohort]
source = "simulated"
[cohort.simulate]
name = "tinycohort"
n_subjects = 24
n_sites = 2
n_rois = 10
n_modules = 3
effect_module = 1
effect_partner = 2
n_timepoints = 60
effect_size = 0.4

[evaluate]
scheme = "stratified"
n_splits = 3
positive = "patient"

[pretrain]
segment_seconds = 10.0
model = {{ {arch} }}
train = {{ epochs = 2, batch_size = 8, device = "cpu" }}

[[fit]]
name = "mae"
kind = "brainmae"
pretrained = {str(pretrained).lower()}
train = {{ epochs = 2, batch_size = 8, device = "cpu" }}

[[fit]]
name = "dey"
kind = "dey_pca_lda"
density = 0.2

[[fit]]
name = "fc"
kind = "fc_logreg"
connectivity = "correlation"
{extra}
"""
    path = tmp_path / "net_tiny.toml"
    path.write_text(text)
    return path


def test_quickstart_spec_parses_and_resolves():
    spec = load_pipeline("networks_quickstart")
    assert spec.pipeline.task == "networks"
    res = spec.resolved()
    assert set(res) == {"pipeline", "cohort", "evaluate", "pretrain", "fit", "report", "resources"}
    kinds = {f["name"]: f["kind"] for f in res["fit"]}
    assert kinds["brainmae"] == "brainmae" and kinds["dey_pca_lda"] == "dey_pca_lda"
    assert res["pretrain"]["mask_weight"] == 0.75 and res["pretrain"]["scope"] == "fold"


@pytest.mark.parametrize("table, match", [
    ({"prepare": {}}, "unknown table 'prepare'"),
    ({"cohort": {"source": "nowhere"}}, "cohort.source"),
    ({"cohort": {"source": "folder"}}, "cohort.root"),
    ({"evaluate": {"scheme": "bootstrap"}}, "evaluate.scheme"),
    ({"pretrain": {"scope": "everything"}}, "pretrain.scope"),
    ({"pretrain": {"mask_weight": 2.0}}, "pretrain.mask_weight"),
    ({"fit": [{"name": "a", "kind": "dey_pca_lda", "pretrained": True}]}, "fit.a.pretrained"),
    ({"fit": [{"name": "a", "kind": "dey_pca_lad"}]}, "dey_pca_lda"),
    ({"fit": [{"name": "a", "kind": "brainmae", "tr": 2.0}]}, "fit.a.tr"),
])
def test_spec_errors_name_the_key(table, match):
    data = {"pipeline": {"name": "n", "task": "networks"}, "fit": [{"name": "d", "kind": "dey_pca_lda"}]}
    data.update(table)
    with pytest.raises(ConfigError, match=match):
        parse_pipeline(data)


def test_group_task_rejects_several_subjects(tmp_path):
    from brainenc.workflows.multi import run_subjects

    with pytest.raises(ConfigError, match="without --subjects"):
        run_subjects(str(tiny_spec(tmp_path)), "subj01,subj02", data_dir=tmp_path / "data", executor="serial")


def test_pretraining_rows_exclude_test_folds():
    from brainenc.workflows.networks import Samples, _pretrain_rows

    series = [np.full((5, 2), i, np.float32) for i in range(6)]
    extra = [np.full((3, 2), 100 + i, np.float32) for i in range(6)]
    s = Samples(series=series, labels=np.zeros(6, int), label_names=["a"], groups=np.array(list("aabbcc")),
                split=None, ids=np.arange(6).astype(str), tr=2.0, roi_names=["r0", "r1"], extra=extra,
                extra_groups=np.array(list("aabbcc")), meta={})
    train = np.array([0, 1, 2, 3])  # groups a, b; test = c
    rows = _pretrain_rows(s, train, "train+rest")
    seen = {int(r[0, 0]) for r in rows}
    assert seen == {0, 1, 2, 3, 100, 101, 102, 103}
    assert {int(r[0, 0]) for r in _pretrain_rows(s, train, "rest")} == {100, 101, 102, 103}


@pytest.mark.slow
def test_tiny_cohort_end_to_end_and_resume(tmp_path):
    spec = tiny_spec(tmp_path)
    data = tmp_path / "data"
    run = run_pipeline(str(spec), data_dir=data)
    assert run == (data / "runs" / "net_tiny" / "cohort").resolve()
    summary = json.loads((run / "scores" / "summary.json").read_text())
    assert set(summary["models"]) == {"mae", "dey", "fc"}
    meta = json.loads((run / "samples" / "meta.json").read_text())
    labels = np.asarray(meta["labels"])
    folds = json.loads((run / "folds.json").read_text())["folds"]
    tested = np.concatenate([f["test"] for f in folds])
    assert sorted(tested.tolist()) == list(range(len(labels)))  # every subject tested exactly once
    for f in folds:
        assert not set(f["train"]) & set(f["test"])
    for name, m in summary["models"].items():
        preds = json.loads((run / "predictions" / f"{name}.json").read_text())["folds"]
        # the stored fold accuracy is the accuracy of the stored predictions
        for r, fold in zip(preds, m["folds"]):
            acc = np.mean(np.asarray(r["predictions"]) == labels[np.asarray(r["test"])])
            assert fold["accuracy"] == pytest.approx(acc)
        assert 0.0 <= m["summary"]["accuracy"]["mean"] <= 1.0
    graphs = summary["graphs"]
    assert "learned_graph" in graphs and "edge_recovery" in graphs
    learned = np.load(run / graphs["learned_graph"])
    np.testing.assert_allclose(learned.sum(1), 1.0, rtol=1e-5, atol=1e-5)
    assert np.all(np.diag(learned) == 0)  # no self-loops by default
    assert len(list((run / "models" / "pretrain").glob("fold*/config.json"))) == 3
    report = (run / "report" / "index.md").read_text()
    assert "Scores (mean ± SD over folds)" in report and "Group-difference edges" in report
    for fig in ("scores.png", "graphs.png", "edges.png"):
        assert (run / "report" / "figures" / fig).stat().st_size > 1000

    # a rerun is a no-op
    before = {p: p.stat().st_mtime_ns for p in (run / "predictions").rglob("*.json")}
    run_pipeline(str(spec), data_dir=data)
    assert {p: p.stat().st_mtime_ns for p in (run / "predictions").rglob("*.json")} == before
    # a killed fit stage resumes at the missing fold: the others are not refitted
    (run / "predictions" / "dey" / "fold1.json").unlink()
    (run / "stages" / "fit.dey.json").unlink()
    run_pipeline(str(spec), data_dir=data)
    assert (run / "predictions" / "dey" / "fold1.json").is_file()
    for k in (0, 2):
        p = run / "predictions" / "dey" / f"fold{k}.json"
        assert p.stat().st_mtime_ns == before[p]
    # a changed model config reruns that model only, from scratch
    run_pipeline(str(spec), data_dir=data, overrides=["fit.dey.density=0.3"])
    p = run / "predictions" / "dey" / "fold0.json"
    assert p.stat().st_mtime_ns != before[p]
    q = run / "predictions" / "fc" / "fold0.json"
    assert q.stat().st_mtime_ns == before[q]
    # a changed pretraining config retrains from scratch (its old checkpoints are not resumed)
    from brainenc.pretraining import BrainMAE

    old = BrainMAE.from_pretrained(run / "models" / "pretrain" / "fold0").history_
    run_pipeline(str(spec), data_dir=data, overrides=["pretrain.train.lr=0.003"])
    new = BrainMAE.from_pretrained(run / "models" / "pretrain" / "fold0").history_
    assert len(new) == 2 and new[0]["lr"] == pytest.approx(0.003) and old[0]["lr"] != pytest.approx(0.003)
    assert new[0]["train_loss"] != old[0]["train_loss"]


@pytest.mark.slow
def test_haxby_spec_runs_on_the_shipped_data(tmp_path):
    """The real-data spec, shortened (3 run-group folds, 1 epoch): it runs end to end, BrainMAE is
    pretrained on rest stretches of the training runs only, and the MVPA reference decodes the
    categories far above chance (8 classes)."""
    over = ["evaluate.scheme=group", "evaluate.n_splits=3", "pretrain.train.epochs=1",
            "fit.brainmae.train.epochs=1", "fit.brainmae_scratch.train.epochs=1"]
    run = run_pipeline("networks_haxby", data_dir=tmp_path / "data", overrides=over)
    summary = json.loads((run / "scores" / "summary.json").read_text())
    assert summary["chance"] == pytest.approx(1 / 8)
    assert summary["models"]["mean_logreg"]["summary"]["accuracy"]["mean"] > 0.4
    meta = json.loads((run / "samples" / "meta.json").read_text())
    assert meta["n_samples"] == 96 and meta["n_extra"] > 0
    folds = json.loads((run / "folds.json").read_text())["folds"]
    groups = np.asarray(meta["groups"])
    for f in folds:  # whole runs are held out
        assert not set(groups[f["train"]]) & set(groups[f["test"]])
    assert (run / "report" / "index.html").is_file()
