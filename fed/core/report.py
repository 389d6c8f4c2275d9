"""The test protocol (SPEC section 6) and its reports.

Every client model (or the global model, for a shared-model method) is scored on its client's test
split with batch 1 (every image counts): Dice, IoU, precision, recall (x100) and HD95 in pixels, per
client and over all clients' images. Outputs: a readable table, the paper-style LaTeX row,
``per_image.csv``, ``summary.json`` and prediction overlays.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Optional

from torch.utils.data import DataLoader

import networks
from datasets.dataset import SegDataset, collate_names
from datasets.federation import load_federation
from utils.checkpoint import CheckpointError, client_ckpt_name, global_ckpt_name
from utils.device import Amp, resolve_device
from utils.io import atomic_write_text
from utils.metrics import ScoreBook

from fed.core.registry import METHODS
from fed.core.evaluate import score_model

SPLIT_KEYS = {"test": "test_list", "val": "val_list"}


def checkpoint_paths(cfg, ckpt_dir, which: str = "best"):
    """Weights file per client, as the official naming: ``{arch}_{k}_{which}.pth``, or
    ``global_{arch}_{which}.pth`` for every client when the method shares one model."""
    ckpt_dir = Path(ckpt_dir)
    shared = METHODS[cfg.method].shared_model
    paths = []
    for k, arch in enumerate(cfg.models.clients):
        name = global_ckpt_name(cfg.models.server, which) if shared else client_ckpt_name(arch, k, which)
        paths.append(ckpt_dir / name)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise CheckpointError(
            f"checkpoint file(s) not found: {', '.join(missing)}. Expected the official names "
            f"{{arch}}_{{k}}_{which}.pth (client k, 0-based, arch from models.clients) in {ckpt_dir}; "
            f"released weights go to checkpoints/{{data}}/{{method}}/ (see checkpoints/README.md)")
    return paths


def evaluate_checkpoints(cfg, ckpt_dir, out_dir, data=None, device=None, split: str = "test",
                         which: str = "best", overlays: int = 8, progress: bool = True) -> dict:
    """Score the checkpoints of every client on ``split`` (fp32); write the reports into ``out_dir``.

    ``data``: the run's resolved file lists (default: resolved from ``cfg``)."""
    out_dir = Path(out_dir)
    paths = checkpoint_paths(cfg, ckpt_dir, which)
    data = data if data is not None else load_federation(cfg)
    data_items = [c[SPLIT_KEYS[split]] for c in data.clients]
    device = device if device is not None else resolve_device(cfg.device)
    amp = Amp.for_device(device, cfg.train.amp, cfg.train.channels_last)
    book = ScoreBook()
    from tqdm import tqdm

    rows = []
    for k, (site, arch) in enumerate(tqdm(list(zip(cfg.data.clients, cfg.models.clients)), desc="testing",
                                          disable=not progress or None, leave=False)):
        arch_k = cfg.models.server if METHODS[cfg.method].shared_model else arch
        model = networks.build_model(arch_k)
        networks.load_weights(model, paths[k], arch_k)
        model = model.to(device)
        ds = SegDataset(data_items[k], cfg.data.size, "eval", cache=False)
        loader = DataLoader(ds, batch_size=1, shuffle=False, num_workers=cfg.data.num_workers,
                            collate_fn=collate_names)
        score_model(model, loader, amp, book, f"client{k}", with_hd95=True,
                    overlay_dir=out_dir / "overlays" if overlays else None, overlays=overlays)
        rows.append({"client": k, "site": site, "arch": arch_k, "checkpoint": str(paths[k])})
    return write_report(book, rows, out_dir, split)


def write_report(book: ScoreBook, rows: list, out_dir, split: str = "test") -> dict:
    """Summaries per client (``rows``: client, site, arch, checkpoint) and over every image; writes
    ``summary.json``, ``per_image.csv`` and ``table.txt`` into ``out_dir``."""
    out_dir = Path(out_dir)
    summary = {f"client{r['client']}": book.summary(f"client{r['client']}", scale=100.0) for r in rows}
    summary["all"] = book.summary(None, scale=100.0)
    result = {"split": split, "clients": rows, "summary": summary}
    result["latex"] = latex_rows(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "summary.json", json.dumps(result, indent=2))
    with open(out_dir / "per_image.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["group", "name", "dice", "iou", "precision", "recall", "hd95"])
        w.writeheader()
        for r in book.rows:
            w.writerow({**r, **{k: f"{100 * r[k]:.4f}" for k in ("dice", "iou", "precision", "recall")},
                        "hd95": "" if r["hd95"] is None else f"{r['hd95']:.4f}"})
    atomic_write_text(out_dir / "table.txt", format_table(result) + "\n")
    return result


def _fmt(s: dict, key: str) -> str:
    m = s.get(key, {})
    if not m or m.get("n", 0) == 0 or math.isnan(m["mean"]):
        return "n/a"
    return f"{m['mean']:.2f} ± {m['std']:.2f}"


def format_table(result: dict) -> str:
    head = ["client", "site", "arch", "images", "Dice", "IoU", "Precision", "Recall", "HD95 (px)", "no HD95"]
    lines = []
    rows = result["clients"] + [{"client": "all", "site": "", "arch": ""}]
    for r in rows:
        key = f"client{r['client']}" if r["client"] != "all" else "all"
        s = result["summary"][key]
        lines.append([str(r["client"]), r["site"], r["arch"], str(s["images"]), _fmt(s, "dice"), _fmt(s, "iou"),
                      _fmt(s, "precision"), _fmt(s, "recall"), _fmt(s, "hd95"),
                      str(s.get("hd95", {}).get("left_out", 0))])
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))
    out = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines]
    out.append("LaTeX (Dice c1..cK avg / HD95 c1..cK avg):")
    out.append(result["latex"])
    return "\n".join(out)


def latex_rows(result: dict) -> str:
    """The paper's table cells: ``& mean \\tiny $\\pm$ std`` per client then overall, Dice then HD95."""
    keys = [f"client{r['client']}" for r in result["clients"]] + ["all"]

    def cells(metric):
        out = []
        for k in keys:
            m = result["summary"][k].get(metric, {})
            out.append("& --" if not m or m.get("n", 0) == 0 else f"& {m['mean']:.2f} \\tiny $\\pm$ {m['std']:.2f}")
        return " ".join(out)

    return f"{cells('dice')} {cells('hd95')} \\\\"
