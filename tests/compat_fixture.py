"""Helpers for the official-checkpoint compatibility fixture (tests/compat/, from shared/compat)."""
import json
import math
import zlib
from pathlib import Path

import torch

FIXTURE = Path(__file__).parent / "compat" / "reference_outputs_seed7.json"


def load_fixture():
    return json.loads(FIXTURE.read_text())


def fixture_state_dict(shapes, seed):
    """Deterministic weights for every key of an official state dict (fixture README)."""
    sd = {}
    for k, shape in shapes.items():
        g = torch.Generator().manual_seed((zlib.crc32(k.encode()) ^ seed) & 0x7FFFFFFF)
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.zeros(shape, dtype=torch.long)
        elif k.endswith("running_var"):
            sd[k] = 0.5 + torch.rand(shape, generator=g)
        elif k.endswith("running_mean") or k.endswith("bias"):
            sd[k] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:
            sd[k] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[k] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))  # v[0].numel()
    return sd


def fixture_input(seed, shape=(2, 3, 128, 128)):
    n, c, h, w = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij")
    return torch.sin(0.1 * h * (c + 1) + 0.07 * w + n + 0.01 * seed).float()
