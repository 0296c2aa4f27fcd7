"""Tiny random-init open_clip and timm ViTs: token layout (incl. OpenCLIP LND), layers, weights handling."""
import copy
import time

import numpy as np
import pytest
import torch

from brainenc.exceptions import ConfigError, MissingWeightsError
from brainenc.features import create_backbone
from brainenc.features.openclip import OpenCLIPBackbone


def _lnd_twin(backbone: OpenCLIPBackbone) -> OpenCLIPBackbone:
    """Same weights, transformer rebuilt with batch_first=False (the layout of older open_clip)."""
    from open_clip.transformer import Transformer

    visual = copy.deepcopy(backbone.module)
    old = visual.transformer
    blk = old.resblocks[0]
    new = Transformer(old.width, len(old.resblocks), blk.attn.num_heads,
                      mlp_ratio=blk.mlp.c_fc.out_features / old.width, act_layer=type(blk.mlp.gelu),
                      norm_layer=type(blk.ln_1), batch_first=False)
    new.load_state_dict(old.state_dict())
    visual.transformer = new
    return OpenCLIPBackbone(backbone.name, visual, backbone.preprocess, backbone.weights_id, backbone.config)


def _direct_blocks(visual, x, upto):
    """Reference: embeddings then blocks applied by hand in (batch, seq, dim) layout."""
    with torch.inference_mode():
        h = visual._embeds(x)
        for blk in visual.transformer.resblocks[: upto + 1]:
            h = blk(h)
    return h


@pytest.mark.parametrize("n_images", [3, 17])  # 17 == sequence length: layout cannot be guessed from shapes
def test_openclip_hook_tokens_are_nld_for_both_layouts(tiny_clip, n_images):
    lnd = _lnd_twin(tiny_clip)
    assert tiny_clip.batch_first is True and lnd.batch_first is False
    x = torch.randn(n_images, 3, 32, 32, generator=torch.Generator().manual_seed(n_images))
    for layer in ("blocks.0", "blocks.1"):
        ref = _direct_blocks(tiny_clip.module, x, int(layer[-1]))
        for bb in (tiny_clip, lnd):
            out = bb.forward_layer(x, layer)
            assert out.tokens.shape == (n_images, 17, 64) and out.n_prefix == 1 and out.grid == (4, 4)
            torch.testing.assert_close(out.tokens, ref, atol=1e-5, rtol=1e-4)
    # the trap itself: a naive hook on the LND model returns (seq, batch, dim) data
    raw, _ = lnd._forward_hooked(x, lnd.blocks[-1], embedding=False)
    assert raw.shape == (17, n_images, 64)
    torch.testing.assert_close(raw.transpose(0, 1), ref, atol=1e-5, rtol=1e-4)
    if n_images == 17:  # same shape, wrong numbers: what a layout-blind extractor would store
        assert not torch.allclose(raw, ref, atol=1e-3)


def test_openclip_last_layer_matches_model_forward(tiny_clip):
    lnd = _lnd_twin(tiny_clip)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    visual = tiny_clip.module
    visual.output_tokens = True
    try:
        with torch.inference_mode():
            pooled_ref, tokens_ref = visual(x)
    finally:
        visual.output_tokens = False
    for bb in (tiny_clip, lnd):
        out = bb.forward_layer(x, "last", embedding=True)
        torch.testing.assert_close(out.tokens[:, 1:], tokens_ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.embedding, pooled_ref, atol=1e-5, rtol=1e-4)
        assert out.embedding.shape == (4, 16)


def test_openclip_preprocess_and_layer_names(tiny_clip):
    pre = tiny_clip.preprocess
    assert pre.size == (32, 32) and pre.interpolation == "bicubic" and pre.resize_mode == "shortest"
    assert pre.mean[0] == pytest.approx(0.48145466)
    assert tiny_clip.layer_names() == ["blocks.0", "blocks.1", "last"]
    assert tiny_clip.resolve_layer("transformer.resblocks.1") == "blocks.1"
    assert tiny_clip.weights_id.startswith("random-init+seed=0")


def test_openclip_weights_file_roundtrip(tmp_path, tiny_clip, tiny_clip_cfg):
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None, **tiny_clip_cfg)
    path = tmp_path / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    # a tag without QuickGELU so the architecture equals the random model's
    bb = create_backbone("clip:ViT-B-32", pretrained="laion2b_s34b_b79k", weights=str(path), model_cfg=tiny_clip_cfg)
    assert bb.weights_id.startswith("sha256:")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(bb.forward_layer(x, 1).tokens, tiny_clip.forward_layer(x, 1).tokens)


def test_openclip_missing_weights_fail_fast(tmp_path):
    for name, tag in (("clip:ViT-L-14", None), ("clip:ViT-bigG-14", None), ("clip:ViT-B-32", "laion2b_s34b_b79k")):
        t0 = time.perf_counter()
        with pytest.raises(MissingWeightsError) as err:
            create_backbone(name, pretrained=tag, cache_dir=str(tmp_path))
        assert time.perf_counter() - t0 < 1.0
        msg = str(err.value)
        assert "\n" not in msg and "weights=<path" in msg and "never downloads" in msg
    assert "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k" in str(
        pytest.raises(MissingWeightsError, create_backbone, "clip:ViT-bigG-14", cache_dir=str(tmp_path)).value)
    with pytest.raises(ConfigError, match="unknown pretrained tag"):
        create_backbone("clip:ViT-B-32", pretrained="nonsense")
    with pytest.raises(ConfigError, match="unknown open_clip model"):
        create_backbone("clip:ViT-B-33")
    with pytest.raises(MissingWeightsError, match="weights file not found"):
        create_backbone("clip:ViT-B-32", weights=str(tmp_path / "missing.bin"))


@pytest.fixture(scope="module")
def tiny_vit():
    return create_backbone("timm:vit_tiny_patch16_224", pretrained="random", depth=2, img_size=32, seed=1)


def test_timm_tokens_match_forward_intermediates(tiny_vit):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert tiny_vit.preprocess.size == (32, 32)
    m = tiny_vit.module
    with torch.inference_mode():
        inter = m.forward_intermediates(x, indices=[0, 1], output_fmt="NLC", intermediates_only=True,
                                        return_prefix_tokens=True)
        feats = m.forward_features(x)
        emb = m.forward_head(feats, pre_logits=True)
    for i in (0, 1):
        out = tiny_vit.forward_layer(x, f"blocks.{i}")
        assert out.tokens.shape == (3, 5, 192) and out.n_prefix == 1 and out.grid == (2, 2)
        patches, prefix = inter[i]
        torch.testing.assert_close(out.tokens[:, 1:], patches)
        torch.testing.assert_close(out.tokens[:, :1], prefix)
    last = tiny_vit.forward_layer(x, "last", embedding=True)
    torch.testing.assert_close(last.tokens, feats)
    torch.testing.assert_close(last.embedding, emb)


def test_timm_weights_path_and_missing_dinov2(tmp_path, tiny_vit):
    from safetensors.torch import save_file

    path = tmp_path / "tiny_vit.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vit.module.state_dict().items()}, str(path))
    bb = create_backbone("timm:vit_tiny_patch16_224", weights=str(path), depth=2, img_size=32)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(bb.forward_layer(x, "last").tokens, tiny_vit.forward_layer(x, "last").tokens)
    assert bb.weights_id.startswith("sha256:") and tiny_vit.weights_id.startswith("random-init+seed=1")
    t0 = time.perf_counter()
    with pytest.raises(MissingWeightsError, match="vit_base_patch14_dinov2") as err:
        create_backbone("timm:vit_base_patch14_dinov2", cache_dir=str(tmp_path))
    assert time.perf_counter() - t0 < 1.0 and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="unknown timm model"):
        create_backbone("timm:vit_tinyy_patch16_224")


def test_import_is_light():
    import subprocess
    import sys

    code = ("import sys, brainenc.features as F; F.list_backbones(); "
            "print(','.join(m for m in ('torch', 'open_clip', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
