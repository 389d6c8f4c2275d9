"""The runner: holds the parties and carries a method's messages between them.

A method (``fed/methods/hssf.py``...) writes its round as a protocol, against this interface only::

    with r.phase("condensation"):
        teacher = r.clients(self.predict_public, rnd=rnd, phase="condensation", epoch=e, reduce=fold)
        r.server(self.condense, teacher, rnd=rnd, epoch=e)

``r.clients(self.step, msg, **kw)`` runs the step (a ``@step`` of the method) on every active client,
``step(client, msg, **kw)``, and returns ``{index: reply}`` in client order (or folds each reply into
``reduce(acc, k, reply)`` as it arrives, in any order); a :class:`PerClient` message gives each client
its own part. ``r.server(self.step, msg, **kw)`` runs it on the server. What crosses to a worker process
or a site is the step's name. A step sees only its own party and the message; a message is plain data
(tensors, numbers, small dicts). Every message to and from a client is counted (bytes down and up per
client) and every phase is timed.

The runner holds the server party and the method, carries the protocol's messages, counts their bytes,
times the phases and applies the failure policy; where the clients live is its *host*
(:class:`fed.core.hosts.ClientHost`): this process (:class:`~fed.core.hosts.InProcessHost`, clients one
after another, in index order or, ``order="reverse"``, backwards), ``train.client_workers`` worker
processes (:class:`~fed.core.hosts.WorkerHost`), the nodes of a Flower simulation or the SuperNodes of
a deployment (:mod:`fed.flower`). Randomness is keyed (:mod:`utils.rng`), so every arrangement gives
the same result.
"""
from __future__ import annotations

import contextlib
import importlib
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import torch

from datasets.dataset import SegDataset
from utils.device import Amp, resolve_device
from utils.io import atomic_torch_save
from utils.metrics import ScoreBook

from fed.core import calls as wire  # wire.call looked up per call (tests wrap it)
from fed.core.calls import ClientFailure, nbytes, step_name
from fed.core.hosts import InProcessHost, WorkerHost
from fed.core.method import for_client
from fed.core.party import Party, make_party
from fed.core.registry import METHODS
from fed.core.replies import Checker

class Runner:
    """Parties + method, built from a validated config and the resolved file lists; the clients live in
    ``host`` (a :class:`fed.core.hosts.ClientHost` class, built here with this runner)."""

    def __init__(self, cfg, data, logger=None, order: str = "forward", host=None):
        self.cfg, self.logger, self.order = cfg, logger, order
        d, t = cfg.data, cfg.train
        self.device = resolve_device(cfg.device)
        self.amp = Amp.for_device(self.device, t.amp, t.channels_last)
        self.method = METHODS[cfg.method](cfg)
        self.data = data
        self.public = SegDataset(data.public, d.size, "labeled", cache=d.cache).preload()
        self.server_party = make_party(cfg, self.amp, "server", cfg.models.server, {}, self.public)
        self.names = [f"client{k}" for k in range(len(d.clients))]
        self.sites = {f"client{k}": s for k, s in enumerate(d.clients)}
        self.archs = {f"client{k}": a for k, a in enumerate(cfg.models.clients)}
        self.lost: Dict[str, str] = {}  # sites that stopped answering (Flower engines), with the reason
        self.lost_at: Dict[str, int] = {}  # the round in which each lost site was lost
        self.saved: Dict[str, int] = {}  # each client's last round whose state it wrote (where it resumes after a loss)
        self.state_folder: Optional[Path] = None
        #: each client's number of files per split (a Flower site reports its own when it is set up)
        self.file_counts: Dict[str, Dict[str, int]] = {
            n: {key: len(v) for key, v in items.items()} for n, items in zip(self.names, data.clients) if items is not None}
        self.skipped: Dict[str, str] = {}
        self.bytes = {n: {"up": 0, "down": 0} for n in self.names}
        self.times: Dict[str, float] = defaultdict(float)
        self.round = -1  # the round in progress
        #: every client reply is checked against its step's declaration before it is used
        self.checker = Checker(self.method, len(self.public), d.size, self.archs, self.file_counts)
        self.host = (host or InProcessHost)(self)

    @property
    def concurrent_safe(self) -> bool:
        """Whether the parties may be read (state writing) on another thread while this one evaluates."""
        return self.host.concurrent_safe

    @property
    def parties(self) -> Dict[str, Party]:
        """The client parties, where the host keeps them in this process."""
        return self.host.parties

    # --- the protocol that methods use ----------------------------------------------------------
    def active(self) -> List[str]:
        names = [n for n in self.names if n not in self.skipped]
        return names[::-1] if self.order == "reverse" else names

    def clients(self, step: Callable, msg=None, reduce: Optional[Callable] = None, **kw):
        """Run ``step`` (a bound ``@step``) on every active client; ``{index: reply}`` in client order,
        or the fold of ``reduce``."""
        acc, replies = None, {}
        for name, reply in self._calls(self.active(), step_name(self.method, step), msg, kw):
            k = self.names.index(name)
            self.bytes[name]["down"] += nbytes(for_client(msg, k))
            self.bytes[name]["up"] += nbytes(reply)
            if reduce is not None:
                acc = reduce(acc, k, reply)
            else:
                replies[k] = reply
        return acc if reduce is not None else dict(sorted(replies.items()))

    def server(self, step: Callable, msg=None, **kw):
        """Run ``step`` (a bound ``@step``) on the server; its reply."""
        return wire.call(self.method, self.server_party, step_name(self.method, step), msg, kw)

    @contextlib.contextmanager
    def phase(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.times[name] += time.perf_counter() - t

    # --- carrying calls to the host, and what happens when one fails ---------------------------------
    def _calls(self, names: List[str], step: str, msg, kw: dict):
        """Yield ``(name, reply)`` for each client that completes ``step``, as the replies come. Once
        every reply is in, each failing client is skipped for the rest of the round under
        ``skip_client`` (its state rolled back), else the first failure is raised."""
        failures = []
        for name, reply in self._checked(names, step, msg, kw):
            if isinstance(reply, ClientFailure):
                failures.append(reply)
            else:
                yield name, reply
        for f in failures:
            self._failed(f)

    def _checked(self, names: List[str], step: str, msg, kw: dict):
        """The host's ``(name, reply)``, each reply checked against ``step``'s declaration
        (:mod:`fed.core.replies`): one that does not fit becomes that client's failure (``BadReply``)."""
        for name, reply in self.host.calls(names, step, msg, kw):
            if not isinstance(reply, ClientFailure):
                wrong = self.checker.check(name, step, reply, kw)
                if wrong is not None:
                    reply = ClientFailure(name, f"BadReply: its reply to {step!r} is refused: {wrong}")
            yield name, reply

    def _failed(self, failure: ClientFailure) -> None:
        if self.cfg.train.fault_tolerance != "skip_client":
            failure.raise_()
        self.skipped[failure.name] = failure.reason
        if self.logger is not None:
            self.logger.log.error(f"{failure.name} ({self.sites[failure.name]}) fails and sits this round out: "
                                  f"{failure.reason}\n{failure.trace}")
        self._ask([failure.name], "rollback", {})

    def _all(self, step: str, **kw) -> Dict[str, object]:
        """A party call on every client that is not lost (not a method message: not counted); lost sites
        are listed as skipped. The first failure is raised once every reply is in."""
        for n, reason in self.lost.items():
            self.skipped.setdefault(n, f"lost: {reason}")
        out, failures = {}, []
        for name, reply in self._checked(list(self.names), step, None, kw):
            if isinstance(reply, ClientFailure):
                failures.append(reply)
            else:
                out[name] = reply
        if failures:
            failures[0].raise_()
        return {n: out[n] for n in self.names if n in out}

    def lose(self, name: str, reason: str) -> None:
        """``name`` stopped answering (a host says so): it sits out the rest of the run, or the run stops
        if fewer than ``train.min_sites`` sites remain."""
        self.lost[name] = reason
        self.lost_at.setdefault(name, self.round)
        self.skipped[name] = f"lost: {reason}"
        left = [n for n in self.names if n not in self.lost]
        need = self.cfg.train.min_sites or len(self.names)
        if self.logger is not None:
            self.logger.log.error(f"{name} ({self.sites[name]}) is lost: {reason}; {len(left)} of {len(self.names)} "
                                  f"site(s) left (train.min_sites: {need})")
        if len(left) < need:
            raise SitesLost(f"{', '.join(self.lost)} lost ({reason}): {len(left)} site(s) left, train.min_sites needs "
                            f"{need}. The run stops; its last completed round is kept: resume once the sites are back")

    # --- what the run uses ------------------------------------------------------------------------
    def run_round(self, rnd: int) -> dict:
        """One communication round: the method's protocol; returns losses, lrs, skips, bytes, times."""
        keep = self.cfg.train.fault_tolerance == "skip_client"
        self.round = rnd
        self.skipped = {}
        self.bytes = {n: {"up": 0, "down": 0} for n in self.names}
        self.times = defaultdict(float)
        rejoined = self.rejoin(rnd)
        self.server_party.begin_round(keep=False)
        self._all("begin_round", keep=keep)
        self.method.run_round(self, rnd)
        ends = {"server": self.server_party.end_round(), **self._all("end_round")}
        return {"loss": {n: e["loss"] for n, e in ends.items() if e["loss"] and n not in self.skipped},
                "lr": {n: e["lr"] for n, e in ends.items()},
                "skipped": dict(self.skipped), "bytes": self.bytes,
                "phase_s": {k: round(v, 3) for k, v in self.times.items()},
                **({"rejoined": rejoined} if rejoined else {})}

    def rejoin(self, rnd: int) -> Dict[str, dict]:
        """Before round ``rnd``: lost sites that are back (the host finds them and sets them up again) resume
        from their own last saved state and take part from this round on. ``{name: {"missed": [rounds],
        "resumed_from": round or None}}``."""
        if not self.lost:
            return {}
        out = {}
        for name in self.host.recover(list(self.lost)):
            reason, since = self.lost.pop(name), self.lost_at.pop(name)
            saved = self.saved.get(name)
            try:
                if saved is not None and self.state_folder is not None:
                    self._ask([name], "load_state", self.host.state_kw(self.state_folder, saved))
            except ClientFailure as e:
                self.lost[name], self.lost_at[name] = f"{reason}; back, but its state of round {saved} could not be " \
                                                      f"loaded: {e.reason}", since
                continue
            out[name] = {"missed": list(range(since, rnd)), "resumed_from": saved}
            if self.logger is not None:
                self.logger.info(f"{name} ({self.sites[name]}) is back: it resumes from its own state of "
                                 f"{'round ' + str(saved) if saved is not None else 'the start'}, having missed "
                                 f"round(s) {', '.join(map(str, out[name]['missed']))}")
        return out

    def evaluate(self, split: str, names: Optional[List[str]] = None) -> ScoreBook:
        """Score each client's evaluation model on its ``split``."""
        book = ScoreBook()
        names = [n for n in (names or self.names) if n not in self.skipped]
        got = dict(self._calls(names, "evaluate", None, {"split": split}))
        for name in names:  # client order, whatever the order of the replies: pooled means are exact
            book.rows.extend(got.get(name, []))
        return book

    def final_test(self, weights: Dict[str, dict], archs: Dict[str, str], overlay_dir: Path,
                   overlays: int = 4) -> ScoreBook:
        """Each client scores the weights it is sent (its best checkpoint) on its own test split, where
        its data lives; the rows come back in client order. A lost site gives none."""
        names = [n for n in self.names if n in weights and n not in self.lost]
        book = ScoreBook()
        got = {}
        for n in names:  # one message each: a model per site (not a method message: not counted)
            got.update(self._calls([n], "test_weights", weights[n],
                                   {"arch": archs[n], "overlay_dir": overlay_dir, "overlays": overlays}))
        for n in names:
            book.rows.extend(got.get(n, []))
        return book

    def clients_weights(self, names: List[str]) -> Dict[str, dict]:
        """The weights of each of ``names``, asked of all at once (a deployment's sites send them side by
        side); the first failure is raised, as is a site lost meanwhile."""
        return self._ask(names, "weights", {})

    def keep_checkpoints(self, paths: Dict[str, Path], rnd: int) -> None:
        """Each client of ``paths`` makes its current weights (round ``rnd``) its checkpoint ``paths[name]``.
        A host whose clients live elsewhere (``host.keeps_weights``: a Flower site) keeps them where the
        client lives, and they cross once, at the end (:meth:`fetch_checkpoints`); otherwise they are
        written now."""
        if self.host.keeps_weights:
            self._ask(list(paths), "keep_weights", self.host.kept_kw(rnd))
            return
        weights = self.clients_weights(list(paths))
        for name, path in paths.items():
            atomic_torch_save(weights.pop(name), path)

    def fetch_checkpoints(self, kept: Dict[str, tuple]) -> None:
        """``{name: (round, path)}``: each client's weights kept at ``round`` (:meth:`keep_checkpoints`)
        written to ``path`` here, asked of the clients of one round at once. Nothing to do where the host
        wrote them at once."""
        if not self.host.keeps_weights:
            return
        for rnd in sorted({r for r, _ in kept.values()}):
            names = [n for n, (r, _) in kept.items() if r == rnd]
            for name, weights in self._ask(names, "kept_weights", self.host.kept_kw(rnd)).items():
                atomic_torch_save(weights, kept[name][1])

    def _ask(self, names: List[str], step: str, kw: dict) -> Dict[str, object]:
        """A party call on each of ``names`` at once; ``{name: reply}``. The first failure is raised, as is
        a site lost meanwhile."""
        out = {}
        for name, reply in self._checked(list(names), step, None, kw):
            if isinstance(reply, ClientFailure):
                reply.raise_()
            out[name] = reply
        for name in names:
            if name not in out:
                raise ClientFailure(name, f"lost: {self.lost.get(name)}")
        return out

    def server_weights(self) -> dict:
        """The server's model (the global model of a shared-model method)."""
        return self.server_party.weights()

    def save_state(self, folder: Path, rnd: int) -> None:
        """Every party writes its own state file, where it lives (a worker writes its clients', a site to
        its own disk); the server's is written on a thread of its own meanwhile."""
        errors = []

        def server():
            try:
                self.server_party.save_state(folder, rnd)
            except BaseException as e:  # noqa: BLE001 - raised below
                errors.append(e)

        writer = threading.Thread(target=server, name="server-state", daemon=True)
        writer.start()
        try:
            self.state_folder = folder
            for n in self._all("save_state", **self.host.state_kw(folder, rnd)):
                self.saved[n] = rnd
        finally:
            writer.join()
        if errors:
            raise errors[0]

    def load_state(self, folder: Path, rnd: int) -> None:
        self.server_party.load_state(folder, rnd)
        self.state_folder = folder
        for n in self._all("load_state", **self.host.state_kw(folder, rnd)):
            self.saved[n] = rnd

    def close(self) -> None:
        self.host.close()


class SitesLost(RuntimeError):
    """Fewer sites answer than ``train.min_sites``: the run stops (its last completed round is kept)."""


#: where the clients run, name -> the host class (``module:attribute``, imported when asked for):
#: ``inprocess`` (here, or in ``train.client_workers`` worker processes), ``flower-sim`` (nodes of a Flower
#: simulation, :mod:`fed.flower`; needs requirements-flower.txt). A deployment's ServerApp passes its own
#: host class (:func:`fed.flower.deploy.grid_host`). The Flower hosts build on this module, so they are
#: named here, not imported.
ENGINES = {"inprocess": "fed.core.hosts:InProcessHost", "flower-sim": "fed.flower.engine:SimulationHost"}


def engine_host(engine: Union[str, type], cfg=None) -> type:
    """The host class of ``engine``: a name of :data:`ENGINES` or a host class itself. ``inprocess`` with
    ``train.client_workers > 0`` is the worker-process host."""
    if not isinstance(engine, str):
        return engine
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "inprocess" and cfg is not None and cfg.train.client_workers > 0:
        return WorkerHost
    module, attr = ENGINES[engine].split(":")
    return getattr(importlib.import_module(module), attr)


def make_runner(cfg, data, logger=None, order: str = "forward", engine: Union[str, type] = "inprocess") -> Runner:
    return Runner(cfg, data, logger, order, host=engine_host(engine, cfg))
