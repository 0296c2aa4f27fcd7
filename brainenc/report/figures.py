"""Report figures (PNG, written atomically).

Figures are drawn on :class:`matplotlib.figure.Figure` objects, never through pyplot's global
state, so they work on any backend and in parallel. nilearn is used only where it adds
something: the glass brain (only when the affine is in a template space, which NSD's native
spaces are not) and the surface plot on nilearn's bundled fsaverage5 mesh.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from brainenc._utils.io import atomic_path
from brainenc.report.maps import (
    FSAVERAGE_VERTICES,
    surface_size,
    values_to_surface,
    values_to_volume,
)

__all__ = ["save_figure", "plot_roi_bars", "plot_volume_mosaic", "plot_glass_brain",
           "plot_surface_map", "plot_pred_vs_measured", "plot_scatter", "FSAVERAGE5_VERTICES"]

#: fsaverage5 is nilearn's bundled mesh; its vertices are the first 10242 of every denser
#: fsaverage (the icosahedral subdivisions keep earlier vertices), so full fsaverage maps
#: are shown on it by keeping vertices < 10242.
FSAVERAGE5_VERTICES = 10242
_FSAVERAGE_DENSITIES = (FSAVERAGE5_VERTICES, 40962, FSAVERAGE_VERTICES)  # fsaverage5, 6, 7


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Save ``fig`` as PNG atomically and return the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path


def plot_roi_bars(rows: Sequence[Mapping], models: Sequence[str], path: str | Path,
                  title: str = "Per-ROI scores") -> Path:
    """Bar chart per ROI comparing models, with the noise ceiling marked.

    Top panel: variance explained (mean R² per ROI, per model) with the ROI's mean noise
    ceiling drawn as a black tick, both as fractions of variance. Bottom panel: the
    noise-normalised score (1 = at the ceiling).

    Parameters
    ----------
    rows : sequence of dict
        Output of :func:`brainenc.report.tables.roi_table`.
    models : sequence of str
    path : path
        PNG to write.
    title : str

    Returns
    -------
    Path
    """
    rois = [r["roi"] for r in rows]
    n, m = len(rois), max(len(models), 1)
    x = np.arange(n)
    width = 0.8 / m
    fig = _figure(min(max(7.0, 0.3 * n * (1 + 0.3 * m) + 1.5), 18.0), 7.5)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    colors = [f"C{i}" for i in range(m)]
    for i, model in enumerate(models):
        off = (i - (m - 1) / 2) * width
        r2 = np.array([row.get(f"{model}:r2_mean", np.nan) for row in rows], dtype=float)
        nn = np.array([row.get(f"{model}:nc_norm_mean", np.nan) for row in rows], dtype=float)
        ax1.bar(x + off, np.nan_to_num(r2), width, label=model, color=colors[i])
        ax2.bar(x + off, np.nan_to_num(nn), width, label=model, color=colors[i])
    nc = np.array([row.get("nc_mean", np.nan) for row in rows], dtype=float)
    if np.isfinite(nc).any():
        ax1.scatter(x, nc, marker="_", s=600, color="black", linewidths=2, label="noise ceiling", zorder=3)
    ax2.axhline(1.0, color="black", lw=1, ls="--", label="noise ceiling")
    ax1.set_ylabel("variance explained (test R²)")
    ax2.set_ylabel("noise-normalised score")
    ax2.set_xticks(x, rois, rotation=60, ha="right", fontsize=8)
    for ax in (ax1, ax2):
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=m + 1, frameon=False)
    fig.suptitle(title)
    return save_figure(fig, path)


def _slice_indices(vol_mask: np.ndarray, n_slices: int) -> np.ndarray:
    z_any = np.nonzero(vol_mask.any(axis=(0, 1)))[0]
    if z_any.size == 0:
        z_any = np.arange(vol_mask.shape[2])
    n = min(n_slices, z_any.size)
    return np.unique(np.linspace(z_any[0], z_any[-1], n).round().astype(int))


def plot_volume_mosaic(values, geometry: Mapping, path: str | Path, title: str = "",
                       n_slices: int = 12, vmin: float | None = None, vmax: float | None = None,
                       cmap: str = "inferno") -> Path:
    """Axial slices of a per-voxel map in the subject's grid (matplotlib only).

    Slices are spread over the extent of the dataset's voxels; voxels outside the dataset are
    transparent over a grey outline of the covered region.

    Parameters
    ----------
    values : array of shape (n_voxels,)
    geometry : dict
        Volume geometry (``shape``, ``indices``).
    path : path
    title : str
    n_slices : int
    vmin, vmax : float, optional
        Colour limits (default: 0 and the 99th percentile).
    cmap : str

    Returns
    -------
    Path
    """
    v = np.asarray(values, dtype=np.float32)
    vol = values_to_volume(np.where(np.isfinite(v), v, np.nan), geometry, fill=np.nan)
    inside = values_to_volume(np.ones_like(v), geometry, fill=0.0) > 0
    zs = _slice_indices(inside, n_slices)
    finite = v[np.isfinite(v)]
    if vmax is None:
        vmax = float(np.percentile(finite, 99)) if finite.size else 1.0
    if vmin is None:
        vmin = min(0.0, float(np.percentile(finite, 1))) if finite.size else 0.0
    if vmax <= vmin:
        vmax = vmin + 1e-6
    ncol = min(6, len(zs))
    nrow = int(np.ceil(len(zs) / ncol))
    fig = _figure(2.0 * ncol + 0.8, 2.2 * nrow + 0.4)
    axes = np.atleast_1d(fig.subplots(nrow, ncol)).ravel()
    im = None
    for ax, z in zip(axes, zs):
        ax.imshow(inside[:, :, z].T, origin="lower", cmap="Greys", vmin=0, vmax=4, interpolation="nearest")
        im = ax.imshow(np.ma.masked_invalid(vol[:, :, z].T), origin="lower", cmap=cmap, vmin=vmin, vmax=vmax,
                       interpolation="nearest")
        ax.set_title(f"z={z}", fontsize=7)
        ax.set_axis_off()
    for ax in axes[len(zs):]:
        ax.set_axis_off()
    if im is not None:
        fig.colorbar(im, ax=list(axes), shrink=0.6)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_glass_brain(values, geometry: Mapping, path: str | Path, title: str = "") -> Path | None:
    """nilearn glass brain of a volume map, only if the geometry is in a template space.

    A glass brain projects through a standard (MNI) head outline; NSD's native
    ``func1pt8mm``/``func1mm`` affines are subject-specific, so for them (no
    ``geometry["template"]``) nothing is drawn and None is returned.

    Parameters
    ----------
    values : array of shape (n_voxels,)
    geometry : dict
        Volume geometry; ``template`` (e.g. ``"MNI152"``) enables the plot.
    path : path
    title : str

    Returns
    -------
    Path or None
    """
    if not str(geometry.get("template", "")).upper().startswith("MNI"):
        return None
    import nibabel as nib
    from nilearn import plotting

    vol = values_to_volume(np.nan_to_num(np.asarray(values, dtype=np.float32)), geometry, fill=0.0)
    img = nib.Nifti1Image(vol, np.asarray(geometry["affine"], dtype=np.float64))
    fig = _figure(8, 3)
    plotting.plot_glass_brain(img, figure=fig, title=title or None, colorbar=True, plot_abs=False)
    return save_figure(fig, path)


def plot_surface_map(values, geometry: Mapping, path: str | Path, title: str = "",
                     vmax: float | None = None, cmap: str = "inferno") -> Path:
    """A per-vertex map on the fsaverage5 inflated mesh (nilearn), or a flat scatter.

    fsaverage data of any density keep their first 10242 vertices, which are fsaverage5's, and
    are drawn with nilearn's ``plot_surf_stat_map`` (lateral and ventral views per hemisphere,
    from nilearn's bundled mesh: no download). Surface data that is not fsaverage falls back to a
    flat scatter of value against vertex index per hemisphere.

    Parameters
    ----------
    values : array of shape (n_voxels,)
    geometry : dict
        Surface geometry (``space``, ``hemi``, ``vertex``).
    path : path
    title : str
    vmax : float, optional
    cmap : str

    Returns
    -------
    Path
    """
    v = np.asarray(values, dtype=np.float32)
    finite = v[np.isfinite(v)]
    if vmax is None:
        vmax = float(np.percentile(np.abs(finite), 99)) if finite.size else 1.0
    vmax = max(vmax, 1e-6)
    hemis = values_to_surface(np.where(np.isfinite(v), v, 0.0), geometry, fill=0.0)
    n = surface_size(geometry)
    on_fsaverage = geometry.get("space") == "fsaverage" and n in _FSAVERAGE_DENSITIES
    if on_fsaverage:
        from nilearn import datasets, plotting

        mesh = datasets.load_fsaverage("fsaverage5")
        fig = _figure(9, 6)
        axes = fig.subplots(2, 2, subplot_kw={"projection": "3d"})
        for col, hemi in enumerate(("lh", "rh")):
            name = "left" if hemi == "lh" else "right"
            data = hemis[hemi][:FSAVERAGE5_VERTICES]
            for row, view in enumerate(("lateral", "ventral")):
                plotting.plot_surf_stat_map(mesh["inflated"].parts[name], data, hemi=name, view=view,
                                            axes=axes[row, col], figure=fig, colorbar=False, cmap=cmap,
                                            vmax=vmax, threshold=None, engine="matplotlib")
                axes[row, col].set_title(f"{hemi} {view}", fontsize=8)
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        vmin = float(min(0.0, np.nanmin(finite))) if finite.size else 0.0
        fig.colorbar(ScalarMappable(Normalize(vmin, vmax), cmap), ax=list(axes.ravel()), shrink=0.5)
    else:
        fig = _figure(9, 4)
        axes = fig.subplots(2, 1, sharex=True)
        for ax, hemi in zip(axes, ("lh", "rh")):
            idx = np.arange(n)
            ax.scatter(idx, hemis[hemi], s=2, c=hemis[hemi], cmap=cmap, vmin=0, vmax=vmax)
            ax.set_ylabel(hemi)
        axes[-1].set_xlabel("vertex")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_pred_vs_measured(y_true, y_pred, labels: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Predicted against measured responses for a few voxels (one panel each).

    Parameters
    ----------
    y_true : array of shape (n_samples, k)
    y_pred : array of shape (n_samples, k) or dict of model -> array of shape (n_samples, k)
        Several models are drawn in different colours in the same panels.
    labels : sequence of str, length k
        Panel titles (e.g. ``"voxel 123 (V1v) r=0.81"``).
    path : path
    title : str

    Returns
    -------
    Path
    """
    yt = np.asarray(y_true, dtype=np.float64)
    preds = y_pred if isinstance(y_pred, Mapping) else {"": y_pred}
    k = yt.shape[1]
    ncol = min(4, k)
    nrow = int(np.ceil(k / ncol))
    fig = _figure(2.6 * ncol, 2.5 * nrow + 0.3)
    axes = np.atleast_1d(fig.subplots(nrow, ncol)).ravel()
    for j in range(k):
        ax = axes[j]
        for i, (model, yp) in enumerate(preds.items()):
            yp = np.asarray(yp, dtype=np.float64)
            ax.scatter(yt[:, j], yp[:, j], s=5, alpha=0.6, color=f"C{i}", label=model or None)
        lo = float(np.nanmin(yt[:, j])) if yt.size else 0.0
        hi = float(np.nanmax(yt[:, j])) if yt.size else 1.0
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
        ax.set_title(labels[j], fontsize=7)
        ax.set_xlabel("measured", fontsize=7)
        ax.set_ylabel("predicted", fontsize=7)
        ax.tick_params(labelsize=6)
        if j == 0 and len(preds) > 1:
            ax.legend(fontsize=6)
    for ax in axes[k:]:
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_scatter(x, y, path: str | Path, xlabel: str, ylabel: str, title: str = "",
                 groups: Mapping[str, np.ndarray] | None = None) -> Path:
    """A plain x-y scatter (e.g. fitted score against the simulator's true ceiling).

    Parameters
    ----------
    x, y : arrays of shape (n,)
    path : path
    xlabel, ylabel, title : str
    groups : dict of name -> bool array of shape (n,), optional
        Points of each group drawn in their own colour (others grey).

    Returns
    -------
    Path
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    fig = _figure(5, 4.2)
    ax = fig.subplots()
    if groups:
        rest = np.ones(x.shape, dtype=bool)
        for i, (name, m) in enumerate(groups.items()):
            m = np.asarray(m, dtype=bool)
            ax.scatter(x[m], y[m], s=4, alpha=0.6, color=f"C{i}", label=name)
            rest &= ~m
        if rest.any():
            ax.scatter(x[rest], y[rest], s=3, alpha=0.3, color="grey", label="other")
        ax.legend(fontsize=7, markerscale=3)
    else:
        ax.scatter(x, y, s=4, alpha=0.5)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.any():
        lo = float(min(x[ok].min(), y[ok].min()))
        hi = float(max(x[ok].max(), y[ok].max()))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)
