"""Masked-reconstruction training job used by test_objectives.py: run under torchrun (2 ranks, gloo) or
in-process (1 rank). Also home of the toy autoencoder and data the tests share.

Writes rank 0's final weights to ``<out>/weights.safetensors`` and its history to ``<out>/history.json``.
"""
import json
import os
import sys

import numpy as np
import torch
from torch import nn

T, D = 6, 4  # positions per sample, features per position


def make_data(n=24, seed=0):
    """x [n, T, D] of rank 2: every position is a linear function of 2 latent numbers, so masked
    positions are predictable from the visible ones."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 2))
    A = rng.standard_normal((2, T * D))
    x = z @ A + 0.05 * rng.standard_normal((n, T * D))
    return x.reshape(n, T, D).astype(np.float32)


class TinyAutoencoder(nn.Module):
    """[b, T, D] -> [b, T, D] through a bottleneck over the flattened sample."""

    def __init__(self, hidden=16, dropout=0.0):
        super().__init__()
        self.enc = nn.Linear(T * D, hidden)
        self.drop = nn.Dropout(dropout)
        self.dec = nn.Linear(hidden, T * D)

    def forward(self, x):
        return self.dec(self.drop(torch.tanh(self.enc(x.flatten(1))))).view_as(x)


def make_model(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return TinyAutoencoder(dropout=dropout)


def run(out_dir: str) -> dict:
    from brainenc.training import MaskedReconstruction, TrainConfig, Trainer, init_distributed, save_tensors

    info = init_distributed("gloo")
    x = make_data()
    model = make_model()
    # 20 training rows, global batch 8: batches 8, 8, 4 -> shards 4+4, 4+4, 2+2; the number of masked
    # elements differs per sample, so every step all-reduces the global count
    cfg = TrainConfig(epochs=3, batch_size=8, lr=1e-2, seed=3, device="cpu", grad_clip=1.0)
    res = Trainer(model, cfg, objective=MaskedReconstruction(0.5, seed=11)).fit({"x": x[:20]}, val={"x": x[20:]})
    if info.rank == 0:
        save_tensors(os.path.join(out_dir, "weights.safetensors"), model.state_dict())
        with open(os.path.join(out_dir, "history.json"), "w") as fh:
            json.dump({"history": res.history, "best_epoch": res.best_epoch}, fh)
    return {"history": res.history, "best_epoch": res.best_epoch, "rank": info.rank}


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(sys.argv[1])
    from brainenc.training import cleanup_distributed

    cleanup_distributed()
