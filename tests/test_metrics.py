"""Per-image metrics: official epsilon conventions, HD95 (medpy) and summaries."""
import math

import numpy as np
import pytest
import torch

from utils.metrics import ScoreBook, batch_scores, hd95, mean_std


def test_batch_scores_by_hand():
    gt = torch.zeros(2, 4, 4, dtype=torch.long)
    pred = torch.zeros(2, 4, 4, dtype=torch.long)
    gt[0, :2, :2] = 1      # 4 pixels
    pred[0, :2, :3] = 1    # 6 pixels, 4 overlap
    s = batch_scores(pred, gt)
    assert s["dice"][0].item() == pytest.approx(2 * 4 / (4 + 6))
    assert s["iou"][0].item() == pytest.approx(4 / 6)
    assert s["precision"][0].item() == pytest.approx(4 / 6)
    assert s["recall"][0].item() == pytest.approx(1.0)
    # image 1: empty prediction of an empty mask scores 1 on every metric (official epsilon)
    for k in s:
        assert s[k][1].item() == pytest.approx(1.0)


def test_empty_prediction_of_nonempty_mask():
    gt = torch.ones(1, 3, 3)
    s = batch_scores(torch.zeros(1, 3, 3), gt)
    assert s["dice"].item() == pytest.approx(0.0, abs=1e-12)
    assert s["recall"].item() == pytest.approx(0.0, abs=1e-12)
    assert s["precision"].item() == pytest.approx(1.0)  # 0/0 -> 1 with the official epsilon


def test_hd95():
    a = np.zeros((20, 20), bool)
    b = np.zeros((20, 20), bool)
    a[5, 5] = True
    b[5, 8] = True
    assert hd95(a, b) == pytest.approx(3.0)
    assert hd95(a, a) == pytest.approx(0.0)
    sq = np.zeros((30, 30), bool)
    sq[5:15, 5:15] = True
    shifted = np.roll(sq, 2, axis=1)
    assert 0 < hd95(sq, shifted) <= 2.0 + 1e-9
    assert hd95(a, np.zeros_like(a)) is None
    assert hd95(np.zeros_like(a), a) is None


def test_mean_std_and_scorebook():
    assert mean_std([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "n": 2}
    assert math.isnan(mean_std([])["mean"])
    book = ScoreBook()
    book.add("client0", ["a", "b"], {"dice": torch.tensor([1.0, 0.5])}, [2.0, None])
    book.add("client1", ["c"], {"dice": torch.tensor([0.0])}, [None])
    s0 = book.summary("client0", scale=100)
    assert s0["dice"]["mean"] == pytest.approx(75.0)
    assert s0["hd95"] == {"mean": 2.0, "std": 0.0, "n": 1, "left_out": 1}
    s = book.summary(None, scale=100)
    assert s["images"] == 3 and s["dice"]["mean"] == pytest.approx(50.0)
    assert s["hd95"]["left_out"] == 2
