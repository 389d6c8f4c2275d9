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

:class:`Runner` keeps all parties in this process (clients run one after another, in index order or,
``order="reverse"``, backwards); with ``train.client_workers: N`` the clients live in ``N`` worker
processes (one per GPU where several are present) and the clients of a phase run concurrently.
Randomness is keyed (:mod:`utils.rng`), so every arrangement gives the same result.
"""
from __future__ import annotations

import contextlib
import time
import traceback
from collections import defaultdict
from multiprocessing.connection import wait
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

import networks
from datasets.dataset import SegDataset
from utils.device import Amp, resolve_device
from utils.metrics import ScoreBook
from utils.rng import seed_torch

from fed.core.registry import METHODS
from fed.core.method import PerClient, for_client
from fed.core.party import Party, build_loader

#: what a runner may ask of any party besides the method's steps
PARTY_CALLS = ("begin_round", "rollback", "end_round", "save_state", "load_state", "weights", "evaluate",
               "test_weights")


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


def make_party(cfg, amp: Amp, name: str, arch: str, items: Dict[str, list], public: SegDataset,
               index: Optional[int] = None, site: str = "") -> Party:
    """Build one party: its model (initialised from the key ``(seed, "init", name)``), loaders, optimizer."""
    d = cfg.data
    loaders = {"public": build_loader(public, d, amp.device)}
    modes = {"labeled_train": ("labeled", "labeled"), "unlabeled_train": ("unlabeled", "unlabeled"),
             "val_list": ("val", "eval"), "test_list": ("test", "eval")}
    for key, (which, mode) in modes.items():
        if items.get(key):
            loaders[which] = build_loader(SegDataset(items[key], d.size, mode, cache=d.cache).preload(), d, amp.device)
    seed_torch(cfg.seed, "init", name)
    model = networks.build_model(arch, pretrained=cfg.models.pretrained)
    party = Party(name, arch, model, cfg, amp, loaders, index=index, site=site)
    METHODS[cfg.method](cfg).setup(party)
    return party


def step_name(method, step) -> str:
    """The name that stands for ``step`` (a bound ``@step`` of ``method``) on the wire."""
    name = getattr(step, "__name__", None)
    if not callable(step) or getattr(step, "__self__", None) is None or name not in type(method).steps:
        raise TypeError(f"{type(method).__name__}: {step!r} is not one of its steps ({', '.join(type(method).steps)}); "
                        f"pass the bound method, e.g. r.clients(self.local, ...)")
    return name


def call(method, party: Party, step: str, msg, kw: dict):
    """Run the step named ``step`` on ``party``: a method step ``method.step(party, msg, **kw)`` or a
    party call (:data:`PARTY_CALLS`); any other name is refused."""
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
    """A client's step raised; ``reason`` is ``Type: message``, ``trace`` its traceback."""

    def __init__(self, name: str, reason: str, trace: str = ""):
        super().__init__(f"{name}: {reason}")
        self.name, self.reason, self.trace = name, reason, trace


class Runner:
    """Parties + method, built from a validated config and the resolved file lists."""

    #: parties may be read (state writing) on another thread while this one evaluates
    concurrent_safe = True

    def __init__(self, cfg, data, logger=None, order: str = "forward"):
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
        #: each client's number of files per split (a Flower site reports its own when it is set up)
        self.file_counts: Dict[str, Dict[str, int]] = {
            n: {key: len(v) for key, v in items.items()} for n, items in zip(self.names, data.clients) if items is not None}
        self._host_clients()
        self.skipped: Dict[str, str] = {}
        self.bytes = {n: {"up": 0, "down": 0} for n in self.names}
        self.times: Dict[str, float] = defaultdict(float)

    def _host_clients(self) -> None:
        self.parties = {n: make_party(self.cfg, self.amp, n, self.archs[n], self.data.clients[k], self.public,
                                      index=k, site=self.sites[n]) for k, n in enumerate(self.names)}

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
        return call(self.method, self.server_party, step_name(self.method, step), msg, kw)

    @contextlib.contextmanager
    def phase(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.times[name] += time.perf_counter() - t

    # --- running client steps -------------------------------------------------------------------
    def _calls(self, names: List[str], step: str, msg, kw: dict):
        """Yield ``(name, reply)`` for each client that completes ``step``; a failing client is
        skipped for the rest of the round under ``skip_client``, else the failure is raised."""
        for name in names:
            try:
                reply = call(self.method, self.parties[name], step, self._part(msg, name), kw)
            except Exception as e:  # noqa: BLE001 - any failure of one client's work
                self._failed(ClientFailure(name, f"{type(e).__name__}: {e}", traceback.format_exc()), e)
                continue
            yield name, reply

    def _part(self, msg, name: str):
        return for_client(msg, self.names.index(name))

    def _failed(self, failure: ClientFailure, original: Optional[BaseException] = None) -> None:
        if self.cfg.train.fault_tolerance != "skip_client":
            if original is not None:
                raise original
            raise failure
        self.skipped[failure.name] = failure.reason
        if self.logger is not None:
            self.logger.log.error(f"{failure.name} ({self.sites[failure.name]}) fails and sits this round out: "
                                  f"{failure.reason}\n{failure.trace}")
        self._call_one(failure.name, "rollback", None, {})

    def _call_one(self, name: str, step: str, msg, kw: dict):
        return call(self.method, self.parties[name], step, msg, kw)

    def _all(self, step: str, **kw) -> Dict[str, object]:
        """A party call on every client (not a method message: not counted)."""
        return {n: self._call_one(n, step, None, kw) for n in self.names}

    # --- what the run uses ------------------------------------------------------------------------
    def run_round(self, rnd: int) -> dict:
        """One communication round: the method's protocol; returns losses, lrs, skips, bytes, times."""
        keep = self.cfg.train.fault_tolerance == "skip_client"
        self.skipped = {}
        self.bytes = {n: {"up": 0, "down": 0} for n in self.names}
        self.times = defaultdict(float)
        self.server_party.begin_round(keep=False)
        self._all("begin_round", keep=keep)
        self.method.run_round(self, rnd)
        ends = {"server": self.server_party.end_round(), **self._all("end_round")}
        return {"loss": {n: e["loss"] for n, e in ends.items() if e["loss"] and n not in self.skipped},
                "lr": {n: e["lr"] for n, e in ends.items()},
                "skipped": dict(self.skipped), "bytes": self.bytes,
                "phase_s": {k: round(v, 3) for k, v in self.times.items()}}

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

    def client_weights(self, name: str) -> dict:
        return self._call_one(name, "weights", None, {})

    def server_weights(self) -> dict:
        """The server's model (the global model of a shared-model method)."""
        return self.server_party.weights()

    def save_state(self, folder: Path, rnd: int) -> None:
        """Every party writes its own state file (where it lives: a worker writes its clients')."""
        self.server_party.save_state(folder, rnd)
        self._all("save_state", folder=folder, rnd=rnd)

    def load_state(self, folder: Path, rnd: int) -> None:
        self.server_party.load_state(folder, rnd)
        self._all("load_state", folder=folder, rnd=rnd)

    def close(self) -> None:
        pass


# --- clients in worker processes ------------------------------------------------------------------

def _worker_main(conn, settings: dict, hosted: Dict[str, tuple], public_items, device: str, threads: int):
    """A worker process: builds the clients it hosts, then serves ``(name, step, msg, kw)`` requests."""
    from utils.config import Config

    def as_config(d):
        return Config({k: as_config(v) if isinstance(v, dict) else v for k, v in d.items()})

    try:
        torch.set_num_threads(threads)
        cfg = as_config(settings)
        cfg.device = device
        dev = resolve_device(device)
        amp = Amp.for_device(dev, cfg.train.amp, cfg.train.channels_last)
        method = METHODS[cfg.method](cfg)
        public = SegDataset(public_items, cfg.data.size, "labeled", cache=cfg.data.cache).preload()
        parties = {n: make_party(cfg, amp, n, arch, items, public, index=k, site=site)
                   for n, (k, site, arch, items) in hosted.items()}
        conn.send(("ready", None, None, None))
    except BaseException as e:  # noqa: BLE001
        conn.send(("err", None, f"{type(e).__name__}: {e}", traceback.format_exc()))
        return
    while True:
        req = conn.recv()
        if req is None:
            return
        name, step, msg, kw = req
        try:
            reply = call(method, parties[name], step, to_device(msg, dev), kw)
            conn.send(("ok", name, to_device(reply, "cpu"), None))
        except BaseException as e:  # noqa: BLE001 - reported to the runner
            conn.send(("err", name, f"{type(e).__name__}: {e}", traceback.format_exc()))


class ProcessRunner(Runner):
    """The clients live in ``train.client_workers`` worker processes (spawned); the server here.

    Client ``k`` is hosted by worker ``k % N``; a worker serves its clients one after another, the
    workers run side by side. With several CUDA devices, worker ``i`` uses ``cuda:(i % count)``.
    """

    concurrent_safe = False  # one pipe per worker: requests go from one thread only

    def _host_clients(self) -> None:
        import torch.multiprocessing as mp

        n = min(self.cfg.train.client_workers, len(self.names))
        ctx = mp.get_context("spawn")
        threads = max(1, torch.get_num_threads() // n) if self.cfg.train.worker_threads == 0 \
            else self.cfg.train.worker_threads
        gpus = torch.cuda.device_count() if self.device.type == "cuda" else 0
        self.host, self.conns, self.procs = {}, [], []
        settings = self.cfg.settings()
        for i in range(n):
            hosted = {name: (k, self.sites[name], self.archs[name], self.data.clients[k])
                      for k, name in enumerate(self.names) if k % n == i}
            device = f"cuda:{i % gpus}" if gpus > 1 else str(self.device)
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker_main, args=(child, settings, hosted, self.data.public, device, threads),
                            daemon=True, name=f"hssf-worker{i}")
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)
            self.host.update({name: i for name in hosted})
        for i, c in enumerate(self.conns):
            status, _, reason, trace = c.recv()
            if status != "ok" and status != "ready":
                self.close()
                raise RuntimeError(f"client worker {i} failed to start: {reason}\n{trace}")

    def _calls(self, names: List[str], step: str, msg, kw: dict):
        pending = {i: [] for i in range(len(self.conns))}
        for name in names:
            pending[self.host[name]].append(name)
        out = to_device(msg, "cpu") if not isinstance(msg, PerClient) else None
        for i, queue in pending.items():  # each worker gets its requests in index order
            for name in queue:
                part = out if out is not None else to_device(self._part(msg, name), "cpu")
                self.conns[i].send((name, step, part, kw))
        waiting = {self.conns[i]: len(q) for i, q in pending.items() if q}
        failures = []
        while waiting:
            for conn in wait(list(waiting)):
                status, name, payload, trace = conn.recv()
                waiting[conn] -= 1
                if not waiting[conn]:
                    del waiting[conn]
                if status == "ok":
                    yield name, to_device(payload, self.device)
                else:
                    failures.append(ClientFailure(name, payload, trace))
        for f in failures:  # once every pipe is drained: a rollback is a request of its own
            self._failed(f)

    def _call_one(self, name: str, step: str, msg, kw: dict):
        conn = self.conns[self.host[name]]
        conn.send((name, step, to_device(msg, "cpu"), kw))
        status, _, payload, trace = conn.recv()
        if status != "ok":
            raise ClientFailure(name, payload, trace)
        return payload

    def _all(self, step: str, **kw) -> Dict[str, object]:
        for name in self.names:
            self.conns[self.host[name]].send((name, step, None, kw))
        out = {}
        for name in self.names:  # each worker answers its requests in order
            status, got, payload, trace = self.conns[self.host[name]].recv()
            if status != "ok":
                raise ClientFailure(got, payload, trace)
            out[got] = payload
        return out

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(None)
            except (BrokenPipeError, OSError):
                pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        self.conns, self.procs = [], []


#: where the clients run, name -> the runner class (``module:attribute``, imported when asked for):
#: ``inprocess`` (here, or in ``train.client_workers`` worker processes), ``flower-sim`` (nodes of a Flower
#: simulation, :mod:`fed.flower`; needs requirements-flower.txt) and ``flower-deployment`` (only inside the
#: ServerApp of :mod:`fed.flower.deploy`, on the SuperLink's Grid). The Flower runners build on this module,
#: so they are named here, not imported.
ENGINES = {"inprocess": "fed.core.runner:Runner", "flower-sim": "fed.flower.engine:FlowerRunner",
           "flower-deployment": "fed.flower.deploy:DeployedRunner"}


def make_runner(cfg, data, logger=None, order: str = "forward", engine: str = "inprocess") -> Runner:
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "inprocess":
        cls = ProcessRunner if cfg.train.client_workers > 0 else Runner
    else:
        import importlib

        module, attr = ENGINES[engine].split(":")
        cls = getattr(importlib.import_module(module), attr)
    return cls(cfg, data, logger, order)
