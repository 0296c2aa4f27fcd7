"""Subject-level fMRI time series for group analyses: a :class:`Cohort` is subjects' ROI time
series plus their phenotype (diagnosis, site, official split).

The loaders (:func:`load_cohort`) read the layout most labs ship: one ROI table per subject
(ABIDE-PCP ``.1D`` / CSV / TSV, rows = time points, columns = ROIs) and a phenotypic CSV with one
row per subject. The simulated cohort (:mod:`brainenc.datasets.simulate_cohort`) is written in
exactly this layout, so it is read by the same code as real data.

On-disk layout of a cohort folder (what ``load_cohort(folder)`` reads with no other argument)::

    cohort.json                 {"name", "tr", "atlas", "roi_names", "id_column", "label_column",
                                 "site_column", "split_column", "tables", "label_names"} (optional)
    phenotypic.csv              one row per subject (id, diagnosis, site, split, age, ...)
    rois_<atlas>/<site>_<id>_rois_<atlas>.1D
                                ABIDE-PCP style: a '#' header line of ROI labels, then one
                                whitespace-separated row per time point
    confounds/<id>_confounds.tsv   optional, one row per time point (motion parameters, FD)
    ground_truth.npz            simulated cohorts only (see simulate_cohort)
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["Cohort"]


@dataclasses.dataclass
class Cohort:
    """ROI time series of a group of subjects with their phenotype.

    Attributes
    ----------
    name : str
        Cohort name (folder name by default).
    series : list of ndarray
        One float32 array [n_timepoints_i, n_rois] per subject (lengths may differ).
    subject_ids : ndarray of str [n_subjects]
    tr : float
        Repetition time in seconds (the same for every subject; validated).
    roi_names : list of str [n_rois]
    labels : ndarray of int [n_subjects] or None
        Class index per subject (into ``label_names``), e.g. 0 = control, 1 = patient.
    label_names : list of str or None
    sites : ndarray of str [n_subjects] or None
        Acquisition site (for leave-site-out folds and site harmonisation).
    split : ndarray of str [n_subjects] or None
        Official hold-out split ("train" / "test") when the cohort has one.
    phenotype : dict of str -> ndarray [n_subjects]
        Every phenotype column, rows in ``subject_ids`` order.
    confounds : list of ndarray or None
        Per-subject confound tables [n_timepoints_i, n_confounds] (motion parameters, FD).
    confound_names : list of str or None
    files : list of Path
        The table each subject's series was read from (empty for in-memory cohorts).
    root : Path or None
        The cohort folder.
    """

    name: str
    series: list
    subject_ids: np.ndarray
    tr: float
    roi_names: list
    labels: np.ndarray | None = None
    label_names: list | None = None
    sites: np.ndarray | None = None
    split: np.ndarray | None = None
    phenotype: dict = dataclasses.field(default_factory=dict)
    confounds: list | None = None
    confound_names: list | None = None
    files: list = dataclasses.field(default_factory=list)
    root: Path | None = None

    @property
    def n_subjects(self) -> int:
        return len(self.series)

    @property
    def n_rois(self) -> int:
        return len(self.roi_names)

    def subset(self, index: Sequence[int] | np.ndarray) -> "Cohort":
        """The cohort restricted to ``index`` (rows in this cohort's order)."""
        idx = np.asarray(index, dtype=np.int64)

        def take(a):
            return None if a is None else np.asarray(a)[idx]

        return dataclasses.replace(
            self, series=[self.series[i] for i in idx], subject_ids=self.subject_ids[idx],
            labels=take(self.labels), sites=take(self.sites), split=take(self.split),
            phenotype={k: np.asarray(v)[idx] for k, v in self.phenotype.items()},
            confounds=None if self.confounds is None else [self.confounds[i] for i in idx],
            files=[self.files[i] for i in idx] if self.files else [])

    def lengths(self) -> np.ndarray:
        """Time points per subject (int64 [n_subjects])."""
        return np.array([len(s) for s in self.series], dtype=np.int64)

    def describe(self) -> str:
        """One line: subjects, ROIs, TRs, classes and sites."""
        lengths = self.lengths()
        parts = [f"cohort '{self.name}': {self.n_subjects} subjects x {self.n_rois} ROIs",
                 f"{lengths.min()}-{lengths.max()} time points at TR {self.tr:g} s" if len(lengths) else "empty"]
        if self.labels is not None:
            names = self.label_names or [str(k) for k in range(int(self.labels.max()) + 1)]
            counts = np.bincount(self.labels, minlength=len(names))
            parts.append(", ".join(f"{n} {names[k]}" for k, n in enumerate(counts)))
        if self.sites is not None:
            parts.append(f"{len(np.unique(self.sites))} sites")
        if self.split is not None:
            u, c = np.unique(self.split, return_counts=True)
            parts.append("split " + "/".join(f"{n} {s}" for s, n in zip(u, c)))
        return "; ".join(parts)

    def info(self) -> dict[str, Any]:
        """JSON-able summary (for stage records and reports)."""
        return {"name": self.name, "n_subjects": self.n_subjects, "n_rois": self.n_rois, "tr": self.tr,
                "lengths": [int(v) for v in self.lengths()], "label_names": self.label_names,
                "root": str(self.root) if self.root else None}
