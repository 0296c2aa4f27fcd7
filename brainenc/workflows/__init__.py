"""brainenc.workflows: per-subject pipelines composed from the layers below.

``run_pipeline`` runs ``prepare -> features -> fit.<model> -> evaluate -> report`` for one subject
in a run folder; every stage is cached by a key (its config + upstream keys + brainenc version),
so a rerun is a no-op, a changed config reruns what depends on it and a killed run resumes.
The generic engine (:mod:`brainenc.workflows.engine`) knows nothing about fMRI.
"""
from brainenc.workflows.engine import Stage, StageContext, StageResult, read_stage_record, run_stages, stage_key
from brainenc.workflows.pipeline import build_stages, run_dir_for, run_pipeline
from brainenc.workflows.spec import (
    FIT_KINDS,
    EvaluateConfig,
    PipelineSpec,
    RidgeFitConfig,
    _register_builtin_kinds,
    load_pipeline,
    parse_pipeline,
    register_fit_kind,
)

_register_builtin_kinds()

__all__ = [
    "run_pipeline",
    "load_pipeline",
    "parse_pipeline",
    "PipelineSpec",
    "EvaluateConfig",
    "RidgeFitConfig",
    "FIT_KINDS",
    "register_fit_kind",
    "build_stages",
    "run_dir_for",
    "Stage",
    "StageContext",
    "StageResult",
    "run_stages",
    "stage_key",
    "read_stage_record",
]
