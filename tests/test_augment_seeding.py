"""``data.augment_seeding``: ``free`` (a fresh keyed seed per sample and pass, unchanged) and ``official``
(the official code's quirk: each sample's augmentation seed is one of 42 values, drawn per sample and
pass, shared by its weak and strong views)."""
import numpy as np
import PIL.Image
import pytest
import torch
from scipy.stats import chisquare

import datasets.dataset as dataset_module
from datasets.dataset import SegDataset
from datasets.sampler import OFFICIAL_SEED_VALUES, KeyedSampler
from fed.core.party import build_loader
from utils.config import ConfigError, load_config
from utils.rng import derive_seed

MODES = ("free", "official")
#: 50 passes of 100 samples: 5000 per-sample seeds (fixed keys: the statistics are deterministic)
KEYS = [(s, r, "client1", "local_unlabeled", 0) for s in range(5) for r in range(10)]


def _seeds(mode, n=100, keys=KEYS, shuffle=False):
    return [s for key in keys for _, s in KeyedSampler(n, shuffle=shuffle, augment_seeding=mode).set_key(*key)]


def test_free_mode_is_the_previous_formula_bit_for_bit():
    # values of the sampler before the switch existed (git HEAD at the time), for two keys
    assert list(KeyedSampler(4, shuffle=True).set_key(42, 0, "client0", "local_unlabeled", 0)) == \
        [(2, 4140840758), (3, 3494874829), (0, 1302983702), (1, 3301328644)]
    assert list(KeyedSampler(4, shuffle=True, augment_seeding="free").set_key(7, 3, "public", "condensation", 2)) == \
        [(0, 3918571170), (2, 2867072110), (3, 2633840748), (1, 2825765987)]
    for key in KEYS[:5]:
        assert list(KeyedSampler(30, augment_seeding="free").set_key(*key)) == \
            [(i, derive_seed(*key, i) & 0xFFFFFFFF) for i in range(30)]


@pytest.mark.parametrize("shuffle", [False, True])
def test_the_order_is_the_same_in_both_modes(shuffle):
    for key in KEYS[:5]:
        orders = [[i for i, _ in KeyedSampler(40, shuffle=shuffle, augment_seeding=m).set_key(*key)] for m in MODES]
        assert orders[0] == orders[1]
        assert (orders[0] == list(range(40))) is (not shuffle)


def test_official_seeds_are_42_values_drawn_uniformly():
    official, free = _seeds("official"), _seeds("free")
    assert len(official) == len(free) == 5000
    assert sorted(set(official)) == list(range(OFFICIAL_SEED_VALUES)) and OFFICIAL_SEED_VALUES == 42
    counts = np.bincount(official, minlength=42)
    assert chisquare(counts).pvalue > 1e-3, counts
    assert len(set(free)) > 4990  # 32-bit seeds: ~3 collisions expected among 5000
    # a function of the key only; another pass (epoch) or party draws again
    assert _seeds("official", keys=KEYS[:3]) == official[:300]
    other = _seeds("official", keys=[(0, 0, "client1", "local_unlabeled", 1)])
    assert other != official[:100] and np.mean(np.array(other) == np.array(official[:100])) < 0.15
    # one draw per sample, independent of the free seed of that sample
    assert abs(np.corrcoef(np.array(official), np.array(free) % 42)[0, 1]) < 0.1


def _asym_items(tmp_path, side=16):
    y, x = np.mgrid[0:side, 0:side]
    mask = ((x + 2 * y) % 5 < 2) & (x > 3)  # no symmetry: every flip and rotation shows
    img = np.stack([mask * 255, 10 * x + 5, 10 * y + 5], -1).astype(np.uint8)
    PIL.Image.fromarray(img).save(tmp_path / "a.png")
    PIL.Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "a_mask.png")
    return [(tmp_path / "a.png", tmp_path / "a_mask.png", "a")]


def test_official_mode_gives_each_sample_at_most_42_geometric_draws(tmp_path):
    items = _asym_items(tmp_path)
    keys = [(3, r, "client0", "labeled", e) for r in range(20) for e in range(20)]  # 400 passes
    for mode_ds in ("labeled", "unlabeled"):
        ds = SegDataset(items, 16, mode_ds)
        distinct = {}
        for mode in MODES:
            sampler = KeyedSampler(1, augment_seeding=mode)
            outs = {ds[next(iter(sampler.set_key(*key)))][0].numpy().tobytes() for key in keys}
            distinct[mode] = len(outs)
        assert 30 <= distinct["official"] <= 42, (mode_ds, distinct)
        assert distinct["free"] > 150, (mode_ds, distinct)


@pytest.mark.parametrize("mode", MODES)
def test_weak_strong_and_mask_share_one_geometric_draw(tmp_path, monkeypatch, mode):
    items = _asym_items(tmp_path)
    keys = [(1, r, "client0", "local_unlabeled", 0) for r in range(30)]
    labeled = SegDataset(items, 16, "labeled")
    for key in keys:
        img, mask, _ = labeled[next(iter(KeyedSampler(1, augment_seeding=mode).set_key(*key)))]
        assert torch.equal((img[0] > 0).float(), mask[0])  # channel 0 is the mask: one draw for both
    # the photometric step made the identity: the strong view must then be the weak view itself
    monkeypatch.setattr(dataset_module, "randaugment", lambda img, rng: img.copy())
    unlabeled = SegDataset(items, 16, "unlabeled")
    weaks = []
    for key in keys:
        weak, strong, _ = unlabeled[next(iter(KeyedSampler(1, augment_seeding=mode).set_key(*key)))]
        assert torch.equal(weak, strong)
        weaks.append(weak.numpy().tobytes())
    assert len(set(weaks)) > 5  # the views do vary from pass to pass


def test_loaders_take_the_setting_from_the_config(tmp_path):
    ds = SegDataset(_asym_items(tmp_path), 16, "unlabeled")
    assert load_config().data.augment_seeding == "official"  # as the official code
    for mode in MODES:
        d = load_config(None, [f"data.augment_seeding={mode}", "data.num_workers=0"]).data
        loader = build_loader(ds, d, torch.device("cpu"))
        assert loader.sampler.augment_seeding == mode
        seeds = [s for key in KEYS[:20] for _, s in loader.sampler.set_key(*key)]
        assert (max(seeds) < 42) is (mode == "official")


def test_a_bogus_value_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.augment_seeding: 'bogus' is not one of free, official"):
        load_config(None, ["data.augment_seeding=bogus"])
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  augment_seeding: bogus\n")
    with pytest.raises(ConfigError, match=r"data\.augment_seeding"):
        load_config(p)
    with pytest.raises(ValueError, match="augment_seeding"):
        KeyedSampler(3, augment_seeding="bogus")
