"""From a config to the federation's file lists: public set + per-client labeled/unlabeled/val/test.

``load_federation(cfg)`` scans the site folders, reads the split file (or generates a seeded one in the
official format when it does not exist yet), resolves every listed name to an image/mask pair by stem
and reports *all* problems at once in a :class:`DataError`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .dataset import Item
from .sites import Site, scan_site
from .splits import CLIENT_SPLITS, SplitError, generate_split, load_split, official_split_name, save_split


class DataError(ValueError):
    """Problems with the data on disk; ``problems`` lists each with its path."""

    def __init__(self, problems: List[str], header: str = "data problems"):
        self.problems = problems
        super().__init__(f"{len(problems)} {header}:\n  - " + "\n  - ".join(problems))


@dataclass
class FederationFiles:
    """The resolved file lists of a federation (what each party will read); the parties themselves are
    :mod:`fed.core.runner`'s."""

    public: List[Item]
    #: per client: labeled_train/unlabeled_train/val_list/test_list; None for a client whose site was not read
    clients: List[Optional[Dict[str, List[Item]]]]
    split_path: Path
    sites: Dict[str, Site] = field(default_factory=dict)


def split_path_for(cfg) -> Path:
    from utils.config import labeled_ratios

    d = cfg.data
    if d.split:
        return Path(d.split)
    ratios = [1] + labeled_ratios(cfg)
    return Path(d.root) / "splits" / official_split_name(d.dataset, ratios, [d.public] + list(d.clients))


def ensure_synthetic(cfg, progress: bool = False) -> None:
    """With ``data.synthetic`` set, generate the sites once at their native size
    (``data.synthetic.size``), independent of ``data.size``: the loaders resize them."""
    syn = cfg.data.synthetic
    if syn:
        from .synthetic import NATIVE_SIZE, make_synthetic

        counts = {cfg.data.public: syn["public"], **{c: syn["per_client"] for c in cfg.data.clients}}
        try:
            make_synthetic(cfg.data.root, cfg.data.dataset, counts, syn.get("size", NATIVE_SIZE),
                           syn.get("seed", 0), progress)
        except FileExistsError as e:
            raise DataError([f"{e}, or set data.synthetic (image counts, native size, seed), data.public "
                             f"and data.clients to what it holds"], header="data problem") from None


def client_sites(cfg, clients: Optional[Sequence[str]] = None) -> List[str]:
    """The client sites of ``data.clients`` that a party reads, in their order (``None``: all)."""
    return list(cfg.data.clients) if clients is None else [c for c in cfg.data.clients if c in set(clients)]


def load_federation(cfg, progress: bool = False, clients: Optional[Sequence[str]] = None) -> FederationFiles:
    """The federation's file lists. ``clients``: the client sites to read (default: every one of
    ``data.clients``); the others' lists are ``None``. A party that does not hold every site (the server
    of a deployment reads only the public set; a site only its own folder and the public set) needs the
    run's split file: it is generated only where every site is read."""
    d = cfg.data
    reading = client_sites(cfg, clients)
    unknown = sorted(set(clients or ()) - set(d.clients))
    if unknown:
        raise DataError([f"{', '.join(map(repr, unknown))}: not a client site of data.clients "
                         f"({', '.join(map(repr, d.clients))})"], header="data problem")
    if len(reading) == len(d.clients):
        ensure_synthetic(cfg, progress)
    names = [d.public] + reading
    sites = {s: scan_site(d.root, d.dataset, s) for s in names}
    problems = [p for s in sites.values() for p in s.problems]
    missing_dirs = [s for s in names if not sites[s].images and not (sites[s].path / "image").is_dir()]
    if missing_dirs:
        problems.append(f"site folder(s) not found under {Path(d.root) / d.dataset}: "
                        f"{', '.join(missing_dirs)} (expected <root>/<dataset>/<site>/image and /mask; "
                        f"see `python -m datasets.prepare`)")
        raise DataError(problems)

    path = split_path_for(cfg)
    if not path.exists() and len(reading) < len(d.clients):
        raise DataError(problems + [
            f"{path}: split file not found. Reading {'only the public set' if not reading else 'only ' + ', '.join(reading)}"
            f" (not every site's folder), this party cannot make the split: give it the run's split file "
            f"(data.split), made where every site is read (`python -m datasets.verify`) or the official one"])
    if not path.exists():
        from utils.config import labeled_ratios

        split = generate_split({s: [p.name for p in sites[s].images.values()] for s in names},
                               d.public, d.clients, labeled_ratios(cfg), d.train_val_test, cfg.seed)
        save_split(split, path)
    try:
        split = load_split(path, d.public, reading)
    except SplitError as e:
        raise DataError(problems + [str(e)]) from None

    def resolve(site: str, key: str) -> List[Item]:
        items = []
        for name in split[site][key]:
            pair = sites[site].pair(name)
            if pair is None:
                problems.append(f"{path}: {site}.{key} lists {name!r} but {sites[site].path / 'image'} "
                                f"has no image with stem {Path(name).stem!r}")
            elif pair[1] is None and key != "unlabeled_train":
                problems.append(f"{pair[0]}: no mask with stem {Path(name).stem!r} in {sites[site].path / 'mask'}")
            else:
                items.append((pair[0], pair[1], f"{site}/{Path(name).name}"))
        return items

    public = resolve(d.public, "labeled_train")
    lists = [{k: resolve(c, k) for k in CLIENT_SPLITS} if c in reading else None for c in d.clients]
    if not split[d.public]["labeled_train"]:
        problems.append(f"{path}: the public site {d.public!r} has an empty labeled_train list")
    for c in reading:
        for key in ("val_list", "test_list"):
            if not split[c][key]:
                problems.append(f"{path}: client {c!r} has an empty {key}")
        if not split[c]["labeled_train"] and not split[c]["unlabeled_train"]:
            problems.append(f"{path}: client {c!r} has no training files")
    if problems:
        raise DataError(problems)
    return FederationFiles(public, lists, path, sites)
