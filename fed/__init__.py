"""Federated learning as a protocol.

- ``fed/core/``: the method contract (``method.py``: :class:`~fed.core.method.Method`, ``@step``), a party
  (``party.py``), the runner that carries the messages (``runner.py``), the training run (``run.py``),
  scoring and reports, the registry of methods.
- ``fed/common/``: what several methods share (HSSF's local step, the baselines' local step, public-set
  passes, diagnostics).
- ``fed/methods/``: one file per method; each registers itself.
- ``fed/flower/``: the same protocol over Flower (codec, sites, simulation and deployment).

Imports run one way: ``methods`` -> ``common`` -> ``core`` (and ``flower`` -> ``core``); ``datasets/``,
``networks/`` and ``utils/`` import nothing of ``fed``.
"""
from fed.core.registry import METHODS, register  # noqa: F401
import fed.methods  # noqa: F401,E402  (registers every method)


def check_config(cfg) -> list:
    """The method exists and accepts the configuration."""
    if cfg.method not in METHODS:
        return [f"method: {cfg.method!r} is not one of {', '.join(sorted(METHODS))}"]
    return METHODS[cfg.method].check_config(cfg)


def load_config(path=None, overrides=(), extra=None):
    """:func:`utils.config.load_config` plus the method's own checks: what the entry points use."""
    from utils.config import load_config as _load

    return _load(path, overrides, extra, check=check_config)
