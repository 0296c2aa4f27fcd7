"""A fixed Gabor-energy pyramid (the Kay et al. 2008 / Gallant-lab feature space), no weights.

The luminance image (mean removed, zero-padded to twice its size against wrap-around) is
filtered in the Fourier domain by one-sided Gaussian filters centred on
``f (cos θ, sin θ)``: the inverse transform is the analytic response whose real and imaginary
parts are the even- and odd-phase (quadrature) Gabor outputs, so its modulus is the phase
invariant *energy* ``sqrt(even² + odd²)``. Energies are compressed with ``log1p`` (optional)
and averaged on a ``grid × grid`` spatial grid, giving tokens ``[n, grid², n_scales * n_orient]``
(channel = ``scale * n_orientations + orientation``).

Orientation ``θ_k = k · 180° / n_orientations`` is the direction of the filter's wave vector in
image coordinates (x = column to the right, y = row downwards): 0° prefers luminance varying
along x (vertical bars), 90° luminance varying along y (horizontal bars).
"""
from __future__ import annotations

import math

from brainenc._utils.imports import soft_import
from brainenc.exceptions import ConfigError
from brainenc.features.backbones import BACKBONES, Backbone, BackbonePlan, WeightsRef, pop_unknown
from brainenc.features.preprocess import Preprocess

__all__ = ["GaborBackbone", "make_gabor_module", "plan_gabor"]

_LUMA = (0.299, 0.587, 0.114)


def make_gabor_module(image_size: int = 128, cycles_per_image=(2, 4, 8, 16, 32), n_orientations: int = 8,
                      grid: int = 8, bandwidth_octaves: float = 1.0, compress: str = "log1p"):
    """Build the Gabor-energy ``torch.nn.Module``.

    Parameters
    ----------
    image_size : int
        Side of the (square) input in pixels.
    cycles_per_image : sequence of float
        Centre spatial frequencies; each must be below the Nyquist limit ``image_size / 2``.
    n_orientations : int
        Orientations evenly spaced over 180°.
    grid : int
        Energies are averaged on a ``grid × grid`` spatial grid.
    bandwidth_octaves : float
        Full width at half maximum of the radial frequency response, in octaves.
    compress : {"log1p", "none"}
        Compressive nonlinearity applied to the energies before pooling.

    Returns
    -------
    torch.nn.Module
        ``forward(x [n, 3, S, S]) -> [n, n_scales * n_orientations, grid, grid]`` with ``x`` in
        [0, 1] pixel units.
    """
    cpi = _check_params(image_size, cycles_per_image, n_orientations, grid, compress)
    torch = soft_import("torch", "Gabor features")
    nn = torch.nn

    class GaborEnergy(nn.Module):
        def __init__(self):
            super().__init__()
            self.image_size = int(image_size)
            self.n_orientations = int(n_orientations)
            self.grid = int(grid)
            self.compress = compress
            P = 2 * self.image_size  # zero-padded FFT size
            fy = torch.fft.fftfreq(P, dtype=torch.float64).view(P, 1)  # cycles/pixel along rows (y)
            fx = torch.fft.fftfreq(P, dtype=torch.float64).view(1, P)  # along columns (x)
            ratio = (2.0 ** bandwidth_octaves - 1.0) / (2.0 ** bandwidth_octaves + 1.0)
            filters = []
            for c in cpi:
                f = c / self.image_size
                sigma = f * ratio / math.sqrt(2.0 * math.log(2.0))
                for k in range(self.n_orientations):
                    th = math.pi * k / self.n_orientations
                    u0, v0 = f * math.cos(th), f * math.sin(th)
                    g = torch.exp(-((fx - u0) ** 2 + (fy - v0) ** 2) / (2.0 * sigma ** 2))
                    filters.append(g)
            self.register_buffer("filters", torch.stack(filters).float(), persistent=False)  # [F, P, P]

        def forward(self, x):
            S = self.image_size
            if tuple(x.shape[-2:]) != (S, S):
                raise ConfigError(f"Gabor pyramid built for {S}x{S} input; got {tuple(x.shape[-2:])}")
            w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            lum = (x * w).sum(1)
            lum = lum - lum.mean(dim=(-2, -1), keepdim=True)
            spec = torch.fft.fft2(torch.nn.functional.pad(lum, (0, S, 0, S)))  # [n, P, P]
            outs = []
            step = self.n_orientations  # one scale at a time bounds memory
            for s in range(0, self.filters.shape[0], step):
                resp = torch.fft.ifft2(spec[:, None] * self.filters[None, s:s + step])[..., :S, :S]
                energy = resp.abs()
                if self.compress == "log1p":
                    energy = torch.log1p(energy * 255.0)  # energies in 0..255 pixel units
                outs.append(torch.nn.functional.adaptive_avg_pool2d(energy, self.grid))
            return torch.cat(outs, dim=1)

    return GaborEnergy()


def _check_params(image_size, cycles_per_image, n_orientations, grid, compress) -> tuple[float, ...]:
    cpi = tuple(float(c) for c in cycles_per_image)
    if not cpi or min(cpi) <= 0 or max(cpi) >= image_size / 2:
        raise ConfigError(f"'cycles_per_image' must lie in (0, image_size/2={image_size / 2}); got {cpi}")
    if n_orientations < 1 or grid < 1 or grid > image_size:
        raise ConfigError(f"invalid Gabor parameters: n_orientations={n_orientations}, grid={grid}")
    if compress not in ("log1p", "none"):
        raise ConfigError(f"'compress' must be one of {{'log1p', 'none'}}; {compress!r} was provided")
    return cpi


class GaborBackbone(Backbone):
    """Gabor-energy pyramid; only layer ``"last"`` (tokens ``[n, grid², n_scales * n_orient]``)."""

    family = "gabor"

    def _forward_full(self, x):
        return self.module(x).mean(dim=(-2, -1))

    def _forward_last(self, x, embedding):
        maps = self.module(x)
        return maps, (maps.mean(dim=(-2, -1)) if embedding else None)


def plan_gabor(name: str, pretrained=None, weights=None, image_size=None, seed: int = 0, **params) -> BackbonePlan:
    """The filter bank's config and preprocessing (no torch, nothing built)."""
    if pretrained not in (None, "random", "fixed") or weights is not None:
        raise ConfigError("'gabor' has no weights; leave 'pretrained' and 'weights' unset")
    pop_unknown(params, {"cycles_per_image", "n_orientations", "grid", "bandwidth_octaves", "compress"}, name)
    size = int(image_size or 128)
    cfg = {"image_size": size, "cycles_per_image": [2, 4, 8, 16, 32], "n_orientations": 8, "grid": 8,
           "bandwidth_octaves": 1.0, "compress": "log1p"}
    cfg.update(params)
    cfg["cycles_per_image"] = [float(c) for c in cfg["cycles_per_image"]]
    _check_params(size, cfg["cycles_per_image"], cfg["n_orientations"], cfg["grid"], cfg["compress"])
    pre = Preprocess(size=(size, size), resize_mode="shortest", crop_pct=1.0, interpolation="bilinear",
                     mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return BackbonePlan(name, GaborBackbone.family, WeightsRef("fixed", label="fixed:gabor-energy-v1"), versions={},
                        config=cfg, preprocess=pre, n_blocks=0)


def _make_gabor(name: str, **overrides) -> GaborBackbone:
    plan = plan_gabor(name, **overrides)
    module = make_gabor_module(**plan.config)
    backbone = GaborBackbone(name, module, plan.preprocess, plan.weights.identity(), plan.config)
    return plan.check_built(backbone)


BACKBONES.register("gabor", _make_gabor, family="gabor", weights="none (fixed filters)", plan=plan_gabor)
