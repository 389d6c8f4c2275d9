"""Check, before training, every file a run will read; report every problem at once.

``python -m datasets.verify --config configs/x.yaml [--set key.sub=value ...]`` prints
``OK: ...`` and exits 0, or prints ``N problem(s):`` and one line per problem (path first) and exits 1;
a bad configuration exits 2. The trainer calls :func:`verify_or_raise` (or :func:`verify_data`).

Split-level checks (missing site folders, duplicate stems, split file unreadable or lacking a site,
names without a file, missing masks, empty lists) come from :func:`datasets.federation.load_federation`,
which also writes a seeded split when the split file does not exist yet, as a run would. On top of
them, every listed file is read the way :func:`datasets.dataset.load_pair` reads it, in a thread pool
(PIL decodes without the GIL):

- an image must decode fully (truncated, garbage or empty files fail) and be 8-bit RGB;
- a mask (needed by the public set and by every client's labeled_train, val_list and test_list;
  unlabeled files need none) must decode fully, have its image's size and hold only background and
  foreground: {0, 255} or {0, 1} (a constant mask is fine) in one channel, or three equal channels;
- no file may be listed in two splits of one client, nor twice in one split, and an evaluation
  image (val_list / test_list) may not have the same bytes as a file of another kind of split
  (train / val / test), even under another name or site.

When the federation cannot be resolved (a site folder is missing, the split file is unreadable),
the files that can still be found are checked anyway: those the readable part of the split names,
or every file of a site the split does not cover.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np
import PIL.Image
from PIL import ImageChops

from .sites import scan_site
from .splits import CLIENT_SPLITS, PUBLIC_SPLITS, SplitError, load_split

if TYPE_CHECKING:  # federation imports torch (via .dataset): imported when verifying, so that
    from .federation import FederationFiles  # `python -m datasets.verify` with a bad config answers at once

NEEDS_MASK = ("labeled_train", "val_list", "test_list")
FOLDER = "whole folder"  # role of the files of a site that no readable split covers
MODE_NAMES = {
    "1": "1-bit black and white", "L": "8-bit grayscale", "LA": "grayscale with alpha",
    "P": "palette (indexed colour)", "PA": "palette with alpha", "RGBA": "RGB with alpha",
    "CMYK": "CMYK", "YCbCr": "YCbCr", "I": "32-bit integer grayscale", "F": "32-bit float grayscale",
    "I;16": "16-bit grayscale", "I;16B": "16-bit grayscale", "I;16L": "16-bit grayscale",
    "I;16N": "16-bit grayscale",
}


@dataclass
class Entry:
    """One listed file: its site, split, image and the mask to check (None: not needed or missing)."""

    site: str
    key: str
    image: Path
    mask: Optional[Path]


@dataclass
class Report:
    problems: List[str]
    federation: Optional[FederationFiles]
    split_path: Optional[Path]
    split_generated: bool
    counts: Dict[str, Dict[str, int]] = field(default_factory=dict)  # site -> split -> files
    n_images: int = 0
    n_masks: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        """``N files checked (public P, clients ...)`` in words."""
        def site(s: str) -> str:
            c = self.counts.get(s, {})
            parts = ", ".join(f"{k.replace('_list', '').replace('_train', '')} {n}" for k, n in c.items())
            return f"{s} {sum(c.values())}" + (f" ({parts})" if len(c) > 1 else "")

        sites = list(self.counts)
        pub = site(sites[0]) if sites else "none"
        clients = "; ".join(site(s) for s in sites[1:]) or "none"
        return (f"{self.n_images + self.n_masks} files checked ({self.n_images} images, {self.n_masks} "
                f"masks; public {pub}; clients {clients}) in {self.seconds:.1f} s")


# --------------------------------------------------------------------------- which files


def _federation_entries(cfg, fed: FederationFiles) -> List[Entry]:
    d = cfg.data
    out = [Entry(d.public, "labeled_train", img, mask) for img, mask, _ in fed.public]
    for site, lists in zip(d.clients, fed.clients):
        if lists is None:  # a site this party does not read
            continue
        for key in CLIENT_SPLITS:
            out += [Entry(site, key, img, mask if key in NEEDS_MASK else None) for img, mask, _ in lists[key]]
    return out


def _readable_split(path: Path, public: str, clients: Sequence[str]) -> Dict[str, Dict[str, list]]:
    """The parts of a split file that can be used: ``{site: {split: [names]}}``, possibly empty."""
    try:
        return load_split(path, public, clients)
    except SplitError:
        pass
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    out: Dict[str, Dict[str, list]] = {}
    for site, keys in [(public, PUBLIC_SPLITS)] + [(c, CLIENT_SPLITS) for c in clients]:
        lists = data.get(site) if isinstance(data, dict) else None
        if isinstance(lists, dict) and all(isinstance(lists.get(k), list) and
                                           all(isinstance(n, str) for n in lists[k]) for k in keys):
            out[site] = {k: lists[k] for k in keys}
    return out


def _fallback_entries(cfg, path: Optional[Path], problems: List[str], clients: Sequence[str]) -> List[Entry]:
    """Files to check when :func:`load_federation` failed (of the public site and ``clients``).

    It stops before resolving split names when a site folder is missing or the split file is
    unreadable; masks that are missing are then reported here (otherwise it already did).
    """
    d = cfg.data
    names = [d.public] + list(clients)
    sites = {}
    for s in names:
        try:
            sites[s] = scan_site(d.root, d.dataset, s)
        except OSError as e:  # already reported: load_federation failed on it too
            problems.append(_os_problem(e, path))
    split = _readable_split(path, d.public, clients) if path is not None and path.is_file() else {}
    resolved = len(sites) == len(names) and all((site.path / "image").is_dir() and s in split
                                                for s, site in sites.items())
    out: List[Entry] = []
    for s, site in sites.items():
        if not (site.path / "image").is_dir():
            continue
        if s not in split:
            out += [Entry(s, FOLDER, img, site.masks.get(stem)) for stem, img in sorted(site.images.items())]
            continue
        for key in PUBLIC_SPLITS if s == d.public else CLIENT_SPLITS:
            for name in split[s][key]:
                pair = site.pair(name)
                if pair is None:
                    continue  # reported by load_federation, or once the split/site problem is fixed
                need = key in NEEDS_MASK
                if need and pair[1] is None and not resolved:
                    problems.append(f"{pair[0]}: no mask with stem {Path(name).stem!r} in {site.path / 'mask'} "
                                    f"(needed: listed in {s}.{key})")
                out.append(Entry(s, key, pair[0], pair[1] if need else None))
    return out


# --------------------------------------------------------------------------- split consistency


def _join(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _kind(key: str) -> str:
    return {"val_list": "val", "test_list": "test"}.get(key, "train")


def _split_overlaps(entries: List[Entry], clients: Sequence[str], split_path) -> List[str]:
    """A file in two splits of one client (leakage) or twice in one split."""
    where: Dict[Tuple[str, Path], List[str]] = {}
    for e in entries:
        if e.key != FOLDER:
            where.setdefault((e.site, e.image), []).append(e.key)
    problems = []
    for (site, img), keys in where.items():
        distinct = list(dict.fromkeys(keys))
        if len(distinct) > 1:
            leak = len({_kind(k) for k in distinct}) > 1
            problems.append(f"{img}: listed in {'both ' if len(distinct) == 2 else ''}{_join(distinct)} of {'client' if site in clients else 'site'} "
                            f"{site!r} in {split_path}; a file must be in one split only"
                            + (" (evaluation data leaking into another split)" if leak else ""))
        for k in distinct:
            if keys.count(k) > 1:
                problems.append(f"{img}: listed {keys.count(k)} times in {site}.{k} of {split_path}")
    return problems


def _content_overlaps(entries: List[Entry], digests: Dict[Path, bytes]) -> List[str]:
    """An evaluation image whose bytes equal those of a file in a split of another kind."""
    roles: Dict[Path, List[Entry]] = {}
    for e in entries:
        roles.setdefault(e.image, []).append(e)
    groups: Dict[bytes, List[Path]] = {}
    for img, dig in digests.items():
        if dig is not None:
            groups.setdefault(dig, []).append(img)
    problems, reported = [], set()
    for paths in groups.values():
        if len(paths) < 2:
            continue
        for a in paths:
            ea = next((e for e in roles[a] if e.key in ("val_list", "test_list")), None)
            if ea is None:
                continue
            others = [(b, eb) for b in paths if b != a and frozenset((a, b)) not in reported
                      for eb in roles[b] if eb.key != FOLDER and _kind(eb.key) != _kind(ea.key)]
            if others:
                b, eb = others[0]
                reported.add(frozenset((a, b)))
                problems.append(f"{a}: same bytes as {b}, but {a.name} is in {ea.site}.{ea.key} and "
                                f"{b.name} in {eb.site}.{eb.key}: evaluation data leaking into another split")
    return problems


# --------------------------------------------------------------------------- reading files


def _values(vals: np.ndarray) -> str:
    v = [str(int(x)) if float(x).is_integer() else f"{float(x):g}" for x in vals]
    return ", ".join(v) if len(v) <= 8 else ", ".join(v[:5] + ["..."] + v[-3:])


def _os_problem(e: OSError, split_path) -> str:
    return f"{e.filename or ''}: {e.strerror or e} (while scanning the sites or writing the split {split_path})"


def _read(path: Path, what: str, problems: List[str]):
    """(decoded PIL image, blake2b digest of the bytes) or (None, None) with a problem added."""
    try:
        data = path.read_bytes()
    except OSError as e:
        problems.append(f"{path}: cannot read {what} file ({e.strerror or e})")
        return None, None
    if not data:
        problems.append(f"{path}: empty {what} file (0 bytes)")
        return None, None
    try:
        im = PIL.Image.open(io.BytesIO(data))
    except PIL.Image.UnidentifiedImageError:
        problems.append(f"{path}: not a readable {what}: unknown format or garbage bytes "
                        f"({len(data)} bytes starting {data[:8]!r})")
        return None, None
    except Exception as e:  # noqa: BLE001 - any decoder failure is a problem of this file
        problems.append(f"{path}: corrupt {what}, cannot read its header ({type(e).__name__}: {e})")
        return None, None
    try:
        im.load()  # decode every pixel: truncated or damaged data fails here, not in the header
    except Exception as e:  # noqa: BLE001
        problems.append(f"{path}: corrupt {what}, cannot decode its pixels ({type(e).__name__}: {e})")
        return None, None
    return im, hashlib.blake2b(data, digest_size=16).digest()


def _mask_values(path: Path, m: PIL.Image.Image) -> Optional[str]:
    """A problem if the mask is not background/foreground, else None."""
    mode, note = m.mode, ""
    if mode == "1":
        return None
    if mode in ("RGB", "RGBA"):
        r, g, b = m.split()[:3]
        if ImageChops.difference(r, g).getbbox() or ImageChops.difference(g, b).getbbox():
            a = np.asarray(m)[..., :3]
            packed = (a[..., 0].astype(np.uint32) << 16) | (a[..., 1].astype(np.uint32) << 8) | a[..., 2]
            colours = np.unique(packed)
            shown = ", ".join(str((int(c) >> 16, (int(c) >> 8) & 255, int(c) & 255)) for c in colours[:4])
            return (f"{path}: colour mask (mode {mode!r}) whose channels differ, {len(colours)} colours: "
                    f"{shown}{', ...' if len(colours) > 4 else ''}; expected a grayscale 0/255 mask")
        hist = r.histogram()
    elif mode in ("L", "LA"):
        hist = m.histogram()[:256]  # alpha ignored, as by convert('L')
    elif mode in ("P", "PA"):
        hist, note = m.convert("L").histogram(), " after the palette is converted to grayscale"
    elif mode.startswith("I") or mode == "F":
        vals, cnt = np.unique(np.asarray(m), return_counts=True)
        hist = dict(zip(vals.tolist(), cnt.tolist()))
    else:
        return f"{path}: mask mode {mode!r} ({MODE_NAMES.get(mode, 'unsupported')}); expected single-channel 0/255"
    counts = hist if isinstance(hist, dict) else {v: c for v, c in enumerate(hist) if c}
    vals = np.array(sorted(counts))
    if set(counts) <= {0, 255} or set(counts) <= {0, 1}:
        return None
    top = vals[-1]
    between = 100 * sum(c for v, c in counts.items() if v not in (0, top)) / sum(counts.values())
    return (f"{path}: mask is not binary{note}: {len(vals)} distinct values: {_values(vals)} "
            f"(expected 0/255 or 0/1; {between:.1f}% of pixels are neither 0 nor {_values(vals[-1:])}, and "
            f"the loader counts every value > 0 as foreground; a JPEG-compressed mask? re-binarise it, "
            f"see `python -m datasets.prepare`)")


def _check(image: Path, mask: Optional[Path]) -> Tuple[List[str], Optional[bytes]]:
    problems: List[str] = []
    im, digest = _read(image, "image", problems)
    if im is not None:
        if im.mode != "RGB":
            problems.append(f"{image}: image mode {im.mode!r} ({MODE_NAMES.get(im.mode, 'not RGB')}); "
                            f"expected 3-channel 8-bit RGB")
        im.close()
    if mask is not None:
        m, _ = _read(mask, "mask", problems)
        if m is not None:
            if im is not None and m.size != im.size:
                problems.append(f"{mask}: mask is {m.size[0]}x{m.size[1]} but its image {image} is "
                                f"{im.size[0]}x{im.size[1]} (width x height)")
            bad = _mask_values(mask, m)
            if bad:
                problems.append(bad)
            m.close()
    return problems, digest


# --------------------------------------------------------------------------- entry points


def verify(cfg, progress: bool = True, workers: Optional[int] = None,
           clients: Optional[Sequence[str]] = None) -> Report:
    """Check the data of ``cfg``; a :class:`Report` with every problem found (empty: all good).
    ``clients``: the client sites to check besides the public one (default: all; see
    :func:`~datasets.federation.load_federation`: a party that reads fewer needs the run's split file)."""
    from tqdm import tqdm

    from .federation import DataError, client_sites, load_federation, split_path_for

    t0 = time.perf_counter()
    d = cfg.data
    problems: List[str] = []
    fed: Optional[FederationFiles] = None
    path: Optional[Path] = split_path_for(cfg)
    existed = path.exists()
    reading = client_sites(cfg, clients)
    try:
        fed = load_federation(cfg, progress=progress, clients=clients)
        path = fed.split_path
        entries = _federation_entries(cfg, fed)
    except DataError as e:
        problems += e.problems
        entries = _fallback_entries(cfg, path, problems, reading)
    except OSError as e:  # e.g. the split cannot be written next to read-only data
        problems.append(_os_problem(e, path))
        entries = _fallback_entries(cfg, path, problems, reading)
    problems += _split_overlaps(entries, d.clients, path)

    checks: Dict[Path, Optional[Path]] = {}  # image -> mask to check (once, even if listed twice)
    for e in entries:
        if e.mask is not None or e.image not in checks:
            checks[e.image] = e.mask or checks.get(e.image)
    results: Dict[Path, Tuple[List[str], Optional[bytes]]] = {}
    workers = workers or min(16, (os.cpu_count() or 1) + 4)
    ex = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = {ex.submit(_check, img, mask): img for img, mask in checks.items()}
        with tqdm(total=len(futures), desc="verifying data", unit="img",
                  disable=None if progress else True) as bar:
            for f in as_completed(futures):
                results[futures[f]] = f.result()
                bar.update()
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
    for img in checks:
        problems += results[img][0]
    problems += _content_overlaps(entries, {img: r[1] for img, r in results.items()})
    problems = list(dict.fromkeys(problems))  # each once, in order

    counts: Dict[str, Dict[str, int]] = {s: {} for s in [d.public] + reading}
    for e in entries:
        counts[e.site][e.key] = counts[e.site].get(e.key, 0) + 1
    return Report(problems, fed if not problems else None, path, not existed and path.exists(), counts,
                  len(checks), sum(m is not None for m in checks.values()), time.perf_counter() - t0)


def verify_data(cfg, progress: bool = True, workers: Optional[int] = None) -> List[str]:
    """Every problem with the data ``cfg`` would train and test on (an empty list: all good)."""
    return verify(cfg, progress, workers).problems


def verify_or_raise(cfg, progress: bool = True, workers: Optional[int] = None,
                    clients: Optional[Sequence[str]] = None) -> FederationFiles:
    """The :class:`FederationFiles` of ``cfg`` (of the public site and ``clients``, default all) once
    every file checks out; :class:`DataError` otherwise."""
    from .federation import DataError

    report = verify(cfg, progress, workers, clients)
    if report.problems:
        raise DataError(report.problems, header="data problem(s) found before training "
                                                "(re-check with `python -m datasets.verify`)")
    return report.federation


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m datasets.verify",
        description="Check every image, mask and split a run of this config would read; list all problems.")
    p.add_argument("--config", help="YAML config (default: built-in defaults)")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. --set data.root=/data data.size=256 (one or more "
                        "pairs; repeatable; applied in order)")
    p.add_argument("--workers", type=_positive, default=None, help="reader threads (default: CPU count + 4, max 16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from utils.config import ConfigError, load_config

    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.set, general_only=True)  # no method's settings are needed
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        report = verify(cfg, progress=not args.no_progress, workers=args.workers)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    split = f"split {report.split_path}" + (" (generated now)" if report.split_generated else "")
    if report.problems:
        print(f"{len(report.problems)} problem(s):")
        for p in report.problems:
            print(p)
        print(f"({report.summary()}; {split})")
        return 1
    print(f"OK: {report.summary()}; {split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
