"""Split files in the official format, reading and seeded generation.

Format (JSON): ``{site: {split: [file names]}}``; the public site has only ``labeled_train``, each
client has ``labeled_train``, ``unlabeled_train``, ``val_list`` and ``test_list``. The official file
name is ``{data}-{ratios}-{sites}.json`` with Python list formatting, e.g.
``polyp-[1, 0.0, 0.0, 0.0, 0.0]-['CVC-ColonDB', 'CVC-ClinicDB', 'EndoTect-ETIS', 'CVC-300', 'Kvasir'].json``.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Dict, List, Sequence

CLIENT_SPLITS = ("labeled_train", "unlabeled_train", "val_list", "test_list")
PUBLIC_SPLITS = ("labeled_train",)

SplitDict = Dict[str, Dict[str, List[str]]]


class SplitError(ValueError):
    pass


def official_split_name(dataset: str, labeled_ratio: Sequence[float], sites: Sequence[str]) -> str:
    """The official file name; ``labeled_ratio`` and ``sites`` start with the public site (ratio 1)."""
    return f"{dataset}-{list(labeled_ratio)}-{list(sites)}.json"


def load_split(path, public: str, clients: Sequence[str]) -> SplitDict:
    """Read and check a split file: every site present, every list a list of file names."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SplitError(f"{path}: split file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SplitError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise SplitError(f"{path}: expected an object mapping site -> splits, got {type(data).__name__}")
    problems = []
    for site, needed in [(public, PUBLIC_SPLITS)] + [(c, CLIENT_SPLITS) for c in clients]:
        if site not in data:
            problems.append(f"site {site!r} missing (the file has: {', '.join(map(repr, data))})")
            continue
        for key in needed:
            lst = data[site].get(key) if isinstance(data[site], dict) else None
            if not isinstance(lst, list) or not all(isinstance(n, str) for n in lst):
                problems.append(f"{site}.{key}: missing or not a list of file names")
    if problems:
        raise SplitError(f"{path}: " + "; ".join(problems))
    return data


def generate_split(stems: Dict[str, List[str]], public: str, clients: Sequence[str],
                   labeled_ratio: Sequence[float], train_val_test: Sequence[float], seed: int) -> SplitDict:
    """Seeded split with the official arithmetic.

    ``stems[site]`` lists that site's file names. Each list is sorted, then shuffled by a
    ``random.Random(seed)`` shared across sites in order. Client counts: labeled =
    ``int(n*train*ratio)``, train end = ``int(n*train)``, val end = ``int(n*train + n*val)``, test = rest.
    """
    tra, val, _ = train_val_test
    rng = random.Random(seed)
    pub = sorted(stems[public])
    rng.shuffle(pub)
    out: SplitDict = {public: {"labeled_train": pub}}
    for site, ratio in zip(clients, labeled_ratio):
        names = sorted(stems[site])
        rng.shuffle(names)
        n = len(names)
        n_lab, n_tr, n_val = int(n * tra * ratio), int(n * tra), int(n * tra + n * val)
        out[site] = {
            "labeled_train": names[:n_lab],
            "unlabeled_train": names[n_lab:n_tr],
            "val_list": names[n_tr:n_val],
            "test_list": names[n_val:],
        }
    return out


def save_split(split: SplitDict, path) -> Path:
    from utils.io import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(split))
    return path
