"""The federation on a loopback Flower deployment (``python -m fed.flower.deploy``): a SuperLink and one
SuperNode and one site process per site, as separate processes on 127.0.0.1, over TLS with SuperNode
authentication, the run submitted with ``flwr run flower_app``.

Slow (Flower starts a process for every message; the SuperNodes look for work every 0.1 s,
:mod:`fed.flower.supernode`), bounded by ``deploy(timeout_s=...)``; whatever happens, every process the launcher started (and every descendant it
saw) is stopped, which the tests check.
"""
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is not installed: pip install -r requirements-flower.txt")

from conftest import tiny_overrides  # noqa: E402
from fed import load_config  # noqa: E402

LIMIT_S = 300  # the whole deployment: start, two rounds, final test, stop
TIMEOUT_S = 20  # train.site_timeout_s: a killed site is lost after this; a live one answers well within it


def _cfg(tmp_path, *extra):
    return load_config(None, tiny_overrides(tmp_path, "deployed", "train.condensation_epochs=1",
                                            "train.fusion_epochs=1", "train.worker_threads=1", *extra))


def _kill_after_round_0(tmp_path, killed, service="supernode1"):
    """``on_start`` for :func:`deploy`: a thread that kills ``service`` (and its processes) once round 0
    is in the run's metrics."""
    import threading
    import time

    def on_start(svc, status):
        metrics = tmp_path / "w" / "run" / "metrics.jsonl"

        def watch():
            end = time.time() + LIMIT_S
            while time.time() < end and not status.exists():
                if metrics.exists() and metrics.read_text().strip():
                    svc.kill(service)
                    killed["at"] = time.time()
                    return
                time.sleep(0.2)

        threading.Thread(target=watch, daemon=True).start()

    return on_start


def _lose_and_restart_after_round_0(tmp_path, events):
    """``on_start`` for :func:`deploy`: once round 0 is in the run's metrics, site 1's machine fails (its
    SuperNode and its site process killed) and comes back at once: both started again as they were (same
    key, same folder), the SuperNode again every 2 s while it exits (the SuperLink admits the same key
    again only once it has counted the old connection gone: 2 heartbeat intervals, 20 s), as a service
    manager would."""
    import threading
    import time

    def on_start(svc, status):
        run = tmp_path / "w" / "run"

        def watch():
            end = time.time() + 2 * LIMIT_S
            while time.time() < end and not status.exists():
                if (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().strip():
                    break
                time.sleep(0.2)
            svc.kill("supernode1")
            svc.kill("site1")
            events["lost"] = time.time()
            svc.restart("site1")
            node = svc.restart("supernode1")
            while time.time() < end and not status.exists():
                if "client1 (B) is back" in (run / "train.log").read_text():
                    events["back"] = time.time()
                    return
                if node.poll() is not None:
                    events["tries"] = events.get("tries", 1) + 1
                    node = svc.restart("supernode1")
                time.sleep(2)

        threading.Thread(target=watch, daemon=True).start()

    return on_start


@pytest.mark.slow
def test_a_site_that_goes_away_rejoins_and_strangers_and_bad_replies_are_refused(tmp_path, monkeypatch):
    """One TLS deployment of 4 rounds with ``train.min_sites=1`` and ``skip_client``:

    - a SuperNode claiming to be site A with a key the SuperLink was never given is refused;
    - site B's machine fails after round 0 and restarts: B is lost in round 1 (the run goes on with site
      A), taken back at round 2 from its own state of round 0, and takes part in rounds 2-3;
    - site A sends a reply with a NaN in round 3: refused, site A sits that round out;
    - checkpoints, test results and every round's validation scores equal the in-process run in which
      site B's step fails in round 1 and site A sends the same bad reply.
    """
    from fed.core import faults
    from fed.flower.deploy import deploy
    from fed.core.run import train
    from utils.logger import read_metrics

    from conftest import run_checkpoints

    # the site's messages wait for it longer than it takes to come back: the restarted node answers the
    # message it missed (it holds nothing of the run: lost at once) or Flower reports the old node gone;
    # before round 2 the server waits for it to be back (rounds are faster than a restart)
    extra = ("train.site_timeout_s=150", "train.min_sites=1", "train.fault_tolerance=skip_client", "train.rounds=4",
             "train.rejoin_wait_s=120")
    bad = {"client": "client0", "step": "predict_public", "rounds": [3], "kind": "nan"}
    monkeypatch.setenv(faults.ENV, json.dumps([bad]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the server's process as the sites' (one torch thread): bit for bit
    cfg = _cfg(tmp_path, *extra)
    events = {}
    out = deploy(cfg, tmp_path / "w", timeout_s=2 * LIMIT_S, intruders=1,
                 on_start=_lose_and_restart_after_round_0(tmp_path, events))
    assert out["remaining"] == [], f"processes left running: {out['remaining']}"
    assert out["ok"], out.get("error", "") + "\n" + out.get("trace", "")
    assert out["transport"] == "tls" and "back" in events
    run = tmp_path / "w" / "run"
    log = (run / "train.log").read_text()
    assert "Flower deployment (TLS, only registered SuperNode keys admitted): 2 SuperNodes" in log
    intruder = (tmp_path / "w" / "flower" / "logs" / "intruder0.log").read_text()
    assert "Failed to activate SuperNode" in intruder  # its key was never registered
    recs = read_metrics(run)
    assert [r["round"] for r in recs] == [0, 1, 2, 3]
    assert recs[0]["skipped"] == {} and recs[2]["skipped"] == {}
    assert list(recs[1]["skipped"]) == ["client1"] and recs[1]["skipped"]["client1"].startswith("lost: ")
    assert recs[2]["rejoined"] == {"client1": {"missed": [1], "resumed_from": 0}}
    assert "client1 (B) is back: it resumes from its own state of round 0, having missed round(s) 1" in log
    assert list(recs[3]["skipped"]) == ["client0"] and recs[3]["skipped"]["client0"].startswith("BadReply")
    assert "client1" in recs[2]["val"] and "client1" in recs[3]["val"] and "client1" not in recs[1]["val"]

    # the same run in one process: site B's step fails in round 1 (it sits the round out, rolled back to
    # its state of round 0), site A's bad reply in round 3
    monkeypatch.setenv(faults.ENV, json.dumps([bad, {"client": "client1", "step": "predict_public", "rounds": [1],
                                                      "kind": "raise"}]))
    here = load_config(None, tiny_overrides(tmp_path, "here", "train.condensation_epochs=1", "train.fusion_epochs=1",
                                            "train.worker_threads=1", *extra))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = train(here, progress=False)
    finally:
        torch.set_num_threads(before)
    deployed = json.loads((run / "results.json").read_text())
    assert deployed["test"] == json.loads(json.dumps(res["test"]))
    assert [r["val"] for r in recs] == [r["val"] for r in read_metrics(here.output.dir)]
    a, b = run_checkpoints(here), {p.name: torch.load(p, weights_only=True) for p in sorted((run / "checkpoints").glob("*.pth"))}
    assert a.keys() == b.keys() and all(torch.equal(a[f][k], b[f][k]) for f in a for k in a[f])


@pytest.mark.slow
def test_the_superlink_going_down_stops_the_run_which_resumes_on_a_new_deployment(tmp_path):
    """The SuperLink (and the ServerApp under it) is killed once round 0 is committed: the deployment
    ends with round 0 kept; a new deployment with ``--resume`` finishes round 1 and the run: HSSF's two
    rounds across separate processes, the final test at the sites, every process stopped."""
    from fed.flower.deploy import deploy
    from utils.logger import read_metrics

    cfg = _cfg(tmp_path, f"train.site_timeout_s={TIMEOUT_S}")
    killed = {}
    out = deploy(cfg, tmp_path / "w", timeout_s=LIMIT_S, on_start=_kill_after_round_0(tmp_path, killed, "superlink"))
    assert out["remaining"] == [], f"processes left running: {out['remaining']}"
    assert "at" in killed and not out["ok"] and out["error"].startswith("SuperLinkStopped"), out
    run = tmp_path / "w" / "run"
    assert json.loads((run / "state" / "last.json").read_text())["round"] == 0
    assert [r["round"] for r in read_metrics(run)] == [0] and not (run / "results.json").exists()

    again = deploy(load_config(tmp_path / "w" / "flower" / "config.yaml"), tmp_path / "w", timeout_s=LIMIT_S,
                   resume=True)
    assert again["remaining"] == [], f"processes left running: {again['remaining']}"
    assert again["processes"] >= 3 + 2  # SuperLink, 2 SuperNodes and their helpers
    assert again["ok"], again.get("error", "") + "\n" + again.get("trace", "")
    recs = read_metrics(run)
    assert [r["round"] for r in recs] == [0, 1] and recs[1]["skipped"] == {}
    assert recs[1]["bytes"]["client0"]["up"] > 0  # the condensation predictions crossed as Flower messages
    log = (run / "train.log").read_text()
    assert "resumed" in log and "Flower deployment (TLS, only registered SuperNode keys admitted): 2 SuperNodes" in log
    assert "test split, best-val checkpoints (batch 1, every image, scored at each site)" in log
    res = json.loads((run / "results.json").read_text())
    assert res["rounds"] == 2 and {"client0", "client1", "all"} <= set(res["test"])
    assert {"superlink.log", "supernode0.log", "supernode1.log"} <= {p.name for p in (run / "deploy").iterdir()}
    for k in range(2):  # each site kept its state and its test overlays on its own disk
        site = tmp_path / "w" / "sites" / f"client{k}"
        assert (site / "state" / f"client{k}.r1.pt").exists()
        assert list((site / "test_overlays").glob("*.png"))
    assert (run / "state" / "server.r1.pt").exists() and not (run / "test" / "overlays").exists()
    # the server held the public set and the split file only: every site read its own files
    server = tmp_path / "w" / "server"
    assert load_config(run / "config.yaml").data.root == str(server / "data")
    assert [p.name for p in (server / "data" / "syn").iterdir()] == ["P"]
    for k, site in enumerate("AB"):
        entry = json.loads((tmp_path / "w" / "sites" / f"client{k}" / "entry.json").read_text())
        assert entry["site"] == site and entry["data"]["test_list"]
        assert all(Path(i).parent.parent.name == site for lst in entry["data"].values() for i, _, _ in lst)
    nodes = json.loads((tmp_path / "w" / "flower" / "sites.json").read_text())  # the SuperNodes' node configs
    assert [(n["site"], n["arch"], n["site-dir"]) for n in nodes] == [
        (s, "tiny", str(tmp_path / "w" / "sites" / f"client{k}")) for k, s in enumerate("AB")]


def test_launcher_command_line(tmp_path):
    """``--resume`` takes the saved config only; a new run refuses an occupied run directory before
    starting any process."""
    from fed.flower.deploy import deploy, main
    from fed.core.run import RunDirError

    with pytest.raises(SystemExit):
        main(["--workdir", str(tmp_path), "--resume", "--set", "train.rounds=3"])
    (tmp_path / "w" / "run").mkdir(parents=True)
    (tmp_path / "w" / "run" / "x").write_text("occupied")
    with pytest.raises(RunDirError):
        deploy(_cfg(tmp_path), tmp_path / "w", timeout_s=5)


def test_services_run_from_the_python_the_launcher_runs_under(tmp_path):
    """Started as ``.venv/bin/python -m fed.flower.deploy`` without activating the environment, the
    services and what they start by name (the SuperLink's ``flower-superexec``) come from that Python's
    environment: its bin directory leads PATH; the project leads PYTHONPATH; nothing else is lost."""
    import os
    import sys

    from fed.flower.deploy import REPO, service_env

    env = service_env(tmp_path, {"PATH": "/usr/bin:/bin", "PYTHONPATH": "/x", "KEEP": "1"})
    path = env["PATH"].split(os.pathsep)
    assert path[0] == str(Path(sys.executable).parent) and path[1:] == ["/usr/bin", "/bin"]
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO), "/x"] and env["KEEP"] == "1"
    assert env["FLWR_HOME"] == str(tmp_path) and env["FLWR_TELEMETRY_ENABLED"] == "0"
    bindir = Path(sys.executable).parent
    assert (bindir / "flower-superexec").exists(), "requirements-flower.txt installs flower-superexec beside python"


@pytest.fixture
def flower_pull_defaults(monkeypatch):
    """Flower's object-pulling defaults, put back after the test (``quick_pulls`` changes them in-process)."""
    from flwr.supercore.inflatable import inflatable_utils as objects

    for fn in (objects.pull_objects, objects.pull_and_inflate_object_from_tree):
        monkeypatch.setattr(fn, "__kwdefaults__", dict(fn.__kwdefaults__))
    return objects


def test_quick_pulls_ask_again_for_a_missing_object_after_20_ms(flower_pull_defaults, monkeypatch):
    """An object not there yet is asked for again after 0.02 s (doubling, at most 0.5 s) instead of Flower's
    1 s (up to 10 s), by both of Flower's pulling functions; Flower's callers (ServerApp grid, SuperNode,
    ClientApp runtime) use the defaults, so the change reaches them."""
    import inspect
    import threading
    import types

    import flwr.superlink.grid.http_grid as grid
    import flwr.supernode.runtime.run_clientapp as clientapp
    import flwr.supernode.start_client_internal as loop
    from fed.flower import supernode

    objects = flower_pull_defaults
    for module in (grid, clientapp, loop):
        assert "initial_backoff" not in inspect.getsource(module), module.__name__

    waits = []

    class Event:  # records the waits between tries instead of waiting
        def __init__(self):
            self.flag = False

        def is_set(self):
            return self.flag

        def set(self):
            self.flag = True

        def wait(self, seconds):
            waits.append(seconds)
            return self.flag

    monkeypatch.setattr(objects, "threading", types.SimpleNamespace(Event=Event, Lock=threading.Lock))
    tries = {"a": 0}

    def pull(object_id):
        tries[object_id] += 1
        if tries[object_id] < 8:
            raise objects.ObjectUnavailableError(object_id)
        return b"x"

    def run():
        waits.clear()
        tries["a"] = 0
        assert objects.pull_objects(["a"], pull) == {"a": b"x"}
        return [round(w, 3) for w in waits]

    before = run()
    assert len(before) == 7 and 0.8 <= before[0] <= 1.2 and max(before) > 8  # Flower's: 1 s, doubling to 10 s
    supernode.quick_pulls()
    after = run()
    assert len(after) == 7 and 0.016 <= after[0] <= 0.024 and max(after) <= 0.5 * 1.2
    assert all(b > 0 for b in after) and sum(after) < 2.5
    kw = objects.pull_and_inflate_object_from_tree.__kwdefaults__
    assert (kw["initial_backoff"], kw["backoff_cap"]) == (0.02, 0.5)
    supernode.quick_pulls(1.0)  # Flower's own
    again = run()
    assert 0.8 <= again[0] <= 1.2 and max(again) > 8


def test_the_supernode_waits_at_most_its_poll_interval(monkeypatch, flower_pull_defaults):
    """``python -m fed.flower.supernode --poll-s S --heartbeat-s H`` is Flower's SuperNode loop with every
    sleep of that loop (3 s when idle, 0.5 s while its ClientApp works) capped at S, and heartbeats that
    declare H; the loop still sleeps through a module-level ``time`` and the connection declares the
    module's interval (a Flower that no longer does would leave them without effect)."""
    import inspect
    import time

    import flwr.supercore.heartbeat as beat
    import flwr.supernode.fleet_http_connection as fleet
    import flwr.supernode.start_client_internal as loop
    from fed.flower import supernode

    source = inspect.getsource(loop)
    assert "time.sleep(3)" in source and "time.sleep(0.5)" in source
    for module, name in ((loop, "time"), (fleet, "HEARTBEAT_DEFAULT_INTERVAL"), (beat, "HEARTBEAT_DEFAULT_INTERVAL")):
        monkeypatch.setattr(module, name, getattr(module, name))  # put back after the test
    assert "HEARTBEAT_DEFAULT_INTERVAL" in inspect.getsource(fleet.http_request_response)  # what it declares
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    supernode.patch(0.25, 12)
    assert fleet.HEARTBEAT_DEFAULT_INTERVAL == beat.HEARTBEAT_DEFAULT_INTERVAL == 12
    loop.time.sleep(3)
    loop.time.sleep(0.5)
    loop.time.sleep(0.1)
    assert slept == [0.25, 0.25, 0.1]
    assert loop.time.time is time.time and loop.time.monotonic is time.monotonic  # the rest is the module's
    with pytest.raises(SystemExit, match="not a number"):
        supernode.main(["--poll-s", "soon"])
    with pytest.raises(SystemExit, match="must be > 0"):
        supernode.main(["--poll-s", "0"])
    with pytest.raises(SystemExit, match="refuses less than 10"):
        supernode.main(["--poll-s", "1", "--heartbeat-s", "5"])


def test_the_supernode_starts_one_warm_process_for_its_clientapps(monkeypatch, flower_pull_defaults):
    """Where Flower's SuperNode starts ``flower-superexec`` (a new ``flwr-clientapp`` per message), the warm
    SuperNode starts ``python -m fed.flower.warm`` with the same arguments (and its object wait); any other command is left
    alone; ``cold`` leaves Flower's way; the warm process refuses to install dependencies."""
    import inspect
    import subprocess
    import sys

    import flwr.supernode.start_client_internal as loop
    from fed.flower import supernode, warm

    assert 'command = ["flower-superexec"]' in inspect.getsource(loop)  # what the SuperNode starts
    monkeypatch.setattr(loop, "time", loop.time)
    monkeypatch.setattr(loop, "subprocess", loop.subprocess)
    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda cmd, *a, **k: started.append(list(cmd)))
    supernode.patch(0.1, 10, warm=True)
    args = ["--insecure", "--runtime-api-address", "127.0.0.1:9", "--parent-pid", "7"]
    loop.subprocess.Popen(["flower-superexec", *args])
    loop.subprocess.Popen(["something-else", "x"])
    assert started == [[sys.executable, "-m", "fed.flower.warm", "--pull-wait-s", "0.02", *args], ["something-else", "x"]]
    assert loop.subprocess.PIPE is subprocess.PIPE
    monkeypatch.setattr(loop, "subprocess", subprocess)
    supernode.patch(0.1, 10, warm=False)
    assert loop.subprocess is subprocess
    with pytest.raises(SystemExit):
        warm.main([*args, "--allow-runtime-dependency-installation"])
