"""FedDistill / FD (Jeong et al. 2018, arXiv 1811.11479, as PFLlib's ``FedDistill (FD)``;
``../shared/BASELINES.md`` section 8): label-wise mean logits are the only thing that crosses.

Per pixel, the labels are {0: background, 1: foreground}. Each client keeps the per-label sum and
count of its logit vectors over its last local training (``extra["fd_sum"]`` (2,2), ``extra["fd_count"]``
(2,)): ground truth on D_p pixels, confident pseudo-labels (``baselines.tau``) on its own pixels (with
``baselines.local_step: hssf`` only D_p pixels: that local step has no regulariser hook). Collected
during training from the logits the training computes, as PFLlib does. One round after the warm-up:

1. every client sends its 2x2 matrix of per-label mean logits (row = label) and which labels it saw
   (:func:`class_means`);
2. the server averages each label's row over the clients that saw it (:func:`global_logits`, in client
   order) and sends it to every client; ``feddistill.leave_one_out: true`` (Jeong's version) sends
   client k the mean over the *other* clients instead, ``(M F - F_k) / (M - 1)``
   (:func:`leave_one_out`, a :class:`fed.core.method.PerClient` message);
3. the shared local step (:mod:`fed.common.baseline_local`) with the regulariser, through its ``regularizer``
   hook: each labelled / confident pixel's logit vector is pulled toward the received logits of its
   label, ``feddistill.weight`` (lambda, 1) times :func:`mse_to_label` (PFLlib's form, default) or
   :func:`kl_to_label` (``feddistill.loss: kl``, FedGen's form: KL(softmax(F_label) || softmax(z))).
   Pixels whose label has no received logits (and unconfident pixels) add zero but count in the mean,
   as PFLlib (a sample without a global logit is its own target) and FixMatch's denominator. The
   statistics of this training are what the next round sends.

During warm-up rounds nothing is exchanged; the local step (D_p only) still collects the statistics
that the first round after it sends. No public data is used for the exchange (D_p enters only through
the local step's supervised term). The server's model is not used.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from utils.config import Key, non_negative
from fed.core.registry import register
from fed.core.method import Method, PerClient, step
from fed.core.replies import Fields, Tensor
from fed.common.baseline_local import hetero_local

C = 2  # labels (and logit channels): background, foreground


# --- pure functions -------------------------------------------------------------------------------

def class_sums(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-label sum of the logit vectors (2,2) (row = label) and pixel count (2,) over the ``valid``
    pixels, float64. ``logits`` (B,2,H,W), ``labels``/``valid`` (B,H,W)."""
    z = logits.detach().double().permute(0, 2, 3, 1).reshape(-1, C)
    w = F.one_hot(labels.reshape(-1).long(), C).double() * valid.reshape(-1, 1).double()
    return w.t() @ z, w.sum(0)


def class_means(sums: torch.Tensor, counts: torch.Tensor) -> dict:
    """The upload: per-label mean logits (2,2) float32 (zero rows for unseen labels) and ``seen`` (2,)."""
    return {"logits": (sums / counts.clamp(min=1).unsqueeze(1)).float(), "seen": counts > 0}


def global_logits(means: torch.Tensor, seen: torch.Tensor) -> dict:
    """Mean over the clients that saw each label: ``means`` (M,2,2), ``seen`` (M,2) in client order.
    ``{"logits": (2,2), "has": (2,)}`` (``has``: some client saw the label)."""
    n = seen.sum(0)
    total = (means * seen.unsqueeze(2)).sum(0)
    return {"logits": total / n.clamp(min=1).unsqueeze(1).to(total.dtype), "has": n > 0}


def leave_one_out(means: torch.Tensor, seen: torch.Tensor, k: int) -> dict:
    """Client ``k``'s teacher: :func:`global_logits` of the other clients, ``(M F - F_k) / (M - 1)``."""
    others = torch.arange(len(means)) != k
    return global_logits(means[others], seen[others])


def _use(labels: torch.Tensor, valid: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
    return (valid & has.to(labels.device)[labels]).to(torch.float32)


def mse_to_label(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, teacher: torch.Tensor,
                 has: torch.Tensor) -> torch.Tensor:
    """Per pixel the mean over classes of ``(z - F_label)^2``; summed over the valid pixels whose label
    has a teacher, divided by all pixels."""
    target = teacher.to(logits)[labels].permute(0, 3, 1, 2)  # (B,2,H,W)
    sq = ((logits - target) ** 2).mean(dim=1)
    return (sq * _use(labels, valid, has)).sum() / sq.numel()


def kl_to_label(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, teacher: torch.Tensor,
                has: torch.Tensor) -> torch.Tensor:
    """Per pixel ``KL(softmax(F_label) || softmax(z))`` (summed over classes); masked and averaged as
    :func:`mse_to_label`."""
    q = F.softmax(teacher.to(logits), dim=1)[labels].permute(0, 3, 1, 2)
    kl = F.kl_div(F.log_softmax(logits, dim=1), q, reduction="none").sum(dim=1)
    return (kl * _use(labels, valid, has)).sum() / kl.numel()


LOSSES = {"mse": mse_to_label, "kl": kl_to_label}


# --- the method -------------------------------------------------------------------------------------

@register
class FedDistill(Method):
    name = "feddistill"
    #: this method's settings, the ``feddistill.*`` section of the configuration (docs/configuration.md)
    options = {
        "weight": Key(1.0, float, "FedDistill: weight lambda of the regulariser toward the global per-label "
                      "logits (PFLlib `lamda`).", check=non_negative),
        "loss": Key("mse", str, "FedDistill regulariser: `mse` (PFLlib: MSE(logit, global logit of its label)) "
                    "or `kl` (FedGen: KL(softmax(global logit) || softmax(logit))).", choices=["mse", "kl"]),
        "leave_one_out": Key(False, bool, "FedDistill: client k's teacher excludes its own logits, "
                             "(M F - F_k) / (M - 1) (Jeong et al.); false: the mean of all clients (PFLlib)."),
    }
    sends = {"up": "per-label mean logits (2,2) over the last local training and the labels seen (2,)",
             "down": "the clients' per-label mean logits (2,2) (leave-one-out: the other clients') and "
                     "which labels have one (2,)"}

    def setup(self, party) -> None:
        if party.name != "server":
            self._reset(party)

    @staticmethod
    def _reset(party) -> None:
        party.extra["fd_sum"] = torch.zeros(C, C, dtype=torch.float64)
        party.extra["fd_count"] = torch.zeros(C, dtype=torch.float64)

    def run_round(self, r, rnd: int) -> None:
        warm = self.warm(rnd)
        teacher = None
        if not warm:
            with r.phase("collaboration"):
                replies = r.clients(self.class_logits, rnd=rnd)
                teacher = r.server(self.aggregate, {str(k): v for k, v in replies.items()})
        with r.phase("local"):
            r.clients(self.local, teacher, rnd=rnd, warm=warm)

    # --- steps ------------------------------------------------------------------------------------
    @step(read_only=True, reply=Fields(logits=Tensor("C C", torch.float32), seen=Tensor("C", torch.bool)))
    def class_logits(self, client, msg, rnd: int) -> dict:
        return class_means(client.extra["fd_sum"], client.extra["fd_count"])

    @step
    def aggregate(self, server, replies: Dict[str, dict]):
        if not replies:
            return None
        ks = sorted(int(k) for k in replies)
        means = torch.stack([replies[str(k)]["logits"].float() for k in ks])
        seen = torch.stack([replies[str(k)]["seen"] for k in ks])
        if self.cfg.feddistill.leave_one_out:
            return PerClient({k: leave_one_out(means, seen, i) for i, k in enumerate(ks)})
        return global_logits(means, seen)

    @step
    def local(self, client, teacher: Optional[dict], rnd: int, warm: bool) -> None:
        f = self.cfg.feddistill
        self._reset(client)
        loss_fn = LOSSES[f.loss]

        def regularizer(party, out, labels, valid):
            sums, counts = class_sums(out["mask"], labels, valid)
            party.extra["fd_sum"] = party.extra["fd_sum"] + sums.cpu()
            party.extra["fd_count"] = party.extra["fd_count"] + counts.cpu()
            if teacher is None:
                return None
            fd = loss_fn(out["mask"], labels, valid, teacher["logits"], teacher["has"])
            return f.weight * fd, {"fd": fd}

        hetero_local(client, rnd, self.cfg, warm, regularizer=regularizer)
