"""HSSF's decisions as pure functions (``fed/methods/hssf.py``, ``fed/common/hssf_local.py``), answers
worked out by hand: the Condensation teacher (the running pick, its order-free fold and mask; grades
first: the rows asked for and placed back), the Fusion mask, RPG and the pseudo-labels.

HSSF's whole runs: the reference run (``conftest.REFERENCE``) on other arrangements in
test_arrangements.py, its exchange reductions in test_reductions.py, its diagnostics in
test_diagnostics.py, its rounds as a protocol in test_protocol.py, on Flower in test_flower.py.
"""
import itertools

import pytest
import torch

from fed.common.hssf_local import pseudo_label, rpg_correct
from fed.common.labels import pixel_accuracy
from fed.methods.hssf import (finish_teacher, fold_teacher, fusion_mask, place_teacher_rows, running_pick, teacher_mask,
                              teacher_requests)

T = torch.tensor


# --- Condensation teacher ---------------------------------------------------------------------------

def test_running_pick_by_hand():
    # three samples, two clients, threshold 0.75
    g0 = T([0.80, 0.60, 0.90])
    grades = T([[0.85, 0.70, 0.90],    # client 0
                [0.85, 0.95, 0.70]])   # client 1
    index, grade = running_pick(g0, grades, 0.75)
    # sample 0: c0 0.85 > 0.80 taken; c1 0.85 is not > 0.85 (strict): client 0, mask 0.85 > 0.80
    # sample 1: c0 0.70 > 0.60 taken, but 0.70 <= 0.75 resets the grade to 0; c1 0.95 > 0 taken
    # sample 2: nobody beats 0.90 (a tie is not a win): the server keeps its own prediction
    assert index.tolist() == [0, 1, -1]
    assert torch.allclose(grade, T([0.85, 0.95, 0.90]))
    assert (grade > g0).tolist() == [True, True, False]


def test_running_pick_resets_low_server_grade():
    # server grade 0.5 <= 0.75: after client 0 (0.4, not taken) the picked grade resets to 0, so
    # client 1's 0.3 is taken (grade 0.3 -> reset to 0): never used, since 0 > 0.5 is false
    index, grade = running_pick(T([0.5]), T([[0.4], [0.3]]), 0.75)
    assert index.tolist() == [1] and grade.tolist() == [0.0]


def _fold(grades, order):
    acc = None
    for k in order:
        acc = fold_teacher(acc, k, {"grade": grades[k], "logits": torch.full((len(grades[k]), 2, 1, 1), float(k))})
    return acc


def test_fold_and_mask_equal_the_running_pick_for_every_case():
    """Over all grade combinations from a small set (ties included, g0 on both sides of the
    threshold), the order-free fold + teacher_mask gives the running pick's mask, and its teacher
    where the mask is on; any arrival order of the replies folds to the same result."""
    values = [0.0, 0.5, 0.75, 0.8, 0.9]
    cases = list(itertools.product(values, repeat=4))  # g0, then three clients
    g0 = T([c[0] for c in cases])
    grades = T([[c[k + 1] for c in cases] for k in range(3)])
    index, grade = running_pick(g0, grades, 0.75)
    reference = grade > g0
    for order in itertools.permutations(range(3)):
        acc = _fold(grades, order)
        mask = teacher_mask(acc["grade"], g0, 0.75)
        assert torch.equal(mask, reference), order
        assert torch.equal(acc["index"][mask], index[mask])
        assert torch.equal(acc["logits"][mask][:, 0, 0, 0].long(), index[mask])
    assert reference.any() and (~reference).any()


# --- grades first (hssf.grades_first) ----------------------------------------------------------------

def test_grades_first_requests_only_usable_teachers():
    # 3 clients, 5 samples; threshold 0.75
    grades = T([[0.80, 0.70, 0.90, 0.50, 0.76],
                [0.80, 0.74, 0.95, 0.60, 0.76],
                [0.70, 0.60, 0.95, 0.70, 0.90]])
    best = None
    for k in (2, 0, 1):  # any arrival order
        best = fold_teacher(best, k, {"grade": grades[k]})
    assert best["index"].tolist() == [0, 1, 1, 2, 2] and "logits" not in best
    asks = teacher_requests(best, 0.75)
    # sample 0: client 0 (tie with 1 -> lower index); 1: best 0.74 <= 0.75, nobody; 2: client 1 (tie with 2)
    # 3: best 0.70 <= 0.75, nobody; 4: client 2
    assert {k: v.tolist() for k, v in asks.items()} == {0: [0], 1: [2], 2: [4]}
    logits = torch.arange(3 * 5 * 2 * 1 * 1, dtype=torch.float32).reshape(3, 5, 2, 1, 1)
    fold = place_teacher_rows(best, asks)
    acc = None
    for k in (1, 2, 0):
        acc = fold(acc, k, {"logits": logits[k][asks[k]]})
    teacher = finish_teacher(acc)
    full = None
    for k in range(3):
        full = fold_teacher(full, k, {"grade": grades[k], "logits": logits[k]})
    g0 = T([0.5, 0.5, 0.5, 0.5, 0.95])
    mask = teacher_mask(teacher["grade"], g0, 0.75)
    assert mask.tolist() == teacher_mask(full["grade"], g0, 0.75).tolist() == [True, False, True, False, False]
    assert torch.equal(teacher["logits"][mask], full["logits"][mask])


def test_grades_first_failed_client_teaches_nothing():
    best = {"grade": T([0.9, 0.8, 0.95]), "index": T([0, 1, 1])}
    asks = teacher_requests(best, 0.0)
    fold = place_teacher_rows(best, asks)
    acc = fold(None, 0, {"logits": torch.ones(1, 2, 1, 1)})  # client 1 never answers
    teacher = finish_teacher(acc)
    assert teacher["grade"].tolist() == [pytest.approx(0.9), -1.0, -1.0]
    assert teacher_mask(teacher["grade"], torch.zeros(3), 0.0).tolist() == [True, False, False]
    assert finish_teacher(None) is None


# --- Fusion mask, RPG and pseudo-labels ---------------------------------------------------------------

def test_fusion_mask_and_rpg_by_hand():
    assert fusion_mask(T([0.9, 0.8, 0.7]), T([0.8, 0.8, 0.9])).tolist() == [True, False, False]
    # logits favour class 1 at pixel 0 and class 0 at pixel 1; confidence logit -2 (sigmoid 0.12 < 0.3)
    # flips pixel 1 only
    logits = T([[[[0.0, 1.0]], [[1.0, 0.0]]]])   # (1, 2, 1, 2)
    conf = T([[[[2.0, -2.0]]]])                   # (1, 1, 1, 2)
    assert rpg_correct(logits, conf, 0.3).tolist() == [[[1, 1]]]
    assert pixel_accuracy(T([[[1, 1]]]), T([[[1, 0]]])).tolist() == [0.5]


def test_pseudo_label_choice_rpg_and_gate_by_hand():
    # 1 image of 4 pixels; weak says class 1 everywhere, strong says class 0 everywhere
    p_w = torch.stack([torch.zeros(1, 4), torch.ones(1, 4)], 1).view(1, 2, 1, 4)
    p_s = torch.stack([torch.ones(1, 4), torch.zeros(1, 4)], 1).view(1, 2, 1, 4)
    conf_w = T([[[0.9, 0.5, 0.2, 0.1]]])
    conf_s = T([[[0.8, 0.5, 0.25, 0.05]]])
    # pixel 0: weak more confident -> 1; pixel 1: tie -> weak -> 1; pixel 2: strong 0.25 > 0.2 -> 0;
    # pixel 3: weak -> 1
    pseudo, gate = pseudo_label(p_w, p_s, conf_w, conf_s, rpg=False, rpg_threshold=0.3, sample_threshold=0.75)
    assert pseudo.tolist() == [[[1, 1, 0, 1]]] and gate is None
    # RPG: max confidences 0.9, 0.5, 0.25, 0.1: pixels 2 and 3 are below 0.3 and flip
    pseudo, gate = pseudo_label(p_w, p_s, conf_w, conf_s, rpg=True, rpg_threshold=0.3, sample_threshold=0.75)
    assert pseudo.tolist() == [[[1, 1, 1, 0]]]
    # mean max confidence (0.9 + 0.5 + 0.25 + 0.1) / 4 = 0.4375 <= 0.75: the image is gated out
    assert gate.tolist() == [False]
    assert pseudo_label(p_w, p_s, conf_w, conf_s, True, 0.3, 0.4)[1].tolist() == [True]
