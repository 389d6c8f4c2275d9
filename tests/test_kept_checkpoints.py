"""Checkpoints that stay where the client lives (``ClientHost.keeps_weights``: a Flower site keeps its best
weights on its own disk and they cross once, at the end) give the run its checkpoints exactly as when
they are sent each time they improve; also after a resume. Here with an in-process host that keeps them
in a folder of its own, so no Flower is needed (the Flower engines are compared in test_flower.py)."""
from pathlib import Path

import pytest
import torch

from conftest import REFERENCE, assert_same_run, run_tiny
from fed.core.hosts import InProcessHost
from fed.core.party import Party

pytestmark = pytest.mark.usefixtures("one_thread")


def keeping_host(folder: Path, asked: list):
    class KeepingHost(InProcessHost):
        keeps_weights = True

        def kept_kw(self, rnd):
            return {"folder": folder, "rnd": rnd}

        def calls(self, names, step, msg, kw):
            asked.append((step, tuple(names), kw.get("rnd")))
            yield from super().calls(names, step, msg, kw)

    return KeepingHost


def test_checkpoints_kept_at_the_clients_equal_those_sent_at_once(reference_run, tmp_path):
    tmp, cfg_a, res_a = reference_run
    asked = []
    cfg_b, res_b = run_tiny(tmp, "kept", *REFERENCE, engine=keeping_host(tmp_path / "kept_at_site", asked))
    assert_same_run(cfg_a, res_a, cfg_b, res_b)
    steps = [s for s, _, _ in asked]
    assert "keep_weights" in steps and "kept_weights" in steps
    # the weights crossed only at the end: once per client for its best, and a "last" only where the best is older
    kept = [(names, r) for s, names, r in asked if s == "kept_weights"]
    assert sorted(n for names, _ in kept for n in names) == ["client0", "client1"]
    best = {f"client{k}": c["round"] for k, c in enumerate(res_b["best"]["clients"])}
    assert all(best[n] == r for names, r in kept for n in names)
    last_asked = [names for s, names, _ in asked if s == "weights"]
    assert sorted(n for names in last_asked for n in names) == sorted(n for n, r in best.items() if r != 1)
    assert steps.index("kept_weights") > max(i for i, s in enumerate(steps) if s == "keep_weights")


def test_checkpoints_kept_at_the_clients_survive_a_resume(reference_run, tmp_path):
    tmp, cfg_a, res_a = reference_run
    site = tmp_path / "kept_at_site"
    run_tiny(tmp, "kept_resumed", *REFERENCE, engine=keeping_host(site, []), stop_after=1)
    asked = []
    cfg_b, res_b = run_tiny(tmp, "kept_resumed", *REFERENCE, engine=keeping_host(site, asked), resume=True)
    assert_same_run(cfg_a, res_a, cfg_b, res_b)
    # a best kept before the stop is asked for after the resume (the commit remembers which round it was)
    assert any(s == "kept_weights" and r == 0 for s, _, r in asked), [a for a in asked if a[0] == "kept_weights"]


def test_a_party_keeps_its_last_two_kept_weights_and_drops_later_rounds(tmp_path):
    """The server's last committed choice is one of the two latest; rounds after the one kept now were
    never committed (a round done again after a resume, or another run's files)."""
    party = Party.__new__(Party)
    party.name = "client0"
    w = {"a": torch.zeros(2)}
    party.weights = lambda: {k: v.clone() for k, v in w.items()}
    rounds = lambda: sorted(int(f.name.rsplit(".r", 1)[1][:-3]) for f in tmp_path.glob("client0.kept.r*.pt"))
    for r in (0, 2, 5):
        w["a"] += 1
        party.keep_weights(tmp_path, r)
    assert rounds() == [2, 5]
    assert torch.equal(party.kept_weights(tmp_path, 5)["a"], torch.full((2,), 3.0))
    party.keep_weights(tmp_path, 3)  # round 3 again, after a resume: round 5 was never committed
    assert rounds() == [2, 3]
    with pytest.raises(Exception, match="kept at round 5"):
        party.kept_weights(tmp_path, 5)
