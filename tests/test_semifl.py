"""SemiFL (``fed/methods/semifl.py``): fix-set selection, the mixup loss and the server momentum step by hand;
two tiny rounds in process (losses, bytes). On Flower and resumed: test_arrangements.py."""
import math

import pytest
import torch

from fed.methods.semifl import fix_select, mixup_lambda, semifl_loss, server_momentum_step
from utils.losses import IGNORE, masked_ce

pytestmark = pytest.mark.usefixtures("one_thread")

T = torch.tensor
SEMIFL = ("method=semifl", "semifl.local_epochs=1", "semifl.server_epochs=1")


def _logits(d):
    """2-class logits [0, d] per pixel: p(class 1) = sigmoid(d)."""
    d = T(d, dtype=torch.float32)
    return torch.stack([torch.zeros_like(d), d], dim=1)


def test_fix_set_selection():
    # image 0: d = 3 -> p1 = sigmoid(3) = 0.9526 >= 0.95 (class 1, kept); d = 2 -> 0.8808 (ignored);
    #          d = -4 -> p0 = sigmoid(4) = 0.9820 (class 0, kept)
    # image 1: d = 1 -> 0.7311 everywhere: no confident pixel, the image is not kept
    logits = _logits([[[3.0, 2.0, -4.0]], [[1.0, 1.0, 1.0]]])
    keep, fix, hard = fix_select(logits, 0.95)
    assert keep.tolist() == [True, False]
    assert fix.tolist() == [[[1, IGNORE, 0]], [[IGNORE] * 3]]
    assert hard.tolist() == [[[1, 1, 0]], [[1, 1, 1]]]
    # the threshold is inclusive: p = 0.95 exactly (d = ln 19) is kept
    keep, fix, _ = fix_select(_logits([[[math.log(19.0)]]]).double(), 0.95)
    assert keep.tolist() == [True]


def test_mixup_loss_by_hand():
    # fix: zero logits on 2 pixels, labels [1, IGNORE] -> CE = ln 2 over the one valid pixel
    out_fix = torch.zeros(1, 2, 1, 2)
    y_fix = T([[[1, IGNORE]]])
    # mix: logits [0, ln 3] on 2 pixels: p1 = 3/4, CE(class 1) = ln 4/3, CE(class 0) = ln 4
    out_mix = _logits([[[math.log(3.0), math.log(3.0)]]])
    y_a = T([[[1, IGNORE]]])  # the fix image's masked pixels stay ignored in the lam term
    y_b = T([[[0, 1]]])  # the partner's full hard map
    lam = 0.25
    fix, mix = semifl_loss(out_fix, y_fix, out_mix, y_a, y_b, lam)
    assert fix.item() == pytest.approx(math.log(2))
    # lam * ln(4/3) + (1 - lam) * (ln 4 + ln 4/3) / 2
    assert mix.item() == pytest.approx(0.25 * math.log(4 / 3) + 0.75 * (math.log(4) + math.log(4 / 3)) / 2)
    assert masked_ce(out_fix, torch.full((1, 1, 2), IGNORE), over="kept").item() == 0.0  # nothing valid: 0, not NaN


def test_mixup_lambda_is_keyed():
    a = mixup_lambda(0.75, 3, 1, "client0", "mixup", 0, 0)
    assert a == mixup_lambda(0.75, 3, 1, "client0", "mixup", 0, 0) and 0 < a < 1
    assert a != mixup_lambda(0.75, 3, 1, "client0", "mixup", 0, 1)


def test_server_momentum_step_two_rounds_by_hand():
    # round 1: global 1.0, client average 0.6 -> d = 0.4, buf = 0.4, new = 1.0 - 0.4 = 0.6
    new, buf = server_momentum_step({"w": T([1.0])}, {"w": T([0.6])}, None, lr=1.0, momentum=0.5)
    assert new["w"].item() == pytest.approx(0.6) and buf["w"].item() == pytest.approx(0.4)
    # the server fine-tunes 0.6 -> 0.7; round 2: average 0.5 -> d = 0.2, buf = 0.5 * 0.4 + 0.2 = 0.4,
    # new = 0.7 - 0.4 = 0.3
    new, buf = server_momentum_step({"w": T([0.7])}, {"w": T([0.5])}, buf, lr=1.0, momentum=0.5)
    assert new["w"].item() == pytest.approx(0.3) and buf["w"].item() == pytest.approx(0.4)
    # torch's SGD(lr 1, momentum 0.5) with the pseudo-gradient global - average gives the same
    p = torch.nn.Parameter(T([1.0]))
    opt = torch.optim.SGD([p], lr=1.0, momentum=0.5)
    for fine_tuned, avg in ((1.0, 0.6), (0.7, 0.5)):
        with torch.no_grad():
            p.fill_(fine_tuned)
        p.grad = p.detach() - avg
        opt.step()
    assert p.item() == pytest.approx(0.3)


def _state_bytes(sd):
    return sum(v.numel() * v.element_size() for v in sd.values())


@pytest.fixture(scope="module")
def ref(tiny_runs):
    """3 tiny rounds in process: warm-up, then two rounds of clients (the server momentum used twice);
    test_arrangements' reference."""
    return tiny_runs.in_process(*SEMIFL, "train.rounds=3")


def test_tiny_rounds(ref):
    import networks
    from utils.logger import read_metrics

    _, cfg, _ = ref
    recs = read_metrics(cfg.output.dir)
    sd = _state_bytes(networks.build_model("tiny").state_dict())
    # round 0 (warm-up): the server fine-tunes and broadcasts; nothing goes up
    assert set(recs[0]["loss"]) == {"server"}
    assert all(b["up"] == 0 and b["down"] == sd for b in recs[0]["bytes"].values())
    # rounds 1, 2: clients train on fix + mix batches, send their weights, receive the next global model
    for r in (1, 2):
        for n in ("client0", "client1"):
            loss = recs[r]["loss"][n]
            assert {"semifl_fix", "semifl_mix", "semifl_kept"} <= set(loss)
            assert all(math.isfinite(v) for v in loss.values())
            assert recs[r]["bytes"][n] == {"up": sd, "down": sd}
        assert math.isfinite(recs[r]["loss"]["server"]["sup_seg"])


def test_server_aggregate_steps_parameters_and_averages_buffers():
    from types import SimpleNamespace

    from fed.methods.semifl import SemiFL

    model = torch.nn.BatchNorm1d(1)  # parameters weight, bias; buffers running_mean, running_var, count
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(0.0)
    server = SimpleNamespace(model=model, extra={})
    cfg = SimpleNamespace(semifl=SimpleNamespace(server_lr=1.0, server_momentum=0.5))

    def client(w, b, mean):
        return {"weight": T([w]), "bias": T([b]), "running_mean": T([mean]), "running_var": T([1.0]),
                "num_batches_tracked": T(4)}

    # round 1: average weight (0.4 + 0.8) / 2 = 0.6, bias (0.2 + 0.0) / 2 = 0.1: d = (0.4, -0.1) -> (0.6, 0.1)
    SemiFL(cfg).aggregate(server, [client(0.4, 0.2, 1.0), client(0.8, 0.0, 3.0)])
    assert model.weight.item() == pytest.approx(0.6) and model.bias.item() == pytest.approx(0.1)
    assert model.running_mean.item() == pytest.approx(2.0)  # buffers: the plain average
    # the server fine-tunes weight 0.6 -> 0.7; round 2: average 0.5 -> d = 0.2, buf = 0.5 * 0.4 + 0.2 = 0.4,
    # weight 0.7 - 0.4 = 0.3; bias: average 0.1 -> d = 0, buf = 0.5 * -0.1 = -0.05, bias 0.1 + 0.05 = 0.15
    with torch.no_grad():
        model.weight.fill_(0.7)
    SemiFL(cfg).aggregate(server, [client(0.5, 0.1, 0.0), client(0.5, 0.1, 0.0)])
    assert model.weight.item() == pytest.approx(0.3) and model.bias.item() == pytest.approx(0.15)
    assert server.extra["momentum"]["weight"].item() == pytest.approx(0.4)


def test_a_clipped_step_clips_the_gradient_norm(tmp_path):
    """``Party.step(loss, clip)`` (SemiFL's clients and the server's fine-tuning): the gradient that the
    optimizer sees has norm ``clip`` when it was larger, and is untouched when it was smaller."""
    from conftest import tiny_overrides
    from fed import load_config
    from fed.core.party import Party
    from utils.device import Amp

    cfg = load_config(None, tiny_overrides(tmp_path, "clip"))
    amp = Amp.for_device(torch.device("cpu"), False, False)
    party = Party("client0", "linear", torch.nn.Linear(3, 1, bias=False), cfg, amp, {})
    x = torch.tensor([[3.0, 4.0, 0.0]])
    party.step((party.model(x) * 10).sum(), clip=1.0)  # gradient (30, 40, 0): norm 50 -> clipped to 1
    assert party.model.weight.grad[0].tolist() == pytest.approx([0.6, 0.8, 0.0])
    party.step((party.model(x) * 0.01).sum(), clip=1.0)  # norm 0.05 < 1: as it is
    assert party.model.weight.grad[0].tolist() == pytest.approx([0.03, 0.04, 0.0])
    party.step((party.model(x) * 10).sum())  # no clip
    assert party.model.weight.grad[0].tolist() == pytest.approx([30.0, 40.0, 0.0])
