"""The simulated patient/control cohort: layout read back by ``load_cohort``, determinism, the
ground truth recovered from the written tables, motion confounds, config validation and reuse."""
import dataclasses

import numpy as np
import pytest

from brainenc.datasets.simulate_cohort import (
    MOTION_COLUMNS,
    CohortSimulationConfig,
    coupling_matrices,
    framewise_displacement,
    load_ground_truth,
    simulate_cohort,
)
from brainenc.exceptions import ConfigError

SMALL = CohortSimulationConfig(n_subjects=12, n_sites=2, n_rois=12, n_modules=3, n_timepoints=40)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """The default cohort, simulated once."""
    return simulate_cohort(tmp_path_factory.mktemp("cohort") / "sim")


@pytest.fixture(scope="module")
def cohort(sim):
    from brainenc.datasets.cohort import load_cohort

    return load_cohort(sim.root)


def _fisher_z(series, confounds=None):
    out = []
    for i, y in enumerate(series):
        y = np.asarray(y, dtype=np.float64)
        if confounds is not None:
            d = np.column_stack([np.ones(len(y)), np.asarray(confounds[i], dtype=np.float64)])
            y = y - d @ np.linalg.lstsq(d, y, rcond=None)[0]
        r = np.corrcoef(y.T)
        out.append(np.arctanh(np.clip(r, -0.999999, 0.999999)))
    return np.array(out)


def _confounds_by_name(cohort):
    names = list(cohort.confound_names)
    idx = [names.index(c) for c in MOTION_COLUMNS + ("framewise_displacement",)]
    return [np.asarray(c)[:, idx] for c in cohort.confounds]


def test_layout_files_and_shapes(sim):
    cfg, root, gt = sim.config, sim.root, sim.ground_truth
    R, N = cfg.n_rois, cfg.n_subjects
    for name in ("phenotypic.csv", "cohort.json", "ground_truth.npz"):
        assert (root / name).is_file()
    tables = sorted((root / f"rois_sim{R}").glob("*.1D"))
    assert len(tables) == N
    assert tables[0].name == "site1_sub-0001_rois_sim50.1D"
    first = tables[0].read_text().splitlines()
    assert first[0].startswith("#") and "net1_roi01" in first[0] and "net5_roi10" in first[0]
    assert len(first) == 1 + cfg.n_timepoints
    conf = sorted((root / "confounds").glob("*_confounds.tsv"))
    assert len(conf) == N
    head = conf[0].read_text().splitlines()
    assert head[0].split("\t") == list(MOTION_COLUMNS) + ["framewise_displacement"]
    assert len(head) == 1 + cfg.n_timepoints
    header = (root / "phenotypic.csv").read_text().splitlines()[0]
    assert header == "subject_id,site,diagnosis,age,sex,mean_fd,split"
    # ground truth: shapes, symmetry, affected edges, no pickle needed
    g = load_ground_truth(root)
    assert set(gt) == set(g)
    for k in ("coupling_control", "coupling_patient", "difference"):
        assert g[k].shape == (R, R) and np.allclose(g[k], g[k].T)
    e = g["difference_edges"]
    assert e.dtype == bool and (e == e.T).all() and not e.diagonal().any()
    assert e.sum() == 2 * 10 * 10  # modules 1 and 2 (0-based) of 10 ROIs each
    assert np.allclose(g["difference"][e], cfg.effect_size) and np.allclose(g["difference"][~e], 0)
    assert g["effect_size"] == pytest.approx(cfg.effect_size)
    assert np.array_equal(g["modules"], np.repeat(np.arange(5), 10))
    assert g["site_gain"].shape == (cfg.n_sites, R)
    for k in ("coupling_control", "coupling_patient"):
        assert np.linalg.eigvalsh(g[k])[0] > 0
    assert np.allclose(np.diag(g["coupling_control"]), 1.0)


def test_load_cohort_reads_design(sim, cohort):
    cfg = sim.config
    assert cohort.n_subjects == cfg.n_subjects and cohort.n_rois == cfg.n_rois
    assert cohort.tr == cfg.tr
    assert list(cohort.label_names) == ["control", "patient"]
    assert cohort.roi_names[0] == "net1_roi01"
    assert all(np.asarray(s).shape == (cfg.n_timepoints, cfg.n_rois) for s in cohort.series)
    sites = np.asarray(cohort.sites)
    labels = np.asarray(cohort.labels)
    split = np.asarray(cohort.split)
    assert sorted(set(sites)) == ["site1", "site2", "site3"]
    for s in set(sites):
        in_site = sites == s
        assert in_site.sum() == 40
        assert (labels[in_site] == 0).sum() == (labels[in_site] == 1).sum() == 20
        for g in (0, 1):  # stratified split: round(0.2 * 20) = 4 test subjects per cell
            assert (split[in_site & (labels == g)] == "test").sum() == 4
    assert set(split) == {"train", "test"}
    assert (split == "test").mean() == pytest.approx(cfg.test_fraction)
    # subject order and labels agree with the ground truth
    gt = sim.ground_truth
    assert list(cohort.subject_ids) == list(gt["subject_ids"])
    assert np.array_equal(labels, gt["labels"])
    assert len(cohort.confounds) == cfg.n_subjects


def test_group_mean_correlation_matches_coupling(sim, cohort):
    gt = sim.ground_truth
    labels = np.asarray(cohort.labels)
    z = _fisher_z(cohort.series)
    iu = np.triu_indices(cohort.n_rois, 1)
    for g, key in ((0, "coupling_control"), (1, "coupling_patient")):
        mean_r = np.tanh(z[labels == g].mean(0))
        assert np.corrcoef(mean_r[iu], gt[key][iu])[0, 1] > 0.8


def test_group_difference_on_affected_edges(sim, cohort):
    gt = sim.ground_truth
    labels = np.asarray(cohort.labels)
    z = _fisher_z(cohort.series)
    d = z[labels == 1].mean(0) - z[labels == 0].mean(0)
    e = gt["difference_edges"]
    other = ~e & ~np.eye(len(e), dtype=bool)
    assert d[e].mean() > 0
    assert d[e].mean() > 3 * np.abs(d[other]).mean()


def test_framewise_displacement_is_power_formula(cohort):
    for c in _confounds_by_name(cohort)[:20]:
        p, fd = c[:, :6], c[:, 6]
        d = np.abs(np.diff(p, axis=0))
        expected = np.concatenate([[0.0], d[:, :3].sum(1) + 50.0 * d[:, 3:].sum(1)])
        np.testing.assert_allclose(fd, expected, atol=2e-5)
        np.testing.assert_allclose(framewise_displacement(p), expected, atol=1e-6)  # float32 confounds
    # mean_fd in the phenotype is the mean FD after the first frame
    fd_means = [c[1:, 6].mean() for c in _confounds_by_name(cohort)]
    np.testing.assert_allclose(np.asarray(cohort.phenotype["mean_fd"], dtype=float), fd_means, atol=1e-5)


def test_patients_move_more(sim):
    gt = sim.ground_truth
    assert gt["mean_fd"][gt["labels"] == 1].mean() > gt["mean_fd"][gt["labels"] == 0].mean()


def test_regressing_confounds_improves_match(sim, cohort):
    gt = sim.ground_truth
    labels = np.asarray(cohort.labels)
    iu = np.triu_indices(cohort.n_rois, 1)
    raw = _fisher_z(cohort.series)
    clean = _fisher_z(cohort.series, _confounds_by_name(cohort))

    def match(z):
        return np.corrcoef(np.tanh(z[labels == 0].mean(0))[iu], gt["coupling_control"][iu])[0, 1]

    def spurious(z):  # motion-driven group difference away from the affected edges
        d = z[labels == 1].mean(0) - z[labels == 0].mean(0)
        other = ~gt["difference_edges"] & ~np.eye(cohort.n_rois, dtype=bool)
        return np.abs(d[other]).mean()

    assert match(clean) > match(raw)
    assert spurious(clean) < spurious(raw)


def test_deterministic_bytes(tmp_path):
    a = simulate_cohort(tmp_path / "a", SMALL)
    b = simulate_cohort(tmp_path / "b", dataclasses.replace(SMALL))
    c = simulate_cohort(tmp_path / "c", dataclasses.replace(SMALL, seed=1))
    files = sorted(p.relative_to(a.root) for p in a.root.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert len(files) == 2 * SMALL.n_subjects + 3
    for rel in files:
        if rel.suffix in (".1D", ".tsv", ".csv"):
            assert (a.root / rel).read_bytes() == (b.root / rel).read_bytes(), rel
    tables = [p.relative_to(a.root) for p in (a.root / "rois_sim12").glob("*.1D")]
    assert any((a.root / t).read_bytes() != (c.root / t).read_bytes() for t in tables)
    for k, v in a.ground_truth.items():
        assert np.array_equal(np.asarray(v), np.asarray(b.ground_truth[k])), k


def test_reuse_config_change_and_overwrite(tmp_path):
    root = tmp_path / "c"
    first = simulate_cohort(root, SMALL)
    assert not first.reused
    table = next((root / "rois_sim12").glob("*.1D"))
    stamp = (table.stat().st_mtime_ns, (root / "cohort.json").stat().st_mtime_ns)
    again = simulate_cohort(root, dataclasses.replace(SMALL))
    assert again.reused
    assert (table.stat().st_mtime_ns, (root / "cohort.json").stat().st_mtime_ns) == stamp
    other = dataclasses.replace(SMALL, effect_size=0.2)
    with pytest.raises(ConfigError, match=str(root)) as info:
        simulate_cohort(root, other)
    assert "effect_size" in str(info.value)
    new = simulate_cohort(root, dataclasses.replace(other, n_subjects=8), overwrite=True)
    assert not new.reused and new.ground_truth["effect_size"] == pytest.approx(0.2)
    assert len(list((root / "rois_sim12").glob("*.1D"))) == 8  # old subjects' tables removed
    from brainenc.datasets.cohort import load_cohort

    assert load_cohort(root).n_subjects == 8


def test_incomplete_root_is_simulated_again(tmp_path):
    root = tmp_path / "c"
    simulate_cohort(root, SMALL)
    (root / "cohort.json").unlink()  # as if killed before the last write
    (root / "confounds" / "sub-0003_confounds.tsv").write_text("garbage")
    again = simulate_cohort(root, SMALL)
    assert not again.reused and (root / "cohort.json").is_file()
    assert (root / "confounds" / "sub-0003_confounds.tsv").read_text().startswith("trans_x")


def test_refuses_foreign_folder(tmp_path):
    root = tmp_path / "real"
    root.mkdir()
    (root / "phenotypic.csv").write_text("subject_id,site\n")
    with pytest.raises(ConfigError, match="real"):
        simulate_cohort(root, SMALL)
    assert (root / "phenotypic.csv").read_text() == "subject_id,site\n"


@pytest.mark.parametrize("field,value", [
    ("n_subjects", 3), ("n_sites", 0), ("n_rois", 2), ("n_modules", 0), ("n_timepoints", 5),
    ("tr", 0.0), ("within", 1.0), ("between", -1.0), ("effect_module", 5), ("effect_partner", -1),
    ("effect_size", 1.5), ("subject_variability", -0.1), ("site_scale", float("nan")), ("motion", -1.0),
    ("autocorrelation", 1.0), ("test_fraction", 0.95), ("seed", -1), ("n_subjects", 12.5), ("name", ""),
    ("noise", "a"), ("patient_motion", 0.0),
])
def test_config_errors_name_the_field(field, value):
    cfg = dataclasses.replace(CohortSimulationConfig(), **{field: value})
    with pytest.raises(ConfigError, match=f"'{field}'"):
        cfg.check()


def test_effect_shrunk_to_keep_positive_definite():
    cfg = CohortSimulationConfig(n_rois=20, n_modules=2, within=0.9, between=0.0,
                                 effect_module=0, effect_partner=1, effect_size=0.95).check()
    gt = coupling_matrices(cfg)
    assert np.linalg.eigvalsh(gt["coupling_patient"])[0] > 0
    assert 0 < gt["effect_size"] < 0.95 and gt["effect_size_requested"] == 0.95
    np.testing.assert_allclose(gt["difference"], gt["coupling_patient"] - gt["coupling_control"])
    # within-module effect (effect_module == effect_partner)
    w = coupling_matrices(dataclasses.replace(cfg, within=0.3, effect_partner=0, effect_size=0.2))
    e = w["difference_edges"]
    assert e.sum() == 10 * 9 and not e.diagonal().any()
    assert w["effect_size"] == pytest.approx(0.2)
