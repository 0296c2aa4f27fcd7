"""ncsnr and noise ceilings (nsd_format.md §1.8).

Definitions (cvnlab/nsddatapaper ``export_noiseceiling.m``; Allen et al. 2022):

1. z-score each voxel's betas within each session over all its trials (MATLAB ``calczscore``, i.e.
   ``std`` with ddof 1 — what the release's ncsnr files use);
2. keep only images shown **exactly 3 times**;
3. ``v = sqrt(nanmean_images(var_ddof1(3 trials)))``;
4. ``ncsnr = sqrt(max(0, 1 - v**2)) / v``.

Noise ceiling of a response averaged over ``n`` trials: ``NC = ncsnr**2 / (ncsnr**2 + 1/n)``; with mixed
repeat counts, ``1/n`` becomes the mean of ``1/n_i`` over the evaluated images
(``(A/3 + B/2 + C/1) / (A + B + C)``). brainenc returns **fractions** (0..1) like Algonauts;
:func:`noise_ceiling_percent` gives the percentage the NSD paper reports.
"""
from __future__ import annotations

import numpy as np

from brainenc.exceptions import DataFormatError

__all__ = [
    "zscore_sessions",
    "ncsnr_from_variance",
    "ncsnr_from_repeats",
    "repeat_norm",
    "noise_ceiling",
    "noise_ceiling_percent",
]


def zscore_sessions(betas: np.ndarray, sessions: np.ndarray, ddof: int = 0) -> np.ndarray:
    """z-score each column within each session (constant columns become 0).

    Parameters
    ----------
    betas : ndarray, shape (n_trials, n_voxels)
    sessions : ndarray of int, shape (n_trials,)
    ddof : int
        0 as sklearn ``StandardScaler`` (response z-scoring), 1 as MATLAB ``std`` (the ncsnr recipe).

    Returns
    -------
    ndarray of float64, shape (n_trials, n_voxels)
    """
    betas = np.asarray(betas, dtype=np.float64)
    sessions = np.asarray(sessions)
    out = np.empty_like(betas)
    for s in np.unique(sessions):
        rows = sessions == s
        m = betas[rows].mean(axis=0)
        sd = betas[rows].std(axis=0, ddof=ddof)
        sd[sd == 0] = 1.0
        out[rows] = (betas[rows] - m) / sd
    return out


def ncsnr_from_variance(mean_var: np.ndarray) -> np.ndarray:
    """``ncsnr = sqrt(max(0, 1 - v**2)) / v`` with ``v**2 = mean_var`` (z-scored units).

    Parameters
    ----------
    mean_var : ndarray, shape (n_voxels,)
        Mean over 3-repeat images of the ddof-1 variance of their 3 z-scored trials.

    Returns
    -------
    ndarray of float64, shape (n_voxels,)
        ``inf`` where ``mean_var == 0``; NaN where ``mean_var`` is NaN.
    """
    v2 = np.asarray(mean_var, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt(np.maximum(0.0, 1.0 - v2)) / np.sqrt(v2)


def ncsnr_from_repeats(betas: np.ndarray, image_ids: np.ndarray, sessions: np.ndarray | None = None) -> np.ndarray:
    """ncsnr of single-trial betas per the NSD recipe.

    Parameters
    ----------
    betas : ndarray, shape (n_trials, n_voxels)
        Single-trial betas (any scale).
    image_ids : ndarray of int, shape (n_trials,)
    sessions : ndarray of int, shape (n_trials,), optional
        When given, betas are z-scored within session first (step 1, ddof 1); pass None if already z-scored.

    Returns
    -------
    ndarray of float64, shape (n_voxels,)

    Raises
    ------
    DataFormatError
        No image has exactly 3 trials.
    """
    betas = np.asarray(betas, dtype=np.float64)
    image_ids = np.asarray(image_ids)
    z = zscore_sessions(betas, sessions, ddof=1) if sessions is not None else betas
    uniq, inverse, counts = np.unique(image_ids, return_inverse=True, return_counts=True)
    keep = np.nonzero(counts == 3)[0]
    if keep.size == 0:
        raise DataFormatError("ncsnr needs images shown exactly 3 times; found none")
    order = np.argsort(inverse, kind="stable")
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    rows = order[(starts[keep][:, None] + np.arange(3)[None, :])]  # (n_keep, 3)
    trip = z[rows]  # (n_keep, 3, n_voxels)
    var = trip.var(axis=1, ddof=1)
    return ncsnr_from_variance(np.nanmean(var, axis=0))


def repeat_norm(n_repeats: np.ndarray | int) -> float:
    """The ``1/n`` term for responses averaged over ``n_repeats`` trials (mean of ``1/n_i``).

    Parameters
    ----------
    n_repeats : int or ndarray of int, shape (n_images,)
        Trials averaged per evaluated image; e.g. A images x3, B x2, C x1 gives
        ``(A/3 + B/2 + C/1) / (A + B + C)``.
    """
    n = np.atleast_1d(np.asarray(n_repeats, dtype=np.float64))
    if n.size == 0 or (n < 1).any():
        raise DataFormatError(f"repeat counts must be >= 1 and non-empty; found {n[:5]}")
    return float(np.mean(1.0 / n))


def noise_ceiling(ncsnr: np.ndarray, n_repeats: np.ndarray | int = 1) -> np.ndarray:
    """Noise ceiling as a **fraction** of explainable variance: ``ncsnr**2 / (ncsnr**2 + norm)``.

    Parameters
    ----------
    ncsnr : ndarray, shape (n_voxels,)
    n_repeats : int or ndarray of int, shape (n_images,)
        Repeat structure of the evaluated responses (see :func:`repeat_norm`).

    Returns
    -------
    ndarray of float64, shape (n_voxels,)
        In [0, 1]; NaN where ncsnr is NaN, 1 where ncsnr is inf.
    """
    s2 = np.asarray(ncsnr, dtype=np.float64) ** 2
    norm = repeat_norm(n_repeats)
    with np.errstate(invalid="ignore"):
        out = s2 / (s2 + norm)
    out[np.isinf(s2)] = 1.0
    return out


def noise_ceiling_percent(ncsnr: np.ndarray, n_repeats: np.ndarray | int = 1) -> np.ndarray:
    """:func:`noise_ceiling` × 100 (the NSD paper's ``NC = 100 · ncsnr² / (ncsnr² + 1/n)``)."""
    return 100.0 * noise_ceiling(ncsnr, n_repeats)
