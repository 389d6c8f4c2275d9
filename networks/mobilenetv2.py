"""DeepLabV3+ (SA head) on MobileNetV2, checkpoint-compatible with the official ``mobilenetv2`` models.

Structure (fixed by the official checkpoints and the compatibility fixture, SPEC section 2):

* parameter names are torchvision's ``features.*`` layout (``features.0`` stem, ``features.1..17``
  inverted residuals with a ``conv`` sequence, ``features.18`` the 1x1 conv to 1280 channels); the
  ImageNet classifier is not part of the model;
* every convolution has ``padding=0``: the stem (3x3, stride 2) is a *valid* convolution, and each
  inverted-residual block zero-pads its *input* by the dilation before the whole block, i.e. before the
  1x1 expansion too (so the expanded border is ``ReLU6(BN(0))``, not 0);
* output stride 8: the stride-2 of the 32->64 and 160-channel stages is replaced by dilation
  (dilation 2 from the 64-channel stage, 4 from the 160-channel stage; the first block of a stage keeps
  the previous dilation);
* ``low_level`` = output of ``features[:3]`` (24 channels, stride 4), ``out`` = ``features[3:]``
  (1280 channels, stride 8), activations ReLU6.

Accepted inputs: any size of at least 32 px (no divisibility constraint).
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from .deeplab import deeplab_v3plus
from .pretrained import load_torchvision_weights
from .registry import register

# expansion t, output channels c, repeats n, stride s (MobileNetV2 paper, table 2)
_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
             (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _conv_bn_relu6(in_ch: int, out_ch: int, k: int, stride: int = 1, dilation: int = 1,
                   groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, k, stride, 0, dilation=dilation, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand (unless t = 1) -> 3x3 depthwise (stride, dilation) -> 1x1 linear projection.

    The input is zero-padded by ``dilation`` on every side before the block (see module docstring).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, dilation: int, expand: int):
        super().__init__()
        hidden = in_ch * expand
        self.pad = dilation
        self.residual = stride == 1 and in_ch == out_ch
        layers: List[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn_relu6(in_ch, hidden, 1))
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride, dilation, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(F.pad(x, [self.pad] * 4))
        return x + y if self.residual else y


class MobileNetV2Backbone(nn.Module):
    def __init__(self, output_stride: int = 8):
        super().__init__()
        layers: List[nn.Module] = [_conv_bn_relu6(3, 32, 3, stride=2)]
        stride_so_far, dilation, in_ch = 2, 1, 32
        for t, c, n, s in _SETTINGS:
            first_dilation = dilation
            if stride_so_far == output_stride:
                first_stride, dilation = 1, dilation * s
            else:
                first_stride, stride_so_far = s, stride_so_far * s
            for i in range(n):
                if i == 0:
                    layers.append(InvertedResidual(in_ch, c, first_stride, first_dilation, t))
                else:
                    layers.append(InvertedResidual(in_ch, c, 1, dilation, t))
                in_ch = c
        layers.append(_conv_bn_relu6(in_ch, 1280, 1))
        self.features = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor):
        low = self.features[:3](x)
        return {"low_level": low, "out": self.features[3:](low)}


@register("mobilenetv2")
def mobilenetv2(num_classes: int = 2, pretrained=None, **_):
    backbone = MobileNetV2Backbone()
    load_torchvision_weights(backbone, "mobilenet_v2", pretrained)  # None: from scratch
    return deeplab_v3plus(backbone, 1280, 24, num_classes)
