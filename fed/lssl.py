"""LSSL: the official homogeneous baseline (FedAvg + local semi-supervised learning).

Each round: uniform FedAvg of every state-dict entry of the client models (BatchNorm buffers
included) into the global model, which is then loaded into every client; then every client runs the
local step of :mod:`fed.local_ssl` with the *public* labeled set as its labeled data (plus its own
unlabeled data after the warm-up). The global model is the one evaluated and checkpointed.
All clients and the server must share one architecture.
"""
from __future__ import annotations

from typing import List

import torch

from .base import Method
from .local_ssl import supervised_pass, unlabeled_pass


@torch.no_grad()
def fedavg(state_dicts: List[dict], weights=None) -> dict:
    """Weighted average of every entry (integer buffers are averaged and rounded back)."""
    n = len(state_dicts)
    weights = weights or [1.0 / n] * n
    out = {}
    for k, v0 in state_dicts[0].items():
        acc = sum(w * sd[k].double() for w, sd in zip(weights, state_dicts))
        out[k] = acc.round().to(v0.dtype) if not v0.is_floating_point() else acc.to(v0.dtype)
    return out


class LSSL(Method):
    name = "lssl"
    shared_model = True

    @classmethod
    def check_config(cls, cfg):
        archs = set(cfg.models.clients) | {cfg.models.server}
        if len(archs) > 1:
            return [f"method lssl averages weights, so models.server and every models.clients entry "
                    f"must be one architecture (got {', '.join(sorted(archs))})"]
        return []

    def round(self, rnd: int) -> None:
        fed = self.fed
        clients = fed.active_clients()
        avg = fedavg([c.model.state_dict() for c in clients])
        fed.server.model.load_state_dict(avg)
        for c in fed.clients:
            c.model.load_state_dict(avg)
        warm = rnd < self.cfg.train.warmup_rounds
        for _ in range(self.cfg.train.local_epochs):
            for c in fed.clients:
                fed.run_client(c, lambda c=c: self.local(c, warm))
            for c in fed.clients:
                c.scheduler.step()

    def local(self, client, warm: bool) -> None:
        supervised_pass(client, self.fed.server.public, self.fed)
        if not warm and client.unlabeled is not None:
            unlabeled_pass(client, client.unlabeled, self.fed)

    def eval_model(self, k: int):
        return self.fed.server.model
