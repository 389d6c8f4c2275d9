"""UniMatch's strong views, built on tensors from the weak view with keyed generators (BASELINES §3).

Shared by ``unimatch`` (two views) and ``fixmatch`` (one view). Each view of each image draws, from
its own ``torch.Generator`` (keyed by the caller: :func:`utils.rng.generator`):

* ColorJitter(brightness 0.5, contrast 0.5, saturation 0.5, hue 0.25) with p=0.8 (the four
  adjustments in a random order, as torchvision's ColorJitter);
* RandomGrayscale with p=0.2;
* Gaussian blur with sigma ~ U(0.1, 2) and p=0.5 (kernel ``2*ceil(3 sigma)+1``; UniMatch blurs with
  PIL's GaussianBlur(radius=sigma));
* a CutMix box (:func:`cutmix_box`) with p=0.5: area 2-40% of the image, aspect ratio in [0.3, 1/0.3]
  (drawn whether or not the view is photometrically changed).

Images are the loaders' tensors normalised to [-1, 1] (mean/std 0.5); the photometric ops work in
[0, 1]. Geometry is not touched, so every view stays pixel-aligned with the weak view.

**The mixing image** is another image of the same batch, in a pairing drawn afresh for every batch
(:func:`mix_partner`: a keyed random permutation without fixed points), the same view of it (its own
strong view, built independently). Its pseudo-label and confidence are those of its own weak forward in
the same step, so no extra forward pass is needed. UniMatch's code draws the mixing batch from a second
loader over the same data, which its samplers put in the same order, so there every image is mixed
with another view of *itself*; its author calls that unintended and reports that mixing a batch with a
shuffled version of itself performs the same (LiheYoung/UniMatch issues #34, #51, #85). A fixed partner
(the batch rolled by one, as this module did before) would pair the same two images in every epoch
when the loaders do not shuffle (``data.shuffle: false``, the official default).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torchvision.transforms.v2.functional as TF

JITTER = (0.5, 0.5, 0.5, 0.25)  # brightness, contrast, saturation, hue
P_JITTER, P_GRAY, P_BLUR = 0.8, 0.2, 0.5
SIGMA = (0.1, 2.0)
P_CUTMIX, AREA, RATIO = 0.5, (0.02, 0.4), (0.3, 1 / 0.3)


def _u(g: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g, dtype=torch.float64).item()


def color_jitter(img: torch.Tensor, g: torch.Generator, b: float = JITTER[0], c: float = JITTER[1],
                 s: float = JITTER[2], h: float = JITTER[3]) -> torch.Tensor:
    """One image (3,H,W) in [0, 1]: brightness, contrast, saturation factors ~ U(1-x, 1+x) and a hue
    shift ~ U(-h, h), applied in a random order."""
    ops = [(TF.adjust_brightness, _u(g, max(0.0, 1 - b), 1 + b)),
           (TF.adjust_contrast, _u(g, max(0.0, 1 - c), 1 + c)),
           (TF.adjust_saturation, _u(g, max(0.0, 1 - s), 1 + s)),
           (TF.adjust_hue, _u(g, -h, h))]
    for i in torch.randperm(4, generator=g).tolist():
        fn, factor = ops[i]
        img = fn(img, factor)
    return img


def blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    k = 2 * math.ceil(3 * sigma) + 1
    return TF.gaussian_blur(img, [k, k], [sigma, sigma])


def photometric(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """UniMatch's strong photometric chain on one image (3,H,W) in [0, 1]."""
    if _u(g) < P_JITTER:
        img = color_jitter(img, g)
    if _u(g) < P_GRAY:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if _u(g) < P_BLUR:
        img = blur(img, _u(g, *SIGMA))
    return img


def cutmix_box(height: int, width: int, g: torch.Generator, p: float = P_CUTMIX, area=AREA,
               ratio=RATIO) -> torch.Tensor:
    """A (height, width) bool box, all False with probability ``1 - p``. Otherwise the box's area is
    ``A ~ U(area) * height * width``; then aspect ``r ~ U(ratio)`` and the top-left corner (uniform on
    the image) are drawn until the box fits: width ``int(sqrt(A / r))``, height ``int(sqrt(A r))``."""
    box = torch.zeros(height, width, dtype=torch.bool)
    if _u(g) >= p:
        return box
    a = _u(g, *area) * height * width
    while True:
        r = _u(g, *ratio)
        w, h = int(math.sqrt(a / r)), int(math.sqrt(a * r))
        x = int(torch.randint(0, width, (), generator=g))
        y = int(torch.randint(0, height, (), generator=g))
        if x + w <= width and y + h <= height:
            break
    box[y:y + h, x:x + w] = True
    return box


class Mix(NamedTuple):
    """Where a batch is cut-mixed: ``boxes`` (B,H,W) bool, and ``partner`` (B,) long, the index of each
    image's mixing image."""

    boxes: torch.Tensor
    partner: torch.Tensor


def mix_partner(n: int, g: torch.Generator) -> torch.Tensor:
    """Each image's mixing image: a random permutation of ``range(n)`` without fixed points (redrawn
    from ``g`` until no image is its own partner), so every image mixes with another one; ``n = 1``: itself."""
    if n < 2:
        return torch.zeros(n, dtype=torch.long)
    while True:
        p = torch.randperm(n, generator=g)
        if (p != torch.arange(n)).all():
            return p


def cutmix(t: torch.Tensor, mix: Mix) -> torch.Tensor:
    """Inside each image's box, its mixing image's values: images (B,C,H,W), labels or confidences (B,H,W)."""
    src = t[mix.partner.to(t.device)]
    b = mix.boxes.to(t.device)
    return torch.where(b[:, None] if t.dim() == 4 else b, src, t)


def strong_view(x: torch.Tensor, g: torch.Generator, photometric_ops: bool = True, box: bool = True,
                partner: Optional[torch.Tensor] = None):
    """A strong view of the batch ``x`` (B,3,H,W) in [-1, 1], built image by image from ``g``: the
    photometric chain (``photometric_ops``; else the images as they are) and a CutMix box per image
    (``box``; else all False), then the pairing (:func:`mix_partner`, from ``g`` unless ``partner`` is
    given). Returns ``(view before mixing, Mix)``; mix with :func:`cutmix`."""
    views, boxes = [], []
    for img in x:
        if photometric_ops:
            img = (photometric((img.float() + 1) / 2, g) * 2 - 1).to(x.dtype)
        views.append(img)
        boxes.append(cutmix_box(*x.shape[-2:], g) if box else torch.zeros(x.shape[-2:], dtype=torch.bool))
    if partner is None:
        partner = mix_partner(x.shape[0], g)
    return torch.stack(views), Mix(torch.stack(boxes), partner)
