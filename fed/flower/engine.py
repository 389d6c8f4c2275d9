"""SimulationHost: the clients are Flower SuperNodes of a simulation (Ray backend); the server party
and the method's protocol stay with the runner, in this process.

``python train.py --engine flower-sim`` (``fed.core.runner.make_runner(..., engine="flower-sim")``). The
run starts ``flwr.simulation.run_simulation`` on a thread with a ServerApp whose ``main`` hands its
``Grid`` to this host and waits until it closes; the host then carries every client call as a
Flower Message through that Grid (:meth:`FlowerHost.calls`: push, then pull the replies as they
arrive). A node is a site (:mod:`fed.flower.site`): its first message (``hello``) asks who it is
(site, architecture), so the runner learns which node is which client from the nodes themselves, as it
would in a deployment; the second (``setup``) carries the run's settings and the client's part of the
split, which the site resolves in its own data root.

``train.client_workers`` sets the number of Ray actors (processes that serve the nodes' messages; 0
or 1: one), ``train.worker_threads`` their torch threads (0: this process's threads divided by the
actors). With one actor every site is always served by the same process, which keeps its party in
memory; the state goes to the site's disk at the run's save points (persistence ``"save_state"``).
With several actors a site's messages may land on any of them, so every ``train`` message also
writes the site's state within the round to its disk (persistence ``"message"``), where the next
process reads it.

Bytes: ``bytes`` (``up``/``down`` per client, the protocol's accounting of the method's messages) gets
``wire_up``/``wire_down``: Flower's own size (``count_bytes`` of the records) of the same messages,
and ``ctl_up``/``ctl_down``: that of the runner's party calls (round start/end, evaluation, state
saving, checkpoint weights) sent since the round began.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import torch
from flwr.common.constant import ErrorCode

from fed.core.calls import PARTY_CALLS, ClientFailure, to_device
from fed.core.hosts import ClientHost
from fed.core.method import for_client
from utils import timeline

from .codec import content_bytes, decode_payload, encode_kw, encode_payload
from .site import HELLO, LOST_ERRORS, SETUP, TRACE, make_client_app, write_node

SITES_DIR = "sites"  # <run>/sites/<client>: the simulated sites' disks
#: party calls that only read a party (Flower message type "query"), with a method's ``read_only`` steps;
#: every other step is "train"
READ_ONLY = {"evaluate", "weights", "end_round", "save_state", "test_weights", "keep_weights", "kept_weights"}
START_TIMEOUT_S = 600.0
RECOVER_TIMEOUT_S = 30.0  # how long a node that may be a lost site is given to answer, without train.site_timeout_s
#: Flower's error codes that mean the site is gone: its node is down, its reply will never come, the
#: process serving the message died (killed, out of memory), or the message or its reply's objects expired
#: before they arrived (a site killed while it uploaded its reply)
LOST_CODES = tuple(getattr(ErrorCode, c) for c in ("NODE_UNAVAILABLE", "REPLY_MESSAGE_UNAVAILABLE",
                                                     "CLIENT_APP_CRASHED", "MESSAGE_UNAVAILABLE"))



class _Simulation:
    """``run_simulation`` on a thread; :meth:`start` returns the ServerApp's Grid once every node is up."""

    def __init__(self, num_nodes: int, actors: int, gpus: int, sites_root: str):
        from flwr.serverapp import ServerApp

        self.num_nodes = num_nodes
        self.handoff: "queue.Queue" = queue.Queue()
        self.done = threading.Event()
        self.error: Optional[BaseException] = None
        app = ServerApp()

        @app.main()
        def main(grid, context) -> None:  # the ServerApp lends its Grid to the runner until it closes
            self.handoff.put(grid)
            self.done.wait()

        self.server_app = app
        self.client_app = make_client_app(sites_root)
        self.backend = {"client_resources": {"num_cpus": 1, "num_gpus": min(1.0, gpus / actors) if gpus else 0.0},
                        "init_args": {"num_cpus": actors, "num_gpus": gpus, "include_dashboard": False,
                                      "logging_level": "ERROR", "log_to_driver": False}}
        self.thread = threading.Thread(target=self._run, name="flower-simulation", daemon=True)

    def _run(self) -> None:
        from flwr.simulation import run_simulation

        try:
            run_simulation(server_app=self.server_app, client_app=self.client_app, num_supernodes=self.num_nodes,
                           backend_config=self.backend)
        except BaseException as e:  # noqa: BLE001 - reported by start() or alive()
            self.error = e

    def start(self):
        logging.getLogger("flwr").setLevel(logging.ERROR)  # no deprecation banner for run_simulation
        warnings.filterwarnings("ignore", message=".*accelerator visible devices.*", category=FutureWarning)
        self.thread.start()
        end = time.time() + START_TIMEOUT_S
        grid = None
        while time.time() < end:
            if grid is None:
                try:
                    grid = self.handoff.get(timeout=0.2)
                except queue.Empty:
                    pass
            elif len(list(grid.get_node_ids())) >= self.num_nodes:
                return grid
            else:
                time.sleep(0.1)
            if not self.thread.is_alive():
                raise RuntimeError(f"the Flower simulation stopped while starting: {self.error!r}")
        raise RuntimeError(f"the Flower simulation did not bring up {self.num_nodes} nodes in {START_TIMEOUT_S:.0f} s")

    def alive(self) -> bool:
        return self.thread.is_alive() and not self.done.is_set()

    def stop(self, timeout: float = 120.0) -> None:
        self.done.set()
        if self.thread.is_alive():
            self.thread.join(timeout)


class FlowerHost(ClientHost):
    """Client calls as Flower Messages to the nodes on a Grid; :meth:`open_grid` says which Grid."""

    concurrent_safe = False  # one Grid, used from this thread only
    poll_s = 0.01

    def __init__(self, runner):
        super().__init__(runner)
        r = runner
        self.cfg, self.names, self.sites, self.archs = r.cfg, r.names, r.sites, r.archs
        K = len(self.names)
        self.actors = max(1, min(self.cfg.train.client_workers, K))
        self.persist = "message" if self.actors > 1 else "save_state"
        threads = self.cfg.train.worker_threads or max(1, torch.get_num_threads() // self.actors)
        self.run_key = uuid.uuid4().hex
        self.version = {n: 0 for n in self.names}  # train messages sent to each site in this run
        self.served = {n: set() for n in self.names}  # the processes that served each site
        self.restores = {n: 0 for n in self.names}  # messages a process answered from the site's disk
        self.node: Dict[str, int] = {}
        self.keeps: Dict[str, bool] = {}  # sites whose long-lived process keeps their party (fed.flower.sited)
        t = time.perf_counter()
        self.grid = self.open_grid()
        try:
            self._setup(threads)
        except BaseException:
            self.close()
            raise
        if r.logger is not None:
            kept = [n for n in self.names if self.keeps.get(n)]
            how = ('after every train message' if self.persist == 'message' else 'at the save points')
            if kept and self.persist == "message":
                how = (f"at the save points at {len(kept)} site(s) whose own process keeps their party"
                       + (", after every train message at the others" if len(kept) < K else ""))
            r.logger.info(f"{self.describe(K, threads)}, client state persisted {how}"
                          f"; up in {time.perf_counter() - t:.1f} s")

    def open_grid(self):
        raise NotImplementedError

    def describe(self, K: int, threads: int) -> str:
        raise NotImplementedError

    def state_kw(self, folder: Path, rnd: int) -> dict:
        """A site writes and reads its state on its own disk (``<site>/state``): only the round crosses."""
        return {"rnd": rnd}

    #: a site keeps its checkpoint weights on its own disk (``<site>/kept``); they cross once, at the end
    #: (a model is tens of MB: sent each time a client improves, they were most of a deployment's round)
    keeps_weights = True

    def kept_kw(self, rnd: int) -> dict:
        return {"rnd": rnd}

    def _send(self, node_calls: dict, kind: str, timeout: float = START_TIMEOUT_S) -> list:
        """``{node: call}`` as messages of Flower type ``kind``; the replies that came within ``timeout``."""
        from flwr.app import ConfigRecord, Message, RecordDict

        msgs = [Message(RecordDict({"call": ConfigRecord(c)}), dst_node_id=n, message_type=kind)
                for n, c in node_calls.items()]
        return list(self.grid.send_and_receive(msgs, timeout=timeout))

    def _hello(self, nodes, names, problems: list, timeout: float = START_TIMEOUT_S) -> Dict[str, int]:
        """Ask ``nodes`` who they are; ``{client name: node}`` of those that are one of ``names`` (every
        other answer is a problem, listed)."""
        found: Dict[str, int] = {}
        client = {s: n for n, s in self.sites.items()}
        for reply in self._send({n: {"step": HELLO, "run": self.run_key, "version": 0} for n in nodes}, "query", timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                problems.append(f"node {node}: {reply.error.reason.partition(TRACE)[0]}")
                continue
            who = decode_payload(reply.content)
            name = client.get(who["site"])
            if name is None:
                problems.append(f"node {node} is site {who['site']!r}, which is not one of the run's data.clients "
                                f"({', '.join(map(repr, client))})")
            elif name not in names:
                problems.append(f"node {node} says it is site {who['site']!r} ({name}), which node {self.node.get(name)} is")
            elif name in found:
                problems.append(f"nodes {found[name]} and {node} both say they are site {who['site']!r}")
            elif who["arch"] != self.archs[name]:
                problems.append(f"node {node} (site {who['site']!r}, {name}) runs arch {who['arch']!r} but the run's "
                                f"models.clients gives {self.archs[name]!r}: make the site's node config and the "
                                f"run's config agree")
            else:
                found[name] = node
                self.keeps[name] = bool(who.get("keeps", False))
        return found

    def _setup_sites(self, nodes: Dict[str, int], problems: list, timeout: float = START_TIMEOUT_S) -> List[str]:
        """``setup`` to each client's node: the run's settings, its name and index and its part of the
        split; the clients whose site answered with its file counts."""
        split = json.loads(Path(self.runner.data.split_path).read_text())
        public = self.cfg.data.public
        base = {"step": SETUP, "run": self.run_key, "version": 0, "settings": json.dumps(self.cfg.settings()),
                "device": "cuda" if self.runner.device.type == "cuda" else str(self.runner.device),
                "threads": self.threads, "persist": self.persist}
        calls = {node: {**base, "name": n, "index": self.names.index(n),
                        # a site served by one long-lived process keeps its round in memory
                        "persist": "save_state" if self.keeps.get(n) else self.persist,
                        "split": json.dumps({public: split[public], self.sites[n]: split[self.sites[n]]}),
                        # the data this process read is verified already (one machine: the simulation)
                        "verify": bool(self.cfg.data.verify and self.runner.data.clients[self.names.index(n)] is None)}
                 for n, node in nodes.items()}
        by_node = {v: n for n, v in nodes.items()}
        done, answered = [], set()
        for reply in self._send(calls, "train", timeout):
            name = by_node[reply.metadata.src_node_id]
            answered.add(name)
            if reply.has_error():  # bad data: the problems; anything else: with the site's traceback
                reason, _, trace = reply.error.reason.partition(TRACE)
                problems.append(f"{name} (site {self.sites[name]!r}): {reason}"
                                + ("" if reason.startswith("DataError") else f"\n{trace}"))
            else:
                self.runner.file_counts[name] = decode_payload(reply.content)["files"]
                self.version[name] = 0  # a site that is set up holds its party as built from the config
                done.append(name)
        late = [n for n in nodes if n not in answered]
        if late:
            problems.append(f"no setup reply from {', '.join(late)} in {timeout:.0f} s")
        return done

    def _setup(self, threads: int) -> None:
        """``hello``: every node says which site it is and its architecture; then ``setup``: each gets the
        run's settings, its client name and index and its part of the split (the names of its own files
        and of the public set), resolves them in its own data root, verifies them where this process has
        not, and answers its number of files per split. Every problem of every node is reported at once."""
        self.threads = threads
        problems: list = []
        self.node.update(self._hello(list(self.grid.get_node_ids()), self.names, problems))
        missing = [f"{n} (site {self.sites[n]!r})" for n in self.names if n not in self.node]
        if missing:
            problems.append(f"no node is {', '.join(missing)}")
        if problems:
            raise RuntimeError("Flower setup failed: " + "; ".join(problems))
        self._setup_sites(dict(self.node), problems)
        if problems:
            raise RuntimeError("Flower setup failed: " + "; ".join(problems))

    def recover(self, names: List[str]) -> List[str]:
        """Lost sites that are back: every node on the grid that no site in the run holds is asked who it
        is (``hello``); each that is one of ``names`` (a lost site, same site name and architecture) is
        set up again for this run. Nodes that do not answer within ``train.site_timeout_s`` (30 s if
        unset) are left alone. Until every one of ``names`` is back, new nodes are looked for every 0.5 s
        for ``train.rejoin_wait_s`` seconds. Returns the clients set up again (their party as built from
        the config: the runner then loads their own last saved state)."""
        end = time.time() + self.cfg.train.rejoin_wait_s
        timeout = self.cfg.train.site_timeout_s or RECOVER_TIMEOUT_S
        asked, back, problems = set(), [], []
        while True:
            held = {self.node[n] for n in self.names if n not in names and n in self.node}
            fresh = [i for i in self.grid.get_node_ids() if i not in held and i not in asked]
            if fresh:
                asked.update(fresh)
                found = self._hello(fresh, [n for n in names if n not in back], problems, timeout)
                for n in self._setup_sites(found, problems, timeout) if found else []:
                    self.node[n] = found[n]
                    back.append(n)
            if len(back) == len(names) or time.time() >= end:
                break
            time.sleep(0.5)
        if problems and self.runner.logger is not None:
            self.runner.logger.log.warning("while looking for lost sites: " + "; ".join(problems))
        return back

    # --- carrying steps as messages ----------------------------------------------------------------
    def _message(self, name: str, step: str, msg, kw: dict):
        from flwr.app import ConfigRecord, Message, RecordDict

        kind = "query" if step in READ_ONLY or step in self.runner.method.read_only else "train"
        call = ConfigRecord({"step": step, "run": self.run_key, "version": self.version[name]})
        content = RecordDict({"call": call})
        kwr = encode_kw(kw, call)
        if kwr is not None:
            content["kw"] = kwr
        encode_payload(to_device(for_client(msg, self.names.index(name)), "cpu"), content)
        if kind == "train":
            self.version[name] += 1
        return Message(content, dst_node_id=self.node[name], message_type=kind,
                       group_id=str(self.runner.round) if self.runner.round >= 0 else "")

    def _count(self, name: str, step: str, down: int, up: int) -> None:
        b = self.runner.bytes.get(name)
        if b is None:
            return
        kind = "ctl" if step in PARTY_CALLS else "wire"
        b[f"{kind}_down"] = b.get(f"{kind}_down", 0) + down
        b[f"{kind}_up"] = b.get(f"{kind}_up", 0) + up

    def calls(self, names: List[str], step: str, msg, kw: dict):
        """Send ``step`` to every site of ``names`` that is not lost; yield ``(name, reply or ClientFailure)``
        as they come. A site that does not answer within ``train.site_timeout_s``, or whose node Flower
        reports gone, is lost (:meth:`fed.core.runner.Runner.lose`) and yields nothing."""
        names = [n for n in names if n not in self.runner.lost]
        if not names:
            return
        msgs = [self._message(n, step, msg, kw) for n in names]
        sizes = [content_bytes(m.content) for m in msgs]
        ids = list(self.grid.push_messages(msgs))
        if len(ids) != len(msgs):
            raise RuntimeError(f"Flower accepted {len(ids)} of {len(msgs)} messages for step {step!r}")
        pending = {i: (n, s) for i, n, s in zip(ids, names, sizes)}
        timeout, sent = self.cfg.train.site_timeout_s, time.time()
        while pending:
            got = list(self.grid.pull_messages(list(pending)))
            for reply in got:
                name, down = pending.pop(reply.metadata.reply_to_message_id)
                timeline.mark(who="server", step=step, site=name, round=self.runner.round, sent=sent, got=time.time())
                if reply.has_error():
                    self._count(name, step, down, 0)
                    reason, _, trace = reply.error.reason.partition(TRACE)
                    if reply.error.code in LOST_CODES or reason.startswith(LOST_ERRORS):
                        self.runner.lose(name, f"Flower error {reply.error.code} on {step!r}: {reason}")
                        continue
                    yield name, ClientFailure(name, reason, trace)
                else:
                    up = content_bytes(reply.content)
                    self._count(name, step, down, up)
                    limit = self.runner.checker.max_bytes(name, step, kw)
                    if up > limit:  # refused before it is decoded
                        yield name, ClientFailure(name, f"BadReply: its reply to {step!r} is refused: {up} bytes, more "
                                                        f"than the step can produce ({limit})")
                        continue
                    call = reply.content["call"]
                    self.served[name].add(int(call["pid"]))
                    self.restores[name] += bool(call["restored"])
                    yield name, to_device(decode_payload(reply.content), self.runner.device)
            if pending and not got:
                sim = getattr(self, "_sim", None)
                if sim is not None and not sim.alive():
                    raise RuntimeError(f"the Flower simulation stopped while {', '.join(n for n, _ in pending.values())} "
                                       f"ran {step!r}: {sim.error!r}")
                if timeout and time.time() - sent > timeout:
                    late, pending = [n for n, _ in pending.values()], {}
                    for name in late:
                        self.runner.lose(name, f"no reply to {step!r} in {timeout:g} s")
                    break
                time.sleep(self.poll_s)


class SimulationHost(FlowerHost):
    """The sites are the nodes of a Flower simulation started here (``--engine flower-sim``)."""

    def describe(self, K: int, threads: int) -> str:
        return (f"Flower simulation: {K} nodes, {self.actors} Ray actor(s) of {threads} torch thread(s), "
                f"sites' disks in {self.sites_root}")

    def open_grid(self):
        """The simulation: write each simulated node's declaration (``node.json``: site, arch, data root)
        on its disk, start the nodes, return the ServerApp's Grid. (A deployment connects to its
        SuperLink's Grid instead: the nodes then declare themselves in their node configs.)"""
        self.sites_root = Path(self.cfg.output.dir) / SITES_DIR
        for name in self.names:  # what a deployed node's node config declares
            write_node(self.sites_root / name, self.sites[name], self.archs[name], self.cfg.data.root)
        gpus = torch.cuda.device_count() if self.runner.device.type == "cuda" else 0
        self._sim = _Simulation(len(self.names), self.actors, gpus, str(self.sites_root))
        try:
            return self._sim.start()
        except BaseException:
            self._sim.stop()
            raise

    def close(self) -> None:
        sim = getattr(self, "_sim", None)
        if sim is None:
            return
        if self.runner.logger is not None and self.node:
            self.runner.logger.info("Flower sites: " + "; ".join(
                f"{n} served by {len(self.served[n])} process(es), {self.restores[n]} time(s) from its disk"
                for n in self.names))
        sim.stop()
