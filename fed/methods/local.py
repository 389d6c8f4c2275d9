"""Local: no collaboration (the official ``local`` baseline).

Every client trains alone with the local step of :mod:`fed.common.hssf_local`, using the public labeled set
as labeled data and its unlabeled data from round 0 (no warm-up). As in the official code, a client's
own labeled files (``labeled_ratio > 0``) are not used by this baseline (nor by ``lssl``). Nothing is
exchanged; the server model is not trained.
"""
from __future__ import annotations

from fed.core.registry import register
from fed.core.method import Method, step
from fed.common.hssf_local import local_epochs


@register
class Local(Method):
    name = "local"
    uses_warmup = False

    def run_round(self, r, rnd: int) -> None:
        with r.phase("local"):
            r.clients(self.local, rnd=rnd)

    @step
    def local(self, client, msg, rnd: int) -> None:
        local_epochs(client, rnd, self.cfg, labeled="public", unlabeled=True)
