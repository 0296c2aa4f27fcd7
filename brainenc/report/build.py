"""Assemble a run report from plain arrays: tables, maps, figures and ``index.md`` / ``index.html``.

:func:`build_report` is what the pipeline's ``report`` stage calls, but it only needs arrays, a
geometry dict and ROI masks, so it works on any scores (a notebook, another pipeline).
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from brainenc._utils.io import write_json
from brainenc._utils.logging import get_logger
from brainenc.exceptions import ConfigError
from brainenc.report import figures, maps, tables
from brainenc.report.document import Document

__all__ = ["ReportOptions", "ReportInputs", "build_report"]

log = get_logger("report")

MAP_TITLES = {"r": "Pearson r (test)", "r2": "R² (test)", "nc_norm": "noise-normalised score",
              "alpha": "best ridge alpha (log10)", "noise_ceiling": "noise ceiling (fraction of variance)"}


@dataclasses.dataclass
class ReportOptions:
    """``[report]``: what the report contains.

    Attributes
    ----------
    maps : list of str
        Per-voxel maps to write in subject space, per model: any of ``r``, ``r2``, ``nc_norm``,
        ``alpha`` (ridge models); the noise ceiling map is written once.
    figures : bool
        Draw PNG figures (bars, slice/surface maps, scatter plots).
    map_figure : str
        Which map is drawn as a figure per model.
    n_slices : int
        Axial slices in the volume mosaic.
    n_best_voxels : int
        Voxels in the predicted-vs-measured figure (best by the first model's r).
    roi_families : list of str
        ROI families tabulated (``family/name`` masks); empty = all.
    surface_plot : bool
        fsaverage maps on nilearn's bundled fsaverage5 mesh (else a flat scatter).
    html : bool
        Also write ``index.html``.
    ground_truth : bool
        Compare with the simulator's ground truth when the file exists.
    """

    maps: list[str] = dataclasses.field(default_factory=lambda: ["r", "r2", "nc_norm", "alpha"])
    figures: bool = True
    map_figure: str = "nc_norm"
    n_slices: int = 12
    n_best_voxels: int = 8
    roi_families: list[str] = dataclasses.field(default_factory=list)
    surface_plot: bool = True
    html: bool = True
    ground_truth: bool = True

    def check(self) -> None:
        allowed = {"r", "r2", "nc_norm", "alpha"}
        bad = [m for m in self.maps if m not in allowed]
        if bad:
            raise ConfigError(f"'report.maps' entries must be in {sorted(allowed)}; {bad[0]!r} was provided")
        if self.map_figure not in allowed:
            raise ConfigError(f"'report.map_figure' must be one of {sorted(allowed)}; {self.map_figure!r} was provided")
        if self.n_slices < 1 or self.n_best_voxels < 0:
            raise ConfigError("'report.n_slices' must be >= 1 and 'report.n_best_voxels' >= 0")


@dataclasses.dataclass
class ReportInputs:
    """Everything a report is made of (plain arrays and strings).

    Attributes
    ----------
    title : str
    scores : dict of model -> dict of metric -> array of shape (n_voxels,)
        Metrics ``r``, ``r2``, ``nc_norm`` and optionally ``alpha`` (best ridge alpha per voxel).
    roi_masks : dict of "family/name" -> bool array of shape (n_voxels,)
    geometry : dict
        ``PreparedDataset.geometry`` (volume: shape/affine/indices; surface: hemi/vertex).
    noise_ceiling : array of shape (n_voxels,) or None
        Fraction of variance.
    y_true : array of shape (n_test, n_voxels) or None
        Measured test responses (for the predicted-vs-measured figure).
    predictions : dict of model -> array of shape (n_test, n_voxels), optional
    summary : list of (str, str)
        Run facts shown at the top (subject, pipeline, dataset, features...).
    timings : list of (stage, status, seconds)
    config_text : str
        The resolved config, shown verbatim.
    links : list of (text, href)
        Extra files to link (relative to the report folder).
    ground_truth_path : Path, optional
        The simulator's ground-truth file; when it exists the report compares against it
        (``brainenc.report.ground_truth.compare_ground_truth``).
    model_figures : list of (caption, href)
        Figures a model made itself (e.g. routing attention maps), hrefs relative to the report folder.
    """

    title: str
    scores: Mapping[str, Mapping[str, np.ndarray]]
    roi_masks: Mapping[str, np.ndarray]
    geometry: Mapping[str, Any]
    noise_ceiling: np.ndarray | None = None
    y_true: np.ndarray | None = None
    predictions: Mapping[str, np.ndarray] | None = None
    summary: Sequence[tuple[str, str]] = ()
    timings: Sequence[tuple[str, str, float]] = ()
    config_text: str = ""
    links: Sequence[tuple[str, str]] = ()
    ground_truth_path: Path | None = None
    model_figures: Sequence[tuple[str, str]] = ()


def _fmt(v: float, digits: int = 3) -> str:
    return "—" if v is None or not math.isfinite(float(v)) else f"{float(v):.{digits}f}"


def _select_masks(masks: Mapping[str, np.ndarray], families: Sequence[str]) -> dict[str, np.ndarray]:
    out = {}
    for name, m in masks.items():
        fam = name.split("/", 1)[0]
        if families and fam not in families:
            continue
        m = np.asarray(m, dtype=bool)
        if m.any():
            out[name] = m
    return out


def _best_voxels(inputs: ReportInputs, k: int) -> tuple[np.ndarray, list[str]]:
    first = next(iter(inputs.scores))
    r = np.asarray(inputs.scores[first].get("r"), dtype=np.float64)
    r = np.where(np.isfinite(r), r, -np.inf)
    idx = np.argsort(-r)[:k]
    labels = []
    for i in idx:
        rois = [n.split("/", 1)[1] for n, m in inputs.roi_masks.items()
                if "/" in n and not n.startswith("nsdgeneral") and np.asarray(m)[i]]
        where = f" {rois[0]}" if rois else ""
        labels.append(f"voxel {i}{where} r={r[i]:.2f}")
    return idx, labels


def _map_values(scores: dict, metric: str) -> np.ndarray:
    """Per-voxel values of one metric as float64; alphas on a log10 scale (as mapped and plotted)."""
    values = np.asarray(scores[metric], dtype=np.float64)
    if metric == "alpha":
        with np.errstate(divide="ignore", invalid="ignore"):
            values = np.log10(values)
    return values


def build_report(out_dir: str | Path, inputs: ReportInputs, options: ReportOptions | None = None) -> dict:
    """Write the report folder.

    Layout::

        <out_dir>/index.md, index.html       the one-page summary linking everything
        <out_dir>/roi_table.csv, roi_table.md
        <out_dir>/maps/<model>_<metric>.nii.gz (volume) or {lh,rh}.<model>_<metric>.mgh (fsaverage)
        <out_dir>/figures/*.png
        <out_dir>/ground_truth.json           (simulated subjects only)

    Parameters
    ----------
    out_dir : path
    inputs : ReportInputs
    options : ReportOptions, optional

    Returns
    -------
    dict
        ``{"files": [paths relative to out_dir], "rows": ROI table rows, "seconds": float}``.
    """
    t0 = time.perf_counter()
    opts = options or ReportOptions()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    models = list(inputs.scores)
    masks = _select_masks(inputs.roi_masks, opts.roi_families)
    volume = maps.is_volume(inputs.geometry)

    rows = tables.roi_table(inputs.scores, masks, inputs.noise_ceiling)
    files += tables.write_roi_table(rows, out / "roi_table.csv", out / "roi_table.md")

    # ---- maps in subject space
    map_files: list[tuple[str, list[Path]]] = []
    if inputs.noise_ceiling is not None:
        map_files.append(("noise ceiling", maps.write_map(inputs.noise_ceiling, inputs.geometry, out / "maps", "noise_ceiling")))
    for model in models:
        for metric in opts.maps:
            if metric not in inputs.scores[model]:
                continue
            values = _map_values(inputs.scores[model], metric)
            map_files.append((f"{model} {MAP_TITLES[metric]}",
                              maps.write_map(values, inputs.geometry, out / "maps", f"{model}_{metric}")))
    for _, ps in map_files:
        files += ps

    # ---- figures
    figs: list[tuple[str, Path]] = []
    if opts.figures:
        bar_rows = [r for r in rows if not r["roi"].startswith("nsdgeneral")] or rows
        bar_rows = [dict(r, roi=r["roi"].split("/", 1)[-1]) for r in bar_rows]
        figs.append(("Per-ROI variance explained and noise-normalised score (noise ceiling marked)",
                     figures.plot_roi_bars(bar_rows, models, out / "figures" / "roi_bars.png",
                                           title=inputs.title)))
        for model in models:
            metric = opts.map_figure
            if metric not in inputs.scores[model]:
                continue
            values = _map_values(inputs.scores[model], metric)
            title = f"{model}: {MAP_TITLES[metric]}"
            if volume:
                vmax = 1.0 if metric == "nc_norm" else None
                figs.append((title, figures.plot_volume_mosaic(values, inputs.geometry, out / "figures" / f"{model}_{metric}_slices.png",
                                                               title=title, n_slices=opts.n_slices, vmax=vmax)))
                glass = figures.plot_glass_brain(values, inputs.geometry, out / "figures" / f"{model}_{metric}_glass.png", title=title)
                if glass is not None:
                    figs.append((title + " (glass brain)", glass))
            elif opts.surface_plot:
                figs.append((title, figures.plot_surface_map(values, inputs.geometry, out / "figures" / f"{model}_{metric}_surface.png",
                                                             title=title, vmax=1.0 if metric == "nc_norm" else None)))
        if inputs.noise_ceiling is not None and volume:
            figs.append(("Noise ceiling", figures.plot_volume_mosaic(inputs.noise_ceiling, inputs.geometry,
                                                                    out / "figures" / "noise_ceiling_slices.png",
                                                                    title="noise ceiling", n_slices=opts.n_slices, vmax=1.0)))
        if inputs.y_true is not None and inputs.predictions and opts.n_best_voxels > 0 and models:
            idx, labels = _best_voxels(inputs, opts.n_best_voxels)
            order = np.sort(idx)  # memmaps read faster in order
            pos = np.searchsorted(order, idx)
            yt = np.asarray(inputs.y_true[:, order])[:, pos]
            yp = {m: np.asarray(p[:, order])[:, pos] for m, p in inputs.predictions.items()}
            figs.append((f"Predicted vs measured test responses, best {len(idx)} voxels of {models[0]}",
                         figures.plot_pred_vs_measured(yt, yp, labels, out / "figures" / "pred_vs_measured.png")))
    files += [p for _, p in figs]

    # ---- ground truth (simulated subjects)
    gt = None
    if opts.ground_truth and inputs.ground_truth_path is not None and Path(inputs.ground_truth_path).exists():
        from brainenc.report.ground_truth import compare_ground_truth

        gt = compare_ground_truth(inputs.ground_truth_path, inputs.scores, inputs.geometry,
                                  inputs.noise_ceiling, out, make_figures=opts.figures)
        files += [out / f for f in gt["files"]]

    # ---- the page
    doc = Document(inputs.title)
    if inputs.summary:
        doc.heading("Run")
        doc.table(["", ""], [(k, v) for k, v in inputs.summary])
    doc.heading("Per-ROI scores")
    doc.paragraph("Held-out test split. r: Pearson correlation; R²: coefficient of determination; noise ceiling: "
                  "fraction of explainable variance; NC-norm: noise-normalised score (1 = at the ceiling). "
                  "Means over the ROI's voxels (voxels without a ceiling excluded from NC-norm).")
    cols = tables.table_columns(rows)
    md_lines = tables.markdown_table(rows).splitlines()
    headers = [h.strip() for h in md_lines[0].strip("|").split("|")]
    doc.table(headers, [[tables._fmt(r.get(c, "")) for c in cols] for r in rows],
              numeric=[c != "roi" for c in cols])
    doc.links([("roi_table.csv", "roi_table.csv"), ("roi_table.md", "roi_table.md")])
    if gt is not None:
        doc.heading("Comparison with the simulator's ground truth")
        for line in gt["text"]:
            doc.paragraph(line)
        if gt["table"]:
            doc.table(gt["table"][0], gt["table"][1:], numeric=[False] + [True] * (len(gt["table"][0]) - 1))
        for caption, rel in gt["figures"]:
            doc.image(rel, caption)
    if inputs.model_figures:
        doc.heading("Interpretation")
        for caption, href in inputs.model_figures:
            doc.image(href, caption)
    if figs:
        doc.heading("Figures")
        for caption, p in figs:
            doc.image(str(p.relative_to(out)), caption)
    doc.heading("Maps in subject space")
    doc.paragraph("NIfTI (volume) or FreeSurfer MGH per hemisphere (fsaverage); 0 outside the analysed voxels. "
                  "Open with any viewer (FSLeyes, freeview, nilearn).")
    doc.links([(f"{title}: {p.name}", str(p.relative_to(out))) for title, ps in map_files for p in ps])
    if inputs.timings:
        doc.heading("Stages")
        doc.table(["stage", "status", "seconds"],
                  [(s, st, f"{sec:.1f}") for s, st, sec in inputs.timings], numeric=[False, False, True])
    if inputs.links:
        doc.heading("Run files")
        doc.links(list(inputs.links))
    if inputs.config_text:
        doc.heading("Resolved config")
        doc.pre(inputs.config_text)
    files += doc.write(out / "index.md", out / "index.html" if opts.html else None)
    seconds = time.perf_counter() - t0
    write_json(out / "report.json", {"rows": rows, "seconds": round(seconds, 3),
                                     "ground_truth": None if gt is None else gt["summary"]})
    files.append(out / "report.json")
    log.debug("report written in %.1f s", seconds)
    return {"files": [str(Path(p).relative_to(out)) for p in files], "rows": rows, "seconds": seconds}
