"""Every client reply is checked against its step's declaration before it is used (fed/core/replies.py).

The declarations themselves are exercised by every whole run of the suite (a reply that did not fit its
declaration would fail the run); here: each part of the vocabulary refuses what it must, and a client that
sends each kind of bad reply (fed/core/faults.py, ``HSSF_FAULTS``) is that client's failure for the round:
the run goes on, the rounds are marked, and everything else is exactly what it is when that client's step
raises instead (nothing of the bad replies reached any model).
"""
import json

import pytest
import torch

from conftest import run_checkpoints, run_records, run_tiny
from fed.core import faults
from fed.core.replies import (Checker, Context, Fields, Maybe, Nothing, Number, OneOf, Prefixed, ReplyError,
                              Rows, State, Tensor, module_shapes, state_shapes)

pytestmark = pytest.mark.usefixtures("one_thread")


def _ctx(max_rows=None):
    return Context(P=8, S=32, name="client1", arch="tiny", max_rows=max_rows)


def _refused(spec, value, ctx=None) -> str:
    with pytest.raises(ReplyError) as e:
        spec.check(value, ctx or _ctx(), "")
    return str(e.value)


def test_tensor_dims_bind_and_bound_within_one_reply():
    spec = Fields(logits=Tensor("n<=P C S S"), grade=Tensor("n", lo=0, hi=1))
    spec.check({"logits": torch.zeros(8, 2, 32, 32), "grade": torch.rand(8)}, _ctx(), "")
    spec.check({"logits": torch.zeros(3, 2, 32, 32), "grade": torch.rand(3)}, _ctx(), "")
    assert "dim 0 (n) must be 3" in _refused(spec, {"logits": torch.zeros(3, 2, 32, 32), "grade": torch.rand(4)})
    assert "exceeds 8" in _refused(spec, {"logits": torch.zeros(9, 2, 32, 32), "grade": torch.rand(9)})
    assert "dim 3 (S) must be 32" in _refused(spec, {"logits": torch.zeros(2, 2, 32, 31), "grade": torch.rand(2)})
    assert "dim 1 (C) must be 2" in _refused(spec, {"logits": torch.zeros(2, 3, 32, 32), "grade": torch.rand(2)})
    assert "expected 4 dims" in _refused(spec, {"logits": torch.zeros(2, 32, 32), "grade": torch.rand(2)})


def test_tensor_dtype_finiteness_and_range():
    spec = Tensor("n<=P", torch.float32, lo=0, hi=1)
    assert "dtype torch.float64" in _refused(spec, torch.zeros(4, dtype=torch.float64))
    bad = torch.zeros(4)
    bad[2] = float("nan")
    assert "1 non-finite" in _refused(spec, bad)
    bad[2] = float("-inf")
    assert "1 non-finite" in _refused(spec, bad)
    assert "outside [0, 1]" in _refused(spec, torch.tensor([0.5, 1.5]))
    assert "must be a tensor" in _refused(spec, [0.5])
    Tensor("C", torch.bool).check(torch.tensor([True, False]), _ctx(), "")
    assert "outside [0, None]" in _refused(Tensor("C", torch.int64, lo=0), torch.tensor([3, -1]))


def test_fields_maybe_oneof_number():
    spec = Fields(a=Number(int, lo=0), optional={"b": Nothing()})
    spec.check({"a": 3}, _ctx(), "")
    spec.check({"a": 3, "b": None}, _ctx(), "")
    assert "missing ['a']" in _refused(spec, {"b": None})
    assert "unexpected ['c']" in _refused(spec, {"a": 1, "c": 2})
    assert "must be an int" in _refused(spec, {"a": 1.5})
    assert "must be an int" in _refused(spec, {"a": True})
    assert "must be a dict" in _refused(spec, [1])
    assert "not finite" in _refused(Number(), float("inf"))
    Number(lo=0, nan=True).check(float("nan"), _ctx(), "")
    Maybe(spec).check(None, _ctx(), "")
    either = OneOf(Tensor("n<=P C S S"), Tensor("0"))
    either.check(torch.zeros(0), _ctx(), "")
    assert " / " in _refused(either, torch.zeros(1))
    assert "must be None" in _refused(Nothing(), {"a": 1})


def test_state_is_the_clients_own_architecture():
    import networks

    sd = networks.build_model("tiny").state_dict()
    State().check(dict(sd), _ctx(), "")
    assert "missing" in _refused(State(), {k: v for k, v in list(sd.items())[1:]})
    k = next(k for k, v in sd.items() if v.is_floating_point() and v.dim() > 1)
    assert f"[{k!r}] is" in _refused(State(), {**sd, k: sd[k][:1]})
    assert "unexpected ['x']" in _refused(State(), {**sd, "x": torch.zeros(1)})
    nan = sd[k].clone()
    nan.view(-1)[0] = float("nan")
    assert "non-finite" in _refused(State(), {**sd, k: nan})
    params = {n for n, _ in networks.build_model("tiny").named_parameters()}
    State(params_only=True).check({n: sd[n] for n in params}, _ctx(), "")
    # the reference is built on the meta device: no memory, and no draw from torch's generator
    before = torch.get_rng_state()
    ref = module_shapes(lambda: networks.build_model("tiny"))
    assert torch.equal(before, torch.get_rng_state()) and ref == state_shapes("tiny")


def test_prefixed_parts_and_rows():
    import networks

    sd = networks.build_model("tiny").state_dict()
    spec = Prefixed(student=State(), optional={"teacher": State()}, scalars={"need_eln": Number(int, lo=1, hi=1)})
    flat = {f"student.{k}": v for k, v in sd.items()}
    spec.check({**flat, "need_eln": 1}, _ctx(), "")
    assert "unexpected key 'spy.x'" in _refused(spec, {**flat, "spy.x": torch.zeros(1)})
    assert "lacks the part(s) ['student']" in _refused(spec, {f"teacher.{k}": v for k, v in sd.items()})
    row = {"group": "client1", "name": "a.png", "dice": 0.5, "iou": 0.3, "precision": 1.0, "recall": 0.0, "hd95": 2.0}
    Rows().check([row], _ctx(max_rows=1), "")
    assert "more than the site's 1 images" in _refused(Rows(), [row, row], _ctx(max_rows=1))
    assert "not a row of client1" in _refused(Rows(), [{**row, "group": "client0"}])
    assert "outside [0, 1]" in _refused(Rows(), [{**row, "dice": 1.5}])
    assert "not a finite distance" in _refused(Rows(), [{**row, "hd95": float("nan")}])
    assert "unexpected keys ['image']" in _refused(Rows(), [{**row, "image": [1, 2]}])


def test_an_undeclared_reply_must_be_none_and_sizes_are_bounded():
    from fed import load_config
    from fed.core.registry import METHODS

    cfg = load_config(None, ["method=hssf"])
    check = Checker(METHODS["hssf"](cfg), P=8, S=32, archs={"client1": "tiny"}, file_counts={})
    assert check.check("client1", "local", None, {}) is None
    assert "must be None" in check.check("client1", "local", {"x": 1}, {})
    # the wire limit of a step follows from its declaration: 8 x 2 x 32 x 32 fp32 logits, 8 grades
    data = 8 * 2 * 32 * 32 * 4 + 8 * 8
    assert check.max_bytes("client1", "predict_public", {}) == int(data * 1.02) + 256 * 1024
    assert check.max_bytes("client1", "weights", {}) > 0


# --- a client that sends bad replies ---------------------------------------------------------------------

#: one kind per round from round 1 (no warm-up: every round asks for predict_public), for client1 (its
#: round 0 is clean, so it has a best checkpoint to test)
KINDS = ["extra_key", "missing_key", "shape", "dtype", "nan", "inf", "range", "oversize", "not_a_dict"]
FAULT_RUN = ("train.warmup_rounds=0", f"train.rounds={len(KINDS) + 1}", "train.fault_tolerance=skip_client",
             "train.condensation_epochs=1", "train.fusion_epochs=1")


def _faults(kind_of_round):
    return json.dumps([{"client": "client1", "step": "predict_public", "rounds": [r], "kind": k}
                       for r, k in enumerate(kind_of_round, start=1)])


def _without_reasons(records):
    return [{**r, "skipped": sorted(r["skipped"])} for r in records]


@pytest.fixture(scope="module")
def raising_run(tmp_path_factory):
    """The reference: client1's predict_public raises in every round (skip_client)."""
    mp = pytest.MonkeyPatch()
    mp.setenv(faults.ENV, _faults(["raise"] * len(KINDS)))
    try:
        tmp = tmp_path_factory.mktemp("raising")
        cfg, res = run_tiny(tmp, "raising", *FAULT_RUN)
    finally:
        mp.undo()
    return cfg, res


def test_each_kind_of_bad_reply_is_refused_and_nothing_of_it_is_used(tmp_path, monkeypatch, raising_run):
    """client1 sends a different kind of bad reply in each round: every one is refused (logged with the
    site, the step and what is wrong), client1 sits the round out, and checkpoints, metrics and test
    results equal the run in which client1's step raises instead."""
    monkeypatch.setenv(faults.ENV, _faults(KINDS))
    cfg, res = run_tiny(tmp_path, "bad", *FAULT_RUN)
    recs = run_records(cfg)
    assert recs[0]["skipped"] == {}
    for rnd, kind in enumerate(KINDS, start=1):
        why = recs[rnd]["skipped"].get("client1", "")
        assert why.startswith("BadReply: its reply to 'predict_public' is refused"), (kind, why)
        assert "client0" not in recs[rnd]["skipped"]
    log = (tmp_path / "bad" / "train.log").read_text()
    assert log.count("client1 (B) fails and sits this round out: BadReply") == len(KINDS)
    for what in ("unexpected ['smuggled']", "missing ['logits']", "dim 3 (S) must be 32", "dtype torch.float64",
                 "non-finite", "outside [0, 1]", "exceeds", "must be a dict"):
        assert what in log, what
    ref_cfg, ref = raising_run
    assert _without_reasons(recs) == _without_reasons(run_records(ref_cfg))
    assert res["test"] == ref["test"] and res["best"] == ref["best"]
    ca, cb = run_checkpoints(cfg), run_checkpoints(ref_cfg)
    assert ca.keys() == cb.keys() and ca
    assert all(torch.equal(ca[f][k], cb[f][k]) for f in ca for k in ca[f])


def test_a_bad_reply_stops_a_run_without_skip_client(tmp_path, monkeypatch):
    monkeypatch.setenv(faults.ENV, json.dumps([{"client": "client1", "step": "predict_public", "kind": "nan"}]))
    from fed.core.calls import ClientFailure

    with pytest.raises(ClientFailure, match=r"client1: BadReply: its reply to 'predict_public' is refused: "
                                            r"\['logits'\] holds \d+ non-finite"):
        run_tiny(tmp_path, "stop", "train.warmup_rounds=0", "train.rounds=1", "train.condensation_epochs=1",
                 "train.fusion_epochs=1")


def test_bad_replies_are_refused_on_the_flower_simulation(tmp_path, monkeypatch):
    """Faults at a simulated Flower site (its node process spoils the reply; the server checks it on
    arrival): the same refusals and the same run, bit for bit, as in-process."""
    pytest.importorskip("flwr", reason="Flower is not installed: pip install -r requirements-flower.txt")
    kinds = ["nan", "range", "oversize"]
    run = ("train.warmup_rounds=0", f"train.rounds={len(kinds) + 1}", "train.fault_tolerance=skip_client",
           "train.condensation_epochs=1", "train.fusion_epochs=1", "train.worker_threads=1")
    monkeypatch.setenv(faults.ENV, _faults(kinds))
    cfg, res = run_tiny(tmp_path, "bad_sim", *run, engine="flower-sim")
    ref_cfg, ref = run_tiny(tmp_path, "bad_here", *run)
    recs = run_records(cfg, with_bytes=False)
    assert [sorted(r["skipped"]) for r in recs] == [[]] + [["client1"]] * len(kinds)
    assert all(r["skipped"]["client1"].startswith("BadReply: its reply to 'predict_public'") for r in recs[1:])
    # the oversized reply is refused on the wire, before it is decoded; in process, by its shape
    assert "more than the step can produce" in recs[3]["skipped"]["client1"]
    assert _without_reasons(recs) == _without_reasons(run_records(ref_cfg, with_bytes=False))
    assert res["test"] == ref["test"] and res["best"] == ref["best"]
    ca, cb = run_checkpoints(cfg), run_checkpoints(ref_cfg)
    assert ca.keys() == cb.keys() and all(torch.equal(ca[f][k], cb[f][k]) for f in ca for k in ca[f])
