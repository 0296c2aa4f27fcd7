"""prepare on the simulator's output (written by brainenc.datasets.simulate, an independent writer)."""
import numpy as np
import pytest

from brainenc.datasets.prepare import PrepareConfig, prepare_subject


@pytest.mark.slow
def test_prepare_reads_simulated_subject(tmp_path):
    from brainenc.datasets.simulate import SimulationConfig, simulate_subject

    root = tmp_path / "nsd"
    res = simulate_subject(root, SimulationConfig(n_sessions=1, n_shared=30, grid=(16, 18, 16),
                                                  write_hdf5_betas=True, write_stim_info=False))
    # the writer's target and the readers' lookup agree (both in layout)
    from brainenc.datasets import layout

    assert layout.ground_truth_path(root, "subj01") == res.ground_truth_path == layout.ground_truth_file(root, "subj01")
    cache = tmp_path / "prepared"
    a = prepare_subject(root, PrepareConfig(), cache_root=cache)
    b = prepare_subject(root, PrepareConfig(fmt="hdf5"), cache_root=cache)
    c = prepare_subject(root, PrepareConfig(ncsnr="compute"), cache_root=cache)
    np.testing.assert_array_equal(np.asarray(a.responses), np.asarray(b.responses))
    # the simulator's ncsnr.nii.gz and brainenc's own computation follow the same recipe
    np.testing.assert_allclose(c.ncsnr, a.ncsnr, atol=1e-5)
    assert a.split_counts() == {"train": 250 - 30, "test": 30}
    assert (a.n_repeats == 3).all()
    assert a.stimuli_path is not None and a.stimuli_path.is_file()
