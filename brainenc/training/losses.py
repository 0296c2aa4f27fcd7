"""Losses and torch-side metrics used during training."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as Fn

__all__ = ["mse_sum", "pearson_r_torch", "multiscale_infonce"]


def mse_sum(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum of squared errors in float32 (the trainer divides by the global element count).

    Parameters
    ----------
    pred, target : Tensor [B, V]

    Returns
    -------
    Tensor [] float32
    """
    return (pred.float() - target.float()).pow(2).sum()


def pearson_r_torch(y_true: torch.Tensor, y_pred: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-column Pearson correlation in float64 (0 where a column is constant).

    Parameters
    ----------
    y_true, y_pred : Tensor [n, V]

    Returns
    -------
    r : Tensor float64 [V]
    """
    a = y_true.double() - y_true.double().mean(0)
    b = y_pred.double() - y_pred.double().mean(0)
    num = (a * b).sum(0)
    den = torch.sqrt((a * a).sum(0) * (b * b).sum(0))
    return torch.where(den > eps, num / den.clamp_min(eps), torch.zeros_like(num))


def multiscale_infonce(pred: torch.Tensor, target: torch.Tensor, group_sizes: Sequence[int],
                       logit_scale: float = 1.0) -> torch.Tensor:
    """Multi-scale symmetric InfoNCE over flattened batch tokens (Brain-IT's low-level loss, b.5).

    The token axis is the concatenation of scale groups. For group ``g`` (tokens ``[o_g, o_g + n_g)``)
    every token of every example is one class: ``P = pred[:, g].reshape(-1, d)``,
    ``T = target[:, g].reshape(-1, d)`` ([b * n_g, d]), ``logits = logit_scale * P @ T.T``
    (unnormalised, as the reference), ``loss_g = (CE(logits, i) + CE(logits.T, i)) / 2`` with the
    matching token ``i`` as the label. Computed in float32 with autocast off.

    Parameters
    ----------
    pred, target : Tensor [b, m, d]
    group_sizes : int sequence
        Tokens per scale group (each >= 1, sum ``m``).
    logit_scale : float

    Returns
    -------
    Tensor [] float32
        The mean of ``loss_g`` over groups.
    """
    sizes = [int(g) for g in group_sizes]
    if pred.shape != target.shape or pred.dim() != 3:
        raise ValueError(f"'pred' and 'target' must both be [b, m, d]; got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    if not sizes or min(sizes) < 1 or sum(sizes) != pred.shape[1]:
        raise ValueError(f"'group_sizes' must be >= 1 each and sum to m = {pred.shape[1]}; got {sizes}")
    d = pred.shape[-1]
    losses = []
    with torch.autocast(device_type=pred.device.type, enabled=False):
        start = 0
        for n in sizes:
            P = pred[:, start:start + n].reshape(-1, d).float()
            T = target[:, start:start + n].reshape(-1, d).float()
            start += n
            logits = float(logit_scale) * (P @ T.T)
            labels = torch.arange(logits.shape[0], device=logits.device)
            losses.append((Fn.cross_entropy(logits, labels) + Fn.cross_entropy(logits.T, labels)) / 2)
        return torch.stack(losses).mean()
