"""Stimulus features from frozen vision backbones, with an on-disk cache that cannot go stale.

>>> from brainenc.features import FeatureSpec, extract_features, HDF5Images   # doctest: +SKIP
>>> fs = extract_features(HDF5Images("nsd_stimuli.hdf5"), ids, FeatureSpec("efficientnet-lite0", layer="blocks.10"))
>>> fs.tokens.shape, fs.grid, fs.pooled.shape                                  # doctest: +SKIP
((n, 196, 112), (14, 14), (n, 112))

Importing this package imports neither torch, open_clip nor timm; they load inside the
backbone factories. See ``docs/features.md`` for backbones, layer names and the cache key.
"""
from brainenc.features.backbones import BACKBONES, Backbone, BackboneOutput, create_backbone, list_backbones
from brainenc.features.cache import FeatureSet, load_feature_set
from brainenc.features.extract import FeatureSpec, extract_features
from brainenc.features.images import ArrayImages, HDF5Images, ImageSource
from brainenc.features.pooling import pool_grid
from brainenc.features.preprocess import Preprocess

__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneOutput",
    "create_backbone",
    "list_backbones",
    "FeatureSet",
    "load_feature_set",
    "FeatureSpec",
    "extract_features",
    "ArrayImages",
    "HDF5Images",
    "ImageSource",
    "Preprocess",
    "pool_grid",
]
