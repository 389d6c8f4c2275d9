"""Site scanning, split files, transforms and the synthetic generator."""
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from datasets.dataset import SegDataset
from datasets.sampler import KeyedSampler
from datasets.federation import DataError, load_federation
from datasets.sites import scan_site
from datasets.splits import generate_split, load_split, official_split_name
from datasets.synthetic import make_synthetic
from utils.config import ConfigError, load_config

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")

POLYP_SITES = ["CVC-ColonDB", "CVC-ClinicDB", "EndoTect-ETIS", "CVC-300", "Kvasir"]


def test_official_split_name():
    name = official_split_name("polyp", [1, 0.0, 0.0, 0.0, 0.0], POLYP_SITES)
    assert name == "polyp-[1, 0.0, 0.0, 0.0, 0.0]-['CVC-ColonDB', 'CVC-ClinicDB', 'EndoTect-ETIS', 'CVC-300', 'Kvasir'].json"


@needs_shared
def test_reads_official_split_files():
    polyp = load_split(SHARED / "splits" / "polyp_official_split.json", POLYP_SITES[0], POLYP_SITES[1:])
    counts = {s: [len(polyp[s][k]) for k in ("labeled_train", "unlabeled_train", "val_list", "test_list")]
              for s in POLYP_SITES[1:]}
    assert counts == {"CVC-ClinicDB": [0, 489, 61, 62], "EndoTect-ETIS": [0, 316, 40, 40],
                      "CVC-300": [0, 240, 30, 30], "Kvasir": [0, 800, 100, 100]}
    assert len(polyp["CVC-ColonDB"]["labeled_train"]) == 380
    isic = load_split(SHARED / "splits" / "isic_official_split.json", "public",
                      ["domain1", "domain2", "domain3", "domain4"])
    assert [len(isic[f"domain{i}"]["unlabeled_train"]) for i in range(1, 5)] == [160, 320, 640, 955]
    assert len(isic["public"]["labeled_train"]) == 100


def test_generate_split_uses_the_official_arithmetic():
    stems = {"pub": [f"p{i}.png" for i in range(10)], "a": [f"a{i}.png" for i in range(612)],
             "b": [f"b{i}.png" for i in range(100)]}
    s = generate_split(stems, "pub", ["a", "b"], [0.0, 0.5], [0.8, 0.1, 0.1], seed=1)
    assert [len(s["a"][k]) for k in ("labeled_train", "unlabeled_train", "val_list", "test_list")] == [0, 489, 61, 62]
    assert [len(s["b"][k]) for k in ("labeled_train", "unlabeled_train", "val_list", "test_list")] == [40, 40, 10, 10]
    assert sorted(sum(s["a"].values(), [])) == sorted(stems["a"])  # a partition
    assert s == generate_split(stems, "pub", ["a", "b"], [0.0, 0.5], [0.8, 0.1, 0.1], seed=1)
    assert s != generate_split(stems, "pub", ["a", "b"], [0.0, 0.5], [0.8, 0.1, 0.1], seed=2)


def _write(path: Path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(arr).save(path)


def test_pairs_by_stem_across_extensions(tmp_path):
    img = np.full((8, 8, 3), 100, np.uint8)
    _write(tmp_path / "polyp" / "Kv" / "image" / "x1.jpg", img)
    _write(tmp_path / "polyp" / "Kv" / "mask" / "x1.png", np.zeros((8, 8), np.uint8))
    _write(tmp_path / "polyp" / "Kv" / "image" / "x2.png", img)
    _write(tmp_path / "polyp" / "Kv" / "image" / "x2.jpg", img)  # duplicate stem
    site = scan_site(tmp_path, "polyp", "Kv")
    assert site.pair("x1.png")[0].name == "x1.jpg" and site.pair("x1.png")[1].name == "x1.png"
    assert site.pair("nope.png") is None
    assert any("duplicate stem 'x2'" in p for p in site.problems)


def test_keyed_sampler_is_a_function_of_its_key_only():
    key = (0, 3, "client1", "local_unlabeled", 0)
    a, b = KeyedSampler(6, shuffle=True).set_key(*key), KeyedSampler(6, shuffle=True).set_key(*key)
    ea = list(a)
    assert ea == list(b) and sorted(i for i, _ in ea) == list(range(6))
    assert list(a) == ea  # no hidden state: the same key gives the same pass again
    assert list(a.set_key(0, 3, "client1", "local_unlabeled", 1)) != ea  # next epoch: new order and seeds
    assert list(KeyedSampler(6, shuffle=True).set_key(0, 3, "client0", "local_unlabeled", 0)) != ea  # party
    assert [i for i, _ in KeyedSampler(4).set_key(*key)] == [0, 1, 2, 3]  # no shuffle: official order
    assert len({s for _, s in KeyedSampler(50).set_key(*key)}) == 50  # a distinct seed per sample
    with pytest.raises(RuntimeError, match="set_key"):
        list(KeyedSampler(3))


def test_a_pass_can_shuffle_an_unshuffled_loader_and_passes_interleave():
    """``set_key(..., shuffle=True)`` (SemiFL's mix partners): that pass is the keyed permutation a
    shuffling sampler gives, the next pass is in the loader's order again, and two passes over one
    sampler, interleaved, each keep the key and order they started with."""
    key = (0, 3, "client1", "mix", 0)
    plain = KeyedSampler(20)
    shuffled = list(plain.set_key(*key, shuffle=True))
    assert shuffled == list(KeyedSampler(20, shuffle=True).set_key(*key))
    assert [i for i, _ in shuffled] != list(range(20))
    assert [i for i, _ in plain.set_key(*key)] == list(range(20))  # the override was for one pass
    fix = iter(plain.set_key(0, 3, "client1", "fix", 0))
    first = next(fix)  # a pass reads its key when it starts
    mix = iter(plain.set_key(*key, shuffle=True))
    pairs = [(first, next(mix))] + [(f, next(mix)) for f in fix]
    assert [f for f, _ in pairs] == list(KeyedSampler(20).set_key(0, 3, "client1", "fix", 0))
    assert [m for _, m in pairs] == shuffled


def _square_items(tmp_path, n=3, size=40):
    items = []
    for i in range(n):
        m = np.zeros((size, size), np.uint8)
        m[5 + i:20 + i, 8:30] = 255
        _write(tmp_path / f"img{i}.png", np.stack([m] * 3, -1))
        _write(tmp_path / f"m{i}.png", m)
        items.append((tmp_path / f"img{i}.png", tmp_path / f"m{i}.png", f"s/img{i}.png"))
    return items


def test_labeled_augmentation_keeps_image_and_mask_aligned_and_repeats(tmp_path):
    ds = SegDataset(_square_items(tmp_path), 40, "labeled")  # no resize: only the augmentation acts
    for seed in range(8):
        img, mask, _ = ds[(1, seed)]
        assert img.shape == (3, 40, 40) and mask.shape == (1, 40, 40)
        assert torch.equal((img[0] > 0).float(), mask[0])  # the image *is* its mask: same geometry
        img2, mask2, _ = ds[(1, seed)]
        assert torch.equal(img, img2) and torch.equal(mask, mask2)
    assert not torch.equal(ds[(1, 0)][0], ds[(1, 1)][0])


def test_unlabeled_views_share_the_geometric_draw(tmp_path):
    ds = SegDataset(_square_items(tmp_path), 32, "unlabeled")
    from datasets import transforms

    for seed in range(5):
        weak, strong, _ = ds[(0, seed)]
        assert weak.shape == strong.shape == (3, 32, 32)
        assert weak.min() >= -1 and weak.max() <= 1
        # the strong view is RandAugment + cutout applied to this very weak view
        w_u8 = ((weak.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        expect = transforms.to_tensor(transforms.randaugment(w_u8, np.random.default_rng(seed)))
        assert torch.allclose(strong, expect, atol=1e-6)


def test_eval_mode_is_plain_resize(tmp_path):
    items = _square_items(tmp_path, 1, size=64)
    img, mask, name = SegDataset(items, 32, "eval")[0]
    assert name == "s/img0.png" and set(mask.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(SegDataset(items, 32, "eval")[0][0], img)


def test_synthetic_is_deterministic_and_binary(tmp_path):
    a = make_synthetic(tmp_path / "a", "syn", {"P": 3, "S1": 2}, size=32, seed=3)
    b = make_synthetic(tmp_path / "b", "syn", {"P": 3, "S1": 2}, size=32, seed=3)
    for f in sorted(a.rglob("*.png")):
        assert f.read_bytes() == (b / f.relative_to(a)).read_bytes()
    m = np.asarray(PIL.Image.open(a / "S1" / "mask" / "S1_0000.png"))
    assert set(np.unique(m)) <= {0, 255} and m.max() == 255
    c = make_synthetic(tmp_path / "c", "syn", {"P": 3, "S1": 2}, size=32, seed=4)
    assert (a / "P/image/P_0000.png").read_bytes() != (c / "P/image/P_0000.png").read_bytes()
    with pytest.raises(FileExistsError, match="other parameters"):
        make_synthetic(tmp_path / "a", "syn", {"P": 4}, size=32, seed=3)


def test_load_federation_generates_split_and_reports_problems(tmp_path):
    over = [f"data.root={tmp_path}", "data.dataset=syn", "data.public=P", "data.clients=[A, B]",
            "models.clients=[resnet18, resnet18]", "data.synthetic={public: 4, per_client: 10}", "data.size=32"]
    fed = load_federation(load_config(None, over))
    assert fed.split_path.name == "syn-[1, 0.0, 0.0]-['P', 'A', 'B'].json" and fed.split_path.exists()
    assert len(fed.public) == 4 and [len(fed.clients[0][k]) for k in
                                     ("labeled_train", "unlabeled_train", "val_list", "test_list")] == [0, 8, 1, 1]
    # a split naming a file that does not exist, and an empty test list: all reported at once
    split = json.loads(fed.split_path.read_text())
    split["A"]["val_list"].append("ghost.png")
    split["B"]["test_list"] = []
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(split))
    with pytest.raises(DataError) as e:
        load_federation(load_config(None, over + [f"data.split={bad}"]))
    msg = str(e.value)
    assert "lists 'ghost.png'" in msg and "client 'B' has an empty test_list" in msg
    with pytest.raises(DataError, match="site folder.*not found.*Nope"):
        load_federation(load_config(None, over + ["data.clients=[A, Nope]", "data.synthetic=null"]))


def _syn_over(root, synthetic="{public: 4, per_client: 6}"):
    return [f"data.root={root}", "data.dataset=syn", "data.public=P", "data.clients=[A, B]",
            "models.clients=[resnet18, resnet18]", f"data.synthetic={synthetic}"]


def test_synthetic_sites_are_made_once_at_native_size_and_resized_to_any_data_size(tmp_path):
    over = _syn_over(tmp_path)
    marker = tmp_path / "syn" / "synthetic.json"
    for size in (32, 48, 64):  # the first call generates; the others reuse the same files
        fed = load_federation(load_config(None, over + [f"data.size={size}"]))
        assert json.loads(marker.read_text()) == {"sites": {"P": 4, "A": 6, "B": 6}, "size": 64, "seed": 0}
        with PIL.Image.open(fed.public[0][0]) as im:
            assert im.size == (64, 64)  # native size on disk (the default, as the demo's data)
        img, mask, _ = SegDataset(fed.public, size, "eval")[0]
        assert img.shape == (3, size, size) and mask.shape == (1, size, size)
        weak, strong, _ = SegDataset(fed.clients[0]["unlabeled_train"], size, "unlabeled")[(0, 1)]
        assert weak.shape == strong.shape == (3, size, size)
    # an explicit native size, in its own folder
    fed = load_federation(load_config(None, _syn_over(tmp_path / "n", "{public: 4, per_client: 6, size: 40}")
                                      + ["data.size=32"]))
    with PIL.Image.open(fed.clients[1]["test_list"][0][0]) as im:
        assert im.size == (40, 40)
    assert SegDataset(fed.clients[1]["test_list"], 32, "eval")[0][0].shape == (3, 32, 32)


@pytest.mark.parametrize("synthetic, differs", [
    ("{public: 4, per_client: 6, seed: 1}", "seed: 0 on disk, 1 requested"),
    ("{public: 4, per_client: 6, size: 32}", "native size: 64 on disk, 32 requested"),
    ("{public: 4, per_client: 7}", "site 'A': 6 images on disk, 7 requested"),
])
def test_synthetic_folder_made_with_other_parameters_is_a_clear_error(tmp_path, synthetic, differs):
    load_federation(load_config(None, _syn_over(tmp_path) + ["data.size=32"]))
    with pytest.raises(DataError) as e:
        load_federation(load_config(None, _syn_over(tmp_path, synthetic) + ["data.size=32"]))
    msg = str(e.value)
    assert f"{tmp_path / 'syn'} holds synthetic data made with other parameters" in msg and differs in msg
    assert "delete the folder" in msg.lower() and "data.synthetic" in msg
    other = ["data.clients=[A, C]", "models.clients=[resnet18, resnet18]"]
    with pytest.raises(DataError, match="site 'B': 6 images on disk, not requested; "
                                        "site 'C': requested \\(6 images\\), not on disk"):
        load_federation(load_config(None, _syn_over(tmp_path) + other))


@pytest.mark.parametrize("bad", ["{public: 4, per_client: 6, size: 0}", "{public: 4, per_client: 6, size: true}",
                                 "{public: 4, per_client: 6, size: 4}", "{public: 0, per_client: 6}",
                                 "{public: 4, per_client: 6, sise: 32}", "{public: 4}",
                                 "{public: 4, per_client: 6, seed: -1}"])
def test_synthetic_config_is_checked(bad):
    with pytest.raises(ConfigError, match="data.synthetic: must be null or .*size: PX"):
        load_config(None, [f"data.synthetic={bad}"])
    assert load_config(None, ["data.synthetic={public: 4, per_client: 6, seed: 2, size: 40}"]).data.synthetic[
        "size"] == 40
