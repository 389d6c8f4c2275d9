"""The method interface and the helpers every method shares.

A method is one file with a small class registered in ``fed/__init__.py``::

    class MyMethod(Method):
        name = "mymethod"
        sends = {"up": "what a client sends", "down": "what the server sends"}

        def run_round(self, r, rnd):              # the protocol of one round
            with r.phase("local"):
                r.clients(self.local, rnd=rnd)    # runs self.local(client, None, rnd=rnd) on each client

        @step
        def local(self, party, msg, rnd): ...      # a step: one party, one message in, one reply out

        @step(read_only=True, reply=Fields(logits=Tensor("n<=P C S S")))
        def predict(self, party, msg, rnd): ...    # a reply declared (fed/core/replies.py): checked on arrival

A step sees only its own :class:`fed.core.party.Party` and the message it was sent; the runner
(:mod:`fed.core.runner`) carries messages, counts their bytes and times the phases. A protocol names its
steps as bound methods (an editor follows them); what crosses to another process or site is the step's
name. ``@step(read_only=True)`` marks a step that changes nothing on its party (no training, no state):
Flower sends it as a "query". Evaluation, checkpoints, logging and resuming are the run's job
(:mod:`fed.core.run`).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List

import torch
import torch.nn as nn


class PerClient(dict):
    """A message with one part per client: client ``k`` receives ``msg[k]`` (``None`` where absent)."""


def for_client(msg, k: int):
    """The part of ``msg`` that client ``k`` receives."""
    return msg.get(k) if isinstance(msg, PerClient) else msg


class LossLog:
    """Running means of loss terms within a round (kept on the device: no sync per step)."""

    def __init__(self):
        self._sum: Dict[str, torch.Tensor] = {}
        self._n: Dict[str, int] = defaultdict(int)

    def add(self, **terms: torch.Tensor) -> None:
        for k, v in terms.items():
            v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
            self._sum[k] = self._sum.get(k, 0) + v
            self._n[k] += 1

    def state_dict(self) -> dict:
        """The running sums and counts (to carry a round's log to another process)."""
        return {"sum": dict(self._sum), "n": dict(self._n)}

    def load_state_dict(self, state: dict) -> None:
        self._sum, self._n = dict(state["sum"]), defaultdict(int, state["n"])

    def means(self) -> Dict[str, float]:
        """Mean of each term (NaN or inf where a step's loss was not finite)."""
        return {k: float(s) / self._n[k] for k, s in self._sum.items()}


#: what a runner may ask of any party besides the method's steps (the same names on every engine's wire)
PARTY_CALLS = ("begin_round", "rollback", "end_round", "save_state", "load_state", "weights", "keep_weights",
               "kept_weights", "evaluate", "test_weights")


def step(fn=None, *, read_only: bool = False, reply=None):
    """Mark a method's function as a step (``@step`` or ``@step(read_only=True, reply=...)``): the runner
    runs it on a party, ``fn(self, party, msg, **kw)``, and carries its reply. ``read_only``: it changes
    nothing on its party (no training, no optimizer, scheduler or state change). ``reply``: what a client's
    reply must be (a :class:`fed.core.replies.Spec`, or a function of the method instance returning one);
    without it the reply must be ``None``. The runner refuses a client reply that does not fit."""
    def mark(f):
        f.__step__ = {"read_only": bool(read_only), "reply": reply}
        return f
    return mark(fn) if fn is not None else mark


class Method:
    """Base class: subclasses implement :meth:`run_round` and the steps (``@step``) it names."""

    name = "base"
    #: True when all clients share one global model (FedAvg): evaluation and checkpoints use it, as it
    #: stands at the end of the round (the aggregate of the round's local training: each round scores
    #: what it trained).
    shared_model = False
    #: False when the method ignores ``train.warmup_rounds`` (no round is logged as warm-up).
    uses_warmup = True
    #: the configuration section of :attr:`options` (None: the method's ``name``)
    section = None
    #: this method's settings, ``{key: utils.config.Key}``: the configuration section ``section`` (default:
    #: ``name``), added to the schema when the method registers (docs/configuration.md is generated from it)
    options: dict = {}
    #: what crosses between the parties, in words (docs, logs)
    sends = {"up": "nothing", "down": "nothing"}
    #: the method's steps, name -> {"read_only": bool}: collected from ``@step`` when the class is defined
    steps: dict = {}
    #: the steps that only read their party (``@step(read_only=True)``): Flower sends them as "query"
    read_only: frozenset = frozenset()

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        steps, owner = {}, {}
        for klass in reversed(cls.__mro__):
            for attr, v in vars(klass).items():
                if hasattr(v, "__step__"):
                    steps[attr], owner[attr] = dict(v.__step__), klass.__name__
                elif attr in steps:  # an override of a step that is not marked
                    raise TypeError(f"{klass.__name__}.{attr} overrides the step {owner[attr]}.{attr} without "
                                    f"@step: mark it (@step or @step(read_only=...))")
        clash = sorted(set(steps) & RESERVED)
        if clash:
            raise TypeError(f"{cls.__name__}: {', '.join(clash)} can not be a step (a name the runner or the run "
                            f"uses: {', '.join(sorted(RESERVED))})")
        cls.steps = steps
        cls.read_only = frozenset(n for n, info in steps.items() if info["read_only"])

    def __init__(self, cfg):
        self.cfg = cfg

    @classmethod
    def check_config(cls, cfg) -> List[str]:
        """Problems with ``cfg`` specific to this method (reported before anything runs)."""
        return []

    def setup(self, party) -> None:
        """Make what this method keeps on ``party`` between rounds (``party.extra``: a teacher copy, an
        extra network...), right after the party is built, in every process that hosts it. Seed any
        random initialisation from a key (``utils.rng.seed_torch(cfg.seed, "init", party.name, ...)``)."""

    def run_round(self, r, rnd: int) -> None:
        raise NotImplementedError

    def warm(self, rnd: int) -> bool:
        return self.uses_warmup and rnd < self.cfg.train.warmup_rounds

    def eval_model(self, party) -> nn.Module:
        """The model scored on a client's val/test data (on the client's side)."""
        return party.model


#: names a step can not take: the party calls (:data:`PARTY_CALLS`), what the run asks of a method (every
#: public attribute of :class:`Method`) and the method's settings, ``cfg``
RESERVED = frozenset(PARTY_CALLS) | {n for n in vars(Method) if not n.startswith("_")} | {"cfg"}
