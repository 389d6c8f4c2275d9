"""Local: no collaboration (the official ``local`` baseline).

Every client trains alone with the local step of :mod:`fed.common.hssf_local`, using the public labeled set
as labeled data and its unlabeled data from round 0 (no warm-up). As in the official code, a client's
own labeled files (``labeled_ratio > 0``) are not used by this baseline (nor by ``lssl``). Nothing is
exchanged; the server model is not trained.
"""
from __future__ import annotations

from fed.core.registry import register
from fed.core.method import Method, step
import functools

from fed.common.epochs import local_epochs
from fed.common.hssf_local import unlabeled_pass


@register
class Local(Method):
    name = "local"
    uses_warmup = False

    def run_round(self, r, rnd: int) -> None:
        with r.phase("local"):
            r.clients(self.local, rnd=rnd)

    @step
    def local(self, client, msg, rnd: int) -> None:
        h = self.cfg.hssf
        local_epochs(client, rnd, self.cfg.train.local_epochs, h, labeled="public",
                     unlabeled=functools.partial(unlabeled_pass, h=h))
