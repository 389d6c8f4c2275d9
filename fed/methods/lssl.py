"""LSSL: the official homogeneous baseline (FedAvg + local semi-supervised learning).

Each round: every client runs the local step of :mod:`fed.common.hssf_local` from the global model it holds,
with the *public* labeled set as its labeled data (plus its own unlabeled data after the warm-up); then
every client sends its weights (``send_weights``), the server takes the uniform average of every
state-dict entry (BatchNorm buffers included) as the new global model (``aggregate``) and sends it back,
and every client loads it (``receive``). So the model evaluated after round ``r`` (each client's copy
of the global model) and checkpointed (the clients' models and the server's are that average) is the
average of the clients' weights *after* round ``r``'s local training: each round scores what it
trained, the last round's included. (The official code averages at the start of a round and scores
that average, before the round's local training.) Round 0 begins with one extra exchange of the same
kind on the initial weights, so that every client starts from one model (the clients' models are
initialised from keys of their own). A client that sat a round out (``train.fault_tolerance:
skip_client``) goes back to its state at the round's start and misses the round's average: it trains
the next round from the global model it received before (round 0: from its own initial weights) and
is in step again from that round's average on.
All clients and the server must share one architecture.

The homogeneous semi-supervised baselines (``mean_teacher``, ``fixmatch``, ``unimatch``) are this
protocol with another unlabeled pass: they subclass :class:`LSSL` and override :meth:`LSSL.unlabeled_pass`
(the supervised pass on D_p, the warm-up, the schedule and FedAvg stay as here).
"""
from __future__ import annotations

import copy
from typing import Dict, List

import torch

from fed.core.registry import register
from fed.core.method import Method, step
from fed.core.replies import State
from fed.common.epochs import local_epochs
from fed.common.weights import clone_state, fedavg
from fed.common.hssf_local import unlabeled_pass


@register
class LSSL(Method):
    name = "lssl"
    shared_model = True
    sends = {"up": "model weights (every state-dict entry) after the local training (round 0: the initial "
                   "weights too, first)",
             "down": "the averaged global weights"}

    @classmethod
    def check_config(cls, cfg):
        archs = set(cfg.models.clients) | {cfg.models.server}
        if len(archs) > 1:
            return [f"method {cls.name} averages weights, so models.server and every models.clients entry "
                    f"must be one architecture (got {', '.join(sorted(archs))})"]
        return []

    def run_round(self, r, rnd: int) -> None:
        if rnd == 0:  # one starting model for every client: the average of the initial weights
            with r.phase("aggregation"):
                self.exchange(r, rnd, start=True)
        with r.phase("local"):
            r.clients(self.local, rnd=rnd, warm=self.warm(rnd))
        with r.phase("aggregation"):
            self.exchange(r, rnd)

    def exchange(self, r, rnd: int, start: bool = False) -> None:
        """Weights up, their average down: the clients' models (``start``: the initial ones, before round
        0's local training) become the global model that every client loads."""
        replies: Dict[int, dict] = r.clients(self.send_weights, rnd=rnd, start=start)
        avg = r.server(self.aggregate, list(replies.values()))  # client order: exact
        r.clients(self.receive, avg, rnd=rnd)

    @step(read_only=True, reply=State())
    def send_weights(self, client, msg, rnd: int, start: bool = False) -> dict:
        return clone_state(client.model.state_dict())

    @step
    def aggregate(self, server, weights: List[dict]) -> dict:
        avg = fedavg(weights)
        server.model.load_state_dict(avg)
        return avg

    def setup(self, party) -> None:
        if party.name != "server":
            party.extra["global"] = copy.deepcopy(party.model)  # the global model this client received

    @step
    def receive(self, client, avg: dict, rnd: int) -> None:
        """Load the global model: the client's model (its next round starts from it) and its copy."""
        client.model.load_state_dict(avg)
        client.extra["global"].load_state_dict(avg)

    @step
    def local(self, client, msg, rnd: int, warm: bool) -> None:
        """Per local epoch the supervised pass on D_p, then (after the warm-up) :meth:`unlabeled_pass`."""
        local_epochs(client, rnd, self.cfg.train.local_epochs, self.cfg.hssf, labeled="public",
                     unlabeled=None if warm else self.unlabeled_pass)

    def unlabeled_pass(self, client, rnd: int, epoch: int) -> None:
        """One pass over the client's unlabeled data (LSSL: the HSSF local step of :mod:`fed.common.hssf_local`)."""
        unlabeled_pass(client, rnd, epoch, self.cfg.hssf)

    def eval_model(self, party):
        return party.extra.get("global", party.model)
