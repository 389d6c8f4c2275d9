"""KT-pFL (Zhang et al., NeurIPS 2021, arXiv 2111.02862; ``../shared/BASELINES.md`` section 7):
personalised knowledge transfer through a knowledge-coefficient matrix, as the official code
(``cugzj/KT-pFL src/engine_kt_pfl.py``) does it.

Only soft predictions cross, never weights. The server keeps the KxK knowledge-coefficient matrix ``c``
(``server.extra["ktpfl_c"]``, initialised to 1/K, self-weights included). One round after the warm-up:

1. every client predicts the round's public pass (eval mode) and sends ``s_k = softmax(logits / T)``
   per pixel (N,2,H,W), ``T = ktpfl.temperature`` (10);
2. the server updates each row ``n`` of ``c`` (:func:`update_coefficients`): one gradient step on
   ``MSE(s_n, sum_m c_nm s_m) + rho * MSE(c_n, 1/K)`` (``rho = ktpfl.rho``, 0.7; the MSE over every pixel
   and class), with the code's adaptive step size (:func:`step_size`: the mean |gradient| is brought
   near 0.01 by factors of 5, five times), then ``c_n <- softmax(5 c_n)``;
3. it sends client ``n`` its personalised target ``t_n = sum_m c_nm s_m`` with the softmaxed row
   (:func:`personalised_targets`; a :class:`fed.core.method.PerClient` message);
4. client ``n`` distils on the same pass: ``KL(t_n || softmax(f_n(x) / T))`` with ``F.kl_div``'s
   reduction ``'mean'`` (over every element) and no T^2 factor, as the code (:func:`distill_loss`), for
   ``ktpfl.distill_epochs`` passes (1);
5. the shared local step (:mod:`fed.common.baseline_local`; clients have no labels). The code ramps the local
   epochs up by one per round to 10 (``ktpfl.local_ramp: 10``); off by default (``0``: the harness's
   ``train.local_epochs`` every round, as every other baseline), since the ramp multiplies the local
   cost up to tenfold and makes the clients' cosine schedule (one step per local epoch) run through its
   period early.

**Paper vs code.** The paper writes the local objective as CE + lambda * KL(t_n || s_n) in one loss and
the update of ``c`` as the gradient of the distillation loss plus ``rho * ||c - 1/K||^2``; the code
(implemented here) distils and trains in two separate stages and updates ``c`` with the MSE between
each client's soft map and its target, then a low-temperature softmax. The code mixes the pre- and
post-softmax ``c`` between the gradient step and the targets; the softmaxed row is used here
(BASELINES.md).

During warm-up rounds nothing is exchanged and the local step runs on D_p only. Clients that sit a
round out keep their rows and columns of ``c`` as they were. ``ktpfl.soft_dtype: float16`` halves both
messages (lossy; the server computes in fp32/fp64). The server's model is not used.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F


from utils.config import Key, non_negative, positive
from fed.core.registry import register
from fed.core.method import Method, PerClient, step
from fed.core.replies import Fields, Tensor
from fed.common.baseline_local import hetero_local
from fed.common.public import predict_pass, train_pass

PHASE = "collaboration"
SHARPNESS = 5.0  # c_n <- softmax(5 c_n): the code's low-temperature renormalisation
TARGET_GRAD = 0.01  # the adaptive step size brings the mean |gradient| near this, by factors of 5
CHUNK = 1 << 22


# --- the server's update of c, as pure functions ------------------------------------------------

def gram(maps: List[torch.Tensor]) -> torch.Tensor:
    """``G[i, j] = sum(s_i * s_j)`` over every element, in float64 (chunked: no large copies)."""
    flat = [m.reshape(-1) for m in maps]
    K, G = len(flat), torch.zeros(len(flat), len(flat), dtype=torch.float64)
    for i in range(K):
        for j in range(i, K):
            G[i, j] = G[j, i] = sum(torch.dot(flat[i][a:a + CHUNK].double(), flat[j][a:a + CHUNK].double())
                                    for a in range(0, flat[i].numel(), CHUNK))
    return G


def row_loss(G: torch.Tensor, n: int, c: torch.Tensor, elements: int, rho: float) -> torch.Tensor:
    """``MSE(s_n, sum_m c_m s_m) + rho * MSE(c, 1/K)`` from the Gram matrix:
    ``(G_nn - 2 c.G_n + c'Gc) / E + rho * mean((c - 1/K)^2)``."""
    K = len(c)
    mse = (G[n, n] - 2 * c @ G[n] + c @ G @ c) / elements
    return mse + rho * ((c - 1.0 / K) ** 2).mean()


def row_gradient(G: torch.Tensor, n: int, c: torch.Tensor, elements: int, rho: float) -> torch.Tensor:
    """The gradient of :func:`row_loss` in ``c``: ``2 (G c - G_n) / E + 2 rho (c - 1/K) / K``."""
    K = len(c)
    return 2 * (G @ c - G[n]) / elements + 2 * rho * (c - 1.0 / K) / K


def step_size(mean_abs_grad: float) -> float:
    """The code's adaptive step: starting at 1, five times: if the (scaled) mean |gradient| is above
    0.01 divide it and the step by 5; then if it is below 0.01 multiply both by 5."""
    g, lr = mean_abs_grad, 1.0
    for _ in range(5):
        if g > TARGET_GRAD:
            g, lr = g / 5, lr / 5
        if g < TARGET_GRAD:
            g, lr = g * 5, lr * 5
    return lr


def update_coefficients(c: torch.Tensor, G: torch.Tensor, elements: int, rho: float) -> torch.Tensor:
    """One update of every row of ``c`` (KxK): a gradient step with :func:`step_size`, then
    ``softmax(5 c_n)``. Rows are independent (each row's loss involves only that row)."""
    c = c.double()
    out = torch.empty_like(c)
    for n in range(len(c)):
        grad = row_gradient(G, n, c[n], elements, rho)
        stepped = c[n] - step_size(grad.abs().mean().item()) * grad
        out[n] = F.softmax(SHARPNESS * stepped, dim=0)
    return out


def personalised_targets(c: torch.Tensor, maps: List[torch.Tensor]) -> List[torch.Tensor]:
    """``t_n = sum_m c_nm s_m`` (fp32, summed in client order)."""
    targets = []
    for n in range(len(maps)):
        t = torch.zeros_like(maps[0], dtype=torch.float32)
        for m, s in enumerate(maps):
            t += float(c[n, m]) * s.float()
        targets.append(t)
    return targets


def distill_loss(logits: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """``F.kl_div(log_softmax(logits / T), target, reduction='mean')``: the mean over every pixel and
    class of ``t (log t - log p)``, no T^2 factor (the code's ``KL_loss``; written as the mean of
    ``reduction='none'``, the same value without torch's warning about ``'mean'``)."""
    return F.kl_div(F.log_softmax(logits / temperature, dim=1), target, reduction="none").mean()


def ramp_epochs(rnd: int, warmup: int, cap: int, default: int) -> int:
    """Local epochs of round ``rnd``: ``default`` without the ramp (``cap`` 0) or in warm-up; else
    ``min(j + 1, cap)`` in the ``j``-th round after the warm-up."""
    if cap <= 0 or rnd < warmup:
        return default
    return min(rnd - warmup + 1, cap)


# --- the method -------------------------------------------------------------------------------------

@register
class KTpFL(Method):
    name = "ktpfl"
    #: this method's settings, the ``ktpfl.*`` section of the configuration (docs/configuration.md)
    options = {
        "temperature": Key(10.0, float, "KT-pFL: temperature T of the soft predictions softmax(logits/T) and "
                           "of the distillation (code `Temp`).", check=positive),
        "rho": Key(0.7, float, "KT-pFL: weight of the penalty MSE(c_n, 1/K) in the update of the "
                   "knowledge-coefficient matrix (code `penalty_ratio`).", check=non_negative),
        "distill_epochs": Key(1, int, "KT-pFL: distillation passes over the round's public pass (code "
                              "`N_logits_matching_round`).", check=non_negative),
        "local_ramp": Key(0, int, "KT-pFL: 0 = `train.local_epochs` local epochs every round (the shared "
                          "harness); N > 0 = the code's ramp: min(j + 1, N) local epochs in the j-th round "
                          "after the warm-up (code: N = 10; up to N times the local cost).", check=non_negative),
        "soft_dtype": Key("float32", str, "KT-pFL exchange reduction (lossy): `float16` sends the soft "
                          "predictions and the personalised targets in half precision.",
                          choices=["float32", "float16"]),
    }
    sends = {"up": "soft predictions softmax(logits/T) (N,2,H,W) on the round's public pass",
             "down": "the client's personalised target sum_m c_nm s_m (N,2,H,W)"}

    def setup(self, party) -> None:
        if party.name == "server":
            K = len(self.cfg.data.clients)
            party.extra["ktpfl_c"] = torch.full((K, K), 1.0 / K, dtype=torch.float64)

    def run_round(self, r, rnd: int) -> None:
        warm = self.warm(rnd)
        if not warm:
            with r.phase("collaboration"):
                replies = r.clients(self.predict_public, rnd=rnd)
                targets = r.server(self.transfer, {str(k): v["soft"] for k, v in replies.items()})
                r.clients(self.distill, targets, rnd=rnd)
        with r.phase("local"):
            r.clients(self.local, rnd=rnd, warm=warm)

    # --- steps ------------------------------------------------------------------------------------
    @step(read_only=True, reply=lambda m: Fields(soft=Tensor("n<=P C S S", getattr(torch, m.cfg.ktpfl.soft_dtype),
                                                             lo=0, hi=1)))
    def predict_public(self, client, msg, rnd: int) -> dict:
        k = self.cfg.ktpfl
        dtype = getattr(torch, k.soft_dtype)
        return {"soft": predict_pass(client, rnd, PHASE, 0, lambda z: F.softmax(z / k.temperature, dim=1).to(dtype))}

    @step
    def transfer(self, server, soft: Dict[str, torch.Tensor]) -> PerClient:
        """Update ``c`` on the clients that replied (``{index: s_k}``); their personalised targets."""
        if not soft:
            return PerClient()
        ks = sorted(int(k) for k in soft)
        maps = [soft[str(k)] for k in ks]
        c, idx = server.extra["ktpfl_c"].clone(), torch.tensor(ks)
        sub = update_coefficients(c[idx][:, idx], gram(maps), maps[0].numel(), self.cfg.ktpfl.rho)
        c[idx.unsqueeze(1), idx] = sub
        server.extra["ktpfl_c"] = c
        dtype = getattr(torch, self.cfg.ktpfl.soft_dtype)
        targets = personalised_targets(sub, maps)
        for i, k in enumerate(ks):
            server.log.add(**{f"c_self{k}": sub[i, i]})
        return PerClient({k: {"target": t.to(dtype)} for k, t in zip(ks, targets)})

    @step
    def distill(self, client, msg: Optional[dict], rnd: int) -> None:
        if msg is None:
            return
        T = self.cfg.ktpfl.temperature
        for _ in range(self.cfg.ktpfl.distill_epochs):
            train_pass(client, rnd, PHASE, 0, msg["target"], lambda z, t: distill_loss(z, t, T), tag="distill_kl")

    @step
    def local(self, client, msg, rnd: int, warm: bool) -> None:
        t = self.cfg.train
        epochs = ramp_epochs(rnd, t.warmup_rounds, self.cfg.ktpfl.local_ramp, t.local_epochs)
        hetero_local(client, rnd, self.cfg, warm, epochs=epochs)
