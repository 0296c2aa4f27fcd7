"""Training jobs used by test_ddp.py: run under torchrun (2 ranks, gloo) or in-process (1 rank).

Writes the final weights of rank 0 to ``<out>/weights_<optimizer>.safetensors`` for each optimizer
in OPTIMIZERS (one torchrun start for both).
"""
import os
import sys

import numpy as np
import torch

#: AdamW is the default optimiser; SGD's update is linear in the gradient, so it also shows a
#: gradient that is summed instead of averaged over ranks (AdamW is invariant to that scale).
OPTIMIZERS = {
    "adamw": dict(lr=1e-2),
    "sgd": dict(optimizer="sgd", lr=0.05, momentum=0.9, grad_clip=0.0),
}


def make_data():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((24, 12, 16)).astype(np.float32)
    Y = (X[:, 3, :10] + 0.1 * rng.standard_normal((24, 10))).astype(np.float32)
    return X, Y


def run(out_dir: str, optimizer: str = "adamw") -> dict:
    from brainenc.models import build_query_set, create_model
    from brainenc.training import TrainConfig, Trainer, init_distributed, save_tensors

    info = init_distributed("gloo")
    X, Y = make_data()
    qs = build_query_set("hemis", 10, hemi=np.array(["lh"] * 5 + ["rh"] * 5))
    torch.manual_seed(0)
    model = create_model("routing_encoder_tiny", feature_dim=16, grid=(3, 4), n_voxels=10, dropout=0.0, query_set=qs)
    # 20 training rows, global batch 8: batches 8, 8, 4 -> shards 4+4, 4+4, 2+2
    cfg = TrainConfig(epochs=2, batch_size=8, seed=3, device="cpu", **OPTIMIZERS[optimizer])
    res = Trainer(model, cfg).fit(X[:20], Y[:20], (X[20:], Y[20:]))
    if info.rank == 0:
        save_tensors(os.path.join(out_dir, f"weights_{optimizer}.safetensors"), model.state_dict())
    return {"history": res.history, "rank": info.rank}


if __name__ == "__main__":
    torch.set_num_threads(1)
    for name in OPTIMIZERS:
        run(sys.argv[1], name)
    from brainenc.training import cleanup_distributed

    cleanup_distributed()
