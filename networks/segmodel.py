"""The model contract shared by every architecture, and the Self-Assessment (SA) branch.

``SegModel(backbone, head)``: ``backbone(x)`` returns a dict of feature maps; ``head(features)``
returns ``(mask_logits, confidence_logits)`` at the head's resolution. ``SegModel.forward`` upsamples
both to the input size (bilinear, align_corners=False) and returns::

    {'mask': (B, C, H, W), 'confidence': (B, 1, H, W)}

With ``need_fp=True`` (UniMatch-style feature perturbation, SPEC section 2) every feature map is
doubled as ``[f, Dropout2d(0.5)(f)]`` along the batch; ``mask`` is then the pair ``(clean, perturbed)``
and ``confidence`` covers the doubled batch (its first half is the clean one). With ``native=True`` the
dict also holds ``'mask_native'``: the mask logits at the head's own resolution (stride 4 for the
DeepLabV3+ family), before :func:`upsample`; ``upsample(mask_native, (H, W))`` is ``mask``. With
``features=True`` it also holds ``'feature'``: the decoder's penultimate feature map, the input of the
head's ``classifier`` (B, D, h, w) (the 256-d stride-4 ``last_conv1`` output of DeepLabV3+; D is
:func:`feature_channels`; with ``need_fp`` it covers the doubled batch, as ``confidence``).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def cbr(in_ch: int, out_ch: int) -> nn.Sequential:
    """3x3 conv (no bias) + BN + ReLU: the 'CBR' block of the SA branch."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class SelfAssessmentHead(nn.Module):
    """Base class of every decoder head: owns the SA branch ``confidence_1..4``.

    The SA branch predicts, per pixel, whether the segmentation is right (SPEC section 2):
    ``c1 = CBR([feat, logits]); c1 += c1*GAP(c1)``; ``c2 = c1 + CBR([c1, feat]); c2 += c2*GAP(c2)``;
    ``c3 = c2 + CBR([c1, c2])``; ``confidence = Conv1x1(CBR([c3, c2]))``.
    Sub-classes call :meth:`_build_sa` and :meth:`assess`.
    """

    def _build_sa(self, feat_ch: int, num_classes: int, width: int = 256) -> None:
        self.confidence_1 = cbr(feat_ch + num_classes, width)
        self.confidence_2 = cbr(width + feat_ch, width)
        self.confidence_3 = cbr(2 * width, width)
        self.confidence_4 = nn.Sequential(*cbr(2 * width, width), nn.Conv2d(width, 1, 1))

    def assess(self, feat: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        c1 = self.confidence_1(torch.cat([feat, logits], dim=1))
        c1 = c1 + c1 * F.adaptive_avg_pool2d(c1, 1)
        c2 = c1 + self.confidence_2(torch.cat([c1, feat], dim=1))
        c2 = c2 + c2 * F.adaptive_avg_pool2d(c2, 1)
        c3 = c2 + self.confidence_3(torch.cat([c1, c2], dim=1))
        return self.confidence_4(torch.cat([c3, c2], dim=1))


def init_head_(module: nn.Module) -> None:
    """Head initialisation of the official code: Kaiming-normal convs, BN weight 1 / bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def upsample(logits: torch.Tensor, size) -> torch.Tensor:
    """Head resolution -> input size: bilinear, align_corners=False (the one upsampling of every model)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


class SegModel(nn.Module):
    """``backbone`` + ``classifier`` (the head), with the official parameter names.

    ``min_size``/``size_divisor`` state which input sizes the architecture accepts;
    other sizes raise a ``ValueError`` naming the accepted ones.
    """

    def __init__(self, backbone: nn.Module, classifier: nn.Module, min_size: int = 32,
                 size_divisor: int = 1, fp_rate: float = 0.5):
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.min_size = min_size
        self.size_divisor = size_divisor
        self.fp_rate = fp_rate

    def accepted_sizes(self) -> str:
        rule = f"at least {self.min_size} px"
        if self.size_divisor > 1:
            rule += f" and a multiple of {self.size_divisor}"
        return rule

    def check_size(self, h: int, w: int) -> None:
        bad = min(h, w) < self.min_size or h % self.size_divisor or w % self.size_divisor
        if bad:
            raise ValueError(
                f"architecture {getattr(self, 'arch', type(self).__name__)!r} accepts input sizes "
                f"{self.accepted_sizes()} (height and width); got {h}x{w}. "
                f"Set data.size accordingly.")

    def forward(self, x: torch.Tensor, need_fp: bool = False, native: bool = False,
                features: bool = False) -> Dict[str, object]:
        h, w = x.shape[-2:]
        self.check_size(h, w)
        feats = self.backbone(x)
        if need_fp:
            feats = {k: torch.cat([f, F.dropout2d(f, self.fp_rate, training=True)])
                     for k, f in feats.items()}
        grabbed = []  # features=True: the input of the head's classifier, seen by a pre-hook
        hook = self.classifier.classifier.register_forward_pre_hook(
            lambda _, args: grabbed.append(args[0])) if features else None
        try:
            low, confidence = self.classifier(feats)
        finally:
            if hook is not None:
                hook.remove()
        mask = upsample(low, (h, w))
        confidence = upsample(confidence, (h, w))
        if need_fp:
            out = {"mask": tuple(mask.chunk(2)), "confidence": confidence}
        else:
            out = {"mask": mask, "confidence": confidence}
            if native:
                out["mask_native"] = low
        if features:
            out["feature"] = grabbed[0]
        return out


def head_output(head: SelfAssessmentHead, feat: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Classifier logits and SA confidence from the decoder feature ``feat``.

    In training mode the classifier runs twice, as in the official code (once for the SA input,
    once for the output), so its BatchNorm running statistics advance exactly as there; in eval
    mode both calls give the same tensor, so it runs once.
    """
    sa_logits = head.classifier(feat)
    logits = head.classifier(feat) if head.training else sa_logits
    return logits, head.assess(feat, sa_logits)


def feature_channels(model: SegModel) -> int:
    """Channels D of the ``feature`` map (``forward(..., features=True)``): the input width of the
    head's classifier (its first convolution)."""
    return next(m for m in model.classifier.classifier.modules() if isinstance(m, nn.Conv2d)).in_channels
