"""The Brain-IT decoding report: feature-retrieval table (subjects x models x targets), functional-cluster
maps in each subject's space, a cluster figure coloured consistently across subjects, and the transfer
curve (accuracy against the new subject's sessions).

Built from plain arrays and dicts (``metrics.feature_retrieval`` records, cluster labels, the
``PreparedDataset.geometry`` dicts); nothing here fits, decodes or scores anything, and nothing imports
``brainenc.workflows`` / ``encoding`` / ``decoding``. Every file is written atomically; matplotlib and
nibabel are imported only when a figure or a map is made.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import io
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from brainenc._utils.io import write_text
from brainenc.exceptions import ConfigError, DataFormatError
from brainenc.report.document import Document
from brainenc.report.figures import FSAVERAGE5_VERTICES, _figure, _slice_indices, save_figure
from brainenc.report.maps import _hemi_codes, is_volume, values_to_volume, write_map

__all__ = ["DecodeReportInputs", "build_decode_report", "write_cluster_maps", "cluster_figure", "transfer_figure",
           "decode_table", "cluster_colors", "label_colors", "DECODE_HEADERS"]

#: the retrieval columns of :func:`decode_table`: (header, key of the ``feature_retrieval`` record)
_METRIC_COLUMNS = (
    ("similarity", "kind"),
    ("top-1 brain→image", "top1_brain_to_image"),
    ("top-1 image→brain", "top1_image_to_brain"),
    ("two-way", "two_way"),
    ("n", "n"),
    ("chance top-1", "chance_top1"),
    ("chance two-way", "chance_two_way"),
)
DECODE_HEADERS = ["subject", "model", "target"] + [h for h, _ in _METRIC_COLUMNS]
_RECORD_KEYS = ("top1_brain_to_image", "top1_image_to_brain", "two_way")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


# ------------------------------------------------------------------------------------------------
# labels and geometry
# ------------------------------------------------------------------------------------------------
def _check_n_clusters(n_clusters) -> int:
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, (int, np.integer)) or n_clusters < 1:
        raise ConfigError(f"'n_clusters' must be a positive integer; {n_clusters!r} was provided")
    return int(n_clusters)


def _check_labels(labels, n_voxels: int | None, subject: str, n_clusters: int | None = None) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.ndim != 1:
        raise DataFormatError(f"cluster labels of {subject!r} must be 1-D [V]; got shape {lab.shape}")
    if lab.dtype.kind == "f":
        if not np.all(np.isfinite(lab)) or not np.all(lab == np.round(lab)):
            raise DataFormatError(f"cluster labels of {subject!r} must be integers (cluster ids)")
    elif lab.dtype.kind not in "iub":
        raise DataFormatError(f"cluster labels of {subject!r} must be integers; got dtype {lab.dtype}")
    lab = lab.astype(np.int64)
    if n_voxels is not None and lab.shape[0] != n_voxels:
        raise DataFormatError(f"cluster labels of {subject!r} have {lab.shape[0]} entries but its geometry has "
                              f"{n_voxels} voxels")
    if lab.size and lab.min() < 0:
        raise DataFormatError(f"cluster labels of {subject!r} must be >= 0; got {int(lab.min())}")
    if n_clusters is not None and lab.size and lab.max() >= n_clusters:
        raise DataFormatError(f"cluster labels of {subject!r} must be < n_clusters={n_clusters}; got {int(lab.max())}")
    return lab


def _n_voxels(geometry: Mapping) -> int:
    key = "indices" if is_volume(geometry) else "vertex"
    return int(np.asarray(geometry[key]).shape[0])


# ------------------------------------------------------------------------------------------------
# maps
# ------------------------------------------------------------------------------------------------
def write_cluster_maps(out_dir: str | Path, subject: str, labels, geometry: Mapping) -> list[Path]:
    """Write a subject's functional clusters in its own space, value ``label + 1`` (0 = no voxel).

    Parameters
    ----------
    out_dir : path
    subject : str
        File stem ``<subject>_clusters``.
    labels : int array [V]
        Cluster id ``0 .. C-1`` of each of the subject's voxels (the dataset's voxel order).
    geometry : dict
        ``PreparedDataset.geometry``: volume ``{space, shape, affine, indices [V, 3]}`` -> one int16 NIfTI
        ``<subject>_clusters.nii.gz`` on the subject's grid and affine; surface ``{space, hemi [V],
        vertex [V], n_vertices?}`` -> one int16 MGH per hemisphere, ``lh.<subject>_clusters.mgh`` /
        ``rh.<subject>_clusters.mgh`` (FreeSurfer layout ``(n_vertices, 1, 1)``).

    Returns
    -------
    list of Path
    """
    subject = str(subject)
    if not _SAFE_NAME.match(subject):
        raise ConfigError(f"'subject' must be a plain file-name stem (letters, digits, . _ -); {subject!r} was provided")
    lab = _check_labels(labels, _n_voxels(geometry), subject)
    if lab.size and lab.max() + 1 > np.iinfo(np.int16).max:
        raise DataFormatError(f"cluster ids of {subject!r} do not fit int16 maps (max id {int(lab.max())})")
    values = (lab + 1).astype(np.float32)  # exact for every int16 value
    return write_map(values, geometry, out_dir, f"{subject}_clusters", dtype=np.int16,
                     description="cluster id + 1; 0 = no voxel")


# ------------------------------------------------------------------------------------------------
# colours and figures
# ------------------------------------------------------------------------------------------------
def cluster_colors(n_clusters: int) -> np.ndarray:
    """The fixed qualitative colour of every cluster id: float RGBA ``[n_clusters, 4]``.

    Row ``k`` is the colour of cluster ``k`` in every subject and every figure drawn for the same
    ``n_clusters``: matplotlib's ``tab10`` (up to 10 clusters), ``tab20`` (up to 20), ``tab20`` +
    ``tab20b`` + ``tab20c`` (up to 60), then golden-ratio hue steps at alternating saturation / value for
    ids 60 and above. A function of ``(k, n_clusters)`` only.
    """
    import matplotlib as mpl
    from matplotlib.colors import hsv_to_rgb

    n = _check_n_clusters(n_clusters)
    if n <= 10:
        base = mpl.colormaps["tab10"].colors
    elif n <= 20:
        base = mpl.colormaps["tab20"].colors
    else:
        base = mpl.colormaps["tab20"].colors + mpl.colormaps["tab20b"].colors + mpl.colormaps["tab20c"].colors
    cols = np.ones((n, 4))
    k0 = min(n, len(base))
    cols[:k0, :3] = np.asarray(base[:k0], dtype=np.float64)
    if n > k0:
        k = np.arange(k0, n)
        hsv = np.stack([(k * 0.6180339887498949) % 1.0, np.where(k % 2, 0.55, 0.85), np.where(k % 3, 0.9, 0.65)],
                       axis=1)
        cols[k0:, :3] = hsv_to_rgb(hsv)
    return cols


def label_colors(labels, n_clusters: int) -> np.ndarray:
    """RGBA ``[V, 4]`` of each voxel's cluster, ``cluster_colors(n_clusters)[labels]`` (the mapping every
    figure of this module uses)."""
    n = _check_n_clusters(n_clusters)
    lab = _check_labels(labels, None, "labels", n)
    return cluster_colors(n)[lab]


@functools.lru_cache(maxsize=1)
def _fsaverage5_flat():
    """Flat-map x, y of fsaverage5's vertices per hemisphere (nilearn's bundled mesh), or None."""
    try:
        from nilearn import datasets

        mesh = datasets.load_fsaverage("fsaverage5")
        return {h: np.asarray(mesh["flat"].parts[p].coordinates)[:, :2]
                for h, p in (("lh", "left"), ("rh", "right"))}
    except Exception:  # noqa: BLE001 - an older nilearn without the flat mesh: index scatter instead
        return None


def _volume_panels(fig_axes, subject: str, lab: np.ndarray, geometry: Mapping, n_clusters: int,
                   n_slices: int) -> int:
    colors = cluster_colors(n_clusters)
    lab_vol = values_to_volume((lab + 1).astype(np.float32), geometry, fill=0.0).astype(np.int64)
    inside = lab_vol > 0
    zs = _slice_indices(inside, n_slices)
    rgba = np.ones(lab_vol.shape + (4,))
    rgba[inside] = colors[lab_vol[inside] - 1]
    for ax, z in zip(fig_axes, zs):
        ax.imshow(rgba[:, :, z].transpose(1, 0, 2), origin="lower", interpolation="nearest")
        ax.set_title(f"{subject} z={int(z)}", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    return len(zs)


def _surface_panels(fig_axes, subject: str, lab: np.ndarray, geometry: Mapping, n_clusters: int) -> int:
    colors = cluster_colors(n_clusters)
    flat = _fsaverage5_flat() if geometry.get("space") == "fsaverage" else None
    codes = _hemi_codes(geometry["hemi"])
    vertices = np.asarray(geometry["vertex"], dtype=np.int64)
    for ax, (code, hemi) in zip(fig_axes, enumerate(("lh", "rh"))):
        sel = np.nonzero(codes == code)[0]
        vertex = vertices[sel]
        if flat is not None:
            keep = vertex < FSAVERAGE5_VERTICES  # fsaverage5's vertices are the first 10242 of any density
            xy = flat[hemi][vertex[keep]]
            ax.scatter(xy[:, 0], xy[:, 1], s=2, c=colors[lab[sel][keep]], linewidths=0)
            ax.set_aspect("equal")
            ax.set_title(f"{subject} {hemi} (fsaverage5 flat)", fontsize=7)
        else:
            ax.scatter(vertex, lab[sel], s=4, c=colors[lab[sel]], linewidths=0)
            ax.set_xlabel("vertex", fontsize=7)
            ax.set_ylabel("cluster id", fontsize=7)
            ax.set_title(f"{subject} {hemi}", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    return 2


def cluster_figure(labels: Mapping[str, Any], geometry: Mapping[str, Mapping], n_clusters: int, *,
                   n_slices: int = 4):
    """Functional clusters of every subject, one panel row per subject, coloured by cluster id.

    Volume subjects: ``n_slices`` axial slices spread over the subject's voxels (RGBA images, white
    outside); surface subjects: one panel per hemisphere, a scatter on nilearn's bundled fsaverage5 flat
    map (fsaverage; vertices of denser meshes that are not fsaverage5's are left out) or of cluster id
    against vertex index (other surfaces). Colours are ``cluster_colors(n_clusters)[id]``, so a
    cluster id has the same colour in every subject.

    Returns
    -------
    matplotlib.figure.Figure
    """
    n = _check_n_clusters(n_clusters)
    subjects = list(labels)
    if not subjects:
        raise DataFormatError("'labels' holds no subject")
    missing = [s for s in subjects if s not in geometry]
    if missing:
        raise DataFormatError(f"no geometry for subject(s) {missing}; geometries are given for {sorted(geometry)}")
    if isinstance(n_slices, bool) or not isinstance(n_slices, (int, np.integer)) or n_slices < 1:
        raise ConfigError(f"'n_slices' must be a positive integer; {n_slices!r} was provided")
    labs = {s: _check_labels(labels[s], _n_voxels(geometry[s]), str(s), n) for s in subjects}
    ncol = max(n_slices if is_volume(geometry[s]) else 2 for s in subjects)
    fig = _figure(1.9 * ncol + (1.6 if n <= 20 else 0.4), 1.9 * len(subjects) + 0.5)
    axes = np.asarray(fig.subplots(len(subjects), ncol, squeeze=False))
    for row, s in enumerate(subjects):
        if is_volume(geometry[s]):
            used = _volume_panels(axes[row], str(s), labs[s], geometry[s], n, n_slices)
        else:
            used = _surface_panels(axes[row], str(s), labs[s], geometry[s], n)
        for ax in axes[row, used:]:
            ax.set_axis_off()
    if n <= 20:
        from matplotlib.patches import Patch

        colors = cluster_colors(n)
        fig.legend(handles=[Patch(color=colors[k], label=str(k)) for k in range(n)], title="cluster",
                   loc="outside right upper", fontsize=7, title_fontsize=8, frameon=False)
    fig.suptitle(f"Functional clusters ({n}); same colour = same cluster id in every subject", fontsize=9)
    return fig


def _check_curve(curve: Mapping, metric: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if not isinstance(curve, Mapping) or not curve:
        raise DataFormatError("the transfer 'curve' must be a non-empty {model: {'sessions': [...], metric: [...]}}")
    out = {}
    for model, rec in curve.items():
        if not isinstance(rec, Mapping) or "sessions" not in rec or metric not in rec:
            have = sorted(rec) if isinstance(rec, Mapping) else type(rec).__name__
            raise DataFormatError(f"transfer curve of model {model!r} needs 'sessions' and {metric!r}; got {have}")
        x = np.asarray(rec["sessions"], dtype=np.float64).ravel()
        y = np.asarray(rec[metric], dtype=np.float64).ravel()
        if x.shape != y.shape or x.size == 0:
            raise DataFormatError(f"transfer curve of model {model!r}: 'sessions' ({x.size}) and {metric!r} "
                                  f"({y.size}) must be non-empty and of equal length")
        out[str(model)] = (x, y)
    return out


def transfer_figure(curve: Mapping[str, Mapping[str, Sequence]], metric: str, chance: float | None = None, *,
                    title: str = ""):
    """Transfer to a new subject: ``metric`` against the number of the new subject's training sessions,
    one line per model, chance as a dashed line.

    Parameters
    ----------
    curve : {model: {"sessions": [...], metric: [...]}}
    metric : str
        Key of the values in every model's record (e.g. ``"top1_brain_to_image"``).
    chance : float, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    data = _check_curve(curve, metric)
    fig = _figure(5.0, 3.4)
    ax = fig.subplots()
    for i, (model, (x, y)) in enumerate(data.items()):
        order = np.argsort(x, kind="stable")
        ax.plot(x[order], y[order], marker="o", color=f"C{i}", label=model)
    if chance is not None and math.isfinite(float(chance)):
        ax.axhline(float(chance), color="grey", ls="--", lw=1, label="chance")
    ticks = np.unique(np.concatenate([x for x, _ in data.values()]))
    if ticks.size <= 12:
        ax.set_xticks(ticks)
    ax.set_xlabel("sessions of the new subject")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7, frameon=False)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


# ------------------------------------------------------------------------------------------------
# table
# ------------------------------------------------------------------------------------------------
def _is_record(x) -> bool:
    return isinstance(x, Mapping) and all(k in x for k in _RECORD_KEYS)


def decode_table(results: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """One row per subject x model (x target) of ``metrics.feature_retrieval`` records.

    Parameters
    ----------
    results : {subject: {model: record}} or {subject: {model: {target: record}}}
        ``record`` = the dict of :func:`brainenc.metrics.feature_retrieval`; both nestings may be mixed
        (a model without targets gets an empty ``target`` cell).

    Returns
    -------
    headers : list of str
        ``DECODE_HEADERS``: subject, model, target, similarity, top-1 brain→image, top-1 image→brain,
        two-way, n, chance top-1, chance two-way.
    rows : list of list
        Raw values (str, float, int; a key missing from a record is NaN), in the order of ``results``.
    """
    if not isinstance(results, Mapping):
        raise DataFormatError(f"'results' must be {{subject: {{model: record}}}}; got {type(results).__name__}")
    rows: list[list[Any]] = []
    for subject, models in results.items():
        if not isinstance(models, Mapping):
            raise DataFormatError(f"results[{subject!r}] must be {{model: record}}; got {type(models).__name__}")
        for model, entry in models.items():
            if _is_record(entry):
                items = [("", entry)]
            elif isinstance(entry, Mapping) and entry and all(_is_record(v) for v in entry.values()):
                items = list(entry.items())
            else:
                raise DataFormatError(f"results[{subject!r}][{model!r}] must be a feature_retrieval record or "
                                      f"{{target: record}} with keys {list(_RECORD_KEYS)}")
            for target, rec in items:
                row: list[Any] = [str(subject), str(model), str(target)]
                for _, key in _METRIC_COLUMNS:
                    v = rec.get(key, "" if key == "kind" else float("nan"))
                    if not isinstance(v, str):
                        v = float(v)
                        v = int(v) if key == "n" and math.isfinite(v) else v
                    row.append(v)
                rows.append(row)
    return list(DECODE_HEADERS), rows


def _fmt(v, header: str) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(int(v))
    v = float(v)
    if not math.isfinite(v):
        return "—"
    return f"{v:.4g}" if header == "chance top-1" else f"{v:.3f}"


def _csv_text(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(headers)
    for row in rows:
        w.writerow(["" if isinstance(v, float) and not math.isfinite(v) else
                    (repr(float(v)) if isinstance(v, float) else v) for v in row])
    return buf.getvalue()


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DecodeReportInputs:
    """Everything the Brain-IT decoding report is made of (plain arrays and dicts).

    Attributes
    ----------
    results : dict
        ``{subject: {model: {target: feature_retrieval record}}}`` (model e.g. ``"bit"``, ``"ridge"``;
        target e.g. ``"semantic"``, ``"lowlevel"``); ``{subject: {model: record}}`` is accepted too.
    cluster_labels : dict
        ``{subject: int [V]}`` cluster id per voxel.
    geometry : dict
        ``{subject: PreparedDataset.geometry}`` for every subject of ``cluster_labels``.
    n_clusters : int
    transfer : dict or None
        ``{"subject": str, "metric": str, "chance": float, "curve": {model: {"sessions": [...],
        "<metric>": [...]}}}``.
    notes : sequence of str
        Free-text lines shown under the table.
    title : str
    """

    results: dict
    cluster_labels: dict
    geometry: dict
    n_clusters: int
    transfer: dict | None = None
    notes: Sequence[str] = ()
    title: str = "Brain-IT decoding"


def _check_transfer(transfer: Mapping) -> dict:
    if not isinstance(transfer, Mapping):
        raise DataFormatError(f"'transfer' must be a dict or None; got {type(transfer).__name__}")
    missing = [k for k in ("subject", "metric", "curve") if k not in transfer]
    if missing:
        raise DataFormatError(f"'transfer' needs keys subject, metric, curve (+ chance); missing {missing}")
    out = dict(transfer)
    out.setdefault("chance", None)
    _check_curve(out["curve"], out["metric"])
    return out


def build_decode_report(out_dir: str | Path, inputs: DecodeReportInputs, *, dpi: int = 110) -> dict[str, Any]:
    """Write the Brain-IT decoding report into ``out_dir``.

    Files: ``table.csv`` (full precision) and ``table.md`` (:func:`decode_table`), ``clusters/`` (one map per
    subject, :func:`write_cluster_maps`), ``clusters.png`` (:func:`cluster_figure`), ``transfer.png`` (when
    ``inputs.transfer`` is given, :func:`transfer_figure`), then ``index.md`` and ``index.html`` (one
    :class:`~brainenc.report.document.Document`), each written atomically, the index last.

    Returns
    -------
    dict
        ``{"table_csv", "table_md", "cluster_maps": [Path], "clusters_png"?, "transfer_png"?, "index_md",
        "index_html", "files": [every path written]}``.
    """
    out = Path(out_dir)
    n_clusters = _check_n_clusters(inputs.n_clusters)
    headers, rows = decode_table(inputs.results)
    labels = dict(inputs.cluster_labels or {})
    missing = [s for s in labels if s not in (inputs.geometry or {})]
    if missing:
        raise DataFormatError(f"no geometry for subject(s) {missing} of 'cluster_labels'")
    for s, lab in labels.items():
        _check_labels(lab, _n_voxels(inputs.geometry[s]), str(s), n_clusters)
    transfer = _check_transfer(inputs.transfer) if inputs.transfer is not None else None

    written: dict[str, Any] = {}
    numeric = [h not in ("subject", "model", "target", "similarity") for h in headers]
    cells = [[_fmt(v, h) for v, h in zip(r, headers)] for r in rows]
    written["table_csv"] = write_text(out / "table.csv", _csv_text(headers, rows))
    written["table_md"] = write_text(out / "table.md", _md_table(headers, cells, numeric))

    maps: list[Path] = []
    map_links: list[tuple[str, str]] = []
    for s, lab in labels.items():
        for p in write_cluster_maps(out / "clusters", str(s), lab, inputs.geometry[s]):
            maps.append(p)
            map_links.append((f"{s}: {p.name}", f"clusters/{p.name}"))
    written["cluster_maps"] = maps
    if labels:
        fig = cluster_figure(labels, {s: inputs.geometry[s] for s in labels}, n_clusters)
        written["clusters_png"] = save_figure(fig, out / "clusters.png", dpi=dpi)
    if transfer is not None:
        fig = transfer_figure(transfer["curve"], transfer["metric"], transfer["chance"],
                              title=f"transfer to {transfer['subject']}")
        written["transfer_png"] = save_figure(fig, out / "transfer.png", dpi=dpi)

    subjects = list(dict.fromkeys([str(s) for s in inputs.results] + [str(s) for s in labels]))
    models = list(dict.fromkeys(r[1] for r in rows))
    targets = [t for t in dict.fromkeys(r[2] for r in rows) if t]
    doc = Document(inputs.title)
    doc.paragraph(f"Subjects: {', '.join(subjects) or 'none'}. Models: {', '.join(models) or 'none'}"
                  + (f". Targets: {', '.join(targets)}." if targets else "."))
    doc.heading("Feature retrieval (test images)")
    doc.table(headers, cells, numeric=numeric)
    doc.paragraph("Similarity of predicted and true image-feature rows (flattened tokens; Pearson r or cosine, "
                  "column 'similarity') between every prediction and every test image. Top-1 brain→image: the "
                  "fraction of predictions whose own image is strictly the most similar of the n test images "
                  "(ties and NaN fail; chance 1/n). Top-1 image→brain: the fraction of images whose own prediction "
                  "is strictly the most similar prediction. Two-way: the fraction of (prediction, other image) "
                  "pairs in which the prediction is more similar to its own image (MindEye2's two-way "
                  "identification; chance 0.5).")
    if inputs.notes:
        doc.bullets([str(n) for n in inputs.notes])
    doc.links([("table.csv", "table.csv"), ("table.md", "table.md")])
    if labels:
        doc.heading("Functional clusters")
        doc.paragraph(f"{n_clusters} clusters of voxel embeddings shared by all subjects. Maps in each subject's "
                      "space hold cluster id + 1 (0 = no voxel): NIfTI on the subject's grid for volumes, one MGH per "
                      "hemisphere for surfaces. Subjects: " + ", ".join(str(s) for s in labels) + ".")
        doc.image("clusters.png", "Cluster id per voxel; the same colour is the same cluster in every subject.")
        doc.links(map_links)
    if transfer is not None:
        doc.heading(f"Transfer to a new subject ({transfer['subject']})")
        chance = transfer["chance"]
        doc.image("transfer.png", f"{transfer['metric']} against the sessions of {transfer['subject']} used for "
                                  "training" + (f"; chance {float(chance):.4g} (dashed)." if chance is not None else "."))
        data = _check_curve(transfer["curve"], transfer["metric"])
        sessions = sorted({float(x) for xs, _ in data.values() for x in xs})
        trows = []
        for sess in sessions:
            row = [f"{sess:g}"]
            for model, (xs, ys) in data.items():
                hit = np.nonzero(xs == sess)[0]
                row.append(_fmt(float(ys[hit[0]]), "") if hit.size else "—")
            trows.append(row)
        doc.table(["sessions"] + list(data), trows, numeric=[True] * (len(data) + 1))
    paths = doc.write(out / "index.md", out / "index.html")
    written["index_md"], written["index_html"] = paths
    files = [written["table_csv"], written["table_md"], *maps]
    files += [written[k] for k in ("clusters_png", "transfer_png") if k in written]
    written["files"] = files + list(paths)
    return written
