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


def _set(reply: dict, k, v) -> dict:
    return {**reply, k: v}


def _poke(value: float, prefer: str = ""):
    def f(reply):
        k, t = _first_tensor(reply, prefer)
        t = t.clone()
        t.view(-1)[0] = value
        return _set(reply, k, t)
    return f


#: kind -> how the reply is spoiled
KINDS = {
    "extra_key": lambda r: {**r, "smuggled": torch.zeros(1)},
    "missing_key": lambda r: {k: v for k, v in list(r.items())[1:]},
    "shape": lambda r: _set(r, *(lambda kt: (kt[0], kt[1][..., :-1] if kt[1].dim() > 1 else kt[1][:-1]))(_first_tensor(r))),
    "dtype": lambda r: _set(r, *(lambda kt: (kt[0], kt[1].double()))(_first_tensor(r))),
    "nan": _poke(float("nan")),
    "inf": _poke(float("inf")),
    "range": _poke(7.0, prefer="grade"),
    "oversize": lambda r: _set(r, *(lambda kt: (kt[0], torch.cat([kt[1]] * 64)))(_first_tensor(r))),
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
