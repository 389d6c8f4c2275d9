"""Per-round diagnostics of the pseudo-label steps: ``diag_*`` terms in each party's loss log.

Every method that pseudo-labels logs, per unlabeled batch, through ``party.log`` (so that the round's
means reach ``metrics.jsonl`` under ``record["loss"][party]``, next to the loss terms):

* ``diag_pl_fg``: foreground fraction of the pseudo-labels, over all pixels of the batch (before any
  mask: the label map the method derives, whether or not a pixel is then kept);
* ``diag_pred_fg``: foreground fraction of the trained model's own argmax on the (weak) view;
* ``diag_pix_kept``: fraction of the batch's pixels that enter the pseudo-label loss (pixel masks and
  image gates together; 1 where nothing is masked);
* ``diag_img_kept``: fraction of the batch's images kept by a sample gate (1 without one);
* ``diag_flipped``: fraction of pixels flipped by RPG (HSSF's local step only; 0 with the flip off);
* ``diag_conf``: mean SA confidence ``max(conf_w, conf_s)`` (HSSF's local step only).

and, on labeled batches of a model with an SA confidence head (:func:`fed.common.hssf_local.supervised_pass`,
HSSF's Condensation and Fusion), its calibration: ``diag_sa_conf`` = mean ``sigmoid(confidence)``,
``diag_sa_acc`` = pixel accuracy of the argmax against the label (the SA target's mean: a calibrated
head has ``diag_sa_conf`` close to ``diag_sa_acc``).

They are computed from tensors the step already has (no forward pass, no random draw, no gradient) and
never change a loss or a weight (tested: a run with :data:`ENABLED` off is bit-identical). They stay in
the party's own log: only their round means leave it, as the loss terms' do (numbers).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

#: switch for tests (a run without any diagnostic computed must give the same weights)
ENABLED = True


def log(party, compute: Callable[..., Dict[str, torch.Tensor]], *args, **kw) -> None:
    """``party.log.add(**compute(*args, **kw))`` without gradient, when :data:`ENABLED`."""
    if ENABLED:
        with torch.no_grad():
            party.log.add(**compute(*args, **kw))


def fg_fraction(labels: torch.Tensor) -> torch.Tensor:
    """Fraction of the entries of a label map (any shape) equal to 1 (foreground); ignored entries
    (e.g. -1) count as not foreground."""
    return (labels == 1).float().mean()


def pseudo_labels(pseudo: torch.Tensor, pred: Optional[torch.Tensor] = None,
                  pix_kept: Optional[torch.Tensor] = None, img_kept: Optional[torch.Tensor] = None,
                  flipped: Optional[torch.Tensor] = None, conf: Optional[torch.Tensor] = None
                  ) -> Dict[str, torch.Tensor]:
    """The ``diag_*`` terms of one unlabeled batch (module docstring).

    ``pseudo``: the pseudo-labels (B,H,W) before masking; ``pred``: the model's own argmax (B,H,W) on the
    (weak) view (no ``diag_pred_fg`` if None); ``pix_kept``: (B,H,W) bool, pixels the loss keeps (None:
    all); ``img_kept``: (B,) bool, images a sample gate keeps (None: all; a pixel counts as kept only
    if its image is); ``flipped``: (B,H,W) bool, pixels RPG flipped (no ``diag_flipped`` if None);
    ``conf``: (B,H,W) confidence whose mean is ``diag_conf`` (none if None).
    """
    ones = torch.ones_like(pseudo, dtype=torch.bool)
    pix = ones if pix_kept is None else pix_kept.bool()
    img = ones[:, 0, 0] if img_kept is None else img_kept.bool()
    out = {"diag_pl_fg": fg_fraction(pseudo)}
    if pred is not None:
        out["diag_pred_fg"] = fg_fraction(pred)
    out["diag_pix_kept"] = (pix & img.view(-1, *[1] * (pix.dim() - 1))).float().mean()
    out["diag_img_kept"] = img.float().mean()
    if flipped is not None:
        out["diag_flipped"] = flipped.float().mean()
    if conf is not None:
        out["diag_conf"] = conf.float().mean()
    return out


def sa_calibration(mask_logits: torch.Tensor, confidence_logits: torch.Tensor, labels: torch.Tensor
                   ) -> Dict[str, torch.Tensor]:
    """``diag_sa_conf`` (mean sigmoid of the SA logits (B,1,H,W)) and ``diag_sa_acc`` (pixel accuracy of
    the argmax of ``mask_logits`` (B,C,H,W) against ``labels`` (B,H,W) or (B,1,H,W), 0/1 or indices)."""
    if labels.dim() == 4:
        labels = labels[:, 0]
    return {"diag_sa_conf": torch.sigmoid(confidence_logits.float()[:, 0]).mean(),
            "diag_sa_acc": (mask_logits.argmax(1) == labels.long()).float().mean()}
