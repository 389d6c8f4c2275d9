"""Round time per phase, bytes exchanged, throughput and peak memory of a config.

    python bench/round_time.py --config configs/demo.yaml [--set key=value ...] [--rounds 2]

Builds the federation (no run directory is written), then times ``--rounds`` warm-up rounds and
``--rounds`` semi-supervised rounds of the configured method, plus one validation pass. Prints seconds
per round and per phase (condensation, fusion, local...), bytes each client sends and receives per
round (the protocol's accounting), images per second (images through a model forward, all parties; a
feature-perturbed forward counts its batch once) and peak memory (process RSS; CUDA allocator peak).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from datasets.federation import load_federation  # noqa: E402
from fed import load_config  # noqa: E402
from fed.core.run import evaluate_split  # noqa: E402
from fed.core.runner import make_runner  # noqa: E402


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench(cfg, rounds: int = 1, floor: bool = False) -> dict:
    runner = make_runner(cfg, load_federation(cfg))
    counter = {"images": 0}
    models = [runner.server_party.model] + [p.model for p in getattr(runner, "parties", {}).values()]
    for m in models:  # in-process parties only (client_workers: 0)
        m.register_forward_pre_hook(lambda mod, args: counter.__setitem__("images", counter["images"] + args[0].shape[0]))
    dev = runner.device
    out = {"config": cfg.get("_source"), "device": str(dev), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
           "size": cfg.data.size, "batch_size": cfg.data.batch_size, "method": cfg.method,
           "server": cfg.models.server, "clients": list(cfg.models.clients),
           "client_workers": cfg.train.client_workers}
    if dev.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    phases = ([("warmup", 0), ("ssl", cfg.train.warmup_rounds)]
              if runner.method.uses_warmup and cfg.train.warmup_rounds > 0 else [("ssl", 0)])
    try:
        for phase, rnd in phases:
            times, images, parts = [], [], []
            for _ in range(rounds):
                counter["images"] = 0
                _sync(dev)
                t = time.perf_counter()
                rec = runner.run_round(rnd)
                _sync(dev)
                times.append(time.perf_counter() - t)
                images.append(counter["images"])
                parts.append(rec)
            out[f"{phase}_round_s"] = round(sum(times) / len(times), 3)
            for name in parts[0]["phase_s"]:
                out[f"{phase}_{name}_s"] = round(sum(p["phase_s"][name] for p in parts) / len(parts), 3)
            up = [b["up"] for b in parts[0]["bytes"].values()]
            down = [b["down"] for b in parts[0]["bytes"].values()]
            out[f"{phase}_bytes_up_per_client"] = up
            out[f"{phase}_bytes_down_per_client"] = down
            if images[0]:
                out[f"{phase}_images_per_s"] = round(sum(images) / sum(times), 2)
                out[f"{phase}_images_per_round"] = images[0]
        if floor:
            out.update(_floor(runner, phases[-1][1], dev))
        _sync(dev)
        t = time.perf_counter()
        evaluate_split(runner, "val")
        _sync(dev)
        out["val_pass_s"] = round(time.perf_counter() - t, 3)
    finally:
        runner.close()
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if dev.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    return out


def _floor(runner, rnd: int, dev) -> dict:
    """The round's floor: the same passes replayed back to back on batches already on the device
    (recorded during one round: no loading, augmentation, collation or noise)."""
    from fed.core.party import Party

    real, cache = Party.batches, {}

    def record(self, which, r, phase, epoch, stream=None, noisy=None):
        got = list(real(self, which, r, phase, epoch, stream, noisy))
        cache[(self.name, which, phase, epoch, stream)] = got
        yield from got

    def replay(self, which, r, phase, epoch, stream=None, noisy=None):
        yield from cache[(self.name, which, phase, epoch, stream)]

    try:
        Party.batches = record
        runner.run_round(rnd)
        Party.batches = replay
        _sync(dev)
        t = time.perf_counter()
        rec = runner.run_round(rnd)
        _sync(dev)
        took = time.perf_counter() - t
    finally:
        Party.batches = real
    return {"floor_round_s": round(took, 3), **{f"floor_{k}_s": v for k, v in rec["phase_s"].items()}}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                    help="override config keys (one or more pairs; repeatable; applied in order)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds timed per phase")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--floor", action="store_true", help="also time the last phase's round replayed on "
                    "batches already on the device (the floor of its arithmetic; in-process only)")
    return ap


def main(argv=None):
    a = build_parser().parse_args(argv)
    res = bench(load_config(a.config, a.overrides), a.rounds, a.floor)
    if a.json:
        print(json.dumps(res))
        return
    w = max(map(len, res))
    for k, v in res.items():
        print(f"{k.ljust(w)}  {v}")


if __name__ == "__main__":
    main()
