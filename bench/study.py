"""A seeded study: every row of a grid, over seeds, one run at a time, resumable; then the table.

``python -m bench.study studies/main.yaml`` runs each cell (row x seed) as its own run under
``runs/study/<study>/<row>/s<seed>`` (``python train.py`` in a subprocess), skipping finished cells and
continuing a killed one with ``--resume``, so the study can be stopped at any moment and continued later.
After each cell it scores the last round's checkpoints too (``test.py --which last``), copies the cell's
logs (never checkpoints) to ``logs/study/<study>/`` and rewrites the table and the figure from every
finished cell. ``--table`` only rebuilds them; ``--dry-run`` lists the cells and what they would run;
``--only ROW...`` restricts the cells; ``--max-cells N`` stops after N cells of this call. A cell with no
run folder whose committed logs hold a finished run of the same config counts as done, so a fresh clone
continues a study from ``logs/study/<study>/`` (a changed config runs the cell again).

A study file::

    name: main
    base: configs/study.yaml          # every cell starts from this config
    seeds: [0, 1, 2]                  # default seeds of a row
    reference: hssf                   # the row every other one is tested against
    set: [train.rounds=8]             # overrides common to every row (optional)
    floor: true                       # add the all-foreground row (default true)
    pairs: [[hssf, hssf_no_kl]]       # rows also tested against each other, on the seeds both have
    rows:
      hssf: {method: hssf}
      hssf_no_kl: {method: hssf, set: [hssf.kl_theta=0], seeds: [0, 1]}
      lssl_r18: {method: lssl, set: ["models.server=resnet18", "models.clients=[resnet18, resnet18, resnet18, resnet18]"]}

The seed of a cell (``seed``) changes initialisation, data order, augmentation and noise; the split is
the base config's ``data.split`` and stays fixed unless a row's ``set`` changes it. Cells run in seed
order (every row's first seed, then every row's second seed...), so a study cut short still has rows to
compare. The table (:func:`utils.compare.compare_seeds`, the same code as ``test.py --compare``): per row,
mean ± std over seeds of pooled test Dice and HD95 at the best-validation checkpoints and at the last
round, per client architecture, the paired two-sided Wilcoxon test against the reference on the per-image
scores averaged over seeds, labeled passes per client per round, bytes and seconds per round; Markdown,
CSV and LaTeX, and ``curves.png``: pooled validation Dice per round, mean and band (min-max) over seeds.
The table says whether its floor holds: the ``public_only`` row must clear the all-foreground row by at
least 15 pooled test Dice, or the table is marked as no evidence. ``pairs`` adds a section below the
table: for each pair (A, B), on the seeds both rows have, the mean ± std over those seeds of pooled test
Dice and HD95 of each, B - A, and the same Wilcoxon test of B against A.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FLOOR = "all_foreground"
PUBLIC_ONLY = "public_only"
FLOOR_MARGIN = 15.0  # pooled test Dice points public_only must clear all_foreground by
ROW_KEYS = {"method", "set", "seeds", "labeled_passes"}
STUDY_KEYS = {"name", "base", "seeds", "reference", "set", "rows", "floor", "runs", "logs", "pairs"}
COPIED = ("config.yaml", "metrics.jsonl", "results.json", "train.log", "test/per_image.csv",
          "test/summary.json", "test_last/per_image.csv", "test_last/summary.json")


class StudyError(ValueError):
    pass


# --- the study file ---------------------------------------------------------------------------------------

def load_study(path) -> dict:
    path = Path(path)
    try:
        s = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise StudyError(f"{path}: cannot be read ({e})") from None
    if not isinstance(s, dict):
        raise StudyError(f"{path}: expected a mapping with keys {', '.join(sorted(STUDY_KEYS))}")
    bad = sorted(set(s) - STUDY_KEYS)
    if bad:
        raise StudyError(f"{path}: unknown key(s) {', '.join(bad)} (valid: {', '.join(sorted(STUDY_KEYS))})")
    for k in ("name", "base", "rows"):
        if k not in s:
            raise StudyError(f"{path}: missing key {k!r}")
    if not isinstance(s["rows"], dict) or not s["rows"]:
        raise StudyError(f"{path}: rows must map row names to {{method, set, seeds}}")
    s.setdefault("seeds", [0])
    s.setdefault("set", [])
    s.setdefault("floor", True)
    s.setdefault("reference", next(iter(s["rows"])))
    rows = {}
    for name, row in s["rows"].items():
        row = dict(row or {})
        bad = sorted(set(row) - ROW_KEYS)
        if bad:
            raise StudyError(f"{path}: rows.{name}: unknown key(s) {', '.join(bad)} (valid: {', '.join(sorted(ROW_KEYS))})")
        if name == FLOOR or "/" in name or name.startswith("."):
            raise StudyError(f"{path}: rows.{name}: reserved or invalid row name")
        row.setdefault("method", None)
        row["set"] = list(s["set"]) + list(row.get("set") or [])
        row["seeds"] = list(row.get("seeds") or s["seeds"])
        rows[name] = row
    if s["reference"] not in rows:
        raise StudyError(f"{path}: reference {s['reference']!r} is not a row ({', '.join(rows)})")
    pairs = s.get("pairs") or []
    if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
        raise StudyError(f"{path}: pairs must be a list of [row, row]")
    for a, b in pairs:
        for r in (a, b):
            if r not in rows:
                raise StudyError(f"{path}: pairs: {r!r} is not a row ({', '.join(rows)})")
        if a == b:
            raise StudyError(f"{path}: pairs: [{a}, {b}] pairs a row with itself")
    s["pairs"] = [list(p) for p in pairs]
    s["rows"] = rows
    s["runs"] = Path(s.get("runs") or ROOT / "runs" / "study" / s["name"])
    s["logs"] = Path(s.get("logs") or ROOT / "logs" / "study" / s["name"])
    s["base"] = str(s["base"])
    s["path"] = path
    return s


def cells(study: dict) -> List[dict]:
    """Every (row, seed) in seed order: each row's first seed, then each row's second..."""
    out = []
    depth = max(len(r["seeds"]) for r in study["rows"].values())
    for i in range(depth):
        for name, row in study["rows"].items():
            if i < len(row["seeds"]):
                seed = row["seeds"][i]
                out.append({"row": name, "seed": seed, "dir": study["runs"] / name / f"s{seed}",
                            "logged": study["logs"] / name / f"s{seed}",
                            "overrides": _overrides(study, name, row, seed)})
    return out


def _overrides(study, name, row, seed) -> List[str]:
    out = list(row["set"])
    if row["method"]:
        out.append(f"method={row['method']}")
    return out + [f"seed={seed}", f"name={study['name']}_{name}_s{seed}",
                  f"output.dir={study['runs'] / name / f's{seed}'}"]


def check_configs(study: dict) -> Dict[str, object]:
    """Load every cell's config (every problem at once, before anything runs)."""
    from fed import load_config
    from utils.config import ConfigError

    cfgs, problems, bad = {}, [], set()
    for c in cells(study):
        if c["row"] in bad:
            continue
        try:
            cfgs[(c["row"], c["seed"])] = load_config(study["base"], c["overrides"])
        except ConfigError as e:
            bad.add(c["row"])
            problems.append(f"rows.{c['row']} (seed {c['seed']}): {e}")
    if problems:
        raise StudyError(f"{study['path']}: " + "\n  ".join(problems))
    return cfgs


def labeled_passes(cfg, row: dict) -> Optional[float]:
    """Passes over the labeled public set per client per round: HSSF's clients train on D_p in every
    Regularity Fusion pass; every other method makes one supervised pass on D_p per local epoch."""
    if row.get("labeled_passes") is not None:
        return float(row["labeled_passes"])
    if cfg.method == "hssf":
        return float(cfg.train.fusion_epochs)
    return float(cfg.train.local_epochs)


# --- running ------------------------------------------------------------------------------------------------

def cell_state(d: Path, logged: Optional[Path] = None, cfg=None) -> str:
    """``done`` / ``untested`` / ``resume`` from the run folder ``d``; a cell with nothing there is
    ``logged`` when its committed logs (``logged``) hold a finished cell of the same config ``cfg`` (a
    fresh clone continues a study from ``logs/study/`` without running its finished cells again),
    otherwise ``new``."""
    if (d / "results.json").is_file() and (d / "test_last" / "per_image.csv").is_file():
        return "done"
    if (d / "results.json").is_file():
        return "untested"
    if (d / "state" / "last.json").is_file():
        return "resume"
    if logged is not None and cfg is not None and logged_matches(logged, cfg):
        return "logged"
    return "new"


def _comparable(cfg) -> dict:
    d = cfg.to_dict()
    d.pop("_source", None)
    d.get("output", {}).pop("dir", None)
    return d


def logged_matches(logged: Path, cfg) -> bool:
    """Whether ``logged`` holds a finished cell (results, last-round test, config) whose config equals
    ``cfg`` apart from where it was written."""
    from fed import load_config

    if not all((logged / f).is_file() for f in ("config.yaml", "results.json", "test_last/per_image.csv")):
        return False
    return _comparable(load_config(str(logged / "config.yaml"))) == _comparable(cfg)


def _run(cmd: List[str], log: Path) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        return subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)


def run_cell(study: dict, c: dict) -> str:
    d, state = c["dir"], cell_state(c["dir"])
    log = study["runs"] / "console" / f"{c['row']}_s{c['seed']}.txt"
    py = sys.executable
    if state == "new":
        rc = _run([py, "train.py", "--config", study["base"], "--quiet", "--overwrite", "--set", *c["overrides"]], log)
    elif state == "resume":
        rc = _run([py, "train.py", "--resume", str(d), "--quiet"], log)
    else:
        rc = 0
    if rc != 0:
        return f"failed (exit {rc}; see {log})"
    if cell_state(d) != "done":
        rc = _run([py, "test.py", "--config", str(d / "config.yaml"), "--checkpoints", str(d / "checkpoints"),
                   "--which", "last", "--out", str(d / "test_last"), "--overlays", "0"], log)
        if rc != 0:
            return f"last-round test failed (exit {rc}; see {log})"
    export_cell(study, c)
    for f in (d / "state").glob("*.pt"):  # a finished cell resumes nothing: its training states (~1.6 GB a
        f.unlink()                       # cell at the study's scale) go; checkpoints and last.json stay
    return "done"


def export_cell(study: dict, c: dict) -> None:
    """The cell's logs (never checkpoints) to ``logs/study/<name>/<row>/s<seed>``."""
    dest = study["logs"] / c["row"] / f"s{c['seed']}"
    for f in COPIED:
        src = c["dir"] / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)


def floor_row(study: dict, cfg) -> Path:
    """The all-foreground predictor as a run folder (config.yaml, results.json, metrics.jsonl and
    test/ + test_last/ per_image.csv): every pixel of every test image marked as polyp."""
    import numpy as np
    import torch

    from datasets.dataset import load_pair
    from datasets.federation import load_federation
    from fed.core.report import write_report
    from utils.metrics import ScoreBook, batch_scores, hd95

    d = study["logs"] / FLOOR / "s0"
    if (d / "test" / "per_image.csv").is_file():
        return d
    data = load_federation(cfg)
    book = ScoreBook()
    for k, lists in enumerate(data.clients):
        for img_p, mask_p, name in lists["test_list"]:
            _, mask = load_pair(img_p, mask_p, cfg.data.size)
            pred = np.ones_like(mask)
            s = batch_scores(torch.from_numpy(pred)[None], torch.from_numpy(mask)[None])
            book.add(f"client{k}", [name], s, [hd95(pred, mask)])
    rows = [{"client": k, "site": s, "arch": "-", "checkpoint": "-"} for k, s in enumerate(cfg.data.clients)]
    for sub in ("test", "test_last"):
        write_report(book, rows, d / sub)
    settings = cfg.settings()
    settings.update(method=FLOOR, name=f"{study['name']}_{FLOOR}")
    (d / "config.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    (d / "results.json").write_text(json.dumps({"name": settings["name"], "method": FLOOR, "rounds": 0}))
    (d / "metrics.jsonl").write_text(json.dumps({"round": 0, "bytes": {}, "time_s": 0.0}) + "\n")
    return d


# --- the table ---------------------------------------------------------------------------------------------

def _row_data(study: dict, name: str, cfgs: dict):
    import dataclasses

    from utils.compare import SeedRow, load_run, read_per_image, read_rounds

    row = study["rows"][name]
    best, last, curves = [], [], []
    for seed in row["seeds"]:
        d = study["logs"] / name / f"s{seed}"
        if not (d / "test_last" / "per_image.csv").is_file():
            continue
        run = load_run(d)
        best.append(run)
        last.append(dataclasses.replace(run, images=read_per_image(d / "test_last" / "per_image.csv")))
        curves.append([(r["round"], r["val"]["all"]["dice"]) for r in read_rounds(d / "metrics.jsonl")])
    if not best:
        return None
    cfg = cfgs[(name, row["seeds"][0])]
    archs = {f"client{k}": (cfg.models.server if _shared(cfg) else a) for k, a in enumerate(cfg.models.clients)}
    return SeedRow(name, best, last, archs, labeled_passes(cfg, row), curves)


def _shared(cfg) -> bool:
    from fed import METHODS

    return METHODS[cfg.method].shared_model


def build_table(study: dict, cfgs: dict) -> Optional[dict]:
    from utils.compare import SeedRow, compare_seeds, load_run, pooled, write_seed_outputs

    rows = [r for r in (_row_data(study, n, cfgs) for n in study["rows"]) if r is not None]
    if not any(r.label == study["reference"] for r in rows):
        return None
    if study["floor"]:
        d = floor_row(study, next(iter(cfgs.values())))
        fl = load_run(d)
        rows.append(SeedRow(FLOOR, [fl], [fl], {}, None, []))
    result = compare_seeds(rows, study["reference"])
    notes = []
    by = {r.label: r for r in rows}
    if FLOOR in by:
        f = pooled(by[FLOOR].best[0], "dice")
        po = [r for r in rows if r.label == PUBLIC_ONLY or r.label.startswith(PUBLIC_ONLY + "_")]
        if not po:
            notes.append(f"**Floor not checked**: no finished `{PUBLIC_ONLY}` row (all-foreground scores {f:.2f} Dice).")
        else:
            import numpy as np

            p = float(np.mean([pooled(r, "dice") for r in po[0].best]))
            ok = p - f >= FLOOR_MARGIN
            notes.append(("Floor holds" if ok else "**NOT EVIDENCE: the floor does not hold**")
                         + f": `{po[0].label}` {p:.2f} vs all-foreground {f:.2f} pooled test Dice "
                           f"({p - f:+.2f}; needs >= +{FLOOR_MARGIN:g}).")
    done = sum(len(r.best) for r in rows if r.label != FLOOR)
    total = sum(len(r["seeds"]) for r in study["rows"].values())
    if done < total:
        notes.append(f"Partial: {done} of {total} cells finished; rows show the seeds they have.")
    out = study["logs"]
    write_seed_outputs(result, out, f"Study {study['name']} (reference {study['reference']})", notes)
    lines = pair_section(by, study["pairs"])
    if lines:
        table = out / "table.md"
        table.write_text(table.read_text().rstrip("\n") + "\n\n" + "\n".join(lines) + "\n")
    ref_cfg = cfgs[(study["reference"], study["rows"][study["reference"]]["seeds"][0])]
    plot_curves(rows, out / "curves.png", study["name"], ref_cfg.train.warmup_rounds, study["reference"])
    return result


def pair_section(rows: dict, pairs: List[List[str]]) -> List[str]:
    """Markdown: each pair (A, B) of finished rows on the seeds both have: mean ± std over those seeds of
    pooled test Dice and HD95 (best-validation checkpoints), B - A, and the paired Wilcoxon test of B
    against A on the per-image scores averaged over those seeds."""
    import dataclasses

    from utils.compare import AVG, TEST_NAME, _md_table, _seed_cell, compare_seeds, fmt_p

    body = []
    for a, b in pairs:
        if a not in rows or b not in rows:
            continue
        seeds = sorted({Path(r.path).name for r in rows[a].best} & {Path(r.path).name for r in rows[b].best})
        if not seeds:
            continue

        def keep(row):
            on = [i for i, r in enumerate(row.best) if Path(r.path).name in seeds]
            return dataclasses.replace(row, best=[row.best[i] for i in on], last=[row.last[i] for i in on],
                                       curves=[row.curves[i] for i in on if i < len(row.curves)])

        res = compare_seeds([keep(rows[a]), keep(rows[b])], a)
        ra, rb = (next(r for r in res["rows"] if r["label"] == x) for x in (a, b))
        cells = [f"{b} vs {a}", ", ".join(seeds)]
        for m in ("dice", "hd95"):
            sa, sb = ra["seeds"][f"{m}_best_all"], rb["seeds"][f"{m}_best_all"]
            cells += [_seed_cell(sa), _seed_cell(sb), f"{sb['mean'] - sa['mean']:+.2f}", fmt_p(rb["tests"][m][AVG]["p"])]
        body.append(cells)
    if not body:
        return []
    head = ["pair (B vs A)", "seeds", "Dice A", "Dice B", "Dice B - A", "p Dice", "HD95 A", "HD95 B",
            "HD95 B - A", "p HD95"]
    return (["### Pairs", "", f"Each pair on the seeds both rows have: pooled test scores at the best-validation "
             f"checkpoints, mean ± std over those seeds; p: {TEST_NAME} of B against A on the per-image scores "
             f"averaged over those seeds.", ""] + _md_table(head, body))


def plot_curves(rows, path: Path, title: str, warmup: int = 0, reference: Optional[str] = None) -> Optional[Path]:
    """Small multiples: one panel per row (mean and min-max band over seeds of the pooled validation Dice
    per round), each with the ``reference`` row (grey, dashed) and the public-only floor (grey, dotted)
    behind it, on one shared y axis; the warm-up rounds shaded."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    rows = [r for r in rows if r.curves]
    if not rows:
        return None

    def series(r):
        n = min(len(c) for c in r.curves)
        x = [c[0] for c in r.curves[0][:n]]
        y = np.array([[v for _, v in c[:n]] for c in r.curves]) * 100
        return x, y

    by = {r.label: r for r in rows}
    behind = [(by[k], "0.35", "--") for k in (reference, PUBLIC_ONLY) if k in by]
    behind[1:] = [(r, "0.55", ":") for r, _, _ in behind[1:]]
    ncols = min(5, len(rows))
    nrows = math.ceil(len(rows) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.2 * nrows + 0.5), sharex=True, sharey=True,
                             squeeze=False)
    for ax, r in zip(axes.flat, rows):
        if warmup:
            ax.axvspan(-0.5, warmup - 0.5, color="0.92", zorder=0)
        for other, color, style in behind:
            if other is not r:
                x, y = series(other)
                ax.plot(x, y.mean(0), color=color, ls=style, lw=1)
        x, y = series(r)
        ax.plot(x, y.mean(0), color="C0", lw=1.8)
        if len(y) > 1:
            ax.fill_between(x, y.min(0), y.max(0), color="C0", alpha=0.2)
        ax.set_title(f"{r.label} ({len(y)} seed{'s' if len(y) > 1 else ''})", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("pooled val Dice (%)", fontsize=8)
    for ax in axes[-1, :]:
        ax.set_xlabel("round", fontsize=8)
    legend = "mean and min-max over seeds"
    if behind:
        legend += "; behind each: " + ", ".join(f"{r.label} ({'dashed' if st == '--' else 'dotted'})"
                                                for r, _, st in behind)
    if warmup:
        legend += f"; shaded: the {warmup} warm-up rounds of hssf"
    fig.suptitle(f"{title}: pooled validation Dice per round ({legend})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- command line ------------------------------------------------------------------------------------------

def _fmt_s(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Run a seeded study (resumable) and write its table.")
    ap.add_argument("study", help="the study YAML (studies/*.yaml)")
    ap.add_argument("--table", action="store_true", help="only rebuild the table and figure from finished cells")
    ap.add_argument("--dry-run", action="store_true", help="list the cells and their state; run nothing")
    ap.add_argument("--only", nargs="+", metavar="ROW", help="run only these rows")
    ap.add_argument("--max-cells", type=int, default=None, help="stop after this many cells of this call")
    a = ap.parse_args(argv)
    try:
        study = load_study(a.study)
        cfgs = check_configs(study)
        if a.only:
            bad = sorted(set(a.only) - set(study["rows"]))
            if bad:
                raise StudyError(f"--only: unknown row(s) {', '.join(bad)} (rows: {', '.join(study['rows'])})")
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    todo = [c for c in cells(study) if not a.only or c["row"] in a.only]

    def state_of(c):
        return cell_state(c["dir"], c["logged"], cfgs[(c["row"], c["seed"])])

    if a.dry_run:
        for c in todo:
            print(f"{c['row']:<24} s{c['seed']:<3} {state_of(c):<8} --set {' '.join(c['overrides'])}")
        return 0
    if not a.table:
        t0, spent, ran = time.time(), {}, 0
        total = len(todo)
        for i, c in enumerate(todo, 1):
            state = state_of(c)
            if state == "done":
                export_cell(study, c)
                print(f"[{i}/{total}] {c['row']} s{c['seed']}: done before", flush=True)
                continue
            if state == "logged":
                print(f"[{i}/{total}] {c['row']} s{c['seed']}: done before (its logs in {c['logged']})", flush=True)
                continue
            if a.max_cells is not None and ran >= a.max_cells:
                print(f"stopping after {ran} cell(s) as asked; run the same command to continue", flush=True)
                break
            tc = time.time()
            print(f"[{i}/{total}] {c['row']} s{c['seed']}: {'resuming' if state == 'resume' else 'running'} "
                  f"in {c['dir']}", flush=True)
            status = run_cell(study, c)
            dt = time.time() - tc
            ran += 1
            spent.setdefault(c["row"], []).append(dt)
            left = [x for x in todo[i:] if state_of(x) not in ("done", "logged")]
            mean_all = sum(sum(v) for v in spent.values()) / sum(len(v) for v in spent.values())
            eta = sum((sum(spent[x["row"]]) / len(spent[x["row"]])) if x["row"] in spent else mean_all for x in left)
            print(f"[{i}/{total}] {c['row']} s{c['seed']}: {status} in {_fmt_s(dt)} | elapsed "
                  f"{_fmt_s(time.time() - t0)} | about {_fmt_s(eta)} left for {len(left)} cell(s)", flush=True)
            try:
                build_table(study, cfgs)
            except Exception as e:  # noqa: BLE001 - a table problem must not stop the study
                print(f"table not written: {e}", flush=True)
    result = build_table(study, cfgs)
    if result is None:
        print(f"no table yet: the reference row {study['reference']!r} has no finished cell")
        return 0
    print((study["logs"] / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
