"""Test-wide setup.

TRITON_INTERPRET must be set before anything imports triton (the interpret switch is read
when @triton.jit decorates; see shared/reference/routing_kernel.md §6), hence at the very top.
HF_HUB_OFFLINE keeps a missing pretrained weight from retrying the network for ~45 s.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("BRAINENC_QUIET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_data_root(tmp_path, monkeypatch):
    """No test ever reads or writes the user's ~/brainenc_data."""
    monkeypatch.setenv("BRAINENC_DATA", str(tmp_path / "brainenc_data"))
    yield


@pytest.fixture(autouse=True)
def _restore_brainenc_logger():
    """A test that runs the CLI (which adds its stderr handler, bound to that test's captured stderr,
    and stops propagation) leaves the ``brainenc`` logger as it found it for the next test in the process."""
    import logging

    import brainenc._utils.logging  # noqa: F401  (its import adds the library's NullHandler: keep it)

    root = logging.getLogger("brainenc")
    saved = (list(root.handlers), root.level, root.propagate)
    yield
    root.handlers[:], root.level, root.propagate = saved


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_nsd = pytest.mark.skip(reason="needs the real NSD release (set BRAINENC_NSD_ROOT)")
    skip_net = pytest.mark.skip(reason="needs network access")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "nsd" in item.keywords and not os.environ.get("BRAINENC_NSD_ROOT"):
            item.add_marker(skip_nsd)
        if "network" in item.keywords:
            item.add_marker(skip_net)
