"""DeepLabV3+ (SA head) on torchvision ResNets, output stride 32, as the official code.

The backbone *is* a torchvision ``ResNet`` (so its parameter names are the official ones) whose
forward returns ``low_level`` (layer1, stride 4) and ``out`` (layer4, stride 32). The official
models also carry the classification layer ``backbone.fc``, which they never use; it is left out
here and the checkpoint loader drops ``backbone.fc.*``.
"""
from __future__ import annotations

from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from .deeplab import deeplab_v3plus
from .pretrained import load_torchvision_weights
from .registry import register


class ResNetBackbone(ResNet):
    def __init__(self, block, layers):
        super().__init__(block, layers)
        del self.fc  # unused by segmentation; see the module docstring

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        out = self.layer4(self.layer3(self.layer2(low)))
        return {"low_level": low, "out": out}


_SPECS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
    "resnet152": (Bottleneck, [3, 8, 36, 3]),
}


def _make(name):
    block, layers = _SPECS[name]

    @register(name)
    def factory(num_classes: int = 2, pretrained=None, **_):
        backbone = ResNetBackbone(block, layers)
        load_torchvision_weights(backbone, name, pretrained)  # None: from scratch
        return deeplab_v3plus(backbone, 512 * block.expansion, 64 * block.expansion, num_classes)

    return factory


for _name in _SPECS:
    _make(_name)
