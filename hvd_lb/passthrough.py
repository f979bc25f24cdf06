"""``import hvd_lb.torch as hvd`` / ``import hvd_lb.tf as hvd``: a package that is a superset of a
Horovod module. Names the package defines win; every other public name is Horovod's."""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Mapping, Optional


def horovod_superset(namespace: dict, horovod_module: str, optimizers: Mapping[str, type],
                     special: Optional[Dict[str, Callable]] = None):
    """Module-level ``(__getattr__, __dir__)`` for the package whose ``globals()`` is ``namespace``.

    ``optimizers``: the live rule → class registry (classes of rules registered later resolve
    too); ``special``: names resolved by a call of their own (e.g. a lazily imported submodule).
    """
    package = namespace["__name__"]

    def horovod():
        try:
            return importlib.import_module(horovod_module)
        except ImportError:
            return None

    def __getattr__(name):
        if special and name in special:
            return special[name]()
        for cls in optimizers.values():
            if cls.__name__ == name:
                return cls
        hvd = horovod()
        if hvd is not None and not name.startswith("__") and hasattr(hvd, name):
            return getattr(hvd, name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}"
                             + ("" if hvd is not None else f" ({horovod_module} is not installed)"))

    def __dir__():
        hvd = horovod()
        theirs = [n for n in dir(hvd) if not n.startswith("_")] if hvd is not None else []
        return sorted(set(namespace) | set(theirs) | {c.__name__ for c in optimizers.values()})

    return __getattr__, __dir__
