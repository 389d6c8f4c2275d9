"""UniMatch federated by FedAvg (``fed/methods/unimatch.py``, BASELINES.md section 3) and its strong views
(``utils/strong_views.py``).

By hand: the loss combination, a strong-view loss with a cut-mixed confidence mask, the CutMix box's
probability, area and aspect-ratio bounds. Two tiny rounds in process (L_s1, L_s2 and L_fp trained on
after the warm-up; LSSL's bytes). On Flower: test_arrangements.py.
"""
import math

import pytest
import torch

from utils.losses import masked_ce
from fed.methods.unimatch import unimatch_unlabeled_loss
from utils.rng import generator
from utils.strong_views import Mix, cutmix, cutmix_box, mix_partner

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = ("method=unimatch", "train.rounds=2", "unimatch.threshold=0.6")  # tiny model: not confident at 0.95; at 0.6 partly


def test_loss_combination():
    # L = (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2; the unlabeled pass steps on the bracket without L_x:
    # 0.25 * 1 + 0.25 * 2 + 0.5 * 4 = 0.25 + 0.5 + 2 = 2.75; with L_x = 1.25: (1.25 + 2.75) / 2 = 2
    l_u = unimatch_unlabeled_loss(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(4.0))
    assert l_u.item() == 2.75 and (1.25 + l_u.item()) / 2 == 2.0


def test_strong_loss_with_a_cut_mixed_mask():
    # 2 images of 4x4, uniform logits: CE = ln 2 at every pixel. Image 0 confident nowhere, image 1
    # everywhere; image 0's box (2x2) is pasted from its partner, image 1 (of 2 images, the only
    # pairing without fixed points is [1, 0]). Kept pixels: 4 (box of image 0) + 16 (image 1) over 32
    # -> ln 2 * 20 / 32
    assert mix_partner(2, generator(5)).tolist() == [1, 0]
    logits = torch.zeros(2, 2, 4, 4)
    labels = torch.stack([torch.zeros(4, 4), torch.ones(4, 4)]).long()
    keep = torch.stack([torch.zeros(4, 4), torch.ones(4, 4)]).bool()
    box = torch.zeros(2, 4, 4, dtype=torch.bool)
    box[0, 1:3, 0:2] = True
    mix = Mix(box, mix_partner(2, generator(5)))
    mixed_labels, mixed_keep = cutmix(labels, mix), cutmix(keep, mix)
    assert mixed_labels[0].sum() == 4 and mixed_labels[0][box[0]].eq(1).all() and mixed_keep.sum() == 20
    assert masked_ce(logits, mixed_labels, mixed_keep).item() == pytest.approx(math.log(2) * 20 / 32)


def test_cutmix_box_bounds():
    hw, applied = 64 * 48, 0
    for i in range(400):
        box = cutmix_box(64, 48, generator(7, i))
        if not box.any():
            continue
        applied += 1
        rows, cols = box.any(1).nonzero()[:, 0], box.any(0).nonzero()[:, 0]
        h, w = len(rows), len(cols)
        assert box.sum() == h * w and rows[-1] - rows[0] + 1 == h and cols[-1] - cols[0] + 1 == w  # a rectangle
        # w = int(sqrt(A / r)), h = int(sqrt(A r)) with A in [0.02, 0.4] of the image, r in [0.3, 1/0.3]:
        # h w <= A <= 0.4; (h + 1)(w + 1) > A >= 0.02; (h + 1) / w > r >= 0.3; h / (w + 1) < r <= 1/0.3
        assert h * w <= 0.4 * hw and (h + 1) * (w + 1) > 0.02 * hw
        assert (h + 1) / w > 0.3 and h / (w + 1) < 1 / 0.3
    assert 160 < applied < 240  # p = 0.5 of 400
    assert not cutmix_box(8, 8, generator(0), p=0.0).any() and cutmix_box(8, 8, generator(0), p=1.0).any()


@pytest.fixture(scope="module")
def um_run(tiny_runs):
    return tiny_runs.in_process(*SETTINGS)  # test_arrangements' reference


def test_two_rounds(um_run):
    import networks
    from utils.logger import read_metrics

    _, cfg, _ = um_run
    recs = read_metrics(cfg.output.dir)
    sd = sum(v.numel() * v.element_size() for v in networks.build_model("tiny").state_dict().values())
    for name in ("client0", "client1"):
        assert "unl_s1" not in recs[0]["loss"][name]
        loss = recs[1]["loss"][name]
        assert all(math.isfinite(loss[k]) for k in ("unl_s1", "unl_s2", "unl_fp")) and 0 < loss["unl_kept"] < 1
        # LSSL's: the state dict each way after the local training; round 0 also averages the initial weights
        assert all(r["bytes"][name]["up"] == r["bytes"][name]["down"] == sd * (2 if r["round"] == 0 else 1)
                   for r in recs)
    assert any(recs[1]["loss"][n][k] > 0 for n in ("client0", "client1") for k in ("unl_s1", "unl_s2", "unl_fp"))
