"""Bad input gives one line naming the file, never a traceback (the four failures of the independent
NSD-format release with broken copies, the partial download, and the cache's temporaries).

Expected facts come from ``shared/reference/nsd_format.md``: §1.1 (``nsd_expdesign.mat`` v5 fields,
``sharedix[k] == subjectim[s, k]`` for the 1000 shared slots, both 1-based), §1.5 (affine
``diag(r, r, r, 1)`` with the slab-centre origin; ROIs "with the betas' (X,Y,Z) shape"), §1.8 (ncsnr
``sqrt(max(0, 1 - v^2)) / v`` >= 0).
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import scipy.io

import nsd_fixtures as fx
from brainenc.cli import main as cli_main
from brainenc.datasets import layout
from brainenc.datasets import nsd as nsdio
from brainenc.datasets import prepare as prep
from brainenc.datasets.prepare import PrepareConfig, list_prepared, prepare_subject
from brainenc.exceptions import BrainencError, DataFormatError

TPS = 750


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "prepared"


def _one_line(exc_info, *paths) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    for p in paths:
        assert str(p) in msg, f"{p} not named in: {msg}"
    return msg


def _no_cache_left(cache: Path) -> None:
    assert not cache.exists() or (list_prepared(cache) == [] and list(cache.iterdir()) == [])


# --------------------------------------------------------------------------------- 1. unreadable .mat
def _expdesign_bytes(sub, compress=False) -> bytes:
    import io

    buf = io.BytesIO()
    scipy.io.savemat(buf, {**sub.design, "stimpattern": np.zeros((40, 12, 75))}, do_compression=compress)
    return buf.getvalue()


@pytest.mark.parametrize("cut", [0, 41, 100])
def test_garbage_expdesign_is_one_line_error(nsd_copy, cache, cut):
    """A valid MATLAB header followed by zeros (the reported IndexError; cut=41 crashed scipy outright)."""
    p = layout.expdesign_path(nsd_copy.root)
    p.write_bytes(_expdesign_bytes(nsd_copy)[:128 + cut] + b"\x00" * 5000)
    with pytest.raises(DataFormatError) as ei:
        prepare_subject(nsd_copy.root, PrepareConfig(), cache_root=cache)
    assert "not a readable MATLAB v5 .mat file" in _one_line(ei, p)
    _no_cache_left(cache)


def test_scipy_crashing_mat_does_not_kill_the_process(nsd_subject, tmp_path):
    """In a child process, so a regression shows up as a failed test rather than a dead test worker."""
    p = tmp_path / "nsd_expdesign.mat"
    p.write_bytes(_expdesign_bytes(nsd_subject)[:128 + 41] + b"\x00" * 200)
    code = ("import sys; from brainenc.datasets.nsd import load_expdesign\n"
            "from brainenc.exceptions import DataFormatError\n"
            f"try:\n    load_expdesign({str(p)!r})\nexcept DataFormatError as e:\n    print('ok', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("ok "), (r.returncode, r.stdout, r.stderr[-2000:])
    assert str(p) in r.stdout


def test_compressed_expdesign_reads_the_same(nsd_subject, tmp_path):
    """MATLAB's default v7 files are zlib-compressed v5: the pre-check must accept them."""
    a = tmp_path / "a.mat"
    b = tmp_path / "b.mat"
    a.write_bytes(_expdesign_bytes(nsd_subject, compress=False))
    b.write_bytes(_expdesign_bytes(nsd_subject, compress=True))
    ea, eb = nsdio.load_expdesign(a), nsdio.load_expdesign(b)
    np.testing.assert_array_equal(ea.masterordering, nsd_subject.design["masterordering"][0] - 1)
    np.testing.assert_array_equal(eb.masterordering, ea.masterordering)
    np.testing.assert_array_equal(eb.subjectim, ea.subjectim)
    np.testing.assert_array_equal(eb.sharedix, ea.sharedix)


def test_v73_and_v4_mat_files_are_named(nsd_subject, tmp_path):
    v73 = tmp_path / "v73.mat"
    with h5py.File(v73, "w", userblock_size=512) as f:
        f.create_dataset("masterordering", data=nsd_subject.design["masterordering"])
    with open(v73, "r+b") as fh:  # MATLAB's v7.3 header: text, then version 0x0200 and 'IM' at 124..127
        fh.write(b"MATLAB 7.3 MAT-file".ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02IM")
    with pytest.raises(DataFormatError, match=r"v7\.3 \(HDF5\)") as ei:
        nsdio.load_expdesign(v73)
    _one_line(ei, v73)
    v4 = tmp_path / "v4.mat"
    scipy.io.savemat(v4, {"masterordering": np.ones((1, 3))}, format="4")
    with pytest.raises(DataFormatError, match=r"MATLAB v4") as ei:
        nsdio.load_expdesign(v4)
    _one_line(ei, v4)


@pytest.mark.parametrize("what, damage", [
    ("brainmask", lambda p: p.write_bytes(b"\x1f\x8b" + b"\x00" * 300)),
    ("ncsnr", lambda p: p.write_bytes(p.read_bytes()[:60])),
    ("roi", lambda p: p.write_bytes(gzip_bytes(b"\x5c\x01\x00\x00" + b"\xff" * 400))),
    ("stimuli", lambda p: p.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\xff" * 3000)),
    ("ctab", lambda p: p.write_bytes(b"0 Unknown\n1 \x00\x01\x02\n")),
    ("ctab-binary", lambda p: p.write_bytes(b"\xff\xfe\x00garbage")),
    ("label.mgz", lambda p: p.write_bytes(p.read_bytes()[:40])),
])
def test_every_reader_names_the_file(nsd_copy, cache, what, damage):
    r = nsd_copy.root
    target, cfg = {
        "brainmask": (layout.brainmask_path(r, "subj01", "func1pt8mm"), PrepareConfig(mask="brainmask")),
        "ncsnr": (layout.ncsnr_path(r, "subj01", "func1pt8mm", fx.GLM), PrepareConfig()),
        "roi": (layout.roi_path(r, "subj01", "func1pt8mm", "floc-faces"), PrepareConfig()),
        "stimuli": (layout.stimuli_path(r), PrepareConfig()),
        "ctab": (layout.ctab_path(r, "subj01", "prf-visualrois", space="func1pt8mm"), PrepareConfig()),
        "ctab-binary": (layout.ctab_path(r, "subj01", "prf-visualrois", space="func1pt8mm"), PrepareConfig()),
        "label.mgz": (layout.roi_path(r, "subj01", "fsaverage", "streams", hemi="rh"),
                      PrepareConfig(space="fsaverage")),
    }[what]
    damage(target)
    with pytest.raises(BrainencError) as ei:
        prepare_subject(r, cfg, cache_root=cache)
    _one_line(ei, target)
    _no_cache_left(cache)


def gzip_bytes(b: bytes) -> bytes:
    import gzip

    return gzip.compress(b)


def test_cli_prints_one_line_for_a_garbage_mat(nsd_copy, tmp_path, capsys):
    p = layout.expdesign_path(nsd_copy.root)
    p.write_bytes(_expdesign_bytes(nsd_copy)[:128] + b"\x00" * 1000)
    code = cli_main(["--data-dir", str(tmp_path / "data"), "--nsd-root", str(nsd_copy.root), "prepare"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and str(p) in err and "Traceback" not in err


# ------------------------------------------------------------------------------ 2. affine and grid
def _resave(path: Path, affine=None, data=None):
    img = nib.load(str(path))
    data = np.asarray(img.dataobj) if data is None else data
    new = nib.Nifti1Image(data, img.affine if affine is None else affine, header=img.header)
    nib.save(new, str(path))


def _shifted(sub, dx=1.8):
    aff = fx._affine(sub.grid)
    aff[0, 3] += dx
    return aff


@pytest.mark.parametrize("target, cfg", [
    ("roi/nsdgeneral.nii.gz", PrepareConfig()),
    ("roi/floc-faces.nii.gz", PrepareConfig()),
    ("brainmask.nii.gz", PrepareConfig(mask="brainmask")),
    ("ncsnr", PrepareConfig()),
])
def test_affine_of_mask_roi_or_ncsnr_must_match_the_betas(nsd_copy, cache, monkeypatch, target, cfg):
    pp = nsd_copy.root / "nsddata" / "ppdata" / "subj01" / "func1pt8mm"
    p = (layout.ncsnr_path(nsd_copy.root, "subj01", "func1pt8mm", fx.GLM) if target == "ncsnr" else pp / target)
    _resave(p, affine=_shifted(nsd_copy))  # one voxel along x: same grid shape, other voxels
    monkeypatch.setattr(prep, "_read_session", lambda *a: pytest.fail("read before validation"))
    with pytest.raises(DataFormatError, match=r"affine differs from that of .*betas_session01\.nii\.gz: origin") as ei:
        prepare_subject(nsd_copy.root, cfg, cache_root=cache)
    msg = _one_line(ei, p, fx.betas_path(nsd_copy.root, "subj01", 1))
    assert "max difference 1.8 mm" in msg
    _no_cache_left(cache)


def test_flipped_axis_is_a_mismatch(nsd_copy, cache):
    p = layout.roi_path(nsd_copy.root, "subj01", "func1pt8mm", "nsdgeneral")
    aff = fx._affine(nsd_copy.grid)
    aff[1, 1] = -aff[1, 1]
    _resave(p, affine=aff)
    with pytest.raises(DataFormatError, match=r"voxel axes") as ei:
        prepare_subject(nsd_copy.root, PrepareConfig(), cache_root=cache)
    _one_line(ei, p)


def test_float32_rounding_of_the_affine_is_not_a_mismatch(nsd_copy, cache):
    """A qform-only copy (quaternion + float32 storage) places the same voxels: accepted."""
    p = layout.roi_path(nsd_copy.root, "subj01", "func1pt8mm", "prf-visualrois")
    img = nib.load(str(p))
    new = nib.Nifti1Image(np.asarray(img.dataobj), None)
    new.set_qform(fx._affine(nsd_copy.grid) + 1e-5, code=1)
    new.set_sform(None, code=0)
    nib.save(new, str(p))
    assert not np.array_equal(nib.load(str(p)).affine, fx._affine(nsd_copy.grid))
    ds = prepare_subject(nsd_copy.root, PrepareConfig(), cache_root=cache)
    assert "prf-visualrois" in ds.roi_labels


def test_betas_sessions_must_share_an_affine(nsd_copy, cache):
    p = fx.betas_path(nsd_copy.root, "subj01", 3)
    _resave(p, affine=_shifted(nsd_copy, dx=-0.9))
    with pytest.raises(DataFormatError, match=r"betas affine differs from that of .*betas_session01") as ei:
        prepare_subject(nsd_copy.root, PrepareConfig(), cache_root=cache)
    _one_line(ei, p)


def test_hdf5_betas_take_the_affine_of_the_first_nifti(nsd_copy, cache):
    """HDF5 betas carry no affine: every NIfTI read must agree with the first one."""
    p = layout.roi_path(nsd_copy.root, "subj01", "func1pt8mm", "streams")
    _resave(p, affine=_shifted(nsd_copy))
    with pytest.raises(DataFormatError, match=r"affine differs from that of .*nsdgeneral\.nii\.gz") as ei:
        prepare_subject(nsd_copy.root, PrepareConfig(fmt="hdf5", rois=["nsdgeneral", "streams"]), cache_root=cache)
    _one_line(ei, p)


def test_ncsnr_grid_shape_names_both_files(nsd_copy, cache):
    p = layout.ncsnr_path(nsd_copy.root, "subj01", "func1pt8mm", fx.GLM)
    nib.save(nib.Nifti1Image(np.ones((7, 6, 4), np.float32), fx._affine((7, 6, 4))), str(p))
    with pytest.raises(DataFormatError, match=r"ncsnr grid \(7, 6, 4\) does not match the betas grid \(7, 6, 5\)") as ei:
        prepare_subject(nsd_copy.root, PrepareConfig(), cache_root=cache)
    _one_line(ei, p, fx.betas_path(nsd_copy.root, "subj01", 1))


def test_geometry_records_the_betas_affine(nsd_subject, cache):
    ds = prepare_subject(nsd_subject.root, PrepareConfig(), cache_root=cache)
    np.testing.assert_allclose(ds.geometry["affine"], fx._affine(nsd_subject.grid), atol=1e-6)


# ------------------------------------------------------------------------------------------ 3. ncsnr
def _write_ncsnr(sub, values):
    p = layout.ncsnr_path(sub.root, "subj01", "func1pt8mm", fx.GLM)
    nib.save(nib.Nifti1Image(values.astype(np.float32), fx._affine(sub.grid)), str(p))
    return p


def test_all_nan_ncsnr_is_rejected(nsd_copy, cache):
    p = _write_ncsnr(nsd_copy, np.full(nsd_copy.grid, np.nan))
    with pytest.raises(DataFormatError, match=rf"ncsnr is NaN/inf in all {int(np.prod(nsd_copy.grid))} voxels") as ei:
        prepare_subject(nsd_copy.root, PrepareConfig(), cache_root=cache)
    assert "--set ncsnr=compute" in _one_line(ei, p)
    _no_cache_left(cache)


@pytest.mark.parametrize("bad, match", [(np.nan, "NaN/inf in 2 of the"), (np.inf, "NaN/inf in 2 of the"),
                                        (-0.5, "negative in 2 of the")])
def test_bad_ncsnr_in_selected_voxels(nsd_copy, cache, monkeypatch, bad, match):
    sel = np.argwhere(nsd_copy.labels["nsdgeneral"] > 0)
    vals = nsd_copy.ncsnr.copy()
    vals[tuple(sel[[0, -1]].T)] = bad
    p = _write_ncsnr(nsd_copy, vals)
    monkeypatch.setattr(prep, "_read_session", lambda *a: pytest.fail("read before validation"))
    with pytest.raises(DataFormatError, match=match + rf" {sel.shape[0]} voxels selected by mask 'nsdgeneral'") as ei:
        prepare_subject(nsd_copy.root, PrepareConfig(), cache_root=cache)
    assert "--set ncsnr=compute" in _one_line(ei, p)


def test_nan_ncsnr_outside_the_selection_is_allowed(nsd_copy, cache):
    """The release's ncsnr.nii.gz may hold NaN outside the brain (nsd_format §1.8 'NaN allowed')."""
    vals = nsd_copy.ncsnr.copy()
    vals[nsd_copy.labels["nsdgeneral"] <= 0] = np.nan
    _write_ncsnr(nsd_copy, vals)
    ds = prepare_subject(nsd_copy.root, PrepareConfig(), cache_root=cache)
    sel = np.argwhere(nsd_copy.labels["nsdgeneral"] > 0)
    np.testing.assert_allclose(ds.ncsnr, vals[tuple(sel.T)], rtol=1e-6)


def test_bad_ncsnr_file_and_the_suggested_override(nsd_copy, cache):
    _write_ncsnr(nsd_copy, np.full(nsd_copy.grid, np.nan))
    ds = prepare_subject(nsd_copy.root, PrepareConfig(ncsnr="compute"), cache_root=cache)
    assert ds.manifest["ncsnr_source"] == "computed" and np.isfinite(ds.ncsnr).all()


def test_all_nan_fsaverage_ncsnr_names_the_hemisphere(nsd_copy, cache):
    p = layout.ncsnr_path(nsd_copy.root, "subj01", "fsaverage", fx.GLM, hemi="rh")
    nib.save(nib.MGHImage(np.full((nsd_copy.n_vertices[1], 1, 1), np.nan, np.float32), np.eye(4)), str(p))
    with pytest.raises(DataFormatError, match=rf"ncsnr is NaN/inf in all {nsd_copy.n_vertices[1]} voxels") as ei:
        prepare_subject(nsd_copy.root, PrepareConfig(space="fsaverage"), cache_root=cache)
    _one_line(ei, p)


# ------------------------------------------------------------------------------------- 4. sharedix
def test_sharedix_disagreeing_with_subjectim_is_rejected(nsd_copy, cache):
    d = {k: np.array(v) for k, v in nsd_copy.design.items()}
    shared = set(d["sharedix"][0].astype(int))
    other = next(i for i in range(int(d["sharedix"][0, 499]) + 1, 73001) if i not in shared)
    assert other < d["sharedix"][0, 500]  # still strictly ascending: only the subjectim agreement catches it
    d["sharedix"][0, 499] = other
    p = layout.expdesign_path(nsd_copy.root)
    fx.write_expdesign(nsd_copy.root, d)
    with pytest.raises(DataFormatError, match=r"'sharedix' disagrees with subjectim\[:, :1000\] .* in 8 of 8000 "
                                              r"entries, first subj01 slot 500: sharedix \d+ vs subjectim \d+") as ei:
        prepare_subject(nsd_copy.root, PrepareConfig(), cache_root=cache)
    _one_line(ei, p)
    _no_cache_left(cache)


def test_one_subject_with_other_shared_images_is_rejected(nsd_copy):
    d = {k: np.array(v) for k, v in nsd_copy.design.items()}
    d["subjectim"][4, 10], d["subjectim"][4, 1500] = d["subjectim"][4, 1500], d["subjectim"][4, 10]
    fx.write_expdesign(nsd_copy.root, d)
    with pytest.raises(DataFormatError, match=r"in 1 of 8000 entries, first subj05 slot 11"):
        nsdio.load_expdesign(nsd_copy.root)


def test_sharedix_must_ascend(nsd_copy):
    d = {k: np.array(v) for k, v in nsd_copy.design.items()}
    d["sharedix"][0, [3, 4]] = d["sharedix"][0, [4, 3]]
    d["subjectim"][:, [3, 4]] = d["subjectim"][:, [4, 3]]  # keep the subjectim agreement
    fx.write_expdesign(nsd_copy.root, d)
    with pytest.raises(DataFormatError, match=r"'sharedix' must be strictly ascending.*entries 4 and 5"):
        nsdio.load_expdesign(nsd_copy.root)


def test_masterordering_must_show_each_slot_three_times(nsd_copy):
    d = {k: np.array(v) for k, v in nsd_copy.design.items()}
    mo = d["masterordering"]
    j = int(np.nonzero(mo[0] != mo[0, 0])[0][0])
    mo[0, j] = mo[0, 0]  # slot mo[0,0] now 4 times, slot of trial j 2 times
    fx.write_expdesign(nsd_copy.root, d)
    with pytest.raises(DataFormatError, match=r"exactly 3 times.*\(2 slots differ"):
        nsdio.load_expdesign(nsd_copy.root)


# ----------------------------------------------------------------------------- 5. partial downloads
def _drop_sessions(sub, sessions, fmts=("nifti", "hdf5"), fsaverage=True):
    for s in sessions:
        for f in fmts:
            fx.betas_path(sub.root, "subj01", s, f).unlink()
        if fsaverage:
            for h in ("lh", "rh"):
                fx.betas_path(sub.root, "subj01", s, space="fsaverage", hemi=h).unlink()


def test_partial_download_message_says_how_many_and_how(nsd_copy, cache, monkeypatch):
    _drop_sessions(nsd_copy, [3, 4])
    monkeypatch.setattr(prep, "_read_session", lambda *a: pytest.fail("read before validation"))
    with pytest.raises(DataFormatError) as ei:
        prepare_subject(nsd_copy.root, PrepareConfig(), cache_root=cache)
    msg = _one_line(ei, fx.betas_path(nsd_copy.root, "subj01", 3))
    assert "betas_session03.nii.gz: betas file not found; only 2 sessions (01-02) of the 4 needed for subj01 " \
           "are on disk" in msg
    assert "--set n_sessions=2" in msg and "--set prepare.n_sessions=2" in msg and "allow_partial=true" in msg
    _no_cache_left(cache)


def test_the_suggested_cli_overrides_work(nsd_copy, tmp_path, capsys):
    """The message's advice, taken literally on the command line."""
    _drop_sessions(nsd_copy, [4])
    args = ["--data-dir", str(tmp_path / "data"), "--nsd-root", str(nsd_copy.root), "prepare"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "--set n_sessions=3" in err
    assert cli_main(args + ["--set", "n_sessions=3"]) == 0
    assert cli_main(args + ["--set", "allow_partial=true"]) == 0
    out = capsys.readouterr().out
    assert out.count("prepared in") == 2  # both ran (the keys differ: n_sessions=3 vs None)


def test_allow_partial_uses_the_sessions_on_disk(nsd_copy, cache, caplog):
    explicit = prepare_subject(nsd_copy.root, PrepareConfig(n_sessions=2), cache_root=cache)
    _drop_sessions(nsd_copy, [3, 4])
    with caplog.at_level(logging.WARNING, logger="brainenc"):
        ds = prepare_subject(nsd_copy.root, PrepareConfig(allow_partial=True), cache_root=cache)
    assert any("using the 2 sessions on disk (01-02) of the 4 needed" in r.getMessage() for r in caplog.records)
    assert ds.manifest["n_sessions"] == 2 and ds.manifest["sessions_read"] == [1, 2]
    assert ds.manifest["partial"]["sessions_on_disk"] == 2 and ds.manifest["allow_partial"] is True
    ids = np.array([fx.lookup(nsd_copy.design, 1, t) for t in range(2 * TPS)])
    assert set(ds.image_ids) == set(ids)
    np.testing.assert_array_equal(np.asarray(ds.responses), np.asarray(explicit.responses))
    assert "partial" in ds.describe()


def test_allow_partial_with_everything_on_disk_is_the_same_dataset(nsd_subject, cache):
    a = prepare_subject(nsd_subject.root, PrepareConfig(), cache_root=cache)
    b = prepare_subject(nsd_subject.root, PrepareConfig(allow_partial=True), cache_root=cache)
    assert b.cache_hit and b.path == a.path


@pytest.mark.parametrize("allow", [False, True])
def test_a_gap_is_an_error_naming_the_missing_file(nsd_copy, cache, allow):
    _drop_sessions(nsd_copy, [2])
    with pytest.raises(DataFormatError, match=r"betas_session02\.nii\.gz: betas file not found, but later sessions "
                                              r"are on disk \(session 03 and more\)") as ei:
        prepare_subject(nsd_copy.root, PrepareConfig(allow_partial=allow), cache_root=cache)
    assert "--set n_sessions=1" in _one_line(ei)
    _no_cache_left(cache)


def test_partial_fsaverage_names_the_hemisphere_file(nsd_copy, cache):
    fx.betas_path(nsd_copy.root, "subj01", 4, space="fsaverage", hemi="rh").unlink()
    with pytest.raises(DataFormatError, match=r"rh\.betas_session04\.mgh: betas file not found; only 3 sessions \(01-03\) of the 4"):
        prepare_subject(nsd_copy.root, PrepareConfig(space="fsaverage"), cache_root=cache)


def test_no_session_at_all(nsd_copy, cache):
    _drop_sessions(nsd_copy, [1, 2, 3, 4])
    with pytest.raises(DataFormatError, match=r"betas_session01\.nii\.gz: betas file not found; no session of subj01"):
        prepare_subject(nsd_copy.root, PrepareConfig(allow_partial=True), cache_root=cache)


def test_allow_partial_must_be_a_bool(nsd_subject, cache):
    from brainenc.exceptions import ConfigError

    with pytest.raises(ConfigError, match="'allow_partial' must be true or false"):
        prepare_subject(nsd_subject.root, PrepareConfig(allow_partial="yes"), cache_root=cache)


# ----------------------------------------------------------------------------- cache temporaries
def test_live_writers_temp_folder_is_kept_dead_ones_removed(nsd_subject, cache):
    from brainenc._utils.io import temp_dir_name

    cache.mkdir(parents=True)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        name = "subj01-func1pt8mm-shared1000-average-0123456789abcdef"
        live = cache / temp_dir_name(name).replace(f"-{os.getpid()}-", f"-{child.pid}-")
        dead = cache / temp_dir_name(name).replace(f"-{os.getpid()}-", "-999999999-")
        for d in (live, dead):
            d.mkdir()
            (d / "_trials.npy").write_bytes(b"partial")
        prepare_subject(nsd_subject.root, PrepareConfig(), cache_root=cache)
        assert live.is_dir() and not dead.exists()
    finally:
        child.kill()
        child.wait()
    prepare_subject(nsd_subject.root, PrepareConfig(repeats="single"), cache_root=cache)
    assert not live.exists()  # its writer is gone now
