"""The local step shared by the model-heterogeneous baselines (``../shared/BASELINES.md`` section 12).

Clients have no labels, so FedMD's "revisit", KT-pFL's local training, FedDistill's and FedProto's CE
term and RHFL's local learning all need a substitute. As HSSF's own code structure suggests, every
heterogeneous baseline runs, after its collaboration step, ``train.local_epochs`` passes of:

1. the harness supervised loss on the public labeled set D_p (``seg + confide_theta * SA``;
   :func:`fed.common.hssf_local.supervised_pass`), clients may use its labels as HSSF's Fusion does;
2. after the warm-up, a pass over the client's unlabeled data (``baselines.local_step``):

   * ``fixmatch`` (default): FixMatch-style pixel pseudo-labels. The weak view is predicted without
     gradient; each pixel's label is its argmax, kept where its softmax confidence is at least
     ``baselines.tau``; the loss is the CE of the strong view against them, summed over kept pixels
     and divided by *all* pixels (:func:`masked_ce`), times ``baselines.unlabeled_weight``;
   * ``hssf``: HSSF's own local step (SA-selected, RPG-corrected pseudo-labels; :mod:`fed.common.hssf_local`);

3. plus the method's own regulariser, on D_p (ground truth) and, with ``fixmatch``, on the confident
   local pixels: ``regularizer(party, out, labels, valid) -> (loss, terms)`` or None.

The loss on pseudo-labels is the method's choice (``loss``: RHFL uses its symmetric CE). One
scheduler step per local epoch, as everywhere.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from utils.losses import masked_ce
from utils.config import Key, add_section, non_negative, unit_interval
from fed.common import diag
from fed.common.epochs import local_epochs
from fed.common.hssf_local import supervised_pass, unlabeled_pass


#: the ``baselines.*`` section of the configuration (docs/configuration.md)
OPTIONS = add_section("baselines", {
    "local_step": Key("fixmatch", str, "Heterogeneous baselines' local step on unlabeled data "
                      "(BASELINES.md section 12): `fixmatch` (pixel pseudo-labels from the weak view, "
                      "confidence >= `baselines.tau`, CE on the strong view) or `hssf` (HSSF's local step).",
                      choices=["fixmatch", "hssf"]),
    "tau": Key(0.95, float, "Confidence threshold of the `fixmatch` local step.", check=unit_interval),
    "unlabeled_weight": Key(1.0, float, "Weight of the local pseudo-label loss.", check=non_negative),
})


def confident_labels(logits: torch.Tensor, tau: float):
    """Argmax labels (B,H,W) and where the softmax confidence reaches ``tau`` (B,H,W) bool."""
    conf, labels = F.softmax(logits.float(), dim=1).max(dim=1)
    return labels, conf >= tau


def pseudo_label_pass(party, rnd: int, epoch: int, cfg, regularizer: Optional[Callable] = None,
                      loss: Callable = masked_ce, forward_kw: Optional[dict] = None, tag: str = "unl") -> None:
    """One keyed pass over the unlabeled (weak, strong) batches with FixMatch-style pixel pseudo-labels."""
    b = cfg.baselines
    party.model.train()
    for _, w, s in party.batches("unlabeled", rnd, "local_unlabeled", epoch, noisy=1):
        with torch.no_grad():
            labels, keep = confident_labels(party.forward(w)["mask"], b.tau)
        out = party.forward(s, **(forward_kw or {}))
        unl = loss(out["mask"], labels, keep)
        total, terms = b.unlabeled_weight * unl, {f"{tag}_ce": unl, f"{tag}_kept": keep.float().mean()}
        if regularizer is not None:
            extra = regularizer(party, out, labels, keep)
            if extra is not None:
                total = total + extra[0]
                terms.update({f"{tag}_{k}": v for k, v in extra[1].items()})
        party.step(total)
        party.log.add(**terms)
        diag.log(party, diag.pseudo_labels, labels, pred=labels, pix_kept=keep)  # labels: own weak argmax


def hetero_local(party, rnd: int, cfg, warm: bool, regularizer: Optional[Callable] = None,
                 loss: Callable = masked_ce, forward_kw: Optional[dict] = None, epochs: Optional[int] = None) -> None:
    """``epochs`` (default ``train.local_epochs``) local epochs of the shared local step (module
    docstring); ``warm``: D_p only."""
    if warm:
        unlabeled = None
    elif cfg.baselines.local_step == "hssf":
        unlabeled = functools.partial(unlabeled_pass, h=cfg.hssf)
    else:
        def unlabeled(p, r, e):
            pseudo_label_pass(p, r, e, cfg, regularizer, loss, forward_kw)
    local_epochs(party, rnd, cfg.train.local_epochs if epochs is None else epochs, cfg.hssf, labeled="public",
                 unlabeled=unlabeled, regularizer=regularizer, forward_kw=forward_kw)
