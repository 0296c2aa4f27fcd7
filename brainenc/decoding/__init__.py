"""brainenc.decoding: from voxels back to image features and images.

- :class:`RidgeDecoder`: voxels -> any feature target (CNN maps, CLIP embeddings or tokens).
- :mod:`brainenc.decoding.lowlevel`: images whose frozen-CNN maps match predicted maps (feature
  inversion with a pixel or deep-image-prior parameterisation; Brain-IT's VGG tokenisation).
- :mod:`brainenc.decoding.diffusion`: diffusion models started from the low-level image and
  conditioned on predicted CLIP targets (MindEye2's SDXL-unCLIP with our Euler loop, Stable
  unCLIP, img2img). diffusers is imported only when these run.
"""
from brainenc.decoding.ridge import RidgeDecoder, flatten_targets, unflatten_targets

__all__ = ["RidgeDecoder", "flatten_targets", "unflatten_targets"]
