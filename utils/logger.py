"""Run logging: a text log, TensorBoard scalars and a per-round JSONL file that scripts can plot."""
from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from .io import append_line


class _TqdmHandler(logging.StreamHandler):
    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flatten(v, key + "/")
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            yield key, v


class RunLogger:
    """``info()`` -> console + ``train.log``; ``round()`` -> ``metrics.jsonl`` + TensorBoard."""

    def __init__(self, run_dir, console: bool = True, tensorboard: bool = True):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = logging.getLogger(f"hssf.{self.dir.resolve()}")
        self.log.setLevel(logging.INFO)
        self.log.propagate = False
        self.log.handlers.clear()
        fh = logging.FileHandler(self.dir / "train.log", encoding="utf-8")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.log.addHandler(fh)
        if console:
            ch = _TqdmHandler()
            ch.setFormatter(logging.Formatter("%(message)s"))
            self.log.addHandler(ch)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.dir / "tb"))
            except Exception as e:  # tensorboard missing: the JSONL file still has everything
                self.log.warning(f"TensorBoard disabled: {e}")

    def info(self, msg: str) -> None:
        self.log.info(msg)

    def warning(self, msg: str) -> None:
        self.log.warning(msg)

    def exception(self, msg: str) -> None:
        self.log.exception(msg)

    def round(self, record: dict, step: Optional[int] = None) -> None:
        append_line(self.metrics_path, json.dumps(record))
        if self.tb is not None:
            step = record.get("round", 0) if step is None else step
            for k, v in _flatten({k: v for k, v in record.items() if k != "round"}):
                self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        for h in list(self.log.handlers):
            h.close()
            self.log.removeHandler(h)


def read_metrics(run_dir) -> list:
    """The per-round records of a run (``metrics.jsonl``)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
