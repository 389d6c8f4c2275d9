"""Segmentation networks behind a registry: ``build_model(arch)``, ``available()``.

Every model returns ``{'mask': (B,C,H,W) logits, 'confidence': (B,1,H,W) SA logits}``; see
:mod:`networks.segmodel`. Adding an architecture = one module that calls ``register`` + one import
line below.
"""
from .registry import available, build_model, register, register_prefix  # noqa: F401
from .segmodel import SegModel, SelfAssessmentHead  # noqa: F401

from . import resnet  # noqa: F401,E402  (registers resnet18..resnet152)
