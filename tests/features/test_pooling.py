"""pool_grid: region means of patch tokens, checked against scikit-image's block_reduce."""
import numpy as np
import pytest
from skimage.measure import block_reduce

from brainenc.exceptions import ConfigError, DataFormatError
from brainenc.features import pool_grid


def test_divisible_grid_equals_block_reduce():
    rng = np.random.default_rng(0)
    t = rng.standard_normal((3, 1 + 8 * 8, 5)).astype(np.float32)  # one CLS token first
    got = pool_grid(t, (8, 8), 4, n_prefix=1)
    want = block_reduce(t[:, 1:].reshape(3, 8, 8, 5), (1, 2, 2, 1), np.mean).reshape(3, -1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_uneven_grid_regions_cover_every_patch():
    t = np.arange(2 * 49 * 1, dtype=np.float32).reshape(2, 49, 1)
    got = pool_grid(t, (7, 7), 3).reshape(2, 3, 3)
    edges = np.linspace(0, 7, 4).round().astype(int)  # 0, 2, 5, 7
    img = t.reshape(2, 7, 7)
    for i in range(3):
        for j in range(3):
            block = img[:, edges[i]:edges[i + 1], edges[j]:edges[j + 1]]
            np.testing.assert_allclose(got[:, i, j], block.mean(axis=(1, 2)), rtol=1e-6)
    assert pool_grid(t, (7, 7), 1).ravel().tolist() == pytest.approx(img.mean(axis=(1, 2)).tolist())


def test_errors_name_the_parameter():
    t = np.zeros((1, 16, 2), np.float32)
    with pytest.raises(DataFormatError, match="grid is 3x3"):
        pool_grid(t, (3, 3), 1)
    with pytest.raises(ConfigError, match="'grid_pool'"):
        pool_grid(t, (4, 4), 5)
