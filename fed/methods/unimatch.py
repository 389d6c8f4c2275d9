"""UniMatch federated by FedAvg on the LSSL protocol (``../shared/BASELINES.md`` §3 and §0).

Every round is :class:`fed.methods.lssl.LSSL`'s (per local epoch the supervised pass on D_p, then, after
``train.warmup_rounds``, the unlabeled pass; then the uniform FedAvg of every state-dict entry, the
round's evaluated and checkpointed model). The unlabeled pass is
UniMatch's (``LiheYoung/UniMatch`` ``unimatch.py``), per batch of weak views ``x_w``:

1. two strong views ``x_s1``, ``x_s2`` built independently from ``x_w`` on tensors, each with its own
   keyed generator (:mod:`utils.strong_views`: colour jitter p 0.8, grayscale p 0.2, blur p 0.5, a
   CutMix box p 0.5 with area 2-40% and aspect ratio in [0.3, 1/0.3]). The loaders' own strong view is
   not used. The mixing image is another image of the same batch, the same for both views, in a random
   pairing drawn for every batch (:func:`utils.strong_views.mix_partner`; UniMatch's second loader gives
   the same image in another view: see :mod:`utils.strong_views`);
2. a training-mode pass on ``x_w`` with feature perturbation (``party.forward(x, need_fp=True)``:
   Dropout2d(0.5) on every encoder feature), giving the clean prediction, whose detached softmax gives
   the pseudo-labels ``y_w = argmax`` and ``conf_w = max`` (:func:`fed.common.baseline_local.confident_labels`),
   and the FP prediction;
3. one pass on ``[x_s1, x_s2]`` (each mixed inside its box);
4. ``L_s1``, ``L_s2``: CE of each strong prediction against its cut-mixed ``y_w`` (inside the box the
   mixing image's label and confidence), kept where ``conf >= unimatch.threshold`` (0.95); ``L_fp``: CE of
   the FP prediction against ``y_w`` kept where ``conf_w >= 0.95``. Each: sum over kept pixels divided by
   *all* pixels (:func:`fed.common.baseline_local.masked_ce`; no pixel is ignored in our data).

**Loss mapping.** UniMatch steps on ``L = (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2`` with one labeled
and one unlabeled batch per step. Here the supervised pass steps on ``L_x`` (the harness loss
``seg + confide_theta * SA`` on D_p) and the unlabeled pass on ``L_u = 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp``
(:func:`unimatch_unlabeled_loss`): the weights relative to ``L_x`` are kept; the common factor 1/2 is
dropped (AdamW's steps do not depend on a constant loss scale, up to its eps). UniMatch's poly schedule
is replaced by the harness's cosine one.
"""
from __future__ import annotations

import torch

from utils.rng import generator
from utils.strong_views import cutmix, mix_partner, strong_view

from utils.config import Key, unit_interval
from fed.common import diag
from fed.common.baseline_local import confident_labels, masked_ce
from fed.core.registry import register
from fed.methods.lssl import LSSL


def unimatch_unlabeled_loss(l_s1: torch.Tensor, l_s2: torch.Tensor, l_fp: torch.Tensor) -> torch.Tensor:
    """UniMatch's unlabeled terms, weighted as in ``(L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2`` times 2."""
    return 0.25 * l_s1 + 0.25 * l_s2 + 0.5 * l_fp


@register
class UniMatch(LSSL):
    name = "unimatch"
    #: this method's settings, the ``unimatch.*`` section of the configuration (docs/configuration.md)
    options = {
        "threshold": Key(0.95, float, "UniMatch: pixel confidence threshold of the weak view's pseudo-labels.",
                         check=unit_interval),
    }

    def unlabeled_pass(self, client, rnd: int, epoch: int) -> None:
        tau, phase = self.cfg.unimatch.threshold, "local_unlabeled"
        client.model.train()
        for b, w, _ in client.batches("unlabeled", rnd, phase, epoch):
            key = (client.seed, rnd, client.name, phase, epoch, b)
            partner = mix_partner(w.shape[0], generator(*key, "partner"))  # one mixing image for both views
            x_s1, box1 = strong_view(w, generator(*key, "strong1"), partner=partner)
            x_s2, box2 = strong_view(w, generator(*key, "strong2"), partner=partner)
            p_w, p_fp = client.forward(w, need_fp=True)["mask"]
            pseudo, keep = confident_labels(p_w.detach(), tau)
            p_s1, p_s2 = client.forward(torch.cat([cutmix(x_s1, box1), cutmix(x_s2, box2)]))["mask"].chunk(2)
            l_s1 = masked_ce(p_s1, cutmix(pseudo, box1), cutmix(keep, box1))
            l_s2 = masked_ce(p_s2, cutmix(pseudo, box2), cutmix(keep, box2))
            l_fp = masked_ce(p_fp, pseudo, keep)
            client.step(unimatch_unlabeled_loss(l_s1, l_s2, l_fp))
            client.log.add(unl_s1=l_s1, unl_s2=l_s2, unl_fp=l_fp, unl_kept=keep.float().mean())
            diag.log(client, diag.pseudo_labels, pseudo, pred=pseudo, pix_kept=keep)  # labels: own weak argmax
