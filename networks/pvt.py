"""DeepLabV3+ (SA head) on PVTv2-b2 (the official ``pvt`` client), through timm.

The encoder is ``timm.create_model('pvt_v2_b2', features_only=True, out_indices=(0, 3))`` with
stochastic depth 0.1 (as the official PVTv2-b2): ``low_level`` = stage 1 (64 channels, stride 4),
``out`` = stage 4 (512 channels, stride 32). Parameter names are timm's (``backbone.encoder.*``), not
those of the official code's own PVT copy, so official ``pvt`` checkpoints do not load (there is no
compatibility fixture for it).

Accepted inputs: any size of at least 32 px (the stage-1 attention reduces its keys 8x at stride 4).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .deeplab import deeplab_v3plus
from .registry import register

TIMM_NAME = "pvt_v2_b2"


class PVTv2Backbone(nn.Module):
    def __init__(self, pretrained=None):
        super().__init__()
        import timm

        from .pretrained import check_source, timm_pretrained_overlay

        kw = dict(features_only=True, out_indices=(0, 3), drop_path_rate=0.1)
        if check_source(pretrained):
            kw.update(pretrained=True, pretrained_cfg_overlay=timm_pretrained_overlay(TIMM_NAME))
        self.encoder = timm.create_model(TIMM_NAME, **kw)

    def forward(self, x: torch.Tensor):
        low, out = self.encoder(x)
        return {"low_level": low, "out": out}


@register("pvt")
def pvt(num_classes: int = 2, pretrained=None, **_):
    return deeplab_v3plus(PVTv2Backbone(pretrained), 512, 64, num_classes)
