"""What crosses between the runner and a party: the names of calls, running one on a party, a failure,
and the bookkeeping of messages (bytes, device)."""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch

from fed.core import faults
from fed.core.method import PARTY_CALLS
from fed.core.party import Party


def nbytes(msg) -> int:
    """Bytes a message carries as data: tensor/array payloads, 8 per number, the length of strings."""
    if msg is None:
        return 0
    if torch.is_tensor(msg):
        return msg.numel() * msg.element_size()
    if isinstance(msg, np.ndarray):
        return int(msg.nbytes)
    if isinstance(msg, dict):
        return sum(nbytes(v) for v in msg.values())
    if isinstance(msg, (list, tuple)):
        return sum(nbytes(v) for v in msg)
    if isinstance(msg, str):
        return len(msg.encode())
    return 8


def to_device(msg, device):
    if torch.is_tensor(msg):
        return msg.to(device, non_blocking=True)
    if isinstance(msg, dict):
        return {k: to_device(v, device) for k, v in msg.items()}
    if isinstance(msg, (list, tuple)):
        return type(msg)(to_device(v, device) for v in msg)
    return msg


def step_name(method, step) -> str:
    """The name that stands for ``step`` (a bound ``@step`` of ``method``) on the wire."""
    name = getattr(step, "__name__", None)
    if not callable(step) or getattr(step, "__self__", None) is None or name not in type(method).steps:
        raise TypeError(f"{type(method).__name__}: {step!r} is not one of its steps ({', '.join(type(method).steps)}); "
                        f"pass the bound method, e.g. r.clients(self.local, ...)")
    return name


def call(method, party: Party, step: str, msg, kw: dict):
    """Run the step named ``step`` on ``party``: a method step ``method.step(party, msg, **kw)`` or a
    party call (:data:`PARTY_CALLS`); any other name is refused. Faults set on purpose
    (:mod:`fed.core.faults`, ``HSSF_FAULTS``) spoil the reply."""
    reply = _call(method, party, step, msg, kw)
    if faults.ENV in os.environ and party.name != "server":
        kind = faults.matching(party.name, step, kw)
        if kind is not None:
            reply = faults.spoil(kind, party.name, step, reply)
    return reply


def _call(method, party: Party, step: str, msg, kw: dict):
    if step == "evaluate":  # the method says which model a client scores (lssl: the global one)
        return party.evaluate(method.eval_model(party), **kw)
    if step == "test_weights":  # the final test: the message is the weights to score
        return party.test_weights(msg, **kw)
    if step in PARTY_CALLS:
        return getattr(party, step)(**kw)
    if step not in type(method).steps:
        raise KeyError(f"{step!r} is neither a step of {type(method).__name__} ({', '.join(type(method).steps)}) "
                       f"nor a party call ({', '.join(PARTY_CALLS)})")
    return getattr(method, step)(party, msg, **kw)


class ClientFailure(RuntimeError):
    """A client's step raised; ``reason`` is ``Type: message``, ``trace`` its traceback; ``original`` the
    exception itself where the client runs in this process."""

    def __init__(self, name: str, reason: str, trace: str = "", original: Optional[BaseException] = None):
        super().__init__(f"{name}: {reason}")
        self.name, self.reason, self.trace, self.original = name, reason, trace, original

    def raise_(self):
        raise self.original if self.original is not None else self
