"""brainenc.workflows: per-subject pipelines composed from the layers below.

``run_pipeline`` runs the stage graph of a spec's task for one subject in a run folder (the
encoding task: ``simulate -> prepare -> features -> fit.<model> -> evaluate -> report``); every
stage is cached by a key (its config + upstream keys + brainenc version), so a rerun is a no-op,
a changed config reruns what depends on it and a killed run resumes. The generic engine
(:mod:`brainenc.workflows.engine`) knows nothing about fMRI; each task registers its graph with
:func:`register_task`; the ``networks`` task (``brainenc.workflows.networks``: cohort ->
samples -> folds -> pretrain -> fit.<model> -> evaluate -> report) runs once over a group; the
``reconstruct`` task (``brainenc.workflows.reconstruct``: simulate -> prepare -> targets -> decode
-> lowlevel [-> semantic] -> evaluate -> report) turns a subject's test responses into images; the
``synthesize`` task (``brainenc.workflows.synthesize``: simulate -> prepare -> encoders -> synthesize
-> evaluate -> report) makes images that drive an ROI (BrainDiVE).
"""
from brainenc.workflows.engine import Stage, StageContext, StageResult, read_stage_record, run_stages, stage_key
from brainenc.workflows.pipeline import (
    TASKS,
    RunContext,
    build_stages,
    register_task,
    run_dir_for,
    run_pipeline,
    task_is_per_subject,
)
from brainenc.workflows.spec import (
    FIT_KINDS,
    EvaluateConfig,
    FitInputs,
    FitKind,
    FitSpec,
    PipelineSpec,
    ResourceConfig,
    load_pipeline,
    parse_pipeline,
    register_fit_kind,
)


def _register_builtins() -> None:
    """The encoding task and its model kinds (other tasks register theirs from their own modules)."""
    from brainenc.workflows import fitters
    from brainenc.workflows.encoding import build_encoding_graph

    register_task("encoding", build_encoding_graph)
    # the pipeline's ridge z-scores the features with the train rows' statistics unless told otherwise
    register_fit_kind("ridge", "ridge", fitters.fit_ridge, inputs={"features": "pooled"},
                      defaults={"standardize": True})
    register_fit_kind("routing", "routing", fitters.fit_routing, inputs={"features": "tokens"})

    from brainenc.workflows import networks

    register_task("networks", networks.build_networks_graph, sections=networks.SECTIONS, per_subject=False,
                  description="subject-level classification from ROI time series: BrainMAE vs network baselines")

    from brainenc.workflows import reconstruct

    register_task("reconstruct", reconstruct.build_reconstruct_graph, sections=reconstruct.SECTIONS,
                  description="images from test-set fMRI (ridge decoder -> feature inversion [-> diffusion]), "
                              "scored with the MindEye2 metric suite")

    from brainenc.workflows import synthesize

    register_task("synthesize", synthesize.build_synthesize_graph, sections=synthesize.SECTIONS,
                  description="BrainDiVE: images synthesised to drive an ROI, guided by a ridge encoder, scored "
                              "by a held-out encoder against the unguided images of the same seeds")

    from brainenc.workflows import decode

    register_task("decode", decode.build_decode_graph, sections=decode.SECTIONS, per_subject=False,
                  description="Brain-IT: universal encoder, functional clusters, BIT decoders vs ridge on many "
                              "subjects, one-session transfer to a new subject")


_register_builtins()

__all__ = [
    "run_pipeline",
    "RunContext",
    "TASKS",
    "register_task",
    "task_is_per_subject",
    "load_pipeline",
    "parse_pipeline",
    "PipelineSpec",
    "ResourceConfig",
    "EvaluateConfig",
    "FitSpec",
    "FitInputs",
    "FitKind",
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
