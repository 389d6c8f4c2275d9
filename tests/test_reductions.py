"""HSSF's exchange reductions (``hssf.grades_first``, ``hssf.logits_at``, ``hssf.logits_dtype``).

``grades_first`` is exact and ``logits_at: head`` exact up to rounding (bit-identical here, on CPU):
whole runs equal the reference run in every checkpoint tensor, metric and test score, while fewer bytes
cross. ``logits_dtype: float16`` is lossy: it halves the logits' bytes. The pure functions behind
grades-first are checked on hand-built tensors.
"""
import pytest
import torch

from conftest import assert_same_run, run_tiny
from fed.methods.hssf import fold_teacher, finish_teacher, place_teacher_rows, teacher_mask, teacher_requests

pytestmark = pytest.mark.usefixtures("one_thread")

T = torch.tensor
N, HW = 8, 32 * 32  # the tiny federation's public pass (8 images of 32 px), 2 Condensation + 2 Fusion passes


def _round1(cfg):
    from utils.logger import read_metrics

    recs = read_metrics(cfg.output.dir)
    return recs[1]


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


def test_head_logits_upsampled_equal_the_model_output():
    import networks
    from networks.segmodel import upsample

    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    for arch, stride in (("tiny", 4), ("resnet18", 4), ("unet", 1)):
        m = networks.build_model(arch).eval()
        with torch.no_grad():
            out = m(x, native=True)
        assert out["mask_native"].shape[-1] == 64 // stride, arch
        assert torch.equal(upsample(out["mask_native"], (64, 64)), out["mask"]), arch


@pytest.mark.parametrize("setting", ["hssf.grades_first=true", "hssf.logits_at=head"])
def test_exact_reductions_give_the_reference_run(reference_run, tmp_path, setting):
    """The whole 2-round run (KL on in round 1) is bit-identical to the reference, with fewer bytes up."""
    ref_tmp, ref_cfg, ref_res = reference_run
    cfg, res = run_tiny(tmp_path, "reduced", "train.rounds=2", setting)
    assert_same_run(ref_cfg, ref_res, cfg, res, with_bytes=False)
    ref, got = _round1(ref_cfg), _round1(cfg)
    assert ref["loss"]["server"]["cond_taken"] > 0  # the teachers were used: the comparison means something
    full = 2 * N * (2 * HW * 4 + 4)  # per client: logits + grade of 2 Condensation passes
    names = ("client0", "client1")
    assert all(ref["bytes"][n]["up"] == full for n in names)
    if setting.endswith("head"):  # stride 4: 1/16 of the pixels, both ways
        for n in names:
            assert got["bytes"][n]["up"] == got["bytes"][n]["down"] == 2 * N * (2 * HW // 16 * 4 + 4)
    else:  # grades of every sample; then each usable teacher's logits from one client only, asked by row
        grades = 2 * N * 4
        rows = [(got["bytes"][n]["up"] - grades) // (2 * HW * 4) for n in names]
        assert all(got["bytes"][n]["up"] == grades + r * 2 * HW * 4 for n, r in zip(names, rows))
        assert all(got["bytes"][n]["down"] == ref["bytes"][n]["down"] + 8 * r for n, r in zip(names, rows))
        assert 0 < sum(rows) <= 2 * N  # at most one client's logits per sample, instead of every client's


def test_fp16_logits_halve_the_bytes(tmp_path):
    cfg, res = run_tiny(tmp_path, "fp16", "train.rounds=2", "hssf.logits_dtype=float16")
    rec = _round1(cfg)
    for name in ("client0", "client1"):
        assert rec["bytes"][name]["up"] == 2 * N * (2 * HW * 2 + 4)
        assert rec["bytes"][name]["down"] == 2 * N * (2 * HW * 2 + 4)
