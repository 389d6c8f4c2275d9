"""The training run: run directory, logging, best checkpoints, training state, resume, final test.

The federation itself (parties, method, messages) is :mod:`fed.core.runner`; this module only drives it
round by round (SPEC section 4): ``runner.run_round(r)``; then every client is scored on its val split;
where a client's val Dice improves, it is scored on its test split and ``{arch}_{k}_best.pth`` is saved
(for a shared-model method, the global model, the aggregate of the round's local training, is selected
on the pooled val images instead). After
every round each party writes its full training state to ``<run>/state/<party>.r<round>.pt`` and the
run commits the round in ``<run>/state/last.json``; ``train.py --resume <run>`` continues exactly from
there (randomness is keyed by round, so no generator state is needed).
"""
from __future__ import annotations

import json
import math
import shutil
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import yaml
from tqdm import tqdm

from datasets.federation import load_federation
from datasets.splits import CLIENT_SPLITS
from utils.checkpoint import client_ckpt_name, global_ckpt_name, safe_load
from utils.device import environment
from utils.io import atomic_torch_save, atomic_write_bytes, atomic_write_text
from utils.logger import RunLogger
from utils.metrics import NAMES, ScoreBook

from fed.core.party import round_of
from fed.core.runner import Runner, engine_host, make_runner

STATE_DIR = Path("state")
COMMIT = "last.json"  # {"round": r, "best": ..., "config": ...}: the last round whose state is complete


class RunDirError(RuntimeError):
    pass


def summarize(book: ScoreBook, group=None) -> dict:
    s = book.summary(group)
    return {k: s[k]["mean"] for k in NAMES if k in s}


def evaluate_split(runner: Runner, split: str, names: Optional[List[str]] = None) -> Dict[str, dict]:
    """Mean scores of each client (``client{k}``) and, for all clients, of their images pooled (``all``)."""
    book = runner.evaluate(split, names)
    out = {g: summarize(book, g) for g in book.groups()}
    if names is None:
        out["all"] = summarize(book)
    return out


def prepare_run_dir(cfg, overwrite: bool = False, dry_run: bool = False) -> Path:
    """Create ``output.dir`` with the resolved ``config.yaml``; an occupied folder is an error unless
    ``overwrite`` (then it is deleted). ``dry_run``: only check."""
    run = Path(cfg.output.dir)
    if run.exists() and any(run.iterdir()):
        if not overwrite:
            status = "finished" if (run / "results.json").exists() else "unfinished"
            raise RunDirError(
                f"{run} already holds a{'n' if status == 'unfinished' else ''} {status} run. "
                f"Continue it with `python train.py --resume {run}`, choose another output.dir "
                f"(e.g. --set output.dir=runs/other), or pass --overwrite to delete it.")
        if not dry_run:
            shutil.rmtree(run)
    if dry_run:
        return run
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run / "config.yaml", yaml.safe_dump(
        cfg.settings(), sort_keys=False))
    return run


def train(cfg, resume: bool = False, overwrite: bool = False, progress: bool = True,
          stop_after: Optional[int] = None, order: str = "forward", engine="inprocess") -> dict:
    """Run (or resume) the experiment of ``cfg``; returns the results dict (also ``results.json``).

    ``stop_after``: stop after that many rounds of this call (tests, benchmarks). ``engine``: where the
    clients run: a name of :data:`fed.core.runner.ENGINES` or a client host class
    (:func:`fed.core.runner.engine_host`).
    """
    t0 = time.time()
    if not resume and not overwrite:
        prepare_run_dir(cfg, dry_run=True)  # refuse an occupied run directory before any work
    # bad data is reported before a run directory is created; a host whose clients read their own files
    # (a deployment's sites) leaves them out here: each site resolves and verifies its own when it is set up
    host = engine_host(engine, cfg)
    clients = None if host.reads_client_data else ()
    if cfg.data.verify:
        from datasets.verify import verify_or_raise

        data = verify_or_raise(cfg, progress=progress, clients=clients)
    else:
        data = load_federation(cfg, progress=progress, clients=clients)
    run = Path(cfg.output.dir) if resume else prepare_run_dir(cfg, overwrite)
    logger = RunLogger(run, console=progress)
    try:
        t = time.perf_counter()
        runner = make_runner(cfg, data, logger, order, host)
        build_s = time.perf_counter() - t
        try:
            return Run(cfg, run, logger, runner, data, t0, build_s).go(resume, progress, stop_after)
        finally:
            runner.close()
    finally:
        logger.close()


class StateWriter:
    """Writes every party's state for a round on a background thread (from the live tensors: no copy,
    so no extra memory), overlapping the round's evaluation; :meth:`commit` waits for the files, then
    marks the round complete in ``last.json`` and deletes older rounds' files."""

    def __init__(self, runner: Runner, folder: Path):
        self.runner, self.folder = runner, folder
        self.thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None
        self.seconds = 0.0

    def start(self, rnd: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

        def work():
            t = time.perf_counter()
            try:
                self.runner.save_state(self.folder, rnd)
            except BaseException as e:  # noqa: BLE001 - re-raised by commit()
                self.error = e
            self.seconds = time.perf_counter() - t

        if self.runner.concurrent_safe:
            self.thread = threading.Thread(target=work, name="state-writer", daemon=True)
            self.thread.start()
        else:
            work()

    def commit(self, rnd: int, extra: dict) -> float:
        """Wait for the files of round ``rnd``; returns the seconds spent writing them."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            e, self.error = self.error, None
            raise RuntimeError(f"writing the training state failed: {e}") from e
        atomic_write_text(self.folder / COMMIT, json.dumps({"round": rnd, **extra}))
        # each party's files by round: rounds after this one were never committed; of the others each
        # party keeps its latest (a lost site's stays: it resumes there)
        files = [(f.name.rsplit(".r", 1)[0], round_of(f), f) for f in self.folder.glob("*.r*.pt")]
        latest: Dict[str, int] = {}
        for name, r, _ in files:
            if r <= rnd:
                latest[name] = max(latest.get(name, -1), r)
        for name, r, f in files:
            if r != latest.get(name):
                f.unlink()
        return self.seconds


class Run:
    """One training run in its folder: :meth:`resume` (or :meth:`announce` a new one), :meth:`round`
    for each round (train, write the state while evaluating, keep the best checkpoints, commit, log),
    :meth:`finish` (last checkpoints, the test at the sites, ``results.json``); :meth:`go` does all."""

    def __init__(self, cfg, run: Path, logger: RunLogger, runner: Runner, data, t0: float, build_s: float):
        self.cfg, self.dir, self.logger, self.runner, self.data, self.t0 = cfg, run, logger, runner, data, t0
        self.ck, self.state_dir = run / "checkpoints", run / STATE_DIR
        K = len(runner.names)
        self.best = {"clients": [{"dice": -1.0, "round": -1} for _ in range(K)], "all": {"dice": -1.0, "round": -1}}
        self.kept: Dict[str, int] = {}  # each client's round of its best checkpoint (Runner.keep_checkpoints)
        self.writer = StateWriter(runner, self.state_dir)
        self.settings = cfg.settings()  # stored with every commit, to warn when a resume changes them
        self.startup: Optional[dict] = {"start_s": round(time.time() - t0, 3), "build_s": round(build_s, 3)}

    def go(self, resume: bool, progress: bool, stop_after: Optional[int] = None) -> dict:
        """The whole run from its first (or first uncompleted) round; ``stop_after``: stop after that
        many rounds of this call (tests, benchmarks)."""
        start = self.resume() if resume else self.announce()
        r, R = self.runner, self.cfg.train.rounds
        self.logger.info(f"exchange ({self.cfg.method}): up: {r.method.sends['up']}; down: {r.method.sends['down']}")
        self.logger.info("environment: " + ", ".join(f"{k} {v}" for k, v in environment(r.device).items()))
        if start >= R and (self.dir / "results.json").exists():
            self.logger.info(f"{self.dir} has completed all {R} rounds; nothing to resume (raise train.rounds to go on)")
            return json.loads((self.dir / "results.json").read_text())
        bar = tqdm(range(start, R), desc="rounds", initial=start, total=R, disable=not progress or None,
                   dynamic_ncols=True)
        for done, rnd in enumerate(bar, 1):
            record = self.round(rnd)
            bar.set_postfix(val_dice=f"{record['val']['all'].get('dice', float('nan')):.3f}")
            if stop_after is not None and done >= stop_after and rnd < R - 1:
                self.logger.info(f"stopping after round {rnd} as asked (resume with --resume {self.dir})")
                return {"stopped_after": rnd}
        bar.close()
        return self.finish()

    def announce(self) -> int:
        """A new run: what it is and what data it reads, in the log. Returns its first round, 0."""
        cfg, r = self.cfg, self.runner
        self.logger.info(f"run {cfg.name}: method {cfg.method}, server {cfg.models.server}, clients "
                         f"{', '.join(f'{r.sites[n]}:{r.archs[n]}' for n in r.names)}; device {r.device}"
                         f"{' (AMP ' + str(r.amp.dtype).replace('torch.', '') + ')' if r.amp.enabled else ''}"
                         f"{f'; clients in {cfg.train.client_workers} worker processes' if cfg.train.client_workers else ''}")
        self.logger.info(f"split {self.data.split_path}: public {len(self.data.public)} | " + " | ".join(
            f"{r.sites[n]}: {'/'.join(str(r.file_counts[n].get(k, 0)) for k in CLIENT_SPLITS)}"
            for n in r.names) + " (labeled/unlabeled/val/test)")
        return 0

    def resume(self) -> int:
        """Every party back to the last committed round (files of later rounds and cut-short writes
        removed, metrics truncated to it). Returns the first round to run."""
        start = 0
        for tmp in self.dir.rglob(".*.tmp"):  # a write cut short by the interruption
            tmp.unlink()
        if (self.state_dir / COMMIT).exists():
            commit = json.loads((self.state_dir / COMMIT).read_text())
            last = commit["round"]
            for f in self.state_dir.glob("*.r*.pt"):  # files of a round that was never committed
                if round_of(f) != last:
                    f.unlink()
            self.runner.load_state(self.state_dir, last)
            self.best, start = commit["best"], last + 1
            self.kept = commit.get("kept", {})
            _warn_config_changes(self.logger, commit.get("config", {}), self.cfg)
            self.logger.info(f"resumed {self.dir} after round {last}")
        else:
            self.logger.info(f"{self.dir}: no completed round to resume from; starting at round 0")
        _truncate_metrics(self.logger.metrics_path, start)
        return start

    def round(self, rnd: int) -> dict:
        """One round: the method's protocol, the state written (overlapping the evaluation), the best
        checkpoints kept, the round committed and logged. Returns its ``metrics.jsonl`` record."""
        runner = self.runner
        tr = time.perf_counter()
        out = runner.run_round(rnd)
        _check_finite(runner, out["loss"], rnd, self.dir)
        self.writer.start(rnd)  # overlaps the evaluation below
        te = time.perf_counter()
        val = evaluate_split(runner, "val")
        record = {"round": rnd, "warmup": runner.method.warm(rnd), "lr": out["lr"], "loss": out["loss"],
                  "val": val, **self.keep_best(rnd, val)}
        eval_s = time.perf_counter() - te
        write_s = self.writer.commit(rnd, {"best": self.best, "kept": self.kept, "config": self.settings})
        record["skipped"] = out["skipped"]
        if out.get("rejoined"):
            record["rejoined"] = out["rejoined"]
        record["bytes"] = out["bytes"]
        record["phase_s"] = {**out["phase_s"], "evaluation": round(eval_s, 3), "state_writing": round(write_s, 3)}
        if self.startup:
            record["startup_s"], self.startup = self.startup, None
        record["time_s"] = round(time.perf_counter() - tr, 3)
        self.logger.round(record)
        self.logger.info(_round_line(record, runner))
        return record

    def keep_best(self, rnd: int, val: dict) -> dict:
        """The best-validation record and checkpoints. A shared-model method: the global model, when the
        pooled validation Dice improves (every client's record and checkpoint with it); otherwise each
        client whose own validation Dice improves. Those are scored on their test split at once. The
        server's checkpoint follows the pooled validation Dice. Returns ``{"improved", "test_at_best"}``."""
        runner, best = self.runner, self.best
        # a round in which no site was scored (every one skipped or lost) improves nothing
        shared, pooled = runner.method.shared_model, val["all"].get("dice", -1.0) > best["all"]["dice"]
        if shared:
            chosen = [n for n in runner.names if n not in runner.lost] if pooled else []
        else:
            chosen = [n for k, n in enumerate(runner.names)
                      if n not in runner.skipped and n in val and val[n]["dice"] > best["clients"][k]["dice"]]
        test = (evaluate_split(runner, "test", None if shared else chosen)) if chosen else {}
        for n in chosen:
            k = runner.names.index(n)
            if n in val:
                best["clients"][k] = {"dice": val[n]["dice"], "round": rnd, "val": val[n], "test": test[n]}
        if chosen:  # where the client lives until the end (a Flower site), else written here now
            paths = {n: self.ck / client_ckpt_name(runner.archs[n], runner.names.index(n)) for n in chosen}
            runner.keep_checkpoints(paths, rnd)
            self.kept.update({n: rnd for n in chosen})
        if pooled:
            best["all"] = {"dice": val["all"]["dice"], "round": rnd, "val": val["all"],
                           **({"test": test["all"]} if shared else {})}
            atomic_torch_save(runner.server_weights(), self.ck / global_ckpt_name(self.cfg.models.server))
        if shared:
            return {"improved": ["all"] if pooled else [], "test_at_best": test}
        return {"improved": chosen, "test_at_best": {n: test[n] for n in chosen}}

    def finish(self) -> dict:
        """The last round's checkpoints, the test at the sites with the best ones, ``results.json``."""
        cfg, runner, ck = self.cfg, self.runner, self.ck
        for n in runner.lost:  # a site that stopped answering: its checkpoints are those it had sent
            self.logger.warning(f"{n} was lost ({runner.lost[n]}): no last checkpoint"
                                + (f"; its best (round {self.kept[n]}) stays at the site" if n in self.kept
                                   and runner.host.keeps_weights else ""))
        runner.fetch_checkpoints({n: (r, ck / client_ckpt_name(runner.archs[n], runner.names.index(n)))
                                  for n, r in self.kept.items() if n not in runner.lost})
        # a client kept at the last round: its last weights are those (nothing trained since), sent once
        same = {n for n, r in self.kept.items()
                if r == runner.round and runner.host.keeps_weights and n not in runner.lost}
        weights = runner.clients_weights([n for n in runner.names if n not in runner.lost and n not in same])
        for k, n in enumerate(runner.names):
            last = ck / client_ckpt_name(runner.archs[n], k, "last")
            if n in weights:
                atomic_torch_save(weights.pop(n), last)
            elif n in same:
                atomic_write_bytes(last, (ck / client_ckpt_name(runner.archs[n], k)).read_bytes())
        atomic_torch_save(runner.server_weights(), ck / global_ckpt_name(cfg.models.server, "last"))
        tt = time.perf_counter()
        final = self.final_test(self.dir / "test")
        results = {"name": cfg.name, "method": cfg.method, "rounds": cfg.train.rounds,
                   "wall_time_s": round(time.time() - self.t0, 1),  # this invocation (a resumed run: since the resume)
                   "rounds_time_s": round(_rounds_time(self.logger.metrics_path), 1),  # all rounds, across resumes
                   "final_test_s": round(time.perf_counter() - tt, 1),
                   "best": self.best, "test": final["summary"], "environment": environment(runner.device)}
        atomic_write_text(self.dir / "results.json", json.dumps(results, indent=2))
        from fed.core.report import format_table

        self.logger.info("test split, best-val checkpoints (batch 1, every image, scored at each site):\n"
                         + format_table(final))
        return results

    def final_test(self, out: Path) -> dict:
        """The test protocol at the sites: each client is sent its best-validation weights and scores them
        on its own test split (batch 1, HD95, fp32; overlays stay at the site); the server writes the report."""
        from fed.core.report import checkpoint_paths, write_report

        cfg, runner = self.cfg, self.runner
        shared = runner.method.shared_model
        paths = checkpoint_paths(cfg, self.ck, "best")
        archs = {n: cfg.models.server if shared else runner.archs[n] for n in runner.names}
        weights = {n: safe_load(p) for n, p in zip(runner.names, paths) if n not in runner.lost}
        book = runner.final_test(weights, archs, out / "overlays", overlays=4)
        rows = [{"client": k, "site": runner.sites[n], "arch": archs[n], "checkpoint": str(paths[k])}
                for k, n in enumerate(runner.names) if n not in runner.lost]
        for n in runner.lost:
            self.logger.warning(f"{n} was lost ({runner.lost[n]}): not tested")
        return write_report(book, rows, out)


def _rounds_time(metrics_path: Path) -> float:
    with open(metrics_path) as f:
        return sum(json.loads(line).get("time_s", 0.0) for line in f if line.strip())


def _round_line(rec: dict, runner: Runner) -> str:
    v = rec["val"]
    up = sum(b["up"] for b in rec["bytes"].values())
    down = sum(b["down"] for b in rec["bytes"].values())
    parts = [f"round {rec['round']}{' (warm-up)' if rec['warmup'] else ''} {rec['time_s']:.1f}s",
             *([f"rejoined: {', '.join(rec['rejoined'])}"] if rec.get("rejoined") else []),
             "val Dice " + " ".join(f"{k}:{v[n]['dice']:.3f}" for k, n in enumerate(runner.names) if n in v),
             f"all:{v['all']['dice']:.3f}" if "dice" in v["all"] else "all: no site scored"]
    if up or down:
        parts.append(f"clients sent {_mb(up)}, received {_mb(down)}")
    parts.append(" ".join(f"{k} {v:.1f}s" for k, v in rec["phase_s"].items()))
    if rec["improved"]:
        parts.append("best: " + ",".join(rec["improved"]))
    if rec.get("skipped"):
        parts.append("skipped: " + ",".join(rec["skipped"]))
    return " | ".join(parts)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _check_finite(runner: Runner, losses: dict, rnd: int, run: Path) -> None:
    bad = next(((p, k) for p, terms in losses.items() for k, v in terms.items() if not math.isfinite(v)), None)
    if not bad:
        return
    party, term = bad
    who = f"{party} ({runner.sites[party]})" if party in runner.sites else party
    kept = (f"the state after round {rnd - 1} is kept in {run / STATE_DIR}; fix the cause and continue with "
            f"`python train.py --resume {run}`") if rnd > 0 else "no round was completed"
    raise FloatingPointError(f"non-finite loss in round {rnd}: {who}, loss term {term!r}. "
                             f"The run stops without saving this round; {kept}.")


def _warn_config_changes(logger: RunLogger, old: dict, cfg) -> None:
    new = cfg.settings()
    diffs = []

    def walk(a, b, prefix=""):
        for k in sorted(set(a) | set(b)):
            if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
                walk(a[k], b[k], f"{prefix}{k}.")
            elif a.get(k) != b.get(k):
                diffs.append(f"{prefix}{k}: {a.get(k)!r} -> {b.get(k)!r}")

    walk(old, new)
    if diffs:
        logger.warning("resuming with a changed configuration: " + "; ".join(diffs))


def _truncate_metrics(path: Path, start: int) -> None:
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["round"] < start]
    atomic_write_text(path, "".join(ln + "\n" for ln in lines))
