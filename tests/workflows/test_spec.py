"""Pipeline specs: every shipped spec parses; bad specs fail up front with one-line errors."""
import pytest

from brainenc.exceptions import ConfigError
from brainenc.workflows import FitSpec, RunContext, load_pipeline, parse_pipeline
from brainenc.workflows.spec import pipelines_dir, resolve_pipeline_path

PIPELINES = sorted(pipelines_dir().glob("*.toml"))


def test_pipelines_folder_has_the_shipped_specs():
    names = {p.stem for p in PIPELINES}
    assert {"quickstart", "nsd_ridge", "nsd_fsaverage_ridge"} <= names


@pytest.mark.parametrize("path", PIPELINES, ids=[p.stem for p in PIPELINES])
def test_every_pipeline_parses_into_dataclasses(path):
    from brainenc.datasets.prepare import PrepareConfig
    from brainenc.features import FeatureSpec

    spec = load_pipeline(path)
    assert spec.name == path.stem
    if spec.sections is not None:  # a task with its own tables (networks)
        resolved = spec.resolved()
        assert set(spec.sections) <= set(resolved)
        again = parse_pipeline(resolved)  # the resolved config is itself a valid spec, parsing to the same
        assert again.resolved() == resolved
        for fit in spec.sections.get("fit", []):
            assert fit.build(**({"tr": 2.0} if fit.kind == "brainmae" else {})) is not None
        run = RunContext.create(spec, None, data_dir="/tmp/brainenc-unused")
        from brainenc.workflows import task_is_per_subject

        assert run.run_dir.name == ("subj01" if task_is_per_subject(spec.pipeline.task) else "cohort")
        return
    assert isinstance(spec.prepare, PrepareConfig) and isinstance(spec.features, FeatureSpec)
    assert spec.fits and len({f.name for f in spec.fits}) == len(spec.fits)
    resolved = spec.resolved()
    assert "subject" not in resolved["prepare"]  # the run names the subject, not the spec
    assert [f["name"] for f in resolved["fit"]] == [f.name for f in spec.fits]
    for fit in spec.fits:  # every [[fit]] table builds its estimator, and the resolved table round-trips
        est = fit.build()
        assert est.to_config() == fit.params
        again = parse_pipeline({"pipeline": {"name": "t"}, "fit": [fit.to_dict()]}).fits[0]
        assert again == fit
    run = RunContext.create(spec, "subj02", data_dir="/tmp/brainenc-unused")
    assert run.prepare_config(spec.prepare).subject == "subj02"


def _minimal(**extra):
    data = {"pipeline": {"name": "t"}, "fit": [{"name": "ridge", "kind": "ridge", "alphas": [1.0, 10.0]}]}
    data.update(extra)
    return data


def test_defaults_and_overrides_address_models_by_name():
    spec = parse_pipeline(_minimal(), overrides=["fit.ridge.cv=3", "prepare.zscore=false",
                                                 "evaluate.nc_floor=0.05"])
    (fit,) = spec.fits
    assert isinstance(fit, FitSpec) and fit.params["cv"] == 3 and fit.params["alphas"] == [1.0, 10.0]
    assert fit.params["standardize"] is True  # the pipeline's ridge kind z-scores unless told otherwise
    assert fit.inputs.features == "pooled" and fit.inputs.grid_pool == 0
    enc = fit.build()
    assert type(enc).__name__ == "RidgeEncoder" and enc.cv == 3 and enc.standardize
    assert spec.prepare.zscore is False
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
    ({"pipeline": {"name": "t"}, "fit": [{"name": "a", "alphas": [0.0]}]}, "'fit.a.alphas' must all be finite and > 0"),
    ({"pipeline": {"name": "t"}, "fit": [{"name": "a", "cv": 1}]}, "'fit.a.cv' must be an int >= 2"),
    ({"pipeline": {"name": "t"}, "fit": [{"name": "a", "solver": "lu"}]}, "'fit.a.solver' must be one of"),
    ({"pipeline": {"name": "t"}, "fit": [{"name": "a", "grid_pool": 4}]}, "unknown key 'fit.a.grid_pool'"),
    ({"pipeline": {"name": "t"}, "fit": [{"name": "a", "inputs": {"grid_pool": 4}}]}, "'inputs.grid_pool'.*tokens"),
    ({"pipeline": {"name": "t"}, "fit": [{"name": "a", "inputs": {"featurs": "tokens"}}]},
     "unknown key 'fit.a.inputs.featurs'"),
    ({"pipeline": {"name": "t"}, "fit": [{"name": "r", "kind": "routing", "d_model": 8}]},
     "unknown key 'fit.r.d_model'.*belongs in the 'fit.r.model' table"),
    ({"pipeline": {"name": "t"}, "fit": [{"name": "r", "kind": "routing", "model": {"d_modle": 8}}]},
     "unknown key 'fit.r.model.d_modle'"),
    ({"pipeline": {"name": "t"}, "fit": [{"name": "r", "kind": "routing", "queries": "roi"}]},
     "'fit.r.queries' must be one of"),
    ({"pipeline": {"name": "t", "task": "decodng"}}, "unknown task 'decodng'"),
    (_minimal(prepare={"subject": "subj02"}), "'prepare.subject'.*comes from the run"),
    (_minimal(evaluate={"metrics": ["rr"]}), "unknown metric 'rr'"),
    (_minimal(prepare={"simulate": "yes"}), "'prepare.simulate' must be true or false"),
    ({"fit": []}, "needs a \\[pipeline\\] table"),
    ({"pipeline": {"name": "bad name"}}, "'pipeline.name'"),
    (_minimal(report={"maps": ["rmse"]}), "'report.maps'"),
])
def test_invalid_specs_fail_with_the_key_named(data, match):
    with pytest.raises(ConfigError, match=match):
        parse_pipeline(data)


def test_simulate_table_is_validated_and_the_run_gives_the_subject(tmp_path):
    spec = parse_pipeline(_minimal(prepare={"simulate": True}, simulate={"n_sessions": 1}))
    assert spec.simulate and spec.simulation.n_sessions == 1
    run = RunContext.create(spec, "subj02", data_dir=tmp_path)
    assert run.simulation_config(spec.simulation).subject == "subj02"
    assert run.run_dir == tmp_path / "runs" / "t" / "subj02" and run.nsd_root == tmp_path / "nsd"
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
