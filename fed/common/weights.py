"""Model weights as data: copies, the FedAvg mean, the EMA of a teacher (one implementation each)."""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn


def clone_state(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Detached copies of a state dict's (or ``named_parameters``') tensors, on their device: a reply
    that later training can not change."""
    return {k: v.detach().clone() for k, v in tensors.items()}


@torch.no_grad()
def fedavg(state_dicts: List[dict], weights=None) -> dict:
    """Weighted average of every entry, accumulated in float64 in list order (integer buffers are
    averaged and rounded back)."""
    n = len(state_dicts)
    weights = weights or [1.0 / n] * n
    out = {}
    for k, v0 in state_dicts[0].items():
        acc = sum(w * sd[k].double() for w, sd in zip(weights, state_dicts))
        out[k] = acc.round().to(v0.dtype) if not v0.is_floating_point() else acc.to(v0.dtype)
    return out


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float, buffers: str = "copy") -> None:
    """``t = m t + (1 - m) s`` for every parameter. Buffers: ``"copy"`` copies every buffer from the
    student (Mean Teacher: BatchNorm statistics are the student's); ``"ema"`` averages the floating-point
    buffers the same way and copies the others (ELN; e.g. BatchNorm's batch counter)."""
    if buffers not in ("copy", "ema"):
        raise ValueError(f"buffers must be 'copy' or 'ema', got {buffers!r}")
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)
    for t, s in zip(teacher.buffers(), student.buffers()):
        if buffers == "ema" and t.is_floating_point():
            t.mul_(momentum).add_(s, alpha=1 - momentum)
        else:
            t.copy_(s)
