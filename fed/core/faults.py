"""Faults on purpose: make a client send a bad reply, to see that the server refuses it (tests, and a
check of a deployment before real sites join it).

Set ``HSSF_FAULTS`` in the environment of the processes that serve the clients (this process, worker
processes, Flower's nodes and SuperNodes inherit it) to a JSON list of faults::

    HSSF_FAULTS='[{"client": "client1", "step": "predict_public", "rounds": [1], "kind": "nan"}]'

``client``: the client's name; ``step``: a step or party call; ``rounds``: the rounds (the call's ``rnd``
argument; omitted: every round); ``kind``: what goes wrong with the reply (:data:`KINDS`). Without the
variable nothing here runs. The reply is changed after the step ran, so the client's own state is what
it would have been.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

ENV = "HSSF_FAULTS"


def _first_tensor(reply, prefer: str = ""):
    """``(key, tensor)`` of the first non-empty tensor of a dict reply (``prefer`` first, where it has it)."""
    if isinstance(reply, dict):
        keys = ([prefer] if prefer in reply else []) + list(reply)
        for k in keys:
            if torch.is_tensor(reply[k]) and reply[k].numel():
                return k, reply[k]
    raise ValueError("this fault needs a reply with a non-empty tensor")


def _change(fn, prefer: str = ""):
    """A fault that replaces the reply's first tensor (``prefer`` first) ``t`` with ``fn(t)``."""
    def f(reply):
        k, t = _first_tensor(reply, prefer)
        return {**reply, k: fn(t)}
    return f


def _poked(value: float):
    def fn(t):
        t = t.clone()
        t.view(-1)[0] = value
        return t
    return fn


#: kind -> how the reply is spoiled
KINDS = {
    "extra_key": lambda r: {**r, "smuggled": torch.zeros(1)},
    "missing_key": lambda r: {k: v for k, v in list(r.items())[1:]},
    "shape": _change(lambda t: t[..., :-1] if t.dim() > 1 else t[:-1]),
    "dtype": _change(lambda t: t.double()),
    "nan": _change(_poked(float("nan"))),
    "inf": _change(_poked(float("inf"))),
    "range": _change(_poked(7.0), prefer="grade"),
    "oversize": _change(lambda t: torch.cat([t] * 64)),
    "not_a_dict": lambda r: [r],
}


def _faults() -> list:
    raw = os.environ.get(ENV)
    if not raw:
        return []
    faults = json.loads(raw)
    for f in faults:
        if f.get("kind") not in KINDS and f.get("kind") != "raise":
            raise ValueError(f"{ENV}: unknown fault kind {f.get('kind')!r} (one of raise, {', '.join(KINDS)})")
    return faults


def matching(name: str, step: str, kw: dict) -> Optional[str]:
    """The fault kind set for ``name``'s ``step`` in this call's round, or None."""
    for f in _faults():
        rounds = f.get("rounds")
        if f.get("client") == name and f.get("step") == step and (rounds is None or kw.get("rnd") in rounds):
            return f["kind"]
    return None


def spoil(kind: str, name: str, step: str, reply):
    """``reply`` as the fault ``kind`` makes it (``raise``: the step fails instead)."""
    if kind == "raise":
        raise RuntimeError(f"{ENV}: {name} fails {step!r} on purpose")
    return KINDS[kind](reply)
