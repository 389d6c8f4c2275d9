"""Resume after SIGKILL, fault tolerance, non-finite losses (issue: reliability)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import networks
from fed.core.run import train
from fed import load_config
from conftest import ROOT, tiny_overrides
from utils.logger import read_metrics

pytestmark = pytest.mark.slow


def tiny_cfg(tmp_path, name, *extra):
    return load_config(None, tiny_overrides(tmp_path, name, *extra, rounds=3))


def _records(run):
    return [{k: v for k, v in r.items() if k not in ("time_s", "phase_s", "startup_s")} for r in read_metrics(run)]


def _same_checkpoints(a: Path, b: Path):
    names = sorted(p.name for p in a.glob("*.pth"))
    assert names == sorted(p.name for p in b.glob("*.pth")) and names
    for n in names:
        sa = torch.load(a / n, weights_only=True)
        sb = torch.load(b / n, weights_only=True)
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), n


def _wait_for(cond, proc, what, timeout=300):
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    cfg = tiny_cfg(tmp, "ref")
    return tmp, cfg, train(cfg, progress=False)


@pytest.mark.parametrize("kill_when", ["round0_state_written", "round1_logged"])
def test_sigkill_then_resume_equals_uninterrupted(reference, tmp_path, kill_when):
    ref_tmp, ref_cfg, ref_res = reference
    cfg = tiny_cfg(tmp_path, "killed")
    cfg.data.root = ref_cfg.data.root
    cfg_file = tmp_path / "killed.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.settings()))
    run = Path(cfg.output.dir)
    proc = subprocess.Popen([sys.executable, "train.py", "--config", str(cfg_file), "--quiet"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if kill_when == "round0_state_written":  # killed while training round 1
        _wait_for(lambda: (run / "state" / "last.json").exists(), proc, "the first committed state")
    else:  # killed right after round 1 is logged: its state may be half written
        _wait_for(lambda: (run / "metrics.jsonl").exists() and
                  len((run / "metrics.jsonl").read_text().splitlines()) >= 2, proc, "round 1")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "results.json").exists()
    p = subprocess.run([sys.executable, "train.py", "--resume", str(run), "--quiet"], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "resumed" in (run / "train.log").read_text()
    assert _records(run) == _records(ref_cfg.output.dir)
    _same_checkpoints(run / "checkpoints", Path(ref_cfg.output.dir) / "checkpoints")
    res = json.loads((run / "results.json").read_text())
    assert res["test"] == ref_res["test"] and res["best"] == ref_res["best"]
    # the time of the rounds counts those run before the kill too
    assert res["rounds_time_s"] == pytest.approx(sum(r["time_s"] for r in read_metrics(run)), abs=0.1)
    assert not list(run.rglob(".*.tmp"))


def test_resume_of_a_finished_run_changes_nothing(reference):
    _, cfg, res = reference
    again = train(load_config(Path(cfg.output.dir) / "config.yaml"), resume=True, progress=False)
    assert again["test"] == res["test"]
    assert len(read_metrics(cfg.output.dir)) == cfg.train.rounds


def test_skip_client_when_its_loader_fails_once(tmp_path, monkeypatch):
    from datasets import dataset as ds_mod

    calls = {"failed": False}
    original = ds_mod.SegDataset.__getitem__

    def flaky(self, key):
        if self.mode == "unlabeled" and self.items[0][2].startswith("B/") and not calls["failed"]:
            calls["failed"] = True
            raise OSError("disk read error (injected)")
        return original(self, key)

    monkeypatch.setattr(ds_mod.SegDataset, "__getitem__", flaky)
    cfg = tiny_cfg(tmp_path, "skip", "train.fault_tolerance=skip_client", "train.warmup_rounds=0",
                   "train.rounds=2")
    res = train(cfg, progress=False)
    recs = read_metrics(cfg.output.dir)
    assert calls["failed"]
    assert list(recs[0]["skipped"]) == ["client1"] and "disk read error" in recs[0]["skipped"]["client1"]
    assert "client1" not in recs[0]["loss"] and "unl_weak" in recs[0]["loss"]["client0"]
    assert recs[1]["skipped"] == {} and "unl_weak" in recs[1]["loss"]["client1"]
    log = (Path(cfg.output.dir) / "train.log").read_text()
    assert "client1 (B) fails and sits this round out" in log and "Traceback" in log
    assert res["test"]["all"]["images"] == 6
    # client1 sat round 0 out: its round-0 weights are its initial weights
    from utils.rng import seed_torch

    seed_torch(cfg.seed, "init", "client1")
    init = networks.build_model("tiny").state_dict()
    best = torch.load(Path(cfg.output.dir) / "checkpoints" / "tiny_1_best.pth", weights_only=True)
    if read_metrics(cfg.output.dir)[0]["improved"].count("client1"):
        assert all(torch.equal(init[k], best[k]) for k in init)


def test_without_fault_tolerance_a_failure_stops_the_run(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("client crashed (injected)")

    monkeypatch.setattr("fed.methods.hssf.unlabeled_pass", boom)  # HSSF's local step, as the method calls it
    cfg = tiny_cfg(tmp_path, "stop", "train.warmup_rounds=0")
    with pytest.raises(RuntimeError, match="client crashed"):
        train(cfg, progress=False)


def test_non_finite_loss_stops_after_keeping_the_last_good_state(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, "nan")
    real = __import__("utils.losses", fromlist=["x"]).fp_consistency_loss

    def nan_fp(clean, pert):
        return real(clean, pert) * float("nan")

    monkeypatch.setattr("fed.common.hssf_local.fp_consistency_loss", nan_fp)
    with pytest.raises(FloatingPointError) as e:
        train(cfg, progress=False)
    msg = str(e.value)
    assert "non-finite loss in round 1: client0 (A), loss term 'unl_fp'" in msg and "--resume" in msg
    run = Path(cfg.output.dir)
    state = json.loads((run / "state" / "last.json").read_text())
    assert state["round"] == 0 and [r["round"] for r in read_metrics(run)] == [0]
    assert sorted(p.name for p in (run / "state").glob("*.pt")) == ["client0.r0.pt", "client1.r0.pt", "server.r0.pt"]
    assert not (run / "results.json").exists()
    monkeypatch.undo()
    res = train(load_config(run / "config.yaml"), resume=True, progress=False)
    assert [r["round"] for r in read_metrics(run)] == [0, 1, 2] and res["test"]["all"]["images"] == 6
