"""Per-ROI score tables (CSV + Markdown), one row per ROI, models side by side.

The inputs are plain arrays: per-model, per-voxel scores, ROI masks and the noise ceiling.
Aggregation goes through :func:`brainenc.metrics.roi_aggregate`, so NaN voxels (e.g. the
noise-normalised score of a voxel with NC = 0) are ignored the same way everywhere.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from brainenc._utils.io import write_text
from brainenc.exceptions import DataFormatError
from brainenc.metrics import roi_aggregate

__all__ = ["roi_table", "table_columns", "write_roi_table", "markdown_table", "csv_text"]

#: per-model columns: (metric key in the scores mapping, statistic, column suffix, header)
MODEL_COLUMNS = (
    ("r", "mean", "r_mean", "mean r"),
    ("r", "median", "r_median", "median r"),
    ("r2", "mean", "r2_mean", "mean R²"),
    ("nc_norm", "mean", "nc_norm_mean", "NC-norm"),
)


def roi_table(
    scores: Mapping[str, Mapping[str, np.ndarray]],
    roi_masks: Mapping[str, np.ndarray],
    noise_ceiling: np.ndarray | None = None,
) -> list[dict]:
    """Summarise per-voxel scores within each ROI, models side by side.

    Parameters
    ----------
    scores : dict of model name -> dict of metric -> array of shape (n_voxels,)
        Metrics used when present: ``"r"`` (Pearson r), ``"r2"`` (R²) and ``"nc_norm"``
        (noise-normalised score); missing metrics give NaN columns.
    roi_masks : dict of ROI name -> bool array of shape (n_voxels,)
    noise_ceiling : array of shape (n_voxels,), optional
        Noise ceiling as a fraction of variance (0..1); its ROI mean goes in ``nc_mean``.

    Returns
    -------
    rows : list of dict
        One dict per ROI with keys ``roi``, ``n_voxels``, ``nc_mean`` and, per model ``m``,
        ``m:r_mean``, ``m:r_median``, ``m:r2_mean``, ``m:nc_norm_mean`` (floats, NaN if unavailable).
    """
    masks = {k: np.asarray(v, dtype=bool) for k, v in roi_masks.items()}
    n_vox = None
    for m in masks.values():
        n_vox = m.shape[0] if n_vox is None else n_vox
        if m.shape != (n_vox,):
            raise DataFormatError(f"ROI masks must all have shape ({n_vox},); got {m.shape}")
    rows = [{"roi": name, "n_voxels": int(m.sum())} for name, m in masks.items()]
    if noise_ceiling is not None:
        nc = roi_aggregate(np.asarray(noise_ceiling, dtype=np.float64), masks, "mean")
        for row in rows:
            row["nc_mean"] = nc[row["roi"]]["value"]
    else:
        for row in rows:
            row["nc_mean"] = float("nan")
    for model, metrics in scores.items():
        for metric, stat, suffix, _ in MODEL_COLUMNS:
            col = f"{model}:{suffix}"
            if metric in metrics:
                values = np.asarray(metrics[metric], dtype=np.float64)
                if n_vox is not None and values.shape != (n_vox,):
                    raise DataFormatError(f"scores[{model!r}][{metric!r}] must have shape ({n_vox},); got {values.shape}")
                agg = roi_aggregate(values, masks, stat)
                for row in rows:
                    row[col] = agg[row["roi"]]["value"]
            else:
                for row in rows:
                    row[col] = float("nan")
    return rows


def table_columns(rows: Sequence[Mapping]) -> list[str]:
    """Column names of ``rows`` in a stable order (roi, n_voxels, nc_mean, then model columns)."""
    cols: list[str] = []
    for row in rows:
        for k in row:
            if k not in cols:
                cols.append(k)
    return cols


def _fmt(v, digits: int = 3) -> str:
    if isinstance(v, (float, np.floating)):
        return "—" if not math.isfinite(float(v)) else f"{float(v):.{digits}f}"
    return str(v)


def csv_text(rows: Sequence[Mapping]) -> str:
    """``rows`` as CSV text (full precision; NaN written as an empty field)."""
    cols = table_columns(rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for row in rows:
        out = []
        for c in cols:
            v = row.get(c, "")
            if isinstance(v, (float, np.floating)):
                out.append("" if not math.isfinite(float(v)) else repr(float(v)))
            else:
                out.append(v)
        w.writerow(out)
    return buf.getvalue()


def markdown_table(rows: Sequence[Mapping], digits: int = 3) -> str:
    """``rows`` as a GitHub Markdown table; model columns titled ``model mean r`` etc."""
    cols = table_columns(rows)
    names = {"roi": "ROI", "n_voxels": "n voxels", "nc_mean": "noise ceiling"}
    headers = []
    for c in cols:
        if c in names:
            headers.append(names[c])
        elif ":" in c:
            model, suffix = c.split(":", 1)
            title = next((h for _, _, s, h in MODEL_COLUMNS if s == suffix), suffix)
            headers.append(f"{model} {title}")
        else:
            headers.append(c)
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if c == "roi" else "---:" for c in cols) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, ""), digits) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def write_roi_table(rows: Sequence[Mapping], csv_path: str | Path, md_path: str | Path | None = None) -> list[Path]:
    """Write ``rows`` as CSV (and Markdown when ``md_path`` is given), atomically.

    Returns
    -------
    list of Path
        The files written.
    """
    out = [write_text(csv_path, csv_text(rows))]
    if md_path is not None:
        out.append(write_text(md_path, markdown_table(rows)))
    return out
