"""Shared test helpers."""
from pathlib import Path

import pytest
import torch

import fed  # noqa: F401,E402  (every method registers its configuration section: utils.config.load_config knows them all)

ROOT = Path(__file__).resolve().parent.parent


def tiny_overrides(tmp_path, name, *extra, rounds=2):
    """``--set`` list of a 2-client federation of 32-px synthetic images with the ``tiny`` model."""
    return [
        f"name={name}", f"output.dir={tmp_path / name}", "seed=3", "device=cpu",
        f"data.root={tmp_path / 'data'}", "data.dataset=syn", "data.public=P", "data.clients=[A, B]",
        "data.synthetic={public: 8, per_client: 12, seed: 1}", "data.train_val_test=[0.5, 0.25, 0.25]",
        "data.size=32", "data.batch_size=2", "data.num_workers=0",
        "models.server=tiny", "models.clients=[tiny, tiny]",
        f"train.rounds={rounds}", "train.warmup_rounds=1", "train.condensation_epochs=2", "train.fusion_epochs=2",
        *extra,
    ]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of heavy forward passes: on a busy 2-core machine OpenMP's two
    threads can run tens of times slower. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- whole runs compared bit for bit (test_protocol: order and processes; test_flower: the Flower engine) ---

#: per-client byte counts that only the Flower engine adds (its wire and control messages)
WIRE_KEYS = ("wire_up", "wire_down", "ctl_up", "ctl_down")


def run_tiny(tmp_path, name, *extra, **kw):
    """Train the tiny federation (1 warm-up round) with ``extra`` overrides; ``kw`` go to ``fed.core.run.train``."""
    from fed import load_config
    from fed.core.run import train

    cfg = load_config(None, tiny_overrides(tmp_path, name, "train.warmup_rounds=1", *extra))
    return cfg, train(cfg, progress=False, **kw)


def run_records(cfg, with_bytes: bool = True):
    """A run's metrics records without timings and without the Flower engine's own byte counts
    (without any byte counts unless ``with_bytes``)."""
    from utils.logger import read_metrics

    out = []
    for r in read_metrics(cfg.output.dir):
        r = {k: v for k, v in r.items() if k not in ("time_s", "phase_s", "startup_s")}
        r["bytes"] = {n: {k: v for k, v in b.items() if k not in WIRE_KEYS} for n, b in r["bytes"].items()}
        if not with_bytes:
            del r["bytes"]
        out.append(r)
    return out


def run_checkpoints(cfg):
    ck = Path(cfg.output.dir) / "checkpoints"
    return {p.name: torch.load(p, weights_only=True) for p in sorted(ck.glob("*.pth"))}


def _largest_difference(a: dict, b: dict) -> float:
    return max(((x[k].double() - y[k].double()).abs().max().item() if x[k].numel() else 0.0)
               for f in a for x, y in [(a[f], b[f])] for k in x)


def assert_same_run(cfg_a, res_a, cfg_b, res_b, with_bytes: bool = True):
    """Metrics (without timings and Flower's byte counts; without any byte counts unless ``with_bytes``),
    test results and every checkpoint tensor (keys, dtypes and values) are identical; a failure names the
    largest difference."""
    a, b = run_checkpoints(cfg_a), run_checkpoints(cfg_b)
    assert a.keys() == b.keys() and a
    for f in a:
        assert a[f].keys() == b[f].keys()
        assert all(a[f][k].dtype == b[f][k].dtype for k in a[f]), f
    differ = [f"{f}:{k}" for f in a for k in a[f] if not torch.equal(a[f][k], b[f][k])]
    assert not differ, f"{len(differ)} tensors differ (largest difference {_largest_difference(a, b):.3g}): {differ[:5]}"
    assert run_records(cfg_a, with_bytes) == run_records(cfg_b, with_bytes)
    assert res_a["test"] == res_b["test"] and res_a["best"] == res_b["best"]


class TinyRuns:
    """Whole tiny runs (``run_tiny``, one torch thread) computed once per session, keyed by their overrides
    and the engine, and shared by every test that reads them or compares against them: a method's in-process
    run is read by its own file's tests and is the reference of test_arrangements (the Flower simulation,
    clients in reverse order, resume). Each overrides tuple has its own folder (``tmp``), where tests may
    add runs of their own under other names."""

    def __init__(self, tmp_path_factory):
        self._factory, self._tmp, self._runs = tmp_path_factory, {}, {}

    def _get(self, engine: str, extra: tuple):
        if (engine, extra) not in self._runs:
            if extra not in self._tmp:
                self._tmp[extra] = self._factory.mktemp("tiny")
            tmp = self._tmp[extra]
            before = torch.get_num_threads()  # its own thread count: it may be built outside one_thread
            torch.set_num_threads(1)
            try:
                if engine == "flower-sim":
                    run = run_tiny(tmp, "flower_sim", *extra, "train.worker_threads=1", engine="flower-sim")
                else:
                    run = run_tiny(tmp, "in_process", *extra)
            finally:
                torch.set_num_threads(before)
            self._runs[engine, extra] = (tmp, *run)
        return self._runs[engine, extra]

    def in_process(self, *extra):
        """``(tmp, cfg, results)`` of the in-process run with ``extra`` overrides."""
        return self._get("inprocess", extra)

    def flower_sim(self, *extra):
        """``(tmp, cfg, results)`` of the same run on the Flower simulation (``train.worker_threads=1``)."""
        return self._get("flower-sim", extra)


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    return TinyRuns(tmp_path_factory)


#: the reference run's overrides: HSSF (the default method), the tiny federation, 2 rounds (1 warm-up)
REFERENCE = ("train.rounds=2",)


@pytest.fixture(scope="session")
def reference_run(tiny_runs):
    """``(tmp, cfg, results)`` of the in-process, one-thread HSSF run that the bit-identical comparisons are
    made against (``REFERENCE``)."""
    return tiny_runs.in_process(*REFERENCE)
