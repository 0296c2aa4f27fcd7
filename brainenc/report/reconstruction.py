"""The reconstruct task's report: the metric table (model and shuffled-voxels control), a figure
grid of seen / reconstructed images, and one PNG strip per test image.

Built from what a reconstruct run wrote (``evaluate/metrics.json`` and the image arrays); nothing
here fits or scores anything.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from brainenc._utils.io import write_text
from brainenc.report.document import Document
from brainenc.report.figures import _figure, save_figure

__all__ = ["build_reconstruction_report", "plot_reconstruction_grid", "image_strip", "save_png"]


def _resize_u8(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> [size, size, 3] (bilinear, antialiased)."""
    if img.shape[0] == size and img.shape[1] == size:
        return img
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))


def image_strip(images: Sequence[np.ndarray], size: int = 160, gap: int = 4) -> np.ndarray:
    """Images side by side at ``size`` px with white gaps: ``[size, k*size + (k-1)*gap, 3]`` uint8."""
    tiles = [_resize_u8(np.asarray(im, np.uint8), size) for im in images]
    out = np.full((size, len(tiles) * size + (len(tiles) - 1) * gap, 3), 255, np.uint8)
    for k, t in enumerate(tiles):
        out[:, k * (size + gap):k * (size + gap) + size] = t
    return out


def save_png(arr: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 image atomically as PNG."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(np.asarray(arr, np.uint8)).save(tmp, format="PNG")
    tmp.replace(path)
    return path


def plot_reconstruction_grid(columns: Mapping[str, np.ndarray], path: str | Path, *, n_show: int = 12,
                             image_ids: Sequence[int] | None = None, dpi: int = 110) -> Path:
    """One row per test image (the first ``n_show``), one column per image kind (seen, low-level, ...)."""
    names = list(columns)
    n = min(n_show, min(len(v) for v in columns.values()))
    fig = _figure(1.5 * len(names) + 0.4, 1.5 * n + 0.4)
    for i in range(n):
        for j, name in enumerate(names):
            ax = fig.add_subplot(n, len(names), i * len(names) + j + 1)
            ax.imshow(columns[name][i], interpolation="bilinear")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
            if j == 0 and image_ids is not None:
                ax.set_ylabel(f"{int(image_ids[i])}", fontsize=7)
    return save_figure(fig, path, dpi=dpi)


def build_reconstruction_report(out_dir: str | Path, res: Mapping, images: Mapping[str, np.ndarray],
                                control: np.ndarray, *, image_ids, title: str, subject: str, decode: Mapping,
                                n_show: int = 12, dpi: int = 110, metric_rows=None) -> list[Path]:
    """Write ``index.md`` / ``index.html``, ``metrics.csv``, ``figures/grid.png`` and ``images/*.png``."""
    out = Path(out_dir)
    files: list[Path] = []
    doc = Document(f"{title}: image reconstruction, {subject}")
    w = res.get("weights", {})
    random_nets = [k for k, v in w.items() if isinstance(v, Mapping) and v.get("source") == "random-init"]
    doc.paragraph(f"{res['n']} test images, decoded from the subject's repeat-averaged test responses by a ridge "
                  "decoder fitted on the training images. The shuffled-voxels control decodes every test image from "
                  "another test image's response (a derangement), so its scores estimate chance with the decoder, "
                  "the image model and the metrics unchanged.")
    if random_nets:
        doc.paragraph("Networks with random weights (" + ", ".join(sorted(random_nets)) + "): their identification "
                      "scores test the plumbing and the direction of low-level similarity only; they are not "
                      "comparable with published numbers (supply the real weights in [evaluate] weights).")
    doc.heading("Metrics")
    if metric_rows is not None:
        headers, rows = metric_rows
        doc.table(headers, rows, numeric=[False] + [True] * (len(headers) - 1))
        csv = "\n".join(",".join(r) for r in [headers] + rows) + "\n"
        files.append(write_text(out / "metrics.csv", csv))
    doc.paragraph("Identification (alexnet2/5, inception, clip): two-way identification, chance 0.5. effnet / swav: "
                  "mean correlation distance (lower is better). Variants: " +
                  "; ".join(f"{k}: {v}" for k, v in res.get("variants", {}).items()) + ".")
    tr = decode.get("target_r", {})
    if tr:
        doc.heading("Decoded targets (test images)")
        ctrl = decode.get("target_r_control", {})
        doc.table(["target", "mean r", "mean r, shuffled"],
                  [[k, f"{v:.3f}", f"{ctrl.get(k, float('nan')):.3f}"] for k, v in tr.items()],
                  numeric=[False, True, True])
    columns = dict(images)
    columns["shuffled control"] = control
    files.append(plot_reconstruction_grid(columns, out / "figures" / "grid.png", n_show=n_show,
                                          image_ids=image_ids, dpi=dpi))
    doc.image("figures/grid.png", f"The first {min(n_show, res['n'])} test images: what the subject saw, the "
                                  "reconstructions, and the shuffled-voxels control.")
    strips = []
    for i, iid in enumerate(np.asarray(image_ids)[:res["n"]]):
        strip = image_strip([v[i] for v in images.values()])
        strips.append(save_png(strip, out / "images" / f"{i:04d}_{int(iid)}.png"))
    files += strips
    doc.paragraph(f"One PNG per test image in images/ ({' | '.join(images)}).")
    versions = res.get("versions", {})
    doc.pre("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v) +
            "\nweights: " + "; ".join(f"{k}: {v.get('source') if isinstance(v, Mapping) else v}" for k, v in w.items()))
    files += doc.write(out / "index.md", out / "index.html")
    return files
