"""Positional codes for a 2-D grid of patch tokens (added to the keys only).

``sine`` is the DETR-style fixed code used by the transformer brain encoder
(reference_systems.md a.1): half of the channels encode the row, half the column, with
coordinates normalised to (0, 2π] and frequencies ``temperature ** (2 i / (dim / 2))``;
sine and cosine alternate within each half.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from brainenc._utils.validation import check_option
from brainenc.exceptions import ConfigError

__all__ = ["sine_2d", "SinePositional2d", "LearnedPositional2d", "NoPositional", "make_positional", "POSITIONAL_KINDS"]

POSITIONAL_KINDS = ("sine", "learned", "none")


def sine_2d(height: int, width: int, dim: int, *, temperature: float = 10000.0, normalize: bool = True,
            scale: float = 2 * math.pi) -> torch.Tensor:
    """Fixed 2-D sine/cosine code.

    Parameters
    ----------
    height, width : int
        Patch grid; tokens are ordered row-major (index ``i * width + j``).
    dim : int
        Code width; must be divisible by 4 (row half + column half, each sin/cos pairs).
    temperature : float
        Frequency base.
    normalize : bool
        Map row/column positions ``1..h`` / ``1..w`` to ``(0, scale]``.
    scale : float
        Range of the normalised coordinates.

    Returns
    -------
    pos : torch.Tensor, float32 [height * width, dim]
        Channels ``[:dim/2]`` encode the row, ``[dim/2:]`` the column.
    """
    if dim % 4 != 0:
        raise ConfigError(f"'dim' must be divisible by 4 for the 2-D sine code; {dim} was provided")
    half = dim // 2
    y = torch.arange(1, height + 1, dtype=torch.float64)[:, None].expand(height, width)
    x = torch.arange(1, width + 1, dtype=torch.float64)[None, :].expand(height, width)
    if normalize:
        eps = 1e-6
        y = y / (height + eps) * scale
        x = x / (width + eps) * scale
    i = torch.arange(half, dtype=torch.float64)
    freq = temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / half)  # [half]

    def _code(c: torch.Tensor) -> torch.Tensor:
        a = c[..., None] / freq  # [h, w, half]
        out = torch.empty_like(a)
        out[..., 0::2] = a[..., 0::2].sin()
        out[..., 1::2] = a[..., 1::2].cos()
        return out

    pos = torch.cat([_code(y), _code(x)], dim=-1)  # [h, w, dim]
    return pos.reshape(height * width, dim).float()


class SinePositional2d(nn.Module):
    """Fixed sine code as a non-trainable buffer (not saved: rebuilt from the grid).

    Parameters
    ----------
    grid : (int, int)
        Patch grid (h, w).
    dim : int
        Model width.
    """

    def __init__(self, grid: tuple[int, int], dim: int):
        super().__init__()
        self.grid = (int(grid[0]), int(grid[1]))
        self.register_buffer("pos", sine_2d(self.grid[0], self.grid[1], dim), persistent=False)

    def forward(self) -> torch.Tensor:
        """Return the code, float32 [h * w, dim]."""
        return self.pos


class LearnedPositional2d(nn.Module):
    """Learned per-position code, initialised N(0, 0.02²).

    Parameters
    ----------
    grid : (int, int)
        Patch grid (h, w).
    dim : int
        Model width.
    """

    def __init__(self, grid: tuple[int, int], dim: int):
        super().__init__()
        self.grid = (int(grid[0]), int(grid[1]))
        self.pos = nn.Parameter(torch.randn(self.grid[0] * self.grid[1], dim) * 0.02)

    def forward(self) -> torch.Tensor:
        """Return the code, [h * w, dim]."""
        return self.pos


class NoPositional(nn.Module):
    """No positional code (keys are the raw projected tokens)."""

    def forward(self):
        return None


def make_positional(kind: str, grid: tuple[int, int], dim: int) -> nn.Module:
    """Build the positional module ``kind`` in {'sine', 'learned', 'none'}."""
    check_option("positional", kind, POSITIONAL_KINDS)
    if kind == "sine":
        return SinePositional2d(grid, dim)
    if kind == "learned":
        return LearnedPositional2d(grid, dim)
    return NoPositional()
