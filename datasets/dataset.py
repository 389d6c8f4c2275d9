"""Torch datasets over (image, mask) file pairs, and the seeded sampler that drives augmentation.

Images are read once, resized to ``size`` x ``size`` (image bilinear, mask nearest, as the official
code with PIL) and, with ``cache=True``, kept in memory as uint8: later epochs only augment.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset

from .transforms import geometric, mask_tensor, randaugment, to_tensor

Item = Tuple[Path, Optional[Path], str]  # image path, mask path (None if unlabeled), name


def load_pair(img_path: Path, mask_path: Optional[Path], size: int):
    """RGB uint8 (size, size, 3) and {0,1} uint8 mask (size, size) (None without a mask path)."""
    with PIL.Image.open(img_path) as im:
        img = np.asarray(im.convert("RGB").resize((size, size), PIL.Image.BILINEAR))
    mask = None
    if mask_path is not None:
        with PIL.Image.open(mask_path) as m:
            mask = (np.asarray(m.convert("L").resize((size, size), PIL.Image.NEAREST)) > 0).astype(np.uint8)
    return img, mask


class SegDataset(Dataset):
    """``mode``: ``'labeled'`` -> (image, mask, name) with rotation/flips; ``'eval'`` -> (image, mask,
    name) without augmentation; ``'unlabeled'`` -> (weak, strong, name).

    Indexed by ``(index, seed)`` (from :class:`datasets.sampler.KeyedSampler`) or by a plain index (seed 0).
    """

    MODES = ("labeled", "unlabeled", "eval")

    def __init__(self, items: Sequence[Item], size: int, mode: str, cache: bool = True):
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.items, self.size, self.mode, self.cache = list(items), size, mode, cache
        self._cache: dict = {}
        self.geo = None if mode == "eval" else geometric(size, crop=(mode == "unlabeled"))

    def __len__(self) -> int:
        return len(self.items)

    def preload(self, progress: bool = False) -> "SegDataset":
        """Read every pair now (in the main process, so loader workers inherit the cache)."""
        if self.cache:
            from tqdm import tqdm

            for i in tqdm(range(len(self)), desc=f"loading {self.mode}", leave=False,
                          disable=not progress or None):
                self._load(i)
        return self

    def _load(self, i: int):
        if i in self._cache:
            return self._cache[i]
        img_path, mask_path, _ = self.items[i]
        pair = load_pair(img_path, None if self.mode == "unlabeled" else mask_path, self.size)
        if self.cache:
            self._cache[i] = pair
        return pair

    def __getitem__(self, key):
        i, seed = key if isinstance(key, tuple) else (key, 0)
        img, mask = self._load(i)
        name = self.items[i][2]
        if self.mode == "eval":
            return to_tensor(img), mask_tensor(mask), name
        self.geo.set_random_seed(seed)  # an IndependentCompose: one stream per transform
        if self.mode == "labeled":
            out = self.geo(image=img, mask=mask)
            return to_tensor(out["image"]), mask_tensor(out["mask"]), name
        weak = self.geo(image=img)["image"]
        # photometric draws: the root stream of ``seed``; the geometric transforms use spawned ones
        strong = randaugment(weak, np.random.default_rng(seed))
        return to_tensor(weak), to_tensor(strong), name


def collate_names(batch: List[tuple]):
    """Default collation, but names stay a list of strings."""
    cols = list(zip(*batch))
    return tuple(torch.stack(c) if isinstance(c[0], torch.Tensor) else list(c) for c in cols)
