"""The comparison table of several finished runs (SPEC section 6, the paper's Tables I and II).

``python test.py --compare runs/a runs/b --reference runs/hssf`` reads, for every run directory,
``test/per_image.csv`` (the test protocol's per-image scores: written by ``train.py`` at the end of a
run, or by ``test.py --out <run>/test``), ``metrics.jsonl`` (bytes and seconds of every round) and
``results.json`` / ``config.yaml`` (method, run name, client sites). It makes one row per method:

* per client and pooled ("avg": every test image of every client together, as the paper does, not the
  mean of the client means) mean ± std (sample std, ddof 1, as the test protocol) of each metric
  (default Dice in percent and HD95 in pixels; HD95 over the images where it is defined);
* the paired two-sided Wilcoxon signed-rank test (``scipy.stats.wilcoxon`` with its defaults: zero
  differences are dropped) of each method against the reference over the same test images, matched by
  (client group, image name), per client and pooled; for HD95 only the images where both runs define it.
  Runs whose test images differ are refused;
* the bytes of a round (mean over the rounds of the total of every client's ``up`` + ``down``, the
  message payloads the run counted) and the seconds of a round (mean of ``time_s``).

Outputs: a Markdown table (printed, ``compare.md``), booktabs LaTeX rows like the paper's
(``compare.tex``) and every number at full precision (``compare.csv``).

This module only reads files: it imports nothing from ``fed``, ``datasets`` or ``networks``.
"""
from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

#: per-image columns of ``per_image.csv``; all in percent except ``hd95`` (pixels, empty when undefined)
METRICS = ("dice", "iou", "precision", "recall", "hd95")
DEFAULT_METRICS = ("dice", "hd95")
LABELS = {"dice": "Dice", "iou": "IoU", "precision": "Precision", "recall": "Recall", "hd95": "HD95"}
UNITS = {"dice": "%", "iou": "%", "precision": "%", "recall": "%", "hd95": "px"}
AVG = "avg"
PER_IMAGE = Path("test") / "per_image.csv"
TEST_NAME = "two-sided Wilcoxon signed-rank test (scipy.stats.wilcoxon, zero differences dropped)"
ALPHA = 0.05  # the level the study table marks (*) a Holm-adjusted p below


class CompareError(ValueError):
    """A run directory that cannot be compared (missing or inconsistent files); the message names it."""


@dataclass
class Run:
    path: Path
    name: str
    method: str
    sites: List[str]
    #: (group, image name) -> {metric: value, or None where undefined}
    images: Dict[Tuple[str, str], Dict[str, Optional[float]]]
    rounds: int
    up: Optional[float] = None  # mean bytes per round, every client's ``up`` summed
    down: Optional[float] = None
    time_s: Optional[float] = None
    label: str = ""
    groups: List[str] = field(default_factory=list)

    @property
    def bytes(self) -> Optional[float]:
        return None if self.up is None else self.up + self.down


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CompareError(f"{path}: cannot be read as JSON ({e})") from e


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        out = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CompareError(f"{path}: cannot be read as YAML ({e})") from e
    return out if isinstance(out, dict) else {}


def _missing_per_image(run: Path) -> CompareError:
    has_table = [p.relative_to(run).as_posix() for p in (run / "test_table.txt", run / "test" / "table.txt",
                                                         run / "results.json") if p.is_file()]
    what = (f"it holds only summaries ({', '.join(has_table)}), not the per-image test scores that the "
            f"paired test needs" if has_table else "the per-image test scores are missing")
    ck = run / "checkpoints"
    fix = (f"write them from the run's checkpoints with `python test.py --config {run / 'config.yaml'} "
           f"--checkpoints {ck} --out {run / 'test'}`" if ck.is_dir() else
           "this folder has no checkpoints/ to re-score (the committed logs/ folders keep only the logs): "
           "train the run again (train.py writes test/per_image.csv at its end)")
    return CompareError(f"{run}: no {PER_IMAGE.as_posix()}: {what}; {fix}")


def _float(v: str, where: str) -> Optional[float]:
    v = (v or "").strip()
    if v == "":
        return None
    try:
        x = float(v)
    except ValueError:
        raise CompareError(f"{where}: {v!r} is not a number") from None
    return None if math.isnan(x) else x


def read_per_image(path: Path) -> Dict[Tuple[str, str], Dict[str, Optional[float]]]:
    """``per_image.csv`` -> {(group, name): {metric: value or None}}; duplicate images are refused."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        missing = [c for c in ("group", "name") if c not in cols]
        if missing:
            raise CompareError(f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(cols) or 'none'})")
        out: Dict[Tuple[str, str], Dict[str, Optional[float]]] = {}
        for i, row in enumerate(reader, start=2):
            key = (row["group"], row["name"])
            if key in out:
                raise CompareError(f"{path}, line {i}: image {key[1]!r} of {key[0]} is listed twice")
            out[key] = {m: _float(row[m], f"{path}, line {i}, column {m}") for m in METRICS if m in cols}
    if not out:
        raise CompareError(f"{path}: no images")
    return out


def read_rounds(path: Path) -> List[dict]:
    recs = []
    with open(path) as f:
        for i, line in enumerate(f, start=1):
            if line.strip():
                try:
                    recs.append(json.loads(line))
                except ValueError as e:
                    raise CompareError(f"{path}, line {i}: not JSON ({e})") from e
    return recs


def load_run(path, metrics: Sequence[str] = DEFAULT_METRICS) -> Run:
    """Read one run directory; a :class:`CompareError` names the directory and the file it lacks."""
    run = Path(path)
    if not run.is_dir():
        raise CompareError(f"{run}: no such run directory")
    config = _read_yaml(run / "config.yaml") if (run / "config.yaml").is_file() else {}
    results = _read_json(run / "results.json") if (run / "results.json").is_file() else {}
    method = results.get("method") or config.get("method")
    if not method:
        raise CompareError(f"{run}: neither results.json nor config.yaml (both missing or without `method`) "
                           f"says which method the run trained")
    name = results.get("name") or config.get("name") or run.name
    sites = list((config.get("data") or {}).get("clients") or [])
    if not (run / PER_IMAGE).is_file():
        raise _missing_per_image(run)
    images = read_per_image(run / PER_IMAGE)
    have = next(iter(images.values())).keys()
    lacking = [m for m in metrics if m not in have]
    if lacking:
        raise CompareError(f"{run / PER_IMAGE}: no column(s) {', '.join(lacking)}")
    if not (run / "metrics.jsonl").is_file():
        raise CompareError(f"{run}: no metrics.jsonl (the per-round record with bytes and time_s)")
    recs = read_rounds(run / "metrics.jsonl")
    if not recs:
        raise CompareError(f"{run}/metrics.jsonl: no rounds recorded")
    out = Run(path=run, name=name, method=method, sites=sites, images=images, rounds=len(recs))
    with_bytes = [r["bytes"] for r in recs if isinstance(r.get("bytes"), dict)]
    if len(with_bytes) == len(recs):
        out.up = float(np.mean([sum(b.get("up", 0) for b in r.values()) for r in with_bytes]))
        out.down = float(np.mean([sum(b.get("down", 0) for b in r.values()) for r in with_bytes]))
    times = [r["time_s"] for r in recs if isinstance(r.get("time_s"), (int, float))]
    if len(times) == len(recs):
        out.time_s = float(np.mean(times))
    out.groups = sorted({g for g, _ in images}, key=_natural)
    return out


def check_same_images(ref: Run, run: Run) -> None:
    """Refuse a run whose test images (client group, image name) differ from the reference's."""
    a, b = set(ref.images), set(run.images)
    if a == b:
        return
    only_ref, only_run = sorted(a - b), sorted(b - a)

    def show(keys):
        return ", ".join(f"{g}:{n}" for g, n in keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

    parts = [f"{run.path} and the reference {ref.path} were tested on different images "
             f"({len(b)} vs {len(a)}, {len(a & b)} in common), so they cannot be paired"]
    if only_ref:
        parts.append(f"only in the reference: {show(only_ref)}")
    if only_run:
        parts.append(f"only in {run.path}: {show(only_run)}")
    parts.append("compare runs of the same data, split and clients")
    raise CompareError("; ".join(parts))


def mean_std(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation (ddof 1, as the test protocol); std 0 for one value."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def _keys(run: Run, column: str) -> List[Tuple[str, str]]:
    return sorted(k for k in run.images if column == AVG or k[0] == column)


def column_stats(run: Run, metric: str, column: str) -> dict:
    """mean, std, n of ``metric`` over the column's images (``avg``: all); ``left_out``: undefined values."""
    vals = [run.images[k][metric] for k in _keys(run, column)]
    defined = [v for v in vals if v is not None]
    return {**mean_std(defined), "left_out": len(vals) - len(defined)}


def wilcoxon_p(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Two-sided Wilcoxon signed-rank p-value of the pairs (x_i, y_i); scipy's defaults (zero differences
    dropped). None without pairs; 1.0 when every difference is zero (nothing tells the runs apart)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size == 0:
        return None
    if not np.any(x != y):
        return 1.0
    from scipy.stats import wilcoxon

    return float(wilcoxon(x, y, alternative="two-sided").pvalue)


def holm(ps: Sequence[Optional[float]]) -> List[Optional[float]]:
    """Holm's step-down adjustment of a family of p-values (the ones that are not None): the i-th smallest
    of m is multiplied by m - i + 1, then made non-decreasing in that order and capped at 1. It controls
    the chance of any false rejection in the family, whatever the dependence between the tests."""
    idx = sorted((i for i, p in enumerate(ps) if p is not None), key=lambda i: ps[i])
    out: List[Optional[float]] = [None] * len(ps)
    running = 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, ps[i] * (len(idx) - rank)))
        out[i] = running
    return out


def paired_test(ref: Run, run: Run, metric: str, column: str) -> dict:
    """p-value and number of pairs: the column's images, only those where both runs define the metric."""
    keys = [k for k in _keys(ref, column) if ref.images[k][metric] is not None and run.images[k][metric] is not None]
    x = [run.images[k][metric] for k in keys]
    y = [ref.images[k][metric] for k in keys]
    return {"p": wilcoxon_p(x, y), "n": len(keys)}


def compare(runs: Sequence, reference, metrics: Sequence[str] = DEFAULT_METRICS) -> dict:
    """The table: ``runs`` (paths or :class:`Run`) plus ``reference``, one row each (the reference last
    unless it is among ``runs``)."""
    metrics = list(dict.fromkeys(metrics))
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise CompareError(f"unknown metric(s) {', '.join(bad) or '(none)'}; choose from {', '.join(METRICS)}")
    load = lambda r: r if isinstance(r, Run) else load_run(r, metrics)
    ref = load(reference)
    rows: List[Run] = []
    seen = set()
    for r in list(runs) + [ref]:
        r = load(r)
        key = r.path.resolve()
        if key in seen:
            continue
        seen.add(key)
        rows.append(ref if key == ref.path.resolve() else r)
    for r in rows:
        check_same_images(ref, r)
    _label(rows)
    columns = ref.groups + [AVG]
    sites = {g: (ref.sites[int(g[len("client"):])] if g.startswith("client") and g[len("client"):].isdigit()
                 and int(g[len("client"):]) < len(ref.sites) else g) for g in ref.groups}
    sites[AVG] = AVG
    table = []
    for r in rows:
        is_ref = r is ref
        table.append({
            "label": r.label, "run": str(r.path), "name": r.name, "method": r.method, "reference": is_ref,
            "stats": {m: {c: column_stats(r, m, c) for c in columns} for m in metrics},
            "tests": None if is_ref else {m: {c: paired_test(ref, r, m, c) for c in columns} for m in metrics},
            "rounds": r.rounds, "bytes_up": r.up, "bytes_down": r.down, "bytes": r.bytes, "time_s": r.time_s,
        })
    return {"reference": {"label": ref.label, "run": str(ref.path)}, "metrics": metrics, "columns": columns,
            "sites": sites, "images": {c: len(_keys(ref, c)) for c in columns}, "rows": table}


def _label(rows: List[Run]) -> None:
    """A row's name: the method, and the run's folder where methods repeat."""
    counts: Dict[str, int] = {}
    for r in rows:
        counts[r.method] = counts.get(r.method, 0) + 1
    for r in rows:
        r.label = r.method if counts[r.method] == 1 else f"{r.method} ({r.path.name})"
    labels = [r.label for r in rows]
    for r in rows:
        if labels.count(r.label) > 1:
            r.label = f"{r.method} ({r.path})"


# --- formatting ---------------------------------------------------------------------------------------------

def human_bytes(n: Optional[float]) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def human_seconds(s: Optional[float]) -> str:
    if s is None:
        return "n/a"
    return f"{s:.1f} s" if s < 600 else f"{s / 60:.1f} min"


def fmt_p(p: Optional[float]) -> str:
    if p is None:
        return "n/a"
    return f"{p:.3f}" if p >= 1e-3 else f"{p:.2e}"


def fmt_mean_std(s: dict, sep: str = " ± ") -> str:
    if s["n"] == 0:
        return "n/a"
    return f"{s['mean']:.2f}{sep}{s['std']:.2f}"


def caption(result: dict) -> str:
    ref = result["reference"]
    cols = ", ".join(f"c{i + 1} = {result['sites'][g]}" for i, g in enumerate(result["columns"][:-1]))
    ms = ", ".join(f"{LABELS[m]} ({UNITS[m]})" for m in result["metrics"])
    n_all = result["images"][AVG]
    parts = [f"{ms}: mean ± std over test images; {cols}; avg pools all {n_all} test images of every client "
             f"(not the mean of the client means)."]
    if "hd95" in result["metrics"]:
        parts.append("HD95 counts only the images where it is defined (non-empty prediction and ground truth).")
    parts.append(f"p: {TEST_NAME} of each method against the reference {ref['label']} ({ref['run']}) on the "
                 f"per-image " + " and ".join(LABELS[m] for m in result["metrics"])
                 + ", paired by client and image name" + (" (HD95: images where both runs define it)"
                                                          if "hd95" in result["metrics"] else "") + ".")
    parts.append("Bytes/round: mean over rounds of the bytes all clients sent to the server plus received from it "
                 "(message payloads, metrics.jsonl `up` + `down`); time/round: mean `time_s` of a round "
                 "(training, evaluation and state writing; depends on the machine).")
    return " ".join(parts)


def _header_cells(result: dict, latex: bool = False) -> List[str]:
    cells = ["method"]
    for m in result["metrics"]:
        for i, c in enumerate(result["columns"]):
            cells.append(f"{LABELS[m]} {'avg' if c == AVG else f'c{i + 1}'}" + ("" if c == AVG or latex
                                                                             else f" ({result['sites'][c]})"))
        cells.append(f"p {LABELS[m]} avg")
    cells += ["bytes/round", "time/round"]
    return cells


def _row_cells(row: dict, result: dict) -> List[str]:
    cells = [row["label"]]
    for m in result["metrics"]:
        cells += [fmt_mean_std(row["stats"][m][c]) for c in result["columns"]]
        cells.append("–" if row["reference"] else fmt_p(row["tests"][m][AVG]["p"]))
    cells += [human_bytes(row["bytes"]), human_seconds(row["time_s"])]
    return cells


def _md_table(head: List[str], rows: List[List[str]]) -> List[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows]


def format_markdown(result: dict) -> str:
    out = ["## Comparison against " + result["reference"]["label"], "", caption(result), ""]
    out += _md_table(_header_cells(result), [_row_cells(r, result) for r in result["rows"]])
    others = [r for r in result["rows"] if not r["reference"]]
    if others:
        out += ["", f"Paired tests per column against {result['reference']['label']}: p-value (number of pairs), "
                    f"{TEST_NAME}.", ""]
        head = ["method"] + [f"p {LABELS[m]} {'avg' if c == AVG else f'c{i + 1}'}" for m in result["metrics"]
                             for i, c in enumerate(result["columns"])]
        rows = [[r["label"]] + [f"{fmt_p(r['tests'][m][c]['p'])} ({r['tests'][m][c]['n']})"
                                for m in result["metrics"] for c in result["columns"]] for r in others]
        out += _md_table(head, rows)
    if "hd95" in result["metrics"]:
        out += ["", "HD95 undefined (left out): " + ", ".join(
            f"{r['label']} {r['stats']['hd95'][AVG]['left_out']}/{result['images'][AVG]}" for r in result["rows"]) + "."]
    return "\n".join(out) + "\n"


def _tex(s: str) -> str:
    return (s.replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")
            .replace("#", r"\#").replace("$", r"\$").replace("{", r"\{").replace("}", r"\}"))


def _tex_p(p: Optional[float]) -> str:
    if p is None:
        return "--"
    if p >= 1e-3:
        return f"{p:.3f}"
    mant, exp = f"{p:.2e}".split("e")
    return f"${mant}\\times10^{{{int(exp)}}}$"


def format_latex(result: dict) -> str:
    """booktabs rows like the paper's: ``& mean \\tiny $\\pm$ std`` per client and avg, p after each metric."""
    K1 = len(result["columns"])
    M = len(result["metrics"])
    spec = "l" + ("c" * (K1 + 1)) * M + "rr"
    out = [f"% {caption(result)}",
           "% generated by `python test.py --compare` (utils/compare.py); needs \\usepackage{booktabs,multirow}",
           f"\\begin{{tabular}}{{{spec}}}", "\\toprule"]
    groups = ["\\multirow{2}{*}{Method}"] + [f"\\multicolumn{{{K1 + 1}}}{{c}}{{{LABELS[m]} ({_tex(UNITS[m])})}}"
                                           for m in result["metrics"]] + ["\\multirow{2}{*}{Bytes/round}",
                                                                          "\\multirow{2}{*}{Time/round}"]
    out.append(" & ".join(groups) + " \\\\")
    out.append(" ".join(f"\\cmidrule(lr){{{2 + j * (K1 + 1)}-{1 + (j + 1) * (K1 + 1)}}}" for j in range(M)))
    sub = [""]
    for m in result["metrics"]:
        sub += [_tex(result["sites"][c]) for c in result["columns"]] + ["$p$"]
    out.append(" & ".join(sub + ["", ""]) + " \\\\")
    out.append("\\midrule")
    for r in result["rows"]:
        cells = [_tex(r["label"])]
        for m in result["metrics"]:
            for c in result["columns"]:
                s = r["stats"][m][c]
                cells.append("--" if s["n"] == 0 else f"{s['mean']:.2f} \\tiny $\\pm$ {s['std']:.2f}")
            cells.append("--" if r["reference"] else _tex_p(r["tests"][m][AVG]["p"]))
        cells += [_tex(human_bytes(r["bytes"])), _tex(human_seconds(r["time_s"]))]
        out.append(" & ".join(cells) + " \\\\")
    out += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(out) + "\n"


def csv_rows(result: dict) -> Tuple[List[str], List[dict]]:
    """Every number at full precision, one row per method."""
    fields = ["method", "label", "run", "name", "reference"]
    for m in result["metrics"]:
        for c in result["columns"]:
            fields += [f"{m}_{c}_mean", f"{m}_{c}_std", f"{m}_{c}_n"] + ([f"{m}_{c}_left_out"] if m == "hd95" else [])
        for c in result["columns"]:
            fields += [f"p_{m}_{c}", f"pairs_{m}_{c}"]
    fields += ["rounds", "bytes_up_per_round", "bytes_down_per_round", "bytes_per_round", "time_s_per_round"]
    num = lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else repr(v)
    rows = []
    for r in result["rows"]:
        d = {"method": r["method"], "label": r["label"], "run": r["run"], "name": r["name"],
             "reference": int(r["reference"])}
        for m in result["metrics"]:
            for c in result["columns"]:
                s = r["stats"][m][c]
                d.update({f"{m}_{c}_mean": num(s["mean"]), f"{m}_{c}_std": num(s["std"]), f"{m}_{c}_n": s["n"]})
                if m == "hd95":
                    d[f"{m}_{c}_left_out"] = s["left_out"]
                t = None if r["reference"] else r["tests"][m][c]
                d[f"p_{m}_{c}"] = "" if t is None else num(t["p"])
                d[f"pairs_{m}_{c}"] = "" if t is None else t["n"]
        d.update({"rounds": r["rounds"], "bytes_up_per_round": num(r["bytes_up"]),
                  "bytes_down_per_round": num(r["bytes_down"]), "bytes_per_round": num(r["bytes"]),
                  "time_s_per_round": num(r["time_s"])})
        rows.append(d)
    return fields, rows


def _write_tables(out_dir, stem: str, md: str, tex: str, table: Tuple[List[str], List[dict]]) -> Dict[str, Path]:
    """``<stem>.md``, ``<stem>.tex`` and ``<stem>.csv`` (``table``: fields and rows) in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("md", "tex", "csv")}
    paths["md"].write_text(md)
    paths["tex"].write_text(tex)
    fields, rows = table
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return paths


def write_outputs(result: dict, out_dir) -> Dict[str, Path]:
    return _write_tables(out_dir, "compare", format_markdown(result), format_latex(result), csv_rows(result))


def default_out(reference) -> Path:
    """``<reference's parent>/compare`` (``runs/compare`` for a reference in ``runs/``)."""
    p = Path(reference)
    if p.name in ("", ".", ".."):
        p = p.resolve()
    return p.parent / "compare"


# --- several seeds per row (bench/study.py) ---------------------------------------------------------------

@dataclass
class SeedRow:
    """One row of a seeded study: the runs of every seed, scored at the best-validation checkpoints
    (``best``) and at the last round (``last``), merged into one :class:`Run` per-image mean over seeds."""

    label: str
    best: List[Run]
    last: List[Run]
    #: client group -> architecture (``client0`` -> ``resnet18``); empty for a floor row
    archs: Dict[str, str] = field(default_factory=dict)
    #: labeled public-set passes per client per round (None: not applicable)
    labeled_passes: Optional[float] = None
    #: validation curves: one list of (round, pooled val Dice) per seed
    curves: List[List[Tuple[int, float]]] = field(default_factory=list)


def merge_seeds(runs: Sequence[Run], label: str) -> Run:
    """One :class:`Run` whose per-image scores are the mean over ``runs`` (the seeds of one row) of each
    image's scores; HD95 over the seeds where it is defined (None where it is defined in none). Bytes and
    seconds per round: the mean over the seeds. The seeds must have been tested on the same images."""
    if not runs:
        raise CompareError(f"{label}: no finished seed")
    first = runs[0]
    for r in runs[1:]:
        check_same_images(first, r)
    images = {}
    for key in first.images:
        row = {}
        for m in first.images[key]:
            vals = [r.images[key][m] for r in runs if r.images[key].get(m) is not None]
            row[m] = float(np.mean(vals)) if vals else None
        images[key] = row
    mean = lambda xs: None if any(x is None for x in xs) else float(np.mean(xs))
    out = Run(path=first.path.parent, name=label, method=first.method, sites=first.sites, images=images,
              rounds=first.rounds, up=mean([r.up for r in runs]), down=mean([r.down for r in runs]),
              time_s=mean([r.time_s for r in runs]))
    out.groups = first.groups
    return out


def pooled(run: Run, metric: str, groups: Optional[Sequence[str]] = None) -> Optional[float]:
    """Mean of ``metric`` over every image of ``groups`` (all: None) where it is defined."""
    vals = [v[metric] for (g, _), v in run.images.items()
            if (groups is None or g in groups) and v.get(metric) is not None]
    return float(np.mean(vals)) if vals else None


def seed_stats(row: SeedRow, metrics: Sequence[str]) -> dict:
    """Mean ± std over the seeds of the pooled scores, at ``best`` and ``last``, for all clients and per
    client architecture (a homogeneous row has one: its pooled score, to set beside the heterogeneous
    rows' clients of that architecture)."""
    by_arch: Dict[str, List[str]] = {}
    for g, a in row.archs.items():
        by_arch.setdefault(a, []).append(g)
    parts = {"all": None, **by_arch}
    out = {"seeds": len(row.best)}
    for which, runs in (("best", row.best), ("last", row.last)):
        for part, groups in parts.items():
            for m in metrics:
                vals = [pooled(r, m, groups) for r in runs]
                vals = [v for v in vals if v is not None]
                out[f"{m}_{which}_{part}"] = mean_std(vals)
    return out


def compare_seeds(rows: Sequence[SeedRow], reference: str, metrics: Sequence[str] = DEFAULT_METRICS) -> dict:
    """The study table: :func:`compare` of every row's seed-averaged per-image scores (best-validation
    checkpoints; the paired Wilcoxon test against the ``reference`` row on those means), plus each row's
    mean ± std over seeds (:func:`seed_stats`) and labeled budget."""
    merged = {r.label: merge_seeds(r.best, r.label) for r in rows}
    folders = [m.path.resolve() for m in merged.values()]
    if len(set(folders)) < len(folders):
        raise CompareError("rows must keep their seeds in folders of their own (<row>/s<seed>): "
                           + ", ".join(f"{k} in {m.path}" for k, m in merged.items()))
    if reference not in merged:
        raise CompareError(f"reference row {reference!r} has no finished seed (rows: {', '.join(merged)})")
    result = compare([merged[r.label] for r in rows], merged[reference], metrics)
    by_label = {r.label: r for r in rows}
    for tr in result["rows"]:
        tr["label"] = tr["name"]
        row = by_label[tr["name"]]
        tr["seeds"] = seed_stats(row, metrics)
        tr["labeled_passes"] = row.labeled_passes
    tested = [tr for tr in result["rows"] if not tr["reference"]]
    for m in result["metrics"]:  # the family: every row tested against the reference, per metric
        for tr, q in zip(tested, holm([tr["tests"][m][AVG]["p"] for tr in tested])):
            tr["tests"][m][AVG]["p_holm"] = q
    archs = sorted({a for r in rows for a in r.archs.values()})
    result["arch_parts"] = archs if len(archs) > 1 else []  # one column per architecture in the table
    result["reference"]["label"] = reference
    return result


def _seed_cell(stats: dict) -> str:
    return "n/a" if stats["n"] == 0 else (f"{stats['mean']:.2f} ± {stats['std']:.2f}" if stats["n"] > 1
                                          else f"{stats['mean']:.2f}")


def format_seed_markdown(result: dict, title: str = "", notes: Sequence[str] = ()) -> str:
    """The study table: per row, over seeds, the pooled test scores at the best-validation checkpoints and
    at the last round, per architecture where clients differ, the Wilcoxon p against the reference (on the
    per-image scores averaged over seeds), the labeled budget, bytes and seconds per round; then the
    per-client table of :func:`format_markdown` (means over images of the seed-averaged scores)."""
    ms = result["metrics"]
    head = ["row", "seeds"]
    for m in ms:
        head += [f"{LABELS[m]} best", f"{LABELS[m]} last"]
    for a in result["arch_parts"]:
        head.append(f"Dice best {a}")
    head += [f"p {LABELS[m]}" for m in ms] + ["labeled passes/round", "bytes/round", "time/round"]
    rows = []
    for r in result["rows"]:
        s = r["seeds"]
        cells = [r["label"], str(s["seeds"])]
        for m in ms:
            cells += [_seed_cell(s[f"{m}_best_all"]), _seed_cell(s[f"{m}_last_all"])]
        for a in result["arch_parts"]:
            st = s.get(f"dice_best_{a}")
            cells.append("–" if st is None else _seed_cell(st))
        cells += ["–" if r["reference"] else _p_holm_cell(r["tests"][m][AVG]) for m in ms]
        lp = r["labeled_passes"]
        cells += ["–" if lp is None else f"{lp:g}", human_bytes(r["bytes"]), human_seconds(r["time_s"])]
        rows.append(cells)
    out = ([f"## {title}", ""] if title else []) + list(notes) + ([""] if notes else [])
    out += [f"Pooled test scores over all {result['images'][AVG]} test images (Dice in %, HD95 in px): mean ± std "
            f"over seeds of each seed's pooled mean; best = the best-validation checkpoints, last = the last "
            f"round. p: {TEST_NAME} against {result['reference']['label']} on the per-image scores averaged "
            f"over seeds (best checkpoints), all clients pooled; * marks a p that stays below {ALPHA:g} after "
            f"Holm's correction for the {sum(not r['reference'] for r in result['rows'])} rows tested against "
            f"{result['reference']['label']} (per metric). Labeled passes: passes over the labeled public set "
            f"per client per round.", ""]
    out += _md_table(head, rows)
    out += ["", "Per client (mean ± std over test images of the seed-averaged per-image scores):", ""]
    per = format_markdown(result).split("\n")
    out += per[4:]  # the table and the paired tests, without its heading and caption
    return "\n".join(out).rstrip() + "\n"


def holm_significant(test: dict) -> bool:
    """Whether a test's Holm-adjusted p (:func:`compare_seeds`) is below :data:`ALPHA`."""
    return test.get("p_holm") is not None and test["p_holm"] < ALPHA


def _p_holm_cell(test: dict) -> str:
    return fmt_p(test["p"]) + (" *" if holm_significant(test) else "")


def seed_csv_rows(result: dict) -> Tuple[List[str], List[dict]]:
    """:func:`csv_rows` plus the over-seed statistics, the Holm-adjusted p and the labeled budget."""
    fields, rows = csv_rows(result)
    extra = []
    for r, d in zip(result["rows"], rows):
        for m in result["metrics"]:
            q = None if r["reference"] else r["tests"][m][AVG].get("p_holm")
            d[f"p_holm_{m}_{AVG}"] = "" if q is None else repr(q)
        d["labeled_passes"] = "" if r["labeled_passes"] is None else repr(r["labeled_passes"])
        for k, st in r["seeds"].items():
            if k == "seeds":
                d["seeds"] = st
                continue
            for q in ("mean", "std", "n"):
                d[f"{k}_seeds_{q}"] = "" if st["n"] == 0 else repr(st[q])
        for k in d:
            if k not in fields and k not in extra:
                extra.append(k)
    return fields + extra, rows


def format_seed_latex(result: dict) -> str:
    """booktabs rows: Dice and HD95 (mean ± std over seeds) at best and last, p ($^*$: below 0.05 after
    Holm's correction), labeled passes."""
    ms = result["metrics"]
    out = ["% generated by bench/study.py (utils/compare.py); needs \\usepackage{booktabs}",
           f"\\begin{{tabular}}{{l{'cc' * len(ms)}{'c' * len(ms)}r}}", "\\toprule",
           " & ".join(["Method"] + [f"{LABELS[m]} {w}" for m in ms for w in ("best", "last")]
                      + [f"$p$ {LABELS[m]}" for m in ms] + ["Labeled passes"]) + " \\\\", "\\midrule"]
    cell = lambda st: "--" if st["n"] == 0 else f"{st['mean']:.2f} \\tiny $\\pm$ {st['std']:.2f}"
    for r in result["rows"]:
        s = r["seeds"]
        cells = [_tex(r["label"])] + [cell(s[f"{m}_{w}_all"]) for m in ms for w in ("best", "last")]
        cells += ["--" if r["reference"] else
                  _tex_p(r["tests"][m][AVG]["p"]) + ("$^*$" if holm_significant(r["tests"][m][AVG]) else "") for m in ms]
        cells.append("--" if r["labeled_passes"] is None else f"{r['labeled_passes']:g}")
        out.append(" & ".join(cells) + " \\\\")
    return "\n".join(out + ["\\bottomrule", "\\end{tabular}"]) + "\n"


def write_seed_outputs(result: dict, out_dir, title: str = "", notes: Sequence[str] = ()) -> Dict[str, Path]:
    return _write_tables(out_dir, "table", format_seed_markdown(result, title, notes), format_seed_latex(result),
                         seed_csv_rows(result))
