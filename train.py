"""Train a federation: ``python train.py [--config configs/x.yaml] [--set key.sub=value ...]``.

With no ``--config`` (and no ``--resume``) it runs the demo, ``configs/demo.yaml`` of this repository
(found from any working directory). ``--set`` takes one or more ``key=value`` pairs and may be
repeated; they apply in command-line order. ``--resume RUN_DIR`` continues an interrupted run from its
last completed round (its saved config is used; ``--set`` may still change e.g. ``train.rounds``).
"""
import argparse
import sys
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="Train HSSF (or a baseline) in a single-process federation. With no arguments it runs "
                    f"the demo ({DEMO_CONFIG.parent.name}/{DEMO_CONFIG.name}: a synthetic 3-client federation, "
                    "about two minutes on a 2-core CPU).")
    ap.add_argument("--config", help="YAML experiment file (configs/*.yaml); default, without --resume: "
                                     "the demo, configs/demo.yaml of this repository")
    ap.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                    help="override config keys, e.g. --set train.rounds=10 data.size=64 (one or more "
                         "pairs; repeatable; applied in order)")
    ap.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR (not with --config)")
    ap.add_argument("--overwrite", action="store_true", help="delete an existing run in output.dir first")
    ap.add_argument("--quiet", action="store_true", help="no progress bars or console log")
    ap.add_argument("--engine", choices=["inprocess", "flower-sim"], default="inprocess",
                    help="where the clients run: inprocess (default: this process, or train.client_workers worker "
                         "processes) or flower-sim (the nodes of a Flower simulation; pip install -r "
                         "requirements-flower.txt). Give it again with --resume")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line; ``config`` is the demo's path when neither it nor ``--resume`` is given."""
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.config and a.resume:
        ap.error("give either --config or --resume, not both (a resumed run uses its saved config)")
    if not a.config and not a.resume:
        a.config = str(DEMO_CONFIG)
    return a


def main(argv=None):
    a = parse_args(argv)

    from datasets.federation import DataError
    from fed.core.run import RunDirError, train
    from utils.checkpoint import CheckpointError
    from fed import load_config
    from utils.config import ConfigError

    try:
        if a.resume:
            run = Path(a.resume)
            if not (run / "config.yaml").is_file():
                raise RunDirError(f"{run}: no config.yaml here; is this a run directory?")
            cfg = load_config(run / "config.yaml", a.overrides, extra={"output": {"dir": str(run)}})
        else:
            cfg = load_config(a.config, a.overrides)
        results = train(cfg, resume=bool(a.resume), overwrite=a.overwrite, progress=not a.quiet, engine=a.engine)
    except (ConfigError, DataError, RunDirError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    if "test" in results:
        print(f"\nfinished in {results['wall_time_s']:.0f} s; results in {cfg.output.dir}/results.json")
        for k, site in enumerate(cfg.data.clients):
            s = results["test"][f"client{k}"]
            print(f"client {k} ({site}, {cfg.models.clients[k]}): test Dice {s['dice']['mean']:.2f}  "
                  f"HD95 {s['hd95']['mean']:.2f}")
        s = results["test"]["all"]
        print(f"all clients: test Dice {s['dice']['mean']:.2f}  HD95 {s['hd95']['mean']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
