"""Command lines of the entry points: the demo by default, several ``--set`` pairs after one flag."""
import importlib.util
from pathlib import Path

import pytest

import train
from utils.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def _module(rel):
    """A script of the repository as a module (``test.py`` would clash with the standard ``test`` package)."""
    spec = importlib.util.spec_from_file_location(f"_cli_{Path(rel).stem}", ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _parse_sets(entry, argv):
    """The list of ``--set`` pairs that the entry point's parser makes of ``argv`` (plus its required options)."""
    if entry == "train.py":
        return train.parse_args(argv).overrides
    if entry == "test.py":
        ap = _module("test.py").build_parser()
        return ap.parse_args(["--config", "c.yaml", "--checkpoints", "ck"] + argv).overrides
    if entry == "bench/round_time.py":
        return _module("bench/round_time.py").build_parser().parse_args(["--config", "c.yaml"] + argv).overrides
    from datasets import verify

    return verify.build_parser().parse_args(argv).set


def test_no_arguments_is_the_demo_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = train.parse_args([])
    assert Path(a.config) == ROOT / "configs" / "demo.yaml" and Path(a.config).is_absolute()
    assert a.resume is None and a.overrides == []
    cfg = load_config(a.config, a.overrides)
    assert cfg.name == "demo" and cfg.data.dataset == "synthetic"
    # --set alone still means the demo, changed
    assert train.parse_args(["--set", "train.rounds=3"]).config == a.config
    assert train.parse_args(["--config", "x.yaml"]).config == "x.yaml"


def test_resume_excludes_config_and_has_no_default_config(capsys):
    a = train.parse_args(["--resume", "runs/x", "--set", "train.rounds=9"])
    assert a.config is None and a.resume == "runs/x" and a.overrides == ["train.rounds=9"]
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--resume", "runs/x", "--config", "configs/demo.yaml"])
    assert e.value.code == 2 and "either --config or --resume" in capsys.readouterr().err


def test_help_says_what_no_arguments_does(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and "With no arguments it runs the demo (configs/demo.yaml" in out
    assert "one or more pairs" in out


def test_main_without_config_loads_the_demo(tmp_path, monkeypatch, capsys):
    """From another directory, ``train.py --set ...`` finds the demo config (here refused before training)."""
    monkeypatch.chdir(tmp_path)
    assert train.main(["--set", "train.rounds=5", "train.warmup_rounds=6", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "demo.yaml" in err and "train.warmup_rounds (6) > train.rounds (5)" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize("entry", ["train.py", "test.py", "bench/round_time.py", "datasets.verify"])
def test_set_takes_several_pairs_and_repeats_in_order(entry):
    def parse(argv):
        return _parse_sets(entry, argv)

    assert parse([]) == []
    assert parse(["--set", "train.rounds=3", "data.size=64"]) == ["train.rounds=3", "data.size=64"]
    assert parse(["--set", "a=1", "--set", "b=2"]) == ["a=1", "b=2"]
    mixed = ["--set", "train.rounds=3", "data.size=64", "--set", "train.rounds=4",
             "--set", "data.size=32", "train.rounds=5"]
    pairs = parse(mixed)
    assert pairs == ["train.rounds=3", "data.size=64", "train.rounds=4", "data.size=32", "train.rounds=5"]
    cfg = load_config(None, ["train.warmup_rounds=0"] + pairs)  # applied in command-line order: the last wins
    assert cfg.train.rounds == 5 and cfg.data.size == 32
