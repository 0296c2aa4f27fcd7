"""Pipeline specs: a TOML file parsed into dataclasses, validated before any work starts.

A spec has these tables (all but ``[pipeline]`` optional)::

    [pipeline]   name, description
    [prepare]    PrepareConfig keys (subject comes from the command line) + ``simulate = true|false``
    [simulate]   SimulationConfig keys used when ``[prepare] simulate = true`` and no data exists
    [features]   FeatureSpec keys
    [[fit]]      one table per model: ``name``, ``kind`` ("ridge", ...) and the kind's own keys
    [evaluate]   split, metrics, noise-ceiling normalisation options
    [report]     ReportOptions keys

Unknown tables or keys are one-line :class:`~brainenc.exceptions.ConfigError` s naming the key.
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

__all__ = ["PipelineSpec", "EvaluateConfig", "RidgeFitConfig", "RoutingFitConfig", "FIT_KINDS", "register_fit_kind",
           "parse_pipeline", "load_pipeline", "resolve_pipeline_path", "pipelines_dir", "SECTIONS"]

SECTIONS = ("pipeline", "prepare", "simulate", "features", "fit", "evaluate", "report")

#: fit kinds: name -> {"config": dataclass, "fit": callable(ctx, cfg) -> outputs}; see fitters.py
FIT_KINDS = Registry("fit kind")


def register_fit_kind(kind: str, config_cls: type, fit_func) -> None:
    """Register a model kind usable as ``[[fit]] kind = "<kind>"``.

    Parameters
    ----------
    kind : str
    config_cls : dataclass type
        Must have ``name`` and ``kind`` fields; the rest are the model's options.
    fit_func : callable
        ``fit_func(ctx, cfg, data) -> dict`` (see :mod:`brainenc.workflows.fitters`).
    """
    names = {f.name for f in dataclasses.fields(config_cls)}
    if not {"name", "kind"} <= names:
        raise ConfigError(f"fit config {config_cls.__name__} needs 'name' and 'kind' fields")
    FIT_KINDS.register(kind, {"config": config_cls, "fit": fit_func}, overwrite=True)


@dataclasses.dataclass
class PipelineMeta:
    """``[pipeline]``: the run's name (the run folder is ``runs/<name>/<subject>``)."""

    name: str
    description: str = ""

    def check(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ConfigError(f"'pipeline.name' must be letters, digits, '_', '-', '.'; {self.name!r} was provided")


@dataclasses.dataclass
class RidgeFitConfig:
    """``[[fit]] kind = "ridge"``: voxelwise ridge on pooled features (RidgeEncoder options).

    Attributes
    ----------
    name : str
        Model name in file names and the report (unique within a pipeline).
    kind : str
        ``"ridge"``.
    features : {"pooled", "tokens"}
        Pooled ``[n, dim]`` or flattened tokens ``[n, n_tokens * dim]``.
    grid_pool : int
        With ``features = "tokens"``: average the patch tokens over a ``grid_pool x grid_pool``
        grid of image regions first (0 = keep every token), keeping coarse spatial layout.
    standardize : bool
        Z-score each feature with the training rows' mean and std before the fit.
    alphas, cv, fit_intercept, scoring, alpha_per_target, solver, backend, device, dtype, target_batch_size
        Passed to :class:`brainenc.encoding.RidgeEncoder` (``alphas = []`` means its default grid).
    """

    name: str = "ridge"
    kind: str = "ridge"
    features: Literal["pooled", "tokens"] = "pooled"
    grid_pool: int = 0
    standardize: bool = True
    alphas: list[float] = dataclasses.field(default_factory=list)
    cv: int | None = 5
    fit_intercept: bool = True
    scoring: Literal["r2", "neg_mse"] = "r2"
    alpha_per_target: bool = True
    solver: Literal["auto", "kfold", "gcv"] = "auto"
    backend: Literal["numpy", "torch"] = "numpy"
    device: str = "cpu"
    dtype: Literal["float32", "float64"] = "float32"
    target_batch_size: int | None = None

    def check(self) -> None:
        if any(a <= 0 for a in self.alphas):
            raise ConfigError(f"'fit.{self.name}.alphas' must all be > 0; {self.alphas!r} was provided")
        if self.grid_pool < 0 or (self.grid_pool and self.features != "tokens"):
            raise ConfigError(f"'fit.{self.name}.grid_pool' must be >= 0 and needs features = 'tokens'")
        if self.cv is not None and self.cv < 2:
            raise ConfigError(f"'fit.{self.name}.cv' must be >= 2 (or omitted for GCV); {self.cv!r} was provided")


@dataclasses.dataclass
class RoutingFitConfig:
    """``[[fit]] kind = "routing"``: the attention-routing transformer encoder on patch tokens.

    Attributes
    ----------
    name : str
    kind : str
        ``"routing"``.
    model : dict
        The table given to :meth:`brainenc.encoding.RoutingEncoder.from_config` (validated when
        the spec is read): constructor parameters (``queries``, ``combine``, ``families``,
        ``unknown``, ``val_fraction``, ``val_seed``, ``scoring``), a ``model`` table of
        :class:`brainenc.models.RoutingArchitecture` keys (``d_model``, ``n_heads``, ``n_layers``...)
        and a ``train`` table of TrainConfig keys (``epochs``, ``lr``, ``device``...). In TOML:
        ``[fit.model]``, ``[fit.model.model]`` and ``[fit.model.train]`` after the ``[[fit]]`` header.
    """

    name: str = "routing"
    kind: str = "routing"
    model: dict[str, Any] = dataclasses.field(default_factory=dict)

    def check(self) -> None:
        from brainenc.encoding.routing import RoutingEncoder

        RoutingEncoder.from_config(self.model, prefix=f"fit.{self.name}.model.")


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
    simulate : bool
        Simulate the subject first when the NSD root has no data for it.
    simulation : SimulationConfig or None
        Simulator settings (``[simulate]``), built when ``simulate`` is true.
    features : FeatureSpec
    fits : list
        One config dataclass per ``[[fit]]`` table (e.g. :class:`RidgeFitConfig`).
    evaluate : EvaluateConfig
    report : ReportOptions
    source : Path or None
        The TOML file the spec came from.
    """

    pipeline: PipelineMeta
    prepare: Any
    simulate: bool
    simulation: Any
    features: Any
    fits: list
    evaluate: EvaluateConfig
    report: ReportOptions
    source: Path | None = None

    @property
    def name(self) -> str:
        return self.pipeline.name

    def resolved(self) -> dict:
        """The full resolved config as plain data (what ``config.resolved.json`` holds)."""
        out = {
            "pipeline": to_dict(self.pipeline),
            "prepare": dict(to_dict(self.prepare), simulate=self.simulate),
            "features": to_dict(self.features),
            "fit": [to_dict(f) for f in self.fits],
            "evaluate": to_dict(self.evaluate),
            "report": to_dict(self.report),
        }
        if self.simulation is not None:
            out["simulate"] = to_dict(self.simulation)
        return out


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


def parse_pipeline(data: dict, *, subject: str | None = None, overrides: list[str] | None = None,
                   source: Path | None = None) -> PipelineSpec:
    """Validate a pipeline mapping (from TOML) into a :class:`PipelineSpec`.

    Parameters
    ----------
    data : dict
        The parsed TOML.
    subject : str, optional
        Subject for ``[prepare]`` (and ``[simulate]``); overrides the file's value.
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
    from brainenc._utils.validation import check_subject
    from brainenc.datasets.prepare import PrepareConfig
    from brainenc.features import FeatureSpec

    data = _fit_list_to_table(dict(data))
    data = apply_overrides(data, overrides)
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

    prep = dict(data.get("prepare", {}))
    simulate = prep.pop("simulate", False)
    if not isinstance(simulate, bool):
        raise ConfigError(f"'prepare.simulate' must be true or false; {simulate!r} was provided")
    if subject is not None:
        prep["subject"] = check_subject(subject)
    prepare = from_dict(PrepareConfig, prep, _prefix="prepare.")

    simulation = None
    if simulate or "simulate" in data:
        from brainenc.datasets.simulate import SimulationConfig

        sim = dict(data.get("simulate", {}))
        sim["subject"] = prepare.subject
        simulation = from_dict(SimulationConfig, sim, _prefix="simulate.")

    features = from_dict(FeatureSpec, data.get("features", {}), _prefix="features.")

    fits = []
    for name, f in (data.get("fit") or {"ridge": {"name": "ridge", "kind": "ridge"}}).items():
        kind = f.get("kind", "ridge")
        if not isinstance(kind, str):
            raise ConfigError(f"'fit.{name}.kind' must be a string; {kind!r} was provided")
        entry = FIT_KINDS.get(kind)
        fits.append(from_dict(entry["config"], f, _prefix=f"fit.{name}."))
    evaluate = from_dict(EvaluateConfig, data.get("evaluate", {}), _prefix="evaluate.")
    report = from_dict(ReportOptions, data.get("report", {}), _prefix="report.")
    return PipelineSpec(pipeline=meta, prepare=prepare, simulate=simulate, simulation=simulation,
                        features=features, fits=fits, evaluate=evaluate, report=report, source=source)


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


def load_pipeline(pipeline: str | Path, *, subject: str | None = None,
                  overrides: list[str] | None = None) -> PipelineSpec:
    """Read and validate a pipeline spec (path or bare name under ``pipelines/``)."""
    path = resolve_pipeline_path(pipeline)
    return parse_pipeline(load_toml(path), subject=subject, overrides=overrides, source=path)


def _register_builtin_kinds() -> None:
    from brainenc.workflows import fitters

    register_fit_kind("ridge", RidgeFitConfig, fitters.fit_ridge)
    register_fit_kind("routing", RoutingFitConfig, fitters.fit_routing)
