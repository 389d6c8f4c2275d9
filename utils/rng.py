"""Keyed random streams: every random draw of a run comes from a seed derived from a key.

A key is a tuple such as ``(seed, round, party, phase, epoch, batch)``. The same key gives the same
numbers in any process and in any order of execution, so a round's result does not depend on which
party runs first or whether the parties share a process.
"""
from __future__ import annotations

import hashlib

import torch


def derive_seed(*key) -> int:
    """A 63-bit seed from a tuple of ints and strings (stable across processes and Python versions)."""
    parts = tuple(p if isinstance(p, str) else int(p) for p in key)
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def generator(*key) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``key``."""
    return torch.Generator().manual_seed(derive_seed(*key))


def seed_torch(*key) -> None:
    """Seed torch's default generators (CPU and every CUDA device: dropout, feature perturbation)."""
    torch.manual_seed(derive_seed(*key))


def clamped_noise(shape, std: float, *key) -> torch.Tensor:
    """``clamp(N(0, std), -2 std, 2 std)`` drawn on the CPU from ``key`` (the same on every device)."""
    n = torch.randn(shape, generator=generator(*key))
    return (n * std).clamp_(-2 * std, 2 * std)
