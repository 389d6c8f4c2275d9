"""FedDistill (BASELINES.md section 8): per-label mean logits, the global and leave-one-out teachers and
the MSE / KL regulariser by hand; two tiny rounds (what crosses, byte for byte). On Flower and with the
clients in reverse order: test_arrangements.py."""
import math

import pytest
import torch

from conftest import run_tiny
from fed.methods.feddistill import class_means, class_sums, global_logits, kl_to_label, leave_one_out, mse_to_label
from utils.logger import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

T = torch.tensor
UP = 2 * 2 * 4 + 2  # a (2,2) fp32 matrix and a (2,) bool


def _img(*pixels):
    """(1, 2, 1, W) logits from W (class-0, class-1) pixel vectors."""
    return T(pixels, dtype=torch.float32).t().reshape(1, 2, 1, len(pixels))


def test_class_means_over_valid_pixels():
    # pixels z = (1,2), (3,5), (5,6), (7,8); labels 0, 1, 0, 1; the last pixel is not valid (unconfident)
    z = _img((1, 2), (3, 5), (5, 6), (7, 8))
    labels, valid = T([[[0, 1, 0, 1]]]), T([[[True, True, True, False]]])
    sums, counts = class_sums(z, labels, valid)
    # label 0: (1,2) + (5,6) = (6,8) over 2 pixels; label 1: (3,5) over 1
    assert sums.tolist() == [[6.0, 8.0], [3.0, 5.0]] and counts.tolist() == [2.0, 1.0]
    up = class_means(sums, counts)
    assert up["logits"].tolist() == [[3.0, 4.0], [3.0, 5.0]] and up["seen"].tolist() == [True, True]
    assert up["logits"].dtype == torch.float32
    # a label never seen: a zero row, seen False
    up = class_means(*class_sums(z, T([[[0, 0, 0, 0]]]), valid))
    assert up["logits"][1].tolist() == [0.0, 0.0] and up["seen"].tolist() == [True, False]


MEANS = T([[[1.0, 0.0], [0.0, 2.0]],
           [[3.0, 0.0], [0.0, 4.0]],
           [[5.0, 0.0], [9.0, 9.0]]])
SEEN = T([[True, True], [True, True], [True, False]])  # client 2 never saw the foreground


def test_global_logits_average_the_clients_that_saw_each_label():
    g = global_logits(MEANS, SEEN)
    # background: (1 + 3 + 5) / 3 = 3; foreground: ((0,2) + (0,4)) / 2 = (0,3); client 2's (9,9) unused
    assert g["logits"].tolist() == [[3.0, 0.0], [0.0, 3.0]] and g["has"].tolist() == [True, True]


def test_leave_one_out_teacher():
    # client 0: background (3 + 5) / 2 = 4 = (M F - F_0) / (M - 1) = (3*3 - 1) / 2; foreground (2*3 - 2) / 1 = 4
    t0 = leave_one_out(MEANS, SEEN, 0)
    assert t0["logits"].tolist() == [[4.0, 0.0], [0.0, 4.0]] and t0["has"].tolist() == [True, True]
    # client 2 did not see the foreground: its teacher there is the plain mean (0, 3); background (1+3)/2
    t2 = leave_one_out(MEANS, SEEN, 2)
    assert t2["logits"].tolist() == [[2.0, 0.0], [0.0, 3.0]]
    # a label only client 0 saw has no teacher for it
    t = leave_one_out(MEANS[:2], T([[True, True], [True, False]]), 0)
    assert t["has"].tolist() == [True, False] and t["logits"][0].tolist() == [3.0, 0.0]


def test_mse_regulariser_by_hand():
    # pixel a: z = (1,1), label 0, teacher (2,0): ((1-2)^2 + (1-0)^2) / 2 = 1
    # pixel b: z = (0,3), label 1, teacher (0,1): (0 + (3-1)^2) / 2 = 2
    z, labels = _img((1, 1), (0, 3)), T([[[0, 1]]])
    teacher, has = T([[2.0, 0.0], [0.0, 1.0]]), T([True, True])
    every = T([[[True, True]]])
    assert mse_to_label(z, labels, every, teacher, has).item() == 1.5  # (1 + 2) / 2 pixels
    # an invalid pixel, or a label without teacher, adds zero but still counts in the denominator
    assert mse_to_label(z, labels, T([[[True, False]]]), teacher, has).item() == 0.5
    assert mse_to_label(z, labels, every, teacher, T([True, False])).item() == 0.5


def test_kl_regulariser_by_hand():
    # z = (0,0) -> p = (0.5, 0.5); teacher (ln 3, 0) -> q = (0.75, 0.25):
    # KL(q || p) = 0.75 ln 1.5 + 0.25 ln 0.5 = 0.130812 (summed over classes), one pixel
    z, labels = _img((0, 0)), T([[[0]]])
    teacher = T([[math.log(3.0), 0.0], [0.0, 0.0]])
    got = kl_to_label(z, labels, T([[[True]]]), teacher, T([True, True]))
    assert got.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))


def test_two_rounds_send_what_is_declared(tiny_runs):
    _, cfg, res = tiny_runs.in_process("method=feddistill", "train.rounds=2")  # test_arrangements' reference
    warm, r1 = read_metrics(cfg.output.dir)
    for name in ("client0", "client1"):
        assert warm["bytes"][name] == {"up": 0, "down": 0}
        assert not any(k.endswith("_fd") for k in warm["loss"][name])
        assert r1["bytes"][name] == {"up": UP, "down": UP}  # 2x2 mean logits + seen; the global matrix + has
        loss = r1["loss"][name]
        assert loss["sup_fd"] > 0 and math.isfinite(loss["sup_fd"]) and math.isfinite(loss["unl_fd"])


def test_leave_one_out_and_kl(tmp_path):
    cfg, res = run_tiny(tmp_path, "fdloo", "method=feddistill", "train.rounds=2", "feddistill.leave_one_out=true",
                        "feddistill.loss=kl")
    r1 = read_metrics(cfg.output.dir)[1]
    for name in ("client0", "client1"):  # each client its own teacher (the other's logits): the same size
        assert r1["bytes"][name] == {"up": UP, "down": UP}
        assert r1["loss"][name]["sup_fd"] > 0 and math.isfinite(r1["loss"][name]["sup_fd"])
