"""DeepLabV3+ (SA head) on VGG16 (no BN), checkpoint-compatible with the official ``vgg`` models.

The backbone is torchvision's ``vgg16().features`` (parameter names ``features.{0,2,5,...,28}``);
the ImageNet classifier is not part of the model (nor of the official checkpoints).

Outputs, as in the official code: ``low_level`` = ``features[:4]`` (conv1_2 + ReLU: 64 channels at
full resolution, stride 1), ``out`` = ``features[4:30]`` (conv5_3 + ReLU, 512 channels, stride 16:
the last max-pool is not applied). Because the low-level feature is at stride 1, the decoder runs at
the input resolution, which makes this model much heavier than its parameter count suggests.

Accepted inputs: any size of at least 32 px (max-pools floor odd sizes).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.models.vgg import cfgs, make_layers

from .deeplab import deeplab_v3plus
from .pretrained import load_torchvision_weights
from .registry import register


class VGG16Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        # torchvision's VGG16 layer list (31 layers; index 30, the last max-pool, is unused), built
        # without the 120M-parameter ImageNet classifier; initialised as torchvision does
        self.features = make_layers(cfgs["D"], batch_norm=False)
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor):
        low = self.features[:4](x)
        return {"low_level": low, "out": self.features[4:30](low)}


@register("vgg")
def vgg(num_classes: int = 2, pretrained=None, **_):
    backbone = VGG16Backbone()
    load_torchvision_weights(backbone, "vgg16", pretrained)  # None: from scratch
    return deeplab_v3plus(backbone, 512, 64, num_classes)
