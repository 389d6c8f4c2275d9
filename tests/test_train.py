"""End-to-end runs on a tiny synthetic federation: hssf, lssl, local, test.py, run directories."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fed.core.run import RunDirError, train
from fed import load_config
from utils.config import ConfigError
from conftest import ROOT, tiny_overrides
from utils.logger import read_metrics

pytestmark = pytest.mark.slow


def tiny(tmp_path, *extra, name="run"):
    """A 2-client federation of 32-px synthetic images; 2 rounds (1 warm-up)."""
    return tiny_overrides(tmp_path, name, *extra)


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def hssf_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hssf")
    cfg = load_config(None, tiny(tmp))
    return tmp, cfg, train(cfg, progress=False)


def test_hssf_run_outputs(hssf_run):
    tmp, cfg, res = hssf_run
    run = Path(cfg.output.dir)
    recs = read_metrics(run)
    assert [r["round"] for r in recs] == [0, 1] and recs[0]["warmup"] and not recs[1]["warmup"]
    # warm-up: no distillation, no unlabeled data; afterwards both
    assert "cond_kl" not in recs[0]["loss"]["server"] and "unl_weak" not in recs[0]["loss"]["client0"]
    assert {"cond_seg", "cond_sa", "cond_kl"} <= set(recs[1]["loss"]["server"])
    assert {"fus_seg", "fus_sa", "fus_kl", "unl_fp", "unl_weak", "unl_strong"} <= set(recs[1]["loss"]["client0"])
    assert set(recs[1]["val"]) == {"client0", "client1", "all"}
    # the server's LR follows the cosine schedule (stepped after each condensation pass)
    assert recs[1]["lr"]["server"] < recs[0]["lr"]["server"]
    ck = run / "checkpoints"
    for f in ["tiny_0_best.pth", "tiny_1_best.pth", "tiny_0_last.pth", "global_tiny_best.pth",
              "global_tiny_last.pth"]:
        sd = _load(ck / f)
        assert "classifier.confidence_4.3.weight" in sd and "backbone.stem.0.0.weight" in sd
    results = json.loads((run / "results.json").read_text())
    assert results["test"]["all"]["images"] == 6 and set(results["test"]) == {"client0", "client1", "all"}
    env = results["environment"]  # what the numbers depend on beyond config and seed (another CPU rounds otherwise)
    assert env["torch"] == torch.__version__ and env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["device"] == "cpu" and env["threads"] == torch.get_num_threads() and env["cpu"]
    assert f"environment: python {env['python']}, torch {torch.__version__}" in (run / "train.log").read_text()
    assert (run / "test" / "summary.json").exists() and (run / "test" / "per_image.csv").exists()
    assert list((run / "test" / "overlays").glob("*.png"))
    assert (run / "train.log").read_text().count("round ") >= 2
    assert list((run / "tb").glob("events.*"))


def test_cpu_runs_repeat_exactly(hssf_run, tmp_path):
    tmp, cfg, res = hssf_run
    cfg2 = load_config(None, tiny(tmp, name="again"))
    res2 = train(cfg2, progress=False)
    assert res2["best"] == res["best"] and res2["test"] == res["test"]
    a, b = Path(cfg.output.dir) / "checkpoints", Path(cfg2.output.dir) / "checkpoints"
    for f in ["tiny_0_last.pth", "global_tiny_last.pth"]:
        sa, sb = _load(a / f), _load(b / f)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_test_py_scores_the_checkpoints(hssf_run, tmp_path):
    tmp, cfg, res = hssf_run
    cfg_file = tmp_path / "cfg.yaml"
    (Path(cfg.output.dir) / "config.yaml").rename(cfg_file)
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "test.py", "--config", str(cfg_file), "--checkpoints",
                        str(Path(cfg.output.dir) / "checkpoints"), "--out", str(out), "--overlays", "1"],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "all" in p.stdout and "HD95" in p.stdout and "\\tiny $\\pm$" in p.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["summary"]["all"]["dice"]["mean"] == pytest.approx(res["test"]["all"]["dice"]["mean"])
    p = subprocess.run([sys.executable, "test.py", "--config", str(cfg_file), "--checkpoints", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "tiny_0_best.pth" in p.stderr and "Traceback" not in p.stderr


def test_run_dir_is_never_overwritten_silently(hssf_run):
    tmp, cfg, res = hssf_run
    with pytest.raises(RunDirError, match="already holds a finished run.*--resume"):
        train(cfg, progress=False)


def test_lssl_averages_into_one_global_model(tmp_path):
    cfg = load_config(None, tiny(tmp_path, "method=lssl", "train.rounds=1", "train.warmup_rounds=0"))
    res = train(cfg, progress=False)
    ck = Path(cfg.output.dir) / "checkpoints"
    assert (ck / "global_tiny_best.pth").exists()
    rec = read_metrics(cfg.output.dir)[0]
    assert rec["improved"] == ["all"] and "sup_seg" in rec["loss"]["client0"] and "unl_weak" in rec["loss"]["client1"]
    assert res["test"]["all"]["images"] == 6
    with pytest.raises(ConfigError, match="lssl averages weights"):
        load_config(None, tiny(tmp_path, "method=lssl", "models.clients=[tiny, resnet18]"))


def test_local_trains_without_collaboration(tmp_path):
    # local has no warm-up: unlabeled learning from round 0, and the round is not logged as warm-up
    cfg = load_config(None, tiny(tmp_path, "method=local", "train.rounds=1", "train.warmup_rounds=1"))
    train(cfg, progress=False)
    rec = read_metrics(cfg.output.dir)[0]
    assert "server" not in rec["loss"] and rec["warmup"] is False
    assert {"sup_seg", "unl_weak"} <= set(rec["loss"]["client0"])


def test_train_py_reports_bad_config_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  sise: 64\n")
    p = subprocess.run([sys.executable, "train.py", "--config", str(bad)], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "data.sise" in p.stderr and "Traceback" not in p.stderr


def test_bad_data_stops_before_a_run_directory_exists(tmp_path):
    from datasets.federation import DataError

    cfg = load_config(None, tiny(tmp_path, "data.synthetic=null", name="nodata"))
    with pytest.raises(DataError, match="site folder"):
        train(cfg, progress=False)
    assert not Path(cfg.output.dir).exists()
