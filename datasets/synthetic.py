"""Synthetic multi-site "polyp" data for the demo and the tests.

Each image is a textured, vignetted endoscopy-like background with one (sometimes two) irregular,
shaded blob; the mask is the blob. Every site has its own look (colour cast, texture scale, contrast,
noise, blur), which gives the domain shift between hospitals that HSSF is about. Everything is a
deterministic function of ``(seed, site index, image index)``. The first site (the public set) is a
mixture of all looks; site k (k >= 1) has look k.

``python -m datasets.synthetic OUT_ROOT --sites Public SiteA SiteB --n 24 40 40 --size 64``
writes ``OUT_ROOT/<dataset>/<site>/{image,mask}/<site>_<i>.png``.

The sites are written once at their own native ``size`` (:data:`NATIVE_SIZE` unless the config's
``data.synthetic.size`` says otherwise), whatever ``data.size`` a run uses: the loader resizes them,
as it does any real dataset, so one folder serves every ``data.size``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Sequence

import cv2
import numpy as np

NATIVE_SIZE = 64  # side of the written images when the config does not set data.synthetic.size

# Per-site look: background RGB, texture cells, texture contrast, noise std, blur sigma (px at 64 px).
# The lesion cues are shared by every site (brighter and yellower than the background, a dark rim,
# a specular highlight), so a model trained on one site transfers, imperfectly, to the others.
STYLES = [
    dict(bg=(170, 80, 70), cells=6, contrast=1.0, noise=6, blur=0.6),
    dict(bg=(150, 70, 90), cells=10, contrast=0.8, noise=9, blur=1.0),
    dict(bg=(185, 110, 85), cells=4, contrast=1.2, noise=4, blur=0.3),
    dict(bg=(135, 75, 60), cells=8, contrast=0.9, noise=10, blur=1.2),
    dict(bg=(165, 95, 105), cells=12, contrast=1.1, noise=7, blur=0.8),
    dict(bg=(160, 95, 55), cells=5, contrast=0.7, noise=5, blur=0.5),
]


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)


def _blob_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    cy, cx = rng.uniform(0.25, 0.75, size=2) * size
    r0 = rng.uniform(0.10, 0.25) * size
    theta = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    r = r0 * (1 + sum(rng.uniform(0, 0.15) * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
                      for k in (2, 3, 4)))
    aspect = rng.uniform(0.7, 1.3)
    pts = np.stack([cx + r * np.cos(theta) * aspect, cy + r * np.sin(theta)], 1)
    mask = np.zeros((size, size), np.uint8)
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return mask


def synth_image(rng: np.random.Generator, size: int, style: dict):
    """One RGB uint8 image (size, size, 3) and its {0,1} mask."""
    s = size / 64.0
    tex = _smooth_noise(rng, size, style["cells"]) * 18 * style["contrast"]
    img = np.empty((size, size, 3), np.float32)
    img[:] = np.array(style["bg"], np.float32) * rng.uniform(0.85, 1.15)
    img += tex[..., None]
    # a few darker "vessels"
    for _ in range(rng.integers(1, 4)):
        p = (rng.uniform(0, size, size=(4, 2))).astype(np.int32)
        cv2.polylines(img, [p], False, tuple(float(c) * 0.75 for c in style["bg"]),
                      thickness=max(1, int(round(s))))
    mask = _blob_mask(rng, size)
    if rng.random() < 0.15:
        mask |= _blob_mask(rng, size)
    # shaded blob: brighter and yellower than the background, bright centre, dark rim, highlight
    dist = cv2.distanceTransform(mask, cv2.DIST_L2, 3)
    shade = dist / (dist.max() + 1e-6)
    base = np.array(style["bg"], np.float32) * np.array([1.2, 1.45, 1.3], np.float32)
    blob = base * (0.8 + 0.35 * shade[..., None])
    blob += _smooth_noise(rng, size, style["cells"] * 2)[..., None] * 8
    rim = (dist > 0) & (dist <= max(1.0, 1.5 * s))
    blob[rim] *= 0.7
    m = mask[..., None].astype(bool)
    img = np.where(m, blob, img)
    cy, cx = np.argwhere(dist == dist.max())[0]
    cv2.circle(img, (int(cx), int(cy)), max(1, int(round(1.5 * s))), (250, 245, 235), -1)
    # vignette, blur, sensor noise
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    img *= (1 - 0.9 * (xx ** 2 + yy ** 2))[..., None]
    sigma = style["blur"] * s
    if sigma > 0.1:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    img += rng.standard_normal(img.shape).astype(np.float32) * style["noise"]
    return np.clip(img, 0, 255).astype(np.uint8), mask


def _differences(old: dict, new: dict) -> List[str]:
    """What differs between two ``synthetic.json`` parameter sets, in words (on disk vs requested)."""
    out = []
    if not isinstance(old, dict):
        return [f"unreadable parameters {old!r}"]
    old_sites, new_sites = old.get("sites") or {}, new["sites"]
    if not isinstance(old_sites, dict):
        old_sites = {}
    for site in list(old_sites) + [s for s in new_sites if s not in old_sites]:
        if site not in new_sites:
            out.append(f"site {site!r}: {old_sites[site]} images on disk, not requested")
        elif site not in old_sites:
            out.append(f"site {site!r}: requested ({new_sites[site]} images), not on disk")
        elif old_sites[site] != new_sites[site]:
            out.append(f"site {site!r}: {old_sites[site]} images on disk, {new_sites[site]} requested")
    for key, what in (("size", "native size"), ("seed", "seed")):
        if old.get(key) != new[key]:
            out.append(f"{what}: {old.get(key)} on disk, {new[key]} requested")
    return out or [f"parameters {old} on disk, {new} requested"]


def make_synthetic(root, dataset: str, sites: Dict[str, int], size: int = NATIVE_SIZE, seed: int = 0,
                   progress: bool = False) -> Path:
    """Write ``root/dataset/<site>/{image,mask}/<site>_<i>.png`` for ``sites = {name: count}``, each
    image ``size`` x ``size`` (the native size; loaders resize to their own).

    Writes ``root/dataset/synthetic.json`` with the parameters; an existing folder made with other
    parameters is a :class:`FileExistsError` that names the folder and what differs (delete it to
    regenerate).
    """
    from tqdm import tqdm

    from utils.io import atomic_write_text

    base = Path(root) / dataset
    params = {"sites": dict(sites), "size": size, "seed": seed}
    marker = base / "synthetic.json"
    if marker.exists():
        old = json.loads(marker.read_text())
        if old == params:
            return base
        raise FileExistsError(
            f"{base} holds synthetic data made with other parameters: {'; '.join(_differences(old, params))}. "
            f"Delete the folder to regenerate it")
    for k, (site, count) in enumerate(sites.items()):
        for sub in ("image", "mask"):
            (base / site / sub).mkdir(parents=True, exist_ok=True)
        for i in tqdm(range(count), desc=f"synthetic {site}", leave=False, disable=not progress or None):
            rng = np.random.default_rng([seed, k, i])
            # the first site (the public set) mixes the looks of all sites; site k has look k
            style = STYLES[(i if k == 0 else k) % len(STYLES)]
            img, mask = synth_image(rng, size, style)
            name = f"{site}_{i:04d}.png"
            cv2.imwrite(str(base / site / "image" / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
            cv2.imwrite(str(base / site / "mask" / name), mask * 255)
    atomic_write_text(marker, json.dumps(params))
    return base


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root")
    ap.add_argument("--dataset", default="synthetic")
    ap.add_argument("--sites", nargs="+", default=["Public", "SiteA", "SiteB", "SiteC"])
    ap.add_argument("--n", nargs="+", type=int, default=[24, 40, 40, 40])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if len(a.n) not in (1, len(a.sites)):
        ap.error("--n takes one count or one per site")
    counts = a.n * len(a.sites) if len(a.n) == 1 else a.n
    out = make_synthetic(a.root, a.dataset, dict(zip(a.sites, counts)), a.size, a.seed, progress=True)
    print(f"wrote {sum(counts)} images to {out}")


if __name__ == "__main__":
    main()
