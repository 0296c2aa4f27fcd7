"""Query sets: which learned query token(s) each voxel reads (numpy only).

A :class:`QuerySet` is a sparse membership matrix ``M [Q, V]`` stored as coordinate pairs
(``query_index[k]``, ``voxel_index[k]``) with a per-pair weight, plus a per-voxel bias scale.
Overlapping membership (ROI families are separate label maps, so a voxel can be in FFA-1 and
in V3v) is combined by an explicit rule:

- ``"sum"`` (the original): ``ŷ_v = w_v · Σ_{r∋v} z_r + k_v c_v`` with ``k_v = |{r ∋ v}|``;
- ``"mean"``: ``ŷ_v = w_v · mean_{r∋v} z_r + c_v``;
- ``"first"``: only the first query (in query order) containing ``v``.

Voxels in no ROI read the hemisphere's ``unknown`` query.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from brainenc._utils.validation import check_option
from brainenc.exceptions import ConfigError, DataFormatError

__all__ = ["QuerySet", "build_query_set", "QUERY_KINDS", "COMBINE_RULES"]

QUERY_KINDS = ("rois", "streams", "hemis", "voxels", "custom")
COMBINE_RULES = ("sum", "mean", "first")


@dataclass
class QuerySet:
    """Sparse voxel-to-query membership.

    Attributes
    ----------
    names : list of str, length Q
        Query names, e.g. ``"lh_FFA-1"``, ``"rh_unknown"``.
    query_index, voxel_index : int64 [nnz]
        Membership pairs, sorted by query then voxel.
    weight : float32 [nnz]
        Per-pair weight (1 for sum/first, ``1/k_v`` for mean).
    bias_scale : float32 [n_voxels]
        Multiplier of the voxel bias (``k_v`` for sum, 1 otherwise).
    n_voxels : int
    combine : str
    kind : str
    """

    names: list
    query_index: np.ndarray
    voxel_index: np.ndarray
    weight: np.ndarray
    bias_scale: np.ndarray
    n_voxels: int
    combine: str = "sum"
    kind: str = "custom"

    @property
    def n_queries(self) -> int:
        return len(self.names)

    @property
    def one_per_voxel(self) -> bool:
        """True when every voxel reads exactly one query with weight 1."""
        return (self.voxel_index.size == self.n_voxels
                and np.array_equal(np.sort(self.voxel_index), np.arange(self.n_voxels))
                and bool(np.all(self.weight == 1)))

    def dense(self) -> np.ndarray:
        """Weighted membership ``M``, float32 [Q, n_voxels] (toy sizes / tests only)."""
        m = np.zeros((self.n_queries, self.n_voxels), dtype=np.float32)
        np.add.at(m, (self.query_index, self.voxel_index), self.weight)
        return m

    def voxels_of(self, name: str) -> np.ndarray:
        """Voxel indices read by query ``name``, int64 [n]."""
        q = self.names.index(name)
        return self.voxel_index[self.query_index == q]

    def arrays(self) -> dict[str, np.ndarray]:
        """Arrays for safetensors storage."""
        return {"query_index": self.query_index, "voxel_index": self.voxel_index,
                "weight": self.weight, "bias_scale": self.bias_scale}

    def meta(self) -> dict:
        """JSON-serialisable description (arrays excluded)."""
        return {"names": list(self.names), "n_voxels": int(self.n_voxels), "combine": self.combine, "kind": self.kind}

    @classmethod
    def from_parts(cls, meta: Mapping, arrays: Mapping[str, np.ndarray]) -> "QuerySet":
        return cls(names=list(meta["names"]), n_voxels=int(meta["n_voxels"]), combine=meta["combine"],
                   kind=meta["kind"], query_index=np.asarray(arrays["query_index"], dtype=np.int64),
                   voxel_index=np.asarray(arrays["voxel_index"], dtype=np.int64),
                   weight=np.asarray(arrays["weight"], dtype=np.float32),
                   bias_scale=np.asarray(arrays["bias_scale"], dtype=np.float32))


def _finalise(names: list[str], masks: list[np.ndarray], n_voxels: int, combine: str, kind: str) -> QuerySet:
    """Turn boolean masks [V] per query into a QuerySet with the combine rule applied."""
    keep = [i for i, m in enumerate(masks) if m.any()]
    names = [names[i] for i in keep]
    masks = [masks[i] for i in keep]
    q_idx, v_idx = [], []
    taken = np.zeros(n_voxels, dtype=bool)
    for q, m in enumerate(masks):
        vox = np.flatnonzero(m)
        if combine == "first":
            vox = vox[~taken[vox]]
            taken[vox] = True
        q_idx.append(np.full(vox.size, q, dtype=np.int64))
        v_idx.append(vox.astype(np.int64))
    qi = np.concatenate(q_idx) if q_idx else np.zeros(0, np.int64)
    vi = np.concatenate(v_idx) if v_idx else np.zeros(0, np.int64)
    count = np.bincount(vi, minlength=n_voxels)
    if np.any(count == 0):
        raise ConfigError(f"{int((count == 0).sum())} voxels read no query; every voxel needs one (use an 'unknown' query)")
    if combine == "mean":
        weight = (1.0 / count[vi]).astype(np.float32)
        bias_scale = np.ones(n_voxels, np.float32)
    elif combine == "sum":
        weight = np.ones(vi.size, np.float32)
        bias_scale = count.astype(np.float32)
    else:
        weight = np.ones(vi.size, np.float32)
        bias_scale = np.ones(n_voxels, np.float32)
    return QuerySet(names=names, query_index=qi, voxel_index=vi, weight=weight, bias_scale=bias_scale,
                    n_voxels=n_voxels, combine=combine, kind=kind)


def _hemi_groups(hemi, n_voxels: int) -> list[tuple[str, np.ndarray]]:
    if hemi is None:
        return [("all", np.ones(n_voxels, dtype=bool))]
    hemi = np.asarray(hemi)
    if hemi.shape != (n_voxels,):
        raise DataFormatError(f"'hemi' must have shape ({n_voxels},); got {hemi.shape}")
    out = []
    for h in sorted(np.unique(hemi).tolist(), key=str):
        out.append((str(h), hemi == h))
    return out


def build_query_set(kind: str, n_voxels: int, *, roi_labels: Mapping[str, np.ndarray] | None = None,
                    roi_names: Mapping[str, Mapping[int, str]] | None = None, hemi: np.ndarray | None = None,
                    families: Sequence[str] | None = None, clusters: np.ndarray | None = None,
                    combine: str = "sum", unknown: bool = True) -> QuerySet | None:
    """Build the query set of ``kind``.

    Parameters
    ----------
    kind : {'rois', 'streams', 'hemis', 'voxels', 'custom'}
        ``rois``: one query per ROI (label value > 0) of every family in ``families`` per hemisphere,
        plus one ``unknown`` query per hemisphere for voxels in no ROI (the faithful default: query
        order hemisphere, then family, then label value, then unknown). ``streams``: the same with
        the single family ``"streams"``. ``hemis``: one query per hemisphere. ``custom``: one query
        per distinct non-negative value of ``clusters`` (negative = ``unknown``). ``voxels``: one
        query per voxel; returns None (the model uses per-voxel parameters, no membership).
    n_voxels : int
    roi_labels : dict family -> int [n_voxels], optional
        0 = not in this family's ROIs (as ``PreparedDataset.roi_labels``).
    roi_names : dict family -> {int: str}, optional
        Label names; missing ones are named ``"<family>-<value>"``.
    hemi : array [n_voxels], optional
        Hemisphere of each voxel (e.g. ``"lh"``/``"rh"``); None = a single group ``"all"``.
    families : sequence of str, optional
        Families used by ``rois`` (default: all in ``roi_labels``, in their order).
    clusters : int array [n_voxels], optional
        Labels for ``custom``.
    combine : {'sum', 'mean', 'first'}
        Rule for voxels in several queries.
    unknown : bool
        Add the ``unknown`` queries (voxels in no query raise an error when False).

    Returns
    -------
    QuerySet or None
    """
    check_option("queries", kind, QUERY_KINDS)
    check_option("combine", combine, COMBINE_RULES)
    if kind == "voxels":
        return None
    names: list[str] = []
    masks: list[np.ndarray] = []
    if kind in ("rois", "streams"):
        if not roi_labels:
            raise ConfigError(f"queries={kind!r} needs 'roi_labels' (dict family -> int [n_voxels])")
        if kind == "streams":
            fams = ["streams"]
        else:
            fams = list(families) if families else list(roi_labels)
        for f in fams:
            if f not in roi_labels:
                raise ConfigError(f"ROI family {f!r} is not in roi_labels; available: {sorted(roi_labels)}")
            lab = np.asarray(roi_labels[f])
            if lab.shape != (n_voxels,):
                raise DataFormatError(f"roi_labels[{f!r}] must have shape ({n_voxels},); got {lab.shape}")
        for h, hmask in _hemi_groups(hemi, n_voxels):
            covered = np.zeros(n_voxels, dtype=bool)
            for f in fams:
                lab = np.asarray(roi_labels[f]).astype(np.int64)
                fnames = dict((roi_names or {}).get(f, {}))
                values = sorted(set(int(v) for v in np.unique(lab) if v > 0) | {int(k) for k in fnames if int(k) > 0})
                for val in values:
                    m = hmask & (lab == val)
                    covered |= m
                    name = fnames.get(val, fnames.get(str(val), f"{f}-{val}"))
                    names.append(f"{h}_{name}")
                    masks.append(m)
            if unknown:
                names.append(f"{h}_unknown")
                masks.append(hmask & ~covered)
    elif kind == "hemis":
        for h, hmask in _hemi_groups(hemi, n_voxels):
            names.append(h)
            masks.append(hmask)
    else:  # custom
        if clusters is None:
            raise ConfigError("queries='custom' needs 'clusters' (int [n_voxels])")
        cl = np.asarray(clusters)
        if cl.shape != (n_voxels,) or cl.dtype.kind not in "iu":
            raise DataFormatError(f"'clusters' must be an integer array of shape ({n_voxels},); got {cl.dtype} {cl.shape}")
        for val in sorted(int(v) for v in np.unique(cl) if v >= 0):
            names.append(f"cluster-{val}")
            masks.append(cl == val)
        if unknown:
            names.append("unknown")
            masks.append(cl < 0)
    return _finalise(names, masks, n_voxels, combine, kind)
