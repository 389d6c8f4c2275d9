"""The local-epoch loop that every method's local training runs (one implementation)."""
from __future__ import annotations

from typing import Callable, Optional

from fed.common.hssf_local import supervised_pass


def local_epochs(party, rnd: int, epochs: int, hssf, labeled: Optional[str] = None,
                 unlabeled: Optional[Callable] = None, before: Optional[Callable] = None,
                 schedule: str = "epoch", phase: Optional[str] = None, **supervised_kw) -> None:
    """``epochs`` local epochs on ``party``. Each epoch ``e``: ``before(e)``; the supervised pass
    (:func:`~fed.common.hssf_local.supervised_pass`, with ``hssf`` = the ``hssf`` settings and
    ``supervised_kw``) over the ``labeled`` loader (``"labeled"``: the client's own labeled files,
    ``"public"``: D_p; ``None``: none) where the party has it, its batches keyed by ``phase`` (default
    ``local_<labeled>``); ``unlabeled(party, rnd, e)`` where the party has
    unlabeled data; then one scheduler step (``schedule="round"``: one step after the last epoch instead)."""
    if schedule not in ("epoch", "round"):
        raise ValueError(f"schedule must be 'epoch' or 'round', got {schedule!r}")
    for e in range(epochs):
        if before is not None:
            before(e)
        if labeled is not None and party.has(labeled):
            supervised_pass(party, labeled, rnd, phase or f"local_{labeled}", e, hssf, **supervised_kw)
        if unlabeled is not None and party.has("unlabeled"):
            unlabeled(party, rnd, e)
        if schedule == "epoch":
            party.scheduler.step()
    if schedule == "round":
        party.scheduler.step()
