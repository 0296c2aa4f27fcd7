"""The pixel diffusion prior: denoising objective, train -> save -> load round trip with hash check,
resume, and the shipped prior."""
import json

import numpy as np
import pytest
import torch

from brainenc.exceptions import DataFormatError, MissingWeightsError
from brainenc.synthesis import (DenoisingObjective, PriorConfig, load_prior, save_prior, scene_images,
                                shipped_prior_path, train_prior)

TINY = dict(image_size=16, block_out_channels=[16, 16], norm_num_groups=8, n_images=24,
            train={"epochs": 3, "batch_size": 8, "device": "cpu", "lr": 2e-3})


def _unet():
    from brainenc.synthesis.prior import build_prior_unet

    return build_prior_unet(PriorConfig(**{k: v for k, v in TINY.items() if k != "train"}))


def test_denoising_draws_depend_on_row_not_batch():
    ac = torch.linspace(0.999, 0.01, 1000)
    obj = DenoisingObjective(ac, seed=3)
    t1, n1, f1 = obj.draws(torch.tensor([5, 9, 2]), (3, 4, 4), stream=0, epoch=1)
    t2, n2, f2 = obj.draws(torch.tensor([9]), (3, 4, 4), stream=0, epoch=1)
    assert t1[1] == t2[0] and torch.equal(n1[1], n2[0]) and f1[1] == f2[0]
    t3, n3, _ = obj.draws(torch.tensor([9]), (3, 4, 4), stream=0, epoch=2)
    assert not torch.equal(n3[0], n2[0])


def test_denoising_loss_equals_direct_computation():
    unet = _unet().eval()
    ac = torch.linspace(0.999, 0.01, 1000)
    obj = DenoisingObjective(ac, seed=0, flip=False)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    idx = torch.tensor([0, 4, 7])
    parts = obj.loss(unet, {"x": x, "index": idx})
    t, noise, _ = obj.draws(idx, (3, 16, 16), stream=0, epoch=0)
    a = ac.double()[t].float()[:, None, None, None]
    with torch.no_grad():
        pred = unet(a.sqrt() * x + (1 - a).sqrt() * noise, t).sample
    ref = ((pred - noise) ** 2).flatten(1).mean(1).sum()
    assert parts.count == 3 and parts.per_sample == 1
    assert float(parts.total.detach()) == pytest.approx(float(ref), rel=1e-5, abs=1e-6)


def test_scene_images_are_the_simulated_subjects_scenes():
    from brainenc.datasets._scenes import render_scene
    from brainenc.datasets.simulate import SimulationConfig, make_design

    imgs, ids = scene_images(PriorConfig(image_size=16, n_images=3), show_progress=False)
    d = make_design(SimulationConfig(seed=0))
    assert np.array_equal(ids, d["subjectim"][0, d["sim_slots"][:3] - 1] - 1)
    big = render_scene(0, int(ids[0])).image
    assert imgs.shape == (3, 16, 16, 3) and imgs.dtype == np.uint8
    # a 16 px thumbnail of the scene: its mean colour matches the full image's
    assert np.abs(imgs[0].reshape(-1, 3).mean(0) - big.reshape(-1, 3).mean(0)).max() < 6


@pytest.mark.slow
def test_train_save_load_resume_and_hash(tmp_path):
    cfg = PriorConfig(**TINY)
    unet, rec = train_prior(cfg, run_dir=tmp_path / "run")
    hist = [h["train_loss"] for h in rec["train"]["history"]]
    assert hist[-1] < hist[0]                      # a few steps lower the loss
    path = save_prior(unet, rec, tmp_path / "p")
    meta = json.loads(path.read_text())
    assert meta["data"]["n_images"] == 24 and len(meta["weights_sha256"]) == 64
    prior = load_prior(path)
    sd = unet.state_dict()
    for k, v in prior.unet.state_dict().items():   # fp16 storage
        assert torch.allclose(v, sd[k].half().float())
    assert prior.latent is False and prior.image_size == 16
    # resuming a finished run retrains nothing and gives the same weights
    unet2, rec2 = train_prior(cfg, run_dir=tmp_path / "run")
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), unet2.state_dict().values()))
    # a changed weights file is refused
    w = tmp_path / "p.safetensors"
    raw = bytearray(w.read_bytes())
    raw[-3] ^= 0xFF
    w.write_bytes(bytes(raw))
    with pytest.raises(DataFormatError, match="sha256"):
        load_prior(path)
    w.unlink()
    with pytest.raises(MissingWeightsError, match="missing"):
        load_prior(path)
    with pytest.raises(MissingWeightsError, match="train-prior"):
        load_prior(tmp_path / "nothing.json")


def test_shipped_prior_loads_and_samples_images():
    from brainenc.synthesis import GuidanceConfig, synthesize

    path = shipped_prior_path()
    meta = json.loads(path.read_text())
    assert meta["config"]["image_size"] == 32 and meta["n_parameters"] < 2_000_000
    assert path.with_name(meta["weights_file"]).stat().st_size < 5_000_000
    prior = load_prior()

    class Mean(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    out = synthesize(prior, Mean(), lambda y: y[:, 0], [0, 1, 2, 3],
                     GuidanceConfig(steps=10, scheduler="ddim", batch_size=4), guided=False)
    imgs = out["images"]
    assert imgs.shape == (4, 32, 32, 3)
    # a trained prior makes images, not saturated noise: few pixels at 0/255, smooth neighbours
    assert ((imgs == 0) | (imgs == 255)).mean() < 0.2
    f = imgs.astype(float)
    perm = np.random.default_rng(0).permutation(32 * 32)
    shuffled = f.reshape(4, -1, 3)[:, perm].reshape(f.shape)      # same pixels, no spatial structure
    assert np.abs(np.diff(f, axis=2)).mean() < 0.7 * np.abs(np.diff(shuffled, axis=2)).mean()
