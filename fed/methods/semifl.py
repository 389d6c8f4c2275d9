"""SemiFL with alternate training (``ft=1``), for segmentation (BASELINES.md section 5).

Labels stay at the server: **clients never see D_p or its labels**; they train only on their own
unlabeled data with pseudo-labels of the global model. One round (after the warm-up):

1. every client loads the global model it received, keeps a frozen copy of it (eval mode) as its
   labeller, and trains ``semifl.local_epochs`` epochs on *fix* and *mix* batches
   (:func:`fix_select`, :func:`semifl_loss`): ``CE(f(x_s^fix), y) + lam CE(f(x_mix), y_a) +
   (1 - lam) CE(f(x_mix), y_b)``, ``x_mix = lam x_w^fix + (1 - lam) x_w^mix``, ``lam ~ Beta(0.75, 0.75)``
   per batch (keyed), gradient norm clipped at ``semifl.clip``; then sends its weights;
2. the server averages them uniformly (:func:`fed.methods.lssl.fedavg`) and applies the average to the global
   parameters as an SGD step with lr ``semifl.server_lr`` (1) and momentum ``semifl.server_momentum``
   (0.5) (:func:`server_momentum_step`; the momentum buffer lives in the server's ``extra``); BatchNorm
   buffers take the plain average (the official update only steps the parameters);
3. the server fine-tunes the result on D_p for ``semifl.server_epochs`` passes (the harness supervised
   loss, :func:`fed.common.hssf_local.supervised_pass`, gradients clipped at ``semifl.clip`` as the official
   ``Server.train``), then, with ``semifl.sbn``, recomputes the BatchNorm
   statistics with one cumulative pass over D_p (official ``sbn=1`` uses server + client data; in FL only
   D_p is at the server), and broadcasts the next global model. Clients keep it (their model and its
   copy: the start of their next round), so it crosses once per round. This global model, the server's
   update of the average after the round's local training, is the one evaluated and checkpointed for
   the round (as for every shared-model method: each round scores what it trained).

Warm-up rounds (``train.warmup_rounds``): the server fine-tunes on D_p and broadcasts; the clients do
nothing else. Round 0 after no warm-up starts with one broadcast of the server's initial model.

Segmentation adaptation. Pseudo-labels are per pixel: the *fix* images of a batch are those with at
least one pixel of confidence >= ``semifl.tau`` (0.95); their other pixels are ignored. The *mix* partners
come from a second keyed pass over all the client's unlabeled data in a random order of its own (always
shuffled, whatever ``data.shuffle``: SemiFL's mix set is random draws from all samples), their full hard
maps as ``y_b``, as many as the batch's fix images. The labeller is the round's fixed global model in eval mode, applied to
each batch's weak view as it is drawn rather than to a stored dataset: the views are re-augmented
geometrically every epoch, so stored masks would not line up; with the model fixed for the round it is
the same labelling function (fix-set membership is decided per view). Fix and mix images go through
the model in one forward pass (BatchNorm statistics over both; a batch may keep a single fix image).
The local optimizer is the
harness's (``train.optimizer``, state kept between rounds, as lssl) and the client schedule steps once
per round (SemiFL's global schedule is per round). Protocol: labels at the server (BASELINES' H2), not
the H1 protocol of lssl.
"""
from __future__ import annotations

import copy
import functools
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.rng import derive_seed

from utils.config import Key, non_negative, positive, unit_interval
from fed.common import diag
from fed.common.epochs import local_epochs
from fed.core.registry import register
from fed.core.method import step
from fed.core.replies import State
from utils.losses import IGNORE, masked_ce
from fed.common.weights import clone_state, fedavg
from fed.methods.lssl import LSSL



# --- the pieces of SemiFL, as pure functions ------------------------------------------------------

def fix_select(logits: torch.Tensor, tau: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From the labeller's logits (B,C,H,W): ``keep`` (B,) images with at least one pixel of confidence
    ``>= tau``; ``fix`` (B,H,W) hard labels with the pixels below ``tau`` set to ``IGNORE``; ``hard``
    (B,H,W) the full hard map (what a mix partner uses)."""
    conf, hard = F.softmax(logits.float(), dim=1).max(dim=1)
    confident = conf >= tau
    fix = torch.where(confident, hard, torch.full_like(hard, IGNORE))
    return confident.flatten(1).any(dim=1), fix, hard


def semifl_loss(out_fix: torch.Tensor, y_fix: torch.Tensor, out_mix: torch.Tensor, y_a: torch.Tensor,
                y_b: torch.Tensor, lam: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(fix, mix)``: ``CE(out_fix, y_fix)`` and ``lam CE(out_mix, y_a) + (1 - lam) CE(out_mix, y_b)``."""
    ce = functools.partial(masked_ce, over="kept")
    return ce(out_fix, y_fix), lam * ce(out_mix, y_a) + (1 - lam) * ce(out_mix, y_b)


def mixup_lambda(alpha: float, *key) -> float:
    """``lam ~ Beta(alpha, alpha)`` drawn from ``key``."""
    return float(np.random.default_rng(derive_seed(*key)).beta(alpha, alpha))


@torch.no_grad()
def server_momentum_step(params: dict, avg: dict, buf: Optional[dict], lr: float, momentum: float):
    """SemiFL's server update: pseudo-gradient ``d = global - avg``; ``buf = d`` (first step) or
    ``momentum * buf + d``; ``global - lr * buf``. Returns ``(new params, buf)`` (torch SGD's rule)."""
    new, out_buf = {}, {}
    for k, p in params.items():
        d = p - avg[k]
        b = d.clone() if buf is None or k not in buf else momentum * buf[k] + d
        out_buf[k] = b
        new[k] = p - lr * b
    return new, out_buf


@torch.no_grad()
def recompute_bn(party, which: str, rnd: int) -> None:
    """``sbn``: BatchNorm statistics recomputed by one cumulative pass (momentum None) over ``which``."""
    bns = [m for m in party.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or not party.has(which):
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    party.model.train()
    for _, x, _ in party.batches(which, rnd, "sbn", 0):
        party.forward(x)
    for m, mom in zip(bns, saved):
        m.momentum = mom


# --- the method -------------------------------------------------------------------------------------

@register
class SemiFL(LSSL):
    name = "semifl"
    #: this method's settings, the ``semifl.*`` section of the configuration (docs/configuration.md)
    options = {
        "local_epochs": Key(5, int, "SemiFL: local epochs per round on fix and mix batches (official `local_epoch` 5).",
                            check=positive),
        "server_epochs": Key(5, int, "SemiFL: server fine-tuning passes over D_p per round (official 5).",
                             check=non_negative),
        "tau": Key(0.95, float, "SemiFL: pixel confidence threshold of the fix set (`fix@0.95`).", check=unit_interval),
        "mix_alpha": Key(0.75, float, "SemiFL: mixup `lam ~ Beta(alpha, alpha)`, one draw per batch.", check=positive),
        "clip": Key(1.0, float, "SemiFL: gradient-norm clipping of the clients' training and the server's fine-tuning (0: none).", check=non_negative),
        "server_lr": Key(1.0, float, "SemiFL: lr of the server SGD step that applies the client average.",
                         check=positive),
        "server_momentum": Key(0.5, float, "SemiFL: momentum of that step (official `gm`).", check=unit_interval),
        "sbn": Key(True, bool, "SemiFL: recompute BatchNorm statistics (one cumulative pass) before each "
                   "broadcast, on D_p at the server (official `sbn=1` also uses client data, which the "
                   "server does not have); false: keep the running statistics."),
    }
    shared_model = True
    sends = {"up": "model weights (every state-dict entry), once per round after local training",
             "down": "the next global model (every state-dict entry), once per round after the server's "
                     "fine-tuning (and once before round 0 when there is no warm-up)"}

    def run_round(self, r, rnd: int) -> None:
        warm = self.warm(rnd)
        if rnd == 0 and not warm:
            with r.phase("broadcast"):
                r.clients(self.receive, r.server(self.broadcast, rnd=rnd, sbn=False))
        if not warm:
            with r.phase("local"):
                replies = r.clients(self.local, rnd=rnd)
            with r.phase("aggregation"):
                r.server(self.aggregate, list(replies.values()))  # client order: exact
        with r.phase("finetune"):
            r.server(self.finetune, rnd=rnd)
        with r.phase("broadcast"):
            r.clients(self.receive, r.server(self.broadcast, rnd=rnd, sbn=self.cfg.semifl.sbn))

    # --- server ---------------------------------------------------------------------------------
    @step
    def aggregate(self, server, weights: List[dict]) -> None:
        s = self.cfg.semifl
        avg = fedavg(weights)
        names = {k for k, _ in server.model.named_parameters()}
        state = server.model.state_dict()
        params = {k: v for k, v in state.items() if k in names}
        new, buf = server_momentum_step(params, avg, server.extra.get("momentum"), s.server_lr, s.server_momentum)
        server.extra["momentum"] = buf
        server.model.load_state_dict({k: new.get(k, avg[k]) for k in state})

    @step
    def finetune(self, server, msg, rnd: int) -> None:
        local_epochs(server, rnd, self.cfg.semifl.server_epochs, self.cfg.hssf, labeled="public", phase="finetune",
                     schedule="round", clip=self.cfg.semifl.clip)  # Server.train clips too

    @step
    def broadcast(self, server, msg, rnd: int, sbn: bool) -> dict:
        if sbn:
            recompute_bn(server, "public", rnd)
        return clone_state(server.model.state_dict())

    # --- clients --------------------------------------------------------------------------------
    @step
    def receive(self, client, weights: dict) -> None:
        client.model.load_state_dict(weights)  # the client's checkpoints hold the global model too
        client.extra["global"].load_state_dict(weights)

    @step(reply=State())
    def local(self, client, msg, rnd: int) -> dict:
        s = self.cfg.semifl
        labeller = client.extra["global"]
        client.model.load_state_dict(labeller.state_dict())
        labeller.eval()
        local_epochs(client, rnd, s.local_epochs, self.cfg.hssf, schedule="round",
                     unlabeled=lambda party, r, e: self._epoch(party, labeller, r, e))
        return clone_state(client.model.state_dict())

    def _epoch(self, client, labeller, rnd: int, e: int) -> None:
        s = self.cfg.semifl
        client.model.train()
        partners = client.batches("unlabeled", rnd, "mix", e, shuffle=True)  # random draws, whatever data.shuffle
        for b, w, st in client.batches("unlabeled", rnd, "fix", e):
            _, w_m, _ = next(partners)
            with torch.no_grad(), client.amp.autocast():
                keep, y_fix, hard = fix_select(labeller(w)["mask"], s.tau)
                _, _, y_b = fix_select(labeller(w_m)["mask"], s.tau)
            n = int(keep.sum())
            if n == 0:
                client.log.add(semifl_kept=0.0)
                diag.log(client, diag.pseudo_labels, hard, pix_kept=y_fix != IGNORE, img_kept=keep)
                continue
            lam = mixup_lambda(s.mix_alpha, self.cfg.seed, rnd, client.name, "mixup", e, b)
            x_mix = lam * w[keep] + (1 - lam) * w_m[:n]
            out_fix, out_mix = client.forward(torch.cat([st[keep], x_mix]))["mask"].split([n, n])  # one pass: BN sees 2n >= 2
            fix, mix = semifl_loss(out_fix, y_fix[keep], out_mix, y_fix[keep], y_b[:n], lam)
            loss = fix + mix
            client.step(loss, s.clip)
            client.log.add(semifl_fix=fix, semifl_mix=mix, semifl_kept=n / w.shape[0])
            # labels: the labeller's full hard map; the student's own prediction: on the fix images'
            # strong views (its only pass; no forward on the weak view)
            diag.log(client, diag.pseudo_labels, hard, pred=out_fix.argmax(1), pix_kept=y_fix != IGNORE,
                     img_kept=keep)

    def setup(self, party) -> None:
        if party.name != "server":
            party.extra["global"] = copy.deepcopy(party.model)  # the last global model received
