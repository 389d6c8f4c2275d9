"""DeepLabV3+ (SA head) on Xception, checkpoint-compatible with the official ``xception`` models.

The backbone has the classic ImageNet Xception layout ("pretrainedmodels" naming): stem
``conv1`` (3x3, stride 2) / ``bn1`` and ``conv2`` (3x3) / ``bn2``, both *unpadded*; entry-flow blocks
``block1..3`` (stride 2 each), middle flow ``block4..11``, exit block ``block12`` (stride 2), then the
separable ``conv3``/``bn3`` (1536) and ``conv4``/``bn4`` (2048). A block is ``rep`` (a Sequential of
[ReLU,] SeparableConv (``conv1`` depthwise 3x3 + ``pointwise`` 1x1), BN, ..., [MaxPool 3/2]) plus, when
the shape changes, a 1x1 ``skip`` conv + ``skipbn``; the two are summed.

Outputs: ``low_level`` = ReLU(bn2(conv2)) (64 channels, stride 2), ``out`` = bn4(conv4) (2048 channels,
stride 32, no final ReLU), as in the official code; no dilation.

The official models also carry the unused ImageNet classifier ``backbone.last_linear`` (2048 -> 1000);
it is left out here and the checkpoint loader drops ``backbone.last_linear.*``
(``utils.checkpoint.IGNORED_PREFIXES``).

Accepted inputs: any size of at least 32 px (the unpadded stem loses 3 px before stride 2).
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from .deeplab import deeplab_v3plus
from .pretrained import load_xception_weights
from .registry import register


class SeparableConv2d(nn.Module):
    """Depthwise ``conv1`` (k x k) followed by a 1x1 ``pointwise`` conv, both without bias."""

    def __init__(self, in_ch: int, out_ch: int, k: int = 3, stride: int = 1, padding: int = 1,
                 dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, in_ch, k, stride, padding, dilation, groups=in_ch, bias=False)
        self.pointwise = nn.Conv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.conv1(x))


class XceptionBlock(nn.Module):
    """``reps`` x (ReLU, SeparableConv 3x3, BN) [+ MaxPool(3, stride, 1)], plus a skip connection.

    ``grow_first``: the channel change happens in the first separable conv (else in the last one).
    ``start_with_relu=False`` drops the leading ReLU (only ``block1``, which follows the stem's ReLU).
    """

    def __init__(self, in_ch: int, out_ch: int, reps: int, stride: int = 1,
                 start_with_relu: bool = True, grow_first: bool = True):
        super().__init__()
        if out_ch != in_ch or stride != 1:
            self.skip = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)
            self.skipbn = nn.BatchNorm2d(out_ch)
        else:
            self.skip = None
        if grow_first:
            chans = [in_ch] + [out_ch] * reps
        else:
            chans = [in_ch] * reps + [out_ch]
        layers: List[nn.Module] = []
        for a, b in zip(chans[:-1], chans[1:]):
            # the leading ReLU must not modify the block input in place: the skip path reads it
            layers += [nn.ReLU(inplace=bool(layers)), SeparableConv2d(a, b), nn.BatchNorm2d(b)]
        if not start_with_relu:
            layers = layers[1:]
        if stride != 1:
            layers.append(nn.MaxPool2d(3, stride, 1))
        self.rep = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.skipbn(self.skip(x)) if self.skip is not None else x
        return self.rep(x) + skip


class XceptionBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, 2, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)

        self.block1 = XceptionBlock(64, 128, 2, 2, start_with_relu=False)
        self.block2 = XceptionBlock(128, 256, 2, 2)
        self.block3 = XceptionBlock(256, 728, 2, 2)
        for i in range(4, 12):  # middle flow
            setattr(self, f"block{i}", XceptionBlock(728, 728, 3, 1))
        self.block12 = XceptionBlock(728, 1024, 2, 2, grow_first=False)

        self.conv3 = SeparableConv2d(1024, 1536)
        self.bn3 = nn.BatchNorm2d(1536)
        self.conv4 = SeparableConv2d(1536, 2048)
        self.bn4 = nn.BatchNorm2d(2048)

    def forward(self, x: torch.Tensor):
        x = self.relu(self.bn1(self.conv1(x)))
        low = self.relu(self.bn2(self.conv2(x)))
        x = low
        for i in range(1, 13):
            x = getattr(self, f"block{i}")(x)
        x = self.relu(self.bn3(self.conv3(x)))
        x = self.bn4(self.conv4(x))
        return {"low_level": low, "out": x}


@register("xception")
def xception(num_classes: int = 2, pretrained=None, **_):
    backbone = XceptionBackbone()
    load_xception_weights(backbone, pretrained)  # None: from scratch
    return deeplab_v3plus(backbone, 2048, 64, num_classes)
