"""A plain U-Net with the SA head (beyond the paper).

Design (Ronneberger et al. 2015, with BN and same-padding):

* encoder: ``inc`` = DoubleConv(3 -> 32), then 4 down-steps ``down1..4`` = MaxPool 2 + DoubleConv,
  widths 32, 64, 128, 256, 512 (base width 32: 7.8M parameters, a light client next to the
  DeepLabV3+ models; the classic base 64 would be 31M); DoubleConv = 2 x (3x3 conv, BN, ReLU);
* the backbone returns all five encoder features ``x1`` (stride 1) .. ``x5`` (stride 16) as a dict,
  so ``need_fp`` perturbs every skip feature and the bottleneck (BASELINES: "for a U-Net apply FP to
  all skip features");
* decoder (the head): 4 up-steps, each ConvTranspose 2x2/2 halving the width, concatenation with the
  skip, DoubleConv; the classifier and the SA branch (width 64, see :mod:`networks.generic_head`) run
  on the last decoder feature (32 channels, full resolution).

Accepted inputs: height and width multiples of 16, at least 32 px; other sizes raise ``ValueError``
(no internal padding: pad or resize the images instead).
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn

from .generic_head import make_classifier, sa_width
from .registry import register
from .segmodel import SegModel, SelfAssessmentHead, head_output, init_head_


class DoubleConv(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
        )


class UNetEncoder(nn.Module):
    def __init__(self, base: int = 32, depth: int = 4):
        super().__init__()
        widths = [base * 2 ** i for i in range(depth + 1)]
        self.widths = widths
        self.inc = DoubleConv(3, widths[0])
        for i in range(1, depth + 1):
            setattr(self, f"down{i}", nn.Sequential(nn.MaxPool2d(2), DoubleConv(widths[i - 1], widths[i])))
        self.depth = depth
        init_head_(self)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        feats = {"x1": self.inc(x)}
        for i in range(1, self.depth + 1):
            feats[f"x{i + 1}"] = getattr(self, f"down{i}")(feats[f"x{i}"])
        return feats


class UpStep(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_ch, out_ch, 2, stride=2)
        self.conv = DoubleConv(2 * out_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNetHead(SelfAssessmentHead):
    def __init__(self, widths, num_classes: int = 2):
        super().__init__()
        self.ups = nn.ModuleList(UpStep(widths[i], widths[i - 1]) for i in range(len(widths) - 1, 0, -1))
        self.classifier = make_classifier(widths[0], num_classes)
        self._build_sa(widths[0], num_classes, width=sa_width(1))
        init_head_(self)

    def forward(self, feats: Dict[str, torch.Tensor]):
        skips = list(feats.values())
        x = skips[-1]
        for up, skip in zip(self.ups, reversed(skips[:-1])):
            x = up(x, skip)
        return head_output(self, x)


@register("unet")
def unet(num_classes: int = 2, pretrained=None, base: int = 32, **_):
    from .pretrained import check_source

    if check_source(pretrained):
        raise ValueError("'unet' has no ImageNet weights (it is trained from scratch); set pretrained to null")
    encoder = UNetEncoder(base)
    return SegModel(encoder, UNetHead(encoder.widths, num_classes), min_size=32, size_divisor=16)
