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
Flower's way). A message's objects that are not there yet when it asks for them it asks for again after
``--pull-wait-s`` (default 0.02; Flower's: 1 s, :func:`quick_pulls`). It takes ``flower-supernode``'s own arguments after its own (in this order)::

    python -m fed.flower.supernode [--poll-s 0.1] [--heartbeat-s 10] [--pull-wait-s 0.02] [--cold] --superlink HOST:9092 --root-certificates ca.pem ...

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
#: the first wait (s) before asking again for an object of a message that is not there yet (Flower's: 1 s),
#: in every process of a deployment that pulls messages (:func:`quick_pulls`); the waits double up to 25
#: times the first, at most 10 s (Flower's: 10 s)
PULL_WAIT_S = 0.02


class _WarmExec:
    """The ``subprocess`` module as the SuperNode sees it, whose ``Popen`` starts :mod:`fed.flower.warm` (one
    process serving every ClientApp task) where the SuperNode starts ``flower-superexec``."""

    def __init__(self, pull_wait_s: float = PULL_WAIT_S):
        self.pull_wait_s = pull_wait_s

    def Popen(self, command, *args, **kw):  # noqa: N802 - subprocess's name
        if list(command[:1]) == ["flower-superexec"]:
            command = [sys.executable, "-m", "fed.flower.warm", "--pull-wait-s", f"{self.pull_wait_s:g}", *command[1:]]
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


def patch(poll_s: float, heartbeat_s: float = DEFAULT_HEARTBEAT_S, warm: bool = True,
          pull_wait_s: float = PULL_WAIT_S) -> None:
    """Cap the sleeps of Flower's SuperNode loop (``flwr.supernode.start_client_internal``) at ``poll_s``,
    make the SuperNode declare (and keep) a heartbeat interval of ``heartbeat_s``, ask again for a missing
    object after ``pull_wait_s`` (:func:`quick_pulls`) and, with ``warm``, serve its ClientApp tasks in one
    process (:mod:`fed.flower.warm`, with the same ``pull_wait_s``) instead of a new one per message."""
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
    quick_pulls(pull_wait_s)
    loop.time = _CappedSleep(poll_s)
    if warm:
        loop.subprocess = _WarmExec(pull_wait_s)
    fleet.HEARTBEAT_DEFAULT_INTERVAL = beat.HEARTBEAT_DEFAULT_INTERVAL = heartbeat_s


def quick_pulls(first_s: float = PULL_WAIT_S) -> None:
    """Ask again for a message's objects that are not there yet after ``first_s`` seconds, doubling up to
    25 x ``first_s`` (at most 10 s), instead of Flower's 1 s doubling up to 10 s (``first_s=1``: Flower's).

    A message's objects (its arrays) arrive after the message itself: the receiver that asks for them a
    moment too early (the SuperNode pulling from the SuperLink, the ClientApp from its SuperNode, the
    ServerApp a reply from the SuperLink) waits a whole second before it asks again. On a deployment whose
    rounds are a dozen short messages that second was most of a message's cost (``utils/timeline.py``:
    about 1 s in half the pulls of a demo round). The defaults of Flower's two pulling functions are
    changed in this process; every caller of them uses the defaults."""
    from flwr.supercore.inflatable import inflatable_utils as objects

    for fn in (objects.pull_objects, objects.pull_and_inflate_object_from_tree):
        defaults = fn.__kwdefaults__ or {}
        if "initial_backoff" not in defaults or "backoff_cap" not in defaults:
            raise RuntimeError(f"this Flower's {fn.__module__}.{fn.__name__} has no initial_backoff/backoff_cap to set")
        fn.__kwdefaults__ = {**defaults, "initial_backoff": first_s, "backoff_cap": min(10.0, 25 * first_s)}


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
    pull_wait_s = _seconds(argv, "--pull-wait-s", PULL_WAIT_S)
    warm = argv[:1] != ["--cold"]
    if not warm:
        del argv[:1]
    try:
        patch(poll_s, heartbeat_s, warm, pull_wait_s)
    except ValueError as e:
        sys.exit(str(e))
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


if __name__ == "__main__":
    main()
