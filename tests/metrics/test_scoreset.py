"""score_predictions / ScoreSet: the evaluation maths in one place, checked against scipy/sklearn."""
import json

import numpy as np
import pytest
from scipy.stats import pearsonr
from sklearn.metrics import r2_score as sk_r2

from brainenc.exceptions import DataFormatError
from brainenc.metrics import NormalizeOptions, ScoreSet, score_predictions


@pytest.fixture
def problem():
    rng = np.random.default_rng(1)
    y = rng.standard_normal((40, 7)).astype(np.float32)
    preds = {"good": y + 0.5 * rng.standard_normal(y.shape).astype(np.float32),
             "bad": rng.standard_normal(y.shape).astype(np.float32)}
    nc = rng.uniform(0.05, 0.9, 7).astype(np.float32)
    nc[3] = 0.0
    masks = {"V1": np.arange(7) < 4, "FFA": np.arange(7) >= 4}
    return y, preds, nc, masks


def test_scores_match_references(problem):
    y, preds, nc, masks = problem
    ss = score_predictions(y, preds, nc, roi_masks=masks)
    for model, pred in preds.items():
        r = np.array([pearsonr(y[:, j], pred[:, j])[0] for j in range(y.shape[1])])
        np.testing.assert_allclose(ss.scores[model]["r"], r, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ss.scores[model]["r2"], sk_r2(y, pred, multioutput="raw_values"),
                                   rtol=1e-5, atol=1e-6)
        # default options: clip negative r to 0, r² / NC, NaN where NC = 0, cap at 1
        want = np.where(nc > 0, np.minimum(np.clip(r, 0, None) ** 2 / np.where(nc > 0, nc, 1), 1.0), np.nan)
        np.testing.assert_allclose(ss.scores[model]["nc_norm"], want, rtol=1e-5, atol=1e-6)
    summ = ss.summary()
    v = ss.scores["good"]["nc_norm"]
    assert summ["models"]["good"]["nc_norm"]["rois"]["V1"] == pytest.approx(np.nanmean(v[:4]))
    assert summ["split"] == "test" and summ["n_test"] == 40


def test_options_and_errors(problem):
    y, preds, nc, masks = problem
    ss = score_predictions(y, preds, nc, roi_masks=masks, options=NormalizeOptions(normalize="r2", cap=None,
                                                                                   clip_negative=False))
    r2 = ss.scores["bad"]["r2"]
    ok = nc > 0
    np.testing.assert_allclose(ss.scores["bad"]["nc_norm"][ok], r2[ok] / nc[ok], rtol=1e-5, atol=1e-6)
    with pytest.raises(DataFormatError, match="'bad'"):
        score_predictions(y, {"bad": preds["bad"][:5]}, nc, roi_masks=masks)


def test_save_load_round_trip(problem, tmp_path):
    y, preds, nc, masks = problem
    ss = score_predictions(y, preds, nc, roi_masks=masks, split="val")
    files = ss.save(tmp_path / "scores")
    assert files[-1].name == "summary.json"
    back = ScoreSet.load(tmp_path / "scores", masks)
    assert back.split == "val" and back.models == ss.models and back.options == ss.options
    for m in ss.models:
        assert set(back.scores[m]) == set(ss.scores[m])
        for k in ss.scores[m]:
            np.testing.assert_array_equal(back.scores[m][k], ss.scores[m][k])
    assert json.dumps(back.summary(), sort_keys=True) == json.dumps(ss.summary(), sort_keys=True)
