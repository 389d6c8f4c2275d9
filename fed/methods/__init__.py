"""One file per method. Every module of this folder is imported here, and each registers its method
(:func:`fed.core.registry.register`): adding a method is adding a file."""
import importlib
import pkgutil

for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_m.name}")
