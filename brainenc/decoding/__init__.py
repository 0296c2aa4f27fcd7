"""brainenc.decoding: from voxels back to image features and images.

- :class:`RidgeDecoder`: voxels -> any feature target (CNN maps, CLIP embeddings or tokens).
- :mod:`brainenc.decoding.lowlevel`: images whose frozen-CNN maps match predicted maps (feature
  inversion with a pixel or deep-image-prior parameterisation; Brain-IT's VGG tokenisation).
- :mod:`brainenc.decoding.diffusion`: diffusion models started from the low-level image and
  conditioned on predicted CLIP targets (MindEye2's SDXL-unCLIP with our Euler loop, Stable
  unCLIP, img2img). diffusers is imported only when these run.
"""
from brainenc.decoding.ridge import RidgeDecoder, flatten_targets, match_train_statistics, unflatten_targets
from brainenc.decoding.lowlevel import (
    FEATURE_CNNS,
    LITE0_LAYERS,
    VGG16_BN_LAYERS,
    VGG_TOKEN_COUNT,
    DeepImagePrior,
    FeatureCNN,
    InversionResult,
    build_feature_cnn,
    invert_features,
    map_shapes,
    tokens_to_vgg_maps,
    vgg_maps_to_tokens,
)
from brainenc.decoding.diffusion import (
    euler_scheduler,
    img2img_reconstruct,
    load_pipeline,
    load_sdxl_unclip,
    size_crop_vector,
    stable_unclip_reconstruct,
    start_step_arithmetic,
    unclip_reconstruct,
)

from brainenc.decoding.brainit import (
    BrainITDecoder,
    FunctionalClusters,
    UniversalBrainEncoder,
    concat_token_scales,
    maps_to_tokens,
    sample_voxels,
)
__all__ = [
    "UniversalBrainEncoder",
    "FunctionalClusters",
    "BrainITDecoder",
    "concat_token_scales",
    "maps_to_tokens",
    "sample_voxels",
    "RidgeDecoder",
    "flatten_targets",
    "unflatten_targets",
    "match_train_statistics",
    "FeatureCNN",
    "build_feature_cnn",
    "DeepImagePrior",
    "InversionResult",
    "invert_features",
    "map_shapes",
    "vgg_maps_to_tokens",
    "tokens_to_vgg_maps",
    "FEATURE_CNNS",
    "VGG16_BN_LAYERS",
    "LITE0_LAYERS",
    "VGG_TOKEN_COUNT",
    "size_crop_vector",
    "euler_scheduler",
    "start_step_arithmetic",
    "load_sdxl_unclip",
    "unclip_reconstruct",
    "load_pipeline",
    "stable_unclip_reconstruct",
    "img2img_reconstruct",
]
