"""Where a deployment's time goes: one JSON line per event, from every process, into one file.

Set ``HSSF_TIMELINE=/path/timeline.jsonl`` in the environment of a deployment (``bench/deploy_exchange.py
--speed`` does) and the ServerApp writes a line per reply it receives (``{"who": "server", "step",
"site", "round", "sent", "got"}``), each site's warm ClientApp process a line per task (when it took the
task, pulled the message, had the reply and pushed it) and each site's process a line per step (``start``,
``end``). Times are ``time.time()``: the processes of a loopback deployment share a clock.
:func:`summary` lines them up per message. Unset (the default), nothing is written.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Dict, List

ENV = "HSSF_TIMELINE"


def mark(**fields) -> None:
    """Append ``fields`` as one JSON line to the file named by ``$HSSF_TIMELINE`` (if set)."""
    path = os.environ.get(ENV)
    if path:
        with open(path, "a") as f:  # one short write per line: lines of several processes do not interleave
            f.write(json.dumps(fields) + "\n")


def read(path) -> List[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summary(events: List[dict]) -> Dict[str, Dict[str, float]]:
    """Per step, the mean over its messages (s): ``rtt`` (sent to last reply), ``work`` (the slowest site's
    step), ``pull`` (a site's wait for the message's objects) and ``rest`` (``rtt - work``: transport,
    polls, waits), with ``n`` the number of messages."""
    sent = defaultdict(list)
    for e in events:
        if e["who"] == "server":
            sent[(e["round"], e["step"], e["sent"])].append(e["got"])
    sites = [e for e in events if e["who"] == "site"]
    warm = [e for e in events if e["who"] == "warm"]
    out: Dict[str, Dict[str, float]] = {}
    for (rnd, step, t0), gots in sent.items():
        t1 = max(gots)
        work = max((e["end"] - e["start"] for e in sites if e["step"] == step and t0 <= e["start"] <= t1), default=0.0)
        pull = max((e.get("pulled", e["took"]) - e["took"] for e in warm if t0 <= e["took"] <= t1), default=0.0)
        row = out.setdefault(step, {"n": 0, "rtt": 0.0, "work": 0.0, "pull": 0.0, "rest": 0.0})
        row["n"] += 1
        for k, v in (("rtt", t1 - t0), ("work", work), ("pull", pull), ("rest", t1 - t0 - work)):
            row[k] += v
    for row in out.values():
        for k in ("rtt", "work", "pull", "rest"):
            row[k] = round(row[k] / row["n"], 3)
    return out
