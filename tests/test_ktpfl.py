"""KT-pFL (BASELINES.md section 7): the update of the knowledge-coefficient matrix on a 2x2 case by hand
(gradient, the code's adaptive step size, softmax(5 c) renormalisation), the personalised targets, the
distillation loss and the local-epoch ramp; two tiny rounds (what crosses, byte for byte). On Flower and
with the clients in reverse order: test_arrangements.py."""
import math

import pytest
import torch

from conftest import run_tiny
from fed.methods.ktpfl import (distill_loss, gram, personalised_targets, ramp_epochs, row_gradient, row_loss, step_size,
                       update_coefficients)
from fed.core.party import cosine_factor
from utils.logger import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

T = torch.tensor
N, HW = 8, 32 * 32  # the tiny federation's public pass: 8 images of 32 px
# two clients, one image, one pixel: s_0 = (1, 0), s_1 = (0, 1); E = 2 elements each
S = [T([1.0, 0.0]).view(1, 2, 1, 1), T([0.0, 1.0]).view(1, 2, 1, 1)]


def test_step_size_follows_the_code():
    # 0.5: /5 -> 0.1 (lr 0.2); /5 -> 0.02 (0.04); /5 -> 0.004 (0.008), *5 -> 0.02 (0.04); twice more the same
    assert step_size(0.5) == pytest.approx(0.04)
    assert step_size(0.01) == 1.0  # neither above nor below
    assert step_size(0.002) == pytest.approx(5.0)  # *5 -> 0.01, then stays
    # 0.18: /5 -> 0.036 (0.2); /5 -> 0.0072 (0.04), *5 -> 0.036 (0.2); ... ends at 0.2
    assert step_size(0.18) == pytest.approx(0.2)


def test_row_loss_and_gradient_by_hand():
    G = gram(S)
    assert G.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    c = T([0.5, 0.5], dtype=torch.float64)
    # MSE((1, 0), (0.5, 0.5)) = (0.25 + 0.25) / 2 = 0.25; the penalty is 0 at 1/K
    assert row_loss(G, 0, c, 2, 0.7).item() == pytest.approx(0.25)
    # 2 (G c - G_0) / E = (0.5, 0.5) - (1, 0) = (-0.5, 0.5)
    assert row_gradient(G, 0, c, 2, 0.7).tolist() == pytest.approx([-0.5, 0.5])
    # c = (0.9, 0.1): MSE = ((1 - 0.9)^2 + 0.1^2) / 2 = 0.01; penalty 0.7 * (0.4^2 + 0.4^2) / 2 = 0.112
    c = T([0.9, 0.1], dtype=torch.float64)
    assert row_loss(G, 0, c, 2, 0.7).item() == pytest.approx(0.122)
    # gradient (-0.1, 0.1) + 2 * 0.7 * (0.4, -0.4) / 2 = (0.18, -0.18)
    assert row_gradient(G, 0, c, 2, 0.7).tolist() == pytest.approx([0.18, -0.18])


def test_gradient_is_autograd_of_the_mse_form():
    g = torch.Generator().manual_seed(0)
    maps = [torch.softmax(torch.randn(3, 2, 4, 5, generator=g), 1) for _ in range(3)]
    c = torch.softmax(torch.randn(3, generator=g, dtype=torch.float64), 0).requires_grad_()
    t = sum(c[m] * maps[m].double() for m in range(3))
    mse = torch.nn.functional.mse_loss
    loss = mse(maps[1].double(), t) + 0.7 * mse(c, torch.full_like(c, 1 / 3))
    loss.backward()
    G, E = gram(maps), maps[0].numel()
    assert row_loss(G, 1, c.detach(), E, 0.7).item() == pytest.approx(loss.item(), rel=1e-9)
    assert torch.allclose(row_gradient(G, 1, c.detach(), E, 0.7), c.grad, rtol=1e-9, atol=1e-15)


def test_update_and_personalised_targets_by_hand():
    c = torch.full((2, 2), 0.5, dtype=torch.float64)
    new = update_coefficients(c, gram(S), 2, 0.7)
    # row 0: gradient (-0.5, 0.5), step 0.04 -> (0.52, 0.48); softmax(5 c) = softmax(2.6, 2.4)
    # = (1 / (1 + e^-0.2), 1 / (1 + e^0.2)) = (0.549834, 0.450166); row 1 mirrored
    a = 1 / (1 + math.exp(-0.2))
    assert new.tolist() == [[pytest.approx(a), pytest.approx(1 - a)], [pytest.approx(1 - a), pytest.approx(a)]]
    assert new.sum(1).tolist() == pytest.approx([1.0, 1.0])
    # t_n = sum_m c_nm s_m: t_0 = a (1, 0) + (1 - a) (0, 1)
    t0, t1 = personalised_targets(new, S)
    assert t0.flatten().tolist() == pytest.approx([a, 1 - a]) and t1.flatten().tolist() == pytest.approx([1 - a, a])


def test_distill_loss_is_kl_div_mean_without_t2():
    # logits (0, 0) -> p = (0.5, 0.5) at any T; target (0.75, 0.25):
    # 0.75 ln(0.75/0.5) + 0.25 ln(0.25/0.5) = 0.304099 - 0.173287 = 0.130812, mean over 2 elements
    got = distill_loss(torch.zeros(1, 2, 1, 1), T([0.75, 0.25]).view(1, 2, 1, 1), 10.0)
    assert got.item() == pytest.approx((0.75 * math.log(1.5) + 0.25 * math.log(0.5)) / 2)
    assert got.item() == pytest.approx(0.065406, abs=1e-6)


def test_local_ramp():
    assert [ramp_epochs(r, 1, 10, 1) for r in (0, 1, 2, 5, 11, 50)] == [1, 1, 2, 5, 10, 10]
    assert [ramp_epochs(r, 1, 0, 3) for r in (0, 1, 7)] == [3, 3, 3]  # off: train.local_epochs


def test_two_rounds_send_what_is_declared(tiny_runs):
    _, cfg, res = tiny_runs.in_process("method=ktpfl", "train.rounds=2")  # test_arrangements' reference
    warm, r1 = read_metrics(cfg.output.dir)
    for name in ("client0", "client1"):
        assert warm["bytes"][name] == {"up": 0, "down": 0} and "distill_kl" not in warm["loss"][name]
        # soft maps (N,2,H,W) fp32 up, the personalised target of the same shape down
        assert r1["bytes"][name] == {"up": N * 2 * HW * 4, "down": N * 2 * HW * 4}
        loss = r1["loss"][name]
        assert math.isfinite(loss["distill_kl"]) and loss["distill_kl"] >= 0 and "unl_ce" in loss
    # the server's self-weights after softmax(5 c): between 0 and 1, and not the initial 1/2 any more
    for k in range(2):
        assert 0 < r1["loss"]["server"][f"c_self{k}"] < 1 and r1["loss"]["server"][f"c_self{k}"] != 0.5


def test_half_precision_and_the_ramp(tmp_path):
    cfg, res = run_tiny(tmp_path, "ramp", "method=ktpfl", "train.rounds=3", "ktpfl.soft_dtype=float16",
                        "ktpfl.local_ramp=2")
    recs = read_metrics(cfg.output.dir)
    for rec in recs[1:]:
        for name in ("client0", "client1"):
            assert rec["bytes"][name] == {"up": N * 2 * HW * 2, "down": N * 2 * HW * 2}
    # local epochs 1 (warm-up), 1, 2: four scheduler steps by the end of round 2 (period 3 rounds x 2)
    f = cosine_factor(3 * 2, cfg.train.lr_final_factor)
    assert recs[2]["lr"]["client0"] == pytest.approx(cfg.train.lr * f(4))
    assert recs[1]["lr"]["client0"] == pytest.approx(cfg.train.lr * f(2))
