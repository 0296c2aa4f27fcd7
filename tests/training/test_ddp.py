"""2-process DDP (gloo, CPU, launched with torchrun) matches a single-process run on the same global batches."""
import sys
from pathlib import Path

import pytest
import torch

from brainenc.training import load_tensors

HERE = Path(__file__).parent


@pytest.mark.slow
def test_torchrun_two_processes_match_single_process(tmp_path, torchrun):
    sys.path.insert(0, str(HERE))
    try:
        import ddp_worker
    finally:
        sys.path.remove(str(HERE))
    single = tmp_path / "single"
    single.mkdir()
    # the ranks run single-threaded (ddp_worker's __main__); so does the reference run, so that only
    # the all-reduce's summation order differs, not the intra-op thread count of the kernels
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in ddp_worker.OPTIMIZERS:
            ddp_worker.run(str(single), name)
    finally:
        torch.set_num_threads(threads)
    multi = tmp_path / "multi"
    multi.mkdir()
    torchrun(HERE / "ddp_worker.py", multi)
    # float32 all-reduce sums shard gradients in another order than one process does (~1e-7 of the
    # summed terms). SGD's step is linear in the gradient: measured max |diff| 2.4e-7 (one float32 ulp
    # of the largest weights, |w| ~ 2.7) after 6 steps -> rtol 1e-5, atol 1e-6. AdamW divides each
    # element's gradient by its own running RMS, so that rounding noise in a small, cancelling gradient
    # element (k_proj here) becomes a relative error of a step whose size is ~lr = 1e-2 whatever the
    # gradient: measured max |diff| 1.0e-6 .. 2.0e-6 (AVX-512, AVX2, no-SIMD ATen kernels), i.e.
    # ~3e-5 of lr per step -> atol 1e-3 * lr = 1e-5. Both still fail by orders of magnitude when a rank
    # misses the all-reduce or the shards (an error of order lr per step), and SGD also fails when the
    # gradients are summed instead of averaged over ranks (AdamW and gradient clipping hide that scale).
    tolerances = {"sgd": dict(rtol=1e-5, atol=1e-6),
                  "adamw": dict(rtol=1e-5, atol=1e-3 * ddp_worker.OPTIMIZERS["adamw"]["lr"])}
    import numpy as np

    from brainenc.models import build_query_set, create_model

    torch.manual_seed(0)
    init = create_model("routing_encoder_tiny", feature_dim=16, grid=(3, 4), n_voxels=10, dropout=0.0,
                        query_set=build_query_set("hemis", 10, hemi=np.array(["lh"] * 5 + ["rh"] * 5))).state_dict()
    for name in ddp_worker.OPTIMIZERS:
        a = load_tensors(single / f"weights_{name}.safetensors")
        b = load_tensors(multi / f"weights_{name}.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], **tolerances[name], msg=f"{name}: parameter {k} differs")
        # the run really trained (weights moved away from the shared initialisation): the match is not vacuous
        assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-2, name


@pytest.mark.slow
def test_torchrun_brainit_estimators_match_single_process(tmp_path, torchrun):
    """The universal encoder and BIT under 2-rank DDP (one embedding block per subject; subject 2 in one
    training row, so its block has a gradient on one rank in one step and on none in the others) end
    where a single process ends on the same global batches."""
    sys.path.insert(0, str(HERE))
    try:
        import ddp_brainit_worker
    finally:
        sys.path.remove(str(HERE))
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir()
    multi.mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ddp_brainit_worker.run(str(single))
    finally:
        torch.set_num_threads(threads)
    torchrun(HERE / "ddp_brainit_worker.py", multi)
    # Tolerances as in the test above: all-reduce rounding (~1e-7 of the summed terms) becomes, through
    # Adam's per-element normalisation, at most ~1e-3 of lr per parameter (measured: encoder 3e-8 with
    # lr 1e-3, BIT 1.2e-7 with lr 5e-4). A rank that misses the all-reduce errs by ~lr per step.
    # The encoder's key biases (project_x.bias) are left out: a bias added to every key shifts all
    # of a query's scores equally, which the softmax cancels, so their gradient is exactly zero and
    # Adam turns its rounding noise into steps of ~lr (measured 1e-5 .. 1e-4 apart).
    for name, lr in (("encoder", 1e-3), ("bit", 5e-4)):
        a, b = load_tensors(single / f"{name}.safetensors"), load_tensors(multi / f"{name}.safetensors")
        init = load_tensors(single / f"{name}_init.safetensors")
        assert a.keys() == b.keys() == init.keys()
        for k in a:
            if k.endswith("project_x.bias"):
                continue
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-3 * lr, msg=f"{name}: parameter {k} differs")
        moved = (a["voxel_embed.blocks.2"] - init["voxel_embed.blocks.2"]).abs().max().item()
        assert moved > 0.5 * lr, (name, moved)  # subject 2's block took its step (~lr, Adam): the match is not vacuous
