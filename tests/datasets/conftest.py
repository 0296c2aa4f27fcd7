"""Shared fixtures for the dataset tests: one NSD-format subject written by the independent writer."""
import shutil

import pytest

import nsd_fixtures as fx


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
