"""Shared test helpers."""
from pathlib import Path

import pytest
import torch

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
