"""Augmentations of SPEC section 5.

- labeled train: rotation uniform in +-90 deg (nearest, zero fill), vertical flip (p=0.5), horizontal
  flip (p=0.5) -- same draw for image and mask;
- unlabeled weak: the same + random crop of ``size`` after reflect-101 padding of ``size/8``;
- unlabeled strong: the *weak view* + RandAugment (n=2, magnitude in [1, m), photometric pool, each
  chosen op applied with p=0.5) + a 16-px gray (127) cutout. Because the photometric ops act on the
  already-transformed weak image, the weak view, the strong view and the mask share one geometric
  draw by construction;
- val/test: none.

All randomness comes from one per-sample seed (see :class:`datasets.sampler.KeyedSampler`), so a
run repeats exactly, with any number of loader workers, and resumes exactly. The rotation, each flip
and the crop are drawn *independently* of each other (as in the official code): albumentations 2's
``Compose.set_random_seed(seed)`` hands the same seed to every child transform, so every child would
draw the same first number (both flips always agreeing, the angle's sign following the flips, the
crop offset following the angle). :class:`IndependentCompose` instead gives child ``j`` its own
stream, ``SeedSequence(seed, spawn_key=(0, j))`` (see :func:`derive_seed`). The photometric draws of
the strong view use ``np.random.default_rng(seed)``, the root stream of that seed, which no geometric
draw uses.
"""
from __future__ import annotations

import random
from typing import Callable, List, Tuple

import albumentations as A
import cv2
import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageEnhance
import PIL.ImageOps
import torch


def derive_seed(seed: int, *key: int) -> int:
    """A 64-bit seed for the independent stream ``key`` of ``seed`` (numpy's SeedSequence spawning)."""
    return int(np.random.SeedSequence(seed, spawn_key=key).generate_state(1, np.uint64)[0])


class IndependentCompose(A.Compose):
    """``A.Compose`` whose ``set_random_seed(seed)`` seeds each child transform independently.

    Why: albumentations 2 passes the *same* seed to every child, so children that each draw one
    number draw the same number -- VerticalFlip and HorizontalFlip then always agree (never a single
    mirror), the rotation's sign follows the flips and the crop offset follows the angle. Here child
    ``j`` gets ``derive_seed(seed, 0, j)`` and the Compose's own generators ``derive_seed(seed, 1)``.
    tests/test_augmentation.py checks the resulting statistics; do not replace this by ``A.Compose``.
    """

    def set_random_seed(self, seed) -> None:
        super().set_random_seed(seed)  # records self.seed; seed None -> fresh entropy everywhere
        if seed is None:
            return
        own = derive_seed(seed, 1)
        self.random_generator, self.py_random = np.random.default_rng(own), random.Random(own)
        for j, t in enumerate(self.transforms):
            t.set_random_seed(derive_seed(seed, 0, j))


def geometric(size: int, crop: bool) -> IndependentCompose:
    """Rotation (nearest, zero fill, as torchvision's RandomRotation), flips, optional pad+crop;
    every transform with its own random stream (see :class:`IndependentCompose`)."""
    ops = [
        A.Rotate(limit=90, interpolation=cv2.INTER_NEAREST, border_mode=cv2.BORDER_CONSTANT,
                 fill=0, fill_mask=0, p=1.0),
        A.VerticalFlip(p=0.5),
        A.HorizontalFlip(p=0.5),
    ]
    if crop:
        ops += [A.Pad(padding=int(size * 0.125), border_mode=cv2.BORDER_REFLECT_101),
                A.RandomCrop(size, size)]
    return IndependentCompose(ops, seed=0)


# --- RandAugment, photometric pool (FixMatch's RandAugmentMC with the geometric ops removed) -------
# Each op: (PIL image, magnitude v in [1, 10)) -> PIL image.

def _enhance(kind):
    return lambda img, v: kind(img).enhance(v * 0.9 / 10 + 0.05)


RANDAUGMENT_POOL: List[Tuple[str, Callable]] = [
    ("AutoContrast", lambda img, v: PIL.ImageOps.autocontrast(img)),
    ("Brightness", _enhance(PIL.ImageEnhance.Brightness)),
    ("Color", _enhance(PIL.ImageEnhance.Color)),
    ("Contrast", _enhance(PIL.ImageEnhance.Contrast)),
    ("Equalize", lambda img, v: PIL.ImageOps.equalize(img)),
    ("Identity", lambda img, v: img),
    ("Posterize", lambda img, v: PIL.ImageOps.posterize(img, int(v * 4 / 10) + 4)),
    ("Sharpness", _enhance(PIL.ImageEnhance.Sharpness)),
    ("Solarize", lambda img, v: PIL.ImageOps.solarize(img, 256 - int(v * 256 / 10))),
]


def randaugment(img: np.ndarray, rng: np.random.Generator, n: int = 2, m: int = 10,
                cutout: int = 16) -> np.ndarray:
    """n ops drawn with replacement; each with magnitude ``rng.integers(1, m)`` and applied with p=0.5;
    then a ``cutout`` x ``cutout`` gray square (clipped at the border)."""
    pil = PIL.Image.fromarray(img)
    for k in rng.integers(0, len(RANDAUGMENT_POOL), size=n):
        v = int(rng.integers(1, m))
        if rng.random() < 0.5:
            pil = RANDAUGMENT_POOL[k][1](pil, v)
    if cutout:
        w, h = pil.size
        x0 = int(max(0, rng.uniform(0, w) - cutout / 2))
        y0 = int(max(0, rng.uniform(0, h) - cutout / 2))
        PIL.ImageDraw.Draw(pil).rectangle((x0, y0, min(w, x0 + cutout), min(h, y0 + cutout)),
                                          fill=(127, 127, 127))
    return np.asarray(pil)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """HWC uint8 RGB -> CHW float, normalised with mean 0.5 and std 0.5 (range [-1, 1])."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(127.5).sub_(1.0)


def mask_tensor(mask: np.ndarray) -> torch.Tensor:
    """HW {0,1} uint8 -> (1, H, W) float."""
    return torch.from_numpy(np.ascontiguousarray(mask))[None].float()
