"""Federated simulation: parties (``client.py``, ``server.py``), methods (one file each), engine.

Adding a method = one file with a :class:`fed.base.Method` subclass + one line in ``METHODS``.
"""
from .hssf import HSSF
from .local import Local
from .lssl import LSSL

METHODS = {m.name: m for m in (HSSF, LSSL, Local)}
