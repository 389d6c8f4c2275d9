"""FixMatch federated by FedAvg on the LSSL protocol (``../shared/BASELINES.md`` §2 and §0).

Every round is :class:`fed.methods.lssl.LSSL`'s (per local epoch the supervised pass on D_p, then, after
``train.warmup_rounds``, the unlabeled pass; then the uniform FedAvg of every state-dict entry, the
round's evaluated and checkpointed model). The unlabeled pass is
the segmentation FixMatch of UniMatch's repository (``fixmatch.py``), per batch of aligned views:

* pseudo-labels: the model on the weak view ``x_w`` without gradient (training mode, as the reference's
  weak forward), per pixel ``y = argmax p`` and ``conf = max p`` (:func:`fed.common.baseline_local.confident_labels`);
* the strong view ``x_s`` (``fixmatch.strong``): ``unimatch`` (default) builds it from ``x_w`` on tensors
  with UniMatch's colour jitter, grayscale and blur (:mod:`utils.strong_views`); ``randaugment`` takes the
  loaders' strong view (``x_w`` + RandAugmentMC(2, 10) + ``data.public_noise`` noise, HSSF's);
* CutMix (``fixmatch.cutmix``, default on, p 0.5, 2-40% of the image): inside the box the strong view,
  the pseudo-labels and the confidence mask come from the mixing image, another image of the same batch
  in a random pairing drawn for every batch (:func:`utils.strong_views.mix_partner`; its labels from its
  own weak forward of this step, where the reference makes an extra eval-mode pass on a second loader
  over the same data, in the same order: see :mod:`utils.strong_views`);
* ``L_u`` = sum over pixels of ``CE(f(x_s), y) * [conf >= 0.95]`` divided by the number of *all* pixels
  (:func:`fed.common.baseline_local.masked_ce`; no pixel is ignored in our data).

**Loss mapping.** The reference steps on ``L = (L_x + L_u) / 2`` with one labeled and one unlabeled batch
per step. Here the supervised pass steps on ``L_x`` (the harness loss ``seg + confide_theta * SA`` on D_p)
and the unlabeled pass on ``fixmatch.unlabeled_weight * L_u`` (lambda_u = 1): the 1:1 weighting is kept;
the common factor 1/2 is dropped (AdamW's steps do not depend on a constant loss scale, up to its eps).
"""
from __future__ import annotations

import torch

from utils.rng import generator
from utils.strong_views import cutmix, strong_view

from utils.config import Key, non_negative, unit_interval
from fed.common import diag
from fed.common.baseline_local import confident_labels, masked_ce
from fed.core.registry import register
from fed.methods.lssl import LSSL


@register
class FixMatch(LSSL):
    name = "fixmatch"
    #: this method's settings, the ``fixmatch.*`` section of the configuration (docs/configuration.md)
    options = {
        "threshold": Key(0.95, float, "FixMatch: pixel confidence threshold of the weak view's pseudo-labels.",
                         check=unit_interval),
        "unlabeled_weight": Key(1.0, float, "FixMatch: weight `lambda_u` of the unlabeled loss relative to "
                                "the supervised pass's loss (weight 1).", check=non_negative),
        "strong": Key("unimatch", str, "FixMatch's strong view: `unimatch` (built from the weak view: colour "
                      "jitter, grayscale, blur as UniMatch's FixMatch) or `randaugment` (the loaders' strong "
                      "view: the weak view + RandAugmentMC(2, 10) + noise, as HSSF's local step).",
                      choices=["unimatch", "randaugment"]),
        "cutmix": Key(True, bool, "FixMatch: CutMix on the strong view (p 0.5, 2-40% of the image) with the "
                      "mixing image's pseudo-labels inside the box, as UniMatch's FixMatch."),
    }

    def unlabeled_pass(self, client, rnd: int, epoch: int) -> None:
        f, phase = self.cfg.fixmatch, "local_unlabeled"
        randaugment = f.strong == "randaugment"
        client.model.train()
        for b, w, s in client.batches("unlabeled", rnd, phase, epoch, noisy=1 if randaugment else None):
            with torch.no_grad():
                pseudo, keep = confident_labels(client.forward(w)["mask"], f.threshold)
            g = generator(client.seed, rnd, client.name, phase, epoch, b, "strong")
            x_s, mix = strong_view(s if randaugment else w, g, photometric_ops=not randaugment, box=f.cutmix)
            l_u = masked_ce(client.forward(cutmix(x_s, mix))["mask"], cutmix(pseudo, mix), cutmix(keep, mix))
            client.step(f.unlabeled_weight * l_u)
            client.log.add(unl_u=l_u, unl_kept=keep.float().mean())
            diag.log(client, diag.pseudo_labels, pseudo, pred=pseudo, pix_kept=keep)  # labels: own weak argmax
