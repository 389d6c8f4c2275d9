"""The federation on a Flower *deployment* (flwr 1.42): a SuperLink, one SuperNode per site, ``flwr run``.

Two halves:

- **The Flower App** (``flower_app/`` of this repository: ``pyproject.toml`` and a module that imports
  :data:`server_app` and :data:`client_app` from here). ``flwr run flower_app <connection>`` packs it as a
  FAB and submits it to the SuperLink, whose SuperExec starts ``flwr-serverapp`` with the app; each
  SuperNode starts a fresh ``flwr-clientapp`` process *for every message*, so a site keeps its state
  on its own disk after every ``train`` message (persistence ``"message"``, :mod:`fed.flower.site`).
  The FAB carries only the entry points: this project must be importable where the SuperLink and the
  SuperNodes run (``PYTHONPATH=<repo>``, same version everywhere).
  The ServerApp's ``main`` runs :func:`fed.core.run.train` with the host :func:`grid_host` makes, a
  :class:`DeployedHost` whose Grid is the SuperLink's (the run's config is a file named
  by the run config key ``config``; ``resume=true`` continues its run directory). It writes
  ``status.json`` (``{"ok": true, "results": ...}`` or ``{"ok": false, "error": ...}``) beside that file.
- **The loopback launcher** (:func:`deploy`, ``python -m fed.flower.deploy``): gives the server a folder
  with the public set and the split file only (:func:`provision`), starts ``flower-superlink`` and one
  ``flower-supernode`` per site (``--node-config "site-dir='...' site='...' arch='...' data-root='...'"``:
  each site declares who it is and reads its own files) as separate processes, every port on
  127.0.0.1, runs ``flwr run`` with a private ``FLWR_HOME`` (its ``config.toml`` names the SuperLink),
  waits for ``status.json``, copies the services' logs into ``<run>/deploy/`` and stops every process it
  started (each in its own process group, by the recorded pids: SIGTERM, then SIGKILL).

Layout of ``--workdir W``: ``W/run`` (the run directory, as ``train.py`` writes it), ``W/server`` (the
server's data: the public set and ``split.json``), ``W/sites/client{k}`` (the sites' disks),
``W/flower`` (``FLWR_HOME``, the resolved ``config.yaml``, the nodes' configs ``sites.json``,
``status.json``, logs).
The final test runs at the sites, as in ``train.py``: each site is sent its best-validation weights,
scores them on its own test split and returns the per-image rows (its overlays stay in its folder); the
server reads no site's files.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional

from . import engine as _engine  # noqa: F401  (sets Flower's offline environment first)
from .engine import FlowerHost
from .site import make_client_app
from .sited import INFO as SITED_INFO, KEY as SITED_KEY
from .supernode import DEFAULT_HEARTBEAT_S, DEFAULT_POLL_S, PULL_WAIT_S, quick_pulls

REPO = Path(__file__).resolve().parents[2]
APP_DIR = REPO / "flower_app"
STATUS = "status.json"
NODE_WAIT_S = 120.0
#: environment of every Flower process started here: offline, and this project importable
OFFLINE_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
               # the SuperExecs look for new work every 0.1 s instead of every 1 s (Flower's default)
               "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
               "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_USAGE_STATS_ENABLED": "0"}

# --- the ServerApp side ------------------------------------------------------------------------------

class DeployedHost(FlowerHost):
    """The clients are the SuperNodes connected to the SuperLink whose Grid the ServerApp was given
    (:func:`grid_host` makes the host class of one Grid)."""

    #: the server of a deployment holds only the public set (and the split file): each site resolves and
    #: verifies its own files when it is set up
    reads_client_data = False
    grid = None  # set by grid_host
    #: each pull of the replies is a request to the SuperLink (TLS, HTTP): every 0.05 s, not 0.01 s as in
    #: the simulation, whose Grid is in memory (on the loopback deployment the polls share the sites' cores)
    poll_s = 0.05
    transport = "unknown"  # "tls" or "insecure": what the launcher started (grid_host)

    def open_grid(self):
        grid = type(self).grid
        if grid is None:
            raise RuntimeError("a deployment's host needs the SuperLink's Grid: use fed.flower.deploy.grid_host(grid)")
        self.persist = "message"  # every message is served by a fresh flwr-clientapp process
        end = time.time() + NODE_WAIT_S
        while len(list(grid.get_node_ids())) < len(self.names):
            if time.time() > end:
                raise RuntimeError(f"only {len(list(grid.get_node_ids()))} of {len(self.names)} SuperNodes "
                                   f"connected in {NODE_WAIT_S:.0f} s")
            time.sleep(0.5)
        return grid

    def describe(self, K: int, threads: int) -> str:
        how = {"tls": "TLS, only registered SuperNode keys admitted",
               "insecure": "INSECURE: no TLS, no SuperNode authentication (--insecure)"}.get(self.transport,
                                                                                        "transport not stated")
        return (f"Flower deployment ({how}): {K} SuperNodes on the SuperLink, sites' processes of {threads} torch "
                f"thread(s), each site's disk its node's site-dir")



def grid_host(grid, transport: str = "unknown") -> type:
    """The host class whose clients are the SuperNodes on ``grid`` (what the ServerApp's ``main`` was
    given): ``train(cfg, engine=grid_host(grid))``; ``transport`` ("tls", "insecure") goes into the log."""
    return type("DeployedHostOnGrid", (DeployedHost,), {"grid": grid, "transport": transport})


def _server_main(grid, context) -> None:
    from fed import load_config
    from fed.core.run import train

    rc = context.run_config
    quick_pulls(float(rc.get("pull-wait-s", PULL_WAIT_S)))  # the replies' objects, without Flower's 1 s waits
    cfg_path = Path(str(rc["config"]))
    status = cfg_path.parent / STATUS
    try:
        if bool(rc.get("resume", False)):
            run = Path(load_config(cfg_path).output.dir)
            cfg = load_config(run / "config.yaml", extra={"output": {"dir": str(run)}})
        else:
            cfg = load_config(cfg_path)
        host = grid_host(grid, str(rc.get("transport", "unknown")))
        results = train(cfg, resume=bool(rc.get("resume", False)), progress=False, engine=host)
        out = {"ok": True, "results": results}
    except BaseException as e:  # noqa: BLE001 - reported to the launcher through status.json
        out = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
    from utils.io import atomic_write_text

    atomic_write_text(status, json.dumps(out, default=str))


def _make_server_app():
    from flwr.serverapp import ServerApp

    app = ServerApp()
    app.main()(_server_main)
    return app


server_app = _make_server_app()
client_app = make_client_app(None)  # a deployed node declares its folder, site, arch and data root in its node config


# --- the loopback launcher ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_stat(pid: int):
    """``(ppid, state, start time)`` of a live process, or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[0], fields[19]


class Services:
    """Processes started here (each the leader of its own process group) and every descendant seen.

    Flower's services start helpers (SuperExec, ``flwr-serverapp``, ``flwr-clientapp``) that may leave
    the group or outlive their parent, so :meth:`track` records each descendant ``(pid, start time)``
    while they run and :meth:`stop` ends those too, by their recorded pids (a reused pid is left alone).
    """

    def __init__(self, env: dict, logs: Path):
        self.env, self.logs = env, logs
        self.procs: List[subprocess.Popen] = []
        self.names: Dict[int, str] = {}
        self.seen: Dict[int, str] = {}  # pid -> start time, every process started here or below
        self.argv: Dict[str, List[str]] = {}  # what each service was started with (restart)
        self.lock = threading.RLock()  # a test may kill a site from another thread

    def start(self, name: str, argv: List[str]) -> subprocess.Popen:
        self.argv[name] = list(argv)
        log = open(self.logs / f"{name}.log", "ab")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=str(REPO),
                             start_new_session=True)
        log.close()
        self.procs.append(p)
        self.names[p.pid] = name
        st = _proc_stat(p.pid)
        if st is not None:
            self.seen[p.pid] = st[2]
        return p

    def track(self) -> None:
        """Record the live descendants of the processes recorded so far."""
        with self.lock:
            self._track()

    def _track(self) -> None:
        stats = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                st = _proc_stat(int(d.name))
                if st is not None:
                    stats[int(d.name)] = st
        grew = True
        while grew:
            grew = False
            for pid, (ppid, _, start) in stats.items():
                if pid not in self.seen and ppid in self.seen:
                    self.seen[pid] = start
                    grew = True

    def remaining(self) -> List[int]:
        """Recorded processes still running (zombies count as ended)."""
        out = []
        with self.lock:
            seen = list(self.seen.items())
        for pid, start in seen:
            st = _proc_stat(pid)
            if st is not None and st[2] == start and st[1] != "Z":
                out.append(pid)
        return out

    def pids(self) -> Dict[str, int]:
        return {self.names[p.pid]: p.pid for p in self.procs}  # each service's latest start

    def dead(self) -> List[str]:
        latest = {self.names[p.pid]: p for p in self.procs}
        return [f"{n} (exit {p.returncode})" for n, p in latest.items() if p.poll() is not None]

    def kill(self, name: str, sig=signal.SIGKILL) -> None:
        """Kill one service and its descendants (as a site that dies would)."""
        self.track()
        p = [p for p in self.procs if self.names[p.pid] == name][-1]  # its latest start
        below = [q for q in self.remaining() if self._below(q, p.pid)]
        _signal_group(p.pid, sig)
        for q in below:
            _signal_pid(q, sig)
        p.wait(timeout=30)

    def restart(self, name: str) -> subprocess.Popen:
        """Start a service again, as it was started (a site that comes back)."""
        return self.start(name, self.argv[name])

    def _below(self, pid: int, root: int) -> bool:
        while pid not in (0, 1):
            if pid == root:
                return True
            st = _proc_stat(pid)
            if st is None:
                return False
            pid = st[0]
        return False

    def stop(self, grace_s: float = 10.0) -> None:
        self.track()
        for p in reversed(self.procs):
            _signal_group(p.pid, signal.SIGTERM)
        for q in self.remaining():
            _signal_pid(q, signal.SIGTERM)
        end = time.time() + grace_s
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, end - time.time()))
            except subprocess.TimeoutExpired:
                pass
        while self.remaining() and time.time() < end:
            time.sleep(0.2)
        for p in self.procs:  # the groups, then every recorded process that is still there
            _signal_group(p.pid, signal.SIGKILL)
        for q in self.remaining():
            _signal_pid(q, signal.SIGKILL)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        end = time.time() + 10
        while self.remaining() and time.time() < end:
            time.sleep(0.2)


def _signal_group(pgid: int, sig) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_pid(pid: int, sig) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


SITES_FILE = "sites.json"  # W/flower/sites.json: each loopback site's node config, for --resume


def provision(cfg, workdir: Path) -> List[dict]:
    """Lay out the loopback federation as separate parties would hold it; returns each site's node config.

    The run's split file is made where every site's folder is at hand (as a federation's split is drawn
    up); the server gets a folder of its own, ``W/server``, with a copy of the public set and of the split
    file only, and ``cfg.data`` is pointed there, so the ServerApp cannot read any site's files. Each site
    is declared by its node config: its folder ``W/sites/client{k}``, its site name, architecture and data
    root (here the config's ``data.root``), from which it resolves and verifies its own files.
    ``cfg.data`` then names the server's folder (``root``, ``split``; no ``synthetic`` generation)."""
    import shutil

    from datasets.federation import load_federation

    files = load_federation(cfg, progress=False)
    server = workdir / "server"
    pub = server / "data" / cfg.data.dataset / cfg.data.public
    for kind in ("image", "mask"):
        (pub / kind).mkdir(parents=True, exist_ok=True)
    for image, mask, _ in files.public:
        shutil.copy2(image, pub / "image" / image.name)
        shutil.copy2(mask, pub / "mask" / mask.name)
    shutil.copy2(files.split_path, server / "split.json")
    nodes = [{"site-dir": str(workdir / "sites" / f"client{k}"), "site": site, "arch": arch,
              "data-root": str(Path(cfg.data.root).resolve())}
             for k, (site, arch) in enumerate(zip(cfg.data.clients, cfg.models.clients))]
    # the server's folder is a copy, not synthetic data to generate
    cfg.data.root, cfg.data.split, cfg.data.synthetic = str(server / "data"), str(server / "split.json"), None
    return nodes


def node_config(node: dict) -> str:
    """``--node-config`` of a SuperNode: ``key='value'`` pairs (no value may hold a quote)."""
    bad = [v for v in node.values() if "'" in str(v) or '"' in str(v)]
    if bad:
        raise ValueError(f"a node config value holds a quote, which Flower's --node-config cannot carry: {bad}")
    return " ".join(f"{k}='{v}'" for k, v in node.items())


def service_env(home: Path, base: Optional[dict] = None) -> dict:
    """The environment of every Flower service started here: offline, ``FLWR_HOME``, this project first on
    ``PYTHONPATH`` and the directory of the running Python first on ``PATH``, so that the services and the
    helpers they start themselves (the SuperLink starts ``flower-superexec`` by name) are those of this
    Python's environment, activated or not (a scheduler or a service unit runs ``.venv/bin/python``)."""
    base = dict(os.environ if base is None else base)
    first = lambda head, key: os.pathsep.join([head] + [p for p in base.get(key, "").split(os.pathsep)  # noqa: E731
                                                        if p and p != head])
    return {**base, **OFFLINE_ENV, "FLWR_HOME": str(home), "PYTHONPATH": first(str(REPO), "PYTHONPATH"),
            "PATH": first(str(Path(sys.executable).parent), "PATH")}


def deploy(cfg, workdir: Path, timeout_s: float = 600.0, resume: bool = False, on_start=None,
           poll_s: float = 0.5, insecure: bool = False, intruders: int = 0, site_processes: bool = True,
           node_poll_s: float = DEFAULT_POLL_S, heartbeat_s: float = DEFAULT_HEARTBEAT_S, warm: bool = True,
           pull_wait_s: float = PULL_WAIT_S) -> dict:
    """Run ``cfg`` on a loopback deployment in ``workdir``; returns ``status.json`` plus ``pids`` (the
    services started), ``transport`` and ``wall_s``. ``on_start(services, status_path)`` is called once
    ``flwr run`` has submitted the run (tests use it to kill a site). Every started process is stopped
    on return.

    By default every connection is TLS (a private CA and a certificate for 127.0.0.1 made for this
    deployment, :func:`fed.flower.tls.make_tls`) and only the sites' SuperNodes may join: each gets a
    fresh key pair, whose public key is registered with the SuperLink (``--enable-supernode-auth``)
    before the SuperNode starts. ``insecure``: plain connections, any node may join (said in the log).
    ``intruders``: as many extra SuperNodes that claim to be site 0 with keys the SuperLink was never
    given (a test of the authentication: they are refused). ``site_processes``: start each site's
    long-lived process (:mod:`fed.flower.sited`), which keeps its party loaded between messages; without
    it every message is served by the ``flwr-clientapp`` process Flower starts for it. ``node_poll_s``:
    the longest a SuperNode waits before asking its SuperLink for work again (:mod:`fed.flower.supernode`;
    3 is Flower's own ``flower-supernode``); ``heartbeat_s``: a SuperNode silent for twice this is gone, and
    only then may it join again (Flower's own: 30); ``warm``: each SuperNode serves its ClientApp tasks in
    one process (:mod:`fed.flower.warm`) instead of a fresh ``flwr-clientapp`` per message; ``pull_wait_s``:
    every process that receives messages (ServerApp, SuperNodes, warm processes) asks again for a
    message's objects that are not there yet after this long (:func:`fed.flower.supernode.quick_pulls`;
    Flower's own: 1)."""
    import yaml

    t0 = time.time()
    workdir = Path(workdir).resolve()
    fl = workdir / "flower"
    logs = fl / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    status = fl / STATUS
    status.unlink(missing_ok=True)
    cfg_path = fl / "config.yaml"
    if not resume:
        cfg.output.dir = str(workdir / "run")
        from fed.core.run import prepare_run_dir

        prepare_run_dir(cfg, dry_run=True)  # refuse an occupied run directory before starting anything
        if cfg.train.worker_threads == 0:  # the sites share this machine's cores (real sites: their own)
            cfg.train.worker_threads = max(1, (os.cpu_count() or 1) // len(cfg.data.clients))
        nodes = provision(cfg, workdir)
        cfg_path.write_text(yaml.safe_dump(cfg.settings(), sort_keys=False))
        (fl / SITES_FILE).write_text(json.dumps(nodes, indent=1))
    else:
        nodes = json.loads((fl / SITES_FILE).read_text())
    home = fl / "home"
    home.mkdir(exist_ok=True)
    link = free_port()
    transport = "insecure" if insecure else "tls"
    secure = _secure_material(fl, len(nodes), intruders) if not insecure else None
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link}"\n'
        + ('insecure = true\n' if insecure else f'root-certificates = "{secure["tls"]["ca"]}"\n'))
    (logs / "launcher.log").write_text(
        "INSECURE deployment (--insecure): no TLS, no node authentication; any process that reaches the "
        "SuperLink's port may join as a site\n" if insecure else
        f"TLS deployment: private CA {secure['tls']['ca']} (made for this deployment), {len(nodes)} site key(s) "
        f"registered, SuperNode authentication on\n")
    if insecure:
        print(f"WARNING: insecure deployment (no TLS, no node authentication) in {workdir}", file=sys.stderr)
    env = service_env(home)
    svc = Services(env, logs)
    bindir = Path(sys.executable).parent
    exe = lambda n: str(bindir / n) if (bindir / n).exists() else n  # noqa: E731
    out: dict = {}
    try:
        if insecure:
            svc.start("superlink", [exe("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(link)])
        else:
            t = secure["tls"]
            svc.start("superlink", [exe("flower-superlink"), "--ssl-ca-certfile", str(t["ca"]), "--ssl-certfile",
                                    str(t["cert"]), "--ssl-keyfile", str(t["key"]), "--enable-supernode-auth",
                                    "--host", "127.0.0.1", "--port", str(link)])
        _wait_for(lambda: _listens(link), f"the SuperLink on 127.0.0.1:{link}", svc, 60)
        if not insecure:
            out["node_ids"] = [_register(exe, env, secure["nodes"][k]["public"], logs) for k in range(len(nodes))]
        for k, node in enumerate(nodes):  # each site's long-lived process, which keeps its party loaded
            if site_processes:
                for f in (SITED_INFO, SITED_KEY):  # an earlier deployment's
                    (Path(node["site-dir"]) / f).unlink(missing_ok=True)
                svc.start(f"site{k}", [sys.executable, "-m", "fed.flower.sited", "--site-dir", node["site-dir"]])

        def supernode(key: int, node: dict) -> List[str]:  # the SuperNode with key pair ``key`` serving ``node``
            security = ["--insecure"] if secure is None else [
                "--root-certificates", str(secure["tls"]["ca"]),
                "--auth-supernode-private-key", str(secure["nodes"][key]["private"])]
            return [sys.executable, "-m", "fed.flower.supernode", "--poll-s", f"{node_poll_s:g}",
                    "--heartbeat-s", f"{heartbeat_s:g}", "--pull-wait-s", f"{pull_wait_s:g}",
                    *([] if warm else ["--cold"]), *security,
                    "--superlink", f"127.0.0.1:{link}", "--host", "127.0.0.1", "--port", str(free_port()),
                    "--node-config", node_config(node)]

        for k, node in enumerate(nodes):
            if site_processes:
                _wait_for(lambda: (Path(node["site-dir"]) / SITED_INFO).exists(), f"site {k}'s process", svc, 120,
                          spare=("intruder",))
            svc.start(f"supernode{k}", supernode(k, node))
        for i in range(intruders):  # claims to be site 0, with a key the SuperLink was never given
            svc.start(f"intruder{i}", supernode(len(nodes) + i, nodes[0]))
        cmd = [exe("flwr"), "run", str(APP_DIR), "loopback", "--run-config",
               f'config="{cfg_path}" resume={"true" if resume else "false"} transport="{transport}" '
               f'pull-wait-s={pull_wait_s:g}']
        sub = subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True, timeout=120)
        (logs / "flwr-run.log").write_text(sub.stdout + sub.stderr)
        if sub.returncode != 0:
            raise RuntimeError(f"flwr run failed ({sub.returncode}): {sub.stdout[-2000:]}{sub.stderr[-2000:]}")
        if on_start is not None:
            on_start(svc, status)
        end = t0 + timeout_s
        while not status.exists():
            if time.time() > end:
                raise TimeoutError(f"the deployment did not finish in {timeout_s:.0f} s (logs in {logs})")
            svc.track()
            dead = [d for d in svc.dead() if d.startswith("superlink")]
            if dead:  # the server's machine went down: the run's last committed round is kept (--resume)
                out = {"ok": False, "error": f"SuperLinkStopped: the SuperLink stopped: {dead} (logs in {logs}); "
                                             f"the run's last completed round is kept: continue with --resume"}
                break
            time.sleep(poll_s)
        else:
            out = json.loads(status.read_text())
    finally:
        out["pids"] = svc.pids()
        svc.stop()
        out["processes"] = len(svc.seen)
        out["remaining"] = svc.remaining()
        run = workdir / "run"
        if run.exists():
            (run / "deploy").mkdir(exist_ok=True)
            for f in logs.glob("*.log"):
                (run / "deploy" / f.name).write_bytes(f.read_bytes())
    out["transport"] = transport
    out["wall_s"] = round(time.time() - t0, 1)
    return out


def _secure_material(fl: Path, sites: int, intruders: int) -> dict:
    """This deployment's CA and SuperLink certificate, and a key pair per SuperNode (intruders last):
    all made now, in ``W/flower/secrets`` (replacing any earlier deployment's)."""
    import shutil

    from .tls import make_node_key, make_tls

    folder = fl / "secrets"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(mode=0o700)
    return {"tls": make_tls(folder / "tls"),
            "nodes": [make_node_key(folder / "keys", f"site{k}" if k < sites else f"intruder{k - sites}")
                      for k in range(sites + intruders)]}


def _register(exe, env: dict, public: Path, logs: Path) -> int:
    """Register a SuperNode's public key with the SuperLink (``flwr supernode register``); its node id."""
    sub = subprocess.run([exe("flwr"), "supernode", "register", str(public), "loopback", "--format", "json"],
                         env=env, cwd=str(REPO), capture_output=True, text=True, timeout=120)
    with open(logs / "register.log", "a") as f:
        f.write(sub.stdout + sub.stderr)
    try:
        got = json.loads(sub.stdout[sub.stdout.index("{"):])
    except ValueError:
        got = {}
    if sub.returncode != 0 or not got.get("success"):  # --format json exits 0 on failure: read "success"
        raise RuntimeError(f"flwr supernode register {public} failed ({sub.returncode}): "
                           f"{got.get('error-message') or (sub.stdout + sub.stderr)[-2000:]}")
    return int(got["node-id"])


def _wait_for(ready, what: str, svc: Services, timeout_s: float, spare=()) -> None:
    """Wait until ``ready()``; an error if it takes ``timeout_s`` or a started service (other than those
    whose names start with one of ``spare``) stops meanwhile."""
    end = time.time() + timeout_s
    while not ready():
        dead = [d for d in svc.dead() if not d.startswith(tuple(spare))]
        if dead:
            raise RuntimeError(f"a service stopped while waiting for {what}: {dead}")
        if time.time() > end:
            raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s")
        time.sleep(0.2)


def _listens(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def main(argv=None) -> int:
    import argparse

    from fed import load_config

    ap = argparse.ArgumentParser(description="Run a federation on a loopback Flower deployment: a SuperLink and "
                                             "one SuperNode per site, as separate processes on 127.0.0.1.")
    ap.add_argument("--workdir", required=True, help="W/run: the run directory; W/sites: the sites' disks; "
                                                     "W/flower: FLWR_HOME, logs")
    ap.add_argument("--config", help="YAML experiment file (default: the demo)")
    ap.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    ap.add_argument("--resume", action="store_true", help="continue the run in W/run")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds before everything is stopped")
    ap.add_argument("--node-poll-s", type=float, default=DEFAULT_POLL_S,
                    help="longest wait of an idle SuperNode before it asks the SuperLink for work again "
                         "(fed.flower.supernode; Flower's own flower-supernode: 3)")
    ap.add_argument("--heartbeat-s", type=float, default=DEFAULT_HEARTBEAT_S,
                    help="a SuperNode silent for twice this many seconds counts as gone, and may then join again "
                         "(at least 10; Flower's own: 30)")
    ap.add_argument("--pull-wait-s", type=float, default=PULL_WAIT_S,
                    help="every process that receives messages asks again for a message's objects that are not "
                         "there yet after this long, doubling (fed.flower.supernode.quick_pulls; Flower's own: 1)")
    ap.add_argument("--cold", action="store_true",
                    help="a fresh flwr-clientapp process per message, as Flower's SuperNode (default: one warm "
                         "process per site serves them, fed.flower.warm)")
    ap.add_argument("--insecure", action="store_true",
                    help="no TLS and no SuperNode authentication (default: TLS with a private CA made for this "
                         "deployment, and only the sites' registered keys may join)")
    a = ap.parse_args(argv)
    if a.resume and (a.overrides or a.config):
        ap.error("--resume continues W/run with its saved config: no --config or --set")
    workdir = Path(a.workdir).resolve()
    if a.resume:
        cfg = load_config(workdir / "flower" / "config.yaml", a.overrides)
    else:
        cfg = load_config(a.config or str(REPO / "configs" / "demo.yaml"), a.overrides)
    out = deploy(cfg, workdir, timeout_s=a.timeout, resume=a.resume, insecure=a.insecure,
                 node_poll_s=a.node_poll_s, heartbeat_s=a.heartbeat_s, warm=not a.cold, pull_wait_s=a.pull_wait_s)
    print(json.dumps({k: v for k, v in out.items() if k != "results"}, indent=1, default=str))
    return 0 if out.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
