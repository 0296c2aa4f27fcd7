"""Self-supervised pretraining on fMRI time series (BrainMAE) and, to come, the classical network baselines.

Estimators here take subject- or segment-level ROI time series (``[n_timepoints, n_rois]`` each) and
follow the package's estimator contract (sklearn parameters, ``save_pretrained`` / ``from_pretrained``,
``brainenc.load``). Importing this package imports torch.
"""
from brainenc.pretraining.brainmae import (
    TRAIN_DEFAULTS,
    BrainMAE,
    BrainMAEClassifier,
    BrainMAEObjective,
    BrainMAERegressor,
    SupervisedSegments,
    draw_roi_mask,
    prepare_series,
    segment_length,
    segment_series,
)

__all__ = ["BrainMAE", "BrainMAEClassifier", "BrainMAERegressor", "BrainMAEObjective", "SupervisedSegments",
           "segment_series", "segment_length", "prepare_series", "draw_roi_mask", "TRAIN_DEFAULTS"]
