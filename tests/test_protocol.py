"""The round as a protocol: FedAvg, keyed randomness (process-free results), and the message accounting.
HSSF's decisions as pure functions are in test_hssf.py; clients in reverse order in test_arrangements.py."""
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import assert_same_run, run_tiny, tiny_overrides
from fed import load_config
from fed.common.weights import fedavg
from fed.core.run import train
from fed.core.calls import nbytes
from utils.logger import read_metrics

T = torch.tensor
pytestmark = pytest.mark.usefixtures("one_thread")  # bit-identical comparisons: the same threads throughout


# --- FedAvg -------------------------------------------------------------------------------------------

def test_fedavg_averages_every_entry_including_bn_buffers():
    a, b = nn.BatchNorm2d(2), nn.BatchNorm2d(2)
    with torch.no_grad():
        a.weight.copy_(T([1.0, 2.0])); b.weight.copy_(T([3.0, 6.0]))
        a.running_mean.copy_(T([0.0, 1.0])); b.running_mean.copy_(T([1.0, 2.0]))
        a.running_var.copy_(T([1.0, 1.0])); b.running_var.copy_(T([3.0, 5.0]))
    a.num_batches_tracked.fill_(3); b.num_batches_tracked.fill_(6)
    avg = fedavg([a.state_dict(), b.state_dict()])
    assert avg["weight"].tolist() == [2.0, 4.0]
    assert avg["running_mean"].tolist() == [0.5, 1.5] and avg["running_var"].tolist() == [2.0, 3.0]
    # integer buffer: (3 + 6) / 2 = 4.5 rounds (half to even) to 4 and stays an integer
    assert avg["num_batches_tracked"].dtype == torch.long and avg["num_batches_tracked"].item() == 4
    assert set(avg) == set(a.state_dict())


def test_nbytes_counts_payloads():
    msg = {"logits": torch.zeros(3, 2, 4, 4), "grade": torch.zeros(3), "n": 5, "half": torch.zeros(2, dtype=torch.float16)}
    assert nbytes(msg) == 3 * 2 * 16 * 4 + 3 * 4 + 8 + 2 * 2


# --- keyed randomness: process-free rounds (order-free: test_arrangements.py) ------------------------


@pytest.mark.slow
def test_clients_in_worker_processes_give_bit_identical_results(reference_run):
    tmp, cfg, res = reference_run
    cfg2, res2 = run_tiny(tmp, "procs", "train.rounds=2", "train.client_workers=2", "train.worker_threads=1")
    assert_same_run(cfg, res, cfg2, res2)
    assert "2 worker processes" in (Path(cfg2.output.dir) / "train.log").read_text()


@pytest.mark.slow
def test_bytes_and_phase_times_are_accounted(reference_run):
    tmp, cfg, res = reference_run
    recs = read_metrics(cfg.output.dir)
    # warm-up round: nothing crosses; round 1: per condensation pass each client sends logits
    # (N, 2, 32, 32) fp32 and grades (N,) fp32, per fusion pass it receives the same from the server
    assert all(b == {"up": 0, "down": 0} for b in recs[0]["bytes"].values())
    n = 8 // 2 * 2  # 8 public images, batch 2 (drop_last)
    per_pass = n * (2 * 32 * 32 * 4 + 4)
    for b in recs[1]["bytes"].values():
        assert b == {"up": 2 * per_pass, "down": 2 * per_pass}  # 2 condensation, 2 fusion passes
    for r in recs:
        assert {"condensation", "fusion", "local", "evaluation", "state_writing"} <= set(r["phase_s"])
        assert all(v >= 0 for v in r["phase_s"].values())
    assert "clients sent 256 KiB, received 256 KiB" in (Path(cfg.output.dir) / "train.log").read_text()


def test_every_party_rebuilds_the_same_public_batches(tmp_path):
    """A client's copy of a Condensation pass is the server's, image for image and noise for noise;
    another pass or round differs."""
    from datasets.federation import load_federation
    from fed.core.runner import Runner

    cfg = load_config(None, tiny_overrides(tmp_path, "pub"))
    r = Runner(cfg, load_federation(cfg))
    server = [(x, y) for _, x, y in r.server_party.public_batches(3, "condensation", 1)]
    client = [(x, y) for _, x, y in r.parties["client1"].public_batches(3, "condensation", 1)]
    assert len(server) == len(client) == 4
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(server, client))
    other = [x for _, x, _ in r.parties["client1"].public_batches(3, "condensation", 2)]
    assert not torch.equal(other[0], server[0][0])


@pytest.mark.slow
def test_worker_processes_resume_to_the_same_result(reference_run):
    """Each worker writes and reads its own clients' state files; a run stopped after round 0 and
    resumed with workers ends as the uninterrupted in-process run."""
    tmp, cfg, res = reference_run
    cfg2 = load_config(None, tiny_overrides(tmp, "procs_resume", "train.warmup_rounds=1", "train.rounds=2",
                                            "train.client_workers=2", "train.worker_threads=1"))
    assert train(cfg2, progress=False, stop_after=1) == {"stopped_after": 0}
    state = Path(cfg2.output.dir) / "state"
    assert sorted(p.name for p in state.glob("*.pt")) == ["client0.r0.pt", "client1.r0.pt", "server.r0.pt"]
    res2 = train(load_config(Path(cfg2.output.dir) / "config.yaml"), resume=True, progress=False)
    assert_same_run(cfg, res, cfg2, res2)
