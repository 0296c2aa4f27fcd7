"""Losses and torch-side metrics used during training."""
from __future__ import annotations

import torch

__all__ = ["mse_sum", "pearson_r_torch"]


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
