"""Cohort folders: write_roi_table / write_cohort_json / phenotypic.csv -> load_cohort, and its validation."""
import logging

import numpy as np
import pytest

from brainenc.datasets.cohort import (Cohort, cohort_from_arrays, load_cohort, write_cohort_json,
                                      write_roi_table)
from brainenc.datasets.timeseries import read_roi_table
from brainenc.exceptions import ConfigError, DataFormatError

R = 5
NAMES = [str(2000 + k) for k in range(1, R + 1)]
IDS = ["0050002", "0050003", "0050004", "0050005"]
SITES = ["NYU", "NYU", "UCLA", "UCLA"]


def _write(root, rng, lengths=(40, 42, 40, 45), confounds=True, extra_rows=()):
    series = [rng.normal(size=(n, R)).astype(np.float32) * 3 + 1 for n in lengths]
    for sid, site, x in zip(IDS, SITES, series):
        write_roi_table(root / "rois_cc5" / f"{site}_{sid}_rois_cc5.1D", x, NAMES)
        if confounds:
            c = rng.normal(size=(len(x), 2))
            (root / "confounds").mkdir(exist_ok=True)
            (root / "confounds" / f"{sid}_confounds.tsv").write_text(
                "fd\trx\n" + "\n".join(f"{a:.6f}\t{b:.6f}" for a, b in c) + "\n")
    rows = ["subject_id,site,dx,age,split"]
    rows += [f"{sid},{site},{dx},{age},{sp}" for sid, site, dx, age, sp in
             zip(IDS, SITES, [2, 1, 1, 2], [10.5, 11.0, 12.25, 9.0], ["train", "train", "test", "train"])]
    rows += list(extra_rows)
    (root / "phenotypic.csv").write_text("\n".join(rows) + "\n")
    write_cohort_json(root, name="toy", tr=2.0, atlas="cc5", id_column="subject_id", label_column="dx",
                      label_names=["ASD", "TD"], site_column="site", split_column="split",
                      tables="rois_cc5/*.1D", confounds="confounds/*_confounds.tsv" if confounds else None)
    return series


def test_write_roi_table_round_trip(tmp_path):
    x = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    p = write_roi_table(tmp_path / "a" / "s_01_rois.1D", x, ["V1", "V2", "V3"])
    assert p.read_text().splitlines()[0] == "#V1\tV2\tV3"
    y, names = read_roi_table(p)
    assert names == ["V1", "V2", "V3"]
    np.testing.assert_array_equal(y, x)
    with pytest.raises(ConfigError, match="roi_names"):
        write_roi_table(tmp_path / "b.1D", x, ["a", "b"])
    with pytest.raises(ConfigError, match="roi_names"):
        write_roi_table(tmp_path / "b.1D", x, ["a", "b\tc", "d"])


def test_load_cohort_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    series = _write(tmp_path, rng)
    c = load_cohort(tmp_path)
    assert isinstance(c, Cohort) and c.name == "toy" and c.tr == 2.0 and c.root == tmp_path
    assert list(c.subject_ids) == IDS  # compared as strings: leading zeros kept
    assert c.roi_names == NAMES and c.n_rois == R
    for a, b in zip(c.series, series):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(b).max())
    assert list(c.labels) == [1, 0, 0, 1] and c.label_names == ["ASD", "TD"]
    assert list(c.sites) == SITES and list(c.split) == ["train", "train", "test", "train"]
    np.testing.assert_allclose(c.phenotype["age"], [10.5, 11.0, 12.25, 9.0])
    assert list(c.phenotype["subject_id"]) == IDS
    assert [f.name for f in c.files] == [f"{s}_{i}_rois_cc5.1D" for s, i in zip(SITES, IDS)]
    assert c.confound_names == ["fd", "rx"] and [len(x) for x in c.confounds] == [40, 42, 40, 45]
    assert "4 subjects x 5 ROIs" in c.describe()
    # explicit arguments override cohort.json; numeric labels default to their values as names
    c2 = load_cohort(tmp_path, label_names=None, tr=2.0, name="other", confounds=None)
    assert c2.label_names == ["ASD", "TD"]  # None = not given: the json's value stays
    c3 = load_cohort(tmp_path, label_column="site", label_names=["UCLA", "NYU"], name="other")
    assert c3.name == "other" and list(c3.labels) == [1, 1, 0, 0]
    c4 = load_cohort(tables=sorted((tmp_path / "rois_cc5").glob("*.1D")), phenotype=tmp_path / "phenotypic.csv",
                     tr=2.0, label_column="dx", id_pattern=r"_(?P<id>\d+)_rois")
    assert c4.label_names == ["1", "2"] and list(c4.labels) == [1, 0, 0, 1] and c4.name == "cohort"


def test_phenotype_row_without_table_is_dropped(tmp_path, caplog):
    _write(tmp_path, np.random.default_rng(2), extra_rows=["0050099,NYU,1,13.0,train"])
    with caplog.at_level(logging.WARNING, logger="brainenc.datasets"):
        c = load_cohort(tmp_path)
    assert c.n_subjects == 4 and "0050099" not in c.subject_ids
    assert any("0050099" in r.getMessage() and "dropped" in r.getMessage() for r in caplog.records)


def test_table_without_phenotype_row(tmp_path):
    _write(tmp_path, np.random.default_rng(3))
    x = np.random.default_rng(4).normal(size=(40, R))
    write_roi_table(tmp_path / "rois_cc5" / "NYU_0050777_rois_cc5.1D", x, NAMES)
    with pytest.raises(DataFormatError, match=r"NYU_0050777_rois_cc5\.1D: no subject of the phenotype table"):
        load_cohort(tmp_path)
    with pytest.raises(DataFormatError,
                       match=r"NYU_0050777_rois_cc5\.1D: subject '0050777' is not in the phenotype table .*phenotypic"):
        load_cohort(tmp_path, id_pattern=r"_(?P<id>\d+)_rois")
    (tmp_path / "rois_cc5" / "NYU_0050777_rois_cc5.1D").rename(tmp_path / "rois_cc5" / "XYZ_0050002_rois_cc5.1D")
    with pytest.raises(DataFormatError, match=r"_0050002_rois_cc5\.1D: a second ROI table for subject '0050002'"):
        load_cohort(tmp_path)
    with pytest.raises(DataFormatError, match=r"phenotypic\.csv: no subject of the phenotype table has an ROI table"):
        load_cohort(tmp_path, tables=[])


def _damage(tmp_path, sid_index, fn):
    site, sid = SITES[sid_index], IDS[sid_index]
    p = tmp_path / "rois_cc5" / f"{site}_{sid}_rois_cc5.1D"
    x, names = read_roi_table(p)
    x, names = fn(x, names)
    p.write_text("#" + "\t".join(names) + "\n" + "\n".join("\t".join(f"{v:.7g}" for v in r) for r in x) + "\n")
    return p.name


def test_nan_constant_short_and_roi_count_errors(tmp_path):
    rng = np.random.default_rng(5)
    _write(tmp_path, rng)

    def nan(x, n):
        x = x.copy()
        x[[3, 7, 9], 2] = np.nan
        return x, n

    name = _damage(tmp_path, 1, nan)
    with pytest.raises(DataFormatError, match=rf"{name}: ROI column 3 \('2003'\) is NaN/inf at 3 time points"):
        load_cohort(tmp_path)
    _write(tmp_path, rng)
    name = _damage(tmp_path, 2, lambda x, n: (np.c_[x[:, :4], np.zeros(len(x))], n))
    with pytest.raises(DataFormatError, match=rf"{name}: ROI column 5 \('2005'\) is constant"):
        load_cohort(tmp_path)
    assert load_cohort(tmp_path, allow_constant=True).n_subjects == 4
    _write(tmp_path, rng, lengths=(40, 8, 40, 40))
    with pytest.raises(DataFormatError, match=r"NYU_0050003_rois_cc5\.1D: 8 time points is shorter than min_time"):
        load_cohort(tmp_path)
    assert load_cohort(tmp_path, min_timepoints=5).lengths().tolist() == [40, 8, 40, 40]
    _write(tmp_path, rng)
    name = _damage(tmp_path, 3, lambda x, n: (x[:, :4], n[:4]))
    with pytest.raises(DataFormatError, match=rf"{name}: 4 ROI columns; .*NYU_0050002_rois_cc5\.1D has 5"):
        load_cohort(tmp_path)


def test_tr_mismatch_and_missing_label(tmp_path):
    rng = np.random.default_rng(6)
    _write(tmp_path, rng)
    text = (tmp_path / "phenotypic.csv").read_text().splitlines()
    text[0] += ",tr"
    text[1:] = [line + tr for line, tr in zip(text[1:], [",2.0", ",2.0", ",3.0", ",2.0"])]
    (tmp_path / "phenotypic.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(DataFormatError, match=r"UCLA_0050004_rois_cc5\.1D: TR 3 s .*differs from the TR 2 s"):
        load_cohort(tmp_path, tr_column="tr")
    # sidecar TR, no cohort TR
    _write(tmp_path, rng)
    (tmp_path / "rois_cc5" / "NYU_0050003_rois_cc5.json").write_text('{"RepetitionTime": 2.5}')
    with pytest.raises(DataFormatError, match=r"NYU_0050003_rois_cc5\.1D: TR 2.5 s \(its JSON sidecar\)"):
        load_cohort(tmp_path)
    (tmp_path / "rois_cc5" / "NYU_0050003_rois_cc5.json").unlink()
    text = (tmp_path / "phenotypic.csv").read_text().replace("0050004,UCLA,1,", "0050004,UCLA,,")
    (tmp_path / "phenotypic.csv").write_text(text)
    with pytest.raises(DataFormatError, match=r"UCLA_0050004_rois_cc5\.1D: subject '0050004' .*no label"):
        load_cohort(tmp_path)


def test_confound_row_mismatch(tmp_path):
    rng = np.random.default_rng(7)
    _write(tmp_path, rng)
    p = tmp_path / "confounds" / "0050005_confounds.tsv"
    p.write_text("\n".join(p.read_text().splitlines()[:-3]) + "\n")
    with pytest.raises(DataFormatError, match=r"0050005_confounds\.tsv: 42 confound rows; .* has 45 time points"):
        load_cohort(tmp_path)
    p.unlink()
    with pytest.raises(DataFormatError, match=r"UCLA_0050005_rois_cc5\.1D: no confound file"):
        load_cohort(tmp_path)
    assert load_cohort(tmp_path, confounds=False).confounds is None


def test_cohort_from_arrays(tmp_path):
    rng = np.random.default_rng(8)
    xs = [rng.normal(size=(30, 4)) for _ in range(3)]
    c = cohort_from_arrays(xs, tr=1.5, labels=["pat", "ctl", "pat"], label_names=["ctl", "pat"], sites=["a", "b", "a"])
    assert c.n_subjects == 3 and list(c.labels) == [1, 0, 1] and c.series[0].dtype == np.float32
    assert c.roi_names == ["roi_0", "roi_1", "roi_2", "roi_3"] and list(c.subject_ids) == ["sub-0000", "sub-0001",
                                                                                          "sub-0002"]
    bad = [x.copy() for x in xs]
    bad[2][5, 1] = np.nan
    with pytest.raises(DataFormatError, match=r"subject 2 \('sub-0002'\): ROI column 2"):
        cohort_from_arrays(bad, tr=1.5)
    with pytest.raises(DataFormatError, match=r"subject 1 \('b'\): 3 ROI columns"):
        cohort_from_arrays([xs[0], xs[1][:, :3]], tr=1.5, subject_ids=["a", "b"])
    with pytest.raises(DataFormatError, match=r"subject 0 \('sub-0000'\): 5 time points"):
        cohort_from_arrays([xs[0][:5]], tr=1.5)
    with pytest.raises(ConfigError, match="labels"):
        cohort_from_arrays(xs, tr=1.5, labels=[0, 1])
    with pytest.raises(ConfigError, match="tr"):
        cohort_from_arrays(xs, tr=0)
