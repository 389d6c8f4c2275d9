"""Mean Teacher federated by FedAvg (``fed/methods/mean_teacher.py``, BASELINES.md section 1).

Hand-computed checks of the EMA update, the ramp weight and the consistency loss; two tiny rounds in
process (the consistency was trained on in the non-warm-up round, the teacher follows the student's
buffers, the bytes are the student's state dict plus, after the warm-up, the teacher's parameters both
ways, and round 0 also exchanges the initial students; ``teacher: reset`` sends the student's only); the
step counter over three rounds. Resumed and on Flower: test_arrangements.py.
"""
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import run_tiny
from fed.common.weights import ema_update
from fed.methods.mean_teacher import (consistency_loss, consistency_weight, ema_alpha, run_ramp_div,
                               sigmoid_rampup)

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = ("method=mean_teacher", "train.rounds=2", "mean_teacher.zero_steps=0")  # consistency from step 0


def test_ema_alpha_and_update():
    # alpha = min(1 - 1/(step+1), 0.99): 0, 1/2, 9/10, then capped at 0.99 from step 99 on
    assert [ema_alpha(s, 0.99) for s in (0, 1, 9, 99, 5000)] == [0.0, 0.5, 0.9, 0.99, 0.99]
    assert ema_alpha(5000, 0.999) == 0.999
    student = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    teacher = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    with torch.no_grad():
        teacher[0].weight.fill_(1.0), student[0].weight.fill_(3.0)
        student[1].running_mean.fill_(0.7), student[1].num_batches_tracked.fill_(5)
    ema_update(teacher, student, 0.5)   # 0.5 * 1 + 0.5 * 3 = 2
    assert teacher[0].weight.item() == 2.0
    ema_update(teacher, student, 0.9)   # 0.9 * 2 + 0.1 * 3 = 2.1
    assert teacher[0].weight.item() == pytest.approx(2.1)
    assert teacher[1].running_mean.item() == pytest.approx(0.7) and teacher[1].num_batches_tracked.item() == 5
    assert student[0].weight.item() == 3.0  # the student is untouched
    ema_update(teacher, student, 0.0)   # alpha 0 (a client's first step): the teacher becomes the student
    assert teacher[0].weight.item() == 3.0


def test_ramp_weight():
    w = lambda step: consistency_weight(step, 0.1, 200.0, 150, 1000)
    assert w(0) == w(999) == 0.0                                   # zeroed for the first 1000 steps
    assert w(1000) == pytest.approx(0.1 * math.exp(-5 * (1 - 6 / 200) ** 2))  # t = 1000 // 150 = 6
    assert w(1000) == pytest.approx(9.0544e-4, rel=1e-4)           # 0.1 * exp(-4.7045)
    assert w(15000) == pytest.approx(0.1 * math.exp(-1.25))        # t = 100: p = 1/2
    assert w(15149) == w(15000)                                    # t = 15149 // 150 = 100 too
    assert w(30000) == w(10 ** 6) == pytest.approx(0.1)            # t >= 200: full weight
    assert sigmoid_rampup(5, 0) == 1.0
    # ramp_div 0: the ramp ends with the run. CVC-300: 48 batches x 1 epoch x (200 - 20) rounds = 8640 steps,
    # 43.2 steps per unit: step 8639 -> t = 199 -> 0.1 exp(-5 / 200^2); step 8640 -> t = 200 -> 0.1
    div = run_ramp_div(48, 1, 200, 20, 200.0)
    assert div == pytest.approx(43.2)
    assert consistency_weight(8639, 0.1, 200.0, div, 1000) == pytest.approx(0.1 * math.exp(-5 / 200 ** 2))
    assert consistency_weight(8640, 0.1, 200.0, div, 1000) == pytest.approx(0.1)


def test_consistency_loss():
    # pixel 1: student [0, 0] -> (1/2, 1/2), teacher [ln 3, 0] -> (3/4, 1/4): squares 1/16, 1/16
    # pixel 2: identical logits -> 0. Mean over the 4 (class, pixel) entries: (2/16) / 4 = 1/32
    student = torch.tensor([[[[0.0, 1.0]], [[0.0, -2.0]]]])  # (B=1, C=2, H=1, W=2)
    teacher = torch.tensor([[[[math.log(3.0), 1.0]], [[0.0, -2.0]]]])
    assert consistency_loss(student, teacher).item() == pytest.approx(1 / 32)


@pytest.fixture(scope="module")
def mt_run(tiny_runs):
    return tiny_runs.in_process(*SETTINGS)  # test_arrangements' reference


def _records(cfg):
    from utils.logger import read_metrics

    return read_metrics(cfg.output.dir)


def _state(cfg, name, rnd=1):
    return torch.load(Path(cfg.output.dir) / "state" / f"{name}.r{rnd}.pt", weights_only=False)


def test_two_rounds(mt_run):
    import networks

    _, cfg, _ = mt_run
    recs = _records(cfg)
    assert recs[0]["warmup"] and not recs[1]["warmup"]
    model = networks.build_model("tiny")
    sd = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    for name in ("client0", "client1"):
        assert "unl_cons" not in recs[0]["loss"][name]             # warm-up: D_p only
        loss = recs[1]["loss"][name]
        assert math.isfinite(loss["unl_cons"]) and loss["unl_cons"] > 0 and loss["unl_cons_weight"] > 0
        # warm-up: the student's state dict, twice in round 0 (the initial weights are averaged first, so
        # that every client starts from one model); then also the teacher's parameters (its buffers are
        # the student's)
        assert recs[0]["bytes"][name]["up"] == recs[0]["bytes"][name]["down"] == 2 * sd
        assert recs[1]["bytes"][name]["up"] == recs[1]["bytes"][name]["down"] == sd + params
        state = _state(cfg, name)
        # 6 unlabeled training images per client, batch 2: 3 steps in the one non-warm-up round
        assert state["extra"]["mt_step"] == 3
        teacher, student = state["extra"]["teacher"], state["model"]
        buffers = [k for k in student if "running" in k or "num_batches" in k]
        assert buffers and all(torch.equal(teacher[k], student[k]) for k in buffers)   # copied buffers
        assert not all(torch.equal(teacher[k], student[k]) for k in student)          # EMA parameters


def test_the_step_counter_goes_on_over_the_rounds(tiny_runs):
    """Three rounds (the run that test_arrangements stops after round 1 and resumes): 3 steps in each
    non-warm-up round."""
    _, cfg, _ = tiny_runs.in_process(*SETTINGS, "train.rounds=3")
    assert _state(cfg, "client0", 2)["extra"]["mt_step"] == 6


def test_reset_teacher_sends_the_student_only(tmp_path):
    import networks

    cfg, _ = run_tiny(tmp_path, "reset", "method=mean_teacher", "train.rounds=2", "mean_teacher.zero_steps=0",
                      "mean_teacher.teacher=reset")
    sd = sum(v.numel() * v.element_size() for v in networks.build_model("tiny").state_dict().values())
    recs = _records(cfg)
    for name in ("client0", "client1"):
        assert recs[1]["bytes"][name]["up"] == recs[1]["bytes"][name]["down"] == sd
        assert math.isfinite(recs[1]["loss"][name]["unl_cons"])
