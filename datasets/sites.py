"""Site folders on disk: ``<root>/<dataset>/<site>/{image,mask}/<stem>.<ext>``.

An image and its mask are paired by file *stem* (Kvasir ships ``.jpg`` images with ``.png`` masks, and
the official split files list ``.png`` names for both), so a split entry ``x.png`` finds ``image/x.jpg``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass
class Site:
    """The image/mask pairs of one site folder, by stem, and what was wrong while scanning it."""

    name: str
    path: Path
    images: Dict[str, Path] = field(default_factory=dict)
    masks: Dict[str, Path] = field(default_factory=dict)
    problems: List[str] = field(default_factory=list)

    def pair(self, name: str) -> Optional[Tuple[Path, Optional[Path]]]:
        """(image, mask-or-None) for a file name or stem listed in a split file; None if no image."""
        stem = Path(name).stem
        img = self.images.get(stem)
        return None if img is None else (img, self.masks.get(stem))

    @property
    def stems(self) -> List[str]:
        return sorted(self.images)


def _scan_dir(d: Path, what: str, problems: List[str]) -> Dict[str, Path]:
    found: Dict[str, Path] = {}
    for f in sorted(os.listdir(d)):
        p = d / f
        if f.startswith(".") or not p.is_file():
            continue
        if p.suffix.lower() not in IMAGE_EXTS:
            problems.append(f"{p}: not an image file (expected one of {', '.join(IMAGE_EXTS)})")
            continue
        if p.stem in found:
            problems.append(f"{p}: duplicate stem {p.stem!r} in {what} folder (also {found[p.stem].name})")
            continue
        found[p.stem] = p
    return found


def scan_site(root, dataset: str, site: str, need_masks: bool = True) -> Site:
    """Scan ``<root>/<dataset>/<site>``; problems (missing folders, duplicate stems...) are collected."""
    path = Path(root) / dataset / site
    s = Site(site, path)
    img_dir, mask_dir = path / "image", path / "mask"
    if not img_dir.is_dir():
        s.problems.append(f"{img_dir}: missing image folder (expected {path}/image/<name> and {path}/mask/<name>)")
        return s
    s.images = _scan_dir(img_dir, "image", s.problems)
    if mask_dir.is_dir():
        s.masks = _scan_dir(mask_dir, "mask", s.problems)
    elif need_masks:
        s.problems.append(f"{mask_dir}: missing mask folder")
    return s
