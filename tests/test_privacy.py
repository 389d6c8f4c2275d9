"""What leaves a site: every client -> server reply of a whole run, checked for keys and shapes.

Every reply a client party produces goes through :func:`fed.core.calls.call` (in process, worker processes
and the Flower site alike), so wrapping it records each client's reply to each step of a run. A reply
carries only what the method declares:

- ``hssf``: ``predict_public`` -> ``{"logits": (N, 2, H, W), "grade": (N,)}``, N the public pass size
  (never a local image, label or anything shaped like the site's local data); every other method step
  replies nothing.
- ``lssl``: ``send_weights`` -> the model's state dict, exactly its keys; ``local`` (training) and
  ``receive`` (loading the average) reply nothing.
- ``local``: nothing at all.

Outside the method, the *run* asks every client for (stated here, so that a change shows up):

- ``evaluate`` (val/test during the run) and ``test_weights`` (the final test: the site scores the
  weights it is sent on its own test split): per-image metric rows ``{"group", "name", dice, iou,
  precision, recall[, hd95]}``: image names and numbers only -- the run-level messages that name local
  images (the final test's overlays stay at the site);
- ``end_round``: the mean loss terms and the learning rate (numbers);
- ``weights``: the client's model state dict, for the server to keep the best/last client checkpoints
  (``fed.core.run``): the run, not the method, moves the client models (hssf and local included);
- ``begin_round``, ``rollback``, ``save_state``, ``load_state``: nothing.
"""
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from fed import load_config

pytestmark = pytest.mark.usefixtures("one_thread")

NUMBER = (int, float, type(None))
RUN_LEVEL = {"evaluate", "test_weights", "end_round", "weights", "keep_weights", "kept_weights", "begin_round", "rollback",
             "save_state", "load_state"}


@pytest.fixture
def recorded(monkeypatch):
    """``[(party, step, reply)]`` of every client step run in this process."""
    import fed.core.calls as R

    seen, real = [], R.call

    def spy(method, party, step, msg, kw):
        reply = real(method, party, step, msg, kw)
        if party.name != "server":
            seen.append((party.name, step, reply))
        return reply

    monkeypatch.setattr(R, "call", spy)
    return seen


def _run(tmp_path, name, *extra, rounds=2):
    from fed.core.run import train

    cfg = load_config(None, tiny_overrides(tmp_path, name, *extra, rounds=rounds))
    train(cfg, progress=False)
    return cfg


def _tensors(obj, path=""):
    if torch.is_tensor(obj):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}/{i}")


def _local_names(cfg) -> set:
    from datasets.federation import load_federation

    data = load_federation(cfg, progress=False)
    return {n for items in data.clients for split in items.values() for _, _, n in split}


def _check_run_level(cfg, seen, model_keys):
    """The run-level replies: names and numbers only (evaluate), numbers (end_round), the state dict
    (weights), nothing (the rest)."""
    local = _local_names(cfg)
    names_sent = set()
    for party, step, reply in seen:
        if step not in RUN_LEVEL:
            continue
        if step in ("evaluate", "test_weights"):
            assert isinstance(reply, list) and reply, (party, step)
            for row in reply:
                assert set(row) <= {"group", "name", "dice", "iou", "precision", "recall", "hd95"}, row
                assert row["group"] == party and isinstance(row["name"], str)
                assert all(isinstance(v, NUMBER) for k, v in row.items() if k not in ("group", "name")), row
                names_sent.add(row["name"])
        elif step == "end_round":
            assert set(reply) == {"loss", "lr"} and isinstance(reply["lr"], float)
            assert all(isinstance(k, str) and isinstance(v, float) for k, v in reply["loss"].items())
        elif step in ("weights", "kept_weights"):
            assert set(reply) == model_keys[party]
        else:
            assert reply is None, (party, step)
    assert names_sent and names_sent <= local  # the evaluated images' names: the site's own val/test files


def _model_keys(cfg):
    import networks

    keys = set(networks.build_model(cfg.models.server, pretrained=False).state_dict())
    return {f"client{k}": set(networks.build_model(a, pretrained=False).state_dict())
            for k, a in enumerate(cfg.models.clients)} | {"server": keys}


def test_hssf_clients_send_only_public_predictions(tmp_path, recorded):
    cfg = _run(tmp_path, "hssf", "train.warmup_rounds=1")
    d = cfg.data
    from datasets.federation import load_federation

    n_public = len(load_federation(cfg, progress=False).public)
    N = n_public // d.batch_size * d.batch_size  # one keyed pass over the public set (drop_last)
    method = [(p, s, r) for p, s, r in recorded if s not in RUN_LEVEL]
    steps = {s for _, s, _ in method}
    assert steps == {"predict_public", "fuse", "local"}
    preds = [r for _, s, r in method if s == "predict_public"]
    # after the warm-up round: every client, every condensation pass
    assert len(preds) == len(d.clients) * cfg.train.condensation_epochs
    for reply in preds:
        assert set(reply) == {"logits", "grade"}
        assert reply["logits"].shape == (N, 2, d.size, d.size) and reply["logits"].dtype == torch.float32
        assert reply["grade"].shape == (N,)
        assert ((reply["grade"] >= 0) & (reply["grade"] <= 1)).all()  # a pixel accuracy
    for _, s, r in method:
        if s != "predict_public":
            assert r is None, s
        for path, t in _tensors(r):  # nothing image-like (3 channels) or mask-like (N,H,W) / (N,1,H,W)
            assert t.dim() != 4 or t.shape[1] == 2, path
            assert t.dim() != 3 and not (t.dim() == 4 and t.shape[1] == 1), path
            assert t.shape[0] == N, path
    _check_run_level(cfg, recorded, _model_keys(cfg))


def test_lssl_clients_send_only_their_state_dict(tmp_path, recorded):
    cfg = _run(tmp_path, "lssl", "method=lssl", rounds=1)
    keys = _model_keys(cfg)
    method = [(p, s, r) for p, s, r in recorded if s not in RUN_LEVEL]
    assert {s for _, s, _ in method} == {"send_weights", "local", "receive"}
    for party, s, r in method:
        if s == "send_weights":
            assert set(r) == keys[party] and all(torch.is_tensor(v) for v in r.values())
        else:
            assert r is None
    _check_run_level(cfg, recorded, keys)


def test_local_clients_send_nothing(tmp_path, recorded):
    cfg = _run(tmp_path, "local", "method=local", rounds=1)
    method = [(p, s, r) for p, s, r in recorded if s not in RUN_LEVEL]
    assert {s for _, s, _ in method} == {"local"} and all(r is None for _, _, r in method)
    _check_run_level(cfg, recorded, _model_keys(cfg))
    assert Path(cfg.output.dir, "results.json").exists()


@pytest.mark.slow
def test_on_the_flower_simulation_the_wire_carries_the_same(tmp_path, monkeypatch):
    """The replies as Flower delivers them (HSSF, two rounds, ``--engine flower-sim``): each site's
    RecordDict holds a ``call`` record (the step, the serving process's pid, whether it read its
    state from disk), and a payload only where the step has one; arrays only in ``predict_public``
    (``logits``, ``grade``) and ``weights`` (the state dict, the run's checkpoints); the setup reply
    names the site (name, index, site, arch) and its number of files per split."""
    pytest.importorskip("flwr")
    pytest.importorskip("ray")
    import json

    import fed.flower.engine as E
    from fed.core.run import train

    seen, real = [], E.decode_payload

    def spy(content):
        call = dict(content["call"]) if "call" in content else {}
        arrays = {k: tuple(a.shape) for k, a in content["arrays"].items()} if "arrays" in content else {}
        tree = json.loads(content["payload"]["tree"]) if "payload" in content else None
        seen.append((call.get("step"), set(content.keys()), set(call), arrays, tree))
        return real(content)

    monkeypatch.setattr(E, "decode_payload", spy)
    cfg = load_config(None, tiny_overrides(tmp_path, "sim", "train.warmup_rounds=1", "train.worker_threads=1"))
    train(cfg, progress=False, engine="flower-sim")
    d = cfg.data
    N = 8 // d.batch_size * d.batch_size
    replies = [s for s in seen if s[0] not in ("hello", "setup")]
    hellos = [t for step, *_, t in seen if step == "hello"]
    setups = [t for step, *_, t in seen if step == "setup"]
    # the hello reply: the site's name and architecture, and whether a long-lived process keeps its party
    assert len(hellos) == 2 and all(set(t) == {"site", "arch", "keeps"} and type(t["keeps"]) is bool
                                    for t in hellos)
    # the setup reply: who the site is, and how many files of each split it has (numbers, no names)
    assert len(setups) == 2 and all(set(t) == {"name", "index", "site", "arch", "files"} for t in setups)
    assert all(set(t["files"]) == {"labeled_train", "unlabeled_train", "val_list", "test_list"}
               and all(type(v) is int for v in t["files"].values()) for t in setups)
    assert {s[0] for s in replies} >= {"predict_public", "fuse", "local", "evaluate", "end_round"}
    for step, records, call, arrays, tree in replies:
        assert call == {"step", "pid", "restored"} and records <= {"call", "payload", "arrays"}
        if step == "predict_public":
            assert arrays == {"logits": (N, 2, d.size, d.size), "grade": (N,)}
        elif step in ("weights", "kept_weights"):
            assert set(arrays) == _model_keys(cfg)["client0"]
        elif step == "test_weights":  # rows of names and numbers, like evaluate's
            assert arrays == {} and all(set(r) <= {"group", "name", "dice", "iou", "precision", "recall", "hd95"}
                                        for r in tree), tree
        else:
            assert arrays == {}, step
        if step in ("fuse", "local", "begin_round", "save_state", "rollback", "load_state", "keep_weights"):
            assert tree is None, step
        if step == "evaluate":
            assert all(set(r) <= {"group", "name", "dice", "iou", "precision", "recall", "hd95"} for r in tree)
