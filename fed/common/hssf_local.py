"""Local semi-supervised learning (LSSL): the step every client runs on its own data (SPEC section 4.3).

Shared by ``hssf``, ``lssl`` and ``local``:

* labeled batches (if any): ``seg + confide_theta * SA``;
* unlabeled batches: weak view ``w`` (with feature perturbation) and strong view ``s`` (+ noise). The
  pseudo-label of each pixel comes from the view whose SA confidence is higher (ties: weak); **RPG**
  flips it where both confidences are below ``rpg_threshold``; the **sample gate** keeps images whose
  mean confidence exceeds ``sample_threshold`` (:func:`pseudo_label`; ``hssf.rpg`` switches both,
  ``hssf.rpg_flip`` and ``hssf.sample_gate`` each one). Loss = FP consistency(w_clean,
  w_perturbed) + sum over v in {w_clean, s} of [pixel CE(v, pseudo) * gate + seg(v, pseudo, gate)],
  times ``unlabel_theta``.

Both passes log ``diag_*`` terms (:mod:`fed.common.diag`): SA calibration on labeled batches, pseudo-label
statistics on unlabeled ones.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from utils.losses import confidence_loss, fp_consistency_loss, pixel_ce, structure_loss

from fed.common import diag
from fed.common.labels import one_hot


def rpg_correct(mask_logits: torch.Tensor, confidence_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Reliable Pseudo-label Generation: argmax, flipped where sigmoid(SA confidence) < threshold."""
    pred = mask_logits.argmax(1)
    return torch.where(torch.sigmoid(confidence_logits[:, 0]) < threshold, 1 - pred, pred)



def pseudo_label_parts(p_w: torch.Tensor, p_s: torch.Tensor, conf_w: torch.Tensor, conf_s: torch.Tensor,
                       rpg: bool, rpg_threshold: float, sample_threshold: float, flip: bool = True,
                       gate: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor],
                                                   torch.Tensor]:
    """:func:`pseudo_label` and what it decided from: ``(pseudo (B,H,W), gate (B,) or None, flipped
    (B,H,W) bool or None, conf = max(conf_w, conf_s) (B,H,W))``; ``flipped``/``gate`` are None where
    that part of RPG is off."""
    conf = torch.maximum(conf_w, conf_s)
    pseudo = torch.where(conf_w < conf_s, p_s.argmax(1), p_w.argmax(1))
    flipped = keep = None
    if rpg and flip:
        flipped = conf < rpg_threshold
        pseudo = torch.where(flipped, 1 - pseudo, pseudo)
    if rpg and gate:
        keep = conf.mean(dim=(1, 2)) > sample_threshold
    return pseudo, keep, flipped, conf


def pseudo_label(p_w: torch.Tensor, p_s: torch.Tensor, conf_w: torch.Tensor, conf_s: torch.Tensor,
                 rpg: bool, rpg_threshold: float, sample_threshold: float, flip: bool = True,
                 gate: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Pseudo-labels (B,H,W) and the sample gate (B,) (None without RPG or with ``gate`` off).

    ``p_w``/``p_s``: mask logits of the weak/strong view; ``conf_w``/``conf_s``: sigmoid SA confidence
    (B,H,W). Each pixel takes the argmax of the more confident view (ties: weak); with ``rpg`` (and
    ``flip``, ``hssf.rpg_flip``) it is flipped where the higher confidence is below ``rpg_threshold``,
    and (with ``gate``, ``hssf.sample_gate``) an image passes the gate when its mean higher confidence
    exceeds ``sample_threshold``. ``rpg`` off: neither.
    """
    return pseudo_label_parts(p_w, p_s, conf_w, conf_s, rpg, rpg_threshold, sample_threshold, flip, gate)[:2]


def supervised_pass(party, which: str, rnd: int, phase: str, epoch: int, h, tag: str = "sup",
                    regularizer=None, forward_kw: Optional[dict] = None, clip: float = 0.0) -> None:
    """One keyed pass of ``seg + confide_theta * SA`` over the labeled loader ``which`` (``clip``: see
    :meth:`fed.core.party.Party.step`).

    ``regularizer(party, out, labels, valid)`` (a method's own term, e.g. a baseline's): returns
    ``(loss, {name: value})`` added to the batch's loss, or None; ``labels`` (B,H,W), ``valid`` (B,H,W)
    bool. ``forward_kw``: extra arguments of ``party.forward`` the regularizer needs."""
    party.model.train()
    for _, x, y in party.batches(which, rnd, phase, epoch):
        target = one_hot(y)
        out = party.forward(x, **(forward_kw or {}))
        seg = structure_loss(out["mask"], target)
        sa = confidence_loss(out["mask"].detach(), out["confidence"], target)
        loss, terms = seg + h.confide_theta * sa, {f"{tag}_seg": seg, f"{tag}_sa": sa}
        if regularizer is not None:
            labels = y[:, 0].long()
            extra = regularizer(party, out, labels, torch.ones_like(labels, dtype=torch.bool))
            if extra is not None:
                loss = loss + extra[0]
                terms.update({f"{tag}_{k}": v for k, v in extra[1].items()})
        party.step(loss, clip)
        party.log.add(**terms)
        diag.log(party, diag.sa_calibration, out["mask"], out["confidence"], y)


def unlabeled_pass(party, rnd: int, epoch: int, h) -> None:
    """One keyed pass over unlabeled (weak, strong + noise) batches with SA-selected, RPG-corrected
    pseudo-labels."""
    party.model.train()
    fp = h.feature_perturbation
    for _, w, s in party.batches("unlabeled", rnd, "local_unlabeled", epoch, noisy=1):
        out_s = party.forward(s)
        out_w = party.forward(w, need_fp=fp)
        p_s = out_s["mask"]
        conf_s = torch.sigmoid(out_s["confidence"][:, 0]).detach()
        if fp:
            p_w, p_fp = out_w["mask"]
            conf_w = torch.sigmoid(out_w["confidence"][: w.shape[0], 0]).detach()
        else:
            p_w, p_fp = out_w["mask"], None
            conf_w = torch.sigmoid(out_w["confidence"][:, 0]).detach()
        pseudo, gate, flipped, conf = pseudo_label_parts(p_w.detach(), p_s.detach(), conf_w, conf_s, h.rpg,
                                                         h.rpg_threshold, h.sample_threshold, h.rpg_flip,
                                                         h.sample_gate)
        target = one_hot(pseudo)
        terms = {}
        if fp:
            terms["fp"] = fp_consistency_loss(p_w, p_fp)
        terms["weak"] = pixel_ce(p_w, pseudo, gate) + structure_loss(p_w, target, gate)
        terms["strong"] = pixel_ce(p_s, pseudo, gate) + structure_loss(p_s, target, gate)
        loss = h.unlabel_theta * sum(terms.values())
        party.step(loss)
        kept = gate.float().mean() if gate is not None else torch.ones(())
        party.log.add(**{f"unl_{k}": v for k, v in terms.items()}, unl_kept=kept)
        diag.log(party, diag.pseudo_labels, pseudo, pred=p_w.argmax(1), img_kept=gate, conf=conf,
                 flipped=torch.zeros_like(pseudo, dtype=torch.bool) if flipped is None else flipped)
