"""The round engine: builds the federation from a config, runs rounds, evaluates, checkpoints, logs.

Per round (SPEC section 4): ``method.round(r)``; then every client is scored on its val split;
where a client's val Dice improves, it is scored on its test split and ``{arch}_{k}_best.pth`` is saved
(for a shared-model method, the global model is selected on the pooled val images instead). After
every round the full training state is written to ``<run>/state/last.pt`` so that
``train.py --resume <run>`` continues exactly where it stopped.
"""
from __future__ import annotations

import json
import math
import shutil
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

import networks
from datasets.dataset import SeededSampler, SegDataset, collate_names
from datasets.federation import load_federation
from utils.checkpoint import client_ckpt_name, global_ckpt_name, safe_load, save_weights
from utils.device import Amp, resolve_device, rng_state, seed_everything, set_rng_state
from utils.io import BackgroundWriter, atomic_write_text, snapshot
from utils.logger import RunLogger
from utils.metrics import NAMES, ScoreBook

from . import METHODS
from .base import LossLog
from .client import Client
from .evaluate import score_model
from .server import Server

STATE_FILE = Path("state") / "last.pt"


class RunDirError(RuntimeError):
    pass


class Federation:
    """Server + clients + method, built from a validated config and the resolved file lists."""

    def __init__(self, cfg, data, logger: Optional[RunLogger] = None):
        self.cfg, self.logger = cfg, logger
        d, t = cfg.data, cfg.train
        self.device = resolve_device(cfg.device)
        self.amp = Amp.for_device(self.device, t.amp, t.channels_last)
        seed_everything(cfg.seed)
        self.samplers: List[SeededSampler] = []
        period = t.rounds * max(1, t.condensation_epochs)

        public = self._loader(data.public, "labeled", stream=0)
        torch.manual_seed(cfg.seed)
        build = lambda arch: networks.build_model(arch, pretrained=cfg.models.pretrained)
        self.server = Server(cfg.models.server, build(cfg.models.server), t, self.amp, period, public)
        self.clients: List[Client] = []
        for k, (site, arch) in enumerate(zip(d.clients, cfg.models.clients)):
            items = data.clients[k]
            loaders = {
                "labeled": self._loader(items["labeled_train"], "labeled", stream=1 + 2 * k),
                "unlabeled": self._loader(items["unlabeled_train"], "unlabeled", stream=2 + 2 * k),
                "val": self._loader(items["val_list"], "eval"),
                "test": self._loader(items["test_list"], "eval"),
            }
            torch.manual_seed(cfg.seed + 1 + k)  # each model's init independent of the others'
            self.clients.append(Client(k, site, arch, build(arch), t, self.amp, period, loaders))
        torch.manual_seed(cfg.seed)
        self.method = METHODS[cfg.method](self)
        self.noise_gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.log = LossLog()
        self.skipped: Dict[str, str] = {}

    # --- construction helpers -------------------------------------------------------------------
    def _loader(self, items, mode: str, stream: int = -1) -> Optional[DataLoader]:
        d = self.cfg.data
        if not items:
            return None
        ds = SegDataset(items, d.size, mode, cache=d.cache).preload()
        train = mode != "eval"
        drop_last = train or (d.eval_drop_last and len(items) >= d.batch_size)
        sampler = None
        if train:
            sampler = SeededSampler(len(ds), self.cfg.seed, stream, shuffle=d.shuffle)
            self.samplers.append(sampler)
        return DataLoader(ds, batch_size=d.batch_size, sampler=sampler, shuffle=False, drop_last=drop_last,
                          num_workers=d.num_workers, collate_fn=collate_names,
                          pin_memory=self.device.type == "cuda")

    # --- what methods use -----------------------------------------------------------------------
    def noise(self, x: torch.Tensor) -> torch.Tensor:
        """Add ``clamp(N(0, std), -2 std, 2 std)`` noise (``data.public_noise``)."""
        std = self.cfg.data.public_noise
        if std <= 0:
            return x
        n = torch.randn(x.shape, generator=self.noise_gen, device=x.device, dtype=x.dtype)
        return x + (n * std).clamp_(-2 * std, 2 * std)

    def active_clients(self) -> List[Client]:
        return [c for c in self.clients if c.name not in self.skipped]

    def begin_round(self) -> None:
        """Fresh loss log; with ``skip_client``, remember every client's state to roll back to."""
        self.log, self.skipped = LossLog(), {}
        self._round_start = ({c.name: snapshot(c.state_dict()) for c in self.clients}
                             if self.cfg.train.fault_tolerance == "skip_client" else {})

    def run_client(self, client: Client, work):
        """Run one client's share of a phase; returns ``work()``'s value (None if the client is skipped).

        With ``train.fault_tolerance: skip_client`` an exception is logged with its traceback, the client
        is rolled back to the start of the round and sits the rest of the round out.
        """
        if client.name in self.skipped:
            return None
        if self.cfg.train.fault_tolerance != "skip_client":
            return work()
        try:
            return work()
        except Exception as e:  # noqa: BLE001 - any failure of one client's work
            self.skip(client, e)
            return None

    def skip(self, client: Client, error: BaseException) -> None:
        reason = f"{type(error).__name__}: {error}"
        self.skipped[client.name] = reason
        if self.logger is not None:
            self.logger.log.error(f"{client.name} ({client.site}) fails and sits this round out: {reason}",
                                  exc_info=error)
        client.load_state_dict(self._round_start[client.name])
        self.log.drop(client.name)

    # --- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "server": self.server.state_dict(),
            "clients": [c.state_dict() for c in self.clients],
            "method": self.method.state_dict(),
            "samplers": [s.epoch for s in self.samplers],
            "noise_gen": self.noise_gen.get_state(),
            "rng": _plain_rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.server.load_state_dict(state["server"])
        for c, s in zip(self.clients, state["clients"]):
            c.load_state_dict(s)
        self.method.load_state_dict(state["method"])
        for sampler, epoch in zip(self.samplers, state["samplers"]):
            sampler.epoch = epoch
        self.noise_gen.set_state(state["noise_gen"])
        _set_plain_rng_state(state["rng"])


def _plain_rng_state() -> dict:
    """RNG states as tensors/plain types only (loadable with weights_only=True)."""
    s = rng_state()
    kind, keys, pos, has_gauss, cached = s["numpy"]
    s["numpy"] = [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]
    return s


def _set_plain_rng_state(s: dict) -> None:
    s = dict(s)
    kind, keys, pos, has_gauss, cached = s["numpy"]
    s["numpy"] = (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
    s["python"] = (s["python"][0], tuple(s["python"][1]), s["python"][2])
    set_rng_state(s)


# --- the training run -------------------------------------------------------------------------------

def summarize(book: ScoreBook, group=None) -> dict:
    s = book.summary(group)
    return {k: s[k]["mean"] for k in NAMES if k in s}


def evaluate_split(fed: Federation, split: str, which: Optional[List[int]] = None) -> Dict[str, dict]:
    """Mean scores of each client (``client{k}``) and of all their images pooled (``all``)."""
    book = ScoreBook()
    for c in fed.clients:
        if which is not None and c.index not in which:
            continue
        loader = getattr(c, split)
        fed.run_client(c, lambda c=c: score_model(fed.method.eval_model(c.index), loader, fed.amp, book, c.name))
    out = {g: summarize(book, g) for g in book.groups()}
    if which is None:
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
          stop_after: Optional[int] = None) -> dict:
    """Run (or resume) the experiment of ``cfg``; returns the results dict (also ``results.json``).

    ``stop_after``: stop after that many rounds of this call (tests, benchmarks).
    """
    t0 = time.time()
    if not resume and not overwrite:
        prepare_run_dir(cfg, dry_run=True)  # refuse an occupied run directory before any work
    # bad data is reported before a run directory is created
    if cfg.data.verify:
        from datasets.verify import verify_or_raise

        data = verify_or_raise(cfg, progress=progress)
    else:
        data = load_federation(cfg, progress=progress)
    run = Path(cfg.output.dir) if resume else prepare_run_dir(cfg, overwrite)
    logger = RunLogger(run, console=progress)
    try:
        return _train(cfg, run, logger, resume, progress, stop_after, data, t0)
    finally:
        logger.close()


def _train(cfg, run: Path, logger: RunLogger, resume: bool, progress: bool, stop_after, data, t0) -> dict:
    fed = Federation(cfg, data, logger)
    writer = fed.writer = BackgroundWriter()
    try:
        return _rounds(cfg, run, logger, resume, progress, stop_after, fed, data, t0)
    finally:
        writer.wait()


def _rounds(cfg, run, logger, resume, progress, stop_after, fed, data, t0) -> dict:
    writer = fed.writer
    ck = run / "checkpoints"
    K = len(fed.clients)
    best = {"clients": [{"dice": -1.0, "round": -1} for _ in range(K)], "all": {"dice": -1.0, "round": -1}}
    start = 0
    if resume:
        for tmp in run.rglob(".*.tmp"):  # a write cut short by the interruption
            tmp.unlink()
        if (run / STATE_FILE).exists():
            state = safe_load(run / STATE_FILE, "training state")
            fed.load_state_dict(state["federation"])
            best, start = state["best"], state["round"] + 1
            _warn_config_changes(logger, state.get("config", {}), cfg)
            logger.info(f"resumed {run} after round {start - 1}")
        else:
            logger.info(f"{run}: no completed round to resume from; starting at round 0")
        _truncate_metrics(logger.metrics_path, start)
    else:
        logger.info(f"run {cfg.name}: method {cfg.method}, server {cfg.models.server}, clients "
                    f"{', '.join(f'{c.site}:{c.arch}' for c in fed.clients)}; device {fed.device}"
                    f"{' (AMP ' + str(fed.amp.dtype).replace('torch.', '') + ')' if fed.amp.enabled else ''}")
        logger.info(f"split {data.split_path}: public {len(data.public)} | " + " | ".join(
            f"{s}: {'/'.join(str(len(v)) for v in items.values())}"
            for s, items in zip(cfg.data.clients, data.clients)) + " (labeled/unlabeled/val/test)")
    R = cfg.train.rounds
    if start >= R and (run / "results.json").exists():
        logger.info(f"{run} has completed all {R} rounds; nothing to resume (raise train.rounds to go on)")
        return json.loads((run / "results.json").read_text())
    bar = tqdm(range(start, R), desc="rounds", initial=start, total=R, disable=not progress or None,
               dynamic_ncols=True)
    done_now = 0
    settings = cfg.settings()  # stored with every state, to warn when a resume changes them
    for rnd in bar:
        tr = time.time()
        fed.begin_round()
        fed.method.round(rnd)
        _check_finite(fed, rnd, run, start)
        losses = fed.log.means()
        val = evaluate_split(fed, "val")
        record = {"round": rnd, "warmup": fed.method.uses_warmup and rnd < cfg.train.warmup_rounds,
                  "lr": {"server": fed.server.lr, **{c.name: c.lr for c in fed.clients}},
                  "loss": losses, "val": val, "improved": [], "test_at_best": {}}
        _select_best(fed, rnd, val, best, ck, record)
        record["skipped"] = dict(fed.skipped)
        record["time_s"] = round(time.time() - tr, 3)
        logger.round(record)
        logger.info(_round_line(record, fed))
        bar.set_postfix(val_dice=f"{val['all']['dice']:.3f}")
        writer.save({"round": rnd, "federation": fed.state_dict(), "best": best, "config": settings},
                    run / STATE_FILE)
        done_now += 1
        if stop_after is not None and done_now >= stop_after and rnd < R - 1:
            logger.info(f"stopping after round {rnd} as asked (resume with --resume {run})")
            return {"stopped_after": rnd}
    bar.close()
    for c in fed.clients:
        save_weights(c.model, ck / client_ckpt_name(c.arch, c.index, "last"), writer)
    save_weights(fed.server.model, ck / global_ckpt_name(fed.server.arch, "last"), writer)
    writer.wait()

    from .report import evaluate_checkpoints, format_table

    final = evaluate_checkpoints(cfg, ck, run / "test", fed=fed, overlays=4, progress=progress)
    results = {"name": cfg.name, "method": cfg.method, "rounds": R,
               "wall_time_s": round(time.time() - t0, 1),  # this invocation (a resumed run: since the resume)
               "rounds_time_s": round(_rounds_time(logger.metrics_path), 1),  # all rounds, across resumes
               "best": best, "test": final["summary"]}
    atomic_write_text(run / "results.json", json.dumps(results, indent=2))
    logger.info("test split, best-val checkpoints (batch 1, every image):\n" + format_table(final))
    return results


def _rounds_time(metrics_path: Path) -> float:
    with open(metrics_path) as f:
        return sum(json.loads(line).get("time_s", 0.0) for line in f if line.strip())


def _select_best(fed: Federation, rnd: int, val: dict, best: dict, ck: Path, record: dict) -> None:
    if fed.method.shared_model:
        if val["all"]["dice"] > best["all"]["dice"]:
            test = evaluate_split(fed, "test")
            best["all"] = {"dice": val["all"]["dice"], "round": rnd, "val": val["all"], "test": test["all"]}
            for c in fed.clients:
                best["clients"][c.index] = {"dice": val[c.name]["dice"], "round": rnd,
                                            "val": val[c.name], "test": test[c.name]}
                save_weights(c.model, ck / client_ckpt_name(c.arch, c.index), fed.writer)
            save_weights(fed.server.model, ck / global_ckpt_name(fed.server.arch), fed.writer)
            record["improved"] = ["all"]
            record["test_at_best"] = test
        return
    for c in fed.clients:
        if c.name in fed.skipped or c.name not in val:
            continue
        if val[c.name]["dice"] > best["clients"][c.index]["dice"]:
            test = evaluate_split(fed, "test", which=[c.index])[c.name]
            best["clients"][c.index] = {"dice": val[c.name]["dice"], "round": rnd, "val": val[c.name], "test": test}
            save_weights(c.model, ck / client_ckpt_name(c.arch, c.index), fed.writer)
            record["improved"].append(c.name)
            record["test_at_best"][c.name] = test
    if val["all"]["dice"] > best["all"]["dice"]:
        best["all"] = {"dice": val["all"]["dice"], "round": rnd, "val": val["all"]}
        save_weights(fed.server.model, ck / global_ckpt_name(fed.server.arch), fed.writer)


def _round_line(rec: dict, fed: Federation) -> str:
    v = rec["val"]
    parts = [f"round {rec['round']}{' (warm-up)' if rec['warmup'] else ''} {rec['time_s']:.1f}s",
             "val Dice " + " ".join(f"{c.index}:{v[c.name]['dice']:.3f}" for c in fed.clients if c.name in v),
             f"all:{v['all']['dice']:.3f}"]
    if rec["improved"]:
        parts.append("best: " + ",".join(rec["improved"]))
    if rec.get("skipped"):
        parts.append("skipped: " + ",".join(rec["skipped"]))
    return " | ".join(parts)


def _check_finite(fed: Federation, rnd: int, run: Path, start: int) -> None:
    bad = fed.log.non_finite()
    if not bad:
        return
    party, term = bad
    sites = {c.name: c.site for c in fed.clients}
    who = f"{party} ({sites[party]})" if party in sites else party
    kept = (f"the state after round {rnd - 1} is kept in {run / STATE_FILE}; fix the cause and continue with "
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
