"""Scoring models on client data: per-image Dice/IoU/precision/recall (+ HD95), and overlays."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import torch

from utils.metrics import ScoreBook, batch_scores, hd95


@torch.no_grad()
def score_model(model: torch.nn.Module, loader, amp, book: ScoreBook, group: str,
                with_hd95: bool = False, overlay_dir: Optional[Path] = None, overlays: int = 0) -> ScoreBook:
    """Add one row per image of ``loader`` to ``book`` under ``group``. Scored in fp32 (no autocast,
    as the official code): mixed precision is for training only."""
    model.eval()
    saved = 0
    for x, y, names in loader:
        x = amp.to_device(x)
        logits = model(x)["mask"]
        pred = logits.argmax(1).cpu()
        gt = y[:, 0].long()
        scores = batch_scores(pred, gt)
        hd = [hd95(p.numpy(), g.numpy()) for p, g in zip(pred, gt)] if with_hd95 else None
        book.add(group, list(names), scores, hd)
        if overlay_dir is not None and saved < overlays:
            for i in range(min(len(names), overlays - saved)):
                save_overlay(overlay_dir / f"{group}__{Path(names[i]).stem}.png", x[i].float().cpu(),
                             gt[i].numpy(), pred[i].numpy(), float(scores["dice"][i]))
                saved += 1
    return book


def overlay(image: torch.Tensor, gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """BGR uint8 image: prediction filled in red (40%), ground-truth contour in green."""
    img = ((image.permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
    img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    out = img.copy()
    out[pred > 0] = (0.6 * img[pred > 0] + 0.4 * np.array([0, 0, 255])).astype(np.uint8)
    contours, _ = cv2.findContours(gt.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, (0, 255, 0), max(1, img.shape[0] // 192))
    return out


def save_overlay(path: Path, image: torch.Tensor, gt: np.ndarray, pred: np.ndarray, dice: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    out = overlay(image, gt, pred)
    if out.shape[0] < 256:  # small training sizes: enlarge (nearest) so that the label stays legible
        f = -(-256 // out.shape[0])
        out = cv2.resize(out, (out.shape[1] * f, out.shape[0] * f), interpolation=cv2.INTER_NEAREST)
    cv2.putText(out, f"Dice {100 * dice:.1f}", (2, max(10, out.shape[0] // 16)), cv2.FONT_HERSHEY_SIMPLEX,
                max(0.3, out.shape[0] / 600), (255, 255, 255), 1, cv2.LINE_AA)
    cv2.imwrite(str(path), out)
