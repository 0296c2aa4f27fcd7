"""brainenc.metrics: per-voxel scores and subject-level classification / regression scores as pure
numpy functions (no torch import), and the image-reconstruction suite of MindEye2
(:mod:`brainenc.metrics.reconstruction`: PixCorr, SSIM variants, two-way identification and
feature distances; torch, torchvision and scikit-image are imported only when they run).

The noise ceiling itself comes from the data (``brainenc.datasets.noise_ceiling.noise_ceiling``).
``METRICS`` maps the names the CLI and pipeline specs use to ``fn(y_true, y_pred) -> [n_voxels]``.
"""
from brainenc.metrics.voxelwise import (
    noise_normalized,
    pearson_r,
    r2_score,
    roi_aggregate,
    split_scores,
)
from brainenc.metrics.classification import chance_level, classification_scores, regression_scores
from brainenc.metrics.scoreset import NormalizeOptions, ScoreSet, score_predictions
from brainenc.metrics.reconstruction import (
    METRIC_NAMES,
    extract_features,
    feature_metric,
    pixcorr,
    score_reconstruction_sets,
    score_reconstructions,
    ssim,
    ssim_columnwise_legacy,
    ssim_mindeye2,
    ssim_skimage,
    two_way_identification,
)
from brainenc.metrics.retrieval import feature_retrieval, similarity_matrix, top1_retrieval
from brainenc.metrics.retrieval import two_way_identification as two_way_from_similarity
from brainenc.registry import Registry

#: Image-reconstruction metric name -> (network, layer), in MindEye2's table order (network None:
#: a pixel metric); the names :func:`score_reconstructions` takes.
RECONSTRUCTION_METRICS = METRIC_NAMES

METRICS = Registry("metric")
METRICS.register("r", pearson_r, higher_is_better=True, description="per-voxel Pearson correlation")
METRICS.register("pearson_r", pearson_r, higher_is_better=True, description="per-voxel Pearson correlation")
METRICS.register("r2", r2_score, higher_is_better=True, description="per-voxel coefficient of determination")

__all__ = [
    "METRICS",
    "pearson_r",
    "r2_score",
    "noise_normalized",
    "roi_aggregate",
    "split_scores",
    "score_predictions",
    "ScoreSet",
    "NormalizeOptions",
    "classification_scores",
    "regression_scores",
    "chance_level",
    "pixcorr",
    "ssim",
    "ssim_mindeye2",
    "ssim_columnwise_legacy",
    "ssim_skimage",
    "two_way_identification",
    "feature_metric",
    "extract_features",
    "score_reconstructions",
    "score_reconstruction_sets",
    "RECONSTRUCTION_METRICS",
    "similarity_matrix",
    "top1_retrieval",
    "two_way_from_similarity",
    "feature_retrieval",
]
