"""Per-image segmentation metrics (SPEC sections 4 and 6).

Dice, IoU, precision and recall follow the official code: ``(num + 1e-15) / (den + 1e-15)`` per image
on the argmax foreground, so an empty prediction of an empty mask scores 1. HD95 uses medpy's
definition, in pixels; it is undefined when the prediction or the ground truth is empty: such images
are left out of HD95 and counted.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional

import numpy as np
import torch

EPS = 1e-15
NAMES = ("dice", "iou", "precision", "recall")


def batch_scores(pred: torch.Tensor, gt: torch.Tensor) -> Dict[str, torch.Tensor]:
    """``pred``, ``gt``: (B, H, W) or (B, 1, H, W) binary tensors -> dict of (B,) float64 scores in [0, 1]."""
    pred = pred.reshape(pred.shape[0], -1).double()
    gt = gt.reshape(gt.shape[0], -1).double()
    inter = (pred * gt).sum(1)
    ps, gs = pred.sum(1), gt.sum(1)
    return {
        "dice": (2 * inter + EPS) / (ps + gs + EPS),
        "iou": (inter + EPS) / (ps + gs - inter + EPS),
        "precision": (inter + EPS) / (ps + EPS),
        "recall": (inter + EPS) / (gs + EPS),
    }


def hd95(pred: np.ndarray, gt: np.ndarray) -> Optional[float]:
    """95th-percentile Hausdorff distance in pixels (medpy), or None when either mask is empty."""
    from medpy.metric.binary import hd95 as _hd95

    pred, gt = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    if not pred.any() or not gt.any():
        return None
    return float(_hd95(pred, gt))


def mean_std(values: Iterable[float]) -> Dict[str, float]:
    """Mean and sample standard deviation (ddof 1, as torch.std in the official test script)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


class ScoreBook:
    """Collects per-image scores per group (client) and summarises them per group and overall."""

    def __init__(self):
        self.rows: List[dict] = []

    def add(self, group: str, names: List[str], scores: Dict[str, torch.Tensor],
            hd: Optional[List[Optional[float]]] = None) -> None:
        for i, name in enumerate(names):
            row = {"group": group, "name": name}
            row.update({k: float(v[i]) for k, v in scores.items()})
            if hd is not None:
                row["hd95"] = hd[i]
            self.rows.append(row)

    def groups(self) -> List[str]:
        return list(dict.fromkeys(r["group"] for r in self.rows))

    def summary(self, group: Optional[str] = None, scale: float = 1.0) -> Dict[str, dict]:
        rows = [r for r in self.rows if group is None or r["group"] == group]
        out = {k: mean_std(r[k] * scale for r in rows) for k in NAMES if rows and k in rows[0]}
        if rows and "hd95" in rows[0]:
            vals = [r["hd95"] for r in rows if r["hd95"] is not None]
            out["hd95"] = mean_std(vals)
            out["hd95"]["left_out"] = len(rows) - len(vals)
        out["images"] = len(rows)
        return out
