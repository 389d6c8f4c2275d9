"""HSSF: Regularity Condensation, Regularity Fusion and local semi-supervised learning (SPEC section 4).

Knowledge crosses between heterogeneous models only as predictions on the public set D_p:

* **Condensation** (clients -> server): the server trains on D_p; for each sample it also distils
  (KL) from the best-graded client prediction, where a client's grade is its pixel accuracy and only
  grades above ``sample_threshold`` that beat the server's own RPG-corrected grade count.
* **Fusion** (server -> clients): every client trains on D_p and distils from the server's
  prediction on the samples where the server's RPG-corrected grade beats the client's.
* **Local learning**: :mod:`fed.local_ssl` (unlabeled data only after the warm-up rounds).

During warm-up (``train.warmup_rounds``) ``kl_theta`` is 0 and unlabeled training is off; the
predictions that would only feed a zero-weighted KL term are then not computed (no effect on results:
those forward passes are in eval mode, without randomness or state change).
"""
from __future__ import annotations

import torch

from utils.losses import confidence_loss, kl_loss, structure_loss

from .base import Method, one_hot, pixel_accuracy, rpg_correct
from .local_ssl import supervised_pass, unlabeled_pass


def _predict(party, x):
    party.model.eval()
    return party.forward(x)["mask"]


class HSSF(Method):
    name = "hssf"

    def round(self, rnd: int) -> None:
        fed, t = self.fed, self.cfg.train
        warm = rnd < t.warmup_rounds
        kl_theta = 0.0 if warm else self.cfg.hssf.kl_theta
        for _ in range(t.condensation_epochs):
            self.condensation_epoch(kl_theta)
            fed.server.scheduler.step()
        for _ in range(t.fusion_epochs):
            self.fusion_epoch(kl_theta)
        for _ in range(t.local_epochs):
            for c in fed.clients:
                fed.run_client(c, lambda c=c: self.local(c, warm))
            for c in fed.clients:
                c.scheduler.step()

    def local(self, client, warm: bool) -> None:
        if client.labeled is not None:
            supervised_pass(client, client.labeled, self.fed)
        if not warm and client.unlabeled is not None:
            unlabeled_pass(client, client.unlabeled, self.fed)

    def condensation_epoch(self, kl_theta: float) -> None:
        fed, h = self.fed, self.cfg.hssf
        server, amp = fed.server, fed.server.amp
        for x, y, _ in server.public:
            x, y = fed.noise(amp.to_device(x)), amp.to_device(y)[:, 0].long()
            target = one_hot(y)
            server.model.train()
            out = server.forward(x)
            p_g, c_g = out["mask"], out["confidence"]
            sa = confidence_loss(p_g.detach(), c_g, target)
            seg = structure_loss(p_g, target)
            loss = h.confide_theta * sa + seg
            terms = {"cond_seg": seg, "cond_sa": sa}
            if kl_theta > 0:
                g0 = pixel_accuracy(rpg_correct(p_g.detach(), c_g.detach(), h.rpg_threshold), y)
                picked, grade = p_g.detach(), g0.clone()
                with torch.no_grad():
                    for c in fed.active_clients():
                        p_k = fed.run_client(c, lambda c=c: _predict(c, x))
                        if p_k is None:  # the client failed and sits the round out
                            continue
                        s_k = pixel_accuracy(p_k.argmax(1), y)
                        better = s_k > grade
                        picked = torch.where(better[:, None, None, None], p_k, picked)
                        grade = torch.where(better, s_k, grade)
                        grade = torch.where(grade > h.sample_threshold, grade, torch.zeros_like(grade))
                kl = kl_loss(p_g, picked, grade > g0, h.temperature)
                loss = loss + kl_theta * kl
                terms.update(cond_kl=kl, cond_taken=(grade > g0).float().mean())
            server.step(loss)
            fed.log.add("server", **terms)

    def fusion_epoch(self, kl_theta: float) -> None:
        fed, h = self.fed, self.cfg.hssf
        server, amp = fed.server, fed.server.amp
        for x, y, _ in server.public:
            x, y = fed.noise(amp.to_device(x)), amp.to_device(y)[:, 0].long()
            target = one_hot(y)
            if kl_theta > 0:
                server.model.eval()
                with torch.no_grad():
                    out = server.forward(x)
                    p_g = out["mask"]
                    g0 = pixel_accuracy(rpg_correct(p_g, out["confidence"], h.rpg_threshold), y)
            for c in fed.active_clients():
                def work(c=c):
                    c.model.train()
                    out = c.forward(x)
                    p_k = out["mask"]
                    sa = confidence_loss(p_k, out["confidence"], target)
                    seg = structure_loss(p_k, target)
                    loss = h.confide_theta * sa + seg
                    terms = {"fus_seg": seg, "fus_sa": sa}
                    if kl_theta > 0:
                        acc = pixel_accuracy(p_k.detach().argmax(1), y)
                        kl = kl_loss(p_k, p_g, g0 > acc, h.temperature)
                        loss = loss + kl_theta * kl
                        terms.update(fus_kl=kl, fus_taken=(g0 > acc).float().mean())
                    c.step(loss)
                    fed.log.add(c.name, **terms)
                fed.run_client(c, work)
