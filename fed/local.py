"""Local: no collaboration (the official ``local`` baseline).

Every client trains alone with the local step of :mod:`fed.local_ssl`, using the public labeled set
as labeled data and its unlabeled data from round 0 (no warm-up). As in the official code, a client's
own labeled files (``labeled_ratio > 0``) are not used by this baseline (nor by ``lssl``). Nothing is
exchanged; the server model is not trained.
"""
from __future__ import annotations

from .base import Method, step
from .local_ssl import local_epochs


class Local(Method):
    name = "local"
    uses_warmup = False

    def run_round(self, r, rnd: int) -> None:
        with r.phase("local"):
            r.clients(self.local, rnd=rnd)

    @step
    def local(self, client, msg, rnd: int) -> None:
        local_epochs(client, rnd, self.cfg, labeled="public", unlabeled=True)
