"""Report writers: ROI tables from given arrays, NIfTI/MGH round trips, the page renderer."""
import csv

import nibabel as nib
import numpy as np
import pytest

from brainenc.exceptions import DataFormatError
from brainenc.report.document import Document
from brainenc.report.maps import values_to_surface, write_map
from brainenc.report.tables import markdown_table, roi_table, write_roi_table


def _masks(n):
    m1 = np.zeros(n, bool)
    m1[:4] = True
    m2 = np.zeros(n, bool)
    m2[3:9] = True
    return {"V1": m1, "FFA": m2}


def test_roi_table_values_match_numpy():
    rng = np.random.default_rng(0)
    n = 10
    r = rng.uniform(-0.2, 0.8, n)
    r2 = rng.uniform(-0.1, 0.5, n)
    nn = r2 / 0.6
    nn[5] = np.nan  # a voxel with NC = 0 is ignored, not counted as 0
    nc = rng.uniform(0.1, 0.9, n)
    masks = _masks(n)
    rows = roi_table({"ridge": {"r": r, "r2": r2, "nc_norm": nn}, "other": {"r": r * 0.5}}, masks, nc)
    assert [row["roi"] for row in rows] == ["V1", "FFA"]
    ffa = rows[1]
    m = masks["FFA"]
    assert ffa["n_voxels"] == 6
    assert ffa["ridge:r_mean"] == pytest.approx(r[m].mean())
    assert ffa["ridge:r_median"] == pytest.approx(np.median(r[m]))
    assert ffa["ridge:r2_mean"] == pytest.approx(r2[m].mean())
    assert ffa["ridge:nc_norm_mean"] == pytest.approx(np.nanmean(nn[m]))
    assert ffa["nc_mean"] == pytest.approx(nc[m].mean())
    assert ffa["other:r_mean"] == pytest.approx(0.5 * r[m].mean())
    assert np.isnan(ffa["other:r2_mean"])  # missing metric -> NaN column, not an error


def test_roi_table_shape_mismatch_is_an_error():
    with pytest.raises(DataFormatError, match="ridge"):
        roi_table({"ridge": {"r": np.zeros(5)}}, _masks(10))


def test_roi_table_csv_and_markdown(tmp_path):
    n = 10
    rows = roi_table({"ridge": {"r": np.linspace(0, 0.9, n)}}, _masks(n), np.full(n, 0.5))
    csv_path, md_path = write_roi_table(rows, tmp_path / "t.csv", tmp_path / "t.md")
    with open(csv_path) as fh:
        read = list(csv.DictReader(fh))
    assert read[0]["roi"] == "V1" and int(read[0]["n_voxels"]) == 4
    assert float(read[0]["ridge:r_mean"]) == pytest.approx(np.linspace(0, 0.9, n)[:4].mean())
    assert read[0]["ridge:r2_mean"] == ""  # NaN -> empty field
    md = md_path.read_text()
    assert "| ROI | n voxels | noise ceiling | ridge mean r |" in md
    assert "| V1 | 4 | 0.500 | 0.150 |" in md
    assert md == markdown_table(rows)


def test_nifti_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    shape = (7, 6, 5)
    flat = rng.choice(np.prod(shape), 40, replace=False)
    idx = np.stack(np.unravel_index(flat, shape), axis=1)
    affine = np.diag([1.8, 1.8, 1.8, 1.0])
    affine[:3, 3] = [-5.4, -4.5, -3.6]
    geom = {"space": "func1pt8mm", "shape": shape, "affine": affine, "indices": idx}
    values = rng.standard_normal(40).astype(np.float32)
    values[0] = np.nan
    (path,) = write_map(values, geom, tmp_path, "ridge_r")
    assert path.name == "ridge_r.nii.gz"
    img = nib.load(path)
    data = np.asarray(img.dataobj)
    assert data.shape == shape
    np.testing.assert_allclose(img.affine, affine)
    got = data[idx[:, 0], idx[:, 1], idx[:, 2]]
    np.testing.assert_array_equal(got[1:], values[1:])
    assert got[0] == 0.0  # NaN written as the fill value
    outside = np.ones(shape, bool)
    outside[idx[:, 0], idx[:, 1], idx[:, 2]] = False
    assert (data[outside] == 0).all()
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writer left nothing behind


def test_mgh_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    n_vert = 50
    vertex = np.concatenate([rng.choice(n_vert, 12, replace=False), rng.choice(n_vert, 9, replace=False)])
    hemi = np.array(["lh"] * 12 + ["rh"] * 9)
    geom = {"space": "fsaverage", "hemi": hemi, "vertex": vertex, "n_vertices": n_vert}
    values = rng.standard_normal(21).astype(np.float32)
    paths = write_map(values, geom, tmp_path, "ridge_r")
    assert [p.name for p in paths] == ["lh.ridge_r.mgh", "rh.ridge_r.mgh"]
    for p, code in zip(paths, ("lh", "rh")):
        img = nib.load(p)
        assert img.shape == (n_vert, 1, 1)
        data = np.asarray(img.dataobj)[:, 0, 0]
        sel = hemi == code
        np.testing.assert_array_equal(data[vertex[sel]], values[sel])


def test_surface_defaults_to_full_fsaverage_and_checks_range():
    geom = {"space": "fsaverage", "hemi": np.array([0, 1]), "vertex": np.array([5, 163841])}
    out = values_to_surface(np.array([1.0, 2.0]), geom)
    assert out["lh"].shape == (163842,) and out["rh"][163841] == 2.0
    with pytest.raises(DataFormatError, match="vertex"):
        values_to_surface(np.array([1.0]), {"hemi": ["lh"], "vertex": [60], "n_vertices": 50})
    with pytest.raises(DataFormatError, match="shape"):
        write_map(np.zeros(3), geom, ".", "x")


def test_document_markdown_and_html(tmp_path):
    doc = Document("Run <report>")
    doc.heading("Scores")
    doc.table(["ROI", "r"], [["V1", "0.50"]], numeric=[False, True])
    doc.image("figures/bars.png", "bars")
    doc.links([("table", "roi_table.csv")])
    md, html = doc.write(tmp_path / "index.md", tmp_path / "index.html")
    text = md.read_text()
    assert text.startswith("# Run <report>") and "| V1 | 0.50 |" in text and "![bars](figures/bars.png)" in text
    page = html.read_text()
    assert "Run &lt;report&gt;" in page and "<img src='figures/bars.png'" in page and "<td class='num'>0.50</td>" in page
