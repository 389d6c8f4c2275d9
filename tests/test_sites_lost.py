"""A site that is lost and comes back, and the run that stops when too few sites remain, in one process:
the runner's rules (``fed.core.runner.Runner.lose`` / ``rejoin``, ``train.min_sites``) with a host whose
clients go down and come back on cue (the Flower deployment test does the same with real SuperNodes)."""
import json
from pathlib import Path

import pytest
import torch

from conftest import run_checkpoints, run_records, tiny_overrides
from fed import load_config
from fed.core import faults
from fed.core.hosts import InProcessHost
from fed.core.party import make_party
from fed.core.run import train
from fed.core.runner import SitesLost

pytestmark = pytest.mark.usefixtures("one_thread")


def flaky_host(down: dict):
    """A host whose client ``name`` does not answer in the rounds ``down[name]`` (the runner loses it at
    its first call of such a round); asked before a later round, it is back with nothing in memory (its
    party rebuilt from the config), as a site whose machine restarted."""

    class FlakyHost(InProcessHost):
        def calls(self, names, step, msg, kw):
            for name in names:
                if self.runner.round in down.get(name, ()):
                    self.runner.lose(name, "no answer (down)")
                    continue
                yield from super().calls([name], step, msg, kw)

        def recover(self, names):
            r = self.runner
            back = [n for n in names if r.round not in down.get(n, ())]
            for n in back:
                k = r.names.index(n)
                self._parties[n] = make_party(r.cfg, r.amp, n, r.archs[n], r.data.clients[k], r.public, index=k,
                                              site=r.sites[n])
            return back

    return FlakyHost


RUN = ("train.rounds=4", "train.warmup_rounds=1", "train.condensation_epochs=1", "train.fusion_epochs=1",
       "train.fault_tolerance=skip_client")


def _cfg(tmp_path, name, *extra):
    return load_config(None, tiny_overrides(tmp_path, name, *RUN, *extra))


def test_a_lost_site_rejoins_from_its_own_last_state(tmp_path, monkeypatch):
    """client1 is down in round 1 (lost; ``min_sites=1``: the run goes on) and back before round 2: it
    resumes from its own state of round 0 and takes part in rounds 2-3. Checkpoints, test results and
    validation scores equal the run in which client1's step fails in round 1 (skipped, rolled back to
    its state of round 0)."""
    cfg = _cfg(tmp_path, "flaky", "train.min_sites=1")
    res = train(cfg, progress=False, engine=flaky_host({"client1": {1}}))
    recs = run_records(cfg)
    assert [sorted(r["skipped"]) for r in recs] == [[], ["client1"], [], []]
    assert recs[1]["skipped"]["client1"] == "lost: no answer (down)"
    assert recs[2]["rejoined"] == {"client1": {"missed": [1], "resumed_from": 0}}
    assert "rejoined" not in recs[3]
    log = (Path(cfg.output.dir) / "train.log").read_text()
    assert "client1 (B) is lost: no answer (down); 1 of 2 site(s) left" in log
    assert "client1 (B) is back: it resumes from its own state of round 0, having missed round(s) 1" in log

    monkeypatch.setenv(faults.ENV, json.dumps([{"client": "client1", "step": "predict_public", "rounds": [1],
                                                 "kind": "raise"}]))
    ref_cfg = _cfg(tmp_path, "raising", "train.min_sites=1")
    ref = train(ref_cfg, progress=False)
    assert res["test"] == ref["test"] and res["best"] == ref["best"]
    assert [r["val"] for r in recs] == [r["val"] for r in run_records(ref_cfg)]
    a, b = run_checkpoints(cfg), run_checkpoints(ref_cfg)
    assert a.keys() == b.keys() and all(torch.equal(a[f][k], b[f][k]) for f in a for k in a[f])


def test_a_site_that_never_comes_back_misses_every_later_round(tmp_path):
    cfg = _cfg(tmp_path, "gone", "train.min_sites=1")
    res = train(cfg, progress=False, engine=flaky_host({"client1": {1, 2, 3}}))
    recs = run_records(cfg)
    assert [sorted(r["skipped"]) for r in recs] == [[], ["client1"], ["client1"], ["client1"]]
    assert not any("rejoined" in r for r in recs)
    assert set(res["test"]) == {"client0", "all"}  # a lost site is not tested


def test_too_few_sites_stop_the_run_which_resumes(tmp_path):
    """With ``train.min_sites`` at 0 (every site), losing client1 in round 1 stops the run (SitesLost) with
    round 0 committed; ``--resume`` with every site answering finishes it, as a run that never stopped."""
    cfg = _cfg(tmp_path, "stops")
    with pytest.raises(SitesLost, match=r"client1 lost \(no answer \(down\)\): 1 site\(s\) left, train.min_sites needs 2"):
        train(cfg, progress=False, engine=flaky_host({"client1": {1}}))
    run = Path(cfg.output.dir)
    assert json.loads((run / "state" / "last.json").read_text())["round"] == 0
    assert [r["round"] for r in run_records(cfg)] == [0]
    res = train(load_config(run / "config.yaml"), resume=True, progress=False)
    ref_cfg = _cfg(tmp_path, "whole")
    ref = train(ref_cfg, progress=False)
    assert res["test"] == ref["test"]
    a, b = run_checkpoints(cfg), run_checkpoints(ref_cfg)
    assert a.keys() == b.keys() and all(torch.equal(a[f][k], b[f][k]) for f in a for k in a[f])
