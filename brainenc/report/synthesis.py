"""The synthesize task's report: the evaluation table (held-out encoder, guided vs unguided images of the
same seeds, natural images), one image grid per objective and a bar figure.

Built from what a synthesize run wrote (``evaluate/table.json`` and the image arrays); nothing here
samples or scores anything.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from brainenc.report.document import Document
from brainenc.report.figures import _figure, save_figure

__all__ = ["build_synthesis_report", "plot_synthesis_grid", "plot_guidance_effect"]


def plot_synthesis_grid(rows: Mapping[str, np.ndarray], path: str | Path, *, n_show: int = 10,
                        seeds=None, dpi: int = 110) -> Path:
    """One row per image set (e.g. guided, unguided), one column per seed (the first ``n_show``)."""
    names = list(rows)
    n = min(n_show, min(len(v) for v in rows.values()))
    fig = _figure(1.1 * n + 1.2, 1.2 * len(names) + 0.4)
    for i, name in enumerate(names):
        for j in range(n):
            ax = fig.add_subplot(len(names), n, i * n + j + 1)
            ax.imshow(rows[name][j], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=8)
            if i == 0 and seeds is not None:
                ax.set_title(f"seed {int(seeds[j])}", fontsize=7)
    return save_figure(fig, path, dpi=dpi)


def plot_guidance_effect(res: Mapping, path: str | Path, *, dpi: int = 110) -> Path:
    """Held-out encoder objective per objective: guided, unguided, guided top, natural top (mean ± sd)."""
    names = list(res["objectives"])
    kinds = [("guided", "guided"), ("unguided", "unguided"), ("guided_kept", "guided, re-ranked top"),
             ("natural_top_measured", "natural top (measured)"), ("natural_all", "natural, all")]
    fig = _figure(max(4.0, 1.3 * len(names) + 1.5), 3.2)
    ax = fig.add_subplot(1, 1, 1)
    w = 0.8 / len(kinds)
    x = np.arange(len(names))
    for k, (key, label) in enumerate(kinds):
        m = [res["objectives"][n]["heldout"][key]["mean"] for n in names]
        sd = [res["objectives"][n]["heldout"][key]["sd"] for n in names]
        ax.bar(x + (k - (len(kinds) - 1) / 2) * w, m, w, yerr=sd, label=label, capsize=2)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(x)
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel("held-out encoder objective")
    ax.legend(fontsize=7, frameon=False)
    return save_figure(fig, path, dpi=dpi)


def build_synthesis_report(out_dir: str | Path, res: Mapping, images: Mapping[str, np.ndarray], *, unguided: str,
                           title: str, subject: str, encoders: Mapping, synthesis: Mapping, n_show: int = 10,
                           dpi: int = 110, scale: float | None = None, steps: int | None = None) -> list[Path]:
    """Write ``index.md`` / ``index.html``, ``figures/effect.png`` and ``figures/grid_<objective>.png``."""
    out = Path(out_dir)
    files: list[Path] = []
    doc = Document(f"{title}: brain-guided synthesis, {subject}")
    g, h = encoders["guide"], encoders["heldout"]
    prior = synthesis.get("prior", {})
    ident = prior.get("identity", {})
    doc.paragraph(
        f"{res['n']} images per objective from the diffusion prior ({prior.get('kind', '?')}: "
        f"{ident.get('file', ident.get('folder', ''))}, {prior.get('image_size', '?')} px), guided by a ridge encoder on "
        f"{g['features'].get('backbone')} {g['features'].get('layer')} ({g['inputs']['features']}; "
        f"{g['n_train']} training images; test r {g['test_r_mean']:.3f}) with scale {scale} over {steps} steps, "
        "and the same seeds without guidance (the control). Every number in the table is the objective "
        f"predicted by a **held-out encoder** ({h['features'].get('backbone')} {h['features'].get('layer')}, "
        f"{h['inputs']['features']}{', grid ' + str(h['inputs']['grid_pool']) if h['inputs']['grid_pool'] else ''}; "
        f"{h['n_train']} other training images; test r {h['test_r_mean']:.3f}), not by the encoder that guided "
        "the sampling, except the last column.")
    doc.heading("Held-out encoder objective")
    headers, rows = list(res["headers"]), [list(r) for r in res["rows"]]
    doc.table(headers, rows, numeric=[False] + [True] * (len(headers) - 1))
    doc.paragraph(f"mean ± sd over images; paired diff = guided − unguided per seed; Wilcoxon signed-rank p of "
                  f"that pairing. 'top {res['keep_fraction']:.0%}': images kept after re-ranking by the guiding "
                  f"encoder (BrainDiVE); 'natural top': the {res['natural_split']} images with the highest measured "
                  f"response of the objective ({res['n_natural']} images in all).")
    zs = {k: v["clip_zero_shot"] for k, v in res["objectives"].items() if v.get("clip_zero_shot")}
    if zs:
        doc.heading("CLIP zero-shot category")
        kinds = ("guided_kept", "guided", "unguided", "natural_top_measured")
        zrows = []
        for k, z in zs.items():
            cells = [f"{z[c]['category_fraction']:.2f}" if z[c]["category_fraction"] is not None else "—"
                     for c in kinds]
            zrows.append([k, str(z["category"])] + cells)
        doc.table(["objective", "category", "guided top", "guided", "unguided", "natural top"], zrows,
                  numeric=[False, False, True, True, True, True])
        w = next(iter(zs.values()))["weights"]
        doc.paragraph("Fraction of images whose CLIP zero-shot class (" + ", ".join(next(iter(zs.values()))["labels"])
                      + ") is the objective's category. " + ("CLIP has **random weights** here: the numbers test "
                                                             "the plumbing only." if w == "random" else
                                                             f"CLIP weights: {w}."))
    files.append(plot_guidance_effect(res, out / "figures" / "effect.png", dpi=dpi))
    doc.image("figures/effect.png", "Held-out encoder objective per objective (mean ± sd).")
    doc.heading("Images")
    ung = images[unguided]
    for name in res["objectives"]:
        rec = res["objectives"][name]
        p = plot_synthesis_grid({"guided": images[name], "unguided": ung}, out / "figures" / f"grid_{name}.png",
                                n_show=n_show, dpi=dpi)
        files.append(p)
        doc.image(f"figures/grid_{name}.png",
                  f"{name}: guided (top row) and unguided (bottom row) images of the same seeds; re-ranking "
                  f"keeps seeds {rec['kept_seeds']}.")
    files += doc.write(out / "index.md", out / "index.html")
    return files
