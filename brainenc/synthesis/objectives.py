"""What brain-guided synthesis maximises: a scalar per image from an encoder's predicted responses.

:class:`ResponseObjective` turns predicted responses ``[n, V]`` (the ``V`` outputs of a voxel-wise encoding
model) into one value per image, larger = better:

- ``"roi"``: the mean predicted response over a named ROI (BrainDiVE: ``mean_{v in ROI} y_v``);
- ``"contrast"``: mean over set A minus mean over set B (e.g. OFA vs FFA, OPA vs PPA);
- ``"voxels"``: the mean over an explicit voxel set (an index array or boolean mask, e.g. a functional cluster).

Sets are boolean masks or integer index arrays over the encoder's ``V`` outputs.
:meth:`ResponseObjective.from_masks` builds one from a ``{name: bool [V]}`` table such as
``PreparedDataset.roi_masks()``. The objective works on torch tensors (differentiable, for guidance) and on
numpy arrays (for scoring stored predictions). No torch import at module level.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np

from brainenc.exceptions import ConfigError

__all__ = ["ResponseObjective", "OBJECTIVE_KINDS"]

OBJECTIVE_KINDS = ("roi", "contrast", "voxels")


def _as_index_set(voxels, n_voxels, what):
    """A boolean mask [V] or integer indices -> (sorted unique int64 indices, V)."""
    arr = np.asarray(voxels)
    if arr.ndim != 1:
        raise ConfigError(f"{what} must be a 1-D boolean mask or index array, got shape {arr.shape}")
    if arr.dtype == bool:
        if n_voxels is not None and arr.shape[0] != n_voxels:
            raise ConfigError(f"{what} is a mask of length {arr.shape[0]} but the encoder has V={n_voxels} outputs")
        idx = np.flatnonzero(arr).astype(np.int64)
        n_voxels = int(arr.shape[0])
    elif arr.size == 0 or np.issubdtype(arr.dtype, np.integer):
        if n_voxels is None:
            raise ConfigError(f"{what} is an index array: give n_voxels (the encoder's number of outputs V)")
        idx = arr.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n_voxels):
            raise ConfigError(f"{what} has indices outside [0, {n_voxels}) (min {idx.min()}, max {idx.max()})")
        if np.unique(idx).size != idx.size:
            raise ConfigError(f"{what} has duplicate indices ({idx.size - np.unique(idx).size} repeated)")
        idx = np.sort(idx)
    else:
        raise ConfigError(f"{what} must be a boolean mask or an integer index array, got dtype {arr.dtype}")
    if idx.size == 0:
        raise ConfigError(f"{what} is empty: the objective needs at least one voxel")
    return idx, int(n_voxels)


def _names(names):
    if names is None:
        return []
    if isinstance(names, str):
        return [names]
    return [str(n) for n in names]


class ResponseObjective:
    """Per-image objective (larger = better) from predicted responses ``[n, V]``.

    ``value = mean(y[:, A])`` for kinds ``"roi"`` and ``"voxels"``; ``value = mean(y[:, A]) - mean(y[:, B])``
    for ``"contrast"``. Callable on a torch tensor (differentiable; returns ``[n]`` on its device and dtype)
    or on a numpy array (returns float64 ``[n]``).

    Parameters
    ----------
    kind : {"roi", "contrast", "voxels"}
        ``"roi"`` and ``"voxels"`` compute the same mean; the kind only records where the set came from
        (a named ROI vs an explicit set such as a functional cluster).
    voxels : array-like
        Set A: a boolean mask of length ``V`` or an integer index array (then ``n_voxels`` is needed).
    minus : array-like, optional
        Set B, required for ``"contrast"`` and refused otherwise; disjoint from A.
    n_voxels : int, optional
        ``V``, the encoder's number of outputs; taken from a mask's length when omitted. A mask of another
        length is an error.
    names, minus_names : str or sequence of str, optional
        Names of the ROIs forming A and B (for :meth:`describe`).

    Raises
    ------
    ConfigError
        Unknown kind, empty set, mask length != ``V``, out-of-range or duplicate indices, identical or
        overlapping A and B, ``minus`` given for a non-contrast kind or missing for a contrast.

    Examples
    --------
    >>> import numpy as np
    >>> ffa = np.zeros(10, bool); ffa[:3] = True
    >>> obj = ResponseObjective("roi", ffa, names="FFA")
    >>> obj(np.arange(20.0).reshape(2, 10)).tolist()
    [1.0, 11.0]
    """

    def __init__(self, kind, voxels, minus=None, *, n_voxels=None, names=None, minus_names=None):
        if kind not in OBJECTIVE_KINDS:
            raise ConfigError(f"objective kind must be one of {list(OBJECTIVE_KINDS)}, got {kind!r}")
        if n_voxels is not None:
            if int(n_voxels) != n_voxels or n_voxels < 1:
                raise ConfigError(f"n_voxels must be a positive integer, got {n_voxels!r}")
            n_voxels = int(n_voxels)
        self.kind = kind
        self.names = _names(names)
        self.minus_names = _names(minus_names)
        label_a = f"objective set {'/'.join(self.names)!r}" if self.names else "objective voxels"
        self.indices, self.n_voxels = _as_index_set(voxels, n_voxels, label_a)
        self.minus_indices = None
        if kind == "contrast":
            if minus is None:
                raise ConfigError("a 'contrast' objective needs minus= (set B, subtracted from set A)")
            label_b = (f"objective set {'/'.join(self.minus_names)!r}" if self.minus_names
                       else "objective minus voxels")
            self.minus_indices, _ = _as_index_set(minus, self.n_voxels, label_b)
            common = np.intersect1d(self.indices, self.minus_indices)
            if common.size == self.indices.size == self.minus_indices.size:
                raise ConfigError("contrast sets A and B are identical: the objective would be 0 for every image")
            if common.size:
                raise ConfigError(f"contrast sets A and B overlap in {common.size} voxel(s): make them disjoint "
                                  f"(e.g. A minus B)")
        elif minus is not None:
            raise ConfigError(f"minus= is only for kind 'contrast', not {kind!r}")
        self._cache = {}

    # ------------------------------------------------------------------------------------------------ builders
    @classmethod
    def roi(cls, mask, *, name=None, n_voxels=None):
        """Mean over one ROI (a boolean mask or indices)."""
        return cls("roi", mask, n_voxels=n_voxels, names=name)

    @classmethod
    def contrast(cls, a, b, *, names=None, minus_names=None, n_voxels=None):
        """Mean over set ``a`` minus mean over set ``b`` (disjoint)."""
        return cls("contrast", a, b, n_voxels=n_voxels, names=names, minus_names=minus_names)

    @classmethod
    def voxels(cls, voxels, *, n_voxels=None, name=None):
        """Mean over an explicit voxel set (e.g. a functional cluster)."""
        return cls("voxels", voxels, n_voxels=n_voxels, names=name)

    @classmethod
    def from_masks(cls, masks, roi, contrast=None):
        """Build a ``"roi"`` or ``"contrast"`` objective from a table of named masks.

        Parameters
        ----------
        masks : mapping of str to bool array [V]
            E.g. ``PreparedDataset.roi_masks()`` (keys ``"family/name"``); all of the same length ``V``.
        roi : str or sequence of str
            Name(s) of set A; several names are united (e.g. FFA = ``["FFA-1", "FFA-2"]``). A name may be a
            full key or, when unambiguous, the part after the last ``/`` (``"FFA-1"`` for
            ``"floc-faces/FFA-1"``).
        contrast : str or sequence of str, optional
            Name(s) of set B: the objective becomes ``mean(A) - mean(B)``.

        Returns
        -------
        ResponseObjective

        Raises
        ------
        ConfigError
            Empty table, masks of different lengths or not boolean, an unknown or ambiguous name (the
            message lists the known ones), and every check of the constructor.
        """
        if not isinstance(masks, Mapping) or not masks:
            raise ConfigError("masks must be a non-empty mapping of ROI name -> boolean mask [V]")
        lengths = {}
        for k, m in masks.items():
            arr = np.asarray(m)
            if arr.ndim != 1 or arr.dtype != bool:
                raise ConfigError(f"masks[{k!r}] must be a 1-D boolean array, got {arr.dtype} {arr.shape}")
            lengths[k] = arr.shape[0]
        if len(set(lengths.values())) > 1:
            raise ConfigError(f"masks have different lengths: {sorted(set(lengths.values()))}")
        n_voxels = next(iter(lengths.values()))
        names_a, mask_a = _union(masks, roi, "roi")
        if contrast is None:
            return cls("roi", mask_a, n_voxels=n_voxels, names=names_a)
        names_b, mask_b = _union(masks, contrast, "contrast")
        return cls("contrast", mask_a, mask_b, n_voxels=n_voxels, names=names_a, minus_names=names_b)

    # ------------------------------------------------------------------------------------------------ values
    @property
    def n_selected(self):
        """Number of voxels in set A."""
        return int(self.indices.size)

    def _torch_index(self, device):
        key = str(device)
        if key not in self._cache:
            import torch

            a = torch.as_tensor(self.indices, device=device)
            b = None if self.minus_indices is None else torch.as_tensor(self.minus_indices, device=device)
            self._cache[key] = (a, b)
        return self._cache[key]

    def __call__(self, responses):
        """Objective per image.

        Parameters
        ----------
        responses : torch.Tensor or numpy.ndarray
            ``[n, V]`` predicted responses.

        Returns
        -------
        torch.Tensor or numpy.ndarray
            ``[n]``: a tensor (same device and dtype, differentiable) for a tensor input, float64 for numpy.
        """
        shape = tuple(getattr(responses, "shape", ()))
        if len(shape) != 2 or shape[1] != self.n_voxels:
            raise ConfigError(f"responses must be [n, {self.n_voxels}] (the objective's V), got {shape}")
        if isinstance(responses, np.ndarray):
            y = responses.astype(np.float64, copy=False)
            value = y[:, self.indices].mean(axis=1)
            if self.minus_indices is not None:
                value = value - y[:, self.minus_indices].mean(axis=1)
            return value
        a, b = self._torch_index(responses.device)
        value = responses.index_select(1, a).mean(dim=1)
        if b is not None:
            value = value - responses.index_select(1, b).mean(dim=1)
        return value

    def describe(self):
        """JSON-able record: kind, names, voxel counts and a digest of the index sets.

        Returns
        -------
        dict
            ``kind``, ``names``, ``n_voxels`` (set A), ``n_outputs`` (``V``), ``digest`` (sha256 prefix of the
            sorted indices) and, for a contrast, ``minus_names`` and ``n_minus_voxels``.
        """
        h = hashlib.sha256(self.indices.astype("<i8").tobytes())
        rec = {"kind": self.kind, "names": list(self.names), "n_voxels": self.n_selected,
               "n_outputs": self.n_voxels}
        if self.minus_indices is not None:
            h.update(b"|minus|" + self.minus_indices.astype("<i8").tobytes())
            rec["minus_names"] = list(self.minus_names)
            rec["n_minus_voxels"] = int(self.minus_indices.size)
        rec["digest"] = h.hexdigest()[:16]
        return rec

    def __repr__(self):
        d = self.describe()
        extra = f", minus={d['minus_names'] or d['n_minus_voxels']}" if "minus_names" in d else ""
        return (f"ResponseObjective(kind={self.kind!r}, names={d['names'] or None}, n_voxels={d['n_voxels']}"
                f"{extra}, V={self.n_voxels})")


def _resolve(masks, name, what):
    if name in masks:
        return name
    short = [k for k in masks if k.rsplit("/", 1)[-1] == name]
    if len(short) == 1:
        return short[0]
    known = ", ".join(sorted(masks))
    if len(short) > 1:
        raise ConfigError(f"{what} name {name!r} is ambiguous: matches {sorted(short)}; use the full key")
    raise ConfigError(f"unknown {what} name {name!r}; known ROIs: {known}")


def _union(masks, names, what):
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, Sequence) or not names:
        raise ConfigError(f"{what} must be an ROI name or a non-empty list of names, got {names!r}")
    keys = [_resolve(masks, str(n), what) for n in names]
    mask = np.zeros(len(np.asarray(masks[keys[0]])), bool)
    for k in keys:
        mask |= np.asarray(masks[k], bool)
    if not mask.any():
        raise ConfigError(f"{what} {'+'.join(keys)!r} selects no voxel (empty mask)")
    return keys, mask
