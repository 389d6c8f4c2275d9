"""datasets/verify.py on small fabricated site trees: a clean tree passes, each kind of bad data is
reported with its path and what is wrong, several problems come out together, and the CLI exit codes."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from datasets.federation import DataError, FederationFiles
from datasets.verify import verify, verify_data, verify_or_raise
from utils.config import load_config

REPO = Path(__file__).resolve().parents[1]
S = 16
SPLIT = {
    "Pub": {"labeled_train": ["p0.png", "p1.png"]},
    "A": {"labeled_train": ["a0.png"], "unlabeled_train": ["a1.png", "a2.png"],
          "val_list": ["a3.png"], "test_list": ["a4.png"]},
    "B": {"labeled_train": [], "unlabeled_train": ["b0.png", "b1.png"],
          "val_list": ["b2.png"], "test_list": ["b3.png"]},
}


def _rgb(seed: int, size=(S, S)) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8))


def _mask(seed: int, size=(S, S), fg: int = 255) -> np.ndarray:
    m = np.zeros((size[1], size[0]), np.uint8)
    m[2 + seed % 3: 10, 3: 12 - seed % 3] = fg
    return m


class Tree:
    """``root/d/{Pub,A,B}/{image,mask}`` following :data:`SPLIT`; A's images are JPEG, the rest PNG."""

    def __init__(self, tmp_path: Path):
        self.root, self.split = tmp_path / "data", tmp_path / "split.json"
        seed = 0
        for site, lists in SPLIT.items():
            for name in [n for names in lists.values() for n in names]:
                seed += 1
                stem = Path(name).stem
                ext = ".jpg" if site == "A" else ".png"
                self.image(site, stem + ext).parent.mkdir(parents=True, exist_ok=True)
                _rgb(seed).save(self.image(site, stem + ext))
                self.mask(site, stem).parent.mkdir(parents=True, exist_ok=True)
                PIL.Image.fromarray(_mask(seed)).save(self.mask(site, stem))
        self.write_split({**SPLIT, "Other": {"labeled_train": ["x.png"]}})  # a site the config does not use

    def image(self, site: str, name: str) -> Path:
        return self.root / "d" / site / "image" / name

    def mask(self, site: str, stem: str) -> Path:
        return self.root / "d" / site / "mask" / f"{stem}.png"

    def write_split(self, split) -> None:
        self.split.write_text(json.dumps(split))

    def edit_split(self, site: str, key: str, names) -> None:
        split = json.loads(self.split.read_text())
        split[site][key] = names
        self.write_split(split)

    def cfg(self):
        return load_config(None, extra={
            "data": {"root": str(self.root), "dataset": "d", "public": "Pub", "clients": ["A", "B"],
                     "split": str(self.split)},
            "models": {"clients": ["resnet18", "resnet18"]}})

    def problems(self):
        return verify_data(self.cfg(), progress=False, workers=2)


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    _rgb(0, (64, 64)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture
def tree(tmp_path) -> Tree:
    return Tree(tmp_path)


def _one(problems, *words) -> str:
    """The single problem containing every word (the path first)."""
    hits = [p for p in problems if all(w in p for w in words)]
    assert len(hits) == 1, f"expected one problem with {words}, got:\n" + "\n".join(problems)
    return hits[0]


def test_clean_tree_passes(tree):
    report = verify(tree.cfg(), progress=False)
    assert report.problems == []
    assert report.n_images == 11 and report.n_masks == 7  # unlabeled files need no mask
    assert report.counts["A"] == {"labeled_train": 1, "unlabeled_train": 2, "val_list": 1, "test_list": 1}
    assert isinstance(verify_or_raise(tree.cfg(), progress=False), FederationFiles)


@pytest.mark.parametrize("damage, words", [
    (lambda p: p.write_bytes(_jpeg_bytes()[:-400]), ["corrupt image, cannot decode its pixels", "truncated"]),
    (lambda p: p.write_bytes(np.random.default_rng(0).bytes(300)), ["not a readable image", "garbage bytes"]),
    (lambda p: p.write_bytes(b""), ["empty image file (0 bytes)"]),
], ids=["truncated", "garbage", "empty"])
def test_unreadable_image(tree, damage, words):
    damage(tree.image("A", "a3.jpg"))
    p = _one(tree.problems(), *words)
    assert p.startswith(f"{tree.image('A', 'a3.jpg')}: ")


def test_truncated_png_image(tree):
    path = tree.image("B", "b3.png")
    _rgb(0, (64, 64)).save(path)
    path.write_bytes(path.read_bytes()[:-200])
    assert _one(tree.problems(), "corrupt image").startswith(f"{path}: ")


def test_missing_mask_only_where_needed(tree):
    tree.mask("A", "a3").unlink()  # val: needs a mask
    tree.mask("A", "a1").unlink()  # unlabeled: does not
    problems = tree.problems()
    assert _one(problems, "no mask with stem 'a3'").startswith(str(tree.image("A", "a3.jpg")))
    assert not [p for p in problems if "a1" in p]


def test_mask_size_differs(tree):
    PIL.Image.fromarray(_mask(1, (12, 16))).save(tree.mask("Pub", "p1"))
    p = _one(tree.problems(), "mask is 12x16 but its image")
    assert p.startswith(f"{tree.mask('Pub', 'p1')}: ") and f"{tree.image('Pub', 'p1.png')} is 16x16" in p


def test_jpeg_like_mask_values(tree):
    noisy = np.clip(_mask(3).astype(int) + np.random.default_rng(0).integers(-5, 6, (S, S)), 0, 255)
    PIL.Image.fromarray(noisy.astype(np.uint8)).save(tree.mask("A", "a4"))
    p = _one(tree.problems(), "mask is not binary")
    assert p.startswith(f"{tree.mask('A', 'a4')}: ")
    assert "12 distinct values: 0, 1, 2, 3, 4, ..., 253, 254, 255" in p and "loader counts every value > 0" in p


@pytest.mark.parametrize("mask", [
    _mask(0, fg=1),                                      # {0, 1} label map
    np.zeros((S, S), np.uint8),                          # nothing to segment
    np.repeat(_mask(0)[..., None], 3, axis=2),           # RGB, equal channels, 0/255
], ids=["zero-one", "all-zero", "rgb-gray"])
def test_accepted_masks(tree, mask):
    PIL.Image.fromarray(mask).save(tree.mask("A", "a0"))
    assert tree.problems() == []


def test_colour_and_16bit_masks(tree):
    colour = np.zeros((S, S, 3), np.uint8)
    colour[4:8, 4:8] = (255, 0, 0)
    PIL.Image.fromarray(colour).save(tree.mask("A", "a0"))
    PIL.Image.fromarray((_mask(0).astype(np.uint16) * 257)).save(tree.mask("B", "b2"))
    problems = tree.problems()
    assert _one(problems, "colour mask (mode 'RGB') whose channels differ", "(255, 0, 0)").startswith(
        str(tree.mask("A", "a0")))
    assert _one(problems, "mask is not binary", "2 distinct values: 0, 65535").startswith(str(tree.mask("B", "b2")))


def test_corrupt_mask(tree):
    tree.mask("B", "b2").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    assert _one(tree.problems(), "mask").startswith(f"{tree.mask('B', 'b2')}: ")


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_image_not_rgb(tree, mode):
    img = _rgb(5)
    img = img.convert("L").convert("I;16") if mode == "I;16" else img.convert(mode)
    img.save(tree.image("B", "b0.png"))
    p = _one(tree.problems(), f"image mode {mode!r}", "expected 3-channel 8-bit RGB")
    assert p.startswith(f"{tree.image('B', 'b0.png')}: ")


@pytest.mark.parametrize("site, key, message", [
    ("Pub", "labeled_train", "the public site 'Pub' has an empty labeled_train list"),
    ("A", "val_list", "client 'A' has an empty val_list"),
    ("B", "test_list", "client 'B' has an empty test_list"),
    ("B", "unlabeled_train", "client 'B' has no training files"),
])
def test_empty_splits(tree, site, key, message):
    tree.edit_split(site, key, [])
    assert _one(tree.problems(), message).startswith(f"{tree.split}: ")


def test_split_names_missing_file(tree):
    tree.edit_split("A", "test_list", ["a4.png", "ghost.png"])
    p = _one(tree.problems(), "'ghost.png'")
    assert p.startswith(f"{tree.split}: ") and "A.test_list" in p and "no image with stem 'ghost'" in p


def test_duplicate_stems(tree):
    shutil.copy(tree.image("B", "b1.png"), tree.image("B", "b1.jpg"))
    assert "duplicate stem 'b1'" in _one(tree.problems(), "duplicate stem")


def test_file_in_two_splits_is_leakage(tree):
    tree.edit_split("A", "test_list", ["a4.png", "a3.png"])  # a3 is also the val file
    tree.edit_split("B", "unlabeled_train", ["b0.png", "b1.png", "b1.png"])
    problems = tree.problems()
    p = _one(problems, "listed in both val_list and test_list of client 'A'")
    assert p.startswith(f"{tree.image('A', 'a3.jpg')}: ") and str(tree.split) in p and "leaking" in p
    assert _one(problems, "listed 2 times in B.unlabeled_train").startswith(str(tree.image("B", "b1.png")))


def test_same_bytes_in_test_and_train(tree):
    shutil.copy(tree.image("A", "a4.jpg"), tree.image("A", "a1.jpg"))  # unlabeled a1 == test a4
    shutil.copy(tree.image("B", "b2.png"), tree.image("B", "b3.png"))  # val b2 == test b3
    problems = tree.problems()
    p = _one(problems, "same bytes as", "a1.jpg")
    assert p.startswith(f"{tree.image('A', 'a4.jpg')}: ") and "A.test_list" in p and "A.unlabeled_train" in p
    assert "B.val_list" in _one(problems, "same bytes as", "b3.png")  # one problem per pair


def test_split_not_json_or_lacking_a_site(tree):
    tree.split.write_text("{not json")
    assert _one(tree.problems(), "not valid JSON").startswith(str(tree.split))
    split = dict(SPLIT)
    del split["B"]
    tree.write_split(split)
    tree.image("A", "a0.jpg").write_bytes(b"")  # the readable part of the split is still checked
    problems = tree.problems()
    assert "site 'B' missing" in _one(problems, str(tree.split))
    _one(problems, str(tree.image("A", "a0.jpg")), "empty image file")


def test_missing_site_and_image_folder(tree):
    shutil.rmtree(tree.root / "d" / "B")
    shutil.rmtree(tree.root / "d" / "Pub" / "image")
    tree.image("A", "a2.jpg").write_bytes(b"junk")  # other sites are still checked
    problems = tree.problems()
    _one(problems, str(tree.root / "d" / "Pub" / "image"), "missing image folder")
    _one(problems, "site folder(s) not found", "Pub, B")
    _one(problems, str(tree.image("A", "a2.jpg")), "not a readable image")


def test_many_problems_reported_together(tree):
    tree.image("A", "a0.jpg").write_bytes(b"")
    tree.mask("A", "a3").unlink()
    PIL.Image.fromarray(_mask(1, (8, 8))).save(tree.mask("B", "b2"))
    _rgb(9).convert("L").save(tree.image("B", "b3.png"))
    tree.edit_split("B", "val_list", ["b2.png", "b0.png"])
    problems = tree.problems()
    for words in [("a0.jpg", "empty image file"), ("no mask with stem 'a3'",), ("b2.png", "mask is 8x8"),
                  ("b3.png", "image mode 'L'"), ("b0.png", "listed in both unlabeled_train and val_list")]:
        _one(problems, *words)
    with pytest.raises(DataError) as e:
        verify_or_raise(tree.cfg(), progress=False)
    assert e.value.problems == problems and f"{len(problems)} data problem(s)" in str(e.value)


def test_cli_exit_codes(tree, tmp_path):
    sets = ["--set", f"data.root={tree.root}", "--set", "data.dataset=d", "--set", "data.public=Pub",
            "--set", "data.clients=[A, B]", "--set", "models.clients=[resnet18, resnet18]"]
    bad_tree = Tree(tmp_path / "bad")
    bad_tree.image("A", "a3.jpg").write_bytes(b"")
    bad_tree.mask("B", "b3").unlink()
    (tmp_path / "bad.yaml").write_text("data:\n  sizee: 3\n")
    runs = {
        0: sets + ["--set", f"data.split={tree.split}"],
        1: sets[:1] + [f"data.root={bad_tree.root}"] + sets[2:] + ["--set", f"data.split={bad_tree.split}"],
        2: ["--config", str(tmp_path / "bad.yaml")],
    }
    procs = {rc: subprocess.Popen([sys.executable, "-m", "datasets.verify", *args], cwd=REPO, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rc, args in runs.items()}
    out = {rc: (p.communicate(timeout=120), p.returncode) for rc, p in procs.items()}
    for rc, ((stdout, stderr), code) in out.items():
        assert code == rc, (rc, stdout, stderr)
        assert "Traceback" not in stderr + stdout
    assert out[0][0][0].startswith("OK: 18 files checked (11 images, 7 masks; public Pub 2; clients A 5")
    lines = out[1][0][0].splitlines()
    assert lines[0] == "2 problem(s):"
    assert lines[1].startswith(f"{bad_tree.image('A', 'a3.jpg')}: empty image file") or \
        lines[2].startswith(f"{bad_tree.image('A', 'a3.jpg')}: empty image file")
    assert any(line.startswith(str(bad_tree.image("B", "b3.png"))) and "no mask" in line for line in lines)
    assert out[2][0][1].startswith("error: ") and "data.sizee" in out[2][0][1]
