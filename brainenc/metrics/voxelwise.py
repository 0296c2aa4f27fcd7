"""Per-voxel scores: Pearson r, R², noise-ceiling normalisation, ROI aggregation, split scores.

Pure numpy (no torch at import or call time). Every function takes arrays with samples on
axis 0 and voxels (targets) on axis 1 and returns one value per voxel.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from brainenc._utils.validation import check_option
from brainenc.exceptions import ConfigError, DataFormatError

__all__ = [
    "pearson_r",
    "r2_score",
    "noise_normalized",
    "roi_aggregate",
    "split_scores",
]


def _pair(y_true, y_pred, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    yt = np.asarray(y_true)
    yp = np.asarray(y_pred)
    if yt.shape != yp.shape:
        raise DataFormatError(f"'y_true' and 'y_pred' must have the same shape; got {yt.shape} and {yp.shape}")
    if yt.ndim not in (1, 2):
        raise DataFormatError(f"'y_true' must have 1 or 2 dimensions; got shape {yt.shape}")
    if yt.ndim == 2 and axis in (1, -1):
        yt, yp = yt.T, yp.T
    elif axis not in (0, -yt.ndim):
        raise ConfigError(f"'axis' must be 0 or 1; {axis!r} was provided")
    if yt.shape[0] < 2:
        raise DataFormatError(f"need at least 2 samples along axis {axis}; got {yt.shape[0]}")
    # float64 accumulation: float32 sums over thousands of samples lose digits that matter for r ~ 0.05
    return yt.astype(np.float64, copy=False), yp.astype(np.float64, copy=False)


def pearson_r(y_true, y_pred, axis: int = 0) -> np.ndarray:
    """Per-voxel Pearson correlation, vectorised over voxels.

    Parameters
    ----------
    y_true, y_pred : array of shape (n_samples, n_voxels) or (n_samples,)
        Measured and predicted responses (samples along ``axis``).
    axis : int
        Axis holding the samples (0, or 1 for [n_voxels, n_samples] input).

    Returns
    -------
    r : array of shape (n_voxels,) (a float for 1-D input)
        Correlation per voxel; NaN where either column is constant (as scipy's ``pearsonr``).
    """
    yt, yp = _pair(y_true, y_pred, axis)
    yt = yt - yt.mean(0)
    yp = yp - yp.mean(0)
    num = (yt * yp).sum(0)
    den = np.sqrt((yt * yt).sum(0) * (yp * yp).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    r = np.clip(r, -1.0, 1.0)
    return r if np.ndim(r) else float(r)


def r2_score(y_true, y_pred, axis: int = 0) -> np.ndarray:
    """Per-voxel coefficient of determination ``1 - SS_res / SS_tot``.

    Same convention as ``sklearn.metrics.r2_score(..., multioutput="raw_values")``: a constant
    ``y_true`` column scores 1.0 when predicted exactly, else 0.0.

    Parameters
    ----------
    y_true, y_pred : array of shape (n_samples, n_voxels) or (n_samples,)
    axis : int
        Axis holding the samples.

    Returns
    -------
    r2 : array of shape (n_voxels,) (a float for 1-D input)
        Can be negative (worse than predicting the mean).
    """
    yt, yp = _pair(y_true, y_pred, axis)
    ss_res = ((yt - yp) ** 2).sum(0)
    ss_tot = ((yt - yt.mean(0)) ** 2).sum(0)
    ok = ss_tot > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = np.where(ok, 1.0 - ss_res / np.where(ok, ss_tot, 1.0), np.where(ss_res == 0, 1.0, 0.0))
    return r2 if np.ndim(r2) else float(r2)


def noise_normalized(
    score,
    noise_ceiling,
    *,
    kind: str = "r",
    clip_negative: bool = True,
    nc_floor: float = 0.0,
    below_floor: str = "nan",
    cap: float | None = 1.0,
) -> np.ndarray:
    """Noise-ceiling-normalised explained variance per voxel.

    Formula (NC is a *fraction* of variance in 0..1, not a percent)::

        kind="r":   value = r**2 / NC     with r < 0 -> 0 when clip_negative (else -r**2 / NC)
        kind="r2":  value = R2   / NC     with R2 < 0 -> 0 when clip_negative
        then        value = min(value, cap)                      (cap=None: no cap)

    Voxels with ``NC <= nc_floor`` (NC = 0 with the defaults) are handled by ``below_floor``:
    ``"nan"`` gives NaN (excluded by ``roi_aggregate``), ``"floor"`` divides by ``nc_floor``
    instead (needs ``nc_floor > 0``).

    Parameters
    ----------
    score : array of shape (n_voxels,)
        Pearson r (``kind="r"``) or R² (``kind="r2"``) per voxel.
    noise_ceiling : array of shape (n_voxels,) or float
        Noise ceiling as a fraction of explainable variance in [0, 1].
    kind : {"r", "r2"}
    clip_negative : bool
        Set negative r / R² to 0 before normalising.
    nc_floor : float
        Ceilings at or below this value are treated as unreliable (see ``below_floor``).
    below_floor : {"nan", "floor"}
    cap : float or None
        Upper bound of the result (1.0 = at most the ceiling).

    Returns
    -------
    normalized : array of shape (n_voxels,)
    """
    check_option("kind", kind, ["r", "r2"])
    check_option("below_floor", below_floor, ["nan", "floor"])
    s = np.asarray(score, dtype=np.float64)
    nc = np.broadcast_to(np.asarray(noise_ceiling, dtype=np.float64), s.shape)
    finite_nc = nc[np.isfinite(nc)]
    if finite_nc.size and (finite_nc.max() > 1.0 + 1e-6 or finite_nc.min() < 0):
        raise DataFormatError(
            f"'noise_ceiling' must be a fraction in [0, 1]; got range [{finite_nc.min():.3g}, {finite_nc.max():.3g}]"
            " (NSD ships percent: divide by 100)"
        )
    if below_floor == "floor" and not nc_floor > 0:
        raise ConfigError(f"'nc_floor' must be > 0 when below_floor='floor'; {nc_floor!r} was provided")
    if kind == "r":
        val = np.sign(s) * s * s
    else:
        val = s.copy()
    if clip_negative:
        val = np.where(val < 0, 0.0, val)
    low = ~(nc > nc_floor)
    denom = np.where(low, nc_floor if below_floor == "floor" else 1.0, nc)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = val / denom
    if below_floor == "nan":
        out = np.where(low, np.nan, out)
    if cap is not None:
        out = np.where(out > cap, cap, out)
    return out


def roi_aggregate(values, masks: Mapping[str, np.ndarray], stat: str = "mean", *, min_voxels: int = 1) -> dict:
    """Summarise a per-voxel map within each ROI.

    Parameters
    ----------
    values : array of shape (n_voxels,)
        Per-voxel values; NaNs are ignored (e.g. voxels with NC = 0).
    masks : dict of str -> bool array of shape (n_voxels,)
        ROI name -> voxel mask (e.g. ``PreparedDataset.roi_masks()``).
    stat : {"mean", "median"}
    min_voxels : int
        ROIs with fewer finite voxels than this get NaN.

    Returns
    -------
    summary : dict of str -> dict
        ``{roi: {"value": float, "n_voxels": int}}`` in the order of ``masks``; ``n_voxels``
        counts the finite voxels used.
    """
    check_option("stat", stat, ["mean", "median"])
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise DataFormatError(f"'values' must have 1 dimension; got shape {v.shape}")
    fn = np.mean if stat == "mean" else np.median
    out = {}
    for name, mask in masks.items():
        m = np.asarray(mask)
        if m.dtype != bool or m.shape != v.shape:
            raise DataFormatError(f"mask {name!r} must be a bool array of shape {v.shape}; got {m.dtype} {m.shape}")
        sel = v[m]
        sel = sel[np.isfinite(sel)]
        out[name] = {"value": float(fn(sel)) if sel.size >= max(min_voxels, 1) else float("nan"), "n_voxels": int(sel.size)}
    return out


def split_scores(y_true, y_pred, splits: int | Sequence[np.ndarray] = 2, metric: str = "r") -> np.ndarray:
    """Score predictions separately on subsets of the samples (e.g. halves of the test set).

    Parameters
    ----------
    y_true, y_pred : array of shape (n_samples, n_voxels)
    splits : int or sequence of index arrays
        An int ``k`` cuts the samples into ``k`` contiguous near-equal parts (``np.array_split``);
        otherwise each entry indexes the samples of one part.
    metric : {"r", "r2"}

    Returns
    -------
    scores : array of shape (n_splits, n_voxels)
    """
    check_option("metric", metric, ["r", "r2"])
    yt = np.asarray(y_true)
    yp = np.asarray(y_pred)
    if yt.shape != yp.shape:
        raise DataFormatError(f"'y_true' and 'y_pred' must have the same shape; got {yt.shape} and {yp.shape}")
    if isinstance(splits, (int, np.integer)):
        if splits < 1 or splits > yt.shape[0] // 2:
            raise ConfigError(f"'splits' must be in [1, n_samples // 2]; {splits!r} was provided")
        parts = np.array_split(np.arange(yt.shape[0]), int(splits))
    else:
        parts = [np.asarray(p) for p in splits]
    fn = pearson_r if metric == "r" else r2_score
    return np.stack([np.atleast_1d(fn(yt[p], yp[p])) for p in parts])
