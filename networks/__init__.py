"""Segmentation networks behind a registry: ``build_model(arch)``, ``available()``.

Every model returns ``{'mask': (B,C,H,W) logits, 'confidence': (B,1,H,W) SA logits}``; see
:mod:`networks.segmodel`. Adding an architecture = one module that calls ``register`` + one import
line below. ``python -m networks --list`` prints every name with its size and cost.
"""
from .registry import available, build_model, guess_arch, load_weights, register, register_prefix  # noqa: F401
from .segmodel import SegModel, SelfAssessmentHead  # noqa: F401

from . import resnet  # noqa: F401,E402  (registers resnet18..resnet152)
from . import xception, mobilenetv2, vgg  # noqa: F401,E402  (the other official backbones)
from . import pvt  # noqa: F401,E402  (PVTv2-b2 through timm)
from . import unet  # noqa: F401,E402  (plain U-Net)
from . import smp  # noqa: F401,E402  (smp:<Decoder>/<encoder>)
from . import tiny  # noqa: F401,E402  (small DeepLabV3+ for tests and smoke runs)
