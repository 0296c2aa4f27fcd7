"""brainenc.synthesis: brain-guided image synthesis (BrainDiVE)."""
from brainenc.synthesis.objectives import OBJECTIVE_KINDS, ResponseObjective
from brainenc.synthesis.guidance import (
    SCHEDULERS,
    GuidanceConfig,
    Prior,
    guided_step,
    initial_noise,
    load_sd_prior,
    make_scheduler,
    rerank,
    synthesize,
)
from brainenc.synthesis.prior import (
    PRIOR_TRAIN_DEFAULTS,
    SHIPPED_PRIOR,
    DenoisingObjective,
    PriorConfig,
    load_prior,
    save_prior,
    scene_images,
    shipped_prior_path,
    train_prior,
)

__all__ = [
    "OBJECTIVE_KINDS",
    "ResponseObjective",
    "SCHEDULERS",
    "GuidanceConfig",
    "Prior",
    "guided_step",
    "initial_noise",
    "load_sd_prior",
    "make_scheduler",
    "rerank",
    "synthesize",
    "PRIOR_TRAIN_DEFAULTS",
    "SHIPPED_PRIOR",
    "DenoisingObjective",
    "PriorConfig",
    "load_prior",
    "save_prior",
    "scene_images",
    "shipped_prior_path",
    "train_prior",
]
