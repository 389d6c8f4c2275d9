"""DeepLabV3+ decoder with the Self-Assessment branch (SPEC section 2).

Module names follow the official checkpoints: ``classifier.{project, aspp, last_conv1, classifier,
confidence_1..4}``.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .segmodel import SegModel, SelfAssessmentHead, head_output, init_head_


def _conv_bn_relu(in_ch: int, out_ch: int, k: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = 0 if k == 1 else dilation
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, k, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class ASPPPooling(nn.Sequential):
    """Image-level branch: global average pool, 1x1 conv, BN, ReLU, broadcast back."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(in_ch, out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    def __init__(self, in_ch: int, rates: Sequence[int] = (12, 24, 36), out_ch: int = 256):
        super().__init__()
        branches = [_conv_bn_relu(in_ch, out_ch)]
        branches += [_conv_bn_relu(in_ch, out_ch, 3, r) for r in rates]
        branches.append(ASPPPooling(in_ch, out_ch))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(*_conv_bn_relu(len(branches) * out_ch, out_ch), nn.Dropout(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([b(x) for b in self.convs], dim=1))


class DeepLabV3PlusHead(SelfAssessmentHead):
    """ASPP on ``out`` + 48-channel projection of ``low_level`` -> 256-d ``feat`` at stride 4.

    ``width``/``low_width`` (256/48, the official head) are only narrowed by the ``tiny`` test model.
    """

    def __init__(self, in_ch: int, low_ch: int, num_classes: int = 2,
                 rates: Sequence[int] = (12, 24, 36), width: int = 256, low_width: int = 48):
        super().__init__()
        w = width
        self.project = _conv_bn_relu(low_ch, low_width)
        self.aspp = ASPP(in_ch, rates, w)
        self.last_conv1 = nn.Sequential(
            *_conv_bn_relu(w + low_width, w, 3), nn.Dropout(0.5),
            *_conv_bn_relu(w, w, 3), nn.Dropout(0.1),
            nn.Conv2d(w, w, 1),
        )
        self._build_sa(w, num_classes, width=w)
        self.classifier = nn.Sequential(
            nn.Conv2d(w, w, 1), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            nn.Conv2d(w, num_classes, 1),
        )
        init_head_(self)

    def forward(self, feats: Dict[str, torch.Tensor]):
        out = self.aspp(feats["out"])
        low = self.project(feats["low_level"])
        out = F.interpolate(out, size=low.shape[-2:], mode="bilinear", align_corners=False)
        feat = self.last_conv1(torch.cat([low, out], dim=1))
        return head_output(self, feat)


def deeplab_v3plus(backbone: nn.Module, high_ch: int, low_ch: int, num_classes: int = 2) -> SegModel:
    """The official model: ``backbone`` (returning ``low_level`` with ``low_ch`` channels and ``out``
    with ``high_ch``) under the DeepLabV3+ / Self-Assessment head; inputs of at least 32 px."""
    return SegModel(backbone, DeepLabV3PlusHead(high_ch, low_ch, num_classes), min_size=32)
