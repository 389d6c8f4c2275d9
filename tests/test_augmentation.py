"""Statistics of the training augmentation over many per-sample seeds.

The draws are read back from what :class:`datasets.dataset.SegDataset` outputs: the input is a probe
image whose pixels encode their own coordinates (R = 4 + 8x, G = 4 + 8y, B = 255; nearest
interpolation keeps them exact, the rotation's zero fill has B = 0). Fitting ``out = M src + t`` to
the surviving pixels gives the flips and the angle (``M = Fh^h Fv^v R(angle)``, ``|angle| < 90``) and,
for the weak view, the crop offset. Albumentations 2 seeds every child of a Compose with the same
seed, which made the two flips always agree, tied the angle's sign to them and the crop offset to
the angle; these tests fail on that and pass when each transform has its own stream.
"""
import random

import numpy as np
import PIL.Image
import pytest
import torch
from scipy.stats import chi2_contingency, chisquare

from datasets import transforms
from datasets.dataset import SegDataset

S = 32                 # probe side (px)
P = S // 8             # reflect padding of the weak view
N = 2000               # seeds per view
SIGMA = 5              # binomial bound on each of the four flip combinations
P_MIN = 1e-5           # smallest accepted p-value of a chi-square test
SEEDS = [int(s) for s in np.random.default_rng(20240611).integers(0, 2**32, N)]
COMBOS = [(False, False), (True, False), (False, True), (True, True)]  # (vertical, horizontal)


def _mask_of(x, y):
    """The probe's mask as a function of source coordinates (asymmetric, so every flip shows)."""
    return (((x // 3) + (y // 2)) % 2 == 0) & (x + 2 * y > 20)


def _items(tmp_path):
    y, x = np.mgrid[0:S, 0:S]
    img = np.stack([4 + 8 * x, 4 + 8 * y, np.full_like(x, 255)], -1).astype(np.uint8)
    PIL.Image.fromarray(img).save(tmp_path / "probe.png")
    PIL.Image.fromarray(_mask_of(x, y).astype(np.uint8) * 255).save(tmp_path / "probe_mask.png")
    return [(tmp_path / "probe.png", tmp_path / "probe_mask.png", "probe")]


def _u8(t: torch.Tensor) -> np.ndarray:
    return ((t.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)


def _decode(out: np.ndarray, window: int):
    """(vflip, hflip, angle in degrees, crop offset (x, y) minus the padding, src x, src y, valid).
    Only pixels in ``[window, S - window)`` are fitted (outside it the weak view may show padding)."""
    valid = out[..., 2] == 255
    sx, sy = (out[..., 0].astype(int) - 4) // 8, (out[..., 1].astype(int) - 4) // 8
    v, u = np.mgrid[0:S, 0:S]
    fit = valid.copy()
    fit[:window], fit[S - window:], fit[:, :window], fit[:, S - window:] = False, False, False, False
    design = np.stack([sx[fit], sy[fit], np.ones(fit.sum())], 1)
    coef, *_ = np.linalg.lstsq(design, np.stack([u[fit], v[fit]], 1).astype(float), rcond=None)
    M, t = coef[:2].T, coef[2]
    single = np.linalg.det(M) < 0              # exactly one flip
    A = M * np.array([[1], [-1]]) if single else M   # undo a vertical flip: A = R(phi)
    phi = np.degrees(np.arctan2(A[1, 0], A[0, 0]))
    turned = abs(phi) > 90                     # an extra half turn: = both flips (or h instead of v)
    angle = (phi - 180 if phi > 0 else phi + 180) if turned else phi
    vflip, hflip = (not turned, turned) if single else (turned, turned)  # Fh = -Fv = R(180) Fv
    c = np.full(2, (S - 1) / 2)                # flips and rotation act about the pixel centre
    offset = c - M @ c - t                     # out = M (src - c) + c + pad - offset
    return vflip, hflip, angle, offset, sx, sy, valid


def _draws(ds, seeds, window, pad):
    rows = []
    for seed in seeds:
        out = ds[(0, seed)]
        vflip, hflip, angle, offset, *_ = _decode(_u8(out[0]), window)
        offset = offset + pad
        assert np.abs(offset - offset.round()).max() < 0.25, "probe decoding failed"
        rows.append((vflip, hflip, angle, int(round(offset[0])), int(round(offset[1]))))
    return rows


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("probe")


@pytest.fixture(scope="module")
def labeled(probe_dir):
    ds = SegDataset(_items(probe_dir), S, "labeled").preload()
    return _draws(ds, SEEDS, 0, 0)


@pytest.fixture(scope="module")
def weak(probe_dir):
    ds = SegDataset(_items(probe_dir), S, "unlabeled").preload()
    return _draws(ds, SEEDS, P, P)


def _combo_counts(rows):
    return [sum((r[0], r[1]) == c for r in rows) for c in COMBOS]


def _independent(table) -> float:
    """p-value of the chi-square test of independence, all-zero rows and columns left out."""
    t = np.asarray(table)
    t = t[t.sum(1) > 0][:, t.sum(0) > 0]
    return chi2_contingency(t).pvalue if min(t.shape) > 1 else 1.0


def _check_flips(rows):
    n = len(rows)
    bound = SIGMA * np.sqrt(n * 0.25 * 0.75)
    counts = _combo_counts(rows)
    assert all(abs(k - n / 4) < bound for k in counts), f"flip combinations {dict(zip(COMBOS, counts))}"


def _check_angle(rows):
    angles = np.array([r[2] for r in rows])
    assert np.abs(angles).max() <= 90.5
    hist = np.histogram(angles, bins=6, range=(-90, 90))[0]  # uniform in +-90
    assert chisquare(hist).pvalue > P_MIN, hist
    table = np.array([[sum((r[0], r[1]) == c and (r[2] < 0) == neg for r in rows) for c in COMBOS]
                      for neg in (True, False)])
    for neg, n in zip(table[0], table.sum(0)):  # within each flip combination, half the angles < 0
        assert n > 0 and abs(neg - n / 2) < SIGMA * np.sqrt(n / 4), f"angle sign (neg, pos) x flips\n{table}"
    assert _independent(table) > P_MIN, f"angle sign (neg, pos) x flips\n{table}"


@pytest.mark.parametrize("view", ["labeled", "weak"])
def test_flip_combinations_are_each_a_quarter(view, request):
    _check_flips(request.getfixturevalue(view))


@pytest.mark.parametrize("view", ["labeled", "weak"])
def test_angle_is_uniform_and_its_sign_independent_of_the_flips(view, request):
    _check_angle(request.getfixturevalue(view))


def test_labeled_view_has_no_offset(labeled):
    assert {(r[3], r[4]) for r in labeled} == {(0, 0)}


def test_weak_crop_offsets_are_uniform_and_independent_of_angle_and_flips(weak):
    ox, oy = np.array([r[3] for r in weak]), np.array([r[4] for r in weak])
    neg = np.array([r[2] < 0 for r in weak])
    quarter = np.digitize([r[2] for r in weak], [-45, 0, 45])
    combo = np.array([COMBOS.index((r[0], r[1])) for r in weak])
    assert ox.min() >= 0 and oy.min() >= 0 and ox.max() <= 2 * P and oy.max() <= 2 * P
    for o in (ox, oy):
        assert chisquare(np.bincount(o, minlength=2 * P + 1)).pvalue > P_MIN
        for other, k in ((neg, 2), (quarter, 4), (combo, 4)):
            table = np.zeros((2 * P + 1, k), int)
            np.add.at(table, (o, other.astype(int)), 1)
            assert _independent(table) > P_MIN, f"crop offset x angle/flips\n{table.T}"
    table = np.zeros((2 * P + 1, 2 * P + 1), int)
    np.add.at(table, (ox, oy), 1)
    assert _independent(table) > P_MIN


def test_labeled_mask_moves_with_the_image(probe_dir):
    ds = SegDataset(_items(probe_dir), S, "labeled").preload()
    for seed in SEEDS[:500]:
        img, mask, _ = ds[(0, seed)]
        *_, sx, sy, valid = _decode(_u8(img), 0)
        expect = np.where(valid, _mask_of(sx, sy), False)  # zero fill where the image is filled
        assert np.array_equal(mask[0].numpy().astype(bool), expect), seed


def test_strong_view_is_randaugment_of_this_weak_view(probe_dir, weak):
    """The strong view = RandAugment + cutout of the very weak view returned with it, with the
    photometric generator ``default_rng(seed)``; so its geometry is exactly the weak view's, whose
    statistics the tests above check (same seeds, same draws)."""
    ds = SegDataset(_items(probe_dir), S, "unlabeled").preload()
    for seed, row in zip(SEEDS[:500], weak):
        w, s, _ = ds[(0, seed)]
        w8 = _u8(w)
        expect = transforms.to_tensor(transforms.randaugment(w8, np.random.default_rng(seed)))
        assert torch.allclose(s, expect, atol=1e-6), seed
        vflip, hflip, angle, *_ = _decode(w8, P)
        assert (vflip, hflip) == row[:2] and angle == pytest.approx(row[2])  # same draw as above


def test_photometric_stream_is_not_a_geometric_stream():
    """No transform of the geometric Compose (nor the Compose itself) uses the generators seeded by
    the sample seed, which the strong view's photometric draws use; and no two children share one."""
    geo = transforms.geometric(S, crop=True)
    for seed in SEEDS[:50]:
        geo.set_random_seed(seed)
        root_np = np.random.default_rng(seed).bit_generator.state["state"]
        root_py = random.Random(seed).getstate()
        parts = [geo, *geo.transforms]
        np_states = [repr(p.random_generator.bit_generator.state["state"]) for p in parts]
        py_states = [p.py_random.getstate() for p in parts]
        assert repr(root_np) not in np_states and root_py not in py_states
        assert len(set(np_states)) == len(parts) and len(set(py_states)) == len(parts)


def test_same_seed_same_output_in_any_order_and_any_worker(probe_dir):
    items = _items(probe_dir)
    keys = [(0, s) for s in SEEDS[:12]]
    for mode in ("labeled", "unlabeled"):
        ds = SegDataset(items, S, mode).preload()
        first = [ds[k] for k in keys]
        again = [SegDataset(items, S, mode).preload()[k] for k in reversed(keys)][::-1]
        loader = torch.utils.data.DataLoader(ds, batch_size=3, sampler=keys, num_workers=2)
        batched = [x for a, b, _ in loader for x in zip(a, b)]
        for (a, b, _), (c, d, _), (e, f) in zip(first, again, batched):
            assert torch.equal(a, c) and torch.equal(b, d) and torch.equal(a, e) and torch.equal(b, f)
        assert not torch.equal(first[0][0], first[1][0])
