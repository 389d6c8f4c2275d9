"""The federation on Flower (``--engine flower-sim``): the same runs as in process, bit for bit (each
method's: test_arrangements.py; here the engine's own: its messages, sites, byte counts, actors, resume).

Skipped without Flower (``pip install -r requirements-flower.txt``). Each end-to-end test starts one
Flower simulation (Ray: several seconds); the in-process references use one torch thread, as do the
simulation's client processes (``train.worker_threads=1``).
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="Flower is not installed: pip install -r requirements-flower.txt")
pytest.importorskip("ray", reason="Flower's simulation needs Ray: pip install -r requirements-flower.txt")

from conftest import REFERENCE, assert_same_run, run_tiny, tiny_overrides  # noqa: E402
from fed import load_config  # noqa: E402
from fed.core.run import train  # noqa: E402
from utils.logger import read_metrics  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # bit-identical comparisons: the same threads throughout



# --- the encoding -------------------------------------------------------------------------------------

def _same(a, b) -> bool:
    if torch.is_tensor(a):
        return (torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return type(b) is float and (math.isnan(a) and math.isnan(b) or a == b and math.copysign(1, a) == math.copysign(1, b))
    return type(a) is type(b) and a == b


def test_messages_round_trip_bit_for_bit():
    from flwr.app import ConfigRecord, RecordDict

    from fed.flower.codec import content_bytes, decode_kw, decode_payload, encode_kw, encode_payload

    g = torch.Generator().manual_seed(0)
    bn = torch.nn.BatchNorm2d(3).state_dict()  # num_batches_tracked: a 0-dim int64
    payload = {
        "logits": torch.randn(3, 2, 4, 4, generator=g), "grade": torch.rand(3, generator=g),
        "bf16": torch.randn(5, generator=g).bfloat16(), "half": torch.randn(2, generator=g).half(),
        "scalar_bf16": torch.tensor(1.5).bfloat16(), "transposed": torch.randn(4, 3, generator=g).t(),
        "empty": torch.zeros(0, 3), "mask": torch.tensor([True, False]),
        "weights": bn, "odd/name": {"a/b": torch.ones(1)},
        "rows": [{"group": "client0", "dice": 0.1 + 0.2, "hd95": None, "nan": float("nan"), "neg": -0.0,
                  "inf": float("-inf")}],
        "tuple": (1, 2.5, None, "s", True), "$dollar": {"$t": 1}, "numpy": np.arange(3, dtype=np.int16),
    }
    content = RecordDict({"call": ConfigRecord({"step": "x"})})
    encode_payload(payload, content)
    back = decode_payload(content)
    assert list(back) == list(payload)
    for k in payload:
        assert _same(payload[k], back[k]), k
    # a state dict is one flat ArrayRecord under its own keys; dtypes NumPy lacks travel raw
    arrays = content["arrays"]
    assert {f"weights/{k}" for k in bn} <= set(arrays)
    assert arrays["bf16"].stype == "torch.raw" and arrays["bf16"].dtype == "torch.bfloat16"
    assert arrays["logits"].stype == "numpy.ndarray" and arrays["logits"].dtype == "float32"
    assert content_bytes(content) >= 3 * 2 * 16 * 4 + 3 * 4
    # keyword arguments: scalars as themselves, Path and None named in the call record
    call = ConfigRecord({"step": "s"})
    kw = {"rnd": 3, "kl_theta": 0.5, "warm": False, "split": "val", "folder": Path("/x/y"), "none": None}
    msg = RecordDict({"call": call, "kw": encode_kw(kw, call)})
    assert decode_kw(msg) == kw and isinstance(decode_kw(msg)["folder"], Path)
    with pytest.raises(TypeError):
        encode_kw({"bad": [1, 2]}, ConfigRecord())
    with pytest.raises(TypeError):
        encode_payload({"obj": object()}, RecordDict())


def test_engine_flag_and_choice():
    import train as train_py
    from fed.core.runner import make_runner

    assert train_py.parse_args([]).engine == "inprocess"
    assert train_py.parse_args(["--engine", "flower-sim"]).engine == "flower-sim"
    with pytest.raises(SystemExit):
        train_py.parse_args(["--engine", "flower"])
    with pytest.raises(ValueError, match="engine must be one of"):
        make_runner(None, None, engine="grpc")


# --- the engine's reading of Flower's errors ----------------------------------------------------------------

def test_flower_errors_that_mean_a_site_is_gone_lose_it_and_others_fail_the_step():
    """A site killed while it uploads its reply leaves Flower's ``MESSAGE_UNAVAILABLE`` (its reply's objects
    never came): that site is lost, as for a node that is down, and the run goes on without it; an
    exception raised in the site's ClientApp is that site's failure."""
    import types

    from flwr.app import Error, Metadata, RecordDict
    from flwr.app.message import make_message
    from flwr.common.constant import ErrorCode

    from fed.flower.engine import FlowerHost

    codes = {"a": ErrorCode.MESSAGE_UNAVAILABLE, "b": ErrorCode.NODE_UNAVAILABLE, "c": ErrorCode.CLIENT_APP_CRASHED,
             "d": ErrorCode.REPLY_MESSAGE_UNAVAILABLE, "e": ErrorCode.CLIENT_APP_RAISED_EXCEPTION}

    class Grid:
        def push_messages(self, msgs):
            return [f"id-{m.dst}" for m in msgs]

        def pull_messages(self, ids):
            out = []
            for i in ids:
                md = Metadata(run_id=1, message_id="", src_node_id=0, dst_node_id=0, reply_to_message_id=i,
                              group_id="", created_at=0.0, ttl=0, message_type="train")
                reply = make_message(metadata=md, error=Error(code=codes[i[3:]], reason="ValueError: bad" if i == "id-e"
                                                              else "gone"))
                out.append(reply)
            return out

    lost = {}
    host = FlowerHost.__new__(FlowerHost)
    host.runner = types.SimpleNamespace(lost={}, bytes={}, round=0, lose=lambda n, why: lost.setdefault(n, why))
    host.cfg = types.SimpleNamespace(train=types.SimpleNamespace(site_timeout_s=0))
    host.grid, host.poll_s = Grid(), 0.0
    host._message = lambda n, step, msg, kw: types.SimpleNamespace(dst=n, content=RecordDict())
    got = dict(host.calls(list(codes), "fuse", None, {}))
    assert sorted(lost) == ["a", "b", "c", "d"] and all(f"on 'fuse'" in why for why in lost.values())
    assert list(got) == ["e"] and "ValueError: bad" in str(got["e"])


# --- a site, message by message, without a simulation ---------------------------------------------------

def _site_message(step, kind, version, n, payload=None, extra=None, **kw):
    import time

    from flwr.app import ConfigRecord, Message, Metadata, RecordDict

    from fed.flower.codec import encode_kw, encode_payload

    call = ConfigRecord({"step": step, "run": "run1", "version": version, **(extra or {})})
    content = RecordDict({"call": call})
    kwr = encode_kw(kw, call)
    if kwr is not None:
        content["kw"] = kwr
    encode_payload(payload, content)
    md = Metadata(run_id=1, message_id=f"m{n}", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                  group_id="0", created_at=time.time(), ttl=3600.0, message_type=kind)
    return Message(content=content, metadata=md)


def test_a_site_continues_from_its_disk_in_a_fresh_process_for_every_message(tmp_path):
    """Persistence "message": with this process's memory of the site dropped before every message (as if
    each were served by a new process), the site's replies are those of one party kept in memory, rollback
    included; with "save_state" a process without the state refuses; a failing step replies an error
    carrying the site's traceback."""
    from flwr.app import Context, RecordDict

    from datasets.federation import load_federation
    from fed.flower import site as S
    from fed.flower.codec import decode_payload
    from fed.flower.engine import READ_ONLY
    from fed.core.calls import call
    from fed.core.runner import Runner

    cfg = load_config(None, tiny_overrides(tmp_path, "site", "train.warmup_rounds=0", "train.fusion_epochs=1"))
    data = load_federation(cfg)
    ref = Runner(cfg, data)  # the reference: the same steps on an in-process party
    party = ref.parties["client0"]
    sites = tmp_path / "sites"
    S.write_node(sites / "client0", "A", "tiny", cfg.data.root)
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    guide = ref.server(ref.method.predict_public, rnd=0, phase="fusion", epoch=0)
    steps = [("begin_round", None, {"keep": True}), ("predict_public", None, {"rnd": 0, "phase": "condensation", "epoch": 0}),
             ("fuse", guide, {"rnd": 0, "epoch": 0, "kl_theta": 10.0}), ("local", None, {"rnd": 0, "warm": False}),
             ("end_round", None, {}), ("evaluate", None, {"split": "val"}), ("weights", None, {}),
             ("save_state", None, {"rnd": 0}), ("rollback", None, {}), ("weights", None, {})]

    def serve(msg):
        S._SITES.clear()  # a new process
        return S.serve(msg, ctx, str(sites))

    split = json.loads(data.split_path.read_text())
    setup = {"settings": json.dumps(cfg.settings()), "device": "cpu", "threads": 1, "persist": "message",
             "name": "client0", "index": 0, "split": json.dumps({"P": split["P"], "A": split["A"]}), "verify": False}
    assert decode_payload(serve(_site_message("hello", "query", 0, 0)).content) == {"site": "A", "arch": "tiny", "keeps": False}
    reply = serve(_site_message("setup", "train", 0, 0, extra=setup))
    assert decode_payload(reply.content) == {"name": "client0", "index": 0, "site": "A", "arch": "tiny",
                                             "files": {k: len(v) for k, v in data.clients[0].items()}}
    version, restored = 0, 0
    for n, (step, payload, kw) in enumerate(steps, 1):
        kind = "query" if step in READ_ONLY else "train"
        reply = serve(_site_message(step, kind, version, n, payload, **kw))
        assert not reply.has_error(), reply.error.reason
        restored += bool(reply.content["call"]["restored"])
        version += kind == "train"
        if step == "save_state":
            kw = {**kw, "folder": tmp_path / "ref_state"}
        expected = call(ref.method, party, step, payload, kw)
        assert _same(expected, decode_payload(reply.content)), step
    assert restored == len(steps) - 1  # every message after the first train one found the state on disk only
    assert (sites / "client0" / "state" / "client0.r0.pt").exists()

    # persistence "save_state": between save points the state is only in the serving process's memory
    setup["persist"] = "save_state"
    serve(_site_message("setup", "train", 0, 20, extra=setup))
    reply = serve(_site_message("begin_round", "train", 0, 21, keep=False))
    reply = serve(_site_message("end_round", "query", 1, 22))
    assert reply.has_error() and "expects the site's state at version 1" in reply.error.reason
    # an error reply: the reason first, then the site's traceback
    reply = S.serve(_site_message("no_such_step", "train", 0, 23), ctx, str(sites))
    reason, _, trace = reply.error.reason.partition(S.TRACE)
    assert reason.startswith("KeyError") and "'no_such_step' is neither a step of HSSF" in reason and "Traceback" in trace


def test_a_deployed_site_declares_itself_and_reads_only_its_own_files(tmp_path):
    """The loopback launcher's layout: the server gets the public set and the split file only (and
    cannot resolve any site); a node declares its site, arch and data root in its node config, answers
    ``hello`` with them, and at ``setup`` resolves its part of the split in its own data root and
    verifies it: a corrupt file of its own, or a node config that lacks a key, is an error that names it."""
    from flwr.app import Context, RecordDict

    from datasets.federation import DataError, load_federation
    from datasets.verify import verify
    from fed.flower import site as S
    from fed.flower.codec import decode_payload
    from fed.flower.deploy import node_config, provision
    from flwr.common.config import parse_config_args

    cfg = load_config(None, tiny_overrides(tmp_path, "dep"))
    full = load_federation(cfg)
    nodes = provision(cfg, tmp_path / "w")  # points cfg.data at the server's folder
    assert cfg.data.root == str(tmp_path / "w" / "server" / "data")
    server = load_federation(cfg, clients=())
    assert server.clients == [None, None] and [n for *_, n in server.public] == [n for *_, n in full.public]
    assert verify(cfg, progress=False, clients=()).problems == []
    with pytest.raises(DataError, match="site folder.s. not found.*A, B"):
        load_federation(cfg)  # the server holds no site's folder
    (tmp_path / "w" / "server" / "split.json").rename(tmp_path / "split.json")
    with pytest.raises(DataError, match="split file not found. Reading only the public set"):
        load_federation(cfg, clients=())
    (tmp_path / "split.json").rename(tmp_path / "w" / "server" / "split.json")

    # node 0 as its SuperNode gets it: the launcher's --node-config string, parsed by Flower
    ctx = Context(run_id=1, node_id=7, node_config=parse_config_args([node_config(nodes[0])]), state=RecordDict(),
                  run_config={})
    assert ctx.node_config == nodes[0] and set(nodes[0]) == {"site-dir", "site", "arch", "data-root"}
    split = json.loads((tmp_path / "w" / "server" / "split.json").read_text())
    setup = {"settings": json.dumps(cfg.settings()), "device": "cpu", "threads": 1, "persist": "message",
             "name": "client0", "index": 0, "split": json.dumps({"P": split["P"], "A": split["A"]}), "verify": True}
    assert decode_payload(S.serve(_site_message("hello", "query", 0, 0), ctx).content) == {"site": "A", "arch": "tiny", "keeps": False}
    reply = S.serve(_site_message("setup", "train", 0, 1, extra=setup), ctx)
    assert not reply.has_error(), reply.error.reason
    assert decode_payload(reply.content)["files"] == {k: len(v) for k, v in full.clients[0].items()}
    entry = json.loads((Path(nodes[0]["site-dir"]) / "entry.json").read_text())
    assert entry["data"] == {k: S.items_to_json(v) for k, v in full.clients[0].items()}
    assert entry["public"] == S.items_to_json(full.public)  # the site's own copy of D_p (here: the same folder)

    bad = full.clients[0]["val_list"][0][0]
    bad.write_bytes(b"not an image")
    reply = S.serve(_site_message("setup", "train", 0, 2, extra=setup), ctx)
    assert reply.has_error() and reply.error.reason.startswith("DataError") and str(bad) in reply.error.reason
    assert not (Path(nodes[0]["site-dir"]) / "entry.json").exists()  # nothing of the failed setup is used

    ctx = Context(run_id=1, node_id=7, node_config={"site-dir": str(tmp_path / "x"), "site": "A"}, state=RecordDict(),
                  run_config={})
    reply = S.serve(_site_message("hello", "query", 0, 3), ctx)
    assert reply.has_error() and "lacks 'arch', 'data-root'" in reply.error.reason


def test_flower_setup_refuses_a_site_whose_arch_is_not_the_runs(tmp_path, monkeypatch):
    """A node that declares another architecture than the run's ``models.clients`` stops the run at
    setup, before any training, with both names (here on the simulation: node.json stands for the node
    config)."""
    import fed.flower.engine as E

    real = E.write_node
    monkeypatch.setattr(E, "write_node", lambda folder, site, arch, root: real(folder, site, "resnet18" if site == "B"
                                                                                 else arch, root))
    cfg = load_config(None, tiny_overrides(tmp_path, "arch", "train.worker_threads=1"))
    with pytest.raises(RuntimeError, match="site 'B', client1. runs arch 'resnet18' but the run's models.clients gives 'tiny'"):
        train(cfg, progress=False, engine="flower-sim")
    assert not (Path(cfg.output.dir) / "metrics.jsonl").exists() or not (Path(cfg.output.dir) / "metrics.jsonl").read_text()


# --- whole runs ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_hssf_on_flower_counts_flower_bytes_and_keeps_the_sites_state(tiny_runs):
    """The reference run on the simulation (that it is the in-process run, bit for bit, is
    test_arrangements' test_flower_simulation_is_the_same_run[hssf], on this same run)."""
    run = Path(tiny_runs.flower_sim(*REFERENCE)[1].output.dir)
    assert {"config.yaml", "metrics.jsonl", "results.json", "checkpoints", "test"} <= {p.name for p in run.iterdir()}
    assert "Flower simulation: 2 nodes, 1 Ray actor(s)" in (run / "train.log").read_text()
    recs = read_metrics(run)
    for b in recs[1]["bytes"].values():  # after warm-up: Flower's own size of the same messages, a little more
        assert b["up"] < b["wire_up"] < b["up"] * 1.05 + 4096 and b["down"] < b["wire_down"] < b["down"] * 1.05 + 4096
        assert b["ctl_up"] > 0 and b["ctl_down"] > 0
    for b in recs[0]["bytes"].values():  # warm-up: no payload crosses, only the steps' call records
        assert b["up"] == b["down"] == 0 and 0 < b["wire_up"] < 1024 and 0 < b["wire_down"] < 1024
    # each site wrote its state on its own disk; the server its own in the run's state folder
    for k in range(2):
        site = run / "sites" / f"client{k}"
        assert sorted(p.name for p in (site / "state").glob("*.pt")) == [f"client{k}.r0.pt", f"client{k}.r1.pt"]
        assert json.loads((site / "entry.json").read_text())["name"] == f"client{k}"
        assert not (site / "live.pt").exists()  # one actor: state persisted at the save points only
    assert sorted(p.name for p in (run / "state").glob("*.pt")) == ["server.r1.pt"]
    # the final test ran at the sites: its overlays (the sites' images) stay there, the rows came back
    assert not (run / "test" / "overlays").exists() and (run / "test" / "per_image.csv").exists()
    for k in range(2):
        assert len(list((run / "sites" / f"client{k}" / "test_overlays").glob(f"client{k}__*.png"))) == 3


def test_exact_reductions_on_flower_are_bit_identical(reference_run):
    """Grades first (per-client row requests on the wire) and head-resolution logits: the reference run."""
    tmp, cfg, res = reference_run
    cfg2, res2 = run_tiny(tmp, "flower_reduced", "train.rounds=2", "train.worker_threads=1", "hssf.grades_first=true",
                          "hssf.logits_at=head", engine="flower-sim")
    assert_same_run(cfg, res, cfg2, res2, with_bytes=False)
    up = read_metrics(cfg2.output.dir)[1]["bytes"]["client0"]
    full = read_metrics(cfg.output.dir)[1]["bytes"]["client0"]
    assert up["wire_up"] < full["up"] / 10  # at most 1/16 of the pixels, of at most the samples it teaches


@pytest.mark.slow
def test_flower_run_resumes_from_the_sites_disks(reference_run):
    """Stopped after round 0 (the simulation and its processes end), resumed on a new simulation: each
    site reads its state back from its own disk, and the run ends as the uninterrupted in-process one."""
    tmp, cfg, res = reference_run
    cfg2 = load_config(None, tiny_overrides(tmp, "flower_resume", "train.warmup_rounds=1", "train.rounds=2",
                                            "train.worker_threads=1"))
    assert train(cfg2, progress=False, stop_after=1, engine="flower-sim") == {"stopped_after": 0}
    res2 = train(load_config(Path(cfg2.output.dir) / "config.yaml"), resume=True, progress=False, engine="flower-sim")
    assert_same_run(cfg, res, cfg2, res2)


@pytest.mark.slow
def test_lssl_on_two_actors_is_bit_identical(tmp_path):
    """Two Ray actors: a site's messages land on either process, which continues from the state the
    other wrote after every train message (state dicts of weights travel both ways)."""
    cfg, res = run_tiny(tmp_path, "lssl_in", "method=lssl", "train.rounds=1")
    cfg2, res2 = run_tiny(tmp_path, "lssl_fl", "method=lssl", "train.rounds=1", "train.client_workers=2",
                      "train.worker_threads=1", engine="flower-sim")
    assert_same_run(cfg, res, cfg2, res2)
    run = Path(cfg2.output.dir)
    log = (run / "train.log").read_text()
    assert "2 Ray actor(s)" in log
    assert "Flower sites: client0 served by" in log  # how many processes served each site, how often from disk
    assert all((run / "sites" / f"client{k}" / "live.pt").exists() for k in range(2))
    b = read_metrics(run)[0]["bytes"]["client0"]
    assert b["up"] == b["down"] > 0 and b["wire_up"] > b["up"]


@pytest.mark.slow
def test_local_on_flower_is_bit_identical(tmp_path):
    cfg, res = run_tiny(tmp_path, "local_in", "method=local", "train.rounds=1")
    cfg2, res2 = run_tiny(tmp_path, "local_fl", "method=local", "train.rounds=1", "train.worker_threads=1",
                      engine="flower-sim")
    assert_same_run(cfg, res, cfg2, res2)
