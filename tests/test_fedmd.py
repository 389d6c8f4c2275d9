"""FedMD (BASELINES.md section 6): the consensus and the L1 digest by hand; two tiny rounds (what crosses,
byte for byte). On Flower and with the clients in reverse order: test_arrangements.py."""
import math

import pytest
import torch

from fed.methods.fedmd import consensus, digest_loss
from utils.logger import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

T = torch.tensor
N, HW = 8, 32 * 32  # the tiny federation's public pass: 8 images of 32 px


def test_consensus_is_the_mean_in_any_order():
    # two clients, one image, one pixel: logits (1, 2) and (3, -4) -> mean (2, -1)
    a, b = T([1.0, 2.0]).view(1, 2, 1, 1), T([3.0, -4.0]).view(1, 2, 1, 1)
    assert consensus([a, b]).flatten().tolist() == [2.0, -1.0]
    assert torch.equal(consensus([a, b]), consensus([b, a]))
    # half-precision maps are averaged in fp32: (0.5 + 0.25) / 2 = 0.375
    got = consensus([T([0.5, 0.0]).half().view(1, 2, 1, 1), T([0.25, 0.0]).half().view(1, 2, 1, 1)])
    assert got.dtype == torch.float32 and got.flatten().tolist() == [0.375, 0.0]


def test_digest_is_per_pixel_per_class_l1():
    # B=1, C=2, H=1, W=2: class 0 = (0, 4), class 1 = (1, 1); consensus class 0 = (1, 2), class 1 = (1, -1)
    # |0-1| + |4-2| + |1-1| + |1+1| = 1 + 2 + 0 + 2 = 5, over 4 elements -> 1.25
    z = T([[[[0.0, 4.0]], [[1.0, 1.0]]]])
    t = T([[[[1.0, 2.0]], [[1.0, -1.0]]]])
    assert digest_loss(z, t).item() == 1.25
    # probs: logits (0, 0) -> softmax (0.5, 0.5); consensus (1, 0): (|0.5-1| + |0.5-0|) / 2 = 0.5
    assert digest_loss(torch.zeros(1, 2, 1, 1), T([1.0, 0.0]).view(1, 2, 1, 1), "probs").item() == 0.5


def _rounds(cfg):
    return read_metrics(cfg.output.dir)


@pytest.mark.parametrize("extra,width", [((), 4), (("fedmd.logits_dtype=float16", "fedmd.average=probs"), 2)])
def test_two_rounds_send_what_is_declared(tiny_runs, extra, width):
    _, cfg, res = tiny_runs.in_process("method=fedmd", "train.rounds=2", *extra)  # (): test_arrangements' reference
    warm, r1 = _rounds(cfg)
    for name in ("client0", "client1"):
        # warm-up: nothing crosses, no digest; then the public logits up and the consensus down
        assert warm["bytes"][name] == {"up": 0, "down": 0} and "digest_l1" not in warm["loss"][name]
        assert r1["bytes"][name] == {"up": N * 2 * HW * width, "down": N * 2 * HW * width}
        loss = r1["loss"][name]
        assert math.isfinite(loss["digest_l1"]) and loss["digest_l1"] > 0
        assert all(math.isfinite(v) for v in loss.values()) and "unl_ce" in loss
    assert "server" not in r1["loss"]  # the server only averages
    assert res["test"]  # the final test ran on the clients' own models
