"""Shared-model (FedAvg) methods score what each round trained: the model evaluated after round ``r``,
and the best/last checkpoints saved from it, are the average of the clients' weights *after* round
``r``'s local training (not the average the round started from).

Every client step goes through :func:`fed.core.calls.call`; wrapping it records each client's model right
after its ``local`` step (its post-local weights) and the model it scores in each ``evaluate`` call.
"""
from pathlib import Path

import pytest
import torch

from conftest import run_tiny
from fed.common.weights import fedavg

pytestmark = pytest.mark.usefixtures("one_thread")

CLIENTS = ("client0", "client1")


@pytest.fixture
def recorded(monkeypatch):
    """``{"local": {(rnd, client): state}, "val": {(rnd, client): state}}``: each client's model after its
    local step, and the model it scored on its val split (in the round of the last local step)."""
    import fed.core.calls as R

    seen = {"local": {}, "val": {}}
    real, now = R.call, {"rnd": None}

    def snap(model):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def spy(method, party, step, msg, kw):
        reply = real(method, party, step, msg, kw)
        if party.name != "server" and step == "local":
            now["rnd"] = kw["rnd"]
            seen["local"][kw["rnd"], party.name] = snap(party.model)
        if party.name != "server" and step == "evaluate" and kw.get("split") == "val":
            seen["val"][now["rnd"], party.name] = snap(method.eval_model(party))
        return reply

    monkeypatch.setattr(R, "call", spy)
    return seen


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method, extra, rounds", [
    ("lssl", (), 3),
    ("mean_teacher", ("mean_teacher.zero_steps=0",), 2),
    ("eln", ("eln.arch=tiny", "eln.eln_rounds=1"), 3),  # warm-up, ELN round, SSL round
])
def test_each_round_scores_the_average_after_its_local_training(tmp_path, recorded, method, extra, rounds):
    cfg, res = run_tiny(tmp_path, method, f"method={method}", f"train.rounds={rounds}", *extra)
    post = {r: fedavg([recorded["local"][r, n] for n in CLIENTS]) for r in range(rounds)}
    for r in range(rounds):
        for n in CLIENTS:  # every client scores the average of the round's post-local weights
            assert _same(recorded["val"][r, n], post[r]), (r, n)
        if r:  # the round trained: the average it started from is another model
            assert not _same(post[r], post[r - 1])
    ck = Path(cfg.output.dir) / "checkpoints"
    load = lambda name: torch.load(ck / name, map_location="cpu", weights_only=True)  # noqa: E731
    best = res["best"]["all"]["round"]
    assert 0 <= best < rounds
    for which, r in (("best", best), ("last", rounds - 1)):
        assert _same(load(f"global_tiny_{which}.pth"), post[r]), which
        for k in range(len(CLIENTS)):  # the clients' checkpoints hold the same global model
            assert _same(load(f"tiny_{k}_{which}.pth"), post[r]), (which, k)
