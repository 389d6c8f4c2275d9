"""Local semi-supervised learning (LSSL): the step every client runs on its own data (SPEC section 4.3).

Shared by ``hssf``, ``lssl`` and ``local``:

* labeled batches (if any): ``seg + confide_theta * SA``;
* unlabeled batches: weak view ``w`` (with feature perturbation) and strong view ``s`` (+ noise). The
  pseudo-label of each pixel comes from the view whose SA confidence is higher (ties: weak); **RPG**
  flips it where both confidences are below ``rpg_threshold``; the **sample gate** keeps images whose
  mean confidence exceeds ``sample_threshold``. Loss = FP consistency(w_clean, w_perturbed) +
  sum over v in {w_clean, s} of [pixel CE(v, pseudo) * gate + seg(v, pseudo, gate)], times
  ``unlabel_theta``.
"""
from __future__ import annotations

import torch

from utils.losses import confidence_loss, fp_consistency_loss, pixel_ce, structure_loss

from .base import one_hot


def supervised_pass(party, loader, fed, tag: str = "sup") -> None:
    """One pass of ``seg + confide_theta * SA`` on labeled batches."""
    h, amp = fed.cfg.hssf, party.amp
    party.model.train()
    for x, y, _ in loader:
        x, y = amp.to_device(x), amp.to_device(y)
        target = one_hot(y)
        out = party.forward(x)
        seg = structure_loss(out["mask"], target)
        sa = confidence_loss(out["mask"].detach(), out["confidence"], target)
        loss = seg + h.confide_theta * sa
        party.step(loss)
        fed.log.add(party.name, **{f"{tag}_seg": seg, f"{tag}_sa": sa})


def unlabeled_pass(client, loader, fed) -> None:
    """One pass over unlabeled (weak, strong) batches with SA-selected, RPG-corrected pseudo-labels."""
    h, amp = fed.cfg.hssf, client.amp
    client.model.train()
    fp = h.feature_perturbation
    for w, s, _ in loader:
        w, s = amp.to_device(w), fed.noise(amp.to_device(s))
        out_s = client.forward(s)
        out_w = client.forward(w, need_fp=fp)
        p_s = out_s["mask"]
        conf_s = torch.sigmoid(out_s["confidence"][:, 0]).detach()
        if fp:
            p_w, p_fp = out_w["mask"]
            conf_w = torch.sigmoid(out_w["confidence"][: w.shape[0], 0]).detach()
        else:
            p_w, p_fp = out_w["mask"], None
            conf_w = torch.sigmoid(out_w["confidence"][:, 0]).detach()
        conf = torch.maximum(conf_w, conf_s)
        pseudo = torch.where(conf_w < conf_s, p_s.detach().argmax(1), p_w.detach().argmax(1))
        gate = None
        if h.rpg:
            pseudo = torch.where(conf < h.rpg_threshold, 1 - pseudo, pseudo)
            gate = conf.mean(dim=(1, 2)) > h.sample_threshold
        target = one_hot(pseudo)
        terms = {}
        if fp:
            terms["fp"] = fp_consistency_loss(p_w, p_fp)
        terms["weak"] = pixel_ce(p_w, pseudo, gate) + structure_loss(p_w, target, gate)
        terms["strong"] = pixel_ce(p_s, pseudo, gate) + structure_loss(p_s, target, gate)
        loss = h.unlabel_theta * sum(terms.values())
        client.step(loss)
        kept = gate.float().mean() if gate is not None else torch.ones(())
        fed.log.add(client.name, **{f"unl_{k}": v for k, v in terms.items()}, unl_kept=kept)
