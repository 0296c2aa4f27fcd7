"""Encoding estimators (image features -> voxel responses), sklearn-style.

- :class:`RidgeEncoder`: ridge with per-voxel alpha chosen by K-fold CV or GCV/LOO.
- :class:`BandedRidgeEncoder`: banded ridge over several feature spaces.
- :class:`RoutingEncoder`: transformer brain encoder with attention routing (ROI or voxel queries).

``score`` of every estimator returns one value per voxel, shape ``(n_voxels,)``.
Importing this package registers every estimator (for ``brainenc.load``) without importing torch:
the routing encoder imports it when it is fitted or loaded.
"""
from brainenc.encoding._ridge_solvers import solve_banded_ridge_cv, solve_ridge, solve_ridge_cv, solve_ridge_gcv
from brainenc.encoding.banded import BandedRidgeEncoder, make_band_gammas
from brainenc.encoding.ridge import DEFAULT_ALPHAS, RidgeEncoder
from brainenc.encoding.routing import RoutingEncoder

__all__ = [
    "RidgeEncoder",
    "BandedRidgeEncoder",
    "RoutingEncoder",
    "DEFAULT_ALPHAS",
    "make_band_gammas",
    "solve_ridge",
    "solve_ridge_cv",
    "solve_ridge_gcv",
    "solve_banded_ridge_cv",
]

