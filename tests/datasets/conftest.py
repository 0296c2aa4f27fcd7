"""Shared fixtures for the dataset tests: one NSD-format subject written by the independent writer.

Hypothesis profile ``brainenc-datasets-fuzz`` (used by ``test_ds_fuzz.py`` as the parent of its
per-test settings): **derandomized** by default, so CI and every machine run the same examples and a
failure reproduces everywhere (a fuzz that can surprise CI with a new example is a flaky test; the
fixed examples still cover every reader and mutation kind). ``BRAINENC_FUZZ=explore`` switches to
random generation with the local example database, to look for new failures (anything found is then
replayed from ``.hypothesis/``); ``BRAINENC_FUZZ_SCALE=<k>`` multiplies the example counts.
"""
import os
import shutil

import pytest
from hypothesis import HealthCheck, settings

import nsd_fixtures as fx

FUZZ_PROFILE = "brainenc-datasets-fuzz"
_explore = os.environ.get("BRAINENC_FUZZ", "").strip().lower() == "explore"
_common = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
if _explore:
    settings.register_profile(FUZZ_PROFILE, derandomize=False, **_common)
else:
    settings.register_profile(FUZZ_PROFILE, derandomize=True, database=None, **_common)


@pytest.fixture(scope="session")
def nsd_subject(tmp_path_factory):
    """A 4-session subj01 (NIfTI + HDF5 + fsaverage), written once; tests must not modify it."""
    root = tmp_path_factory.mktemp("nsd") / "nsd"
    return fx.write_subject(root)


@pytest.fixture
def nsd_copy(nsd_subject, tmp_path):
    """A private copy of :func:`nsd_subject` that a test may damage."""
    dst = tmp_path / "nsd"
    shutil.copytree(nsd_subject.root, dst)
    import dataclasses

    return dataclasses.replace(nsd_subject, root=dst)
