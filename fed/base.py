"""The method interface and the helpers every method shares.

A method is a small class registered in ``fed/__init__.py``::

    class MyMethod(Method):
        name = "mymethod"
        def round(self, rnd: int) -> None: ...   # one communication round

It reaches the simulation through ``self.fed`` (a :class:`fed.engine.Federation`): ``fed.server``
(model + public loader), ``fed.clients`` (models + local loaders), ``fed.cfg``, ``fed.noise(x)`` and
``fed.log`` (loss bookkeeping). Evaluation, checkpoints, logging and resuming are the engine's job.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List

import torch
import torch.nn.functional as F


class LossLog:
    """Running means of loss terms per party within a round (kept on the device: no sync per step)."""

    def __init__(self):
        self._sum: Dict[str, Dict[str, torch.Tensor]] = defaultdict(dict)
        self._n: Dict[str, Dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def add(self, party: str, **terms: torch.Tensor) -> None:
        for k, v in terms.items():
            v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
            self._sum[party][k] = self._sum[party].get(k, 0) + v
            self._n[party][k] += 1

    def means(self) -> Dict[str, Dict[str, float]]:
        return {p: {k: float(s) / self._n[p][k] for k, s in terms.items()} for p, terms in self._sum.items()}

    def non_finite(self):
        """``(party, term)`` of the first loss term whose sum is NaN or infinite, else None."""
        for p, terms in self._sum.items():
            for k, s in terms.items():
                if not torch.isfinite(torch.as_tensor(s)).all():
                    return p, k
        return None

    def drop(self, party: str) -> None:
        self._sum.pop(party, None)
        self._n.pop(party, None)


def one_hot(labels: torch.Tensor, num_classes: int = 2) -> torch.Tensor:
    """(B, H, W) or (B, 1, H, W) integer/0-1 labels -> (B, C, H, W) float one-hot."""
    if labels.dim() == 4:
        labels = labels[:, 0]
    return F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).float()


def pixel_accuracy(pred_labels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample fraction of pixels where ``pred_labels`` (B,H,W) equals ``labels`` (B,H,W)."""
    return (pred_labels == labels).float().mean(dim=(1, 2))


def rpg_correct(mask_logits: torch.Tensor, confidence_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Reliable Pseudo-label Generation: argmax, flipped where sigmoid(SA confidence) < threshold."""
    pred = mask_logits.argmax(1)
    return torch.where(torch.sigmoid(confidence_logits[:, 0]) < threshold, 1 - pred, pred)


class Method:
    """Base class: subclasses implement :meth:`round`."""

    name = "base"
    #: True when all clients share one global model (FedAvg): evaluation and checkpoints use it.
    shared_model = False
    #: False when the method ignores ``train.warmup_rounds`` (no round is logged as warm-up).
    uses_warmup = True

    def __init__(self, fed):
        self.fed = fed
        self.cfg = fed.cfg

    @classmethod
    def check_config(cls, cfg) -> List[str]:
        """Problems with ``cfg`` specific to this method (reported before anything runs)."""
        return []

    def round(self, rnd: int) -> None:
        raise NotImplementedError

    def eval_model(self, k: int) -> torch.nn.Module:
        """The model scored on client ``k``'s val/test data."""
        return self.fed.clients[k].model

    def state_dict(self) -> dict:
        """Extra state of the method to checkpoint (none by default)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
