"""``tiny``: the DeepLabV3+ / Self-Assessment head at width 32 on a five-convolution encoder.

About 0.3 M parameters. It exercises exactly the code path of the official models (ASPP, decoder, SA
branch, feature perturbation) at a fraction of the cost: for tests, CI and smoke runs, not for results.
"""
from __future__ import annotations

import torch.nn as nn

from .deeplab import DeepLabV3PlusHead
from .registry import register
from .segmodel import SegModel


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class TinyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(_down(3, 16), _down(16, 24))   # stride 4
        self.body = nn.Sequential(_down(24, 32), _down(32, 48), _down(48, 64))  # stride 32

    def forward(self, x):
        low = self.stem(x)
        return {"low_level": low, "out": self.body(low)}


@register("tiny")
def _tiny(num_classes: int = 2, pretrained=None, **_):
    if pretrained:
        raise ValueError("architecture 'tiny' has no pretrained weights (use models.pretrained: null)")
    head = DeepLabV3PlusHead(64, 24, num_classes, rates=(2, 4, 6), width=32, low_width=8)
    return SegModel(TinyEncoder(), head, min_size=32)
