"""Flower's SuperNode, looking for work more often.

Flower 1.42's SuperNode (``flower-supernode``) asks its SuperLink for a message, and when there is none it
sleeps 3 s before asking again; once it has handed a message to its ClientApp it checks for the reply
every 0.5 s. Neither interval can be set. On a federation whose rounds are a dozen short messages in a
row, those waits are most of a deployment round (``bench/deploy_exchange.py --speed``: about 1.5 to 3 s
per message of idle wait, the server waiting for the slowest site).

This entry point is ``flower-supernode`` with every one of those waits capped at ``--poll-s`` seconds
(default 0.1). It takes ``flower-supernode``'s own arguments after its own::

    python -m fed.flower.supernode --poll-s 0.1 --superlink HOST:9092 --root-certificates ca.pem ...

The cost is one small request to the SuperLink every ``--poll-s`` seconds while the node is idle. Nothing
else changes: the same SuperNode code, TLS, authentication and messages. ``python -m fed.flower.deploy``
starts its SuperNodes this way (``--node-poll-s``; 3 gives Flower's own behaviour back).
"""
from __future__ import annotations

import sys
import time
from typing import List, Optional

DEFAULT_POLL_S = 0.1


class _CappedSleep:
    """The ``time`` module as the SuperNode's loop sees it, with ``sleep`` capped at ``cap`` seconds."""

    def __init__(self, cap: float):
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str):
        return getattr(time, name)


def patch(poll_s: float) -> None:
    """Cap the sleeps of Flower's SuperNode loop (``flwr.supernode.start_client_internal``) at ``poll_s``."""
    import flwr.supernode.start_client_internal as loop

    if not hasattr(loop, "time") or not hasattr(loop.time, "sleep"):
        raise RuntimeError("this Flower's SuperNode has no module-level 'time' to patch: use flower-supernode "
                           "(python -m fed.flower.deploy --node-poll-s 3)")
    loop.time = _CappedSleep(poll_s)


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    poll_s = DEFAULT_POLL_S
    if argv[:1] == ["--poll-s"]:
        if len(argv) < 2:
            sys.exit("--poll-s needs a number of seconds")
        try:
            poll_s = float(argv[1])
        except ValueError:
            sys.exit(f"--poll-s: {argv[1]!r} is not a number of seconds")
        if not poll_s > 0:
            sys.exit(f"--poll-s: {poll_s} must be > 0")
        argv = argv[2:]
    patch(poll_s)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


if __name__ == "__main__":
    main()
