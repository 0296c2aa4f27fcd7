"""Shared fixtures: tiny random-init backbones and a few real photos (scikit-image, offline)."""
import numpy as np
import pytest

TINY_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session", autouse=True)
def _two_threads():
    import torch

    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def photos():
    """Real photos as uint8 [H, W, 3] (scikit-image ships them in the wheel)."""
    import skimage.data as d

    return {"chelsea": d.chelsea(), "coffee": d.coffee(), "astronaut": d.astronaut(), "rocket": d.rocket()}


@pytest.fixture(scope="session")
def lite0():
    from brainenc.features import create_backbone

    return create_backbone("efficientnet-lite0")


@pytest.fixture(scope="session")
def tiny_clip_cfg():
    """open_clip model kwargs of a 2-block, 64-wide ViT on 32 px inputs (4x4 patches of 8 px)."""
    return TINY_CLIP_CFG


@pytest.fixture(scope="session")
def tiny_clip():
    from brainenc.features import create_backbone

    return create_backbone("clip:ViT-B-32", pretrained="random", model_cfg=TINY_CLIP_CFG, seed=0)


@pytest.fixture
def small_images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(7, 40, 48, 3), dtype=np.uint8)
