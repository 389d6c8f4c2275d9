"""HSSF's exchange reductions (``hssf.grades_first``, ``hssf.logits_at``, ``hssf.logits_dtype``).

``grades_first`` is exact and ``logits_at: head`` exact up to rounding (bit-identical here, on CPU):
whole runs equal the reference run in every checkpoint tensor, metric and test score, while fewer bytes
cross. ``logits_dtype: float16`` is lossy: it halves the logits' bytes. The pure functions behind
grades-first are checked on hand-built tensors in test_hssf.py.
"""
import pytest
import torch

from conftest import assert_same_run, run_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

N, HW = 8, 32 * 32  # the tiny federation's public pass (8 images of 32 px), 2 Condensation + 2 Fusion passes


def _round1(cfg):
    from utils.logger import read_metrics

    recs = read_metrics(cfg.output.dir)
    return recs[1]


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
