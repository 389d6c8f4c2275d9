"""FixMatch federated by FedAvg (``fed/methods/fixmatch.py``, BASELINES.md section 2).

The masked CE with the all-pixels denominator and the confident pseudo-labels, by hand; the strong view
with CutMix mixes labels and confidences with the image; two tiny rounds in process (the unlabeled loss
was trained on after the warm-up, the bytes are LSSL's: the state dict both ways, twice in round 0; the ``randaugment``
strong view without CutMix runs too). On Flower: test_arrangements.py.
"""
import math

import pytest
import torch

from conftest import run_tiny
from fed.common.baseline_local import confident_labels
from utils.losses import masked_ce
from utils.rng import generator
from utils.strong_views import Mix, cutmix, strong_view

pytestmark = pytest.mark.usefixtures("one_thread")

# threshold 0.5: the tiny model's first rounds are not confident, and the loss must have pixels to train on
SETTINGS = ("method=fixmatch", "train.rounds=2", "fixmatch.threshold=0.6")  # some pixels kept, some not


def test_masked_ce_counts_every_pixel():
    # pixel a: logits [0, 0], label 0 -> CE ln 2 = 0.6931, confidence 1/2
    # pixel b: logits [ln 3, 0], label 0 -> CE -ln(3/4) = 0.2877, confidence 3/4
    logits = torch.tensor([[[[0.0, math.log(3.0)]], [[0.0, 0.0]]]])  # (1, 2, 1, 2)
    labels, keep = confident_labels(logits, 0.7)
    assert labels.tolist() == [[[0, 0]]] and keep.tolist() == [[[False, True]]]
    # kept: pixel b only; denominator: both pixels -> 0.2877 / 2 (not 0.2877: unconfident pixels count as 0)
    assert masked_ce(logits, labels, keep).item() == pytest.approx(-math.log(0.75) / 2)
    labels, keep = confident_labels(logits, 0.95)                    # nothing confident: zero loss
    assert masked_ce(logits, labels, keep).item() == 0.0


def test_strong_view_mixes_labels_with_the_image():
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    g = lambda: generator(0, "t")
    view, mix = strong_view(x, g())
    view2, mix2 = strong_view(x, g())
    assert torch.equal(view, view2) and torch.equal(mix.boxes, mix2.boxes)  # keyed: the same view again
    assert torch.equal(mix.partner, mix2.partner)
    plain, _ = strong_view(x, g(), photometric_ops=False)
    assert torch.equal(plain, x)
    _, none = strong_view(x, g(), box=False)
    assert not none.boxes.any()
    # every pixel of an image, its label and its confidence come from the same image: itself or its partner
    boxes = torch.zeros(4, 16, 16, dtype=torch.bool)
    boxes[0, 2:5, 3:9] = True
    idx = torch.arange(4.0)[:, None, None].expand(4, 16, 16)         # "label" = the image's index
    img = idx[:, None].expand(4, 3, 16, 16)
    mix = Mix(boxes, torch.tensor([2, 0, 3, 1]))
    mixed_img, mixed_lab = cutmix(img, mix), cutmix(idx, mix)
    assert torch.equal(mixed_img[:, 0], mixed_lab)
    assert (mixed_lab[0][boxes[0]] == 2).all() and (mixed_lab[0][~boxes[0]] == 0).all()  # partner of 0: 2
    assert torch.equal(mixed_lab[1:], idx[1:])


def test_mix_partners_are_other_images_paired_afresh_for_every_batch():
    """Over 3000 keyed batches of 4: no image is its own partner, every one of the 9 derangements of 4
    is drawn about equally often (chi-square), and the pairings of consecutive batches are independent
    (the same pairing again about 1/9 of the time, not always, as with a fixed roll)."""
    from scipy.stats import chisquare

    from utils.strong_views import mix_partner

    draws = [tuple(mix_partner(4, generator(11, "partner", b)).tolist()) for b in range(3000)]
    assert all(p[i] != i for p in draws for i in range(4))
    counts = {p: draws.count(p) for p in set(draws)}
    assert len(counts) == 9 and chisquare(list(counts.values())).pvalue > 1e-3
    repeats = sum(a == b for a, b in zip(draws, draws[1:])) / (len(draws) - 1)
    assert abs(repeats - 1 / 9) < 0.03
    assert mix_partner(1, generator(0)).tolist() == [0]


@pytest.fixture(scope="module")
def fm_run(tiny_runs):
    return tiny_runs.in_process(*SETTINGS)  # test_arrangements' reference


def _check(cfg):
    import networks
    from utils.logger import read_metrics

    recs = read_metrics(cfg.output.dir)
    sd = sum(v.numel() * v.element_size() for v in networks.build_model("tiny").state_dict().values())
    for name in ("client0", "client1"):
        assert "unl_u" not in recs[0]["loss"][name]
        loss = recs[1]["loss"][name]
        assert math.isfinite(loss["unl_u"]) and 0 < loss["unl_kept"] < 1  # the mask is exercised
        # round 0 also averages the initial weights (every client starts from one model)
        assert all(r["bytes"][name]["up"] == r["bytes"][name]["down"] == sd * (2 if r["round"] == 0 else 1)
                   for r in recs)
    assert any(recs[1]["loss"][n]["unl_u"] > 0 for n in ("client0", "client1"))


def test_two_rounds(fm_run):
    _check(fm_run[1])


def test_randaugment_without_cutmix(tmp_path):
    cfg, _ = run_tiny(tmp_path, "ra", *SETTINGS, "fixmatch.strong=randaugment", "fixmatch.cutmix=false")
    _check(cfg)
