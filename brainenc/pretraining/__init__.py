"""Self-supervised pretraining on fMRI time series (BrainMAE) and the classical network baselines.

Estimators here take subject- or segment-level ROI time series (``[n_timepoints, n_rois]`` each) and
follow the package's estimator contract (sklearn parameters, ``save_pretrained`` / ``from_pretrained``).
"""
