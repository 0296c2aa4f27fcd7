"""Pipeline specs: every shipped spec parses; bad specs fail up front with one-line errors."""
from pathlib import Path

import pytest

from brainenc.exceptions import ConfigError
from brainenc.workflows import RidgeFitConfig, load_pipeline, parse_pipeline
from brainenc.workflows.spec import pipelines_dir, resolve_pipeline_path

PIPELINES = sorted(pipelines_dir().glob("*.toml"))


def test_pipelines_folder_has_the_shipped_specs():
    names = {p.stem for p in PIPELINES}
    assert {"quickstart", "nsd_ridge", "nsd_fsaverage_ridge"} <= names


@pytest.mark.parametrize("path", PIPELINES, ids=[p.stem for p in PIPELINES])
def test_every_pipeline_parses_into_dataclasses(path):
    from brainenc.datasets.prepare import PrepareConfig
    from brainenc.features import FeatureSpec

    spec = load_pipeline(path, subject="subj02")
    assert spec.name == path.stem
    assert isinstance(spec.prepare, PrepareConfig) and spec.prepare.subject == "subj02"
    assert isinstance(spec.features, FeatureSpec)
    assert spec.fits and len({f.name for f in spec.fits}) == len(spec.fits)
    resolved = spec.resolved()
    assert resolved["prepare"]["subject"] == "subj02" and [f["name"] for f in resolved["fit"]] == [f.name for f in spec.fits]


def _minimal(**extra):
    data = {"pipeline": {"name": "t"}, "fit": [{"name": "ridge", "kind": "ridge", "alphas": [1.0, 10.0]}]}
    data.update(extra)
    return data


def test_defaults_and_overrides_address_models_by_name():
    spec = parse_pipeline(_minimal(), subject="3", overrides=["fit.ridge.cv=3", "prepare.zscore=false",
                                                               "evaluate.nc_floor=0.05"])
    (fit,) = spec.fits
    assert isinstance(fit, RidgeFitConfig) and fit.cv == 3 and fit.alphas == [1.0, 10.0]
    assert spec.prepare.subject == "subj03" and spec.prepare.zscore is False
    assert spec.evaluate.nc_floor == 0.05
    assert spec.simulate is False and spec.simulation is None


@pytest.mark.parametrize("data, match", [
    (_minimal(prepar={}), "unknown table 'prepar'.*did you mean 'prepare'"),
    (_minimal(prepare={"zscroe": True}), "unknown key 'prepare.zscroe'.*did you mean 'zscore'"),
    (_minimal(features={"backbon": "gabor"}), "unknown key 'features.backbon'"),
    (_minimal(evaluate={"clip": True}), "unknown key 'evaluate.clip'"),
    (_minimal(report={"figs": True}), "unknown key 'report.figs'"),
    ({"pipeline": {"name": "t"}, "fit": [{"name": "ridge", "alpah": [1.0]}]}, "unknown key 'fit.ridge.alpah'"),
    ({"pipeline": {"name": "t"}, "fit": [{"name": "m", "kind": "lasso"}]}, "unknown fit kind 'lasso'"),
    ({"pipeline": {"name": "t"}, "fit": [{"name": "a"}, {"name": "a"}]}, "duplicate model name 'fit.a'"),
    ({"pipeline": {"name": "t"}, "fit": [{"name": "a", "alphas": [0.0]}]}, "'fit.a.alphas' must all be > 0"),
    ({"pipeline": {"name": "t"}, "fit": [{"name": "a", "grid_pool": 4}]}, "grid_pool"),
    (_minimal(evaluate={"metrics": ["rr"]}), "unknown metric 'rr'"),
    (_minimal(prepare={"simulate": "yes"}), "'prepare.simulate' must be true or false"),
    ({"fit": []}, "needs a \\[pipeline\\] table"),
    ({"pipeline": {"name": "bad name"}}, "'pipeline.name'"),
    (_minimal(report={"maps": ["rmse"]}), "'report.maps'"),
])
def test_invalid_specs_fail_with_the_key_named(data, match):
    with pytest.raises(ConfigError, match=match):
        parse_pipeline(data)


def test_simulate_table_is_validated_and_takes_the_subject():
    spec = parse_pipeline(_minimal(prepare={"simulate": True}, simulate={"n_sessions": 1}), subject="subj02")
    assert spec.simulate and spec.simulation.subject == "subj02" and spec.simulation.n_sessions == 1
    with pytest.raises(ConfigError, match="unknown key 'simulate.sessions'"):
        parse_pipeline(_minimal(prepare={"simulate": True}, simulate={"sessions": 1}))


def test_resolve_bare_name_and_missing(tmp_path, monkeypatch):
    assert resolve_pipeline_path("quickstart") == pipelines_dir() / "quickstart.toml"
    assert resolve_pipeline_path("quickstart.toml") == pipelines_dir() / "quickstart.toml"
    own = tmp_path / "mine.toml"
    own.write_text('[pipeline]\nname = "mine"\n')
    assert resolve_pipeline_path(own) == own.resolve()
    with pytest.raises(ConfigError, match="pipeline 'nope' not found.*available: .*quickstart"):
        resolve_pipeline_path("nope")


def test_invalid_toml_names_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[pipeline\nname = 1\n")
    with pytest.raises(ConfigError, match="bad.toml: invalid TOML"):
        load_pipeline(bad)


def test_run_pipeline_validates_before_any_work(tmp_path):
    from brainenc.workflows import run_pipeline

    bad = tmp_path / "bad.toml"
    bad.write_text('[pipeline]\nname = "x"\n[prepare]\nspace = "fsavg"\n')
    with pytest.raises(ConfigError, match="'space' must be one of"):
        run_pipeline(bad, data_dir=tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_unknown_stage_name_fails_before_any_work(tmp_path):
    from brainenc.workflows import run_pipeline

    with pytest.raises(ConfigError, match="unknown stage 'fitt'.*Did you mean 'fit'"):
        run_pipeline("quickstart", data_dir=tmp_path / "data", stages=["fitt"])
    assert not (tmp_path / "data").exists()
