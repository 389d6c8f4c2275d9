"""Convert public dataset downloads into the site layout read by :mod:`datasets.sites`.

Every converter writes ``<out>/<dataset>/<site>/image/<stem>.<ext>`` and
``<out>/<dataset>/<site>/mask/<stem>.png``, an image and its mask sharing one stem.

Supported sources (``kind``), as they look once the public archives are extracted:

``kvasir``
    Kvasir-SEG: ``<src>/images/<id>.jpg`` with ``<src>/masks/<id>.jpg``; the masks are JPEG, so they
    carry compression noise around 0 and 255. Written to ``polyp/Kvasir`` unless told otherwise.
``polyp-release``
    The PraNet polyp release: ``<src>/TestDataset/<site>/{images,masks}/*.png`` for the test sites
    (CVC-300, CVC-ClinicDB, CVC-ColonDB, ETIS-LaribPolypDB, Kvasir) and
    ``<src>/TrainDataset/{images,masks}/*.png`` (a Kvasir + ClinicDB mixture, converted only with
    ``--include-train``, to a site named ``TrainDataset``). ``<src>`` may also be the TestDataset
    folder itself. Each test site keeps its folder name unless renamed with ``--rename OLD=NEW``;
    ``--site NAME`` converts that one site only. Written under ``polyp``.
``clinicdb``
    CVC-ClinicDB originals: ``<src>/Original/<n>.tif`` with ``<src>/Ground Truth/<n>.tif``. Written to
    ``polyp/CVC-ClinicDB``.
``isic2018``
    ISIC 2018 task 1 training data: ``<src>/ISIC2018_Task1-2_Training_Input/ISIC_<id>.jpg`` with
    ``<src>/ISIC2018_Task1_Training_GroundTruth/ISIC_<id>_segmentation.png``; the ``_segmentation``
    suffix is dropped so both share the stem ``ISIC_<id>``. Written to ``isic/all``.

Images: JPEG and PNG files are copied byte for byte under their own name; other formats (TIFF, BMP)
are decoded and saved as 8-bit RGB PNG (16-bit data is scaled down, alpha is dropped). Every image is
fully decoded once, so a corrupt or truncated file stops the run with its name.

Masks are always re-written as single-channel 8-bit PNG holding only 0 and 255. Colour masks are
reduced by taking the maximum over the colour channels (alpha ignored), so a mask drawn in any
colour counts as foreground. Then a lossless mask (PNG, TIFF, BMP) whose values are all 0 or 1 is
read as a label map (1 -> 255); otherwise a pixel is foreground when its value is above half the
range (> 127 for 8-bit data, > 32767 for 16-bit data). Image and mask must have the same size.

Non-image files (``LICENSE.txt``, ``ATTRIBUTION.txt``...) and hidden files are ignored. An image
without a mask, or a mask without an image, is an error, as is a destination site folder that
already holds files (unless ``--overwrite``). Each site is converted into a hidden temporary folder
next to its destination and renamed into place only once every site converted without error.

Command line::

    python -m datasets.prepare {kvasir,polyp-release,clinicdb,isic2018} --src DIR --out ROOT
        [--dataset NAME] [--site NAME] [--rename OLD=NEW ...] [--include-train] [--overwrite]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np
from PIL import Image
from tqdm import tqdm

from datasets.sites import IMAGE_EXTS

COPIED_EXTS = (".jpg", ".jpeg", ".png")  # images in these formats are copied unchanged
LOSSY_EXTS = (".jpg", ".jpeg")
SHOW_STEMS = 5  # how many offending stems an error message lists


class PrepareError(ValueError):
    """A problem with the source data or the destination, explained for the user."""


@dataclass
class SourceSite:
    """One site to convert: where its images and masks are, and how mask names end."""

    name: str
    image_dir: Path
    mask_dir: Path
    mask_suffix: str = ""  # dropped from a mask's stem to find its image


@dataclass
class Layout:
    dataset: str  # default dataset name
    expected: str  # the expected source shape, for error messages
    find_sites: Callable[[Path, Optional[str], bool, str], List[SourceSite]]


# --------------------------------------------------------------------------- source layouts


def _need_dir(path: Path, expected: str) -> Path:
    if not path.is_dir():
        raise PrepareError(f"{path}: folder not found (expected {expected})")
    return path


def _single_site(image_sub: str, mask_sub: str, default_site: str, mask_suffix: str = ""):
    """A finder for sources holding one site: ``<src>/<image_sub>`` and ``<src>/<mask_sub>``."""

    def find(src: Path, site: Optional[str], include_train: bool, expected: str) -> List[SourceSite]:
        if include_train:
            raise PrepareError("--include-train only applies to polyp-release")
        return [SourceSite(site or default_site, _need_dir(src / image_sub, expected),
                           _need_dir(src / mask_sub, expected), mask_suffix)]

    return find


def _visible_subdirs(path: Path) -> List[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))


def _find_polyp_release(src: Path, site: Optional[str], include_train: bool,
                        expected: str) -> List[SourceSite]:
    """Test sites from ``<src>/TestDataset`` (or ``<src>`` itself), plus TrainDataset when asked."""
    if (src / "TestDataset").is_dir():
        test_dirs = _visible_subdirs(src / "TestDataset")
    else:  # src itself may be a TestDataset-like folder
        test_dirs = [d for d in _visible_subdirs(src) if d.name != "TrainDataset"]
        if not any((d / "images").is_dir() for d in test_dirs):
            if include_train and (src / "TrainDataset").is_dir():
                test_dirs = []  # only the training part was downloaded
            else:
                raise PrepareError(f"{src / 'TestDataset'}: folder not found (expected {expected})")

    folders = {d.name: d for d in test_dirs}
    if include_train:
        folders["TrainDataset"] = src / "TrainDataset"
    if site is not None:
        if site not in folders:
            raise PrepareError(f"site {site!r} not found in {src} "
                               f"(it has: {', '.join(folders) or 'no sites'})")
        folders = {site: folders[site]}
    if not folders:
        raise PrepareError(f"{src}: no site folders found (expected {expected})")
    return [SourceSite(name, _need_dir(d / "images", expected), _need_dir(d / "masks", expected))
            for name, d in folders.items()]


LAYOUTS: Dict[str, Layout] = {
    "kvasir": Layout(
        "polyp", "<src>/images/<id>.jpg and <src>/masks/<id>.jpg, the extracted Kvasir-SEG archive",
        _single_site("images", "masks", "Kvasir")),
    "polyp-release": Layout(
        "polyp", "<src>/TestDataset/<site>/images/*.png and <src>/TestDataset/<site>/masks/*.png "
        "(plus <src>/TrainDataset/{images,masks} for --include-train), or <src> being the "
        "TestDataset folder itself, as in the PraNet polyp release",
        _find_polyp_release),
    "clinicdb": Layout(
        "polyp", "<src>/Original/<n>.tif and '<src>/Ground Truth/<n>.tif', the CVC-ClinicDB originals",
        _single_site("Original", "Ground Truth", "CVC-ClinicDB")),
    "isic2018": Layout(
        "isic", "<src>/ISIC2018_Task1-2_Training_Input/ISIC_<id>.jpg and "
        "<src>/ISIC2018_Task1_Training_GroundTruth/ISIC_<id>_segmentation.png, the ISIC 2018 task 1 "
        "training archives", _single_site("ISIC2018_Task1-2_Training_Input",
                                           "ISIC2018_Task1_Training_GroundTruth", "all", "_segmentation")),
}


# --------------------------------------------------------------------------- pairing


def _list_images(folder: Path, strip_suffix: str = "") -> Dict[str, Path]:
    """Image files of a folder by stem (``strip_suffix`` removed); other files are ignored."""
    found: Dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file() or p.suffix.lower() not in IMAGE_EXTS:
            continue
        stem = p.stem
        if strip_suffix and stem.endswith(strip_suffix):
            stem = stem[: -len(strip_suffix)]
        if stem in found:
            raise PrepareError(f"{folder}: two files share the stem {stem!r} ({found[stem].name}, {p.name})")
        found[stem] = p
    return found


def _first_few(stems: List[str]) -> str:
    more = f", ... ({len(stems) - SHOW_STEMS} more)" if len(stems) > SHOW_STEMS else ""
    return ", ".join(stems[:SHOW_STEMS]) + more


def pair_files(source: SourceSite) -> List[Tuple[str, Path, Path]]:
    """(stem, image, mask) for every image; an unmatched image or mask is an error."""
    images = _list_images(source.image_dir)
    masks = _list_images(source.mask_dir, source.mask_suffix)
    if not images:
        raise PrepareError(f"{source.image_dir}: no image files found")
    problems = []
    no_mask = sorted(set(images) - set(masks))
    no_image = sorted(set(masks) - set(images))
    if no_mask:
        problems.append(f"{len(no_mask)} image(s) in {source.image_dir} have no mask in {source.mask_dir}: "
                        f"{_first_few(no_mask)}")
    if no_image:
        problems.append(f"{len(no_image)} mask(s) in {source.mask_dir} have no image in {source.image_dir}: "
                        f"{_first_few(no_image)}")
    if problems:
        raise PrepareError(f"site {source.name}: " + "; ".join(problems))
    return [(stem, images[stem], masks[stem]) for stem in sorted(images)]


# --------------------------------------------------------------------------- images and masks


def _open(path: Path) -> Image.Image:
    """Open and fully decode an image, so a truncated or corrupt file fails here."""
    try:
        with Image.open(path) as img:
            img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise PrepareError(f"{path}: cannot read image ({e})") from None
    return img


def _to_rgb8(img: Image.Image) -> Image.Image:
    """An 8-bit RGB version of any decoded image (16-bit data scaled down, alpha dropped)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.uint32)
        scale = 257 if arr.max(initial=0) > 255 else 1
        img = Image.fromarray((arr // scale).clip(0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def binarise_mask(arr: np.ndarray, lossless: bool = True) -> np.ndarray:
    """A 2-D uint8 mask holding only 0 and 255 (see the module docstring for the rules)."""
    arr = np.asarray(arr)
    if arr.ndim == 3:
        colour = arr[..., :3] if arr.shape[2] >= 3 else arr[..., :1]  # drop alpha (RGBA, LA)
        arr = colour.max(axis=2)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D or 3-D mask array, got shape {arr.shape}")
    top = arr.max(initial=0)
    if arr.dtype == bool:
        fg = arr
    elif top <= 1 and np.issubdtype(arr.dtype, np.floating):
        fg = arr > 0.5  # float in [0, 1]
    elif top <= 1 and lossless:
        fg = arr > 0  # a 0/1 label map
    elif top <= 255:
        fg = arr > 127  # 8-bit data (JPEG noise and anti-aliasing included)
    else:
        fg = arr > 32767  # 16-bit data
    return np.where(fg, 255, 0).astype(np.uint8)


def _mask_array(img: Image.Image) -> np.ndarray:
    if img.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
    return np.asarray(img)


def convert_pair(stem: str, image: Path, mask: Path, image_out: Path, mask_out: Path) -> None:
    """Write one image (copied or converted to PNG) and its binarised PNG mask."""
    img = _open(image)
    msk = _open(mask)
    if img.size != msk.size:
        raise PrepareError(f"{image} is {img.size[0]}x{img.size[1]} but its mask {mask} is "
                           f"{msk.size[0]}x{msk.size[1]}")
    if image.suffix.lower() in COPIED_EXTS:
        shutil.copyfile(image, image_out / image.name)
    else:
        _to_rgb8(img).save(image_out / f"{stem}.png")
    lossless = mask.suffix.lower() not in LOSSY_EXTS
    Image.fromarray(binarise_mask(_mask_array(msk), lossless), mode="L").save(mask_out / f"{stem}.png")


def convert_site(pairs: List[Tuple[str, Path, Path]], dest: Path, label: str) -> None:
    """Convert all pairs of a site into ``dest/image`` and ``dest/mask``."""
    image_out, mask_out = dest / "image", dest / "mask"
    image_out.mkdir(parents=True)
    mask_out.mkdir()
    for stem, image, mask in tqdm(pairs, desc=label, unit="pair", disable=None, leave=False):
        convert_pair(stem, image, mask, image_out, mask_out)


# --------------------------------------------------------------------------- destination


def _parse_renames(rename: Union[Mapping[str, str], Iterable[str], None]) -> Dict[str, str]:
    if rename is None:
        return {}
    if isinstance(rename, Mapping):
        return dict(rename)
    out = {}
    for item in rename:
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            raise PrepareError(f"--rename {item!r}: expected OLD=NEW")
        out[old] = new
    return out


def _apply_renames(sites: List[SourceSite], renames: Dict[str, str]) -> None:
    names = [s.name for s in sites]
    unknown = sorted(set(renames) - set(names))
    if unknown:
        raise PrepareError(f"--rename: no site named {', '.join(map(repr, unknown))} "
                           f"(sites: {', '.join(names)})")
    for s in sites:
        s.name = renames.get(s.name, s.name)
    final = [s.name for s in sites]
    if len(set(final)) != len(final):
        raise PrepareError(f"two sites would be written to the same folder: {', '.join(final)}")


def _check_name(name: str, what: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise PrepareError(f"{what} name {name!r} cannot be used as a folder name")


def _check_destination(dest: Path, overwrite: bool) -> None:
    if dest.exists() and not dest.is_dir():
        raise PrepareError(f"{dest}: exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise PrepareError(f"{dest}: already exists and is not empty (use --overwrite to replace it)")


def _move_into_place(tmp: Path, dest: Path) -> None:
    """Replace ``dest`` (if any) by ``tmp``; the old folder is removed only after the swap."""
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.old-"))
        dest.rename(old / dest.name)
    tmp.rename(dest)
    if old is not None:
        shutil.rmtree(old)


# --------------------------------------------------------------------------- entry points


def prepare(kind: str, src, out, dataset: Optional[str] = None, site: Optional[str] = None,
            rename: Union[Mapping[str, str], Iterable[str], None] = None, include_train: bool = False,
            overwrite: bool = False) -> Dict[str, int]:
    """Convert the ``kind`` source at ``src`` into ``<out>/<dataset>/<site>``; returns {site: pairs}.

    ``rename`` maps source site names to output names (a dict, or ``"OLD=NEW"`` strings). For
    ``polyp-release`` ``site`` picks one source site; for the other kinds it names the output site.
    Raises :class:`PrepareError` on any problem, before anything is put in place.
    """
    if kind not in LAYOUTS:
        raise PrepareError(f"unknown source kind {kind!r} (choose from {', '.join(LAYOUTS)})")
    layout = LAYOUTS[kind]
    src = Path(src)
    if not src.is_dir():
        raise PrepareError(f"{src}: source folder not found (expected {layout.expected})")
    dataset = dataset or layout.dataset
    _check_name(dataset, "dataset")

    renames = _parse_renames(rename)
    sources = layout.find_sites(src, site, include_train, layout.expected)
    _apply_renames(sources, renames)
    dataset_dir = Path(out) / dataset
    plans = []
    for s in sources:
        _check_name(s.name, "site")
        _check_destination(dataset_dir / s.name, overwrite)
        plans.append((s, pair_files(s)))

    dataset_dir.mkdir(parents=True, exist_ok=True)
    temps: List[Path] = []
    try:
        for s, pairs in plans:
            tmp = Path(tempfile.mkdtemp(dir=dataset_dir, prefix=f".{s.name}.partial-"))
            temps.append(tmp)
            convert_site(pairs, tmp, f"{dataset}/{s.name}")
        for (s, _), tmp in zip(plans, temps):
            _move_into_place(tmp, dataset_dir / s.name)
    finally:
        for tmp in temps:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return {s.name: len(pairs) for s, pairs in plans}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m datasets.prepare",
        description="Convert a public dataset download into <out>/<dataset>/<site>/{image,mask}/.")
    p.add_argument("kind", choices=list(LAYOUTS), help="which download --src holds")
    p.add_argument("--src", required=True, help="the extracted download")
    p.add_argument("--out", required=True, help="data root to write <dataset>/<site> into")
    p.add_argument("--dataset", help="dataset folder name (default: polyp, or isic for isic2018)")
    p.add_argument("--site", help="site folder name; for polyp-release, the one source site to convert")
    p.add_argument("--rename", action="append", metavar="OLD=NEW",
                   help="write source site OLD as NEW (repeatable), e.g. ETIS-LaribPolypDB=EndoTect-ETIS")
    p.add_argument("--include-train", action="store_true",
                   help="polyp-release: also convert TrainDataset (a Kvasir + ClinicDB mixture)")
    p.add_argument("--overwrite", action="store_true", help="replace existing non-empty site folders")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        counts = prepare(args.kind, args.src, args.out, dataset=args.dataset, site=args.site,
                         rename=args.rename, include_train=args.include_train, overwrite=args.overwrite)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dataset = args.dataset or LAYOUTS[args.kind].dataset
    for name, n in counts.items():
        print(f"{dataset}/{name}: {n} pairs -> {Path(args.out) / dataset / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
