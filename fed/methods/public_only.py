"""Public-only: the floor a collaboration must beat (no unlabeled data, no exchange).

Every client trains alone on the labeled public set D_p only, with the supervised part of the local step
(:func:`fed.common.hssf_local.supervised_pass`: ``seg + confide_theta * SA``), ``train.local_epochs`` passes per
round; its own unlabeled data is never used and nothing is exchanged. It is ``local`` without the
unlabeled pass: the labeled budget of a baseline (one pass over D_p per client per round) with no
self-training. Set ``train.local_epochs`` to give it another labeled budget (e.g. HSSF's fusion passes).
"""
from __future__ import annotations

from fed.core.registry import register
from fed.core.method import step
from fed.methods.local import Local
from fed.common.epochs import local_epochs


@register
class PublicOnly(Local):
    """:class:`fed.methods.local.Local` (same round, no warm-up, nothing exchanged) without the unlabeled pass."""

    name = "public_only"

    @step
    def local(self, client, msg, rnd: int) -> None:
        local_epochs(client, rnd, self.cfg.train.local_epochs, self.cfg.hssf, labeled="public")
