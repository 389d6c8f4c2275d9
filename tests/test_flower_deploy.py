"""The federation on a loopback Flower deployment (``python -m fed.flower.deploy``): a SuperLink and one
SuperNode per site as separate processes on 127.0.0.1, the run submitted with ``flwr run flower_app``.

Slow (every message to a site is served by a fresh ``flwr-clientapp`` process: a few seconds each),
bounded by ``deploy(timeout_s=...)``; whatever happens, every process the launcher started (and every
descendant it saw) is stopped, which the tests check.
"""
import json
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="Flower is not installed: pip install -r requirements-flower.txt")

from conftest import tiny_overrides  # noqa: E402
from fed import load_config  # noqa: E402

LIMIT_S = 300  # the whole deployment: start, two rounds, final test, stop
TIMEOUT_S = 20  # train.site_timeout_s: a killed site is lost after this; a live one (a fresh process per message) answers well within it


def _cfg(tmp_path, *extra):
    return load_config(None, tiny_overrides(tmp_path, "deployed", "train.condensation_epochs=1",
                                            "train.fusion_epochs=1", "train.worker_threads=1", *extra))


def _kill_after_round_0(tmp_path, killed):
    """``on_start`` for :func:`deploy`: a thread that kills SuperNode 1 (and its processes) once round 0
    is in the run's metrics."""
    import threading
    import time

    def on_start(svc, status):
        metrics = tmp_path / "w" / "run" / "metrics.jsonl"

        def watch():
            end = time.time() + LIMIT_S
            while time.time() < end and not status.exists():
                if metrics.exists() and metrics.read_text().strip():
                    svc.kill("supernode1")
                    killed["at"] = time.time()
                    return
                time.sleep(0.2)

        threading.Thread(target=watch, daemon=True).start()

    return on_start


@pytest.mark.slow
def test_a_site_that_dies_is_left_out_and_the_run_goes_on(tmp_path):
    """SuperNode 1 is killed after round 0; with ``train.min_sites=1`` the server notices within
    ``train.site_timeout_s``, logs it and finishes round 1 and the run with client0 alone."""
    from fed.flower.deploy import deploy
    from utils.logger import read_metrics

    cfg = _cfg(tmp_path, f"train.site_timeout_s={TIMEOUT_S}", "train.min_sites=1")
    killed = {}
    out = deploy(cfg, tmp_path / "w", timeout_s=LIMIT_S, on_start=_kill_after_round_0(tmp_path, killed))
    assert out["remaining"] == [], f"processes left running: {out['remaining']}"
    assert "at" in killed
    assert out["ok"], out.get("error", "") + "\n" + out.get("trace", "")
    run = tmp_path / "w" / "run"
    recs = read_metrics(run)
    assert [r["round"] for r in recs] == [0, 1]
    assert recs[0]["skipped"] == {} and list(recs[1]["skipped"]) == ["client1"]
    assert recs[1]["skipped"]["client1"].startswith("lost: ")
    assert "client1" not in recs[1]["val"] and "client0" in recs[1]["val"]
    log = (run / "train.log").read_text()
    assert "client1 (B) is lost" in log and "1 of 2 site(s) left" in log
    assert json.loads((run / "results.json").read_text())["rounds"] == 2


@pytest.mark.slow
def test_a_site_that_dies_stops_the_run_which_resumes_on_a_new_deployment(tmp_path):
    """With ``train.min_sites`` at 0 (every site), losing SuperNode 1 stops the run cleanly after round
    0 (status ``SitesLost``, round 0 committed); a new deployment with ``--resume`` finishes round 1 and
    the run: HSSF's two rounds across separate processes, the final test at the sites, every process
    stopped."""
    from fed.flower.deploy import deploy
    from utils.logger import read_metrics

    cfg = _cfg(tmp_path, f"train.site_timeout_s={TIMEOUT_S}")
    killed = {}
    out = deploy(cfg, tmp_path / "w", timeout_s=LIMIT_S, on_start=_kill_after_round_0(tmp_path, killed))
    assert out["remaining"] == [], f"processes left running: {out['remaining']}"
    assert "at" in killed and not out["ok"] and out["error"].startswith("SitesLost"), out
    run = tmp_path / "w" / "run"
    assert json.loads((run / "state" / "last.json").read_text())["round"] == 0
    assert [r["round"] for r in read_metrics(run)] == [0] and not (run / "results.json").exists()
    assert "client1 (B) is lost" in (run / "train.log").read_text()

    again = deploy(load_config(tmp_path / "w" / "flower" / "config.yaml"), tmp_path / "w", timeout_s=LIMIT_S,
                   resume=True)
    assert again["remaining"] == [], f"processes left running: {again['remaining']}"
    assert again["processes"] >= 3 + 2  # SuperLink, 2 SuperNodes and their helpers
    assert again["ok"], again.get("error", "") + "\n" + again.get("trace", "")
    recs = read_metrics(run)
    assert [r["round"] for r in recs] == [0, 1] and recs[1]["skipped"] == {}
    assert recs[1]["bytes"]["client0"]["up"] > 0  # the condensation predictions crossed as Flower messages
    log = (run / "train.log").read_text()
    assert "resumed" in log and "Flower deployment: 2 SuperNodes" in log
    assert "test split, best-val checkpoints (batch 1, every image, scored at each site)" in log
    res = json.loads((run / "results.json").read_text())
    assert res["rounds"] == 2 and {"client0", "client1", "all"} <= set(res["test"])
    assert {"superlink.log", "supernode0.log", "supernode1.log"} <= {p.name for p in (run / "deploy").iterdir()}
    for k in range(2):  # each site kept its state and its test overlays on its own disk
        site = tmp_path / "w" / "sites" / f"client{k}"
        assert (site / "state" / f"client{k}.r1.pt").exists() and (site / "live.pt").exists()
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
