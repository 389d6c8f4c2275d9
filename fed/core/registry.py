"""The methods by name: each method file registers its class with :func:`register`; ``fed.methods``
imports every file of its folder, so adding a method is adding one file there."""
from __future__ import annotations

from typing import Dict

#: name -> method class, filled as ``fed.methods`` is imported (``import fed`` does it)
METHODS: Dict[str, type] = {}


def register(cls):
    """Class decorator: make ``cls`` (a :class:`fed.core.method.Method` with its own ``name``) the method
    of that name, and its ``options`` (``{key: utils.config.Key}``, if it declares them) the configuration
    section ``cls.section`` (default: its name)."""
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__}: a registered method sets its own `name`")
    if name in METHODS and METHODS[name] is not cls:
        raise TypeError(f"{cls.__name__}: the method name {name!r} is taken by {METHODS[name].__name__}")
    METHODS[name] = cls
    options = cls.__dict__.get("options")
    if options:
        from utils.config import add_section

        add_section(cls.__dict__.get("section") or name, options)
    return cls
