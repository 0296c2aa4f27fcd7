"""Scoring several models' predictions in one call: :func:`score_predictions` -> :class:`ScoreSet`.

A ``ScoreSet`` holds, per model, per-voxel metric arrays (``r``, ``r2``, any registered metric and
``nc_norm``, the noise-ceiling-normalised score), the noise ceiling, ROI masks and the options the
normalisation used. It is what a pipeline's evaluate stage writes and what ``brainenc.report``
reads; notebooks build one from arrays the same way.

On disk (``ScoreSet.save(folder)``)::

    noise_ceiling.npy              float32 [n_voxels]
    <model>/<metric>.npy           float32 [n_voxels]
    summary.json                   split, n_test, options, model_order, per model per metric: mean,
                                   median, ROI means
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from brainenc._utils.io import load_npy, read_json, save_npy, write_json
from brainenc._utils.validation import check_option
from brainenc.exceptions import DataFormatError
from brainenc.metrics.voxelwise import noise_normalized, pearson_r, r2_score, roi_aggregate

__all__ = ["NormalizeOptions", "ScoreSet", "score_predictions"]


@dataclasses.dataclass(frozen=True)
class NormalizeOptions:
    """How scores are divided by the noise ceiling (see :func:`brainenc.metrics.noise_normalized`).

    Attributes
    ----------
    normalize : {"r", "r2"}
        Which score is normalised (``"r"`` means r², sign kept).
    clip_negative : bool
    nc_floor : float
    below_floor : {"nan", "floor"}
    cap : float or None
    """

    normalize: str = "r"
    clip_negative: bool = True
    nc_floor: float = 0.0
    below_floor: str = "nan"
    cap: float | None = 1.0


@dataclasses.dataclass
class ScoreSet:
    """Per-voxel scores of several models on one split.

    Attributes
    ----------
    split : str
    n_samples : int
        Rows scored.
    noise_ceiling : ndarray float32 [n_voxels]
    scores : dict model -> dict metric -> ndarray float32 [n_voxels]
    roi_masks : dict name -> bool [n_voxels]
    options : NormalizeOptions
    """

    split: str
    n_samples: int
    noise_ceiling: np.ndarray
    scores: dict[str, dict[str, np.ndarray]]
    roi_masks: dict[str, np.ndarray]
    options: NormalizeOptions = dataclasses.field(default_factory=NormalizeOptions)

    @property
    def models(self) -> list[str]:
        return list(self.scores)

    def summary(self) -> dict[str, Any]:
        """Plain-data summary: split, n_test and per model per metric mean, median and ROI means."""
        out: dict[str, Any] = {"split": self.split, "n_test": int(self.n_samples), "models": {}}
        for model, metrics in self.scores.items():
            model_sum = {}
            for metric, values in metrics.items():
                fin = values[np.isfinite(values)]
                model_sum[metric] = {
                    "mean": float(fin.mean()) if fin.size else float("nan"),
                    "median": float(np.median(fin)) if fin.size else float("nan"),
                    "rois": {k: v["value"] for k, v in roi_aggregate(values, self.roi_masks, "mean").items()},
                }
            out["models"][model] = model_sum
        return out

    def save(self, folder: str | Path) -> list[Path]:
        """Write the arrays and ``summary.json`` under ``folder`` (atomically, file by file).

        Returns
        -------
        list of Path
            Every written file, ``summary.json`` last.
        """
        folder = Path(folder)
        files = [save_npy(folder / "noise_ceiling.npy", np.asarray(self.noise_ceiling, dtype=np.float32))]
        for model, metrics in self.scores.items():
            for metric, values in metrics.items():
                files.append(save_npy(folder / model / f"{metric}.npy", np.asarray(values, dtype=np.float32)))
        summary = self.summary()
        summary["options"] = dataclasses.asdict(self.options)
        summary["model_order"] = self.models  # JSON objects are written with sorted keys
        files.append(write_json(folder / "summary.json", summary))
        return files

    @classmethod
    def load(cls, folder: str | Path, roi_masks: Mapping[str, np.ndarray]) -> "ScoreSet":
        """Read a ScoreSet written by :meth:`save` (ROI masks come from the dataset)."""
        folder = Path(folder)
        summary = read_json(folder / "summary.json")
        try:
            models = list(summary.get("model_order") or summary["models"])
            opts = NormalizeOptions(**summary.get("options", {}))
            split, n = summary["split"], int(summary["n_test"])
        except (KeyError, TypeError) as exc:
            raise DataFormatError(f"{folder / 'summary.json'}: not a score summary ({exc})") from None
        scores = {m: {p.stem: load_npy(p) for p in sorted((folder / m).glob("*.npy"))} for m in models}
        return cls(split=split, n_samples=n, noise_ceiling=load_npy(folder / "noise_ceiling.npy"),
                   scores=scores, roi_masks=dict(roi_masks), options=opts)


def score_predictions(y_true, predictions: Mapping[str, Any], noise_ceiling, *, roi_masks: Mapping[str, np.ndarray],
                      metrics: Sequence[str] = ("r", "r2"), split: str = "test",
                      options: NormalizeOptions | None = None) -> ScoreSet:
    """Score each model's predictions per voxel and normalise by the noise ceiling.

    Parameters
    ----------
    y_true : array of shape (n_samples, n_voxels)
        Measured responses of the scored split.
    predictions : dict model -> array of shape (n_samples, n_voxels)
    noise_ceiling : array of shape (n_voxels,)
        Fraction of explainable variance (0..1), e.g. ``PreparedDataset.noise_ceiling``.
    roi_masks : dict name -> bool array (n_voxels,)
    metrics : sequence of str
        Extra metric names from :data:`brainenc.metrics.METRICS`; ``r`` and ``r2`` are always computed.
    split : str
        Name of the scored split (recorded).
    options : NormalizeOptions, optional

    Returns
    -------
    ScoreSet
        Per model: ``r``, ``r2``, the extra metrics and ``nc_norm``.
    """
    from brainenc.metrics import METRICS

    opts = options or NormalizeOptions()
    check_option("normalize", opts.normalize, ["r", "r2"])
    y = np.asarray(y_true, dtype=np.float32)
    nc = np.asarray(noise_ceiling, dtype=np.float32)
    if y.ndim != 2 or nc.shape != (y.shape[1],):
        raise DataFormatError(f"'y_true' must be [n_samples, n_voxels] and 'noise_ceiling' [n_voxels]; "
                              f"got {y.shape} and {nc.shape}")
    scores: dict[str, dict[str, np.ndarray]] = {}
    for model, pred in predictions.items():
        pred = np.asarray(pred)
        if pred.shape != y.shape:
            raise DataFormatError(f"predictions of {model!r} have shape {pred.shape}; expected {y.shape}")
        s = {"r": pearson_r(y, pred), "r2": r2_score(y, pred)}
        for m in metrics:
            if m not in s and m != "pearson_r":
                s[m] = METRICS.get(m)(y, pred)
        base = s["r"] if opts.normalize == "r" else s["r2"]
        s["nc_norm"] = noise_normalized(base, nc, kind=opts.normalize, clip_negative=opts.clip_negative,
                                        nc_floor=opts.nc_floor, below_floor=opts.below_floor, cap=opts.cap)
        scores[model] = {k: np.asarray(v, dtype=np.float32) for k, v in s.items()}
    return ScoreSet(split=split, n_samples=int(y.shape[0]), noise_ceiling=nc, scores=scores,
                    roi_masks=dict(roi_masks), options=opts)
