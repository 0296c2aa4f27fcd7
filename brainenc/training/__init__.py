"""brainenc.training: Trainer (fit / validate / checkpoint / resume, DDP via torchrun) with pluggable
objectives, optimisers and schedules by name, losses, torch data bridge, seeding, ensembling."""
from brainenc.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_tensors,
    optimizer_from_parts,
    optimizer_to_parts,
    save_checkpoint,
    save_tensors,
)
from brainenc.training.data import (
    ArrayDataset,
    ConcatRows,
    DictDataset,
    GlobalBatchSampler,
    RowSubset,
    channel_statistics,
    make_dict_loader,
    make_loader,
)
from brainenc.training.ddp import cleanup_distributed, distributed_info, init_distributed
from brainenc.training.ensemble import SoftmaxEnsemble, mix_predictions, softmax_weights
from brainenc.training.losses import mse_sum, pearson_r_torch
from brainenc.training.objectives import LossSum, MaskedReconstruction, Objective, Validation, VoxelRegression
from brainenc.training.optim import OPTIMIZERS, SCHEDULES, build_optimizer, build_scheduler
from brainenc.training.seed import capture_rng_state, restore_rng_state, seed_everything
from brainenc.training.trainer import TrainConfig, Trainer, TrainResult

__all__ = [
    "Trainer",
    "TrainConfig",
    "TrainResult",
    "Objective",
    "LossSum",
    "Validation",
    "VoxelRegression",
    "MaskedReconstruction",
    "OPTIMIZERS",
    "SCHEDULES",
    "build_optimizer",
    "build_scheduler",
    "ArrayDataset",
    "DictDataset",
    "RowSubset",
    "ConcatRows",
    "channel_statistics",
    "GlobalBatchSampler",
    "make_loader",
    "make_dict_loader",
    "init_distributed",
    "cleanup_distributed",
    "distributed_info",
    "SoftmaxEnsemble",
    "softmax_weights",
    "mix_predictions",
    "mse_sum",
    "pearson_r_torch",
    "seed_everything",
    "capture_rng_state",
    "restore_rng_state",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "save_tensors",
    "load_tensors",
    "optimizer_to_parts",
    "optimizer_from_parts",
]
