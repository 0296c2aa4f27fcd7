"""NSD dataset adapters (raw release, Algonauts 2023, MindEye2), the simulated subject,
splits, z-scoring, repeat averaging and noise ceilings. numpy/h5py/nibabel only: no torch.

Importing this package is cheap: the readers are imported on first use. ``DATASETS`` maps a layout
name to a loader returning a :class:`~brainenc.datasets.prepare.PreparedDataset`:

- ``"nsd"``: ``load(nsd_root, cfg=None, cache_root=None, **choices)`` -> :func:`prepare.prepare_subject`;
- ``"algonauts2023"``: ``load(root, subject="subj01")`` -> :func:`algonauts.load_algonauts`;
- ``"mindeye2"``: ``load(root, subject="subj01", repeats="single", ...)`` -> :func:`mindeye2.load_mindeye2`.
"""
from __future__ import annotations

import importlib

from brainenc.registry import Registry

__all__ = ["DATASETS", "load_dataset"]
#: several prepared subjects as one dataset (brainenc.datasets.multisubject), imported on first use
_MULTISUBJECT = ("MultiSubjectDataset", "ExampleTable", "PaddedResponses", "FeatureRows", "feature_rows",
                 "load_multisubject")
__all__ += list(_MULTISUBJECT)

DATASETS = Registry("dataset")


@DATASETS.register("nsd", description="raw NSD release layout (or a simulated one), prepared and cached")
def _load_nsd(nsd_root, cfg=None, cache_root=None, **choices):
    from brainenc.config import from_dict
    from brainenc.datasets.prepare import PrepareConfig, prepare_subject

    if cfg is not None and choices:
        raise TypeError("pass either a PrepareConfig or keyword choices, not both")
    cfg = cfg if cfg is not None else from_dict(PrepareConfig, choices)
    return prepare_subject(nsd_root, cfg, cache_root=cache_root)


@DATASETS.register("algonauts2023", description="Algonauts 2023 challenge layout (fsaverage, averaged)")
def _load_algonauts(root, subject="subj01"):
    from brainenc.datasets.algonauts import load_algonauts

    return load_algonauts(root, subject)


@DATASETS.register("mindeye2", description="MindEye2 Hugging Face layout (betas_all_*.hdf5)")
def _load_mindeye2(root, subject="subj01", **kwargs):
    from brainenc.datasets.mindeye2 import load_mindeye2

    return load_mindeye2(root, subject, **kwargs)


def load_dataset(name: str, *args, **kwargs):
    """``DATASETS.get(name)(*args, **kwargs)``: load a dataset layout by name."""
    return DATASETS.get(name)(*args, **kwargs)


_LAZY = {"layout", "nsd", "prepare", "splits", "noise_ceiling", "algonauts", "mindeye2", "simulate", "cohort",
         "timeseries", "haxby"}
_LAZY.add("multisubject")


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _MULTISUBJECT:
        return getattr(importlib.import_module(f"{__name__}.multisubject"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
