"""Ensembling over seeds / layers with per-voxel validation-weighted mixing.

As in the original (reference_systems.md a.3): runs of the same configuration are averaged;
across members (e.g. layers) each voxel mixes predictions with ``softmax(τ · r_val)`` over members,
τ = 40 by default.
"""
from __future__ import annotations

import numpy as np

from brainenc.exceptions import ConfigError, DataFormatError

__all__ = ["softmax_weights", "mix_predictions", "SoftmaxEnsemble"]


def softmax_weights(val_scores: np.ndarray, tau: float = 40.0) -> np.ndarray:
    """Per-voxel mixing weights.

    Parameters
    ----------
    val_scores : array [M, V]
        Validation score (Pearson r) of each member per voxel; NaN treated as -inf (weight 0
        unless every member is NaN, then uniform).
    tau : float
        Inverse temperature (0 = plain average; large = pick the best member per voxel).

    Returns
    -------
    weights : float64 [M, V], columns sum to 1.
    """
    s = np.asarray(val_scores, dtype=np.float64)
    if s.ndim != 2:
        raise DataFormatError(f"'val_scores' must be [M, V] (members x voxels); got shape {s.shape}")
    logits = tau * np.where(np.isnan(s), -np.inf, s)
    all_nan = np.all(np.isnan(s), axis=0)
    logits[:, all_nan] = 0.0
    logits = logits - logits.max(axis=0, keepdims=True)
    w = np.exp(logits)
    return w / w.sum(axis=0, keepdims=True)


def mix_predictions(predictions, weights: np.ndarray) -> np.ndarray:
    """``ŷ[n, v] = Σ_m weights[m, v] · predictions[m][n, v]``.

    Parameters
    ----------
    predictions : sequence of M arrays [n, V] (or array [M, n, V])
    weights : array [M, V]

    Returns
    -------
    float32 [n, V]
    """
    w = np.asarray(weights)
    preds = list(predictions)
    if len(preds) == 0 or len(preds) != len(w):
        raise DataFormatError(f"'predictions' has {len(preds)} members but 'weights' has {len(w)} rows; "
                              f"they must match (and be at least 1)")
    out = np.zeros(np.shape(preds[0]), dtype=np.float64)
    for m, p in enumerate(preds):
        out += np.asarray(p, dtype=np.float64) * w[m][None, :]
    return out.astype(np.float32)


class SoftmaxEnsemble:
    """Per-voxel softmax(τ · r_val) mixture of ensemble members.

    Members with the same ``group`` (e.g. seeds of one layer) are first averaged (predictions and
    validation predictions), then groups are mixed per voxel.

    Parameters
    ----------
    tau : float
    """

    def __init__(self, tau: float = 40.0):
        self.tau = float(tau)

    def fit(self, val_predictions, y_val: np.ndarray, groups=None) -> "SoftmaxEnsemble":
        """Compute mixing weights from validation predictions.

        Parameters
        ----------
        val_predictions : sequence of M arrays [n_val, V]
        y_val : array [n_val, V]
        groups : sequence of M hashables, optional
            Members averaged before mixing; default each member its own group.

        Returns
        -------
        self : SoftmaxEnsemble

        Notes
        -----
        Sets ``groups_`` (the group keys, in mixing order), ``weights_`` ``[G, V]`` and
        ``val_scores_`` ``[G, V]``.
        """
        preds = list(val_predictions)
        groups = list(range(len(preds))) if groups is None else list(groups)
        if len(groups) != len(preds):
            raise ConfigError(f"'groups' must have one label per member ({len(preds)}); "
                              f"{len(groups)} labels were provided")
        self.groups_ = list(dict.fromkeys(groups))
        self._members = groups
        gp = self._group_means(preds)
        y = np.asarray(y_val, dtype=np.float64)
        scores = []
        for p in gp:
            a = y - y.mean(0)
            b = p - p.mean(0)
            den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
            scores.append(np.where(den > 0, (a * b).sum(0) / np.where(den > 0, den, 1), 0.0))
        self.val_scores_ = np.stack(scores)
        self.weights_ = softmax_weights(self.val_scores_, self.tau)
        return self

    def _group_means(self, preds) -> list[np.ndarray]:
        out = []
        for g in self.groups_:
            members = [np.asarray(p, dtype=np.float64) for p, gg in zip(preds, self._members) if gg == g]
            out.append(np.mean(members, axis=0))
        return out

    def predict(self, predictions) -> np.ndarray:
        """Mix member predictions (same member order as in :meth:`fit`) -> float32 [n, V]."""
        preds = list(predictions)
        if len(preds) != len(self._members):
            raise DataFormatError(f"'predictions' must have the {len(self._members)} members given to fit; "
                                  f"got {len(preds)}")
        return mix_predictions(self._group_means(preds), self.weights_)
