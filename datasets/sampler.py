"""The sampler of every training loader: order and per-sample augmentation seeds from a key."""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import numpy as np
from torch.utils.data import Sampler

from utils.rng import derive_seed

AUGMENT_SEEDINGS = ("free", "official")
#: ``official`` mode: the number of values a sample's augmentation seed is drawn from (the official
#: code re-seeds its generators before each view with a seed drawn from 42 values).
OFFICIAL_SEED_VALUES = 42


class KeyedSampler(Sampler):
    """Yields ``(index, seed)`` pairs for one pass over ``n`` samples.

    Before each pass the owner calls :meth:`set_key` with the pass's key, e.g.
    ``(seed, round, party, phase, epoch)``. The order (identity, or a permutation when ``shuffle``)
    and each sample's augmentation seed depend on that key only: the sampler holds no state that a
    checkpoint would have to carry, and two parties given the same key see the same batches.

    ``augment_seeding`` (config ``data.augment_seeding``): ``"free"``: sample ``i``'s seed is
    ``derive_seed(*key, i) & 0xFFFFFFFF`` (a fresh seed per sample and pass). ``"official"``: the
    official code's quirk: the seed is ``j = derive_seed(*key, i, "official") % 42``, one of the 42
    values ``0..41`` drawn uniformly and independently per sample and pass, so each sample's
    geometric draw, RandAugment draw and cutout are one of 42. The order is the same in both modes.
    Either way one seed per sample: its weak and strong views (and mask) share that one draw.
    """

    def __init__(self, n: int, shuffle: bool = False, augment_seeding: str = "free"):
        if augment_seeding not in AUGMENT_SEEDINGS:
            raise ValueError(f"augment_seeding must be one of {AUGMENT_SEEDINGS}, got {augment_seeding!r}")
        self.n, self.shuffle, self.augment_seeding = n, shuffle, augment_seeding
        self.key: Optional[tuple] = None
        self.pass_shuffle: Optional[bool] = None

    def set_key(self, *key, shuffle: Optional[bool] = None) -> "KeyedSampler":
        """The next pass's key; ``shuffle``: this pass's order (None: the sampler's own setting).
        A pass reads both when it starts, so passes over one loader may interleave."""
        self.key, self.pass_shuffle = key, shuffle
        return self

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        if self.key is None:
            raise RuntimeError("KeyedSampler: set_key() must be called before each pass")
        key = self.key
        order = np.arange(self.n)
        if self.shuffle if self.pass_shuffle is None else self.pass_shuffle:
            order = np.random.default_rng(derive_seed(*key, "order")).permutation(self.n)
        official = self.augment_seeding == "official"
        for i in order:
            if official:
                yield int(i), derive_seed(*key, int(i), "official") % OFFICIAL_SEED_VALUES
            else:
                yield int(i), derive_seed(*key, int(i)) & 0xFFFFFFFF
