"""layout.ground_truth_path / ground_truth_file: the one place that locates the simulator's ground truth."""
import json

import pytest

from brainenc.datasets import layout
from brainenc.exceptions import BrainencError


def _manifest(root, man):
    root.mkdir(parents=True, exist_ok=True)
    (root / layout.SIMULATION_MANIFEST).write_text(json.dumps(man))


def test_ground_truth_file_naming_rule(tmp_path):
    assert layout.ground_truth_file(tmp_path, "subj03") == tmp_path / "brainenc_ground_truth_subj03.h5"
    assert layout.ground_truth_file(tmp_path, 3) == tmp_path / "brainenc_ground_truth_subj03.h5"
    with pytest.raises(BrainencError):
        layout.ground_truth_file(tmp_path, "x")


def test_ground_truth_path_real_release_is_none(tmp_path):
    assert layout.ground_truth_path(tmp_path, "subj01") is None  # no manifest: a real release


def test_ground_truth_path_from_manifest_entry(tmp_path):
    gt = layout.ground_truth_file(tmp_path, "subj01")
    _manifest(tmp_path, {"subjects": {"subj01": {"n_sessions": 1, "ground_truth": gt.name}}})
    assert layout.ground_truth_path(tmp_path, "subj01") is None  # named but not on disk
    gt.write_bytes(b"x")
    assert layout.ground_truth_path(tmp_path, "subj01") == gt
    assert layout.ground_truth_path(tmp_path, "subj02") is None  # subject not in the manifest


def test_ground_truth_path_top_level_and_absolute(tmp_path):
    other = tmp_path / "elsewhere" / "truth.h5"
    other.parent.mkdir()
    other.write_bytes(b"x")
    (tmp_path / "gt2.h5").write_bytes(b"x")
    _manifest(tmp_path, {"subjects": {"subj01": {}, "subj02": {}},
                         "ground_truth": {"subj01": str(other), "subj02": "gt2.h5"}})
    assert layout.ground_truth_path(tmp_path, "subj01") == other
    assert layout.ground_truth_path(tmp_path, "subj02") == tmp_path / "gt2.h5"
    _manifest(tmp_path, {"subjects": {"subj01": "not a table"}, "ground_truth": "gt2.h5"})
    assert layout.ground_truth_path(tmp_path, "subj01") == tmp_path / "gt2.h5"
