"""Pipeline specs: a TOML file parsed into dataclasses, validated before any work starts.

A spec has these tables (all but ``[pipeline]`` optional)::

    [pipeline]   name, description, task ("encoding")
    [prepare]    PrepareConfig keys + ``simulate = true|false``
    [simulate]   SimulationConfig keys used when ``[prepare] simulate = true`` and no data exists
    [features]   FeatureSpec keys
    [[fit]]      one table per model: ``name``, ``kind`` ("ridge", "routing"), ``inputs`` (which
                 features) and the estimator's own configuration (its constructor parameters,
                 nested tables such as ``[fit.model]`` / ``[fit.train]`` where it takes them),
                 validated by ``Estimator.from_config``
    [evaluate]   split, metrics, noise-ceiling normalisation options
    [report]     ReportOptions keys
    [resources]  what one subject's job needs (cpus, memory_gb, gpus, time_min, partition, ...):
                 sizes the local process pool and the SLURM request of ``brainenc run --subjects``;
                 it never changes a result, so no stage key includes it

A task that is not ``encoding`` declares its own tables when it registers
(:func:`brainenc.workflows.register_task` with ``sections``); its spec then holds ``[pipeline]``,
``[resources]`` and those tables only (``PipelineSpec.sections``), e.g. the ``networks`` task's
``[cohort]``, ``[evaluate]``, ``[pretrain]``, ``[[fit]]``, ``[report]``.

Unknown tables or keys are one-line :class:`~brainenc.exceptions.ConfigError` s naming the key.
A spec never names a subject: the subject, data root and run folder belong to the run
(:class:`brainenc.workflows.RunContext`), so one spec serves every subject.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Literal

from brainenc.config import apply_overrides, from_dict, load_toml, to_dict
from brainenc.exceptions import ConfigError
from brainenc.registry import Registry
from brainenc.report import ReportOptions

__all__ = ["PipelineSpec", "EvaluateConfig", "FitSpec", "FitInputs", "FitKind", "FIT_KINDS", "register_fit_kind",
           "ResourceConfig", "parse_fit", "parse_pipeline", "load_pipeline", "resolve_pipeline_path", "pipelines_dir", "SECTIONS"]

SECTIONS = ("pipeline", "prepare", "simulate", "features", "fit", "evaluate", "report", "resources")

#: fit kinds: name -> :class:`FitKind` (the estimator it fits and the fitter that runs it); see fitters.py
FIT_KINDS = Registry("fit kind")

#: keys of a ``[[fit]]`` table that belong to the pipeline, not to the estimator
FIT_KEYS = ("name", "kind", "inputs")


@dataclasses.dataclass(frozen=True)
class FitKind:
    """What ``[[fit]] kind = "<kind>"`` means.

    Attributes
    ----------
    estimator : str
        Name of the estimator class in :data:`brainenc.estimator.ESTIMATORS`; the rest of the
        ``[[fit]]`` table is its configuration, validated by ``Estimator.from_config``.
    fit : callable
        ``fit(ctx, fit: FitSpec, data: FitData) -> dict`` (see ``brainenc.workflows.fitters``).
    inputs : dict
        Default ``inputs`` of the kind (keys of :class:`FitInputs`).
    defaults : dict
        Estimator parameters the pipeline sets unless the table does (ridge: ``standardize = true``).
    """

    estimator: str
    fit: Any
    inputs: dict = dataclasses.field(default_factory=dict)
    defaults: dict = dataclasses.field(default_factory=dict)


def register_fit_kind(kind: str, estimator: str, fit_func, *, inputs: dict | None = None,
                      defaults: dict | None = None) -> None:
    """Register a model kind usable as ``[[fit]] kind = "<kind>"``.

    Parameters
    ----------
    kind : str
    estimator : str
        A registered estimator name (``@register_estimator``); its ``from_config`` validates the table.
    fit_func : callable
        ``fit_func(ctx, fit, data) -> dict`` (see ``brainenc.workflows.fitters``).
    inputs, defaults : dict, optional
        See :class:`FitKind`.
    """
    FIT_KINDS.register(kind, FitKind(estimator, fit_func, dict(inputs or {}), dict(defaults or {})), overwrite=True)


@dataclasses.dataclass
class PipelineMeta:
    """``[pipeline]``: the run's name (the run folder is ``runs/<name>/<subject>``) and its task.

    Attributes
    ----------
    name : str
    description : str
    task : str
        The stage graph to run (:data:`brainenc.workflows.TASKS`; ``"encoding"``: prepare ->
        features -> fit -> evaluate -> report).
    """

    name: str
    description: str = ""
    task: str = "encoding"

    def check(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ConfigError(f"'pipeline.name' must be letters, digits, '_', '-', '.'; {self.name!r} was provided")


@dataclasses.dataclass
class ResourceConfig:
    """``[resources]``: what one subject's job needs, for ``brainenc run --subjects``.

    The local executor runs ``min(n_subjects, cores // cpus, available memory // memory_gb)``
    subjects at once (``--jobs`` overrides); the SLURM executor requests these per job. Flags of
    ``brainenc run`` override the table. Nothing here changes a number, so no stage key includes it.

    Attributes
    ----------
    cpus : int
        CPU cores per subject (threads of its torch / BLAS work).
    memory_gb : float
        Peak memory of one subject's run (the quickstart needs ~1.5 GB).
    gpus : int
        GPUs per job (SLURM ``--gpus-per-node``; the local executor does not hand out GPUs).
    time_min : int
        SLURM time limit in minutes.
    partition : str
        SLURM partition ("" = the cluster's default).
    slurm : dict
        Further SLURM options passed through submitit's ``slurm_additional_parameters``
        (``{account = "lab", qos = "normal"}``).
    """

    cpus: int = 1
    memory_gb: float = 4.0
    gpus: int = 0
    time_min: int = 120
    partition: str = ""
    slurm: dict = dataclasses.field(default_factory=dict)

    def check(self) -> "ResourceConfig":
        import math

        for name in ("cpus", "time_min"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"'resources.{name}' must be an integer >= 1; {v!r} was provided")
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or self.gpus < 0:
            raise ConfigError(f"'resources.gpus' must be an integer >= 0; {self.gpus!r} was provided")
        if (isinstance(self.memory_gb, bool) or not isinstance(self.memory_gb, (int, float))
                or not math.isfinite(self.memory_gb) or self.memory_gb <= 0):
            raise ConfigError(f"'resources.memory_gb' must be a number > 0; {self.memory_gb!r} was provided")
        if not isinstance(self.partition, str):
            raise ConfigError(f"'resources.partition' must be a string; {self.partition!r} was provided")
        if not isinstance(self.slurm, dict) or not all(isinstance(k, str) for k in self.slurm):
            raise ConfigError(f"'resources.slurm' must be a table of SLURM options; {self.slurm!r} was provided")
        return self


@dataclasses.dataclass
class FitInputs:
    """``[[fit]] inputs``: which stimulus features a model is fitted on.

    Attributes
    ----------
    features : {"pooled", "tokens"}
        Pooled ``[n, dim]`` or the tokens ``[n, n_tokens, dim]`` (a ridge model flattens them).
    grid_pool : int
        With ``features = "tokens"``: average the patch tokens over a ``grid_pool x grid_pool``
        grid of image regions first (0 = keep every token), keeping coarse spatial layout.
    """

    features: Literal["pooled", "tokens"] = "pooled"
    grid_pool: int = 0

    def check(self) -> None:
        if self.grid_pool < 0 or (self.grid_pool and self.features != "tokens"):
            raise ConfigError("'inputs.grid_pool' must be >= 0 and needs inputs.features = 'tokens'")


@dataclasses.dataclass
class FitSpec:
    """One ``[[fit]]`` table: ``{name, kind, inputs}`` + the estimator's own configuration.

    Attributes
    ----------
    name : str
        Model name in file names and the report (unique within a pipeline).
    kind : str
        A key of :data:`FIT_KINDS` (``"ridge"``, ``"routing"``).
    inputs : FitInputs
    params : dict
        The estimator's configuration, every default filled in (``Estimator.to_config()`` of the
        validated table); ``fit.<name>.<key>`` in messages and ``--set`` overrides.
    """

    name: str
    kind: str
    inputs: FitInputs
    params: dict

    @property
    def estimator_class(self):
        from brainenc import _import_estimators

        return _import_estimators().get(FIT_KINDS.get(self.kind).estimator)

    def build(self):
        """A new, unfitted estimator from ``params``."""
        return self.estimator_class.from_config(self.params, prefix=f"fit.{self.name}.")

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "inputs": to_dict(self.inputs), **self.params}


def parse_fit(name: str, table: dict) -> FitSpec:
    """Validate one ``[[fit]]`` table (the estimator validates its own keys)."""
    kind = table.get("kind", "ridge")
    if not isinstance(kind, str):
        raise ConfigError(f"'fit.{name}.kind' must be a string; {kind!r} was provided")
    entry: FitKind = FIT_KINDS.get(kind)
    inputs_table = table.get("inputs", {})
    if not isinstance(inputs_table, dict):
        raise ConfigError(f"'fit.{name}.inputs' must be a table, e.g. inputs = {{ features = \"tokens\" }}")
    inputs = from_dict(FitInputs, {**entry.inputs, **inputs_table}, _prefix=f"fit.{name}.inputs.")
    params = {**entry.defaults, **{k: v for k, v in table.items() if k not in FIT_KEYS}}
    from brainenc import _import_estimators

    est = _import_estimators().get(entry.estimator).from_config(params, prefix=f"fit.{name}.")
    return FitSpec(name=name, kind=kind, inputs=inputs, params=est.to_config())


@dataclasses.dataclass
class EvaluateConfig:
    """``[evaluate]``: what is scored and how the noise ceiling normalises it.

    Attributes
    ----------
    split : str
        Held-out split the models are scored on (a key of ``PreparedDataset.splits``).
    metrics : list of str
        Per-voxel metrics (names in :data:`brainenc.metrics.METRICS`); ``r`` and ``r2`` always
        computed for the report.
    normalize : {"r", "r2"}
        Which score is divided by the noise ceiling (``r`` means r², sign-kept).
    clip_negative : bool
        Negative scores count as 0 before normalising.
    nc_floor : float
        Voxels with a noise ceiling at or below this are unreliable (see ``below_floor``).
    below_floor : {"nan", "floor"}
        NaN (excluded from ROI means) or divide by ``nc_floor``.
    cap : float or None
        Upper bound of the normalised score (1 = the ceiling); any negative value (``cap = -1`` in
        TOML, which has no null) or None means none: see :meth:`effective_cap`.
    """

    split: str = "test"
    metrics: list[str] = dataclasses.field(default_factory=lambda: ["r", "r2"])
    normalize: Literal["r", "r2"] = "r"
    clip_negative: bool = True
    nc_floor: float = 0.0
    below_floor: Literal["nan", "floor"] = "nan"
    cap: float | None = 1.0

    @property
    def effective_cap(self) -> float | None:
        """The cap as :class:`brainenc.metrics.NormalizeOptions` takes it: None (no cap) when negative."""
        return None if self.cap is None or self.cap < 0 else self.cap

    def check(self) -> None:
        from brainenc.metrics import METRICS

        for m in self.metrics:
            METRICS.get(m)
        if self.nc_floor < 0 or self.nc_floor >= 1:
            raise ConfigError(f"'evaluate.nc_floor' must be in [0, 1); {self.nc_floor!r} was provided")
        if self.below_floor == "floor" and self.nc_floor <= 0:
            raise ConfigError("'evaluate.nc_floor' must be > 0 when below_floor = 'floor'")


@dataclasses.dataclass
class PipelineSpec:
    """A validated pipeline spec.

    Attributes
    ----------
    pipeline : PipelineMeta
    prepare : PrepareConfig
        Its ``subject`` is a placeholder: the run's subject replaces it (``RunContext.prepare_config``).
    simulate : bool
        Simulate the subject first when the NSD root has no data for it.
    simulation : SimulationConfig or None
        Simulator settings (``[simulate]``), built when ``simulate`` is true.
    features : FeatureSpec
    fits : list
        One :class:`FitSpec` per ``[[fit]]`` table.
    evaluate : EvaluateConfig
    report : ReportOptions
    resources : ResourceConfig
        What one subject's job needs (``brainenc run --subjects``).
    source : Path or None
        The TOML file the spec came from.
    sections : dict or None
        A task with its own tables (``register_task(..., sections=...)``): table name -> its
        parsed value; the encoding fields above then keep their defaults and are unused.
    """

    pipeline: PipelineMeta
    prepare: Any
    simulate: bool
    simulation: Any
    features: Any
    fits: list
    evaluate: EvaluateConfig
    report: ReportOptions
    resources: ResourceConfig = dataclasses.field(default_factory=ResourceConfig)
    source: Path | None = None
    sections: dict | None = None

    @property
    def name(self) -> str:
        return self.pipeline.name

    def resolved(self) -> dict:
        """The full resolved config as plain data (what ``config.resolved.json`` holds)."""
        if self.sections is not None:  # a task with its own tables
            return {"pipeline": to_dict(self.pipeline),
                    **{k: _section_dict(v) for k, v in self.sections.items()},
                    "resources": to_dict(self.resources)}
        out = {
            "pipeline": to_dict(self.pipeline),
            "prepare": dict({k: v for k, v in to_dict(self.prepare).items() if k != "subject"}, simulate=self.simulate),
            "features": to_dict(self.features),
            "fit": [f.to_dict() for f in self.fits],
            "evaluate": to_dict(self.evaluate),
            "report": to_dict(self.report),
            "resources": to_dict(self.resources),
        }
        if self.simulation is not None:
            out["simulate"] = {k: v for k, v in to_dict(self.simulation).items() if k != "subject"}
        return out


def _section_dict(value) -> Any:
    """Plain data of a parsed task table (a dataclass, a list / mapping of them, or plain data)."""
    if dataclasses.is_dataclass(value):
        return value.to_dict() if hasattr(value, "to_dict") else to_dict(value)
    if isinstance(value, dict):
        return {k: _section_dict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_section_dict(v) for v in value]
    return value


def _parse_task_sections(meta, data: dict, sections: dict, resources_table: dict, source) -> "PipelineSpec":
    """A spec of a task with its own tables: ``[pipeline]``, ``[resources]`` + ``sections``."""
    allowed = ("pipeline", "resources", *sections)
    unknown = [k for k in data if k not in allowed]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], allowed, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; the {meta.task} task's tables are {', '.join(allowed)}"
        raise ConfigError(f"unknown table '{unknown[0]}' in pipeline spec{hint}")
    parsed = {}
    for sec, parse in sections.items():
        table = data.get(sec, {})
        if not isinstance(table, dict):
            raise ConfigError(f"'{sec}' must be a table; {table!r} was provided")
        if isinstance(parse, type) and dataclasses.is_dataclass(parse):
            parsed[sec] = from_dict(parse, table, _prefix=f"{sec}.")
        else:
            parsed[sec] = parse(table, f"{sec}.")
    resources = from_dict(ResourceConfig, resources_table, _prefix="resources.")
    from brainenc.datasets.prepare import PrepareConfig
    from brainenc.features import FeatureSpec

    return PipelineSpec(pipeline=meta, prepare=PrepareConfig(), simulate=False, simulation=None,
                        features=FeatureSpec(), fits=[], evaluate=EvaluateConfig(), report=ReportOptions(),
                        resources=resources, source=source, sections=parsed)


def _fit_list_to_table(data: dict) -> dict:
    """``fit = [{name=...}, ...]`` -> ``{name: {...}}`` so ``--set fit.ridge.cv=3`` can address a model."""
    fits = data.get("fit")
    if fits is None:
        return data
    if isinstance(fits, dict):  # a single [fit] table instead of [[fit]]
        fits = [fits]
    if not isinstance(fits, list):
        raise ConfigError("'fit' must be a list of tables ([[fit]] in TOML)")
    table: dict[str, dict] = {}
    for i, f in enumerate(fits):
        if not isinstance(f, dict):
            raise ConfigError(f"'fit[{i}]' must be a table")
        name = f.get("name", f.get("kind", "ridge"))
        if not isinstance(name, str):
            raise ConfigError(f"'fit[{i}].name' must be a string; {name!r} was provided")
        if name in table:
            raise ConfigError(f"duplicate model name 'fit.{name}'; give each [[fit]] a unique 'name'")
        table[name] = dict(f, name=name)
    return dict(data, fit=table)


def parse_pipeline(data: dict, *, overrides: list[str] | None = None, source: Path | None = None) -> PipelineSpec:
    """Validate a pipeline mapping (from TOML) into a :class:`PipelineSpec`.

    A spec does not name a subject: the same spec runs for any subject (``brainenc run --subject``,
    :class:`brainenc.workflows.RunContext`).

    Parameters
    ----------
    data : dict
        The parsed TOML.
    overrides : list of str, optional
        ``table.key=value`` overrides, e.g. ``prepare.zscore=false`` or ``fit.ridge.cv=3``.
    source : Path, optional
        Where ``data`` came from (kept for messages and the run record).

    Returns
    -------
    PipelineSpec

    Raises
    ------
    ConfigError
        Unknown tables/keys, wrong types or values, naming the key.
    """
    from brainenc.datasets.prepare import PrepareConfig
    from brainenc.features import FeatureSpec

    data = _fit_list_to_table(dict(data))
    data = apply_overrides(data, overrides)
    pipe = data.get("pipeline")
    if isinstance(pipe, dict) and pipe.get("task", "encoding") != "encoding":
        meta = from_dict(PipelineMeta, pipe, _prefix="pipeline.")
        from brainenc.workflows.pipeline import TASKS

        TASKS.get(meta.task)
        sections = TASKS.meta(meta.task).get("sections")
        if sections is not None:
            return _parse_task_sections(meta, data, sections, data.get("resources", {}), source)
    unknown = [k for k in data if k not in SECTIONS]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], SECTIONS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; tables are {', '.join(SECTIONS)}"
        raise ConfigError(f"unknown table '{unknown[0]}' in pipeline spec{hint}")
    for sec in SECTIONS:
        if sec in data and not isinstance(data[sec], dict):
            raise ConfigError(f"'{sec}' must be a table; {data[sec]!r} was provided")
    if "pipeline" not in data:
        raise ConfigError("pipeline spec needs a [pipeline] table with a 'name'")
    meta = from_dict(PipelineMeta, data["pipeline"], _prefix="pipeline.")
    from brainenc.workflows.pipeline import TASKS

    TASKS.get(meta.task)  # unknown task: one line listing the known ones

    for sec in ("prepare", "simulate"):
        if "subject" in data.get(sec, {}):
            raise ConfigError(f"'{sec}.subject': a pipeline spec does not name a subject; it comes from the run "
                              "(brainenc run --subject subj02, run_pipeline(..., subject='subj02'))")
    prep = dict(data.get("prepare", {}))
    simulate = prep.pop("simulate", False)
    if not isinstance(simulate, bool):
        raise ConfigError(f"'prepare.simulate' must be true or false; {simulate!r} was provided")
    prepare = from_dict(PrepareConfig, prep, _prefix="prepare.")

    simulation = None
    if simulate or "simulate" in data:
        from brainenc.datasets.simulate import SimulationConfig

        simulation = from_dict(SimulationConfig, dict(data.get("simulate", {})), _prefix="simulate.")

    features = from_dict(FeatureSpec, data.get("features", {}), _prefix="features.")
    fit_tables = data.get("fit") or {"ridge": {"name": "ridge", "kind": "ridge"}}
    fits = [parse_fit(name, f) for name, f in fit_tables.items()]
    evaluate = from_dict(EvaluateConfig, data.get("evaluate", {}), _prefix="evaluate.")
    report = from_dict(ReportOptions, data.get("report", {}), _prefix="report.")
    resources = from_dict(ResourceConfig, data.get("resources", {}), _prefix="resources.")
    return PipelineSpec(pipeline=meta, prepare=prepare, simulate=simulate, simulation=simulation,
                        features=features, fits=fits, evaluate=evaluate, report=report, resources=resources,
                        source=source)


def pipelines_dir() -> Path:
    """The repository's ``pipelines/`` folder (next to the ``brainenc`` package)."""
    return Path(__file__).resolve().parents[2] / "pipelines"


def resolve_pipeline_path(pipeline: str | Path) -> Path:
    """A pipeline path, or a bare name looked up as ``pipelines/<name>.toml``.

    Raises
    ------
    ConfigError
        When neither exists; lists the available names.
    """
    p = Path(pipeline).expanduser()
    if p.is_file():
        return p.resolve()
    name = p.name[:-5] if p.name.endswith(".toml") else p.name
    candidate = pipelines_dir() / f"{name}.toml"
    if p.parent == Path(".") and candidate.is_file():
        return candidate
    available = sorted(q.stem for q in pipelines_dir().glob("*.toml"))
    raise ConfigError(f"pipeline {str(pipeline)!r} not found (not a file, and not a name in {pipelines_dir()}); "
                      f"available: {', '.join(available) or '(none)'}")


def load_pipeline(pipeline: str | Path, *, overrides: list[str] | None = None) -> PipelineSpec:
    """Read and validate a pipeline spec (path or bare name under ``pipelines/``)."""
    path = resolve_pipeline_path(pipeline)
    return parse_pipeline(load_toml(path), overrides=overrides, source=path)
