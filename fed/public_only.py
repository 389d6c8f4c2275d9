"""Public-only: the floor a collaboration must beat (no unlabeled data, no exchange).

Every client trains alone on the labeled public set D_p only, with the supervised part of the local step
(:func:`fed.local_ssl.supervised_pass`: ``seg + confide_theta * SA``), ``train.local_epochs`` passes per
round; its own unlabeled data is never used and nothing is exchanged. It is ``local`` without the
unlabeled pass: the labeled budget of a baseline (one pass over D_p per client per round) with no
self-training. Set ``train.local_epochs`` to give it another labeled budget (e.g. HSSF's fusion passes).
"""
from __future__ import annotations

from .base import step
from .local import Local
from .local_ssl import local_epochs


class PublicOnly(Local):
    """:class:`fed.local.Local` (same round, no warm-up, nothing exchanged) without the unlabeled pass."""

    name = "public_only"

    @step
    def local(self, client, msg, rnd: int) -> None:
        local_epochs(client, rnd, self.cfg, labeled="public", unlabeled=False)
