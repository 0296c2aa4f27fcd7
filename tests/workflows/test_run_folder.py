"""Run-folder helpers: data fingerprint, versions, run folder location."""
import json

import pytest

from brainenc.workflows import load_pipeline, run_dir_for
from brainenc.workflows.encoding import data_fingerprint
from brainenc.workflows.pipeline import collect_versions


def _manifest(root, subjects):
    (root / "brainenc_simulated.json").write_text(json.dumps({"subjects": subjects}))


def test_fingerprint_tracks_only_this_subjects_simulation(tmp_path):
    _manifest(tmp_path, {"subj01": {"n_sessions": 3, "files": {"a": "x"}}})
    base = data_fingerprint(tmp_path, "subj01")
    _manifest(tmp_path, {"subj01": {"n_sessions": 3, "files": {"a": "x"}}, "subj02": {"n_sessions": 1}})
    assert data_fingerprint(tmp_path, "subj01") == base
    _manifest(tmp_path, {"subj01": {"n_sessions": 3, "files": {"a": "y"}}})
    assert data_fingerprint(tmp_path, "subj01") != base
    assert "simulated" not in data_fingerprint(tmp_path / "real", "subj01")


def test_versions_and_run_dir(tmp_path):
    v = collect_versions()
    assert v["python"] and "numpy" in v["packages"] and "git" in v
    spec = load_pipeline("quickstart")
    assert run_dir_for(spec, "subj02", tmp_path) == tmp_path / "runs" / "quickstart" / "subj02"
    assert run_dir_for(spec, "subj02", tmp_path, out=tmp_path / "x") == (tmp_path / "x").resolve()


@pytest.mark.slow
def test_a_changed_routing_config_never_resumes_the_old_checkpoints(tmp_path, tiny_spec):
    # the checkpoints of a finished 1-epoch fit must not be resumed by a 2-epoch fit (or any other
    # configuration): that would skip training, or fail on a changed architecture
    from brainenc.workflows import read_stage_record, run_pipeline

    spec = tiny_spec(name="tiny-ckpt", fits=("routing",), families=("floc-faces",), epochs=1)
    run_dir = run_pipeline(spec, subject="subj01", data_dir=tmp_path / "data")
    first = read_stage_record(run_dir, "fit.routing")
    (old,) = (run_dir / "train" / "routing").iterdir()
    run_pipeline(spec, subject="subj01", data_dir=tmp_path / "data",
                 overrides=["fit.routing.train.epochs=2", "fit.routing.model.d_model=16"])
    rec = read_stage_record(run_dir, "fit.routing")
    assert rec["outputs"]["resumed"] is False and rec["outputs"]["best_epoch"] >= 0
    history = json.loads((run_dir / "models" / "routing" / "config.json").read_text())["fitted"]["history"]
    assert len(history) == 2  # trained from scratch for 2 epochs
    (new,) = (run_dir / "train" / "routing").iterdir()  # the stale folder is gone
    assert new != old and first["key"] != rec["key"]
