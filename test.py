"""Evaluate client checkpoints on their test split (SPEC section 6).

``python test.py --config configs/polyp_hssf.yaml --checkpoints checkpoints/polyp/HSSF``
scores ``{arch}_{k}_best.pth`` of every client (``global_{arch}_best.pth`` for a shared-model method)
with batch 1 and prints Dice/IoU/precision/recall/HD95 per client and overall, plus the paper-style
LaTeX row; writes ``summary.json``, ``per_image.csv``, ``table.txt`` and overlays to ``--out``.

``python test.py --compare runs/local runs/lssl --reference runs/hssf`` compares finished runs instead
(no --config/--checkpoints): the paper-style table of every run's test Dice and HD95 per client and pooled,
the paired Wilcoxon signed-rank test of each against the reference, bytes and seconds per round
(:mod:`utils.compare`); writes ``compare.md``, ``compare.tex`` and ``compare.csv`` to ``--out``
(default: ``compare/`` beside the reference run).
"""
import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Test client checkpoints (yours or the official released ones), "
                                             "or compare finished runs (--compare).")
    ap.add_argument("--config", help="the experiment's YAML (data, models, method); required unless --compare")
    ap.add_argument("--checkpoints", help="folder with {arch}_{k}_best.pth files; required unless --compare")
    ap.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                    help="override config keys, e.g. --set data.size=256 data.batch_size=2 (one or more "
                         "pairs; repeatable; applied in order)")
    ap.add_argument("--split", choices=["test", "val"], default="test")
    ap.add_argument("--which", choices=["best", "last"], default="best")
    ap.add_argument("--out", help="output folder (default: <checkpoints>/../test_<split>; with --compare: "
                                  "<reference>/../compare)")
    ap.add_argument("--overlays", type=int, default=8, help="overlay images per client (0: none)")
    cmp = ap.add_argument_group("comparing finished runs (no --config/--checkpoints)")
    cmp.add_argument("--compare", nargs="+", metavar="RUN",
                     help="run directories (train.py's output.dir: test/per_image.csv, metrics.jsonl, "
                          "results.json, config.yaml) to put in one table with --reference")
    cmp.add_argument("--reference", metavar="RUN",
                     help="the run every other one is tested against (paired Wilcoxon signed-rank, two-sided)")
    cmp.add_argument("--metrics", nargs="+", metavar="METRIC", default=None,
                     help="metrics of the table (default: dice hd95; also iou precision recall)")
    return ap


def compare_main(a, ap) -> int:
    from utils.compare import DEFAULT_METRICS, CompareError, compare, default_out, format_markdown, write_outputs

    if a.config or a.checkpoints:
        ap.error("--compare reads finished run directories: it takes no --config/--checkpoints")
    if not a.reference:
        ap.error("--compare needs --reference RUN (the run every other one is tested against)")
    try:
        result = compare(a.compare, a.reference, a.metrics or DEFAULT_METRICS)
        out = Path(a.out) if a.out else default_out(a.reference)
        paths = write_outputs(result, out)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_markdown(result))
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def main(argv=None):
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.compare:
        return compare_main(a, ap)
    if a.reference or a.metrics:
        ap.error("--reference and --metrics belong to --compare")
    missing = [f for f, v in (("--config", a.config), ("--checkpoints", a.checkpoints)) if not v]
    if missing:
        ap.error(f"the following arguments are required: {', '.join(missing)} (or compare runs with --compare)")

    from datasets.federation import DataError
    from fed.core.report import evaluate_checkpoints, format_table
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
