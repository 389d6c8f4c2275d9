"""datasets/prepare.py on small fabricated copies of each public download layout."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from datasets.prepare import PrepareError, binarise_mask, prepare
from datasets.sites import scan_site

REPO = Path(__file__).resolve().parents[1]
H, W = 16, 20


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _mask(seed: int) -> np.ndarray:
    """A 0/255 rectangle, different per seed."""
    m = np.zeros((H, W), np.uint8)
    m[2 + seed % 4: 10 + seed % 4, 3 + seed % 5: 14 + seed % 5] = 255
    return m


def _write(path: Path, arr: np.ndarray, *params) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), arr, list(params))
    return path


def _noisy_jpeg_mask(path: Path, seed: int) -> Path:
    noise = np.random.default_rng(seed).integers(-30, 31, (H, W))
    noisy = np.clip(_mask(seed).astype(int) + noise, 0, 255).astype(np.uint8)
    return _write(path, noisy, cv2.IMWRITE_JPEG_QUALITY, 80)


def _check_site(out: Path, dataset: str, site: str, stems) -> None:
    """The converted site pairs exactly ``stems``, with binary single-channel masks of image size."""
    s = scan_site(out, dataset, site)
    assert s.problems == []
    assert sorted(s.images) == sorted(s.masks) == sorted(stems)
    for stem in stems:
        assert s.masks[stem].name == f"{stem}.png"
        mask = cv2.imread(str(s.masks[stem]), cv2.IMREAD_UNCHANGED)
        assert mask.ndim == 2 and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}
        img = cv2.imread(str(s.images[stem]), cv2.IMREAD_COLOR)
        assert img is not None and img.shape == (H, W, 3)
        assert mask.shape == (H, W)
    assert not [p for p in (out / dataset).iterdir() if p.name.startswith(".")], "temporary folder left"


# --------------------------------------------------------------------------- source trees


@pytest.fixture
def kvasir(tmp_path) -> Path:
    src = tmp_path / "Kvasir-SEG"
    for i, stem in enumerate(["cju0qkwl35piu0993l0dewei2", "cju0roawvklrq0799vmjorwfv", "cju0s690hkp960855tjuaqvv0"]):
        _write(src / "images" / f"{stem}.jpg", _image(i))
        _noisy_jpeg_mask(src / "masks" / f"{stem}.jpg", i)
    return src


@pytest.fixture
def polyp_release(tmp_path) -> Path:
    src = tmp_path / "release"
    soft = _mask(0).copy()
    soft[soft == 0] = 40  # anti-aliasing / background noise below the threshold
    soft[5, 5:10] = 200
    for site, n in [("CVC-300", 2), ("ETIS-LaribPolypDB", 3), ("Kvasir", 2)]:
        for i in range(n):
            _write(src / "TestDataset" / site / "images" / f"{i + 1}.png", _image(i))
            _write(src / "TestDataset" / site / "masks" / f"{i + 1}.png", soft if i == 0 else _mask(i))
    _write(src / "TrainDataset" / "images" / "1.png", _image(9))
    _write(src / "TrainDataset" / "masks" / "1.png", np.dstack([_mask(9)] * 3))  # an RGB mask
    return src


@pytest.fixture
def clinicdb(tmp_path) -> Path:
    src = tmp_path / "CVC-ClinicDB"
    for i in range(1, 4):
        _write(src / "Original" / f"{i}.tif", _image(i))
    _write(src / "Ground Truth" / "1.tif", _mask(1))  # 0/255
    _write(src / "Ground Truth" / "2.tif", _mask(2) // 255)  # 0/1 labels
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[..., 2] = _mask(3)  # foreground drawn in pure red (BGR order)
    _write(src / "Ground Truth" / "3.tif", rgb)
    return src


@pytest.fixture
def isic(tmp_path) -> Path:
    src = tmp_path / "isic"
    inputs, truth = src / "ISIC2018_Task1-2_Training_Input", src / "ISIC2018_Task1_Training_GroundTruth"
    for i, stem in enumerate(["ISIC_0000000", "ISIC_0000001"]):
        _write(inputs / f"{stem}.jpg", _image(i))
        _write(truth / f"{stem}_segmentation.png", _mask(i))
    for d in (inputs, truth):
        (d / "LICENSE.txt").write_text("license")
        (d / "ATTRIBUTION.txt").write_text("attribution")
    return src


# --------------------------------------------------------------------------- conversions


def test_kvasir_copies_jpegs_and_binarises_jpeg_masks(kvasir, tmp_path):
    out = tmp_path / "data"
    assert prepare("kvasir", kvasir, out) == {"Kvasir": 3}
    stems = sorted(p.stem for p in (kvasir / "images").iterdir())
    _check_site(out, "polyp", "Kvasir", stems)
    for i, stem in enumerate(stems):
        copied = out / "polyp" / "Kvasir" / "image" / f"{stem}.jpg"
        assert copied.read_bytes() == (kvasir / "images" / f"{stem}.jpg").read_bytes()
        mask = cv2.imread(str(out / "polyp" / "Kvasir" / "mask" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        assert (mask == _mask(i)).mean() > 0.95  # noise and JPEG ringing removed


def test_kvasir_dataset_and_site_names(kvasir, tmp_path):
    assert prepare("kvasir", kvasir, tmp_path / "d", dataset="mypolyp", site="K") == {"K": 3}
    assert scan_site(tmp_path / "d", "mypolyp", "K").problems == []


def test_polyp_release_test_sites_with_rename(polyp_release, tmp_path):
    out = tmp_path / "data"
    counts = prepare("polyp-release", polyp_release, out, rename=["ETIS-LaribPolypDB=EndoTect-ETIS"])
    assert counts == {"CVC-300": 2, "EndoTect-ETIS": 3, "Kvasir": 2}
    assert sorted(p.name for p in (out / "polyp").iterdir()) == ["CVC-300", "EndoTect-ETIS", "Kvasir"]
    _check_site(out, "polyp", "EndoTect-ETIS", ["1", "2", "3"])
    src_img = polyp_release / "TestDataset" / "CVC-300" / "images" / "1.png"
    assert (out / "polyp" / "CVC-300" / "image" / "1.png").read_bytes() == src_img.read_bytes()
    soft = cv2.imread(str(out / "polyp" / "CVC-300" / "mask" / "1.png"), cv2.IMREAD_UNCHANGED)
    expected = _mask(0)
    expected[5, 5:10] = 255
    assert np.array_equal(soft, expected)


def test_polyp_release_include_train_and_single_site(polyp_release, tmp_path):
    out = tmp_path / "data"
    assert prepare("polyp-release", polyp_release, out, site="TrainDataset",
                   include_train=True) == {"TrainDataset": 1}
    _check_site(out, "polyp", "TrainDataset", ["1"])
    mask = cv2.imread(str(out / "polyp" / "TrainDataset" / "mask" / "1.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(mask, _mask(9))
    assert [p.name for p in (out / "polyp").iterdir()] == ["TrainDataset"]


def test_polyp_release_src_is_test_dataset_folder(polyp_release, tmp_path):
    counts = prepare("polyp-release", polyp_release / "TestDataset", tmp_path / "data", site="Kvasir")
    assert counts == {"Kvasir": 2}
    _check_site(tmp_path / "data", "polyp", "Kvasir", ["1", "2"])


def test_clinicdb_converts_tiff_to_png(clinicdb, tmp_path):
    out = tmp_path / "data"
    assert prepare("clinicdb", clinicdb, out) == {"CVC-ClinicDB": 3}
    _check_site(out, "polyp", "CVC-ClinicDB", ["1", "2", "3"])
    site = out / "polyp" / "CVC-ClinicDB"
    assert sorted(p.name for p in (site / "image").iterdir()) == ["1.png", "2.png", "3.png"]
    for i in (1, 2, 3):
        assert (site / "image" / f"{i}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert np.array_equal(cv2.imread(str(site / "image" / f"{i}.png")), _image(i))  # lossless
        mask = cv2.imread(str(site / "mask" / f"{i}.png"), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(mask, _mask(i)), f"mask {i}"  # 0/255, 0/1 and RGB all give 0/255


def test_isic_drops_segmentation_suffix_and_ignores_text_files(isic, tmp_path):
    out = tmp_path / "data"
    assert prepare("isic2018", isic, out) == {"all": 2}
    _check_site(out, "isic", "all", ["ISIC_0000000", "ISIC_0000001"])
    src = isic / "ISIC2018_Task1-2_Training_Input" / "ISIC_0000001.jpg"
    assert (out / "isic" / "all" / "image" / "ISIC_0000001.jpg").read_bytes() == src.read_bytes()


def test_binarise_mask_rules():
    labels = np.array([[0, 1], [1, 0]], np.uint8)
    assert binarise_mask(labels).tolist() == [[0, 255], [255, 0]]
    assert binarise_mask(labels, lossless=False).tolist() == [[0, 0], [0, 0]]  # JPEG noise, not labels
    assert binarise_mask(np.array([[3, 128], [127, 250]], np.uint8)).tolist() == [[0, 255], [0, 255]]
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[..., 3] = 255  # opaque alpha is not foreground
    rgba[0, 1, 1] = 200  # green
    assert binarise_mask(rgba).tolist() == [[0, 255]]
    assert binarise_mask(np.array([[0, 65535]], np.uint16)).tolist() == [[0, 255]]


# --------------------------------------------------------------------------- errors


def test_missing_source_subfolder(kvasir, tmp_path):
    (kvasir / "masks").rename(kvasir / "labels")
    with pytest.raises(PrepareError, match=r"masks: folder not found \(expected .*Kvasir-SEG"):
        prepare("kvasir", kvasir, tmp_path / "data")
    with pytest.raises(PrepareError, match="source folder not found"):
        prepare("kvasir", tmp_path / "nowhere", tmp_path / "data")
    with pytest.raises(PrepareError, match="TestDataset: folder not found"):
        prepare("polyp-release", kvasir, tmp_path / "data")


def test_orphan_image_and_mask_are_errors(isic, tmp_path):
    inputs = isic / "ISIC2018_Task1-2_Training_Input"
    _write(inputs / "ISIC_0000009.jpg", _image(9))
    (isic / "ISIC2018_Task1_Training_GroundTruth" / "ISIC_0000000_segmentation.png").rename(
        isic / "ISIC2018_Task1_Training_GroundTruth" / "ISIC_0000007_segmentation.png")
    with pytest.raises(PrepareError) as e:
        prepare("isic2018", isic, tmp_path / "data")
    msg = str(e.value)
    assert "2 image(s)" in msg and "ISIC_0000000, ISIC_0000009" in msg
    assert "1 mask(s)" in msg and "ISIC_0000007" in msg
    assert not (tmp_path / "data" / "isic" / "all").exists()


def test_existing_destination_needs_overwrite(kvasir, tmp_path):
    out = tmp_path / "data"
    stale = out / "polyp" / "Kvasir" / "image" / "stale.jpg"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    with pytest.raises(PrepareError, match="already exists and is not empty.*--overwrite"):
        prepare("kvasir", kvasir, out)
    assert stale.exists()
    assert prepare("kvasir", kvasir, out, overwrite=True) == {"Kvasir": 3}
    assert not stale.exists()
    _check_site(out, "polyp", "Kvasir", [p.stem for p in (kvasir / "images").iterdir()])


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_is_named_and_nothing_is_written(polyp_release, tmp_path, damage):
    bad = polyp_release / "TestDataset" / "Kvasir" / "images" / "2.png"
    data = bad.read_bytes()
    bad.write_bytes(b"not an image at all" if damage == "garbage" else data[: len(data) // 2])
    out = tmp_path / "data"
    with pytest.raises(PrepareError, match=r"Kvasir/images/2\.png: cannot read image"):
        prepare("polyp-release", polyp_release, out)
    assert list((out / "polyp").iterdir()) == []  # earlier sites are not put in place either


def test_truncated_jpeg_is_an_error(kvasir, tmp_path):
    bad = sorted((kvasir / "images").iterdir())[1]
    bad.write_bytes(bad.read_bytes()[:300])
    with pytest.raises(PrepareError, match=f"{bad.name}: cannot read image"):
        prepare("kvasir", kvasir, tmp_path / "data")


def test_size_mismatch_and_bad_rename(clinicdb, tmp_path):
    with pytest.raises(PrepareError, match="no site named 'Nope'"):
        prepare("clinicdb", clinicdb, tmp_path / "data", rename={"Nope": "X"})
    _write(clinicdb / "Ground Truth" / "2.tif", np.zeros((H + 1, W), np.uint8))
    with pytest.raises(PrepareError, match=r"2\.tif is 20x16 but its mask .* is 20x17"):
        prepare("clinicdb", clinicdb, tmp_path / "data")


# --------------------------------------------------------------------------- command line


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "datasets.prepare", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def test_cli(kvasir, tmp_path):
    bad = _cli("kvasir", "--src", tmp_path / "missing", "--out", tmp_path / "data")
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and "missing" in bad.stderr and "Traceback" not in bad.stderr

    good = _cli("kvasir", "--src", kvasir, "--out", tmp_path / "data", "--rename", "Kvasir=KV")
    assert good.returncode == 0, good.stderr
    assert good.stdout.strip() == f"polyp/KV: 3 pairs -> {tmp_path / 'data' / 'polyp' / 'KV'}"
    assert scan_site(tmp_path / "data", "polyp", "KV").problems == []
