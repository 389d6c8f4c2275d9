"""ELN (``fed/methods/eln.py``): the ELN target and its pos/neg re-weighting, the aux-decoder gate, the EMA
update, ELN pseudo-labels and the pixel contrastive loss by hand; tiny runs in process (warm-up, one ELN
round, SSL rounds: losses and bytes; the clients mapping). On Flower and resumed: test_arrangements.py."""
import math

import pytest
import torch

from conftest import run_tiny
from fed.common.weights import ema_update
from fed.methods.eln import (ELNet, aux_gate, eln_input, eln_loss, eln_pseudo_label, eln_target, pixel_contrastive,
                     projection_head)
from utils.losses import IGNORE

pytestmark = pytest.mark.usefixtures("one_thread")

T = torch.tensor
ELN = ("method=eln", "eln.arch=tiny", "eln.eln_rounds=1")


def test_eln_target_and_reweighting_by_hand():
    # 4 pixels, prediction argmax [1, 0, 1, 1], ground truth [1, 0, 1, 0] -> target [1, 1, 1, 0]
    pred = T([[[[0.0, 1.0, 0.0, 0.0]], [[1.0, 0.0, 1.0, 1.0]]]])  # (1, 2, 1, 4)
    y = T([[[1, 0, 1, 0]]])
    assert eln_target(pred, y).flatten().tolist() == [1.0, 1.0, 1.0, 0.0]
    # ELN logits [0, 0, 0, 2]: positives BCE(0, 1) = ln 2; the negative BCE(2, 0) = ln(1 + e^2) = 2.126928,
    # times #pos/#neg = 3/1; mean over the 4 pixels: (3 ln 2 + 3 * 2.126928) / 4
    logit = T([[[[0.0, 0.0, 0.0, 2.0]]]])
    assert eln_loss(logit, pred, y).item() == pytest.approx((3 * math.log(2) + 3 * math.log1p(math.e ** 2)) / 4)
    # all correct: no negative, ratio 3/max(0, 1) irrelevant; mean ln 2
    assert eln_loss(torch.zeros(1, 1, 1, 4), pred, pred.argmax(1)).item() == pytest.approx(math.log(2))


def test_aux_gate_by_hand():
    factors = (20.0, 50.0)
    # main CE 1.0: aux CEs 10 < 20 and 30 < 50: neither counts
    assert aux_gate([10.0, 30.0], 1.0, factors) == [False, False]
    # main CE 0.5: 10 >= 10 (equality counts) and 30 >= 25
    assert aux_gate([10.0, 30.0], 0.5, factors) == [True, True]
    # main CE 0.4: 10 >= 8 but 19 < 20
    assert aux_gate([10.0, 19.0], 0.4, factors) == [True, False]


def test_ema_update_by_hand():
    teacher, student = torch.nn.BatchNorm1d(1), torch.nn.BatchNorm1d(1)
    with torch.no_grad():
        teacher.weight.fill_(1.0)
        student.weight.fill_(0.0)
        student.running_mean.fill_(2.0)
        student.num_batches_tracked.fill_(7)
    ema_update(teacher, student, 0.995, buffers="ema")
    assert teacher.weight.item() == pytest.approx(0.995)  # 0.995 * 1 + 0.005 * 0
    assert teacher.running_mean.item() == pytest.approx(0.01)  # 0.995 * 0 + 0.005 * 2
    assert teacher.num_batches_tracked.item() == 7  # integer buffers are copied
    ema_update(teacher, student, 0.995, buffers="ema")
    assert teacher.weight.item() == pytest.approx(0.995 ** 2)


def test_pseudo_labels_kept_where_eln_says_right():
    teacher = T([[[[0.0, 2.0, 0.0]], [[1.0, 0.0, 1.0]]]])  # argmax [1, 0, 1]
    eln = T([[[[0.0, -0.1, 3.0]]]])  # sigmoid [0.5, 0.475, 0.95]
    # kept where round(sigmoid) = 1, as the official code: 0.5 rounds to 0 (torch rounds half to even)
    assert torch.round(torch.sigmoid(eln)).tolist() == [[[[0.0, 0.0, 1.0]]]]
    assert eln_pseudo_label(teacher, eln, 0.5).tolist() == [[[IGNORE, IGNORE, 1]]]


def test_eln_input_channels():
    # [image (3), entropy (1), logits (2)]: logits [0, 0] -> entropy ln 2; [0, ln 3] -> p = (1/4, 3/4),
    # entropy -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.562335
    x = torch.full((1, 3, 1, 2), 0.5)
    logits = T([[[[0.0, 0.0]], [[0.0, math.log(3.0)]]]])
    inp = eln_input(x, logits)
    assert inp.shape == (1, 6, 1, 2)
    assert torch.equal(inp[:, :3], x) and torch.equal(inp[:, 4:], logits)
    assert inp[0, 3, 0].tolist() == pytest.approx([math.log(2), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))])


def test_pixel_contrastive_by_hand():
    """The official form: per class c, -log(P_c / (P_c + Q_c)) / n_c, P_c and Q_c sums of exp(a_i . o_j / T)
    over anchors of c and candidates of c (P) or of other classes (Q); mean over the classes present."""
    e2 = math.e ** 2  # T = 0.5: exp(1 / 0.5) for aligned unit vectors, exp(0) = 1 for orthogonal ones
    z = T([[1.0, 0.0], [0.0, 1.0]])
    # classes 0 and 1, one pixel each: class 0: P = e^2, Q = 1 -> log(1 + e^-2); class 1 the same
    assert pixel_contrastive(z, z, T([0, 1]), 0.5).item() == pytest.approx(math.log1p(1 / e2))
    # the anchors are the first argument: anchors [[1, 0], [1, 0]] against candidates z:
    # class 0: P = s_00 = e^2, Q = s_01 = 1 -> log(1 + e^-2); class 1: P = s_11 = 1, Q = s_10 = e^2 -> log(1 + e^2)
    a = T([[1.0, 0.0], [1.0, 0.0]])
    assert pixel_contrastive(a, z, T([0, 1]), 0.5).item() == pytest.approx((math.log1p(1 / e2) + math.log1p(e2)) / 2)
    # swapped: anchors z against candidates a: class 0: P = Q = e^2; class 1: P = Q = 1 -> log 2 each
    assert pixel_contrastive(z, a, T([0, 1]), 0.5).item() == pytest.approx(math.log(2))
    # n_c divides: pixels [1,0], [1,0], [0,1] of classes 0, 0, 1: class 0: P = 4 e^2, Q = 2, n = 2;
    # class 1: P = e^2, Q = 2, n = 1
    z3 = T([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    want = (math.log1p(2 / (4 * e2)) / 2 + math.log1p(2 / e2)) / 2
    assert pixel_contrastive(z3, z3, T([0, 0, 1]), 0.5).item() == pytest.approx(want)
    # vectors are normalised first: a scaled anchor changes nothing
    assert pixel_contrastive(3 * z3, z3, T([0, 0, 1]), 0.5).item() == pytest.approx(want)
    # one class only: no negatives, Q = 1e-8 -> about 0; an ignored pixel leaves both sets
    assert pixel_contrastive(z, z, T([0, 0]), 0.5).item() == pytest.approx(0.0, abs=1e-7)
    assert pixel_contrastive(z3, z3, T([0, IGNORE, 1]), 0.5).item() == pytest.approx(math.log1p(1 / e2))
    assert pixel_contrastive(z, z, T([IGNORE, IGNORE]), 0.5).item() == 0.0


def test_crops_take_one_location_of_the_whole_batch():
    from fed.methods.eln import crop_boxes
    from utils.rng import generator

    boxes = crop_boxes(200, 24, 20, 8, generator(1, "crops"))
    assert all(len(b) == 3 and b[2] == 8 and 0 <= b[0] <= 16 and 0 <= b[1] <= 12 for b in boxes)
    assert {b[0] for b in boxes} == set(range(17)) and {b[1] for b in boxes} == set(range(13))  # every offset
    assert crop_boxes(3, 5, 5, 32, generator(1)) == [(0, 0, 5)] * 3  # capped at the map: the whole map
    assert {b[0] for b in crop_boxes(50, 6, 5, 32, generator(1))} == {0, 1} and all(b[2] == 5 for b in crop_boxes(5, 6, 5, 32, generator(1)))
    assert crop_boxes(8, 24, 20, 8, generator(1, "crops")) == crop_boxes(8, 24, 20, 8, generator(1, "crops"))


def _bytes(module):
    return sum(v.numel() * v.element_size() for v in module.state_dict().values())


@pytest.fixture(scope="module")
def ref(tiny_runs):
    """4 tiny rounds in process: warm-up, one ELN round, two SSL rounds (test_arrangements' reference)."""
    return tiny_runs.in_process(*ELN, "train.rounds=4")


def test_tiny_rounds_server_mapping(ref):
    import networks
    from utils.logger import read_metrics

    _, cfg, _ = ref
    recs = read_metrics(cfg.output.dir)
    seg, eln = _bytes(networks.build_model("tiny")), _bytes(ELNet("tiny"))
    proj = _bytes(projection_head(32))
    # round 0 warm-up, round 1 ELN training at the server, rounds 2-3 SSL
    assert "server" not in recs[0]["loss"]
    srv = recs[1]["loss"]["server"]
    assert {"eln_bce", "eln_aux0_ce", "eln_aux1_ce", "eln_aux0_on"} <= set(srv)
    assert all(math.isfinite(v) for v in srv.values())
    for r in (2, 3):
        for n in ("client0", "client1"):
            loss = recs[r]["loss"][n]
            assert {"eln_ce_u", "eln_ce_aug", "eln_contrast", "eln_contrast_aug", "sup_seg"} <= set(loss)
            assert all(math.isfinite(v) for v in loss.values())
    for n in ("client0", "client1"):
        # round 0: the initial weights averaged (one starting model), then the warm-up round's weights
        assert recs[0]["bytes"][n] == {"up": 2 * seg, "down": 2 * seg}
        # the ELN round, the last before the SSL phase: the weights + need_eln (8 bytes) up; the average +
        # the frozen ELN (trained by the server with the new average) down
        assert recs[1]["bytes"][n] == {"up": seg + 8, "down": seg + eln}
        # SSL rounds: student, teacher and both projection heads, each way
        assert recs[2]["bytes"][n] == recs[3]["bytes"][n] == {"up": 2 * seg + 2 * proj, "down": 2 * seg + 2 * proj}


def test_tiny_rounds_clients_mapping(tmp_path):
    import networks
    from utils.logger import read_metrics

    cfg, _ = run_tiny(tmp_path, "elnc", *ELN, "eln.mapping=clients", "eln.contrastive=false", "eln.eln_rounds=2",
                      "train.rounds=4")
    recs = read_metrics(cfg.output.dir)
    seg, eln = _bytes(networks.build_model("tiny")), _bytes(ELNet("tiny"))
    aux = 2 * _bytes(networks.build_model("tiny").classifier)
    for n in ("client0", "client1"):
        for r in (1, 2):
            assert "eln_bce" in recs[r]["loss"][n] and math.isfinite(recs[r]["loss"][n]["eln_bce"])
        assert "eln_ce_u" in recs[3]["loss"][n] and "eln_contrast" not in recs[3]["loss"][n]
        # each ELN round ends with the model, the ELN and the aux decoders averaged, each way; after the
        # last one (round 2) the aux decoders no longer cross, the ELN is averaged (every client uses one)
        assert recs[1]["bytes"][n] == {"up": seg + eln + aux, "down": seg + eln + aux}
        assert recs[2]["bytes"][n] == {"up": seg + eln, "down": seg + eln}
        # SSL round: student and teacher
        assert recs[3]["bytes"][n] == {"up": 2 * seg, "down": 2 * seg}
