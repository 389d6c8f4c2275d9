"""FedProto (BASELINES.md section 9): its pieces by hand, the decoder feature, whole tiny runs (bytes =
what is declared). On Flower: test_arrangements.py."""
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import run_tiny, tiny_overrides
from fed import load_config
from fed.methods.fedproto import (FedProto, aggregate_prototypes, batch_proto_mse, feature_width, masked_prototypes,
                          proto_mse)
from utils.config import ConfigError
from utils.logger import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def test_masked_average_pooling_prototypes_by_hand():
    # features (B=1, D=2, h=2, w=2): pixel (0,0) = (1,2), (0,1) = (3,4), (1,0) = (5,6), (1,1) = (7,8)
    feat = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]], [[2.0, 4.0], [6.0, 8.0]]]])
    # labels at 4x4; nearest to 2x2 reads rows/cols 0 and 2: (0,0) -> 0, (0,2) -> 1, (2,0) -> 1, (2,2) -> 1
    # (the other entries are the opposite class: they must not matter); (2,2) is not valid
    labels = torch.tensor([[[0, 0, 1, 0], [1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0]]])
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    valid[0, 2, 2] = False
    sums, counts = masked_prototypes(feat, labels, valid)
    # class 0: pixel (0,0) only -> sum (1,2), 1 pixel; class 1: (0,1) + (1,0) = (8,10), 2 pixels
    assert sums.tolist() == [[1.0, 2.0], [8.0, 10.0]] and counts.tolist() == [1.0, 2.0]


def test_server_mean_per_class_by_hand():
    a = {"proto": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "present": torch.tensor([True, True]),
         "count": torch.tensor([1, 3])}
    b = {"proto": torch.tensor([[5.0, 6.0], [0.0, 0.0]]), "present": torch.tensor([True, False]),
         "count": torch.tensor([3, 0])}
    # uniform: class 0 = ((1,2) + (5,6)) / 2 = (3,4); class 1: only a saw it -> (3,4)
    g = aggregate_prototypes([a, b])
    assert g["proto"].tolist() == [[3.0, 4.0], [3.0, 4.0]] and g["present"].tolist() == [True, True]
    # counts: class 0 = (1*(1,2) + 3*(5,6)) / 4 = (16/4, 20/4) = (4,5); class 1 = (3,4)
    g = aggregate_prototypes([a, b], "counts")
    assert g["proto"].tolist() == [[4.0, 5.0], [3.0, 4.0]]
    # nobody saw class 1: no global prototype (zeros, present False); no uploads: nothing
    g = aggregate_prototypes([b])
    assert g["present"].tolist() == [True, False] and g["proto"][1].tolist() == [0.0, 0.0]
    assert aggregate_prototypes([]) is None


def test_mse_regulariser_with_a_missing_prototype_by_hand():
    # three pixels in a row (B=1, D=2, h=1, w=3): a = (1,3) label 0, b = (2,2) label 1, c = (3,1) label 0
    feat = torch.tensor([[[[1.0, 2.0, 3.0]], [[3.0, 2.0, 1.0]]]], requires_grad=True)
    labels = torch.tensor([[[0, 1, 0]]])
    valid = torch.ones(1, 1, 3, dtype=torch.bool)
    protos, present = torch.tensor([[0.0, 1.0], [9.0, 9.0]]), torch.tensor([True, False])  # class 1: none yet
    # pixel: a (1-0)^2 + (3-1)^2 = 5, b 0 (no prototype, still counted), c (3-0)^2 + (1-1)^2 = 9
    # -> (5 + 0 + 9) / (3 pixels * 2 dims) = 14/6
    mse = proto_mse(feat, labels, valid, protos, present)
    assert math.isclose(mse.item(), 14 / 6, rel_tol=1e-6)
    mse.backward()
    assert feat.grad[0, :, 0, 1].tolist() == [0.0, 0.0]  # b is not pulled anywhere
    # a not valid: (0 + 9) / (2 * 2)
    valid[0, 0, 0] = False
    assert math.isclose(proto_mse(feat, labels, valid, protos, present).item(), 9 / 4, rel_tol=1e-6)
    # batch level: class 0's batch prototype (mean of a and c) = (2,2): (2-0)^2 + (2-1)^2 = 5; class 1 in
    # the batch but without a global prototype: 0 -> (5 + 0) / (2 classes * 2 dims) = 1.25
    valid[0, 0, 0] = True
    assert math.isclose(batch_proto_mse(feat, labels, valid, protos, present).item(), 1.25, rel_tol=1e-6)
    # nothing valid: 0, not NaN
    none = torch.zeros_like(valid)
    assert proto_mse(feat, labels, none, protos, present).item() == 0.0
    assert batch_proto_mse(feat, labels, none, protos, present).item() == 0.0


def test_prototypes_are_those_of_the_last_local_epoch():
    party = SimpleNamespace(extra={"fedproto_sum": None, "fedproto_count": None, "fedproto_epoch": -1},
                            scheduler=SimpleNamespace(last_epoch=5))
    feat, valid = torch.ones(1, 2, 1, 1), torch.ones(1, 1, 1, dtype=torch.bool)
    FedProto._accumulate(party, feat, torch.zeros(1, 1, 1, dtype=torch.long), valid)
    FedProto._accumulate(party, feat, torch.ones(1, 1, 1, dtype=torch.long), valid)
    assert party.extra["fedproto_count"].tolist() == [1.0, 1.0]
    party.scheduler.last_epoch = 6  # the scheduler stepped: a new local epoch starts the sums afresh
    FedProto._accumulate(party, 2 * feat, torch.ones(1, 1, 1, dtype=torch.long), valid)
    assert party.extra["fedproto_count"].tolist() == [0.0, 1.0]
    assert party.extra["fedproto_sum"].tolist() == [[0.0, 0.0], [2.0, 2.0]]


def test_the_feature_is_the_classifier_input():
    import networks
    from networks.segmodel import feature_channels, upsample

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    m = networks.build_model("tiny").eval()
    with torch.no_grad():
        out, plain = m(x, features=True), m(x)
        assert out["feature"].shape == (2, 32, 8, 8) == (2, feature_channels(m), 8, 8)
        assert torch.equal(upsample(m.classifier.classifier(out["feature"]), (32, 32)), out["mask"])
        assert torch.equal(out["mask"], plain["mask"]) and "feature" not in plain
    assert feature_width("tiny") == 32 and feature_width("resnet18") == 256 and feature_width("unet") == 32


def _round1(cfg):
    return read_metrics(cfg.output.dir)[1]


def test_two_tiny_rounds(tiny_runs):
    _, cfg, res = tiny_runs.in_process("method=fedproto", "train.rounds=2")  # test_arrangements' reference
    recs = read_metrics(cfg.output.dir)
    names = ("client0", "client1")
    for n in names:  # warm-up: nothing crosses, no regulariser; then one prototype per class each way
        assert recs[0]["bytes"][n] == {"up": 0, "down": 0}
        assert recs[1]["bytes"][n] == {"up": 2 * 32 * 4 + 2, "down": 2 * 32 * 4 + 2}  # (2,D) f32 + (2,) bool
        assert "sup_proto" not in recs[0]["loss"][n]
        assert math.isfinite(recs[1]["loss"][n]["sup_proto"]) and recs[1]["loss"][n]["sup_proto"] > 0
        assert math.isfinite(recs[1]["loss"][n]["unl_proto"])


def test_different_widths_projected_or_refused(tmp_path):
    # tiny (32) and resnet18 (256): the tiny client's feature is projected to fedproto.dim (256)
    cfg, _ = run_tiny(tmp_path, "w", "method=fedproto", "train.rounds=2", "models.clients=[tiny, resnet18]",
                      "fedproto.weighting=counts", "fedproto.level=batch")
    for n in ("client0", "client1"):  # counts: (2,) int64 instead of (2,) bool up; down unchanged
        assert _round1(cfg)["bytes"][n] == {"up": 2 * 256 * 4 + 2 * 8, "down": 2 * 256 * 4 + 2}
        assert math.isfinite(_round1(cfg)["loss"][n]["sup_proto"])
    with pytest.raises(ConfigError, match="fedproto.projection"):
        load_config(None, tiny_overrides(tmp_path, "off", "method=fedproto", "models.clients=[tiny, resnet18]",
                                         "fedproto.projection=off"))
