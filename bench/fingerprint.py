"""Fingerprints of whole runs, to show that a refactoring changes no result bit.

``python -m bench.fingerprint --out F.json`` trains the tiny federation (tests/conftest.py: 2 clients,
32-px synthetic images, the ``tiny`` model, one thread) once per method and variant, 3 rounds with 1
warm-up, and writes per run a SHA-256 of every checkpoint tensor (names, dtypes, bytes), of the metrics
records without timings and of the test scores. ``--check F.json`` runs the same and lists every run
whose fingerprint differs (exit 1). Take the fingerprints before a change, check them after it.

Fingerprints are exact: they hold on one machine and torch build, not necessarily across CPUs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "tests"):  # tests/conftest.py: the tiny federation and the metrics records
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

#: name -> extra overrides; every method once, plus the options that change a method's code path
VARIANTS = {
    "hssf": [], "hssf_grades_first": ["hssf.grades_first=true", "hssf.logits_at=head"],
    "hssf_no_rpg": ["hssf.rpg=false", "hssf.feature_perturbation=false"],
    "hssf_official_aug": ["data.augment_seeding=official"],
    "lssl": ["method=lssl"], "local": ["method=local"], "public_only": ["method=public_only"],
    "mean_teacher": ["method=mean_teacher"], "mean_teacher_reset": ["method=mean_teacher", "mean_teacher.teacher=reset"],
    "fixmatch": ["method=fixmatch"], "unimatch": ["method=unimatch"],
    "eln": ["method=eln", "eln.eln_rounds=1"], "eln_clients": ["method=eln", "eln.eln_rounds=1", "eln.mapping=clients"],
    "semifl": ["method=semifl", "semifl.local_epochs=1", "semifl.server_epochs=1"],
    "fedmd": ["method=fedmd"], "ktpfl": ["method=ktpfl"], "feddistill": ["method=feddistill"],
    "fedproto": ["method=fedproto"], "rhfl": ["method=rhfl"], "rhfl_hssf_local": ["method=rhfl", "baselines.local_step=hssf"],
    "hssf_skip": ["train.fault_tolerance=skip_client"],
}


def fingerprint(name: str, extra, tmp: Path) -> dict:
    import torch

    from conftest import run_records, tiny_overrides
    from fed import load_config
    from fed.core.run import train

    # free augmentation draws unless the variant says otherwise: the runs of the reference fingerprints
    # (the default was free until 2026-12-07; hssf_official_aug covers official)
    cfg = load_config(None, tiny_overrides(tmp, name, "train.warmup_rounds=1", "data.augment_seeding=free", *extra,
                                           rounds=3))
    res = train(cfg, progress=False)
    h = hashlib.sha256()
    for p in sorted((Path(cfg.output.dir) / "checkpoints").glob("*.pth")):
        sd = torch.load(p, weights_only=True)
        for k in sorted(sd):
            t = sd[k].detach().cpu().contiguous().reshape(-1)
            h.update(f"{p.name}:{k}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    records = json.dumps(run_records(cfg), sort_keys=True)
    test = json.dumps({"test": res["test"], "best": res["best"]}, sort_keys=True, default=str)
    return {"checkpoints": h.hexdigest(), "metrics": hashlib.sha256(records.encode()).hexdigest(),
            "test": hashlib.sha256(test.encode()).hexdigest(),
            "dice": round(res["test"]["all"]["dice"]["mean"], 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", help="write the fingerprints here")
    g.add_argument("--check", help="compare with these fingerprints")
    ap.add_argument("--only", nargs="+", help="these variants only")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    names = a.only or list(VARIANTS)
    got, bad = {}, []
    want = json.loads(Path(a.check).read_text()) if a.check else {}
    with tempfile.TemporaryDirectory() as d:
        for n in names:
            t = time.perf_counter()
            got[n] = fingerprint(n, VARIANTS[n], Path(d))
            status = ""
            if a.check:
                same = want.get(n) == got[n]
                status = "same" if same else f"DIFFERS (was {want.get(n)})"
                if not same:
                    bad.append(n)
            print(f"{n:20s} dice {got[n]['dice']:7.4f}  {time.perf_counter() - t:5.1f} s  {status}", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        print(f"wrote {a.out}")
        return 0
    print(f"{len(names) - len(bad)}/{len(names)} runs identical" + (f"; differ: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
