"""Gabor-energy pyramid: orientation and frequency tuning on synthetic gratings."""
import numpy as np
import pytest

from brainenc.exceptions import ConfigError
from brainenc.features import create_backbone


def _grating(theta_deg, cycles, size=128):
    y, x = np.mgrid[0:size, 0:size] / size
    th = np.deg2rad(theta_deg)
    g = 0.5 + 0.4 * np.sin(2 * np.pi * cycles * (x * np.cos(th) + y * np.sin(th)))
    return np.repeat((g * 255).astype(np.uint8)[..., None], 3, axis=-1)


@pytest.fixture(scope="module")
def gabor():
    return create_backbone("gabor", n_orientations=8, cycles_per_image=[4, 8, 16, 32])


def test_gabor_orientation_and_scale_tuning(gabor):
    imgs = np.stack([_grating(k * 22.5, 16) for k in range(8)])
    out = gabor.forward_layer(gabor.preprocess_images(imgs), "last", embedding=True)
    assert out.tokens.shape == (8, 64, 32) and out.grid == (8, 8) and out.n_prefix == 0
    energy = out.embedding.numpy().reshape(8, 4, 8)  # image, scale, orientation
    # each grating drives the filter of its own orientation most, at the 16 cycles/image scale
    assert (energy[:, 2].argmax(axis=1) == np.arange(8)).all()
    assert (energy.max(axis=2).argmax(axis=1) == 2).all()
    # tuning is symmetric and falls off with angular distance
    for k in range(8):
        row = energy[k, 2]
        assert row[k] > row[(k + 1) % 8] > row[(k + 4) % 8]


def test_gabor_blank_and_spatial_pooling(gabor):
    blank = np.full((1, 128, 128, 3), 128, np.uint8)
    out = gabor.forward_layer(gabor.preprocess_images(blank), "last")
    assert float(out.tokens.abs().max()) < 1e-4
    half = _grating(0, 16)
    half[:, 64:] = 128  # texture only in the left half
    tok = gabor.forward_layer(gabor.preprocess_images(half[None]), "last").tokens[0].numpy()
    tok = tok.reshape(8, 8, 32)  # grid rows, grid cols, channels (row-major token order)
    assert tok[:, :3].mean() > 5 * tok[:, 5:].mean()


def test_gabor_options_validated():
    with pytest.raises(ConfigError, match="cycles_per_image"):
        create_backbone("gabor", cycles_per_image=[80])
    with pytest.raises(ConfigError, match="unknown option 'n_orient'"):
        create_backbone("gabor", n_orient=4)
    with pytest.raises(ConfigError, match="no weights"):
        create_backbone("gabor", weights="x.pth")
