"""Federated learning as a protocol: parties (``party.py``), methods (one file each), the runner that
carries their messages (``runner.py``) and the training run (``run.py``).

Adding a method = one file with a :class:`fed.base.Method` subclass + one line in ``METHODS``.
"""
from .hssf import HSSF
from .local import Local
from .public_only import PublicOnly
from .lssl import LSSL
from .mean_teacher import MeanTeacher
from .fixmatch import FixMatch
from .unimatch import UniMatch
from .eln import ELN
from .semifl import SemiFL
from .fedmd import FedMD
from .ktpfl import KTpFL
from .feddistill import FedDistill
from .fedproto import FedProto
from .rhfl import RHFL

METHODS = {m.name: m for m in (HSSF, LSSL, Local,  # the official code's three
                               PublicOnly,  # the floor: each client on the public set alone
                               MeanTeacher, FixMatch, UniMatch, ELN, SemiFL,  # homogeneous baselines
                               FedMD, KTpFL, FedDistill, FedProto, RHFL)}  # heterogeneous baselines


def check_config(cfg) -> list:
    """The method exists and accepts the configuration."""
    if cfg.method not in METHODS:
        return [f"method: {cfg.method!r} is not one of {', '.join(METHODS)}"]
    return METHODS[cfg.method].check_config(cfg)


def load_config(path=None, overrides=(), extra=None):
    """:func:`utils.config.load_config` plus the method's own checks: what the entry points use."""
    from utils.config import load_config as _load

    return _load(path, overrides, extra, check=check_config)
