"""Self-supervised pretraining on fMRI time series (BrainMAE), the classical network baselines
(Dey et al. 2012 network PCA-LDA, FC classifiers) and subject-level cross-validation.

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

from brainenc.pretraining.baselines import (
    BASELINES,
    AdaptivePCA,
    ConnectivityFeatures,
    MeanActivity,
    NetworkFeatures,
    correlation_matrices,
    fc_classifier,
    make_baseline,
    mean_classifier,
    network_pca_lda,
    network_pca_ridge,
    node_features,
    threshold_networks,
)
from brainenc.pretraining.evaluation import (
    FOLD_SCHEMES,
    CVResult,
    cross_validate,
    edge_recovery,
    graph_similarity,
    make_folds,
)

__all__ = ["BASELINES", "AdaptivePCA", "ConnectivityFeatures", "MeanActivity", "NetworkFeatures",
           "correlation_matrices", "fc_classifier", "make_baseline", "mean_classifier", "network_pca_lda",
           "network_pca_ridge", "node_features", "threshold_networks", "FOLD_SCHEMES", "CVResult", "cross_validate",
           "edge_recovery", "graph_similarity", "make_folds","BrainMAE", "BrainMAEClassifier", "BrainMAERegressor", "BrainMAEObjective", "SupervisedSegments",
           "segment_series", "segment_length", "prepare_series", "draw_roi_mask", "TRAIN_DEFAULTS"]
