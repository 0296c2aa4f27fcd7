"""Brain-IT training jobs used by test_ddp.py: run under torchrun (2 ranks, gloo) or in-process (1 rank).

Three subjects, the third in a single training row: a step's shard without it leaves that subject's
embedding block without a gradient on one rank (the case DDP must be told about), and every other step
leaves it unused on all ranks. Writes rank 0's final weights to ``<out>/{encoder,bit}.safetensors``.
"""
import os
import sys

import numpy as np
import torch

COUNTS = [40, 55, 30]


def make_data(n: int = 40):
    rng = np.random.default_rng(0)
    tokens = [rng.normal(size=(n, 9, 6)).astype(np.float32), rng.normal(size=(n, 4, 5)).astype(np.float32)]
    subject = np.where(np.arange(n) % 2 == 0, 0, 1)
    from brainenc.decoding.brainit import _split_rows

    subject[_split_rows(n, 0.2, 0)[0][5]] = 2  # the only row of subject 2, a training row (val_seed 0)
    Y = np.zeros((n, max(COUNTS)), np.float32)
    w = [rng.normal(size=(c, 9 * 6)) / 7 for c in COUNTS]
    for i in range(n):
        Y[i, :COUNTS[subject[i]]] = w[subject[i]] @ tokens[0][i].ravel()
    targets = np.concatenate([tokens[0], tokens[0][:, :3] * 2], axis=1)
    return tokens, Y, subject, targets


def run(out_dir: str) -> None:
    from brainenc.decoding.brainit import BrainITDecoder, UniversalBrainEncoder
    from brainenc.training import init_distributed, save_tensors

    info = init_distributed("gloo")
    tokens, Y, subject, targets = make_data()
    # 32 training rows (val_fraction 0.2), global batch 8 -> shards of 4 on each of 2 ranks
    enc = UniversalBrainEncoder(model={"embed_dim": 8, "token_dim": 8, "dropout": 0.0, "voxel_chunk": 16},
                                train={"epochs": 2, "batch_size": 8, "seed": 0}, voxels_per_example=30,
                                val_fraction=0.2)
    enc.fit(tokens, Y, subject, voxel_counts=COUNTS)
    clusters = np.concatenate([np.arange(c) % 3 for c in COUNTS])
    bit = BrainITDecoder(model={"width": 16, "heads": 2, "n_self": 1}, loss="mse", voxels_per_example=25,
                         train={"epochs": 2, "batch_size": 8, "warmup_epochs": 1, "seed": 0}, val_fraction=0.2)
    bit.fit(Y, subject, targets, voxel_counts=COUNTS, clusters=clusters, n_clusters=3)
    if info.rank == 0:
        from brainenc.models.brainit import BrainIT, UniversalEncoderModel
        from brainenc.training import seed_everything

        save_tensors(os.path.join(out_dir, "encoder.safetensors"), enc.model_.state_dict())
        save_tensors(os.path.join(out_dir, "bit.safetensors"), bit.model_.state_dict())
        # the initial weights, rebuilt as fit builds them (same seed): the test checks the runs moved them
        arch, train = enc._check_params()
        seed_everything(train.seed)
        init = UniversalEncoderModel(arch, layer_shapes=[(9, 6), (4, 5)], voxel_counts=COUNTS)
        save_tensors(os.path.join(out_dir, "encoder_init.safetensors"), init.state_dict())
        arch, train = bit._check_params()
        seed_everything(train.seed)
        init = BrainIT(arch, voxel_counts=COUNTS, n_clusters=3, n_queries=12, out_dim=6)
        save_tensors(os.path.join(out_dir, "bit_init.safetensors"), init.state_dict())


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(sys.argv[1])
    from brainenc.training import cleanup_distributed

    cleanup_distributed()
