"""The round as a protocol: HSSF's decisions as pure functions (answers worked out by hand), keyed
randomness (order- and process-free results), and the message accounting."""
import itertools
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import assert_same_run, run_tiny, tiny_overrides
from fed import load_config
from fed.common.labels import pixel_accuracy
from fed.common.hssf_local import rpg_correct
from fed.methods.hssf import fold_teacher, fusion_mask, running_pick, teacher_mask
from fed.common.hssf_local import pseudo_label
from fed.common.weights import fedavg
from fed.core.run import train
from fed.core.runner import nbytes
from utils.logger import read_metrics

T = torch.tensor
pytestmark = pytest.mark.usefixtures("one_thread")  # bit-identical comparisons: the same threads throughout


# --- Condensation teacher ---------------------------------------------------------------------------

def test_running_pick_by_hand():
    # three samples, two clients, threshold 0.75
    g0 = T([0.80, 0.60, 0.90])
    grades = T([[0.85, 0.70, 0.90],    # client 0
                [0.85, 0.95, 0.70]])   # client 1
    index, grade = running_pick(g0, grades, 0.75)
    # sample 0: c0 0.85 > 0.80 taken; c1 0.85 is not > 0.85 (strict): client 0, mask 0.85 > 0.80
    # sample 1: c0 0.70 > 0.60 taken, but 0.70 <= 0.75 resets the grade to 0; c1 0.95 > 0 taken
    # sample 2: nobody beats 0.90 (a tie is not a win): the server keeps its own prediction
    assert index.tolist() == [0, 1, -1]
    assert torch.allclose(grade, T([0.85, 0.95, 0.90]))
    assert (grade > g0).tolist() == [True, True, False]


def test_running_pick_resets_low_server_grade():
    # server grade 0.5 <= 0.75: after client 0 (0.4, not taken) the picked grade resets to 0, so
    # client 1's 0.3 is taken (grade 0.3 -> reset to 0): never used, since 0 > 0.5 is false
    index, grade = running_pick(T([0.5]), T([[0.4], [0.3]]), 0.75)
    assert index.tolist() == [1] and grade.tolist() == [0.0]


def _fold(grades, order):
    acc = None
    for k in order:
        acc = fold_teacher(acc, k, {"grade": grades[k], "logits": torch.full((len(grades[k]), 2, 1, 1), float(k))})
    return acc


def test_fold_and_mask_equal_the_running_pick_for_every_case():
    """Over all grade combinations from a small set (ties included, g0 on both sides of the
    threshold), the order-free fold + teacher_mask gives the running pick's mask, and its teacher
    where the mask is on; any arrival order of the replies folds to the same result."""
    values = [0.0, 0.5, 0.75, 0.8, 0.9]
    cases = list(itertools.product(values, repeat=4))  # g0, then three clients
    g0 = T([c[0] for c in cases])
    grades = T([[c[k + 1] for c in cases] for k in range(3)])
    index, grade = running_pick(g0, grades, 0.75)
    reference = grade > g0
    for order in itertools.permutations(range(3)):
        acc = _fold(grades, order)
        mask = teacher_mask(acc["grade"], g0, 0.75)
        assert torch.equal(mask, reference), order
        assert torch.equal(acc["index"][mask], index[mask])
        assert torch.equal(acc["logits"][mask][:, 0, 0, 0].long(), index[mask])
    assert reference.any() and (~reference).any()


def test_fusion_mask_and_rpg_by_hand():
    assert fusion_mask(T([0.9, 0.8, 0.7]), T([0.8, 0.8, 0.9])).tolist() == [True, False, False]
    # logits favour class 1 at pixel 0 and class 0 at pixel 1; confidence logit -2 (sigmoid 0.12 < 0.3)
    # flips pixel 1 only
    logits = T([[[[0.0, 1.0]], [[1.0, 0.0]]]])   # (1, 2, 1, 2)
    conf = T([[[[2.0, -2.0]]]])                   # (1, 1, 1, 2)
    assert rpg_correct(logits, conf, 0.3).tolist() == [[[1, 1]]]
    assert pixel_accuracy(T([[[1, 1]]]), T([[[1, 0]]])).tolist() == [0.5]


# --- pseudo-labels ------------------------------------------------------------------------------------

def test_pseudo_label_choice_rpg_and_gate_by_hand():
    # 1 image of 4 pixels; weak says class 1 everywhere, strong says class 0 everywhere
    p_w = torch.stack([torch.zeros(1, 4), torch.ones(1, 4)], 1).view(1, 2, 1, 4)
    p_s = torch.stack([torch.ones(1, 4), torch.zeros(1, 4)], 1).view(1, 2, 1, 4)
    conf_w = T([[[0.9, 0.5, 0.2, 0.1]]])
    conf_s = T([[[0.8, 0.5, 0.25, 0.05]]])
    # pixel 0: weak more confident -> 1; pixel 1: tie -> weak -> 1; pixel 2: strong 0.25 > 0.2 -> 0;
    # pixel 3: weak -> 1
    pseudo, gate = pseudo_label(p_w, p_s, conf_w, conf_s, rpg=False, rpg_threshold=0.3, sample_threshold=0.75)
    assert pseudo.tolist() == [[[1, 1, 0, 1]]] and gate is None
    # RPG: max confidences 0.9, 0.5, 0.25, 0.1: pixels 2 and 3 are below 0.3 and flip
    pseudo, gate = pseudo_label(p_w, p_s, conf_w, conf_s, rpg=True, rpg_threshold=0.3, sample_threshold=0.75)
    assert pseudo.tolist() == [[[1, 1, 1, 0]]]
    # mean max confidence (0.9 + 0.5 + 0.25 + 0.1) / 4 = 0.4375 <= 0.75: the image is gated out
    assert gate.tolist() == [False]
    assert pseudo_label(p_w, p_s, conf_w, conf_s, True, 0.3, 0.4)[1].tolist() == [True]


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


# --- keyed randomness: order- and process-free rounds -----------------------------------------------


@pytest.mark.slow
def test_clients_in_reverse_order_give_bit_identical_results(reference_run):
    tmp, cfg, res = reference_run
    cfg2, res2 = run_tiny(tmp, "rev", "train.rounds=2", order="reverse")
    assert_same_run(cfg, res, cfg2, res2)


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
