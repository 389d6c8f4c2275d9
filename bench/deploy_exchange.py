"""Wall time and per-site bytes of a loopback Flower deployment, with each HSSF exchange reduction.

    python bench/deploy_exchange.py [--config configs/demo.yaml] [--set key=value ...] [--workdir W]

For each setting (none; ``hssf.grades_first``; ``hssf.logits_at: head``; ``hssf.logits_dtype: float16``;
all three) it runs the same HSSF run on a fresh loopback deployment (``fed.flower.deploy``: a SuperLink
and one SuperNode per site, separate processes on 127.0.0.1) and prints the deployment's wall time and,
per site and round after the warm-up, the bytes on the wire (Flower's own message sizes) next to the
protocol's accounting of the method's payload, and the final test Dice. Default: the tiny synthetic
federation of the tests (2 sites, 2 rounds, 1 warm-up). Run it on a quiet machine.

    python bench/deploy_exchange.py --speed [--config configs/demo.yaml] [--set ...]

runs one config in this process and on deployments side by side, and prints each one's time per round
(``metrics.jsonl``), start-up (wall time less the rounds) and wall time: in process; a TLS deployment
with each site's long-lived process (``fed.flower.sited``) and ``fed.flower.supernode``'s SuperNodes
(both the default: ``tls``); ``insecure``; ``cold`` (a fresh ``flwr-clientapp`` process per message);
``flower_pulls`` (Flower's 1 s wait before asking again for a message's objects that are not there yet);
``flower_poll`` (Flower's own SuperNode: 3 s poll, 30 s heartbeat, 1 s object waits, cold);
``per_message`` (Flower's own SuperNode and no site processes: the party rebuilt from disk for every
message). ``--variants`` picks some. Default: the demo at 32 px, 2 rounds (1 warm-up). For each
deployment it then prints where a round's time goes, step by step (``utils/timeline.py``: every process
of the deployment writes its events to one file): the time from sending a step to its last reply, the
slowest site's work on it, a site's wait for the message's objects, and the rest.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SETTINGS = {
    "none": [],
    "grades_first": ["hssf.grades_first=true"],
    "logits_at_head": ["hssf.logits_at=head"],
    "float16": ["hssf.logits_dtype=float16"],
    "all three": ["hssf.grades_first=true", "hssf.logits_at=head", "hssf.logits_dtype=float16"],
}
TINY = ["seed=3", "data.dataset=syn", "data.public=P", "data.clients=[A, B]",
        "data.synthetic={public: 8, per_client: 12, seed: 1}", "data.train_val_test=[0.5, 0.25, 0.25]",
        "data.size=32", "data.batch_size=2", "data.num_workers=0", "models.server=tiny", "models.clients=[tiny, tiny]",
        "train.rounds=2", "train.warmup_rounds=1", "train.condensation_epochs=1", "train.fusion_epochs=1",
        "train.worker_threads=1", "device=cpu"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="YAML experiment (default: the tiny synthetic federation of the tests)")
    ap.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    ap.add_argument("--only", nargs="+", choices=list(SETTINGS), help="run only these settings")
    ap.add_argument("--workdir", help="where the deployments run (default: a temporary folder, removed)")
    ap.add_argument("--speed", action="store_true", help="time per round in process and on deployments, side by side")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                    help="with --speed: only these deployments (default: all)")
    a = ap.parse_args(argv)
    if a.speed:
        return speed(a)

    from fed import load_config
    from fed.flower.deploy import deploy
    from utils.logger import read_metrics

    root = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="deploy_exchange_"))
    rows = []
    try:
        for name, sets in SETTINGS.items():
            if a.only and name not in a.only:
                continue
            base = [] if a.config else [f"data.root={root / 'data'}", *TINY]
            cfg = load_config(a.config, [*base, *a.overrides, f"name={name.replace(' ', '_')}", *sets])
            work = root / name.replace(" ", "_")
            out = deploy(cfg, work, timeout_s=1800)
            if not out.get("ok") or out.get("remaining"):
                print(f"{name}: FAILED {out.get('error')} (left running: {out.get('remaining')})", flush=True)
                continue
            recs = read_metrics(work / "run")
            after = [r for r in recs if r["round"] >= cfg.train.warmup_rounds]
            sites = sorted(after[0]["bytes"])
            mean = lambda key: sum(r["bytes"][s][key] for r in after for s in sites) / (len(after) * len(sites))
            res = json.loads((work / "run" / "results.json").read_text())
            row = {"setting": name, "wall_s": round(out["wall_s"], 1),
                   "wire_up": mean("wire_up"), "wire_down": mean("wire_down"), "up": mean("up"), "down": mean("down"),
                   "dice": round(res["test"]["all"]["dice"]["mean"], 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if not a.workdir:
            shutil.rmtree(root, ignore_errors=True)
    print("\n| setting | deployment wall time | per site per round after warm-up: wire up / down (payload up / down) | test Dice |")
    print("|---|---:|---|---:|")
    for r in rows:
        print(f"| {r['setting']} | {r['wall_s']:.0f} s | {r['wire_up']:,.0f} / {r['wire_down']:,.0f} B "
              f"({r['up']:,.0f} / {r['down']:,.0f} B) | {r['dice']:.2f} |")
    return 0


SPEED_DEFAULT = ["train.rounds=2", "train.warmup_rounds=1", "data.size=32"]
#: deploy() arguments that start Flower's own SuperNode behaviour (fed.flower.supernode's flags undone)
FLOWER_SUPERNODE = {"node_poll_s": 3.0, "heartbeat_s": 30.0, "warm": False, "pull_wait_s": 1.0}
#: deployment variants of --speed: key -> (name, deploy() arguments)
VARIANTS = {"tls": ("deployment, TLS, site processes (default)", {}),
            "insecure": ("deployment, insecure, site processes", {"insecure": True}),
            "cold": ("deployment, TLS, site processes, a flwr-clientapp process per message", {"warm": False}),
            "flower_pulls": ("deployment, TLS, site processes, Flower's 1 s wait for a message's missing objects",
                             {"pull_wait_s": 1.0}),
            "flower_poll": ("deployment, TLS, site processes, Flower's SuperNode (3 s poll, 30 s heartbeat, "
                            "1 s object waits, a flwr-clientapp process per message)", FLOWER_SUPERNODE),
            "per_message": ("deployment, TLS, no site processes, Flower's SuperNode (the party rebuilt from "
                            "disk for every message)", {"site_processes": False, **FLOWER_SUPERNODE})}


def speed(a) -> int:
    import time

    from fed import load_config
    from fed.core.run import train
    from fed.flower.deploy import deploy
    from utils import timeline
    from utils.logger import read_metrics

    root = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="deploy_speed_"))
    config = a.config or str(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml")
    sets = [*(SPEED_DEFAULT if not a.config else []), *a.overrides, f"data.root={root / 'data'}"]
    rows, steps = [], {}

    def row(name, work, wall, bytes_key):
        recs = read_metrics(work)
        rounds = [r["time_s"] for r in recs]
        up = [sum(b.get(bytes_key, b["up"]) for b in r["bytes"].values()) for r in recs]
        res = json.loads((Path(work) / "results.json").read_text())
        out = {"run": name, "round_s": [round(t, 1) for t in rounds], "startup_s": round(wall - sum(rounds), 1),
               "wall_s": round(wall, 1), "up_per_round": up, "dice": round(res["test"]["all"]["dice"]["mean"], 2)}
        print(json.dumps(out), flush=True)
        rows.append(out)

    try:
        cfg = load_config(config, [*sets, f"output.dir={root / 'inprocess'}", "device=cpu"])
        t = time.time()
        train(cfg, progress=False)
        row("in process", root / "inprocess", time.time() - t, "up")
        for key, (name, kw) in VARIANTS.items():
            if a.variants and key not in a.variants:
                continue
            work = root / f"deploy{len(rows)}"
            cfg = load_config(config, [*sets, "device=cpu"])
            os.environ[timeline.ENV] = str(root / f"timeline{len(rows)}.jsonl")  # every process of it writes there
            try:
                out = deploy(cfg, work, timeout_s=3600, **kw)
            finally:
                path = Path(os.environ.pop(timeline.ENV))
            if not out.get("ok") or out.get("remaining"):
                print(f"{name}: FAILED {out.get('error')} (left running: {out.get('remaining')})", flush=True)
                continue
            row(name, work / "run", out["wall_s"], "wire_up")
            steps[name] = timeline.summary(timeline.read(path)) if path.exists() else {}
    finally:
        if not a.workdir:
            shutil.rmtree(root, ignore_errors=True)
    base = sum(rows[0]["round_s"]) / len(rows[0]["round_s"])
    print("\n| run | time per round (rounds) | x in process | start-up and test | wall | bytes up per round | test Dice |")
    print("|---|---|---:|---:|---:|---|---:|")
    for r in rows:
        mean = sum(r["round_s"]) / len(r["round_s"])
        print(f"| {r['run']} | {mean:.1f} s ({', '.join(f'{t:.1f}' for t in r['round_s'])}) | {mean / base:.1f}x | "
              f"{r['startup_s']:.0f} s | {r['wall_s']:.0f} s | {', '.join(f'{b:,}' for b in r['up_per_round'])} | "
              f"{r['dice']:.2f} |")
    print("\nround by round, x in process: " + "; ".join(
        f"{r['run']}: " + ", ".join(f"{t / b:.2f}x" for t, b in zip(r["round_s"], rows[0]["round_s"])) for r in rows[1:]))
    for name, table in steps.items():  # where a deployment's round goes, per step (utils/timeline.py)
        print(f"\n{name}: per message, mean over the run (s; work: the slowest site's step; pull: a site's "
              f"wait for the message; rest: all but the work)")
        print("| step | messages | sent to last reply | work | pull | rest |\n|---|---:|---:|---:|---:|---:|")
        for step, v in table.items():
            print(f"| {step} | {v['n']} | {v['rtt']:.2f} | {v['work']:.2f} | {v['pull']:.2f} | {v['rest']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
