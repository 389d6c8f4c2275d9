"""Label tensors: one-hot targets and per-sample pixel accuracy."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def one_hot(labels: torch.Tensor, num_classes: int = 2) -> torch.Tensor:
    """(B, H, W) or (B, 1, H, W) integer/0-1 labels -> (B, C, H, W) float one-hot."""
    if labels.dim() == 4:
        labels = labels[:, 0]
    return F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).float()


def pixel_accuracy(pred_labels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample fraction of pixels where ``pred_labels`` (B,H,W) equals ``labels`` (B,H,W)."""
    return (pred_labels == labels).float().mean(dim=(1, 2))
