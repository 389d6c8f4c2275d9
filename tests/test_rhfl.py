"""RHFL (BASELINES.md section 10): SCE, CCR weights and the collaborative KL by hand, the lock-step public
batch, whole tiny runs (bytes = what is declared). On Flower: test_arrangements.py."""
import math

import pytest
import torch

from conftest import run_tiny, tiny_overrides
from fed import load_config
from fed.methods.rhfl import ccr_weights, collaborative_kl, masked_sce, public_batch, sce_pixels
from utils.logger import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

LN2, LN1E4 = math.log(2), math.log(1e4)


def test_sce_by_hand():
    # two pixels (B=1, C=2, H=1, W=2): logits (0, 0) label 0 and (0, ln 3) label 1
    logits = torch.tensor([[[[0.0, 0.0]], [[0.0, math.log(3)]]]])
    labels = torch.tensor([[[0, 1]]])
    # pixel 1: p = (.5, .5); CE = ln 2; RCE = -(.5 ln 1 + .5 ln 1e-4) = .5 ln 1e4 = 4.60517
    # pixel 2: p = (.25, .75); CE = -ln .75 = 0.287682; RCE = -(.25 ln 1e-4 + .75 ln 1) = .25 ln 1e4 = 2.302585
    want = [0.1 * LN2 + 0.5 * LN1E4, 0.1 * -math.log(0.75) + 0.25 * LN1E4]  # alpha 0.1, beta 1
    assert sce_pixels(logits, labels)[0, 0].tolist() == pytest.approx(want, rel=1e-6)
    assert sce_pixels(logits, labels, alpha=1.0, beta=0.0)[0, 0].tolist() == pytest.approx([LN2, -math.log(0.75)])
    # kept: only pixel 1, divided by both pixels: 4.674487 / 2
    keep = torch.tensor([[[True, False]]])
    assert masked_sce(logits, labels, keep).item() == pytest.approx(want[0] / 2, rel=1e-6)


def test_ccr_weights_three_clients_by_hand():
    prev, cur = torch.tensor([2.0, 1.0, 4.0]), torch.tensor([1.0, 1.0, 2.0])
    # Q = ((2-1)/1, (1-1)/1, (4-2)/2) = (1, 0, 1), sum 2; F = 1/2 + 0.5 * (1/2, 0, 1/2) = (.75, .5, .75)
    # W = softmax(F): e^.75 = 2.117000, e^.5 = 1.648721, sum 5.882721 (to 6 digits) -> (0.359867, 0.280265, 0.359867)
    w = ccr_weights(prev, cur, 0.5, 3)
    assert w.tolist() == pytest.approx([0.359867, 0.280265, 0.359867], abs=1e-6)
    assert ccr_weights(None, cur, 0.5, 3).tolist() == [0.5, 0.5, 0.5]  # first round: 1/(K-1)
    # no change anywhere (sum Q = 0): F = 1/2 each, softmax -> 1/3 each
    assert ccr_weights(cur, cur, 0.5, 3).tolist() == pytest.approx([1 / 3] * 3)
    # a NaN loss (no confident pixel) counts as Q = 0: Q = (1, 0, 1) as above
    nan = torch.tensor([2.0, float("nan"), 4.0])
    assert ccr_weights(nan, cur, 0.5, 3).tolist() == pytest.approx([0.359867, 0.280265, 0.359867], abs=1e-6)


def test_collaborative_kl_by_hand():
    # learner p = (.5, .5) at both pixels (B=1, H=1, W=2); client j1: (1, 0) at both, j2: (.5, .5)
    log_p = torch.log(torch.full((1, 2, 1, 2), 0.5)).requires_grad_()
    others = torch.stack([torch.tensor([[[[1.0, 1.0]], [[0.0, 0.0]]]]), torch.full((1, 2, 1, 2), 0.5)])
    # KL(j1 || p) = 1 ln(1/.5) + 0 = ln 2 per pixel, 2 ln 2 summed; KL(j2 || p) = 0
    # 0.3 * 2 ln 2 + 0.7 * 0, divided by B*H*W = 2 -> 0.3 ln 2
    kl = collaborative_kl(log_p, others, torch.tensor([0.3, 0.7]))
    assert kl.item() == pytest.approx(0.3 * LN2, rel=1e-6)
    kl.backward()  # d/d log p of sum_j w_j sum p_j (log p_j - log p) = -sum_j w_j p_j / 2
    assert log_p.grad[0, :, 0, 0].tolist() == pytest.approx([-(0.3 * 1 + 0.7 * 0.5) / 2, -(0.7 * 0.5) / 2])


def test_public_batch_is_the_passes_batch(tmp_path):
    from datasets.federation import load_federation
    from fed.core.runner import Runner

    cfg = load_config(None, tiny_overrides(tmp_path, "pub", "method=rhfl"))
    party = Runner(cfg, load_federation(cfg)).parties["client1"]
    passes = [(x, y, torch.rand(3)) for _, x, y in party.public_batches(2, "collaboration", 1)]
    assert len(passes) == len(party.loaders["public"]) == 4
    for b in (2, 0, 3):
        x, y = public_batch(party, 2, "collaboration", 1, b)
        assert torch.equal(x, passes[b][0]) and torch.equal(y, passes[b][1])
        assert torch.equal(torch.rand(3), passes[b][2])  # torch's generators seeded as in the pass


def test_two_tiny_rounds(tmp_path):
    cfg, _ = run_tiny(tmp_path, "x", "method=rhfl", "train.rounds=3", "baselines.tau=0.5")
    recs = read_metrics(cfg.output.dir)
    names = ("client0", "client1")
    maps = 4 * 2 * 2 * 32 * 32 * 4  # 4 public batches of (B=2, 2, 32, 32) float32
    for n in names:
        assert recs[0]["bytes"][n] == {"up": 0, "down": 0}  # warm-up: nothing crosses
        for r in recs[1:]:  # up: the CCR loss (a number, 8) + its maps; down: the other's maps + 1 weight
            assert r["bytes"][n] == {"up": 8 + maps, "down": maps + 4 * 4}
            assert math.isfinite(r["loss"][n]["col_kl"]) and r["loss"][n]["col_kl"] > 0
            assert math.isfinite(r["loss"][n]["ccr_loss"]) and math.isfinite(r["loss"][n]["unl_ce"])
    assert recs[1]["loss"]["server"] == {"ccr_w0": 1.0, "ccr_w1": 1.0}  # first exchange: 1/(K-1)
    w = recs[2]["loss"]["server"]  # then softmax(F): two weights summing to 1, from the losses' changes
    assert w["ccr_w0"] + w["ccr_w1"] == pytest.approx(1.0) and w["ccr_w0"] != 0.5
    l1, l2 = recs[1]["loss"], recs[2]["loss"]
    q = [(l1[n]["ccr_loss"] - l2[n]["ccr_loss"]) / l2[n]["ccr_loss"] for n in names]
    f = [1.0 + 0.5 * qk / sum(q) for qk in q]
    assert w["ccr_w0"] == pytest.approx(math.exp(f[0]) / (math.exp(f[0]) + math.exp(f[1])), rel=1e-5)
