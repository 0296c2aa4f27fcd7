"""Raw-file readers: NIfTI vs HDF5 axis order, scaling, fsaverage, ROIs, ctab, stimuli, bad files."""
import os

import h5py
import nibabel as nib
import numpy as np
import pytest

import nsd_fixtures as fx
from brainenc.datasets import layout
from brainenc.datasets.nsd import (NSDStimuli, check_betas_file, iter_betas_chunks, load_roi_surface, load_roi_volume,
                                   parse_ctab, read_betas_session, read_ctab)
from brainenc.exceptions import DataFormatError


def _mask_idx(sub):
    return np.argwhere(sub.labels["nsdgeneral"] > 0)


def test_hdf5_axes_are_reversed_nifti(nsd_subject):
    nii = np.asarray(nib.load(str(fx.betas_path(nsd_subject.root, "subj01", 2, "nifti"))).dataobj)
    with h5py.File(fx.betas_path(nsd_subject.root, "subj01", 2, "hdf5"), "r") as f:
        h5 = f["betas"][:]
    X, Y, Z, T = nii.shape
    assert h5.shape == (T, Z, Y, X)
    rng = np.random.default_rng(0)
    for _ in range(50):
        i, j, k, t = rng.integers(X), rng.integers(Y), rng.integers(Z), rng.integers(T)
        assert h5[t, k, j, i] == nii[i, j, k, t]


def test_nifti_and_hdf5_readers_agree_and_scale_by_300(nsd_subject):
    idx = _mask_idx(nsd_subject)
    a = read_betas_session(fx.betas_path(nsd_subject.root, "subj01", 3, "nifti"), kind="nifti", select=idx)
    b = read_betas_session(fx.betas_path(nsd_subject.root, "subj01", 3, "hdf5"), kind="hdf5", select=idx)
    raw = nsd_subject.betas[3]  # int16 (X, Y, Z, 750) as written
    direct = (raw[idx[:, 0], idx[:, 1], idx[:, 2], :].T.astype(np.float64) / 300.0)
    assert a.dtype == np.float32 and a.shape == (750, idx.shape[0])
    np.testing.assert_allclose(a, direct, rtol=1e-6)
    np.testing.assert_array_equal(a, b)
    # nibabel's own scaled read agrees
    fdata = nib.load(str(fx.betas_path(nsd_subject.root, "subj01", 3, "nifti"))).get_fdata()
    np.testing.assert_allclose(a, fdata[idx[:, 0], idx[:, 1], idx[:, 2], :].T / 300.0, rtol=1e-6)


def test_chunk_size_does_not_change_values(nsd_subject):
    p = fx.betas_path(nsd_subject.root, "subj01", 1, "nifti")
    hdr = check_betas_file(p, kind="nifti", shape=nsd_subject.grid)
    idx = _mask_idx(nsd_subject)
    a = np.concatenate([b for _, b in iter_betas_chunks(hdr, idx, chunk=7)])
    b = np.concatenate([b for _, b in iter_betas_chunks(hdr, idx, chunk=750)])
    np.testing.assert_array_equal(a, b)


def test_whole_grid_read_is_fortran_order(nsd_subject):
    p = fx.betas_path(nsd_subject.root, "subj01", 1, "nifti")
    full_n = read_betas_session(p, kind="nifti")
    full_h = read_betas_session(fx.betas_path(nsd_subject.root, "subj01", 1, "hdf5"), kind="hdf5")
    raw = nsd_subject.betas[1]
    np.testing.assert_allclose(full_n, raw.reshape(-1, 750, order="F").T / 300.0, rtol=1e-6)
    np.testing.assert_array_equal(full_n, full_h)


def test_fsaverage_betas_are_not_divided(nsd_subject):
    for hemi in ("lh", "rh"):
        p = fx.betas_path(nsd_subject.root, "subj01", 2, space="fsaverage", hemi=hemi)
        out = read_betas_session(p, kind="mgh")
        np.testing.assert_array_equal(out, nsd_subject.fs_betas[2][hemi].T)
        sel = np.array([3, 0, 7])
        np.testing.assert_array_equal(read_betas_session(p, kind="mgh", select=sel), nsd_subject.fs_betas[2][hemi][sel].T)


def test_roi_volume_labels_use_rint(tmp_path):
    data = np.array([-1.0, 0.0, 1.0000001, 2.9999, 7.0, -0.9999999] * 4).reshape(2, 3, 4).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "roi.nii.gz"))
    lab = load_roi_volume(tmp_path / "roi.nii.gz", (2, 3, 4))
    np.testing.assert_array_equal(lab, np.rint(data).astype(int))
    with pytest.raises(DataFormatError, match=r"does not match the betas grid \(5, 3, 4\)"):
        load_roi_volume(tmp_path / "roi.nii.gz", (5, 3, 4))


def test_roi_surface_and_ctab(nsd_subject):
    lab = load_roi_surface(layout.roi_path(nsd_subject.root, "subj01", "fsaverage", "streams", hemi="rh"))
    np.testing.assert_array_equal(lab, nsd_subject.fs_labels["streams"]["rh"])
    tab = read_ctab(layout.ctab_path(nsd_subject.root, "subj01", "streams"))
    assert tab[0] == "Unknown" and tab[5] == "ventral" and len(tab) == 8


def test_parse_ctab_strips_and_rejects():
    assert parse_ctab("0 Unknown\n1 V1v\t\n2  V1d \n\n") == {0: "Unknown", 1: "V1v", 2: "V1d"}
    with pytest.raises(DataFormatError, match="line 2 must look like"):
        parse_ctab("0 Unknown\nV1v 1\n", source="x.ctab")


def test_stimuli_read_any_order_with_duplicates(nsd_subject):
    st = NSDStimuli(nsd_subject.root)
    ids = [72999, 0, 72999, 0]
    out = st.read(ids)
    assert out.shape == (4, 425, 425, 3) and out.dtype == np.uint8
    for img, i in zip(out, ids):
        np.testing.assert_array_equal(img, fx.image_of(i))
    with pytest.raises(DataFormatError, match=r"73k ids must lie in \[0, 72999\]"):
        st.read([73000])
    with pytest.raises(DataFormatError, match=r"73k ids must lie"):
        st.read([-1])


def test_stimuli_identity_is_content_based(tmp_path):
    """One reader: NSDStimuli is HDF5Images, whose identity survives moving the folder (not a rewrite)."""
    import shutil

    from brainenc.features.images import HDF5Images

    p = fx.write_stimuli(tmp_path / "a", [1], n_images=5)
    st = NSDStimuli(p)
    assert isinstance(st, HDF5Images)
    ident = st.identity()
    assert ident == HDF5Images(p).identity()
    os.utime(p, ns=(1, 10**9))  # touching the file keeps the content, so the identity
    assert NSDStimuli(p).identity() == ident
    moved = tmp_path / "moved" / p.name
    moved.parent.mkdir()
    shutil.copy(p, moved)
    m = NSDStimuli(moved)
    assert m.identity() == ident
    m.close()
    with h5py.File(moved, "r+") as f:
        f["imgBrick"][0] = 255 - f["imgBrick"][0]
    assert NSDStimuli(moved).identity() != ident
    with pytest.raises(DataFormatError, match="integer"):
        st.read(np.array([0.0, 1.0]))


# --------------------------------------------------------------------------------- bad files
def test_truncated_nifti_is_caught_from_the_header(nsd_copy):
    p = fx.betas_path(nsd_copy.root, "subj01", 2, "nifti")
    blob = p.read_bytes()
    p.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataFormatError, match=r"betas_session02\.nii\.gz: truncated or corrupt gzip"):
        check_betas_file(p, kind="nifti")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_hdf5(nsd_copy, damage):
    p = fx.betas_path(nsd_copy.root, "subj01", 1, "hdf5")
    blob = p.read_bytes()
    p.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100 if damage == "garbage" else blob[: len(blob) // 2])
    with pytest.raises(DataFormatError, match=r"betas_session01\.hdf5: not a readable HDF5 file"):
        check_betas_file(p, kind="hdf5")


def test_truncated_mgh(nsd_copy):
    p = fx.betas_path(nsd_copy.root, "subj01", 1, space="fsaverage", hemi="lh")
    blob = p.read_bytes()
    p.write_bytes(blob[:-400])
    with pytest.raises(DataFormatError, match=r"lh\.betas_session01\.mgh: truncated betas: expected at least \d+ bytes"):
        check_betas_file(p, kind="mgh")


def test_wrong_dtype_betas(tmp_path):
    p = tmp_path / "betas_session01.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2, 750), np.float32), np.eye(4)), str(p))
    with pytest.raises(DataFormatError, match=r"betas must be int16 \(PSC x 300\); found float32"):
        check_betas_file(p, kind="nifti")


def test_wrong_trial_count(tmp_path):
    p = tmp_path / "betas_session01.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2, 749), np.int16), np.eye(4)), str(p))
    with pytest.raises(DataFormatError, match=r"shape \(X, Y, Z, 750\); found \(2, 2, 2, 749\)"):
        check_betas_file(p, kind="nifti")


def test_wrong_grid(nsd_subject):
    p = fx.betas_path(nsd_subject.root, "subj01", 1, "hdf5")
    with pytest.raises(DataFormatError, match=r"h5py shape \(750, 5, 6, 8\).*found \(750, 5, 6, 7\)"):
        check_betas_file(p, kind="hdf5", shape=(8, 6, 5))


def test_nan_in_fsaverage_betas(tmp_path):
    p = tmp_path / "lh.betas_session01.mgh"
    data = np.ones((5, 1, 1, 750), np.float32)
    data[2, 0, 0, 100] = np.nan
    nib.save(nib.MGHImage(data, np.eye(4)), str(p))
    with pytest.raises(DataFormatError, match=r"lh\.betas_session01\.mgh: betas contain 1 NaN/inf values"):
        read_betas_session(p, kind="mgh")


def test_missing_betas_file(tmp_path):
    with pytest.raises(DataFormatError, match=r"betas_session07\.hdf5: betas file not found"):
        check_betas_file(tmp_path / "betas_session07.hdf5", kind="hdf5")
