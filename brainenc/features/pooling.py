"""Pooling of cached patch tokens into design matrices for linear encoders."""
from __future__ import annotations

import numpy as np

from brainenc.exceptions import ConfigError, DataFormatError

__all__ = ["pool_grid"]


def pool_grid(tokens: np.ndarray, grid: tuple[int, int], cells: int, n_prefix: int = 0) -> np.ndarray:
    """Average patch tokens over a ``cells x cells`` grid of image regions and flatten.

    Keeps coarse spatial layout (what early visual voxels need) at a feature count of
    ``cells² · dim`` instead of ``h · w · dim``.

    Parameters
    ----------
    tokens : array of shape (n, n_prefix + h * w, dim)
    grid : (h, w)
    cells : int
        Output grid size per side (<= h, w); regions split the grid as evenly as possible.
    n_prefix : int

    Returns
    -------
    array of shape (n, cells * cells * dim), float32
    """
    h, w = (int(g) for g in grid)
    t = np.asarray(tokens[:, n_prefix:], dtype=np.float32)
    n, hw, d = t.shape
    if hw != h * w:
        raise DataFormatError(f"tokens hold {hw} patches but the grid is {h}x{w}")
    if not 1 <= cells <= min(h, w):
        raise ConfigError(f"'grid_pool' must be in 1..{min(h, w)} for a {h}x{w} grid; {cells} was provided")
    t = t.reshape(n, h, w, d)
    ys = np.linspace(0, h, cells + 1).round().astype(int)
    xs = np.linspace(0, w, cells + 1).round().astype(int)
    out = np.empty((n, cells, cells, d), dtype=np.float32)
    for i in range(cells):
        for j in range(cells):
            out[:, i, j] = t[:, ys[i]:ys[i + 1], xs[j]:xs[j + 1]].mean(axis=(1, 2))
    return out.reshape(n, -1)
