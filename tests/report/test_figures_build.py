"""Figures are written (non-empty PNGs) and build_report assembles a complete folder."""
import json

import h5py
import numpy as np
import pytest

from brainenc.report import ReportInputs, ReportOptions, build_report
from brainenc.report import figures
from brainenc.report.ground_truth import compare_ground_truth, match_voxels, true_noise_ceiling
from brainenc.report.tables import roi_table


def _png_ok(path):
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def _volume(n=60, shape=(8, 9, 7), seed=0):
    rng = np.random.default_rng(seed)
    flat = np.sort(rng.choice(np.prod(shape), n, replace=False))
    idx = np.stack(np.unravel_index(flat, shape), axis=1)
    return {"space": "func1pt8mm", "shape": shape, "affine": np.diag([1.8, 1.8, 1.8, 1.0]).tolist(), "indices": idx}


def _scores(n, seed=0):
    rng = np.random.default_rng(seed)
    r = rng.uniform(-0.1, 0.8, n)
    return {"r": r, "r2": r * np.abs(r) - 0.02, "nc_norm": np.clip(r * r / 0.6, 0, 1), "alpha": 10.0 ** rng.integers(0, 5, n)}


def _masks(n):
    a = np.zeros(n, bool)
    a[: n // 2] = True
    return {"nsdgeneral/nsdgeneral": np.ones(n, bool), "prf-visualrois/V1v": a, "floc-faces/FFA-1": ~a}


def test_individual_figures(tmp_path):
    n = 60
    geom = _volume(n)
    rows = roi_table({"ridge": _scores(n), "other": _scores(n, 1)}, _masks(n), np.full(n, 0.6))
    assert _png_ok(figures.plot_roi_bars(rows, ["ridge", "other"], tmp_path / "bars.png"))
    assert _png_ok(figures.plot_volume_mosaic(_scores(n)["r"], geom, tmp_path / "mosaic.png", title="r", n_slices=4))
    rng = np.random.default_rng(0)
    yt = rng.standard_normal((30, 3))
    assert _png_ok(figures.plot_pred_vs_measured(yt, {"a": yt + 0.1, "b": -yt}, ["v0", "v1", "v2"], tmp_path / "pvm.png"))
    assert _png_ok(figures.plot_scatter(yt[:, 0], yt[:, 1], tmp_path / "sc.png", "x", "y",
                                        groups={"g": yt[:, 0] > 0}))
    # NSD native affines are not a template space: no glass brain
    assert figures.plot_glass_brain(_scores(n)["r"], geom, tmp_path / "glass.png") is None
    assert not (tmp_path / "glass.png").exists()


def test_surface_fallback_scatter_for_non_fsaverage(tmp_path):
    geom = {"space": "fsaverage", "hemi": np.array(["lh"] * 20 + ["rh"] * 20),
            "vertex": np.tile(np.arange(20), 2), "n_vertices": 20}
    assert _png_ok(figures.plot_surface_map(np.linspace(0, 1, 40), geom, tmp_path / "surf.png"))


@pytest.mark.slow
def test_surface_on_fsaverage5_mesh_for_full_fsaverage(tmp_path):
    rng = np.random.default_rng(0)
    vertex = np.concatenate([rng.choice(163842, 3000, replace=False)] * 2)
    geom = {"space": "fsaverage", "hemi": np.array(["lh"] * 3000 + ["rh"] * 3000), "vertex": vertex}
    assert _png_ok(figures.plot_surface_map(rng.uniform(0, 1, 6000), geom, tmp_path / "surf.png", title="r"))


def test_build_report_volume(tmp_path):
    n = 60
    geom = _volume(n)
    rng = np.random.default_rng(3)
    y = rng.standard_normal((25, n)).astype(np.float32)
    inputs = ReportInputs(title="test report", scores={"ridge": _scores(n), "pooled": _scores(n, 2)},
                          roi_masks=_masks(n), geometry=geom, noise_ceiling=np.full(n, 0.6, np.float32),
                          y_true=y, predictions={"ridge": y * 0.5, "pooled": y * 0.2},
                          summary=[("subject", "subj01")], timings=[("fit.ridge", "ran", 1.25)],
                          config_text='{"a": 1}', links=[("log", "../logs/run.log")])
    res = build_report(tmp_path / "report", inputs, ReportOptions(n_slices=3, n_best_voxels=3))
    out = tmp_path / "report"
    for rel in res["files"]:
        assert (out / rel).stat().st_size > 0, rel
    names = set(res["files"])
    assert {"index.md", "index.html", "roi_table.csv", "roi_table.md", "report.json", "maps/ridge_r.nii.gz",
            "maps/pooled_alpha.nii.gz", "maps/noise_ceiling.nii.gz", "figures/roi_bars.png",
            "figures/ridge_nc_norm_slices.png", "figures/pred_vs_measured.png"} <= names
    md = (out / "index.md").read_text()
    for rel in ("figures/roi_bars.png", "maps/ridge_r.nii.gz", "roi_table.csv", "../logs/run.log"):
        assert f"({rel})" in md
    assert "| fit.ridge | ran | 1.2 |" in md or "| fit.ridge | ran | 1.3 |" in md
    assert "ground truth" not in md.lower()  # optional section absent without a file
    assert [r["roi"] for r in res["rows"]] == list(_masks(n))


def test_build_report_surface_without_figures(tmp_path):
    geom = {"space": "fsaverage", "hemi": np.array(["lh", "rh", "rh"]), "vertex": np.array([1, 2, 3]), "n_vertices": 8}
    res = build_report(tmp_path, ReportInputs(title="s", scores={"m": {"r": np.array([0.1, 0.2, 0.3])}},
                                              roi_masks={"a/b": np.array([True, True, False])}, geometry=geom),
                       ReportOptions(figures=False, html=False, maps=["r"]))
    assert set(res["files"]) == {"roi_table.csv", "roi_table.md", "maps/lh.m_r.mgh", "maps/rh.m_r.mgh",
                                 "index.md", "report.json"}


def _ground_truth_file(path, geom, snr, model):
    ijk = np.asarray(geom["indices"])
    with h5py.File(path, "w") as f:
        f.attrs["subject"] = "subj01"
        f.attrs["model_codes"] = json.dumps({"mixed": 0, "prf": 1, "category": 2})
        f["voxels/ijk"] = ijk[::-1].astype(np.int16)  # another order than the dataset's
        f["voxels/model"] = model[::-1]
        f["voxels/snr"] = snr[::-1]
        f["trials/image_row"] = np.repeat(np.arange(10), 3)
        f["images/is_shared"] = np.arange(10) < 4


def test_ground_truth_comparison(tmp_path):
    n = 60
    geom = _volume(n)
    rng = np.random.default_rng(5)
    snr = rng.uniform(0.2, 1.5, n)
    model = np.repeat([1, 2, 0], n // 3)
    gt_path = tmp_path / "gt.h5"
    _ground_truth_file(gt_path, geom, snr, model)
    rows = match_voxels(geom, np.asarray(geom["indices"])[::-1])
    np.testing.assert_array_equal(rows, np.arange(n)[::-1])
    nc_true = true_noise_ceiling(snr, 3)
    # a model that reaches the full ceiling on pRF voxels and half of it elsewhere
    r = np.sqrt(nc_true * np.where(model == 1, 1.0, 0.5))
    res = compare_ground_truth(gt_path, {"ridge": {"r": r, "nc_norm": r * r / nc_true}}, geom, nc_true, tmp_path)
    s = res["summary"]
    assert s["n_matched_voxels"] == n and s["n_repeats_test"] == 3.0
    assert s["nc_estimate_vs_true_r"] == pytest.approx(1.0)
    assert s["groups"]["prf"]["models"]["ridge"]["r2_over_true_nc"] == pytest.approx(1.0)
    assert s["groups"]["category"]["models"]["ridge"]["r2_over_true_nc"] == pytest.approx(0.5)
    assert any("early visual voxels are better explained" in t for t in res["text"])
    assert (tmp_path / "ground_truth.json").is_file() and all(_png_ok(tmp_path / rel) for _, rel in res["figures"])
    # build_report includes the optional section when the file exists
    out = build_report(tmp_path / "rep", ReportInputs(title="t", scores={"ridge": {"r": r}}, roi_masks=_masks(n),
                                                      geometry=geom, noise_ceiling=nc_true, ground_truth_path=gt_path),
                       ReportOptions(figures=False))
    assert "ground_truth.json" in out["files"]
    assert "Comparison with the simulator's ground truth" in (tmp_path / "rep" / "index.md").read_text()


def test_true_noise_ceiling_is_the_datasets_formula():
    """The ground-truth ceiling is the datasets' NSD formula, bit for bit the old inline one."""
    from brainenc.datasets.noise_ceiling import noise_ceiling

    snr = np.array([0.0, 0.1, 0.37, 1.0, 2.5, np.nan, 7.0])
    for n in (1, 2, 3, 2.7):
        s2 = snr ** 2
        with np.errstate(invalid="ignore"):
            old = s2 / (s2 + 1.0 / float(n))
        np.testing.assert_array_equal(true_noise_ceiling(snr, n), old)
        np.testing.assert_array_equal(true_noise_ceiling(snr, n), noise_ceiling(snr, n))
