"""Property-based fuzz of the NSD readers: corrupted headers, truncated files, wrong dtypes, wrong shapes.

The property, for every reader and every input: it either returns a valid result (checked) or raises a
:class:`~brainenc.exceptions.BrainencError` whose one-line message names the file; never another
exception, never a crash. At the ``prepare_subject`` level additionally: a failure leaves no completed
cache entry and no temporary folder, and a later call with the repaired file succeeds.

Valid files come from the independent spec-following writer (``nsd_fixtures``); the damage is applied to
their bytes (for gzip files either to the compressed bytes or to the uncompressed stream, recompressed, so
header fields are hit) or they are rewritten with the wrong dtype/shape. Settings: the
``brainenc-datasets-fuzz`` profile (``conftest.py``; derandomized unless ``BRAINENC_FUZZ=explore``).
"""
from __future__ import annotations

import dataclasses
import gzip
import os
import shutil
import tempfile
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import scipy.io
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

import nsd_fixtures as fx
from brainenc.datasets import layout
from brainenc.datasets import nsd as nsdio
from brainenc.datasets.prepare import PrepareConfig, list_prepared, prepare_subject
from brainenc.exceptions import BrainencError

_SCALE = max(1, int(os.environ.get("BRAINENC_FUZZ_SCALE", "1") or 1))
TPS = 750


def fuzz(n: int):
    return settings(settings.get_profile("brainenc-datasets-fuzz"), max_examples=n * _SCALE)


# ----------------------------------------------------------------------------------------------- harness
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 1-session subject (NIfTI + HDF5 + fsaverage), written once for this module; never modified."""
    return fx.write_subject(tmp_path_factory.mktemp("fuzz") / "nsd", n_sessions=1)


def _expect_ok_or_named(fn, path: Path):
    """Run ``fn()``; a failure must be a BrainencError with a one-line message naming ``path``."""
    try:
        return True, fn()
    except BrainencError as exc:
        msg = str(exc)
        assert str(path) in msg, f"error does not name {path}: {msg}"
        assert "\n" not in msg, f"error is not one line: {msg!r}"
        return False, exc


MUTATION_KINDS = ("truncate", "overwrite", "zero", "ones", "flip", "append", "insert", "delete")


@st.composite
def mutations(draw, hot: int = 512):
    """1-3 byte-level edits as (kind, relative position, length/byte); positions favour the first ``hot`` bytes."""
    out = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(MUTATION_KINDS))
        where = draw(st.one_of(st.integers(0, hot - 1).map(lambda i: ("abs", i)),
                               st.floats(0, 1, exclude_max=True).map(lambda f: ("rel", f))))
        n = draw(st.integers(1, 64))
        byte = draw(st.integers(0, 255))
        out.append((kind, where, n, byte))
    return out


def apply(blob: bytes, muts) -> bytes:
    b = bytearray(blob)
    for kind, (mode, w), n, byte in muts:
        if not b:
            break
        pos = min(len(b) - 1, w if mode == "abs" else int(w * len(b)))
        if kind == "truncate":
            del b[pos:]
        elif kind == "overwrite":
            b[pos:pos + n] = bytes([byte]) * len(b[pos:pos + n])
        elif kind == "zero":
            b[pos:pos + n] = bytes(len(b[pos:pos + n]))
        elif kind == "ones":
            b[pos:pos + n] = b"\xff" * len(b[pos:pos + n])
        elif kind == "flip":
            b[pos] ^= 1 << (byte % 8)
        elif kind == "append":
            b.extend(bytes([byte]) * n)
        elif kind == "insert":
            b[pos:pos] = bytes([byte]) * n
        elif kind == "delete":
            del b[pos:pos + n]
    return bytes(b)


def damage(blob: bytes, muts, inner: bool) -> bytes:
    """Apply ``muts`` to ``blob``; with ``inner`` and a gzip blob, to its uncompressed stream (recompressed)."""
    if inner and blob[:2] == b"\x1f\x8b":
        return gzip.compress(apply(gzip.decompress(blob), muts), mtime=0)
    return apply(blob, muts)


def _write(dst: Path, data: bytes) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data)
    return dst


# ----------------------------------------------------------------------------------------------- readers
def _betas_reader(kind, grid_or_v, select):
    def read(p):
        out = nsdio.read_betas_session(p, kind=kind, select=select, shape=grid_or_v)
        assert out.dtype == np.float32 and out.shape == (TPS, len(select)) and np.isfinite(out).all()
        return out
    return read


def _readers(sub):
    """name -> (valid file, reader(path)) for every file kind prepare reads."""
    grid = sub.grid
    idx = np.argwhere(sub.labels["nsdgeneral"] > 0)
    ref = fx.betas_path(sub.root, "subj01", 1, "nifti")
    vgrid = nsdio.VolumeGrid(grid, nib.load(str(ref)).affine, ref)
    pp = sub.root / "nsddata" / "ppdata" / "subj01" / "func1pt8mm"
    bdir = ref.parent
    fsd = fx.betas_path(sub.root, "subj01", 1, space="fsaverage").parent
    lab = sub.root / "nsddata" / "freesurfer" / "fsaverage" / "label"
    V = sub.n_vertices[0]

    def roi(p):
        out = nsdio.load_roi_volume(p, grid=vgrid)
        assert out.shape == grid and out.dtype == np.int64 and out.min() >= -1
        return out

    def ncsnr(p):
        data, _ = nsdio.load_volume(p, what="ncsnr", grid=vgrid)
        return nsdio.check_ncsnr_values(data, p)

    def expdesign(p):
        e = nsdio.load_expdesign(p)
        assert e.masterordering.shape == (30000,) and e.subjectim.shape == (8, 10000) and e.sharedix.shape == (1000,)
        assert 0 <= e.masterordering.min() and e.masterordering.max() < 10000
        assert 0 <= e.subjectim.min() and e.subjectim.max() < 73000
        assert (e.subjectim[:, :1000] == e.sharedix).all() and (np.diff(e.sharedix) > 0).all()
        return e

    def stimuli(p):
        s = nsdio.NSDStimuli(p)
        imgs = s.read([0, len(s) - 1, 0])
        assert imgs.dtype == np.uint8 and imgs.shape == (3,) + tuple(s.shape[1:])
        return imgs

    def surf_roi(p):
        out = nsdio.load_roi_surface(p, V)
        assert out.shape == (V,) and out.min() >= -1
        return out

    def surf_ncsnr(p):
        return nsdio.check_ncsnr_values(nsdio.load_surface_values(p, V, "ncsnr"), p)

    def ctab(p):
        t = nsdio.read_ctab(p)
        assert all(isinstance(k, int) and isinstance(v, str) for k, v in t.items())
        return t

    return {
        "betas.nii.gz": (ref, _betas_reader("nifti", grid, idx)),
        "betas.hdf5": (fx.betas_path(sub.root, "subj01", 1, "hdf5"), _betas_reader("hdf5", grid, idx)),
        "betas.mgh": (fsd / "lh.betas_session01.mgh", _betas_reader("mgh", (V,), np.arange(0, V, 3))),
        "roi.nii.gz": (pp / "roi" / "prf-visualrois.nii.gz", roi),
        "brainmask.nii.gz": (pp / "brainmask.nii.gz", roi),
        "ncsnr.nii.gz": (bdir / "ncsnr.nii.gz", ncsnr),
        "expdesign.mat": (layout.expdesign_path(sub.root), expdesign),
        "stimuli.hdf5": (layout.stimuli_path(sub.root), stimuli),
        "label.mgz": (lab / "lh.streams.mgz", surf_roi),
        "ncsnr.mgh": (fsd / "lh.ncsnr.mgh", surf_ncsnr),
        "ctab": (lab / "streams.mgz.ctab", ctab),
    }


READER_NAMES = ("betas.nii.gz", "betas.hdf5", "betas.mgh", "roi.nii.gz", "brainmask.nii.gz", "ncsnr.nii.gz",
                "expdesign.mat", "stimuli.hdf5", "label.mgz", "ncsnr.mgh", "ctab")


@pytest.fixture(scope="module")
def readers(small):
    table = _readers(small)
    return {k: (v[0], v[0].read_bytes(), v[1]) for k, v in table.items()}


@pytest.mark.parametrize("name", READER_NAMES)
@fuzz(12)
@given(muts=mutations(), inner=st.booleans())
@example(muts=[("truncate", ("rel", 0.5), 1, 0)], inner=False)
@example(muts=[("zero", ("abs", 128), 64, 0), ("truncate", ("abs", 400), 1, 0)], inner=False)
def test_corrupted_bytes_fail_cleanly(readers, name, muts, inner):
    src, blob, read = readers[name]
    with tempfile.TemporaryDirectory() as d:
        p = _write(Path(d) / src.name, damage(blob, muts, inner))
        _expect_ok_or_named(lambda: read(p), p)


def test_valid_files_pass_the_readers(readers):
    """The harness itself: every undamaged file reads (so the fuzz exercises readers, not a broken setup)."""
    for name, (src, _blob, read) in readers.items():
        read(src)


# the exact failure reported for #issue: a valid MATLAB header followed by zeros, and the truncation that
# used to crash scipy's compiled reader (a data element of type 0 inside an array: segmentation fault)
@pytest.mark.parametrize("cut", [0, 41, 47, 60, 200])
def test_expdesign_header_then_zeros(readers, tmp_path, cut):
    _src, blob, read = readers["expdesign.mat"]
    p = _write(tmp_path / "nsd_expdesign.mat", blob[:128 + cut] + b"\x00" * 4096)
    ok, exc = _expect_ok_or_named(lambda: read(p), p)
    assert not ok and "not a readable MATLAB v5 .mat file" in str(exc)


# ----------------------------------------------------------------------------------- wrong dtypes/shapes
def _save_mgh_or_reject(p: Path, data: np.ndarray) -> None:
    try:  # nibabel's MGH writer refuses some shapes: those are not inputs a reader can meet
        nib.save(nib.MGHImage(data, np.eye(4)), str(p))
    except nib.spatialimages.HeaderDataError:
        assume(False)


NIFTI_DTYPES = (np.int16, np.uint16, np.int8, np.uint8, np.int32, np.float32, np.float64)


@st.composite
def shapes_near(draw, base: tuple):
    """``base`` itself, or one axis changed, one dropped, or one added."""
    shape = list(base)
    kind = draw(st.sampled_from(["same", "change", "drop", "add"]))
    if kind == "change":
        i = draw(st.integers(0, len(shape) - 1))
        shape[i] = draw(st.integers(1, shape[i] + 2).filter(lambda v: v != base[i]))
    elif kind == "drop" and len(shape) > 1:
        shape.pop(draw(st.integers(0, len(shape) - 1)))
    elif kind == "add":
        shape.insert(draw(st.integers(0, len(shape))), draw(st.integers(1, 3)))
    return tuple(shape)


@fuzz(15)
@given(dtype=st.sampled_from(NIFTI_DTYPES), shape=shapes_near((7, 6, 5, TPS)))
def test_nifti_betas_wrong_dtype_or_shape(small, dtype, shape):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "betas_session01.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros(shape, dtype), fx._affine(small.grid)), str(p))
        ok, _ = _expect_ok_or_named(lambda: nsdio.read_betas_session(p, kind="nifti", shape=small.grid,
                                                                     select=np.array([[0, 0, 0]])), p)
        assert ok == (dtype == np.int16 and shape == small.grid + (TPS,))


@fuzz(15)
@given(dtype=st.sampled_from(NIFTI_DTYPES + (np.bool_,)), shape=shapes_near((TPS, 5, 6, 7)),
       name=st.sampled_from(["betas", "Betas", "imgBrick"]), group=st.booleans())
def test_hdf5_betas_wrong_dtype_shape_or_key(small, dtype, shape, name, group):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "betas_session01.hdf5"
        with h5py.File(p, "w") as f:
            if group:
                f.create_group(name).create_dataset("x", data=np.zeros(3))
            else:
                f.create_dataset(name, data=np.zeros(shape, dtype))
        ok, _ = _expect_ok_or_named(lambda: nsdio.read_betas_session(p, kind="hdf5", shape=small.grid,
                                                                     select=np.array([[1, 2, 3]])), p)
        assert ok == (not group and name == "betas" and dtype == np.int16 and shape == (TPS, 5, 6, 7))


@fuzz(15)
@given(dtype=st.sampled_from((np.uint8, np.int16, np.int32, np.float32)),
       shape=shapes_near((9, 1, 1, TPS)).filter(lambda s: len(s) <= 4))
def test_mgh_betas_wrong_dtype_or_shape(dtype, shape):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "lh.betas_session01.mgh"
        _save_mgh_or_reject(p, np.zeros(shape, dtype))
        ok, _ = _expect_ok_or_named(lambda: nsdio.read_betas_session(p, kind="mgh", select=np.array([0])), p)
        assert ok == (dtype == np.float32 and len(shape) == 4 and shape[1:] == (1, 1, TPS))


@fuzz(20)
@given(dtype=st.sampled_from(NIFTI_DTYPES), shape=shapes_near((7, 6, 5)),
       fill=st.sampled_from(["labels", "nan", "inf", "below -1", "huge"]))
def test_roi_volume_wrong_dtype_shape_or_values(small, dtype, shape, fill):
    data = np.zeros(shape, np.float64)
    data.flat[::3] = 2
    bad = {"nan": np.nan, "inf": np.inf, "below -1": -3, "huge": 1e12}.get(fill)
    storable = np.issubdtype(dtype, np.floating) or (bad is not None and np.isfinite(bad)
                                                     and np.iinfo(dtype).min <= bad <= np.iinfo(dtype).max)
    if bad is not None and storable:
        data.flat[0] = bad
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "prf-visualrois.nii.gz"
        nib.save(nib.Nifti1Image(data.astype(dtype), fx._affine(small.grid)), str(p))
        ok, _ = _expect_ok_or_named(lambda: nsdio.load_roi_volume(p, small.grid), p)
        good_shape = shape in (small.grid, small.grid + (1,))
        assert ok == (good_shape and (bad is None or not storable))


@fuzz(15)
@given(shape=shapes_near((30, 1, 1)), dtype=st.sampled_from((np.uint8, np.int16, np.int32, np.float32)))
def test_surface_label_wrong_dtype_or_shape(shape, dtype):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "lh.streams.mgz"
        _save_mgh_or_reject(p, np.ones(shape, dtype))
        ok, _ = _expect_ok_or_named(lambda: nsdio.load_roi_surface(p, 30), p)
        assert ok == (shape[0] == 30 and all(s == 1 for s in shape[1:]))


@fuzz(15)
@given(dtype=st.sampled_from((np.uint8, np.int16, np.float32)), shape=shapes_near((4, 425, 425, 3)),
       key=st.sampled_from(["imgBrick", "images"]))
def test_stimuli_wrong_dtype_shape_or_key(dtype, shape, key):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "nsd_stimuli.hdf5"
        with h5py.File(p, "w") as f:
            f.create_dataset(key, shape=shape, dtype=dtype)
        ok, _ = _expect_ok_or_named(lambda: nsdio.NSDStimuli(p).read([0]), p)
        assert ok == (key == "imgBrick" and dtype == np.uint8 and len(shape) == 4 and shape[3] == 3 and shape[0] >= 1)


FIELD_DAMAGE = ("ok", "missing", "transposed", "flattened", "complex", "string", "cell", "bool", "too high",
                "zero", "fractional", "nan")


@fuzz(25)
@given(field=st.sampled_from(["masterordering", "subjectim", "sharedix"]), how=st.sampled_from(FIELD_DAMAGE),
       compress=st.booleans())
def test_expdesign_wrong_fields(small, field, how, compress):
    design = {k: np.array(v) for k, v in small.design.items()}
    a = design[field]
    if how == "missing":
        del design[field]
    elif how == "transposed":
        design[field] = a.T
    elif how == "flattened":
        design[field] = a.reshape(1, 1, -1)
    elif how == "complex":
        design[field] = a + 1j
    elif how == "string":
        design[field] = "not an array"
    elif how == "cell":
        cell = np.empty((1, 2), dtype=object)
        cell[0, 0], cell[0, 1] = a, a[:, :2]
        design[field] = cell
    elif how == "bool":
        design[field] = a > 0
    elif how == "too high":
        design[field] = a + 100000
    elif how == "zero":
        design[field] = a * 0
    elif how == "fractional":
        design[field] = a + 0.5
    elif how == "nan":
        design[field] = np.where(np.arange(a.size).reshape(a.shape) == 3, np.nan, a)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "nsd_expdesign.mat"
        scipy.io.savemat(p, design, do_compression=compress)
        ok, _ = _expect_ok_or_named(lambda: nsdio.load_expdesign(p), p)
        assert ok == (how == "ok")


@fuzz(25)
@given(blob=st.one_of(st.binary(max_size=300),
                      st.text(max_size=200).map(lambda t: t.encode("utf-8")),
                      st.lists(st.tuples(st.integers(-5, 300), st.text(min_size=1, max_size=12)), max_size=10)
                      .map(lambda rows: "".join(f"{k} {n}\n" for k, n in rows).encode("utf-8", "replace"))))
@example(blob=b"\x00\x01\x02\xff\xfe")
@example(blob=b"0 Unknown\n1 V1v\n1 V1d\n")
def test_ctab_any_bytes(blob):
    with tempfile.TemporaryDirectory() as d:
        p = _write(Path(d) / "prf-visualrois.mgz.ctab", blob)
        ok, table = _expect_ok_or_named(lambda: nsdio.read_ctab(p), p)
        if ok:  # what parsed is what the file says: every non-blank line is '<int> <name>'
            lines = [ln for ln in blob.decode("utf-8").splitlines() if ln.strip()]
            assert len(table) == len(lines)


# ----------------------------------------------------------------------------- prepare: nothing cached
@pytest.fixture(scope="module")
def prep_root(small, tmp_path_factory):
    """A private copy of the 1-session subject for the prepare-level fuzz (damaged and restored per example)."""
    dst = tmp_path_factory.mktemp("fuzzprep") / "nsd"
    shutil.copytree(small.root, dst)
    return dataclasses.replace(small, root=dst)


PREP_TARGETS = {  # target -> (relative path from the fixture, PrepareConfig)
    "expdesign": (lambda s: layout.expdesign_path(s.root), PrepareConfig()),
    "betas.nii.gz": (lambda s: fx.betas_path(s.root, "subj01", 1, "nifti"), PrepareConfig()),
    "betas.hdf5": (lambda s: fx.betas_path(s.root, "subj01", 1, "hdf5"), PrepareConfig(fmt="hdf5")),
    "nsdgeneral": (lambda s: layout.roi_path(s.root, "subj01", "func1pt8mm", "nsdgeneral"), PrepareConfig()),
    "brainmask": (lambda s: layout.brainmask_path(s.root, "subj01", "func1pt8mm"),
                  PrepareConfig(mask="brainmask", rois=[])),
    "ncsnr": (lambda s: layout.ncsnr_path(s.root, "subj01", "func1pt8mm", fx.GLM), PrepareConfig()),
    "ctab": (lambda s: layout.ctab_path(s.root, "subj01", "prf-visualrois", space="func1pt8mm"), PrepareConfig()),
    "stimuli": (lambda s: layout.stimuli_path(s.root), PrepareConfig()),
    "fsaverage betas": (lambda s: fx.betas_path(s.root, "subj01", 1, space="fsaverage", hemi="rh"),
                        PrepareConfig(space="fsaverage")),
    "fsaverage ncsnr": (lambda s: layout.ncsnr_path(s.root, "subj01", "fsaverage", fx.GLM, hemi="lh"),
                        PrepareConfig(space="fsaverage")),
}


def _cache_state(cache: Path) -> tuple[list, list]:
    if not cache.exists():
        return [], []
    return list_prepared(cache), [p.name for p in cache.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("target", list(PREP_TARGETS))
@fuzz(3)
@given(muts=mutations(hot=400), inner=st.booleans())
@example(muts=[("truncate", ("rel", 0.6), 1, 0)], inner=False)
def test_failed_prepare_caches_nothing_and_recovers(prep_root, target, muts, inner):
    locate, cfg = PREP_TARGETS[target]
    path = locate(prep_root)
    original = path.read_bytes()
    with tempfile.TemporaryDirectory() as d:
        cache = Path(d) / "prepared"
        try:
            path.write_bytes(damage(original, muts, inner))
            ok, _ = _expect_ok_or_named(lambda: prepare_subject(prep_root.root, cfg, cache_root=cache), path)
            if not ok:
                complete, hidden = _cache_state(cache)
                assert complete == [] and hidden == [], (complete, hidden)
        finally:
            path.write_bytes(original)
        again = prepare_subject(prep_root.root, cfg, cache_root=cache)
        assert (again.path / "COMPLETE").is_file() and again.n_samples > 0
        if not ok:
            assert not again.cache_hit  # nothing was cached by the failed call
        assert _cache_state(cache)[1] == []
