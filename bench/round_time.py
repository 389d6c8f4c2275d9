"""Round time, throughput and peak memory of a config.

    python bench/round_time.py --config configs/demo.yaml [--set key=value ...] [--rounds 2]

Builds the federation (no run directory is written), then times ``--rounds`` warm-up rounds and
``--rounds`` semi-supervised rounds of the configured method, plus one validation pass. Prints seconds
per round, images per second (images through a model forward, all parties; a feature-perturbed
forward counts its batch once) and peak memory (process RSS; CUDA allocator peak on GPU).
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
from fed.engine import Federation, evaluate_split  # noqa: E402
from fed import load_config  # noqa: E402


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench(cfg, rounds: int = 1) -> dict:
    fed = Federation(cfg, load_federation(cfg))
    counter = {"images": 0}
    models = [fed.server.model] + [c.model for c in fed.clients]
    for m in models:
        m.register_forward_pre_hook(lambda mod, args: counter.__setitem__("images", counter["images"] + args[0].shape[0]))
    dev = fed.device
    out = {"config": cfg.get("_source"), "device": str(dev), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
           "size": cfg.data.size, "batch_size": cfg.data.batch_size, "method": cfg.method,
           "server": cfg.models.server, "clients": list(cfg.models.clients)}
    if dev.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    phases = ([("warmup", 0), ("ssl", cfg.train.warmup_rounds)] if fed.method.uses_warmup
              else [("ssl", 0)])
    for phase, rnd in phases:
        times, images = [], []
        for _ in range(rounds):
            fed.begin_round()
            counter["images"] = 0
            _sync(dev)
            t = time.perf_counter()
            fed.method.round(rnd)
            _sync(dev)
            times.append(time.perf_counter() - t)
            images.append(counter["images"])
        out[f"{phase}_round_s"] = round(sum(times) / len(times), 3)
        out[f"{phase}_images_per_s"] = round(sum(images) / sum(times), 2)
        out[f"{phase}_images_per_round"] = images[0]
    _sync(dev)
    t = time.perf_counter()
    evaluate_split(fed, "val")
    _sync(dev)
    out["val_pass_s"] = round(time.perf_counter() - t, 3)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if dev.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                    help="override config keys (one or more pairs; repeatable; applied in order)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds timed per phase")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    return ap


def main(argv=None):
    a = build_parser().parse_args(argv)
    res = bench(load_config(a.config, a.overrides), a.rounds)
    if a.json:
        print(json.dumps(res))
        return
    w = max(map(len, res))
    for k, v in res.items():
        print(f"{k.ljust(w)}  {v}")


if __name__ == "__main__":
    main()
