"""Every loss of HSSF (SPEC section 3), one function each.

Shapes: ``pred``/``input``/``target`` logits are (B, C, H, W); one-hot targets are float (B, C, H, W);
``confidence`` is the SA logit map (B, 1, H, W). Each returns a scalar tensor.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def structure_loss(pred: torch.Tensor, target: torch.Tensor,
                   weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Segmentation ("structure") loss: cross-entropy + boundary-weighted IoU.

    ``w = 1 + 5*|avgpool31(Y) - Y|``; ``wiou = 1 - (sum w*s*Y + 1) / (sum w*(s+Y) - sum w*s*Y + 1)`` with
    ``s = sigmoid(pred)``, sums over (C,H,W) per sample. ``weight`` (B,) multiplies both terms per sample
    (the CE term is one scalar for the batch, as in the official code). Result: mean over the batch.
    """
    w = 1 + 5 * torch.abs(F.avg_pool2d(target, kernel_size=31, stride=1, padding=15) - target)
    ce = F.cross_entropy(pred, target)
    s = torch.sigmoid(pred)
    inter = (s * target * w).sum(dim=(1, 2, 3))
    union = ((s + target) * w).sum(dim=(1, 2, 3))
    wiou = 1 - (inter + 1) / (union - inter + 1)
    if weight is not None:
        weight = weight.to(wiou.dtype)
        return (ce * weight + wiou * weight).mean()
    return (ce + wiou).mean()


def confidence_loss(pred: torch.Tensor, confidence: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Self-Assessment loss: BCE of the SA logits against "the prediction is right here".

    ``t = [argmax pred == argmax target]`` per pixel; the loss of pixels with ``t = 0`` is multiplied by
    ``#(t=1) / #(t=0)`` over the batch; mean over all pixels. ``pred`` only enters through argmax.
    """
    t = (pred.argmax(1) == target.argmax(1)).unsqueeze(1).to(confidence.dtype)
    bce = F.binary_cross_entropy_with_logits(confidence, t, reduction="none")
    n_pos, n_neg = t.sum(), t.numel() - t.sum()
    ratio = n_pos / n_neg.clamp(min=1)
    return torch.where(t > 0, bce, bce * ratio).mean()


def kl_loss(input: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None,
            temperature: float = 2.0) -> torch.Tensor:
    """Distillation loss ``KL(softmax(target/T) || softmax(input/T))`` per pixel.

    Mean over (C,H,W) per sample, times the per-sample 0/1 ``mask``, mean over the batch. Without a
    mask: the same with every sample kept. No T^2 factor (as the official code).
    """
    log_p = F.log_softmax(input / temperature, dim=1)
    q = F.softmax(target / temperature, dim=1)
    per_sample = F.kl_div(log_p, q, reduction="none").mean(dim=(1, 2, 3))
    if mask is not None:
        per_sample = per_sample * mask.to(per_sample.dtype)
    return per_sample.mean()


def fp_consistency_loss(clean: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    """Feature-perturbation consistency (the official ``mse_loss``) on logits.

    For each class c: ``w_c(b) = mean_pixels softmax(perturbed)[b, c]``;
    ``term_c = mean_b(w_c(b) * sum_pixels (clean_c - perturbed_c)^2 / HW)``; loss = mean over c.
    The perturbed branch is *not* detached (faithful to the official code).
    """
    w = F.softmax(perturbed, dim=1).mean(dim=(2, 3))  # (B, C)
    sq = ((clean - perturbed) ** 2).mean(dim=(2, 3))  # (B, C)
    return (w * sq).mean(dim=0).mean()


def pixel_ce(pred: torch.Tensor, labels: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cross-entropy averaged over pixels per sample, times the per-sample ``weight``, mean over batch.

    ``labels`` are class indices (B, H, W). Used on pseudo-labels in the local step.
    """
    per_sample = F.cross_entropy(pred, labels, reduction="none").mean(dim=(1, 2))
    if weight is not None:
        per_sample = per_sample * weight.to(per_sample.dtype)
    return per_sample.mean()


#: the label of a pixel that no loss counts
IGNORE = -1


def masked_ce(logits: torch.Tensor, labels: torch.Tensor, keep: Optional[torch.Tensor] = None,
              over: str = "all") -> torch.Tensor:
    """Pixel cross-entropy summed over the ``keep`` pixels (B,H,W) bool; without ``keep``, the pixels whose
    label is not :data:`IGNORE`. Divided by ``over``: ``"all"`` pixels (FixMatch's denominator:
    unconfident pixels count as zero loss) or the ``"kept"`` ones (SemiFL, ELN; 0 where none is kept)."""
    if over not in ("all", "kept"):
        raise ValueError(f"over must be 'all' or 'kept', got {over!r}")
    if keep is None:
        keep, labels = labels != IGNORE, labels.clamp(min=0)
    ce = F.cross_entropy(logits, labels, reduction="none")
    kept = keep.to(ce.dtype)
    return (ce * kept).sum() / (ce.numel() if over == "all" else kept.sum().clamp(min=1))
