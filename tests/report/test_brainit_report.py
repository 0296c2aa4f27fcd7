"""brainenc.report.brainit: cluster maps (NIfTI / MGH round trips), the cluster colour mapping across
subjects, the transfer figure, the retrieval table and the whole report, on tiny geometries."""
import csv
import re

import nibabel as nib
import numpy as np
import pytest

from brainenc.exceptions import DataFormatError
from brainenc.report import brainit
from brainenc.report.brainit import (
    DECODE_HEADERS,
    DecodeReportInputs,
    build_decode_report,
    cluster_colors,
    cluster_figure,
    decode_table,
    label_colors,
    transfer_figure,
    write_cluster_maps,
)


def _volume_geometry(shape=(5, 4, 3), n=20, seed=0):
    rng = np.random.default_rng(seed)
    flat = np.sort(rng.choice(int(np.prod(shape)), n, replace=False))
    idx = np.stack(np.unravel_index(flat, shape), axis=1).astype(np.int64)
    affine = np.diag([1.8, 1.8, 1.8, 1.0])
    affine[:3, 3] = [-4.0, -3.0, -2.0]
    return {"space": "func1pt8mm", "shape": list(shape), "affine": affine.tolist(), "indices": idx}


def _surface_geometry(n_lh=6, n_rh=5, n_vertices=(12, 10), space="fsaverage"):
    rng = np.random.default_rng(1)
    sizes = n_vertices if n_vertices is not None else (163842, 163842)
    lh = np.sort(rng.choice(sizes[0], n_lh, replace=False))
    rh = np.sort(rng.choice(sizes[1], n_rh, replace=False))
    geo = {"space": space, "hemi": np.array(["lh"] * n_lh + ["rh"] * n_rh),
           "vertex": np.concatenate([lh, rh]).astype(np.int64)}
    if n_vertices is not None:
        geo["n_vertices"] = list(n_vertices)  # as PreparedDataset stores it: [lh, rh]
    return geo


def _record(n=50, b2i=0.4, i2b=0.35, tw=0.9, kind="pearson"):
    return {"n": n, "top1_brain_to_image": b2i, "top1_image_to_brain": i2b, "two_way": tw,
            "chance_top1": 1 / n, "chance_two_way": 0.5, "kind": kind}


# ------------------------------------------------------------------------------------------------ maps
def test_volume_cluster_map_round_trip(tmp_path):
    geo = _volume_geometry()
    labels = np.arange(20) % 7
    (path,) = write_cluster_maps(tmp_path, "subj01", labels, geo)
    assert path.name == "subj01_clusters.nii.gz"
    img = nib.load(path)
    assert img.get_data_dtype() == np.int16
    np.testing.assert_allclose(img.affine, np.asarray(geo["affine"]))
    vol = np.asanyarray(img.dataobj)
    assert vol.shape == (5, 4, 3) and vol.dtype == np.int16
    idx = geo["indices"]
    np.testing.assert_array_equal(vol[idx[:, 0], idx[:, 1], idx[:, 2]], labels + 1)
    outside = np.ones(vol.shape, bool)
    outside[idx[:, 0], idx[:, 1], idx[:, 2]] = False
    assert (vol[outside] == 0).all()
    assert not list(tmp_path.glob(".*"))  # no temporaries left behind


def test_surface_cluster_maps_one_mgh_per_hemisphere(tmp_path):
    geo = _surface_geometry()
    labels = np.array([0, 1, 2, 3, 4, 5, 5, 4, 3, 2, 1])
    paths = write_cluster_maps(tmp_path, "subj02", labels, geo)
    assert [p.name for p in paths] == ["lh.subj02_clusters.mgh", "rh.subj02_clusters.mgh"]
    hemi = geo["hemi"]
    for p, name, size in zip(paths, ("lh", "rh"), (12, 10)):
        img = nib.load(p)
        data = np.asanyarray(img.dataobj)
        assert data.shape == (size, 1, 1)  # each hemisphere its own size
        assert data.dtype.kind == "i" and data.dtype.itemsize == 2  # int16 (MGH stores big-endian)
        data = data.ravel()
        sel = hemi == name
        np.testing.assert_array_equal(data[geo["vertex"][sel]], labels[sel] + 1)
        rest = np.ones(size, bool)
        rest[geo["vertex"][sel]] = False
        assert (data[rest] == 0).all()


def test_fsaverage_maps_without_n_vertices_are_full_size(tmp_path):
    geo = _surface_geometry(n_vertices=None)  # fsaverage vertex ids, no sizes given
    paths = write_cluster_maps(tmp_path, "subj03", np.zeros(11, int), geo)
    assert all(nib.load(p).shape == (163842, 1, 1) for p in paths)


def test_cluster_map_errors(tmp_path):
    geo = _volume_geometry()
    with pytest.raises(DataFormatError, match="19 entries.*20 voxels"):
        write_cluster_maps(tmp_path, "subj01", np.zeros(19, int), geo)
    with pytest.raises(DataFormatError, match=">= 0"):
        write_cluster_maps(tmp_path, "subj01", -np.ones(20, int), geo)
    with pytest.raises(DataFormatError, match="integers"):
        write_cluster_maps(tmp_path, "subj01", np.full(20, 0.5), geo)


# ------------------------------------------------------------------------------------------------ colours
@pytest.mark.parametrize("n_clusters", [3, 10, 15, 40, 128])
def test_cluster_colors_are_fixed_and_distinct(n_clusters):
    cols = cluster_colors(n_clusters)
    assert cols.shape == (n_clusters, 4)
    np.testing.assert_array_equal(cols, cluster_colors(n_clusters))  # a function of (id, n_clusters) only
    assert len({tuple(np.round(c, 6)) for c in cols}) == n_clusters
    assert ((cols >= 0) & (cols <= 1)).all()
    lab = np.array([2, 0, 2, 1])
    np.testing.assert_array_equal(label_colors(lab, n_clusters), cols[lab])
    with pytest.raises(DataFormatError, match="n_clusters"):
        label_colors(np.array([n_clusters]), n_clusters)


def test_same_cluster_same_colour_in_every_subject():
    n_clusters = 6
    geos = {"subj01": _volume_geometry(seed=0), "subj02": _volume_geometry(shape=(6, 5, 3), n=25, seed=3),
            "subj03": _surface_geometry(space="native")}
    rng = np.random.default_rng(0)
    labels = {"subj01": rng.integers(0, n_clusters, 20), "subj02": rng.integers(0, n_clusters, 25),
              "subj03": rng.integers(0, n_clusters, 11)}
    fig = cluster_figure(labels, geos, n_clusters, n_slices=3)
    cols = cluster_colors(n_clusters)
    seen = {s: set() for s in labels}
    for ax in fig.axes:
        title = ax.get_title()
        if not title:
            continue
        subject = title.split()[0]
        lab, geo = labels[subject], geos[subject]
        if ax.images:  # a volume slice: RGBA image [Y, X, 4], white outside the voxels
            z = int(re.search(r"z=(\d+)", title).group(1))
            img = np.asarray(ax.images[-1].get_array())
            idx = geo["indices"]
            in_slice = idx[:, 2] == z
            got = img[idx[in_slice, 1], idx[in_slice, 0]]
            np.testing.assert_allclose(got, cols[lab[in_slice]])
            seen[subject] |= set(lab[in_slice].tolist())
        else:  # a surface hemisphere: scatter of the hemisphere's vertices
            hemi = title.split()[1]
            sel = geo["hemi"] == hemi
            (coll,) = ax.collections
            np.testing.assert_allclose(coll.get_facecolors(), cols[lab[sel]])
            seen[subject] |= set(lab[sel].tolist())
    assert all(seen[s] for s in labels)  # every subject was drawn
    # ids shared by subjects were drawn with the one colour of cols[id] in each of them
    assert seen["subj01"] & seen["subj02"] & seen["subj03"]


def test_cluster_figure_on_fsaverage_uses_the_flat_mesh():
    geo = _surface_geometry(n_lh=30, n_rh=30, n_vertices=(10242, 10242))
    lab = np.arange(60) % 4
    fig = cluster_figure({"subj05": lab}, {"subj05": geo}, 4)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["subj05 lh (fsaverage5 flat)", "subj05 rh (fsaverage5 flat)"]


# ------------------------------------------------------------------------------------------------ transfer
def test_transfer_figure_lines_and_chance():
    curve = {"bit": {"sessions": [1, 2, 4], "two_way": [0.7, 0.8, 0.85]},
             "ridge": {"sessions": [4, 1, 2], "two_way": [0.75, 0.6, 0.7]}}
    fig = transfer_figure(curve, "two_way", 0.5)
    (ax,) = fig.axes
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert set(lines) == {"bit", "ridge", "chance"}
    np.testing.assert_allclose(lines["ridge"].get_xdata(), [1, 2, 4])  # sorted by sessions
    np.testing.assert_allclose(lines["ridge"].get_ydata(), [0.6, 0.7, 0.75])
    assert lines["chance"].get_linestyle() == "--"
    assert np.allclose(lines["chance"].get_ydata(), 0.5)
    assert "chance" not in {ln.get_label() for ln in transfer_figure(curve, "two_way", None).axes[0].get_lines()}
    with pytest.raises(DataFormatError, match="'top1'"):
        transfer_figure(curve, "top1", 0.1)


# ------------------------------------------------------------------------------------------------ table
def test_decode_table_rows_and_columns():
    results = {"subj01": {"bit": {"semantic": _record(b2i=0.5), "lowlevel": _record(b2i=0.2)},
                          "ridge": _record(b2i=0.1, kind="cosine")},
               "subj02": {"bit": {"semantic": _record(n=40, b2i=0.45)}}}
    headers, rows = decode_table(results)
    assert headers == DECODE_HEADERS == ["subject", "model", "target", "similarity", "top-1 brain→image",
                                         "top-1 image→brain", "two-way", "n", "chance top-1", "chance two-way"]
    assert [r[:3] for r in rows] == [["subj01", "bit", "semantic"], ["subj01", "bit", "lowlevel"],
                                     ["subj01", "ridge", ""], ["subj02", "bit", "semantic"]]
    col = {h: i for i, h in enumerate(headers)}
    assert [r[col["top-1 brain→image"]] for r in rows] == [0.5, 0.2, 0.1, 0.45]
    assert rows[2][col["similarity"]] == "cosine"
    assert rows[3][col["n"]] == 40 and rows[3][col["chance top-1"]] == pytest.approx(1 / 40)
    assert all(r[col["chance two-way"]] == 0.5 for r in rows)
    with pytest.raises(DataFormatError, match="subj01.*bit"):
        decode_table({"subj01": {"bit": {"semantic": {"n": 3}}}})


# ------------------------------------------------------------------------------------------------ report
def test_build_decode_report_writes_every_file(tmp_path):
    geos = {"subj01": _volume_geometry(), "subj02": _surface_geometry(space="fsaverage")}
    rng = np.random.default_rng(2)
    labels = {"subj01": rng.integers(0, 5, 20), "subj02": rng.integers(0, 5, 11)}
    results = {s: {"bit": {"semantic": _record(), "lowlevel": _record(b2i=0.2)}, "ridge": {"semantic": _record(b2i=0.1)}}
               for s in geos}
    transfer = {"subject": "subj02", "metric": "top1_brain_to_image", "chance": 1 / 50,
                "curve": {"bit": {"sessions": [1, 2, 3], "top1_brain_to_image": [0.1, 0.2, 0.3]},
                          "ridge": {"sessions": [1, 3], "top1_brain_to_image": [0.05, 0.1]}}}
    inputs = DecodeReportInputs(results=results, cluster_labels=labels, geometry=geos, n_clusters=5,
                                transfer=transfer, notes=["fractions; papers report x100"])
    out = build_decode_report(tmp_path / "report", inputs)
    root = tmp_path / "report"
    expected = {"table.csv", "table.md", "clusters.png", "transfer.png", "index.md", "index.html",
                "clusters/subj01_clusters.nii.gz", "clusters/lh.subj02_clusters.mgh", "clusters/rh.subj02_clusters.mgh"}
    on_disk = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert on_disk == expected  # and no temporaries
    assert {str(p.relative_to(root)) for p in out["files"]} == expected
    assert out["index_md"] == root / "index.md" and out["transfer_png"] == root / "transfer.png"
    assert len(out["cluster_maps"]) == 3
    assert (root / "clusters.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(root / "table.csv", newline="") as fh:
        read = list(csv.reader(fh))
    assert read[0] == DECODE_HEADERS and len(read) == 1 + 2 * 3
    assert float(read[1][DECODE_HEADERS.index("top-1 brain→image")]) == 0.4
    md = (root / "index.md").read_text()
    html = (root / "index.html").read_text()
    for s in geos:
        assert s in md and s in html
    assert "clusters/lh.subj02_clusters.mgh" in md and "transfer.png" in html
    assert "fractions; papers report x100" in md
    assert "| subj01 | bit | semantic | pearson | 0.400 |" in (root / "table.md").read_text()


def test_build_decode_report_without_transfer_or_clusters(tmp_path):
    inputs = DecodeReportInputs(results={"subj01": {"ridge": _record()}}, cluster_labels={}, geometry={},
                                n_clusters=3)
    out = build_decode_report(tmp_path, inputs)
    assert "transfer_png" not in out and "clusters_png" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html", "index.md", "table.csv", "table.md"]
    assert "subj01" in (tmp_path / "index.md").read_text()


def test_build_decode_report_checks_inputs_before_writing(tmp_path):
    inputs = DecodeReportInputs(results={"subj01": {"bit": _record()}}, cluster_labels={"subj01": np.zeros(20, int)},
                                geometry={}, n_clusters=3)
    with pytest.raises(DataFormatError, match="no geometry"):
        build_decode_report(tmp_path / "r", inputs)
    inputs.geometry = {"subj01": _volume_geometry()}
    inputs.cluster_labels = {"subj01": np.full(20, 3)}
    with pytest.raises(DataFormatError, match="n_clusters=3"):
        build_decode_report(tmp_path / "r", inputs)
    assert not (tmp_path / "r").exists()


def test_report_module_imports_no_higher_layer():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(brainit))
    mods = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    mods += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in mods if m.split(".")[:2] in (["brainenc", "workflows"], ["brainenc", "encoding"],
                                                           ["brainenc", "decoding"])]


def test_surface_size_accepts_the_prepared_per_hemisphere_list():
    from brainenc.report.maps import surface_size, values_to_surface

    geo = {"space": "fsaverage", "n_vertices": [12, 12], "hemi": np.array(["lh", "rh"]), "vertex": np.array([3, 11])}
    assert surface_size(geo) == 12
    out = values_to_surface(np.array([1.0, 2.0]), geo)
    assert out["lh"][3] == 1.0 and out["rh"][11] == 2.0 and out["lh"].shape == (12,)
    geo["n_vertices"] = [12, 10]  # unequal hemispheres keep their own sizes
    out = values_to_surface(np.array([1.0, 2.0]), {**geo, "vertex": np.array([11, 9])})
    assert out["lh"].shape == (12,) and out["rh"].shape == (10,) and out["rh"][9] == 2.0
    with pytest.raises(DataFormatError, match="rh"):
        values_to_surface(np.array([1.0, 2.0]), geo)  # vertex 11 >= 10 on rh
