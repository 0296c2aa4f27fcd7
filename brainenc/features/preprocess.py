"""Batched image preprocessing as torch ops (no PIL round trip).

:meth:`Preprocess.transform` is the one implementation (float tensors in [0, 1], differentiable);
``Preprocess.__call__`` scales uint8 images to [0, 1] and calls it.

Each backbone derives a :class:`Preprocess` from its own configuration (open_clip
``preprocess_cfg``, timm ``resolve_model_data_config``, EfficientNet-Lite's size and ImageNet
statistics); :meth:`Preprocess.to_dict` is part of the feature-cache key.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from brainenc._utils.validation import check_option
from brainenc.exceptions import ConfigError

__all__ = ["Preprocess", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Resize, crop and normalise uint8 images ``[n, H, W, 3]`` into float ``[n, 3, h, w]``.

    Parameters
    ----------
    size : (int, int)
        Output ``(height, width)`` fed to the network.
    resize_mode : {"shortest", "squash", "longest"}
        ``"shortest"``: scale so the shorter side equals ``shortest_size`` then centre-crop
        ``size`` (torchvision ``Resize(int)`` + ``CenterCrop``; timm/EfficientNet eval transform);
        ``"squash"``: resize directly to ``size`` (aspect ratio not kept);
        ``"longest"``: scale so the longer side fits ``size`` and pad with ``fill`` (open_clip).
    crop_pct : float
        For ``"shortest"``: the shorter side is first resized to ``floor(min(size) / crop_pct)``
        (timm convention; 1.0 means no border is cropped beyond the aspect-ratio crop).
    interpolation : {"bilinear", "bicubic", "nearest"}
        Antialiased torch interpolation (close to PIL's).
    mean, std : tuple of 3 floats
        Per-channel normalisation applied to pixel values scaled to [0, 1].
    fill : float
        Pad value in [0, 1] pixel units for ``"longest"``.
    """

    size: tuple[int, int] = (224, 224)
    resize_mode: str = "shortest"
    crop_pct: float = 1.0
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    fill: float = 0.0

    def __post_init__(self):
        size = self.size
        if isinstance(size, (int, np.integer)):
            size = (int(size), int(size))
        object.__setattr__(self, "size", (int(size[0]), int(size[1])))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        check_option("resize_mode", self.resize_mode, ["shortest", "squash", "longest"])
        check_option("interpolation", self.interpolation, ["bilinear", "bicubic", "nearest"])
        if min(self.size) < 1 or not (0 < self.crop_pct <= 1.0):
            raise ConfigError(f"invalid preprocessing size {self.size} / crop_pct {self.crop_pct}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"'mean'/'std' must have 3 entries (std > 0); got {self.mean} / {self.std}")

    def with_size(self, size: int | tuple[int, int]) -> "Preprocess":
        """Copy with another output size (an ``image_size`` override)."""
        return dataclasses.replace(self, size=size)

    def to_dict(self) -> dict:
        return {
            "size": list(self.size), "resize_mode": self.resize_mode, "crop_pct": round(self.crop_pct, 6),
            "interpolation": self.interpolation, "mean": [round(v, 8) for v in self.mean],
            "std": [round(v, 8) for v in self.std], "fill": self.fill,
        }

    def __call__(self, images, device="cpu"):
        """Apply to a batch of uint8 images (the feature-extraction path).

        Parameters
        ----------
        images : ndarray, uint8, shape (n, H, W, 3)
        device : str or torch.device

        Returns
        -------
        torch.Tensor, float32, shape (n, 3, size[0], size[1])
            :meth:`transform` of the images scaled to [0, 1].
        """
        import torch

        arr = np.asarray(images)
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise ConfigError(f"images must be uint8 [n, H, W, 3]; got {arr.dtype} {arr.shape}")
        x = torch.from_numpy(np.ascontiguousarray(arr)).to(device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        return self.transform(x)

    def transform(self, x):
        """Resize, crop and normalise float images, differentiably (the one implementation).

        Exactly the operations ``Preprocess.__call__`` applies after scaling uint8 pixels to [0, 1];
        every op is out of place, so gradients flow back to ``x`` (bicubic overshoot is clamped
        to [0, 1] as PIL does, which passes no gradient where it clips).

        Parameters
        ----------
        x : torch.Tensor, floating, shape (n, 3, H, W)
            Pixel values in [0, 1], any size; computed in ``x``'s dtype on ``x``'s device.

        Returns
        -------
        torch.Tensor, shape (n, 3, size[0], size[1]), contiguous
        """
        import torch
        import torch.nn.functional as F

        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
            raise ConfigError(f"images must be a float tensor [n, 3, H, W] in [0, 1]; got {getattr(x, 'dtype', '')} "
                              f"{shape}")
        H, W = x.shape[-2:]
        th, tw = self.size
        kw = {"mode": self.interpolation}
        if self.interpolation != "nearest":
            kw.update(align_corners=False, antialias=True)

        def _resize(t, hw):
            if tuple(t.shape[-2:]) == tuple(hw):
                return t
            return F.interpolate(t, size=hw, **kw)

        if self.resize_mode == "squash":
            x = _resize(x, (th, tw))
        elif self.resize_mode == "shortest":
            short = int(math.floor(min(th, tw) / self.crop_pct)) if self.crop_pct < 1.0 else max(th, tw)
            # torchvision Resize(int): shorter side -> short, longer side truncated proportionally
            if H <= W:
                nh, nw = short, int(short * W / H)
            else:
                nh, nw = int(short * H / W), short
            x = _resize(x, (nh, nw))
            if nh < th or nw < tw:  # crop larger than the image: pad like torchvision CenterCrop
                ph, pw = max(th - nh, 0), max(tw - nw, 0)
                x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
                nh, nw = x.shape[-2:]
            top = int(round((nh - th) / 2.0))
            left = int(round((nw - tw) / 2.0))
            x = x[..., top:top + th, left:left + tw]
        else:  # longest
            scale = min(th / H, tw / W)
            nh, nw = max(1, round(H * scale)), max(1, round(W * scale))
            x = _resize(x, (nh, nw))
            ph, pw = th - nh, tw - nw
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=float(self.fill))
        if self.interpolation == "bicubic":
            x = x.clamp(0.0, 1.0)  # PIL clamps bicubic overshoot to the uint8 range
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous()
