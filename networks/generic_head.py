"""Classifier + SA branch for decoders other than the official DeepLabV3+ (U-Net, smp decoders).

The official head's classifier is ``1x1 C->C (bias), BN, ReLU, 1x1 C->classes`` on the 256-channel
decoder feature at stride 4, and its SA branch is 256 channels wide. Other decoders end with a feature
of C channels at stride s (often full resolution); they get the same classifier on C channels and an
SA branch of width ``64 * s`` capped to [64, 256] (64 at stride 1, 128 at stride 2, 256 at stride >= 4),
which keeps the SA branch's cost per image about that of the official one instead of 16x it.
"""
from __future__ import annotations

import torch.nn as nn


def sa_width(stride: int) -> int:
    """SA branch width for a decoder feature at ``stride`` (see module docstring)."""
    return int(min(256, max(64, 64 * stride)))


def make_classifier(ch: int, num_classes: int) -> nn.Sequential:
    """The official classifier structure on ``ch`` channels."""
    return nn.Sequential(
        nn.Conv2d(ch, ch, 1), nn.BatchNorm2d(ch), nn.ReLU(inplace=True),
        nn.Conv2d(ch, num_classes, 1),
    )
