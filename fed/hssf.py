"""HSSF: Regularity Condensation, Regularity Fusion and local semi-supervised learning (SPEC section 4).

Knowledge crosses between heterogeneous models only as predictions on the public set D_p. One round:

1. **Condensation** (clients -> server), per pass ``e`` over D_p: every client predicts the pass's
   noisy, augmented public batches (it rebuilds them itself from their key) and sends its logits and
   grades (pixel accuracy); the server folds the replies, in any order, into one teacher per sample
   (:func:`fold_teacher`) and trains on D_p, distilling (KL) from the teacher where its grade beats
   the server's own RPG-corrected grade (:func:`teacher_mask`).
2. **Fusion** (server -> clients), per pass ``e``: the server sends its logits and RPG-corrected
   grades on the pass's public batches; every client trains on D_p and distils from the server where
   the server's grade beats its own pixel accuracy (:func:`fusion_mask`).
3. **Local learning**: :mod:`fed.local_ssl` (unlabeled data only after the warm-up rounds).

Messages go pass by pass, so at most one pass of predictions is held at a time. During warm-up
``kl_theta`` is 0 and unlabeled training is off; the predictions that would only feed a zero-weighted
KL term are then neither computed nor sent.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from utils.losses import confidence_loss, kl_loss, structure_loss

from .base import Method, one_hot, pixel_accuracy, rpg_correct
from .local_ssl import local_epochs


# --- the decisions of HSSF, as pure functions ---------------------------------------------------

def running_pick(g0: torch.Tensor, grades: torch.Tensor, threshold: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The official Condensation pick, literally: start from the server (index -1, grade ``g0``);
    for each client k in order take it where ``grades[k] > grade`` (strict), then reset picked grades
    ``<= threshold`` to 0. Returns the picked index (B,) and grade (B,); the KL mask is ``grade > g0``.
    """
    index, grade = torch.full_like(g0, -1, dtype=torch.long), g0.clone()
    for k, s in enumerate(grades):
        better = s > grade
        index = torch.where(better, torch.full_like(index, k), index)
        grade = torch.where(better, s, grade)
        grade = torch.where(grade > threshold, grade, torch.zeros_like(grade))
    return index, grade


def fold_teacher(acc: Optional[dict], k: int, reply: dict) -> dict:
    """Fold one client's Condensation reply ``{"grade": (N,), "logits": (N,2,H,W)}`` into the best so
    far: the highest grade wins, ties go to the lower client index. Order-free: any arrival order of
    the replies gives the same result (the first argmax over clients in index order)."""
    g = reply["grade"]
    if acc is None:
        return {"grade": g.clone(), "index": torch.full_like(g, k, dtype=torch.long), "logits": reply["logits"].clone()}
    better = (g > acc["grade"]) | ((g == acc["grade"]) & (k < acc["index"]))
    acc["grade"] = torch.where(better, g, acc["grade"])
    acc["index"] = torch.where(better, torch.full_like(acc["index"], k), acc["index"])
    acc["logits"][better] = reply["logits"][better]
    return acc


def teacher_mask(best: torch.Tensor, g0: torch.Tensor, threshold: float) -> torch.Tensor:
    """Where the Condensation teacher is used: its grade ``best`` (the highest client grade) passes the
    ``threshold`` and beats the server's RPG-corrected grade ``g0``. Equal to :func:`running_pick`'s
    ``grade > g0``, with the teacher the first client of highest grade (tested)."""
    return (best > threshold) & (best > g0)


def fusion_mask(g0: torch.Tensor, client_acc: torch.Tensor) -> torch.Tensor:
    """Fusion distils from the server where its RPG-corrected grade beats the client's accuracy."""
    return g0 > client_acc


# --- the method -------------------------------------------------------------------------------------

class HSSF(Method):
    name = "hssf"
    sends = {"up": "per pass of Condensation: logits (N,2,H,W) and pixel-accuracy grades (N,) on the "
                   "public batches",
             "down": "per pass of Fusion: the server's logits (N,2,H,W) and RPG-corrected grades (N,) "
                     "on the public batches"}

    def run_round(self, r, rnd: int) -> None:
        t = self.cfg.train
        warm = self.warm(rnd)
        kl_theta = 0.0 if warm else self.cfg.hssf.kl_theta
        with r.phase("condensation"):
            for e in range(t.condensation_epochs):
                teacher = (r.clients("predict_public", rnd=rnd, phase="condensation", epoch=e, reduce=fold_teacher)
                           if kl_theta > 0 else None)
                r.server("condense", teacher, rnd=rnd, epoch=e, kl_theta=kl_theta)
        with r.phase("fusion"):
            for e in range(t.fusion_epochs):
                guide = r.server("predict_public", rnd=rnd, phase="fusion", epoch=e) if kl_theta > 0 else None
                r.clients("fuse", guide, rnd=rnd, epoch=e, kl_theta=kl_theta)
        with r.phase("local"):
            r.clients("local", rnd=rnd, warm=warm)

    # --- steps ------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_public(self, party, msg, rnd: int, phase: str, epoch: int) -> dict:
        """Logits and grade of every sample of one public pass, eval mode. A client's grade is its
        pixel accuracy; the server's is the accuracy of its RPG-corrected prediction."""
        party.model.eval()
        logits, grades = [], []
        for _, x, y in party.public_batches(rnd, phase, epoch):
            out = party.forward(x)
            p = out["mask"]
            pred = (rpg_correct(p, out["confidence"], self.cfg.hssf.rpg_threshold) if party.name == "server"
                    else p.argmax(1))
            logits.append(p)
            grades.append(pixel_accuracy(pred, y))
        return {"logits": torch.cat(logits), "grade": torch.cat(grades)}

    def condense(self, server, teacher: Optional[dict], rnd: int, epoch: int, kl_theta: float) -> None:
        """One pass of Regularity Condensation on the server; then its scheduler steps."""
        h = self.cfg.hssf
        server.model.train()
        for b, x, y in server.public_batches(rnd, "condensation", epoch):
            target = one_hot(y)
            out = server.forward(x)
            p_g, c_g = out["mask"], out["confidence"]
            sa = confidence_loss(p_g.detach(), c_g, target)
            seg = structure_loss(p_g, target)
            loss = h.confide_theta * sa + seg
            terms = {"cond_seg": seg, "cond_sa": sa}
            if kl_theta > 0:
                g0 = pixel_accuracy(rpg_correct(p_g.detach(), c_g.detach(), h.rpg_threshold), y)
                rows = slice(b * x.shape[0], (b + 1) * x.shape[0])
                if teacher is None:  # every client failed: nothing to distil from
                    mask, picked = torch.zeros_like(g0, dtype=torch.bool), p_g.detach()
                else:
                    mask = teacher_mask(teacher["grade"][rows], g0, h.sample_threshold)
                    picked = torch.where(mask[:, None, None, None], teacher["logits"][rows], p_g.detach())
                kl = kl_loss(p_g, picked, mask, h.temperature)
                loss = loss + kl_theta * kl
                terms.update(cond_kl=kl, cond_taken=mask.float().mean())
            server.step(loss)
            server.log.add(**terms)
        server.scheduler.step()

    def fuse(self, client, guide: Optional[dict], rnd: int, epoch: int, kl_theta: float) -> None:
        """One pass of Regularity Fusion on a client."""
        h = self.cfg.hssf
        client.model.train()
        for b, x, y in client.public_batches(rnd, "fusion", epoch):
            target = one_hot(y)
            out = client.forward(x)
            p_k = out["mask"]
            sa = confidence_loss(p_k, out["confidence"], target)
            seg = structure_loss(p_k, target)
            loss = h.confide_theta * sa + seg
            terms = {"fus_seg": seg, "fus_sa": sa}
            if kl_theta > 0:
                rows = slice(b * x.shape[0], (b + 1) * x.shape[0])
                mask = fusion_mask(guide["grade"][rows], pixel_accuracy(p_k.detach().argmax(1), y))
                kl = kl_loss(p_k, guide["logits"][rows], mask, h.temperature)
                loss = loss + kl_theta * kl
                terms.update(fus_kl=kl, fus_taken=mask.float().mean())
            client.step(loss)
            client.log.add(**terms)

    def local(self, client, msg, rnd: int, warm: bool) -> None:
        local_epochs(client, rnd, self.cfg, labeled="labeled", unlabeled=not warm)
