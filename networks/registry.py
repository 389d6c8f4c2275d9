"""Name -> model factory registry.

An architecture is one factory registered under one or more names::

    @register("resnet18")
    def _resnet18(num_classes=2, **kw):
        return SegModel(...)

Families with open-ended names (for example ``smp:<Decoder>/<encoder>``) register a
*prefix resolver* instead: ``register_prefix("smp:", factory, examples=[...])``; the
factory receives the part after the prefix.
"""
from __future__ import annotations

import difflib
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from utils.checkpoint import IGNORED_PREFIXES as _IGNORED

_FACTORIES: Dict[str, Callable[..., nn.Module]] = {}
_PREFIXES: Dict[str, Tuple[Callable[..., nn.Module], List[str]]] = {}


def register(*names: str):
    """Decorator: register a factory ``f(num_classes=2, **kw) -> nn.Module`` under ``names``."""

    def deco(fn):
        for name in names:
            if name in _FACTORIES:
                raise ValueError(f"architecture {name!r} is registered twice")
            _FACTORIES[name] = fn
        return fn

    return deco


def register_prefix(prefix: str, factory: Callable[..., nn.Module], examples: List[str]):
    """Register a family ``prefix + spec``; ``examples`` are concrete names listed by available()."""
    _PREFIXES[prefix] = (factory, list(examples))


def available() -> List[str]:
    """Every registered name usable as-is in a config (a representative set for prefix families)."""
    names = list(_FACTORIES)
    for _, (_, examples) in _PREFIXES.items():
        names.extend(examples)
    return names


def build_model(arch: str, num_classes: int = 2, **kwargs) -> nn.Module:
    """Build the segmentation model registered as ``arch``.

    The model's ``forward(x, need_fp=False)`` returns ``{'mask': logits, 'confidence': logits}``;
    see :class:`networks.segmodel.SegModel`.
    """
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"architecture name must be a non-empty string, got {arch!r}")
    if arch in _FACTORIES:
        model = _FACTORIES[arch](num_classes=num_classes, **kwargs)
    else:
        for prefix, (factory, _) in _PREFIXES.items():
            if arch.startswith(prefix):
                model = factory(arch[len(prefix):], num_classes=num_classes, **kwargs)
                break
        else:
            close = difflib.get_close_matches(arch, available(), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise KeyError(
                f"unknown architecture {arch!r}.{hint} Available: {', '.join(available())}"
                + (f" (and any '{'|'.join(_PREFIXES)}' name)" if _PREFIXES else "")
            )
    model.arch = arch
    return model


# --- which architecture does a state dict belong to? (error messages of networks.load_weights) ---

def _signature(model_or_sd) -> set:
    sd = model_or_sd if isinstance(model_or_sd, dict) else model_or_sd.state_dict()
    return {(k, tuple(v.shape)) for k, v in sd.items() if not k.startswith(_IGNORED)}


def guess_arch(state_dict: Dict[str, torch.Tensor], candidates: Optional[List[str]] = None) -> Tuple[str, float]:
    """The registered architecture whose (key, shape) set best matches ``state_dict`` (Jaccard index).

    Models are built on the ``meta`` device, so this allocates no weights.
    """
    target = _signature(state_dict)
    best, score = "unknown", 0.0
    for arch in candidates or available():
        try:
            with torch.device("meta"):
                sig = _signature(build_model(arch))
        except Exception:
            continue
        s = len(sig & target) / max(1, len(sig | target))
        if s > score:
            best, score = arch, s
    return best, score


def load_weights(model: nn.Module, path, arch: Optional[str] = None) -> None:
    """:func:`utils.checkpoint.load_weights`, whose errors also name the architecture the file's keys
    look like."""
    from utils.checkpoint import load_weights as _load

    _load(model, path, arch, guess=guess_arch)
