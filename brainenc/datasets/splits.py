"""Train/test splits of NSD trials (nsd_format.md §3).

Each split function maps a subject's :class:`~brainenc.datasets.nsd.TrialTable` to boolean masks over
its trials, ``{"train": ..., "test": ...}`` (and ``"val"`` for ``shared515``). Trials in no mask are
dropped. A split is decided per *trial* because the Algonauts rule keeps only the trials of a split's
sessions; for the other splits every trial of an image shares the image's split.

============== ============================================================================================
``shared1000`` test = every trial of a shared1000 image (slot < 1000); train = all other trials.
``shared515``  test = shared images seen exactly 3 times by *every* subject within its completed sessions
               (515 in the real design); val = the other shared images; train = non-shared trials.
``algonauts``  train = trials of sessions 1..n-3; test = trials of images whose every trial lies in the last
               3 sessions, excluding shared images except, for subjects 1, 2, 5, 7, those with all 3
               trials there. Trials of the last 3 sessions of images seen earlier are dropped.
``nsd37``      sessions 1..37 only; test = shared images seen there; train = the other images there.
============== ============================================================================================
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from brainenc._utils.validation import check_option, check_subject
from brainenc.datasets import layout
from brainenc.exceptions import DataFormatError

__all__ = ["SPLITS", "shared515_images", "make_split"]

SPLITS = ("shared1000", "shared515", "algonauts", "nsd37")


def shared515_images(expdesign, sessions_per_subject: Mapping[str, int]) -> np.ndarray:
    """0-based 73k ids of the shared images every subject saw exactly 3 times.

    Parameters
    ----------
    expdesign : Expdesign
    sessions_per_subject : mapping of str -> int
        Completed sessions of every subject to intersect over (all 8 for the paper's 515).

    Returns
    -------
    ndarray of int64, shape (n,)
        Ascending.
    """
    keep = np.ones(layout.N_SHARED, dtype=bool)
    for subject, n_sess in sessions_per_subject.items():
        n = int(n_sess) * layout.TRIALS_PER_SESSION
        counts = np.bincount(expdesign.masterordering[:n], minlength=layout.N_SLOTS_10K)
        keep &= counts[: layout.N_SHARED] == 3
        del subject
    # slots < 1000 hold the same (shared) images for every subject: subjectim[s, :1000] == sharedix
    return np.sort(expdesign.subjectim[0, : layout.N_SHARED][keep])


def make_split(name: str, table, *, expdesign=None, sessions_per_subject: Mapping[str, int] | None = None
               ) -> dict[str, np.ndarray]:
    """Boolean trial masks of split ``name`` for ``table``.

    Parameters
    ----------
    name : {"shared1000", "shared515", "algonauts", "nsd37"}
    table : TrialTable
    expdesign : Expdesign, optional
        Needed by ``shared515``.
    sessions_per_subject : mapping, optional
        Needed by ``shared515`` (default: the NSD session table with ``table``'s own count).

    Returns
    -------
    dict of str -> ndarray of bool, shape (n_trials,)
        Disjoint masks; at least "train" and "test".
    """
    check_option("split", name, SPLITS)
    shared = table.slot < layout.N_SHARED
    if name == "shared1000":
        return {"train": ~shared, "test": shared.copy()}
    if name == "shared515":
        if expdesign is None:
            raise DataFormatError("split 'shared515' needs the experimental design")
        sess = dict(layout.N_SESSIONS) if sessions_per_subject is None else dict(sessions_per_subject)
        sess[table.subject] = table.n_sessions
        test = np.isin(table.image_id, shared515_images(expdesign, sess)) & shared
        return {"train": ~shared, "test": test, "val": shared & ~test}
    if name == "algonauts":
        n = table.n_sessions
        if n < 4:
            raise DataFormatError(f"split 'algonauts' needs at least 4 sessions (last 3 are test); "
                                  f"{table.subject} has {n}")
        late = table.session > n - 3
        # an image is test-eligible when none of its trials falls in sessions 1..n-3
        early_images = np.unique(table.image_id[~late])
        all_late = ~np.isin(table.image_id, early_images)
        counts = np.bincount(table.slot, minlength=layout.N_SLOTS_10K)[table.slot]
        keep_shared = int(check_subject(table.subject)[4:]) in (1, 2, 5, 7)
        test = all_late & (~shared | (keep_shared & (counts == 3)))
        return {"train": ~late, "test": test}
    # nsd37
    in37 = table.session <= 37
    return {"train": in37 & ~shared, "test": in37 & shared}
