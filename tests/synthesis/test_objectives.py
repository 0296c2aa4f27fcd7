"""brainenc.synthesis.objectives: ResponseObjective against numpy, validation, records."""
import json

import numpy as np
import pytest
import torch

from brainenc.exceptions import ConfigError
from brainenc.synthesis import ResponseObjective

V = 12


def _mask(idx, n=V):
    m = np.zeros(n, bool)
    m[list(idx)] = True
    return m


@pytest.fixture
def responses():
    return np.random.default_rng(0).standard_normal((5, V))


@pytest.fixture
def masks():
    return {"floc-faces/OFA": _mask([0, 1, 2]), "floc-faces/FFA-1": _mask([3, 4]), "floc-faces/FFA-2": _mask([5]),
            "floc-places/OPA": _mask([6, 7]), "floc-places/PPA": _mask([8, 9, 10]),
            "prf-visualrois/V1v": _mask([11]), "other/PPA": _mask([10, 11])}


def test_roi_and_voxels_are_the_mean_over_the_set(responses):
    idx = [1, 4, 7]
    for obj in (ResponseObjective.roi(_mask(idx), name="X"), ResponseObjective.voxels(np.array(idx), n_voxels=V),
                ResponseObjective.voxels(_mask(idx))):
        np.testing.assert_allclose(obj(responses), responses[:, idx].mean(1), rtol=1e-12)
        got = obj(torch.from_numpy(responses))
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
        np.testing.assert_allclose(got.numpy(), responses[:, idx].mean(1), rtol=1e-12)


def test_contrast_is_mean_a_minus_mean_b(responses):
    obj = ResponseObjective.contrast(_mask([0, 1, 2]), np.array([3, 4, 5]), names="OFA", minus_names="FFA")
    want = responses[:, :3].mean(1) - responses[:, 3:6].mean(1)
    np.testing.assert_allclose(obj(responses), want, rtol=1e-12)
    np.testing.assert_allclose(obj(torch.from_numpy(responses)).numpy(), want, rtol=1e-12)


def test_torch_objective_is_differentiable_and_keeps_dtype(responses):
    y = torch.tensor(responses, dtype=torch.float32, requires_grad=True)
    obj = ResponseObjective.contrast([0, 1], [2, 3, 4, 5], n_voxels=V)
    v = obj(y)
    assert v.shape == (5,) and v.dtype == torch.float32
    v.sum().backward()
    g = y.grad.numpy()
    np.testing.assert_allclose(g[:, :2], 0.5)
    np.testing.assert_allclose(g[:, 2:6], -0.25)
    np.testing.assert_allclose(g[:, 6:], 0.0)


def test_from_masks_unions_names_and_resolves_short_names(masks, responses):
    obj = ResponseObjective.from_masks(masks, "OFA", contrast=["FFA-1", "floc-faces/FFA-2"])
    assert obj.kind == "contrast"
    assert obj.names == ["floc-faces/OFA"] and obj.minus_names == ["floc-faces/FFA-1", "floc-faces/FFA-2"]
    np.testing.assert_allclose(obj(responses), responses[:, :3].mean(1) - responses[:, 3:6].mean(1), rtol=1e-12)
    roi = ResponseObjective.from_masks(masks, ["OPA", "floc-places/PPA"])
    assert roi.kind == "roi" and roi.n_selected == 5
    np.testing.assert_allclose(roi(responses), responses[:, 6:11].mean(1), rtol=1e-12)


def test_from_masks_unknown_and_ambiguous_names(masks):
    with pytest.raises(ConfigError, match="unknown roi name 'LOC'; known ROIs: .*floc-faces/FFA-1") as e:
        ResponseObjective.from_masks(masks, "LOC")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="unknown contrast name"):
        ResponseObjective.from_masks(masks, "OFA", contrast="nope")
    with pytest.raises(ConfigError, match="'PPA' is ambiguous"):
        ResponseObjective.from_masks(masks, "PPA")
    with pytest.raises(ConfigError, match="different lengths"):
        ResponseObjective.from_masks({"a": _mask([0]), "b": _mask([0], n=V + 1)}, "a")
    with pytest.raises(ConfigError, match="boolean"):
        ResponseObjective.from_masks({"a": np.ones(V, int)}, "a")
    with pytest.raises(ConfigError, match="non-empty mapping"):
        ResponseObjective.from_masks({}, "a")
    with pytest.raises(ConfigError, match="selects no voxel"):
        ResponseObjective.from_masks({**masks, "empty": np.zeros(V, bool)}, "empty")


@pytest.mark.parametrize("make, match", [
    (lambda: ResponseObjective.roi(np.zeros(V, bool)), "is empty"),
    (lambda: ResponseObjective.voxels(np.array([], np.int64), n_voxels=V), "is empty"),
    (lambda: ResponseObjective.roi(_mask([1]), n_voxels=V + 3), "length 12 but the encoder has V=15"),
    (lambda: ResponseObjective.voxels([1, 2]), "give n_voxels"),
    (lambda: ResponseObjective.voxels([1, V], n_voxels=V), "outside"),
    (lambda: ResponseObjective.voxels([1, 1], n_voxels=V), "duplicate"),
    (lambda: ResponseObjective.voxels(np.ones((2, 2), bool)), "1-D"),
    (lambda: ResponseObjective.voxels(np.array([0.5])), "dtype float64"),
    (lambda: ResponseObjective.contrast(_mask([1, 2]), _mask([1, 2])), "identical"),
    (lambda: ResponseObjective.contrast(_mask([1, 2]), _mask([2, 3])), "overlap in 1 voxel"),
    (lambda: ResponseObjective.contrast(_mask([1, 2]), _mask([3], n=V + 1)), "length 13"),
    (lambda: ResponseObjective("contrast", _mask([1])), "needs minus"),
    (lambda: ResponseObjective("roi", _mask([1]), _mask([2])), "only for kind 'contrast'"),
    (lambda: ResponseObjective("mean", _mask([1])), "kind must be one of"),
    (lambda: ResponseObjective("roi", [1], n_voxels=0), "n_voxels must be a positive integer"),
])
def test_validation_is_one_line(make, match):
    with pytest.raises(ConfigError, match=match) as e:
        make()
    assert "\n" not in str(e.value)


def test_wrong_response_width_is_rejected():
    obj = ResponseObjective.roi(_mask([1]))
    with pytest.raises(ConfigError, match=r"responses must be \[n, 12\]"):
        obj(np.zeros((2, V + 1)))
    with pytest.raises(ConfigError, match=r"responses must be \[n, 12\]"):
        obj(torch.zeros(V))


def test_describe_is_json_and_digest_tracks_the_sets(masks):
    a = ResponseObjective.from_masks(masks, "OFA", contrast="FFA-1").describe()
    assert json.loads(json.dumps(a)) == a
    assert a["kind"] == "contrast" and a["n_voxels"] == 3 and a["n_minus_voxels"] == 2 and a["n_outputs"] == V
    assert a["names"] == ["floc-faces/OFA"] and a["minus_names"] == ["floc-faces/FFA-1"]
    b = ResponseObjective.from_masks(masks, "OFA", contrast="FFA-2").describe()
    c = ResponseObjective.from_masks(masks, "OFA").describe()
    assert len({a["digest"], b["digest"], c["digest"]}) == 3
    assert c == ResponseObjective.roi(masks["floc-faces/OFA"], name="floc-faces/OFA").describe()
    assert "n_minus_voxels" not in c
    assert "ResponseObjective(kind='contrast'" in repr(ResponseObjective.from_masks(masks, "OFA", contrast="FFA-1"))
