"""The networks task's report: classification scores with their fold spread, the learned ROI graph
next to the group FC and the simulated coupling, and the recovered group-difference edges.

Built from the plain files a networks run writes (``scores/summary.json``, ``scores/graphs/*.npy``);
nothing here fits a model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from brainenc._utils.io import load_npy, write_text
from brainenc.report.document import Document
from brainenc.report.figures import _figure, save_figure

__all__ = ["build_network_report", "plot_scores", "plot_matrices", "score_rows"]

#: columns of the score table (metric key, header)
SCORE_COLUMNS = (("accuracy", "accuracy"), ("balanced_accuracy", "balanced acc."), ("auroc", "AUROC"),
                 ("sensitivity", "sensitivity"), ("specificity", "specificity"))


def _pm(stat: Mapping | None) -> str:
    if not stat or not np.isfinite(stat.get("mean", np.nan)):
        return "n/a"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def score_rows(summary: Mapping) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the score table (mean ± SD over folds)."""
    models = summary["models"]
    keys = [(k, h) for k, h in SCORE_COLUMNS if any(k in m["summary"] for m in models.values())]
    headers = ["model", "kind", *[h for _, h in keys], "folds", "fit s"]
    rows = []
    for name, m in models.items():
        kind = m["kind"] + (" (pretrained)" if m.get("pretrained") else "")
        n = max(v["n_folds"] for v in m["summary"].values())
        rows.append([name, kind, *[_pm(m["summary"].get(k)) for k, _ in keys], str(n), f"{m['fit_seconds']:.1f}"])
    return headers, rows


def plot_scores(summary: Mapping, path: str | Path, metrics: Sequence[str] = ("accuracy", "balanced_accuracy", "auroc"),
                dpi: int = 110) -> Path:
    """Bars of the mean score per model and metric, fold SD as error bars, every fold as a dot, chance dashed."""
    models = list(summary["models"])
    metrics = [k for k in metrics if any(k in summary["models"][m]["summary"] for m in models)]
    fig = _figure(max(5.0, 1.2 * len(models) * len(metrics) / 2 + 2), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(metrics))
    x = np.arange(len(models))
    rng = np.random.default_rng(0)
    for j, key in enumerate(metrics):
        means = [summary["models"][m]["summary"].get(key, {}).get("mean", np.nan) for m in models]
        sds = [summary["models"][m]["summary"].get(key, {}).get("std", 0.0) for m in models]
        pos = x - 0.4 + width * (j + 0.5)
        ax.bar(pos, means, width, yerr=sds, capsize=3, label=key.replace("_", " "), alpha=0.85)
        for p, m in zip(pos, models):
            vals = [f.get(key, np.nan) for f in summary["models"][m]["folds"]]
            ax.scatter(p + rng.uniform(-width / 4, width / 4, len(vals)), vals, s=8, color="k", zorder=3)
    ax.axhline(summary["chance"], color="grey", ls="--", lw=1, label=f"chance {summary['chance']:.2f}")
    ax.set_xticks(x, models, rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (folds)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, path, dpi=dpi)


def plot_matrices(mats: Sequence[tuple[str, np.ndarray]], path: str | Path, *, names: Sequence[str] | None = None,
                  max_labels: int = 60, dpi: int = 110, cmap: str = "RdBu_r", symmetric: bool = True) -> Path:
    """Square ROI x ROI matrices side by side (diagonal blanked), one colour bar each."""
    fig = _figure(3.6 * len(mats), 3.4)
    for i, (title, m) in enumerate(mats):
        ax = fig.add_subplot(1, len(mats), i + 1)
        m = np.array(m, dtype=np.float64)
        if m.shape[0] == m.shape[1]:
            np.fill_diagonal(m, np.nan)
        lim = np.nanmax(np.abs(m)) if np.isfinite(m).any() else 1.0
        kw = {"vmin": -lim, "vmax": lim} if symmetric and np.nanmin(m) < 0 else {}
        im = ax.imshow(m, cmap=cmap if kw else "viridis", interpolation="nearest", **kw)
        ax.set_title(title, fontsize=10)
        if names is not None and len(names) <= max_labels // 2:
            ax.set_xticks(range(len(names)), names, rotation=90, fontsize=5)
            ax.set_yticks(range(len(names)), names, fontsize=5)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(im, ax=ax, shrink=0.8)
    return save_figure(fig, path, dpi=dpi)


def build_network_report(out_dir: str | Path, summary: Mapping, run_dir: str | Path, *, title: str,
                         samples: Mapping, max_rois: int = 60, dpi: int = 110) -> list[Path]:
    """Write ``index.md`` / ``index.html``, ``scores.csv`` and figures into ``out_dir``; return the files."""
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    run_dir = Path(run_dir)
    files: list[Path] = []
    doc = Document(f"{title}: network classification report")
    counts = np.bincount(np.asarray(samples["labels"]), minlength=len(samples["label_names"]))
    doc.paragraph(f"{samples['name']}: {samples['n_samples']} samples x {samples['n_rois']} ROIs, TR "
                  f"{samples['tr']:g} s; classes " + ", ".join(f"{n} {c}" for c, n in zip(samples['label_names'], counts))
                  + f". Folds: {summary['scheme']}; chance (majority class) {summary['chance']:.3f}."
                  + (f" Positive class: {summary['positive']}." if summary.get("positive") else ""))
    doc.heading("Scores (mean ± SD over folds)")
    headers, rows = score_rows(summary)
    doc.table(headers, rows, numeric=[False, False] + [True] * (len(headers) - 2))
    csv = "\n".join(",".join(r) for r in [headers] + [[c.replace(" ± ", " +- ") for c in r] for r in rows]) + "\n"
    files.append(write_text(out / "scores.csv", csv))
    files.append(plot_scores(summary, out / "figures" / "scores.png", dpi=dpi))
    doc.image("figures/scores.png", "Mean score per model (bars: fold SD; dots: folds; dashed: chance).")

    g = summary.get("graphs", {})
    names = samples.get("roi_names")
    if g:
        doc.heading("ROI graphs")
        mats = [("group FC (mean Fisher z -> r)", load_npy(run_dir / g["group_fc"]))]
        if "learned_graph" in g:
            lg = load_npy(run_dir / g["learned_graph"])
            mats.append(("BrainMAE static graph A", (lg + lg.T) / 2))
        if "truth" in g:
            mats.append(("simulated coupling (controls)", load_npy(run_dir / g["truth"]["coupling_control"])))
        files.append(plot_matrices(mats, out / "figures" / "graphs.png", names=names, max_labels=max_rois, dpi=dpi))
        doc.image("figures/graphs.png", "The learned ROI graph (symmetrised, mean over folds) next to the group "
                                        "functional connectivity" + (" and the simulated ground truth." if "truth" in g else "."))
        if g.get("similarity"):
            doc.table(["comparison", "Spearman r (off-diagonal)"],
                      [[k.replace("_", " "), f"{v:.3f}"] for k, v in g["similarity"].items()], numeric=[False, True])
    if "edge_recovery" in g:
        er = g["edge_recovery"]
        doc.heading("Group-difference edges")
        doc.paragraph("Welch t-test of every edge's Fisher-z FC between the groups, Benjamini-Hochberg FDR "
                      f"q < {summary.get('edge_alpha', 0.05)}, against the simulated difference edges "
                      f"(effect size {g['truth']['effect_size']:.3f}).")
        keys = [k for k in ("n_true", "n_detected", "precision", "recall", "f1", "auroc") if k in er]
        doc.table(keys, [[f"{er[k]:.3f}" if isinstance(er[k], float) and not float(er[k]).is_integer() else
                          f"{er[k]:g}" for k in keys]], numeric=[True] * len(keys))
        t = load_npy(run_dir / g["truth"]["edge_t"])
        det = load_npy(run_dir / g["truth"]["edges_detected"]).astype(float)
        true = load_npy(run_dir / g["truth"]["edges_true"]).astype(float)
        files.append(plot_matrices([("t (patients - controls)", t), ("detected (FDR)", det), ("true difference", true)],
                                   out / "figures" / "edges.png", names=names, max_labels=max_rois, dpi=dpi))
        doc.image("figures/edges.png", "Edge t-values, the FDR-detected edges and the simulated ones.")
    files += doc.write(out / "index.md", out / "index.html")
    return files
