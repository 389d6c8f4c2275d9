"""Where the clients live. The runner (:class:`fed.core.runner.Runner`) carries a method's protocol and
asks its host to run calls on clients; a host runs them and hands back the replies:

- :class:`InProcessHost`: every client party in this process, one after another;
- :class:`WorkerHost`: the clients in ``train.client_workers`` worker processes, side by side;
- the Flower hosts (:mod:`fed.flower.engine`, :mod:`fed.flower.deploy`): each client at a Flower node.

A host is built with its runner (``Host(runner)``) and reads what it needs from it (settings, names,
sites, architectures, the data it resolved). Its one duty is :meth:`ClientHost.calls`.
"""
from __future__ import annotations

import traceback
from multiprocessing.connection import wait
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import torch

from datasets.dataset import SegDataset
from utils.device import Amp, resolve_device

from fed.core.method import PerClient, for_client
from fed.core import calls as wire  # wire.call looked up per call (tests wrap it)
from fed.core.calls import ClientFailure, to_device
from fed.core.party import Party, make_party
from fed.core.registry import METHODS


class ClientHost:
    """The interface. ``calls`` is the only duty; the rest have defaults."""

    #: whether the runner may read the parties (state writing) on another thread while it evaluates
    concurrent_safe = True
    #: whether the process that runs the protocol reads every client's files (a deployment's server does not)
    reads_client_data = True

    def __init__(self, runner):
        self.runner = runner

    def calls(self, names: List[str], step: str, msg, kw: dict) -> Iterator[Tuple[str, object]]:
        """Run the call ``step`` (a method step or a party call) on each client of ``names`` with its part
        of ``msg`` (:func:`fed.core.method.for_client`) and ``kw``; yield ``(name, reply)`` as the replies
        come, ``(name, ClientFailure)`` for a client whose call raised. A client the host can no longer
        reach (a lost site) yields nothing (the host tells the runner: :meth:`~fed.core.runner.Runner.lose`)."""
        raise NotImplementedError

    def recover(self, names: List[str]) -> List[str]:
        """Of the lost clients ``names``, those that can be reached again, set up for this run (their
        party as built from the config); the runner then loads each one's own last saved state. Clients
        in this process are never lost: none."""
        return []

    def state_kw(self, folder: Path, rnd: int) -> dict:
        """The arguments of a client's ``save_state``/``load_state`` call for round ``rnd``."""
        return {"folder": folder, "rnd": rnd}

    #: whether a client's checkpoint weights stay where the client lives until the end of the run
    #: (``keep_weights``, then ``kept_weights`` once: :meth:`fed.core.runner.Runner.keep_checkpoints`)
    #: instead of being sent here each time they improve
    keeps_weights = False

    def kept_kw(self, rnd: int) -> dict:
        """The arguments of a client's ``keep_weights``/``kept_weights`` call for round ``rnd``."""
        raise NotImplementedError(f"{type(self).__name__} writes checkpoints at once (keeps_weights is False)")

    @property
    def parties(self) -> Dict[str, Party]:
        raise AttributeError(f"{type(self).__name__} keeps no client party in this process")

    def close(self) -> None:
        pass


class InProcessHost(ClientHost):
    """Every client party in this process; calls run one after another, in the order asked."""

    def __init__(self, runner):
        super().__init__(runner)
        r = runner
        self._parties = {n: make_party(r.cfg, r.amp, n, r.archs[n], r.data.clients[k], r.public, index=k,
                                       site=r.sites[n]) for k, n in enumerate(r.names)}

    @property
    def parties(self) -> Dict[str, Party]:
        return self._parties

    def calls(self, names, step, msg, kw):
        for name in names:
            try:
                reply = wire.call(self.runner.method, self._parties[name], step,
                             for_client(msg, self.runner.names.index(name)), kw)
            except Exception as e:  # noqa: BLE001 - any failure of one client's work
                yield name, ClientFailure(name, f"{type(e).__name__}: {e}", traceback.format_exc(), original=e)
                continue
            yield name, reply


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
            reply = wire.call(method, parties[name], step, to_device(msg, dev), kw)
            conn.send(("ok", name, to_device(reply, "cpu"), None))
        except BaseException as e:  # noqa: BLE001 - reported to the runner
            conn.send(("err", name, f"{type(e).__name__}: {e}", traceback.format_exc()))


class WorkerHost(ClientHost):
    """The clients live in ``train.client_workers`` worker processes (spawned); the server stays with the
    runner. Client ``k`` is hosted by worker ``k % N``; a worker serves its clients one after another, the
    workers run side by side. With several CUDA devices, worker ``i`` uses ``cuda:(i % count)``."""

    concurrent_safe = False  # one pipe per worker: requests go from one thread only

    def __init__(self, runner):
        import torch.multiprocessing as mp

        super().__init__(runner)
        r = runner
        n = min(r.cfg.train.client_workers, len(r.names))
        ctx = mp.get_context("spawn")
        threads = max(1, torch.get_num_threads() // n) if r.cfg.train.worker_threads == 0 \
            else r.cfg.train.worker_threads
        gpus = torch.cuda.device_count() if r.device.type == "cuda" else 0
        self.host, self.conns, self.procs = {}, [], []
        settings = r.cfg.settings()
        for i in range(n):
            hosted = {name: (k, r.sites[name], r.archs[name], r.data.clients[k])
                      for k, name in enumerate(r.names) if k % n == i}
            device = f"cuda:{i % gpus}" if gpus > 1 else str(r.device)
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker_main, args=(child, settings, hosted, r.data.public, device, threads),
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

    def calls(self, names, step, msg, kw):
        names_all = self.runner.names
        pending = {i: [] for i in range(len(self.conns))}
        for name in names:
            pending[self.host[name]].append(name)
        out = to_device(msg, "cpu") if not isinstance(msg, PerClient) else None
        for i, queue in pending.items():  # each worker gets its requests in index order
            for name in queue:
                part = out if out is not None else to_device(for_client(msg, names_all.index(name)), "cpu")
                self.conns[i].send((name, step, part, kw))
        waiting = {self.conns[i]: len(q) for i, q in pending.items() if q}
        while waiting:
            for conn in wait(list(waiting)):
                status, name, payload, trace = conn.recv()
                waiting[conn] -= 1
                if not waiting[conn]:
                    del waiting[conn]
                if status == "ok":
                    yield name, to_device(payload, self.runner.device)
                else:
                    yield name, ClientFailure(name, payload, trace)

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
