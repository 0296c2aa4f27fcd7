"""ROI time-series extraction: volumes (nilearn maskers), surfaces, ROI tables and NSD run time series."""
import numpy as np
import nibabel as nib
import pytest

from brainenc.datasets import layout
from brainenc.datasets.timeseries import (extract_roi_timeseries, header_tr, load_nsd_timeseries,
                                          read_confounds_table, read_roi_table, surface_roi_timeseries)
from brainenc.exceptions import ConfigError, DataFormatError

SHAPE = (6, 5, 4)
T = 30


def _labels_volume():
    lab = np.zeros(SHAPE, np.int16)
    lab[:2] = 1
    lab[2:4, :2] = 2
    lab[4:, 3:, 1:] = 3
    return lab


def _bold(rng, t_r=2.0, n_t=T):
    data = (rng.normal(size=SHAPE + (n_t,)) + 10).astype(np.float32)
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    img.header.set_zooms((2.0, 2.0, 2.0, t_r))
    img.header.set_xyzt_units("mm", "sec")
    return data, img


def _means(data, lab, ids):
    return np.stack([data[lab == k].mean(0) for k in ids], axis=1)


def test_labels_masker_equals_numpy_means(tmp_path):
    rng = np.random.default_rng(0)
    data, img = _bold(rng)
    lab = _labels_volume()
    nib.save(img, tmp_path / "bold.nii.gz")
    nib.save(nib.Nifti1Image(lab, img.affine), tmp_path / "atlas.nii.gz")
    series, names = extract_roi_timeseries(tmp_path / "bold.nii.gz", tmp_path / "atlas.nii.gz", standardize=False)
    assert series.dtype == np.float32 and series.shape == (T, 3)
    assert names == ["1", "2", "3"]
    np.testing.assert_allclose(series, _means(data, lab, (1, 2, 3)), rtol=1e-5, atol=1e-5)
    _, named = extract_roi_timeseries(img, nib.Nifti1Image(lab, img.affine), standardize=False,
                                      labels={1: "a", 2: "b", 3: "c"})
    assert named == ["a", "b", "c"]
    z, _ = extract_roi_timeseries(img, nib.Nifti1Image(lab, img.affine))
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(0, ddof=1), 1, atol=1e-4)


def test_maps_masker_two_maps():
    rng = np.random.default_rng(1)
    data, img = _bold(rng)
    maps = np.zeros(SHAPE + (2,), np.float32)
    maps[:3, ..., 0] = 1
    maps[3:, ..., 1] = rng.random((3,) + SHAPE[1:])
    series, names = extract_roi_timeseries(img, nib.Nifti1Image(maps, img.affine), kind="maps", standardize=False,
                                           labels=["left", "right"])
    assert series.shape == (T, 2) and names == ["left", "right"]
    ref = np.linalg.lstsq(maps.reshape(-1, 2), data.reshape(-1, T), rcond=None)[0].T
    np.testing.assert_allclose(series, ref, rtol=1e-4, atol=1e-4)


def test_confound_regression_reduces_correlation(tmp_path):
    rng = np.random.default_rng(2)
    data, _ = _bold(rng)
    conf = rng.normal(size=T)
    data = data + 3 * conf[None, None, None, :].astype(np.float32)
    img = nib.Nifti1Image(data, np.eye(4))
    atlas = nib.Nifti1Image(_labels_volume(), np.eye(4))
    raw, _ = extract_roi_timeseries(img, atlas, standardize=False)
    (tmp_path / "conf.tsv").write_text("motion\n" + "\n".join(f"{v:.8f}" for v in conf) + "\n")
    for c in (conf[:, None], tmp_path / "conf.tsv"):
        clean, _ = extract_roi_timeseries(img, atlas, standardize=False, confounds=c)
        r_raw = [abs(np.corrcoef(raw[:, k], conf)[0, 1]) for k in range(3)]
        r_clean = [abs(np.corrcoef(clean[:, k], conf)[0, 1]) for k in range(3)]
        assert min(r_raw) > 0.9 and max(r_clean) < 0.05
    (tmp_path / "short.tsv").write_text("\n".join(f"{v:.8f}" for v in conf[:-2]) + "\n")
    with pytest.raises(DataFormatError, match="short.tsv"):
        extract_roi_timeseries(img, atlas, confounds=tmp_path / "short.tsv")


def test_band_pass_needs_tr():
    rng = np.random.default_rng(3)
    data, _ = _bold(rng, n_t=80)  # the Butterworth filter pads 33 samples
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_zooms((1.0, 1.0, 1.0, 0.0))
    atlas = nib.Nifti1Image(_labels_volume(), np.eye(4))
    assert header_tr(img) is None
    with pytest.raises(ConfigError, match="t_r"):
        extract_roi_timeseries(img, atlas, high_pass=0.01)
    series, _ = extract_roi_timeseries(img, atlas, high_pass=0.01, low_pass=0.1, t_r=2.0)
    assert series.shape == (80, 3) and np.isfinite(series).all()
    _, img2 = _bold(rng, t_r=2000.0, n_t=80)
    img2.header.set_xyzt_units("mm", "msec")
    assert header_tr(img2) == pytest.approx(2.0)
    series2, _ = extract_roi_timeseries(img2, atlas, low_pass=0.1)  # TR from the header
    assert np.isfinite(series2).all()
    with pytest.raises(ConfigError, match="kind"):
        extract_roi_timeseries(img, atlas, kind="probabilistic")
    with pytest.raises(ConfigError, match="standardize"):
        extract_roi_timeseries(img, atlas, standardize="robust")


def _write_mgh(path, values):
    nib.save(nib.MGHImage(values.reshape(values.shape[0], 1, 1, -1).astype(np.float32), np.eye(4)), str(path))


def test_surface_mgh_pair_and_gifti_annot(tmp_path):
    rng = np.random.default_rng(4)
    v_lh, v_rh = 40, 36
    lh, rh = rng.normal(size=(v_lh, T)).astype(np.float32), rng.normal(size=(v_rh, T)).astype(np.float32)
    _write_mgh(tmp_path / "lh.func.mgh", lh)
    _write_mgh(tmp_path / "rh.func.mgz", rh)
    plh, prh = rng.integers(0, 4, v_lh), rng.integers(0, 3, v_rh)
    # MGH data pair + array parcellation pair: per-hemisphere ROIs
    series, names = surface_roi_timeseries((tmp_path / "lh.func.mgh", tmp_path / "rh.func.mgz"), (plh, prh))
    assert names == ["lh.1", "lh.2", "lh.3", "rh.1", "rh.2"]
    ref = np.concatenate([_means(lh, plh, (1, 2, 3)), _means(rh, prh, (1, 2))], axis=1)
    np.testing.assert_allclose(series, ref, rtol=1e-5, atol=1e-6)
    # bilateral: one label pooled over both hemispheres
    both, bnames = surface_roi_timeseries((lh, rh), (plh, prh), bilateral=True)
    allv, alll = np.concatenate([lh, rh]), np.concatenate([plh, prh])
    assert bnames == ["1", "2", "3"]
    np.testing.assert_allclose(both, _means(allv, alll, (1, 2, 3)), rtol=1e-5, atol=1e-6)
    # GIfTI (one darray per time point) + .annot
    gii = nib.gifti.GiftiImage(darrays=[nib.gifti.GiftiDataArray(lh[:, t], intent="NIFTI_INTENT_TIME_SERIES",
                                                                 datatype="NIFTI_TYPE_FLOAT32") for t in range(T)])
    nib.save(gii, tmp_path / "lh.func.gii")
    ctab = np.array([[25, 5, 25, 0, 0], [25, 100, 40, 0, 0], [220, 20, 100, 0, 0], [10, 10, 10, 0, 0]])
    annot_lab = np.where(plh == 0, -1, plh)
    nib.freesurfer.write_annot(str(tmp_path / "lh.aparc.annot"), annot_lab, ctab,
                               [b"unknown", b"frontal", b"parietal", b"occipital"], fill_ctab=True)
    s2, n2 = surface_roi_timeseries(tmp_path / "lh.func.gii", tmp_path / "lh.aparc.annot")
    assert n2 == ["frontal", "parietal", "occipital"]
    np.testing.assert_allclose(s2, _means(lh, plh, (1, 2, 3)), rtol=1e-5, atol=1e-6)
    # 2-D GIfTI darray [V, T] + label GIfTI
    nib.save(nib.gifti.GiftiImage(darrays=[nib.gifti.GiftiDataArray(lh, datatype="NIFTI_TYPE_FLOAT32")]),
             tmp_path / "lh2d.func.gii")
    table = nib.gifti.GiftiLabelTable()
    for k, nm in enumerate(["bg", "A", "B", "C"]):
        lbl = nib.gifti.GiftiLabel(k)
        lbl.label = nm
        table.labels.append(lbl)
    nib.save(nib.gifti.GiftiImage(labeltable=table, darrays=[nib.gifti.GiftiDataArray(
        plh.astype(np.int32), intent="NIFTI_INTENT_LABEL", datatype="NIFTI_TYPE_INT32")]), tmp_path / "lh.label.gii")
    s3, n3 = surface_roi_timeseries(tmp_path / "lh2d.func.gii", tmp_path / "lh.label.gii")
    assert n3 == ["A", "B", "C"]
    np.testing.assert_allclose(s3, _means(lh, plh, (1, 2, 3)), rtol=1e-5, atol=1e-6)
    z, _ = surface_roi_timeseries(lh, plh, standardize=True)
    np.testing.assert_allclose(z.std(0, ddof=1), 1, atol=1e-4)


def test_surface_vertex_mismatch_names_file(tmp_path):
    rng = np.random.default_rng(5)
    _write_mgh(tmp_path / "lh.func.mgh", rng.normal(size=(40, T)))
    nib.save(nib.MGHImage(np.ones((39, 1, 1), np.float32), np.eye(4)), str(tmp_path / "lh.parc.mgz"))
    with pytest.raises(DataFormatError, match=r"lh\.parc\.mgz: the parcellation has 39 vertices"):
        surface_roi_timeseries(tmp_path / "lh.func.mgh", tmp_path / "lh.parc.mgz")


def test_read_roi_table_formats(tmp_path):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(12, 4))
    p1 = tmp_path / "s_0050002_rois_cc200.1D"
    p1.write_text("#2001\t#2002\t#2003\t#2004\n" + "\n".join("\t".join(f"{v:.7g}" for v in r) for r in x) + "\n")
    s, names = read_roi_table(p1)
    assert names == ["2001", "2002", "2003", "2004"] and s.dtype == np.float32
    np.testing.assert_allclose(s, x, rtol=1e-6)
    p2 = tmp_path / "t.csv"
    p2.write_text('"V1","V2",MT,FFA\n' + "\n".join(",".join(f"{v:.7g}" for v in r) for r in x) + "\n")
    s, names = read_roi_table(p2)
    assert names == ["V1", "V2", "MT", "FFA"]
    np.testing.assert_allclose(s, x, rtol=1e-6)
    p3 = tmp_path / "t.tsv"
    p3.write_text("\n".join("\t".join(f"{v:.7g}" for v in r) for r in x) + "\n")
    s, names = read_roi_table(p3)
    assert names == ["roi_0", "roi_1", "roi_2", "roi_3"]
    np.testing.assert_allclose(s, x, rtol=1e-6)
    p4 = tmp_path / "t.txt"
    p4.write_text("\n".join(" ".join(f"{v:.7g}" for v in r) for r in x) + "\n")
    np.testing.assert_allclose(read_roi_table(p4)[0], x, rtol=1e-6)


def test_read_roi_table_errors(tmp_path):
    p = tmp_path / "ragged.1D"
    p.write_text("#a b c\n1 2 3\n4 5 6\n7 8\n")
    with pytest.raises(DataFormatError, match=r"ragged\.1D: line 4 has 2 columns"):
        read_roi_table(p)
    p = tmp_path / "bad.csv"
    p.write_text("a,b\n1,2\n3,x\n")
    with pytest.raises(DataFormatError, match=r"bad\.csv: line 3, column 2: 'x' is not a number"):
        read_roi_table(p)
    p = tmp_path / "hdr.csv"
    p.write_text("a,b,c\n1,2\n")
    with pytest.raises(DataFormatError, match=r"hdr\.csv: the header has 3 names"):
        read_roi_table(p)
    with pytest.raises(DataFormatError, match="not found"):
        read_roi_table(tmp_path / "missing.1D")
    p = tmp_path / "conf.tsv"
    p.write_text("fd\trx\nn/a\t1\n2\t3\n4\t5\n")
    c, n = read_confounds_table(p)
    assert n == ["fd", "rx"] and c[0, 0] == 3.0


# ---------------------------------------------------------------------------------------------- NSD
def _write_nsd_run(root, rng, session=1, run=2, space="func1pt8mm"):
    data = rng.normal(size=SHAPE + (T,)).astype(np.float32) + 100
    affine = np.diag([1.8, 1.8, 1.8, 1.0])
    p = layout.timeseries_path(root, "subj01", space, session, run)
    p.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), p)
    motion = rng.normal(size=(T, 6))
    m = layout.timeseries_motion_path(root, "subj01", space, session, run)
    m.parent.mkdir(parents=True, exist_ok=True)
    m.write_text("\n".join("\t".join(f"{v:.6f}" for v in r) for r in motion) + "\n")
    lab = np.where(_labels_volume() > 0, _labels_volume(), -1).astype(np.int16)  # -1 = outside cortex
    lab[0, 0, 0] = 0
    r = layout.roi_path(root, "subj01", space, "floc-faces")
    r.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(lab, affine), r)
    return data, lab, motion


def test_nsd_timeseries_fixture(tmp_path):
    rng = np.random.default_rng(7)
    root = tmp_path / "nsd"
    data, lab, motion = _write_nsd_run(root, rng)
    _write_nsd_run(root, rng, session=1, run=1)
    assert layout.list_timeseries_runs(root, "subj01", "func1pt8mm") == [(1, 1), (1, 2)]
    assert layout.timeseries_design_path(root, 1, "func1mm", 3, 14).name == "design_session03_run14.tsv"
    series, names, tr = load_nsd_timeseries(root, "subj01", 1, 2, rois="floc-faces", confounds=None,
                                            standardize=False)
    assert names == ["OFA", "FFA-1", "FFA-2"] and tr == pytest.approx(4 / 3)
    np.testing.assert_allclose(series, _means(data, lab, (1, 2, 3)), rtol=1e-5)
    cleaned, _, _ = load_nsd_timeseries(root, 1, 1, 2, rois="floc-faces")
    resid = cleaned - cleaned.mean(0)
    beta = np.linalg.lstsq(np.c_[np.ones(T), motion], resid, rcond=None)[0][1:]
    assert np.abs(beta).max() < 1e-3  # motion regressed out
    arr_series, arr_names, _ = load_nsd_timeseries(root, 1, 1, 2, rois=lab, confounds=None, standardize=False,
                                                   labels=["a", "b", "c"])
    assert arr_names == ["a", "b", "c"]
    np.testing.assert_allclose(arr_series, series, rtol=1e-6)
    with pytest.raises(DataFormatError, match="timeseries_session02_run01"):
        load_nsd_timeseries(root, 1, 2, 1, confounds=None)
    with pytest.raises(ConfigError, match="space"):
        load_nsd_timeseries(root, 1, 1, 2, space="fsaverage")
