"""Predicting and distilling on the shared public batches (FedMD, KT-pFL).

Every party holds D_p and rebuilds one public pass's noisy, augmented batches from its key
(:meth:`fed.core.party.Party.public_batches`, stream ``"public"``), so a prediction map of a pass is indexed
by its rows: batch ``b`` of size ``n`` is rows ``b*n .. b*n + n - 1``. A party predicts the pass in eval
mode (as :meth:`fed.methods.hssf.HSSF.predict_public`) and later trains on the *same* pass (same key) against
a target of the same rows; only the prediction maps cross, never the images.
"""
from __future__ import annotations

from typing import Callable

import torch


@torch.no_grad()
def predict_pass(party, rnd: int, phase: str, epoch: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn(per-pixel logits (B,2,H,W), fp32)`` of every batch of one public pass, eval mode, rows in
    batch order: (N,2,H,W) as ``fn`` returns it (its dtype is what is sent)."""
    party.model.eval()
    return torch.cat([fn(party.forward(x)["mask"].float()) for _, x, _ in party.public_batches(rnd, phase, epoch)])


def train_pass(party, rnd: int, phase: str, epoch: int, target: torch.Tensor,
               loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], tag: str) -> None:
    """One training pass over the public pass ``(rnd, phase, epoch)``: each batch's loss is
    ``loss_fn(logits (B,2,H,W), its rows of target in fp32)``, logged as ``tag``. No scheduler step
    (the local step's epochs step it, as HSSF's Fusion)."""
    party.model.train()
    for b, x, _ in party.public_batches(rnd, phase, epoch):
        n = x.shape[0]
        loss = loss_fn(party.forward(x)["mask"], target[b * n:(b + 1) * n].to(x.device, torch.float32))
        party.step(loss)
        party.log.add(**{tag: loss})
