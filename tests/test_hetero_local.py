"""The heterogeneous baselines' shared local step (BASELINES.md section 12): its pure pieces by hand."""
import math

import torch

from fed.common.baseline_local import confident_labels
from utils.losses import masked_ce


def test_confident_labels_and_all_pixel_denominator():
    # one image, two pixels: logits (0, 0) -> p = (0.5, 0.5): label 0, confidence 0.5 < 0.95, dropped;
    # (0, 4) -> p1 = 1 / (1 + e^-4) = 0.982 >= 0.95: label 1, kept
    weak = torch.tensor([[[[0.0, 0.0]], [[0.0, 4.0]]]])  # (B=1, C=2, H=1, W=2)
    labels, keep = confident_labels(weak, 0.95)
    assert labels.tolist() == [[[0, 1]]] and keep.tolist() == [[[False, True]]]
    # strong logits all 0: CE = ln 2 at every pixel; kept sum ln 2, divided by all 2 pixels
    strong = torch.zeros(1, 2, 1, 2)
    assert math.isclose(masked_ce(strong, labels, keep).item(), math.log(2) / 2, rel_tol=1e-6)
    # nothing kept: zero loss, not NaN
    assert masked_ce(strong, labels, torch.zeros_like(keep)).item() == 0.0
