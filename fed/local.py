"""Local: no collaboration (the official ``local`` baseline).

Every client trains alone with the local step of :mod:`fed.local_ssl`, using the public labeled set
as labeled data and its unlabeled data from round 0 (no warm-up). As in the official code, a client's
own labeled files (``labeled_ratio > 0``) are not used by this baseline (nor by ``lssl``). The server
model is not trained.
"""
from __future__ import annotations

from .base import Method
from .local_ssl import supervised_pass, unlabeled_pass


class Local(Method):
    name = "local"
    uses_warmup = False

    def round(self, rnd: int) -> None:
        fed = self.fed
        for _ in range(self.cfg.train.local_epochs):
            for c in fed.clients:
                fed.run_client(c, lambda c=c: self.local(c))
            for c in fed.clients:
                c.scheduler.step()

    def local(self, client) -> None:
        supervised_pass(client, self.fed.server.public, self.fed)
        if client.unlabeled is not None:
            unlabeled_pass(client, client.unlabeled, self.fed)
