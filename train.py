"""Train a federation: ``python train.py --config configs/demo.yaml [--set key.sub=value ...]``.

``--resume RUN_DIR`` continues an interrupted run from its last completed round (its saved config is
used; ``--set`` may still change e.g. ``train.rounds``).
"""
import argparse
import sys
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description="Train HSSF (or a baseline) in a single-process federation.")
    ap.add_argument("--config", help="YAML experiment file (configs/*.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set train.rounds=10 (repeatable)")
    ap.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    ap.add_argument("--overwrite", action="store_true", help="delete an existing run in output.dir first")
    ap.add_argument("--quiet", action="store_true", help="no progress bars or console log")
    a = ap.parse_args(argv)
    if bool(a.config) == bool(a.resume):
        ap.error("give exactly one of --config or --resume")

    from datasets.federation import DataError
    from fed.engine import RunDirError, train
    from utils.checkpoint import CheckpointError
    from utils.config import ConfigError, load_config

    try:
        if a.resume:
            run = Path(a.resume)
            if not (run / "config.yaml").is_file():
                raise RunDirError(f"{run}: no config.yaml here; is this a run directory?")
            cfg = load_config(run / "config.yaml", a.overrides, extra={"output": {"dir": str(run)}})
        else:
            cfg = load_config(a.config, a.overrides)
        results = train(cfg, resume=bool(a.resume), overwrite=a.overwrite, progress=not a.quiet)
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
