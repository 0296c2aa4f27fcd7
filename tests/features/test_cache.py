"""extract_features: cache hits/misses for every key component, fp16, resume after a kill, no partial reads."""
import numpy as np
import pytest

from brainenc.exceptions import ConfigError, DataFormatError
from brainenc.features import ArrayImages, FeatureSpec, extract_features, load_feature_set


def _spec(cfg, **kw):
    base = dict(backbone="clip:ViT-B-32", pretrained="random", options={"model_cfg": cfg}, batch_size=3)
    base.update(kw)
    return FeatureSpec(**base)


class CountingImages(ArrayImages):
    """ArrayImages that counts reads and can fail on the k-th call (a killed run)."""

    def __init__(self, array, fail_on=None):
        super().__init__(array)
        self.calls = 0
        self.fail_on = fail_on

    def read(self, ids):
        self.calls += 1
        if self.fail_on is not None and self.calls == self.fail_on:
            raise KeyboardInterrupt("killed")
        return super().read(ids)


def test_hit_and_shapes_and_rules(tmp_path, tiny_clip, tiny_clip_cfg, small_images):
    ids = np.array([4, 0, 6, 2, 1])
    spec = _spec(tiny_clip_cfg, layer="blocks.1", pooled="cls")
    a = extract_features(small_images, ids, spec, tmp_path, backbone=tiny_clip)
    assert not a.cache_hit and a.tokens.shape == (5, 16, 64) and a.pooled.shape == (5, 64) and a.grid == (4, 4)
    assert a.tokens.dtype == np.float32 and isinstance(a.tokens, np.memmap)
    np.testing.assert_array_equal(a.image_ids, ids)
    b = extract_features(small_images, ids, spec, tmp_path)  # backbone rebuilt from the spec: same key
    assert b.cache_hit and b.key == a.key
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    # rows equal a direct forward pass of the same images
    x = tiny_clip.preprocess_images(small_images[ids])
    out = tiny_clip.forward_layer(x, "blocks.1")
    np.testing.assert_allclose(a.tokens, out.tokens[:, 1:].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.pooled, out.tokens[:, 0].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a.rows_for([1, 4, 1]), [4, 0, 4])
    with pytest.raises(DataFormatError, match="not in this feature set"):
        a.rows_for([3])
    allt = extract_features(small_images, ids, _spec(tiny_clip_cfg, layer=1, tokens="all", pooled="model"),
                            tmp_path, backbone=tiny_clip)
    assert allt.tokens.shape == (5, 17, 64) and allt.n_prefix == 1 and allt.pooled.shape == (5, 16)
    np.testing.assert_allclose(allt.tokens[:, 1:], a.tokens, rtol=1e-5, atol=1e-6)


def test_every_key_component_misses(tmp_path, tiny_clip_cfg, small_images):
    ids = np.arange(4)
    base = _spec(tiny_clip_cfg, layer="blocks.0")
    ref = extract_features(small_images, ids, base, tmp_path)
    variants = {
        "layer": (small_images, ids, _spec(tiny_clip_cfg, layer="blocks.1")),
        "dtype": (small_images, ids, _spec(tiny_clip_cfg, layer="blocks.0", dtype="float16")),
        "image_size": (small_images, ids, _spec(tiny_clip_cfg, layer="blocks.0", image_size=48)),
        "seed": (small_images, ids, _spec(tiny_clip_cfg, layer="blocks.0", seed=1)),
        "tokens": (small_images, ids, _spec(tiny_clip_cfg, layer="blocks.0", tokens="all")),
        "pooled": (small_images, ids, _spec(tiny_clip_cfg, layer="blocks.0", pooled="model")),
        "ids": (small_images, np.array([0, 1, 3, 2]), base),
        "pixels": (np.ascontiguousarray(small_images[:, ::-1]), ids, base),
        "architecture": (small_images, ids, _spec({**tiny_clip_cfg, "vision_cfg": {**tiny_clip_cfg["vision_cfg"],
                                                                                    "layers": 3}}, layer="blocks.0")),
        "backbone": (small_images, ids, _spec(tiny_clip_cfg, backbone="clip:ViT-B-16", layer="blocks.0")),
    }
    keys = {ref.key}
    for what, (imgs, vids, spec) in variants.items():
        fs = extract_features(imgs, vids, spec, tmp_path)
        assert not fs.cache_hit, what
        keys.add(fs.key)
    assert len(keys) == len(variants) + 1
    fp16 = extract_features(small_images, ids, variants["dtype"][2], tmp_path)
    assert fp16.cache_hit and fp16.tokens.dtype == np.float16
    np.testing.assert_allclose(fp16.tokens, ref.tokens, rtol=2e-3, atol=2e-3)
    big = extract_features(small_images, ids, variants["image_size"][2], tmp_path)
    assert big.grid == (6, 6) and big.tokens.shape[1] == 36
    # batch size is not part of the key
    assert extract_features(small_images, ids, _spec(tiny_clip_cfg, layer="blocks.0", batch_size=2), tmp_path).cache_hit


def test_weights_file_content_changes_key(tmp_path, small_images):
    import torch
    from safetensors.torch import load_file, save_file

    from brainenc.features import create_backbone

    tiny = create_backbone("timm:vit_tiny_patch16_224", pretrained="random", depth=1, img_size=32)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.module.state_dict().items()}, str(path))
    spec = FeatureSpec(backbone="timm:vit_tiny_patch16_224", weights=str(path), options={"depth": 1, "img_size": 32})
    a = extract_features(small_images, [0, 1], spec, tmp_path / "cache")
    assert extract_features(small_images, [0, 1], spec, tmp_path / "cache").cache_hit
    state = load_file(str(path))
    state["blocks.0.mlp.fc1.bias"] = state["blocks.0.mlp.fc1.bias"] + 1.0
    save_file(state, str(path))  # same path, new content
    b = extract_features(small_images, [0, 1], spec, tmp_path / "cache")
    assert not b.cache_hit and b.key != a.key
    assert not np.allclose(a.tokens, b.tokens)
    assert torch.is_tensor(state["blocks.0.mlp.fc1.bias"])


def test_killed_run_resumes_and_never_returns_partial(tmp_path, tiny_clip, tiny_clip_cfg, small_images):
    ids = np.arange(7)  # batches of 3: rows 0-2, 3-5, 6
    spec = _spec(tiny_clip_cfg, layer="last")
    src = CountingImages(small_images, fail_on=3)
    with pytest.raises(KeyboardInterrupt):
        extract_features(src, ids, spec, tmp_path, backbone=tiny_clip)
    folders = [p for p in (tmp_path / "clip_ViT-B-32").iterdir()]
    assert len(folders) == 1  # only the resumable work folder: no entry under its final name, no lock
    folder = folders[0]
    assert folder.name.startswith(".") and folder.name.endswith(".partial")
    assert not (folder / "COMPLETE").exists() and (folder / "tokens.partial.npy").exists()
    with pytest.raises(DataFormatError, match="COMPLETE"):
        load_feature_set(folder)
    resumed_src = CountingImages(small_images)
    fs = extract_features(resumed_src, ids, spec, tmp_path, backbone=tiny_clip)
    assert not fs.cache_hit and resumed_src.calls == 1  # only the last batch was recomputed
    fresh = extract_features(small_images, ids, spec, tmp_path / "fresh", backbone=tiny_clip)
    np.testing.assert_allclose(fs.tokens, fresh.tokens, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fs.pooled, fresh.pooled, rtol=1e-6, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "clip_ViT-B-32").iterdir()) == [fs.path.name]  # no work folder, no lock
    assert not (fs.path / "progress.json").exists() and fs.path.name == folder.name[1:-len(".partial")]


def test_damaged_entry_is_recomputed_and_spec_validation(tmp_path, tiny_clip, tiny_clip_cfg, small_images):
    spec = _spec(tiny_clip_cfg, layer=0)
    a = extract_features(small_images, [0, 1, 2], spec, tmp_path, backbone=tiny_clip)
    (a.path / "pooled.npy").write_bytes(b"garbage")
    b = extract_features(small_images, [0, 1, 2], spec, tmp_path, backbone=tiny_clip)
    assert not b.cache_hit and b.pooled.shape == (3, 64)
    c = extract_features(small_images, [0, 1, 2], spec, tmp_path, backbone=tiny_clip, overwrite=True)
    assert not c.cache_hit
    with pytest.raises(ConfigError, match="nothing to extract"):
        FeatureSpec(tokens="none", pooled="none").check()
    with pytest.raises(ConfigError, match="'dtype' must be one of"):
        FeatureSpec(dtype="bfloat16").check()
    with pytest.raises(ConfigError, match="does not match"):
        extract_features(small_images, [0], FeatureSpec(backbone="gabor"), tmp_path, backbone=tiny_clip)
    with pytest.raises(ConfigError, match="class token"):
        extract_features(small_images, [0], FeatureSpec(backbone="gabor", pooled="cls"), tmp_path)
    from brainenc.config import from_dict

    spec2 = from_dict(FeatureSpec, {"backbone": "gabor", "layer": "last", "tokens": "none", "options": {"grid": 4}})
    g = extract_features(small_images, [5, 6], spec2, tmp_path)
    assert g.tokens is None and g.pooled.shape == (2, 40) and g.grid == (4, 4)
