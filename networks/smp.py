"""Decoders of segmentation-models-pytorch (smp) over any smp encoder, with the SA head.

Config name: ``smp:<Decoder>/<encoder>``, for example ``smp:FPN/efficientnet-b0``,
``smp:Unet/mobilenet_v2`` or ``smp:Unet/tu-convnext_atto`` (``tu-<name>``: any timm model, through
smp's timm-universal encoder). Decoders: Unet, UnetPlusPlus, FPN, DeepLabV3, DeepLabV3Plus, PSPNet,
Linknet, MAnet, PAN, UPerNet, Segformer (case-insensitive); DPT is not offered (ViT encoders only,
with its own head). Every smp default is kept (decoder widths, encoder depth, output stride).

Wrapping: the smp model is built with ``classes=num_classes`` and split in two.

* backbone = the smp encoder (``backbone.encoder.*``) without the modules its forward never runs
  (:func:`prune_unused`: EfficientNet's classification conv, a ResNet's deeper stages under PSPNet's
  depth-3 encoder, ...); it returns its feature list as a dict
  ``f0..fN`` so that ``need_fp`` perturbs every encoder feature. smp's ``f0`` is the input image itself,
  which no smp decoder reads (Unet and Segformer only read its spatial size): it is replaced by a
  zero-channel tensor of the input's size, so it carries the size but nothing to perturb.
* head = the smp decoder (``classifier.decoder.*``) + our classifier and SA branch on the decoder's
  output feature, in place of smp's segmentation head (see :mod:`networks.generic_head` for the
  widths). The output is upsampled to the input size by ``SegModel`` (bilinear, align_corners=False).

Accepted inputs follow smp: decoders that need it (all but Unet) take multiples of the encoder's
output stride (32, or 16 for DeepLabV3Plus and PAN, 8 for PSPNet and DeepLabV3); at least 32 px,
except PAN: at least 8 x the output stride (128 px), as its pyramid attention pools 3 more times.
``pretrained='imagenet'`` loads the encoder weights smp pins, from the local Hugging Face cache only
(:mod:`networks.pretrained`).
"""
from __future__ import annotations

import difflib
import warnings
from typing import Dict, List

import torch
import torch.nn as nn

from .generic_head import make_classifier, sa_width
from .registry import register_prefix
from .segmodel import SegModel, SelfAssessmentHead, head_output, init_head_

DECODERS = ["Unet", "UnetPlusPlus", "FPN", "DeepLabV3", "DeepLabV3Plus", "PSPNet", "Linknet", "MAnet",
            "PAN", "UPerNet", "Segformer"]

# listed by networks.available(): every decoder once, over light encoders of several families
EXAMPLES = [
    "smp:Unet/resnet34",
    "smp:Unet/mobilenet_v2",
    "smp:UnetPlusPlus/efficientnet-b0",
    "smp:FPN/efficientnet-b0",
    "smp:DeepLabV3/resnet18",
    "smp:DeepLabV3Plus/resnet34",
    "smp:PSPNet/resnet34",
    "smp:Linknet/mobilenet_v2",
    "smp:MAnet/resnet18",
    "smp:PAN/resnet18",
    "smp:UPerNet/resnet18",
    "smp:Segformer/mit_b0",
    "smp:FPN/tu-convnext_atto",
]


def _smp():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import segmentation_models_pytorch as smp
    return smp


def encoder_names() -> List[str]:
    return list(_smp().encoders.get_encoder_names())


def parse(spec: str):
    """``'<Decoder>/<encoder>'`` -> (canonical decoder name, encoder name); KeyError listing valid ones."""
    if spec.count("/") != 1:
        raise KeyError(f"smp architecture names are 'smp:<Decoder>/<encoder>' (e.g. 'smp:FPN/efficientnet-b0'), "
                       f"got 'smp:{spec}'. Decoders: {', '.join(DECODERS)}")
    dec, enc = spec.split("/")
    by_lower = {d.lower(): d for d in DECODERS}
    if dec.lower() not in by_lower:
        close = difflib.get_close_matches(dec, DECODERS, n=2)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise KeyError(f"unknown smp decoder {dec!r} in 'smp:{spec}'.{hint} Valid decoders: {', '.join(DECODERS)}")
    if enc.startswith("tu-"):
        import timm

        if not timm.is_model(enc[3:]):
            close = difflib.get_close_matches(enc[3:], timm.list_models(), n=3)
            hint = f" Did you mean {', '.join('tu-' + c for c in close)}?" if close else ""
            raise KeyError(f"unknown timm model {enc[3:]!r} in 'smp:{spec}'.{hint} "
                           f"Valid: 'tu-<name>' for any name of timm.list_models()")
    else:
        names = encoder_names()
        if enc not in names:
            close = difflib.get_close_matches(enc, names, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise KeyError(f"unknown smp encoder {enc!r} in 'smp:{spec}'.{hint} Valid encoders: "
                           f"{', '.join(names)}, or 'tu-<timm model>'")
    return by_lower[dec.lower()], enc


class SMPEncoder(nn.Module):
    """An smp encoder returning its features as a dict ``f0..fN`` (``f0``: zero-channel size carrier)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        feats = self.encoder(x)
        out = {"f0": feats[0][:, :0]}
        out.update({f"f{i}": f for i, f in enumerate(feats) if i > 0})
        return out


class SMPHead(SelfAssessmentHead):
    """smp decoder + classifier + SA branch on the decoder output (``feat_ch`` channels at ``stride``)."""

    def __init__(self, decoder: nn.Module, feat_ch: int, stride: int, num_classes: int = 2):
        super().__init__()
        self.decoder = decoder
        self.classifier = make_classifier(feat_ch, num_classes)
        self._build_sa(feat_ch, num_classes, width=sa_width(stride))
        for name in ("classifier", "confidence_1", "confidence_2", "confidence_3", "confidence_4"):
            init_head_(getattr(self, name))  # the smp decoder keeps smp's own initialisation

    def forward(self, feats: Dict[str, torch.Tensor]):
        return head_output(self, self.decoder(list(feats.values())))


def prune_unused(encoder: nn.Module, size: int = 64) -> List[str]:
    """Replace the encoder's sub-modules that its forward never calls by ``nn.Identity``.

    smp keeps layers it does not use: the classification head of some encoders (EfficientNet's
    ``_conv_head``/``_bn1``) and, for decoders with a shallower encoder (PSPNet: depth 3), the deeper
    stages (``layer3``, ``layer4`` of a ResNet). They get no gradient, inflate the parameter count and
    the checkpoints, so they are dropped. Found by one forward pass of a ``size`` x ``size`` zero image
    in eval mode with hooks; a second pass checks the pruned encoder still runs (else nothing is
    pruned). Returns the dropped module names.
    """
    used = set()
    handles = [m.register_forward_hook(lambda mod, _i, _o: used.add(id(mod))) for m in encoder.modules()]
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            encoder(torch.zeros(1, 3, size, size, device=device))
        removed = []

        def walk(module: nn.Module, prefix: str) -> None:
            for name, child in list(module.named_children()):
                if any(id(m) in used for m in child.modules()):  # containers (ModuleList) run no hook
                    walk(child, f"{prefix}{name}.")
                elif any(True for _ in child.parameters()):
                    removed.append((module, name, child, prefix + name))
                    setattr(module, name, nn.Identity())

        walk(encoder, "")
        for h in handles:
            h.remove()
        handles = []
        if removed:
            try:
                with torch.no_grad():
                    encoder(torch.zeros(1, 3, size, size, device=device))
            except Exception:  # the encoder reaches into an "unused" module: keep everything
                for module, name, child, _ in removed:
                    setattr(module, name, child)
                removed = []
    finally:
        for h in handles:
            h.remove()
        encoder.train(was_training)
    return [r[3] for r in removed]


def build_smp(spec: str, num_classes: int = 2, pretrained=None, **kwargs) -> SegModel:
    from .pretrained import check_source, load_smp_encoder_weights, timm_pretrained_overlay

    dec, enc = parse(spec)
    smp = _smp()
    source = check_source(pretrained)
    kw = dict(kwargs)
    if source and enc.startswith("tu-"):
        kw.update(encoder_weights=True, pretrained_cfg_overlay=timm_pretrained_overlay(enc[3:]))
    else:
        kw.update(encoder_weights=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(smp, dec)(encoder_name=enc, classes=num_classes, **kw)
    if source and not enc.startswith("tu-"):
        load_smp_encoder_weights(model.encoder, enc, source)

    dropped = prune_unused(model.encoder)

    conv, up = model.segmentation_head[0], model.segmentation_head[1]
    stride = int(up.scale_factor) if isinstance(up, nn.Upsample) else 1
    head = SMPHead(model.decoder, conv.in_channels, stride, num_classes)
    out_stride = model.encoder.output_stride
    divisor = out_stride if model.requires_divisible_input_shape else 1
    # PAN's feature-pyramid attention max-pools its stride-`out_stride` input 3 times more
    min_size = 8 * out_stride if dec == "PAN" else max(32, divisor)
    segmodel = SegModel(SMPEncoder(model.encoder), head, min_size=min_size, size_divisor=divisor)
    segmodel.backbone.dropped = dropped  # names of the unused encoder modules left out
    return segmodel


register_prefix("smp:", build_smp, EXAMPLES)
