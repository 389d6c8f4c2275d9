"""RHFL (``../shared/BASELINES.md`` section 10): heterogeneous clients learn from each other's soft maps
on the public set, re-weighted by how fast each learns from its (noisy) labels.

Only soft maps on D_p and scalars cross. One round after the warm-up (code order of RHFL's HHF.py):

1. **CCR weights** (``collaboration``): every client computes, forward only (eval mode), its mean
   symmetric CE :func:`sce_pixels` on its pseudo-labelled local data (the confident argmax of the weak
   view, the loss on the strong view, as the local step) and sends it (one number). The mean is per
   pseudo-labelled pixel over the pass (the local step's all-pixel denominator would make ``L`` grow
   with the number of confident pixels, i.e. rise as the model learns); NaN if none. The server
   keeps each client's previous value (``server.extra``) and computes the quality ``Q_k = (L_k^{t-1} -
   L_k^t) / L_k^t``, ``F_k = 1/(K-1) + beta Q_k / sum_j Q_j`` and ``W = softmax(F)``
   (:func:`ccr_weights`); without a previous value (the first round after the warm-up, or
   ``rhfl.ccr: false``) ``W_k = 1/(K-1)``.
2. **Collaborative learning, once per public batch, in lock-step**: for batch ``b`` of the shared
   noisy public pass (every party rebuilds it from its key, :func:`public_batch`), every client sends
   its softmax map ``p_k`` (B,2,H,W) (``soft_maps``); the server relays to each client ``k`` the
   others' maps and weights ``W_j`` (a :class:`~fed.core.method.PerClient` message); each client takes one
   step on ``sum_{j != k} W_j KL(p_j || p_k)``, KL summed over classes and pixels and divided by
   ``B*H*W`` (``KLDivLoss(batchmean)`` / (H*W), :func:`collaborative_kl`). Messages per batch, as the
   official loop, rather than all maps of a pass first: the maps a client learns from are those of the
   others' models as they are at that batch. A client holds no autograd graph between messages: it
   recomputes its forward in the step (train mode, the same keyed dropout, BatchNorm running statistics
   restored after the first forward, so they advance once per batch as in the official code).
   ``rhfl.collab_optimizer: fresh`` (default): a new Adam per step, as the official code, with
   ``rhfl.collab_lr`` or the client's current scheduled lr; ``party``: the client's own optimizer.
3. **Local learning**: :func:`fed.common.baseline_local.hetero_local` (BASELINES section 12) with RHFL's SCE
   (``rhfl.sce_alpha`` CE + ``rhfl.sce_beta`` RCE) on the confident pseudo-labels instead of CE (logged
   as ``unl_ce``), plus the harness supervised loss on D_p; ``train.local_epochs`` passes (RHFL's
   max(|public|/|private|, 1) epochs are not used: the harness's local step is shared).

During warm-up there is no exchange: the local step only, on D_p. With ``baselines.local_step: hssf``
the local step is HSSF's own, without SCE.

What crosses per round and client (``N`` public samples per pass, ``P`` passes, ``K`` clients): up one
number (8 bytes) + ``P*N*2*H*W*4`` bytes of maps; down ``(K-1) * P*N*2*H*W*4`` bytes of maps + ``4*(K-1)``
per batch for the weights. Each collaborative batch costs a client two forwards and one backward. A
client that sends no loss (no unlabeled data) gets CCR weight 0 in the others' KL.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from utils.rng import clamped_noise, seed_torch

from utils.config import Key, non_negative, positive
from fed.core.registry import register
from fed.core.method import Method, PerClient, step
from fed.core.replies import Fields, Maybe, Number, Tensor
from fed.common.labels import one_hot
from fed.common.baseline_local import confident_labels, hetero_local
from fed.core.party import PUBLIC

COLLAB = "collaboration"  # the phase key of the collaborative public passes


# --- RHFL's pieces, as pure functions ---------------------------------------------------------------

def sce_pixels(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.1, beta: float = 1.0) -> torch.Tensor:
    """Symmetric CE per pixel (B,H,W): ``alpha CE + beta RCE``, RCE = ``-sum_c clamp(p, 1e-7, 1)
    log clamp(onehot, 1e-4, 1)`` (= 9.21 (1 - p_y) up to the clamp), as RHFL's SCELoss."""
    ce = F.cross_entropy(logits, labels, reduction="none")
    p = F.softmax(logits, dim=1).clamp(min=1e-7, max=1.0)
    rce = -(p * one_hot(labels, logits.shape[1]).clamp(min=1e-4, max=1.0).log()).sum(dim=1)
    return alpha * ce + beta * rce


def masked_sce(logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, alpha: float = 0.1,
               beta: float = 1.0) -> torch.Tensor:
    """SCE summed over the ``keep`` pixels, divided by all pixels (the local step's denominator)."""
    sce = sce_pixels(logits, labels, alpha, beta)
    return (sce * keep.to(sce.dtype)).sum() / sce.numel()


def ccr_weights(prev: Optional[torch.Tensor], cur: torch.Tensor, beta: float, num_clients: int) -> torch.Tensor:
    """Client Confidence Re-weighting: ``Q = (prev - cur) / cur``, ``F = 1/(K-1) + beta Q / sum Q``,
    ``W = softmax(F)``; ``W = 1/(K-1)`` each without ``prev``. Not guarded in the official code: a
    non-finite ``Q_k`` (a zero or NaN loss) counts as 0, and ``sum Q = 0`` as no quality signal at all
    (``F = 1/(K-1)`` each, so ``W = 1/K``)."""
    base = 1.0 / (num_clients - 1)
    if prev is None:
        return torch.full_like(cur, base, dtype=torch.float64)
    q = (prev.double() - cur.double()) / cur.double()
    q = torch.where(torch.isfinite(q), q, torch.zeros_like(q))
    total = q.sum()
    share = q / total if total != 0 else torch.zeros_like(q)
    return torch.softmax(base + beta * share, dim=0)


def collaborative_kl(log_p: torch.Tensor, others: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_j w_j KL(p_j || p)`` with ``log_p`` (B,C,H,W) the learner's log-softmax, ``others``
    (J,B,C,H,W) the others' softmax maps: KL summed over classes and pixels, divided by ``B*H*W``."""
    b, _, h, w = log_p.shape
    kl = torch.stack([F.kl_div(log_p, p_j.to(log_p), reduction="sum") for p_j in others])
    return (weights.to(kl) * kl).sum() / (b * h * w)


# --- the lock-step public batches ------------------------------------------------------------------

def public_batch(party, rnd: int, phase: str, epoch: int, b: int):
    """Batch ``b`` of the shared noisy public pass ``(rnd, phase, epoch)``, built directly: the same
    ``(x, y (B,H,W) long)`` as the ``b``-th batch of ``party.public_batches`` (tested), and torch's
    generators seeded as before it, without loading the ``b`` batches before it."""
    loader = party.loaders["public"]
    loader.sampler.set_key(party.seed, rnd, PUBLIC, phase, epoch)
    n = loader.batch_size
    keys = list(itertools.islice(iter(loader.sampler), b * n, (b + 1) * n))
    x, y, _ = loader.collate_fn([loader.dataset[k] for k in keys])
    if party.noise_std > 0:
        x = x + clamped_noise(x.shape, party.noise_std, party.seed, rnd, PUBLIC, phase, epoch, b, "noise")
    seed_torch(party.seed, rnd, party.name, phase, epoch, b)
    return party.amp.to_device(x), party.amp.to_device(y)[:, 0].long()


@contextlib.contextmanager
def buffers_kept(model: torch.nn.Module):
    """Restore the model's buffers (BatchNorm running statistics) on exit."""
    saved = [(buf, buf.detach().clone()) for buf in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


# --- the method -------------------------------------------------------------------------------------

@register
class RHFL(Method):
    name = "rhfl"
    #: this method's settings, the ``rhfl.*`` section of the configuration (docs/configuration.md)
    options = {
        "sce_alpha": Key(0.1, float, "RHFL: weight of CE in the symmetric CE of the local step and CCR.",
                         check=non_negative),
        "sce_beta": Key(1.0, float, "RHFL: weight of reverse CE (`-sum p log clamp(onehot, 1e-4, 1)`).",
                        check=non_negative),
        "ccr": Key(True, bool, "RHFL: Client Confidence Re-weighting of the collaborative KL terms; off: "
                   "every weight 1/(K-1)."),
        "ccr_beta": Key(0.5, float, "RHFL: CCR `F_k = 1/(K-1) + beta Q_k / sum Q` (official 0.5).",
                        check=non_negative),
        "collab_epochs": Key(1, int, "RHFL: passes over D_p of collaborative learning per round.",
                             check=non_negative),
        "collab_optimizer": Key("fresh", str, "RHFL: each collaborative step uses a `fresh` Adam (as the "
                                "official code: a new one per step, so a sign-like first step) or the "
                                "client's own optimizer (`party`: AdamW with its state and schedule).",
                                choices=["fresh", "party"]),
        "collab_lr": Key(None, float, "RHFL: learning rate of the fresh Adam; null: the client's current "
                         "(scheduled) learning rate (the official code uses its one lr for both).",
                         nullable=True, check=positive),
    }
    sends = {"up": "per round: the client's mean SCE on its pseudo-labelled data (1 number); per public "
                   "batch: its softmax map (B,2,H,W) float32",
             "down": "per public batch: the other clients' softmax maps (K-1,B,2,H,W) float32 and their "
                     "CCR weights (K-1,) float32"}

    @classmethod
    def check_config(cls, cfg) -> List[str]:
        if len(cfg.data.clients) < 2:
            return ["method rhfl needs at least 2 clients (each learns from the others' soft maps)"]
        return []

    def run_round(self, r, rnd: int) -> None:
        warm = self.warm(rnd)
        if not warm:
            with r.phase(COLLAB):
                losses = r.clients(self.ccr_loss, rnd=rnd)
                weights = r.server(self.ccr, {k: v["loss"] for k, v in losses.items() if v is not None})
                batches = r.server(self.public_len)
                for e in range(self.cfg.rhfl.collab_epochs):
                    for b in range(batches):
                        maps = r.clients(self.soft_maps, rnd=rnd, epoch=e, batch=b)
                        relay = r.server(self.relay, {"maps": maps, "weights": weights})
                        r.clients(self.collaborate, relay, rnd=rnd, epoch=e, batch=b)
        with r.phase("local"):
            r.clients(self.local, rnd=rnd, warm=warm)

    def _sce(self):
        h = self.cfg.rhfl
        return functools.partial(masked_sce, alpha=h.sce_alpha, beta=h.sce_beta)

    # --- CCR --------------------------------------------------------------------------------------
    @step(reply=Maybe(Fields(loss=Number(lo=0, nan=True))))
    @torch.no_grad()
    def ccr_loss(self, client, msg, rnd: int) -> Optional[dict]:
        """Mean SCE per pseudo-labelled pixel over one pass of the client's unlabeled batches, forward
        only, eval mode (NaN where no pixel is confident)."""
        if not client.has("unlabeled"):
            return None
        client.model.eval()
        h, total, kept = self.cfg.rhfl, 0.0, 0
        for _, w, s in client.batches("unlabeled", rnd, "ccr", 0, noisy=1):
            labels, keep = confident_labels(client.forward(w)["mask"], self.cfg.baselines.tau)
            sce = sce_pixels(client.forward(s)["mask"].float(), labels, h.sce_alpha, h.sce_beta)
            total += float((sce * keep).sum())
            kept += int(keep.sum())
        loss = total / kept if kept else float("nan")
        if kept:
            client.log.add(ccr_loss=loss)
        return {"loss": loss}

    @step
    def ccr(self, server, losses: Dict[int, float]) -> Dict[int, float]:
        """The CCR weight of every client that sent its loss; the losses kept for the next round."""
        ks = sorted(losses)
        prev = server.extra.get("rhfl_loss") or {}
        server.extra["rhfl_loss"] = {k: float(losses[k]) for k in ks}
        cur = torch.tensor([losses[k] for k in ks], dtype=torch.float64)
        have = self.cfg.rhfl.ccr and ks and all(k in prev for k in ks)
        before = torch.tensor([prev[k] for k in ks], dtype=torch.float64) if have else None
        w = ccr_weights(before, cur, self.cfg.rhfl.ccr_beta, len(self.cfg.data.clients)) if ks else cur
        server.log.add(**{f"ccr_w{k}": float(v) for k, v in zip(ks, w)})
        return {k: float(v) for k, v in zip(ks, w)}

    # --- collaborative learning ---------------------------------------------------------------------
    @step
    def public_len(self, server, msg) -> int:
        return len(server.loaders["public"])

    @step(read_only=True, reply=Fields(p=Tensor("b<=P C S S", torch.float32, lo=0, hi=1)))  # BN statistics restored
    @torch.no_grad()
    def soft_maps(self, client, msg, rnd: int, epoch: int, batch: int) -> dict:
        x, _ = public_batch(client, rnd, COLLAB, epoch, batch)
        client.model.train()
        with buffers_kept(client.model):
            return {"p": F.softmax(client.forward(x)["mask"].float(), dim=1)}

    @step
    def relay(self, server, msg: dict) -> PerClient:
        """To each client that sent a map: the others' maps and CCR weights, in client order."""
        maps, weights = msg["maps"], msg["weights"]
        ks = sorted(maps)
        out = PerClient()
        for k in ks:
            js = [j for j in ks if j != k]
            if js:
                out[k] = {"maps": torch.stack([maps[j]["p"] for j in js]),
                          "weights": torch.tensor([weights.get(j, 0.0) for j in js], dtype=torch.float32)}
        return out

    @step
    def collaborate(self, client, msg: Optional[dict], rnd: int, epoch: int, batch: int) -> None:
        if msg is None:
            return
        x, _ = public_batch(client, rnd, COLLAB, epoch, batch)
        client.model.train()
        log_p = F.log_softmax(client.forward(x)["mask"].float(), dim=1)
        kl = collaborative_kl(log_p, msg["maps"].to(log_p.device), msg["weights"])
        h = self.cfg.rhfl
        if h.collab_optimizer == "party":
            client.step(kl)
        else:  # a fresh Adam per step, as the official code
            opt = torch.optim.Adam([p for p in client.model.parameters() if p.requires_grad],
                                   lr=h.collab_lr or client.lr)
            opt.zero_grad(set_to_none=True)
            client.scaler.scale(kl).backward()
            client.scaler.step(opt)
            client.scaler.update()
        client.log.add(col_kl=kl)

    # --- local learning -----------------------------------------------------------------------------
    @step
    def local(self, client, msg, rnd: int, warm: bool) -> None:
        hetero_local(client, rnd, self.cfg, warm, loss=self._sce())
