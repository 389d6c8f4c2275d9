"""FedMD (Li & Wang 2019, arXiv 1910.03581; ``../shared/BASELINES.md`` section 6): model-heterogeneous
federated distillation through a consensus on the public set.

Only predictions cross, never weights. One round after the warm-up (which stands for FedMD's transfer
learning on the public data):

1. **Communicate**: every client predicts the round's public pass (D_p images, rebuilt from their key;
   eval mode) and sends its per-pixel raw logits (N,2,H,W) (``fedmd.average: probs``: its softmax
   probabilities instead; not the original, BASELINES.md: logit averaging is scale-sensitive across
   heterogeneous models).
2. **Aggregate**: the server averages them into the consensus (:func:`consensus`, summed in client
   order: order-free) and sends it to every client.
3. **Digest**: each client regresses its logits (probabilities) on the same pass to the consensus with
   the per-pixel, per-class L1 loss (:func:`digest_loss`; FedMD_clean compiles its logit model with
   mean absolute error) for ``fedmd.digest_epochs`` passes.
4. **Revisit**: the shared local step (:mod:`fed.common.baseline_local`; clients have no labels).

During warm-up rounds nothing is exchanged and the local step runs on D_p only. ``fedmd.logits_dtype:
float16`` halves both messages (lossy; the mean is taken in fp32). The server's model is not used.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from utils.config import Key, non_negative
from fed.core.registry import register
from fed.core.method import Method, step
from fed.core.replies import Fields, Tensor
from fed.common.baseline_local import hetero_local
from fed.common.public import predict_pass, train_pass

PHASE = "collaboration"  # the key of the round's public pass (predicted, then digested)


def consensus(maps: List[torch.Tensor]) -> torch.Tensor:
    """The mean of the clients' maps (in client order, fp32): FedMD's consensus."""
    total = torch.zeros_like(maps[0], dtype=torch.float32)
    for m in maps:
        total += m.float()
    return total / len(maps)


def digest_loss(logits: torch.Tensor, target: torch.Tensor, average: str = "logits") -> torch.Tensor:
    """L1 between the client's map and the consensus, averaged over pixels and classes; with
    ``average="probs"`` the map is the softmax of the logits."""
    mine = F.softmax(logits, dim=1) if average == "probs" else logits
    return F.l1_loss(mine, target)


@register
class FedMD(Method):
    name = "fedmd"
    #: this method's settings, the ``fedmd.*`` section of the configuration (docs/configuration.md)
    options = {
        "digest_epochs": Key(1, int, "FedMD: Digest passes over the round's public pass (L1 regression to the "
                             "consensus; FedMD_clean `N_logits_matching_round`).", check=non_negative),
        "average": Key("logits", str, "FedMD: what the consensus averages: `logits` (raw logits, the original) "
                       "or `probs` (softmax probabilities: less scale-sensitive across architectures; the digest "
                       "then regresses the softmax).", choices=["logits", "probs"]),
        "logits_dtype": Key("float32", str, "FedMD exchange reduction (lossy): `float16` sends the public "
                            "logits and the consensus in half precision (averaged in fp32).",
                            choices=["float32", "float16"]),
    }
    sends = {"up": "per-pixel raw logits (N,2,H,W) on the round's public pass (`fedmd.average: probs`: "
                   "softmax probabilities)",
             "down": "the consensus: the clients' mean (N,2,H,W)"}

    def run_round(self, r, rnd: int) -> None:
        warm = self.warm(rnd)
        if not warm:
            with r.phase("collaboration"):
                replies = r.clients(self.predict_public, rnd=rnd)
                agreed = r.server(self.aggregate, [v["logits"] for v in replies.values()])
                r.clients(self.digest, agreed, rnd=rnd)
        with r.phase("local"):
            r.clients(self.local, rnd=rnd, warm=warm)

    # --- steps ------------------------------------------------------------------------------------
    @step(read_only=True, reply=lambda m: Fields(logits=Tensor(
        "n<=P C S S", getattr(torch, m.cfg.fedmd.logits_dtype),
        **({"lo": 0, "hi": 1} if m.cfg.fedmd.average == "probs" else {}))))
    def predict_public(self, client, msg, rnd: int) -> dict:
        m = self.cfg.fedmd
        dtype = getattr(torch, m.logits_dtype)
        fn = (lambda z: F.softmax(z, dim=1).to(dtype)) if m.average == "probs" else (lambda z: z.to(dtype))
        return {"logits": predict_pass(client, rnd, PHASE, 0, fn)}

    @step
    def aggregate(self, server, maps: List[torch.Tensor]) -> Optional[dict]:
        if not maps:  # every client failed
            return None
        return {"consensus": consensus(maps).to(getattr(torch, self.cfg.fedmd.logits_dtype))}

    @step
    def digest(self, client, msg: Optional[dict], rnd: int) -> None:
        """``fedmd.digest_epochs`` passes over the round's public pass (the same batches each time)."""
        if msg is None:
            return
        average = self.cfg.fedmd.average
        for _ in range(self.cfg.fedmd.digest_epochs):
            train_pass(client, rnd, PHASE, 0, msg["consensus"],
                       lambda z, t: digest_loss(z, t, average), tag="digest_l1")

    @step
    def local(self, client, msg, rnd: int, warm: bool) -> None:
        hetero_local(client, rnd, self.cfg, warm)
