"""Each loss of utils/losses.py against values computed by hand on tiny tensors."""
import math

import pytest
import torch

from utils.losses import confidence_loss, fp_consistency_loss, kl_loss, pixel_ce, structure_loss


def softmax(xs):
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_structure_loss_single_pixel_by_hand():
    # one 1x1 image, logits (a, b), target class 0 -> one-hot (1, 0)
    a, b = 0.7, -0.4
    pred = torch.tensor([a, b]).view(1, 2, 1, 1)
    target = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    ce = -math.log(softmax([a, b])[0])
    # avg_pool 31x31, padding 15, zero padding counted: the single pixel averages to y/961
    w0, w1 = 1 + 5 * abs(1 / 961 - 1), 1 + 5 * 0
    s0, s1 = sig(a), sig(b)
    inter = w0 * s0 * 1
    union = w0 * (s0 + 1) + w1 * (s1 + 0)
    wiou = 1 - (inter + 1) / (union - inter + 1)
    assert structure_loss(pred, target).item() == pytest.approx(ce + wiou, rel=1e-6)


def test_structure_loss_2x2_with_sample_weights_by_hand():
    torch.manual_seed(0)
    pred = torch.randn(2, 2, 2, 2)
    labels = torch.tensor([[[1, 0], [0, 0]], [[1, 1], [0, 1]]])
    target = torch.nn.functional.one_hot(labels, 2).permute(0, 3, 1, 2).float()
    weight = torch.tensor([1.0, 0.0])
    P, Y = pred.tolist(), target.tolist()
    # cross-entropy over all 8 pixels of the batch (one scalar)
    ce = 0.0
    for b in range(2):
        for i in range(2):
            for j in range(2):
                p = softmax([P[b][0][i][j], P[b][1][i][j]])
                ce -= math.log(p[labels[b][i][j]])
    ce /= 8
    wiou = []
    for b in range(2):
        inter = union = 0.0
        for c in range(2):
            total = sum(Y[b][c][i][j] for i in range(2) for j in range(2))  # every pixel is in every window
            for i in range(2):
                for j in range(2):
                    y = Y[b][c][i][j]
                    w = 1 + 5 * abs(total / 961 - y)
                    s = sig(P[b][c][i][j])
                    inter += w * s * y
                    union += w * (s + y)
        wiou.append(1 - (inter + 1) / (union - inter + 1))
    unweighted = sum(ce + v for v in wiou) / 2
    weighted = sum((ce + v) * float(wt) for v, wt in zip(wiou, weight)) / 2
    assert structure_loss(pred, target).item() == pytest.approx(unweighted, rel=1e-6)
    assert structure_loss(pred, target, weight).item() == pytest.approx(weighted, rel=1e-6)


def test_confidence_loss_by_hand():
    # 2x2 image: prediction right on 3 pixels, wrong on 1 -> negatives weighted by 3/1
    pred = torch.tensor([[[[2.0, 2.0], [2.0, -1.0]], [[0.0, 0.0], [0.0, 0.0]]]])  # argmax: 0,0 / 0,1
    target = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]]])  # all class 0
    conf = torch.tensor([[[[0.5, -1.0], [2.0, 0.3]]]])
    t = [1, 1, 1, 0]
    c = conf.flatten().tolist()
    bce = [math.log(1 + math.exp(-x)) if ti else math.log(1 + math.exp(x)) for x, ti in zip(c, t)]
    expected = (bce[0] + bce[1] + bce[2] + 3 * bce[3]) / 4
    assert confidence_loss(pred, conf, target).item() == pytest.approx(expected, rel=1e-6)


def test_confidence_loss_all_correct_is_plain_bce():
    pred = torch.tensor([[[[1.0]], [[0.0]]]])
    target = torch.tensor([[[[1.0]], [[0.0]]]])
    conf = torch.tensor([[[[0.2]]]])
    assert confidence_loss(pred, conf, target).item() == pytest.approx(math.log(1 + math.exp(-0.2)), rel=1e-6)


def test_kl_loss_by_hand_with_mask_and_temperature():
    T = 2.0
    inp = torch.tensor([[[[1.0]], [[-1.0]]], [[[0.5]], [[0.2]]]])  # (2, 2, 1, 1)
    tgt = torch.tensor([[[[0.0]], [[1.0]]], [[[3.0]], [[-2.0]]]])
    expected = []
    for b in range(2):
        p = softmax([v / T for v in inp[b].flatten().tolist()])
        q = softmax([v / T for v in tgt[b].flatten().tolist()])
        kl = sum(qc * (math.log(qc) - math.log(pc)) for pc, qc in zip(p, q))
        expected.append(kl / 2)  # mean over (C, H, W) = over 2 classes
    mask = torch.tensor([True, False])
    assert kl_loss(inp, tgt, mask, T).item() == pytest.approx(expected[0] / 2, rel=1e-6)
    assert kl_loss(inp, tgt, None, T).item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    assert kl_loss(tgt, tgt).item() == pytest.approx(0.0, abs=1e-7)


def test_fp_consistency_loss_by_hand():
    clean = torch.tensor([[[[1.0, 2.0]], [[0.0, -1.0]]]])  # (1, 2, 1, 2)
    pert = torch.tensor([[[[0.0, 2.0]], [[1.0, 1.0]]]])
    sm = [softmax([pert[0, 0, 0, j].item(), pert[0, 1, 0, j].item()]) for j in range(2)]
    terms = []
    for c in range(2):
        w = (sm[0][c] + sm[1][c]) / 2
        sq = sum((clean[0, c, 0, j].item() - pert[0, c, 0, j].item()) ** 2 for j in range(2)) / 2
        terms.append(w * sq)
    assert fp_consistency_loss(clean, pert).item() == pytest.approx(sum(terms) / 2, rel=1e-6)


def test_fp_consistency_loss_gradient_reaches_the_perturbed_branch():
    clean = torch.randn(2, 2, 3, 3, requires_grad=True)
    pert = torch.randn(2, 2, 3, 3, requires_grad=True)
    fp_consistency_loss(clean, pert).backward()
    assert pert.grad is not None and pert.grad.abs().sum() > 0  # not detached, as the official code


def test_pixel_ce_by_hand():
    pred = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]], [[[0.0, 0.0]], [[0.0, 0.0]]]])  # (2, 2, 1, 2)
    labels = torch.tensor([[[0, 1]], [[1, 1]]])
    s0 = (-math.log(softmax([2, 0])[0]) - math.log(softmax([0, 1])[1])) / 2
    s1 = math.log(2)
    assert pixel_ce(pred, labels).item() == pytest.approx((s0 + s1) / 2, rel=1e-6)
    assert pixel_ce(pred, labels, torch.tensor([0.0, 1.0])).item() == pytest.approx(s1 / 2, rel=1e-6)
