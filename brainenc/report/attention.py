"""Attention-map and top-image figures for routing encoders.

Query ``i``'s map is always drawn under ``names[i]`` (the original analysis code titled token
``i*25+j`` with ``roi_names[j-1]``, an off-by-one; reference_systems.md a.5): every lookup goes
through :func:`maps_by_query`, and each PNG carries its query name and index in its metadata
(``Title``, ``Description``) so the labelling can be checked from the file alone.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from brainenc._utils.io import atomic_path
from brainenc.exceptions import ConfigError, DataFormatError

__all__ = ["maps_by_query", "upsample_map", "plot_attention_maps", "plot_top_images", "roi_mean_responses",
           "attention_filename"]


def attention_filename(name: str, suffix: str = "") -> str:
    """``attention_<name><suffix>.png`` with characters outside ``[A-Za-z0-9_.-]`` replaced by ``_``."""
    return f"attention_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}{suffix}.png"


def maps_by_query(attn: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Name each query's maps.

    Parameters
    ----------
    attn : array [n, Q, h, w] or [n, H, Q, h, w]
        Attention on the patch grid (``RoutingEncoder.attention_maps``).
    names : sequence of str, length Q
        ``names[i]`` labels query ``i``.

    Returns
    -------
    dict name -> array [n, h, w] (or [n, H, h, w])
    """
    attn = np.asarray(attn)
    axis = 1 if attn.ndim == 4 else 2
    if attn.ndim not in (4, 5) or attn.shape[axis] != len(names):
        raise DataFormatError(f"'attn' must be [n, Q, h, w] or [n, H, Q, h, w] with Q = len(names) = {len(names)}; "
                              f"got shape {attn.shape}")
    if len(set(names)) != len(names):
        dup = sorted({str(n) for n in names if list(names).count(n) > 1})
        raise ConfigError(f"'names' must be unique; {dup} appear more than once")
    return {name: np.take(attn, i, axis=axis) for i, name in enumerate(names)}


def upsample_map(m: np.ndarray, image_size: tuple[int, int], padded_size: tuple[int, int] | None = None,
                 order: int = 0) -> np.ndarray:
    """Upsample a grid map to the image, cropping the padding the backbone input had.

    Parameters
    ----------
    m : array [h, w]
    image_size : (H, W)
        Size of the displayed image.
    padded_size : (Hp, Wp), optional
        Size of the (bottom/right zero-padded) backbone input the grid covers; the upsampled map is
        cropped to its top-left ``image_size``. None = the grid covers exactly the image.
    order : int
        Spline order (0 = nearest, as the original figures).

    Returns
    -------
    array [H, W]
    """
    from scipy.ndimage import zoom

    H, W = image_size
    th, tw = padded_size if padded_size is not None else (H, W)
    up = zoom(np.asarray(m, dtype=np.float64), (th / m.shape[0], tw / m.shape[1]), order=order, grid_mode=True,
              mode="nearest")
    return up[:H, :W]


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def _save(fig, path: Path, name: str, index: int, dpi: int = 100) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", metadata={"Title": name, "Description": f"query index {index}"})
    return path


def plot_attention_maps(images: np.ndarray, attn: np.ndarray, names: Sequence[str], out_dir: str | Path, *,
                        padded_size: tuple[int, int] | None = None, alpha: float = 0.4, cmap: str = "viridis",
                        max_images: int = 6, queries: Sequence[str] | None = None) -> list[Path]:
    """Overlay each query's attention on the stimuli: one ``attention_<name>.png`` per query.

    Parameters
    ----------
    images : uint8 array [n, H, W, 3]
        Stimuli (as shown, before padding).
    attn : array [n, Q, h, w] (head mean) or [n, H, Q, h, w] (per head)
        With heads, each figure has a head-mean row followed by one row per head.
    names : sequence of str, length Q
    out_dir : path
    padded_size : (Hp, Wp), optional
        Backbone input size when the image was padded (see :func:`upsample_map`).
    alpha, cmap : overlay opacity and colour map.
    max_images : int
        Columns (first images).
    queries : sequence of str, optional
        Subset of names to draw (default all).

    Returns
    -------
    list of Path (in query order)
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) != np.shape(attn)[0]:
        raise DataFormatError(f"'images' must be [n, H, W, 3] with n = len(attn) = {np.shape(attn)[0]}; "
                              f"got shape {images.shape}")
    maps = maps_by_query(attn, names)
    unknown = [q for q in (queries or ()) if q not in maps]
    if unknown:
        raise ConfigError(f"'queries' must be a subset of 'names'; {unknown} are not query names")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = min(len(images), max_images)
    H, W = images.shape[1:3]
    paths = []
    for name in (queries if queries is not None else names):
        m = maps[name]  # [n, h, w] or [n, heads, h, w]
        rows = [("head mean", m if m.ndim == 3 else m.mean(1))]
        if m.ndim == 4:
            rows += [(f"head {h}", m[:, h]) for h in range(m.shape[1])]
        fig = _figure(2.0 * n, 2.0 * len(rows) + 0.4)
        axes = fig.subplots(len(rows), n, squeeze=False)
        for r, (label, mm) in enumerate(rows):
            for j in range(n):
                ax = axes[r, j]
                ax.imshow(images[j])
                ax.imshow(upsample_map(mm[j], (H, W), padded_size), cmap=cmap, alpha=alpha,
                          extent=(-0.5, W - 0.5, H - 0.5, -0.5))
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0 and len(rows) > 1:
                    ax.set_ylabel(label)
        fig.suptitle(name)
        paths.append(_save(fig, out_dir / attention_filename(name), name, list(names).index(name)))
    return paths


def roi_mean_responses(pred: np.ndarray, masks: Mapping[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    """Mean predicted response per ROI.

    Parameters
    ----------
    pred : array [n, V]
    masks : dict name -> bool [V]

    Returns
    -------
    names : list of str (ROIs with at least one voxel)
    responses : float32 [n, R]
    """
    pred = np.asarray(pred)
    names = [k for k, m in masks.items() if np.asarray(m).any()]
    out = np.stack([pred[:, np.asarray(masks[k], dtype=bool)].mean(1) for k in names], axis=1) if names else \
        np.zeros((len(pred), 0))
    return names, out.astype(np.float32)


def plot_top_images(images: np.ndarray, responses: np.ndarray, names: Sequence[str], path: str | Path, *,
                    k: int = 6) -> Path:
    """Grid of the ``k`` images with the highest predicted response for each ROI (one row per ROI).

    Parameters
    ----------
    images : uint8 array [n, H, W, 3]
    responses : array [n, R]
        Predicted response per image and ROI (e.g. :func:`roi_mean_responses`).
    names : sequence of str, length R
    path : path of the PNG
    k : int

    Returns
    -------
    Path
    """
    responses = np.asarray(responses)
    if responses.shape != (len(images), len(names)):
        raise DataFormatError(f"'responses' must be [n_images, len(names)] = [{len(images)}, {len(names)}]; "
                              f"got shape {responses.shape}")
    k = min(k, len(images))
    fig = _figure(1.6 * k + 1.2, 1.6 * max(1, len(names)))
    axes = fig.subplots(max(1, len(names)), k, squeeze=False)
    for r, name in enumerate(names):
        top = np.argsort(-responses[:, r], kind="stable")[:k]
        for j, i in enumerate(top):
            ax = axes[r, j]
            ax.imshow(images[i])
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{responses[i, r]:.2f}", fontsize=7)
            if j == 0:
                ax.set_ylabel(name, fontsize=8)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png", metadata={"Title": "top images per ROI",
                                                          "Description": ", ".join(names)})
    return path
