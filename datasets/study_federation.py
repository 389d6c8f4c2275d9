"""Build the study federation: a labeled public set from one polyp site, clients on disjoint parts of another.

The seeded study (``bench/study.py``, docs/results.md "The study") needs a setting in which a model trained on
the public set alone clearly beats a model that marks every pixel as polyp. The lite federation's 40
mixed public images do not give that; EndoTect 2020 (200 labeled polyp images) as the public set and
Kvasir-SEG split into disjoint clients does (docs/results.md "Choosing the study's scale" has the numbers).

From sites in the layout of :mod:`datasets.prepare` (``<src>/<site>/{image,mask}/``; e.g.
``python -m datasets.prepare kvasir --src kvasir-seg --out data`` gives ``data/polyp/Kvasir``, and the
EndoTect 2020 polyp images with ``--site EndoTect`` give ``data/polyp/EndoTect``) this writes::

    <out>/<dataset>/Public/{image,mask}/<stem>.png        # --public images of --public-site
    <out>/<dataset>/Kvasir1..K/{image,mask}/<stem>.png    # disjoint parts of --client-site
    <out>/splits/<dataset>.json                           # the fixed split (official format)

Every image is resized once to ``--size`` (bilinear; masks nearest, foreground > 127) and saved as PNG;
runs resize again to ``data.size``. The files of each part and of each client's unlabeled/val/test lists
are drawn with ``random.Random(--seed)`` from the sorted stems, so the federation is the same on every
machine that has the same source files. Nothing is copied from a client's unlabeled list into the split's
labeled lists: clients hold no labels (``labeled_train`` empty), as in the paper's polyp setting.

Command line::

    python -m datasets.study_federation --src data/polyp --out data/study
        [--public-site EndoTect] [--client-site Kvasir] [--public 200] [--clients 4]
        [--unlabeled 100] [--val 20] [--test 40] [--size 128] [--seed 0] [--dataset polyp_study]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from PIL import Image
from tqdm import tqdm

from .sites import scan_site
from .splits import save_split

DEFAULTS = dict(public_site="EndoTect", client_site="Kvasir", public=200, clients=4, unlabeled=100,
                val=20, test=40, size=128, seed=0, dataset="polyp_study")


def _pairs(src: Path, site: str) -> Dict[str, tuple]:
    s = scan_site(src.parent, src.name, site)
    if not s.images:
        raise SystemExit(f"error: {src / site / 'image'}: no images found (expected <src>/<site>/image/ and "
                         f"/mask/, as written by `python -m datasets.prepare`)")
    missing = [st for st in s.stems if st not in s.masks]
    if missing or s.problems:
        raise SystemExit(f"error: {src / site}: " + "; ".join(
            s.problems + [f"{len(missing)} image(s) without a mask, e.g. {missing[:3]}"] * bool(missing)))
    return {st: (s.images[st], s.masks[st]) for st in s.stems}


def _write(pairs: List[tuple], dest: Path, size: int, progress: bool) -> List[str]:
    (dest / "image").mkdir(parents=True, exist_ok=True)
    (dest / "mask").mkdir(parents=True, exist_ok=True)
    names = []
    for stem, (img_p, mask_p) in tqdm(pairs, desc=dest.name, leave=False, disable=not progress or None):
        with Image.open(img_p) as im:
            img = im.convert("RGB").resize((size, size), Image.BILINEAR)
        with Image.open(mask_p) as m:
            mask = np.asarray(m.convert("L").resize((size, size), Image.NEAREST)) > 127
        name = f"{stem}.png"
        img.save(dest / "image" / name)
        Image.fromarray(mask.astype(np.uint8) * 255).save(dest / "mask" / name)
        names.append(name)
    return names


def build(src, out, public_site: str = "EndoTect", client_site: str = "Kvasir", public: int = 200,
          clients: int = 4, unlabeled: int = 100, val: int = 20, test: int = 40, size: int = 128,
          seed: int = 0, dataset: str = "polyp_study", progress: bool = True) -> Path:
    """Write the federation; returns the split file's path. An existing ``<out>/<dataset>`` is an error."""
    src, out = Path(src), Path(out)
    root = out / dataset
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"error: {root} already holds files; remove it or choose another --out/--dataset")
    pub, cli = _pairs(src, public_site), _pairs(src, client_site)
    per = unlabeled + val + test
    if len(pub) < public:
        raise SystemExit(f"error: {src / public_site} has {len(pub)} image/mask pairs, --public asks for {public}")
    if len(cli) < clients * per:
        raise SystemExit(f"error: {src / client_site} has {len(cli)} pairs; {clients} clients x "
                         f"({unlabeled} unlabeled + {val} val + {test} test) need {clients * per}")
    rng = random.Random(seed)
    pub_stems, cli_stems = sorted(pub), sorted(cli)
    rng.shuffle(pub_stems)
    rng.shuffle(cli_stems)
    split = {"Public": {"labeled_train": _write([(s, pub[s]) for s in sorted(pub_stems[:public])],
                                                root / "Public", size, progress)}}
    for k in range(clients):
        part = cli_stems[k * per:(k + 1) * per]
        site = f"{client_site}{k + 1}"
        _write([(s, cli[s]) for s in sorted(part)], root / site, size, progress)
        names = [f"{s}.png" for s in part]  # already in the seeded order
        split[site] = {"labeled_train": [], "unlabeled_train": names[:unlabeled],
                       "val_list": names[unlabeled:unlabeled + val], "test_list": names[unlabeled + val:]}
    path = save_split(split, out / "splits" / f"{dataset}.json")
    return path


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", required=True, help="data root holding <site>/{image,mask} (e.g. data/polyp)")
    ap.add_argument("--out", required=True, help="where to write <dataset>/<site> and splits/")
    for k, v in DEFAULTS.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    a = ap.parse_args(argv)
    kw = {k: getattr(a, k) for k in DEFAULTS}
    path = build(a.src, a.out, **kw)
    split = json.loads(path.read_text())
    print(f"written {Path(a.out) / a.dataset} and {path}: " + ", ".join(
        f"{s} {'/'.join(str(len(v)) for v in d.values())}" for s, d in split.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
