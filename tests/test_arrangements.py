"""The same run, arranged differently, for every method: on the Flower simulation, with the clients served
in reverse order, stopped and resumed. Each ends bit for bit as the method's in-process run (one torch
thread; conftest's ``tiny_runs``, computed once per session and also read by the method's own test file).

The methods' own checks (losses by hand, what crosses) are in their files; the Flower engine's own
(its byte counts, the sites' disks, several actors) in test_flower.py; worker processes in test_protocol.py.
"""
from pathlib import Path

import pytest

from conftest import REFERENCE, assert_same_run, run_tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # bit-identical comparisons: the same threads throughout

#: each method's tiny settings (the overrides given to ``run_tiny``), as its own test file uses them
METHODS = {
    "hssf": REFERENCE,
    "eln": ("method=eln", "eln.arch=tiny", "eln.eln_rounds=1", "train.rounds=4"),  # warm-up, 1 ELN, 2 SSL rounds
    "feddistill": ("method=feddistill", "train.rounds=2"),
    "fedmd": ("method=fedmd", "train.rounds=2"),
    "fedproto": ("method=fedproto", "train.rounds=2"),
    "fixmatch": ("method=fixmatch", "train.rounds=2", "fixmatch.threshold=0.6"),
    "ktpfl": ("method=ktpfl", "train.rounds=2"),
    "mean_teacher": ("method=mean_teacher", "train.rounds=2", "mean_teacher.zero_steps=0"),
    "rhfl": ("method=rhfl", "train.rounds=2"),
    "semifl": ("method=semifl", "semifl.local_epochs=1", "semifl.server_epochs=1", "train.rounds=3"),
    "unimatch": ("method=unimatch", "train.rounds=2", "unimatch.threshold=0.6"),
}

#: clients served backwards where the method's own file checked it (its server's folds are order-free)
REVERSE = ("hssf", "feddistill", "fedmd", "ktpfl")

#: methods with state across rounds in ``extra``: the run (METHODS' settings, or more rounds where those
#: end too early) and the number of its rounds after which it stops, to be resumed.
#: ELN: in the SSL phase (the teacher, the ELN, the projection heads, their optimizers and the flags);
#: Mean Teacher: after round 1 (the teacher trained, its step counter at 3); SemiFL: after round 1 (the
#: server's momentum buffer)
RESUME = {
    "eln": (METHODS["eln"], 3),
    "mean_teacher": ((*METHODS["mean_teacher"], "train.rounds=3"), 2),
    "semifl": (METHODS["semifl"], 2),
}

#: marked slow, as their tests were in test_flower.py and test_protocol.py
SLOW = {"hssf"}


def _params(names):
    return [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW else []) for n in names]


@pytest.mark.parametrize("method", _params(METHODS))
def test_flower_simulation_is_the_same_run(tiny_runs, method):
    pytest.importorskip("flwr", reason="Flower is not installed: pip install -r requirements-flower.txt")
    pytest.importorskip("ray", reason="Flower's simulation needs Ray: pip install -r requirements-flower.txt")
    _, cfg, res = tiny_runs.in_process(*METHODS[method])
    _, cfg2, res2 = tiny_runs.flower_sim(*METHODS[method])
    assert_same_run(cfg, res, cfg2, res2)


@pytest.mark.parametrize("method", _params(REVERSE))
def test_clients_in_reverse_order_give_the_same_run(tiny_runs, method):
    tmp, cfg, res = tiny_runs.in_process(*METHODS[method])
    cfg2, res2 = run_tiny(tmp, "reverse", *METHODS[method], order="reverse")
    assert_same_run(cfg, res, cfg2, res2)


@pytest.mark.parametrize("method", _params(RESUME))
def test_resume_is_identical(tiny_runs, method):
    from fed import load_config
    from fed.core.run import train

    overrides, stop_after = RESUME[method]
    tmp, cfg, res = tiny_runs.in_process(*overrides)
    cfg2, out = run_tiny(tmp, "resumed", *overrides, stop_after=stop_after)
    assert out == {"stopped_after": stop_after - 1}
    res2 = train(load_config(Path(cfg2.output.dir) / "config.yaml"), resume=True, progress=False)
    assert_same_run(cfg, res, cfg2, res2)
