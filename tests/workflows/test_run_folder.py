"""Run-folder helpers: data fingerprint, versions, run folder location."""
import json

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
