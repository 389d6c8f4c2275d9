"""Evaluate client checkpoints on their test split (SPEC section 6).

``python test.py --config configs/polyp_hssf.yaml --checkpoints checkpoints/polyp/HSSF``
scores ``{arch}_{k}_best.pth`` of every client (``global_{arch}_best.pth`` for a shared-model method)
with batch 1 and prints Dice/IoU/precision/recall/HD95 per client and overall, plus the paper-style
LaTeX row; writes ``summary.json``, ``per_image.csv``, ``table.txt`` and overlays to ``--out``.
"""
import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Test client checkpoints (yours or the official released ones).")
    ap.add_argument("--config", required=True, help="the experiment's YAML (data, models, method)")
    ap.add_argument("--checkpoints", required=True, help="folder with {arch}_{k}_best.pth files")
    ap.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                    help="override config keys, e.g. --set data.size=256 data.batch_size=2 (one or more "
                         "pairs; repeatable; applied in order)")
    ap.add_argument("--split", choices=["test", "val"], default="test")
    ap.add_argument("--which", choices=["best", "last"], default="best")
    ap.add_argument("--out", help="output folder (default: <checkpoints>/../test_<split>)")
    ap.add_argument("--overlays", type=int, default=8, help="overlay images per client (0: none)")
    return ap


def main(argv=None):
    a = build_parser().parse_args(argv)

    from datasets.federation import DataError
    from fed.report import evaluate_checkpoints, format_table
    from utils.checkpoint import CheckpointError
    from fed import load_config
    from utils.config import ConfigError

    out = Path(a.out) if a.out else Path(a.checkpoints).resolve().parent / f"test_{a.split}"
    try:
        cfg = load_config(a.config, a.overrides)
        result = evaluate_checkpoints(cfg, a.checkpoints, out, split=a.split, which=a.which,
                                      overlays=a.overlays)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    print(f"\nwritten: {out}/summary.json, per_image.csv, table.txt" + (", overlays/" if a.overlays else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
