"""Flower's SuperNode, looking for work more often.

Flower 1.42's SuperNode (``flower-supernode``) asks its SuperLink for a message, and when there is none it
sleeps 3 s before asking again; once it has handed a message to its ClientApp it checks for the reply
every 0.5 s. Neither interval can be set. On a federation whose rounds are a dozen short messages in a
row, those waits are most of a deployment round (``bench/deploy_exchange.py --speed``: about 1.5 to 3 s
per message of idle wait, the server waiting for the slowest site).

This entry point is ``flower-supernode`` with every one of those waits capped at ``--poll-s`` seconds
(default 0.1), and with heartbeats every few seconds that say "count me gone after 2 x ``--heartbeat-s``
seconds of silence" (default 10, Flower's least; Flower's own: 30). A site whose machine failed is
then free to join again with the same key after 20 s instead of a minute: until the SuperLink has
counted the old connection gone, it refuses the new one. And it serves its ClientApp tasks in one warm
process (:mod:`fed.flower.warm`) instead of a fresh ``flwr-clientapp`` process per message (``--cold``:
Flower's way). It takes ``flower-supernode``'s own arguments after its own (in this order)::

    python -m fed.flower.supernode [--poll-s 0.1] [--heartbeat-s 10] [--cold] --superlink HOST:9092 --root-certificates ca.pem ...

The cost is one small request to the SuperLink every ``--poll-s`` seconds while the node is idle, a
heartbeat every 4 s instead of every 20 s, and the site's ClientApps sharing one process. The SuperNode's
code, TLS, authentication and the messages are Flower's. ``python -m fed.flower.deploy`` starts its
SuperNodes this way (``--node-poll-s``, ``--heartbeat-s``, ``--cold``; ``--node-poll-s 3 --heartbeat-s 30
--cold`` is Flower's own behaviour).
"""
from __future__ import annotations

import subprocess
import sys
import time
from typing import List, Optional

DEFAULT_POLL_S = 0.1
DEFAULT_HEARTBEAT_S = 10.0


class _WarmExec:
    """The ``subprocess`` module as the SuperNode sees it, whose ``Popen`` starts :mod:`fed.flower.warm` (one
    process serving every ClientApp task) where the SuperNode starts ``flower-superexec``."""

    def Popen(self, command, *args, **kw):  # noqa: N802 - subprocess's name
        if list(command[:1]) == ["flower-superexec"]:
            command = [sys.executable, "-m", "fed.flower.warm", *command[1:]]
        return subprocess.Popen(command, *args, **kw)

    def __getattr__(self, name: str):
        return getattr(subprocess, name)


class _CappedSleep:
    """The ``time`` module as the SuperNode's loop sees it, with ``sleep`` capped at ``cap`` seconds."""

    def __init__(self, cap: float):
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str):
        return getattr(time, name)


def patch(poll_s: float, heartbeat_s: float = DEFAULT_HEARTBEAT_S, warm: bool = True) -> None:
    """Cap the sleeps of Flower's SuperNode loop (``flwr.supernode.start_client_internal``) at ``poll_s``,
    make the SuperNode declare (and keep) a heartbeat interval of ``heartbeat_s`` and, with ``warm``, serve
    its ClientApp tasks in one process (:mod:`fed.flower.warm`) instead of a new one per message."""
    import flwr.supercore.heartbeat as beat
    import flwr.supernode.fleet_http_connection as fleet
    import flwr.supernode.start_client_internal as loop
    from flwr.common.constant import HEARTBEAT_MIN_INTERVAL

    missing = [f"{m.__name__}.{n}" for m, n in ((loop, "time"), (loop, "subprocess"), (fleet, "HEARTBEAT_DEFAULT_INTERVAL"),
                                                 (beat, "HEARTBEAT_DEFAULT_INTERVAL")) if not hasattr(m, n)]
    if missing:
        raise RuntimeError(f"this Flower's SuperNode has no {', '.join(missing)} to set: use flower-supernode "
                           f"(python -m fed.flower.deploy --node-poll-s 3 --heartbeat-s 30 measures the cost)")
    if heartbeat_s < HEARTBEAT_MIN_INTERVAL:
        raise ValueError(f"--heartbeat-s {heartbeat_s:g}: the SuperLink refuses less than {HEARTBEAT_MIN_INTERVAL}")
    loop.time = _CappedSleep(poll_s)
    if warm:
        loop.subprocess = _WarmExec()
    fleet.HEARTBEAT_DEFAULT_INTERVAL = beat.HEARTBEAT_DEFAULT_INTERVAL = heartbeat_s


def _seconds(argv: List[str], flag: str, default: float) -> float:
    """Take ``flag N`` from the front of ``argv`` (in place); ``default`` if it is not there."""
    if argv[:1] != [flag]:
        return default
    if len(argv) < 2:
        sys.exit(f"{flag} needs a number of seconds")
    try:
        value = float(argv[1])
    except ValueError:
        sys.exit(f"{flag}: {argv[1]!r} is not a number of seconds")
    if not value > 0:
        sys.exit(f"{flag}: {value:g} must be > 0")
    del argv[:2]
    return value


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    poll_s = _seconds(argv, "--poll-s", DEFAULT_POLL_S)
    heartbeat_s = _seconds(argv, "--heartbeat-s", DEFAULT_HEARTBEAT_S)
    warm = argv[:1] != ["--cold"]
    if not warm:
        del argv[:1]
    try:
        patch(poll_s, heartbeat_s, warm)
    except ValueError as e:
        sys.exit(str(e))
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


if __name__ == "__main__":
    main()
