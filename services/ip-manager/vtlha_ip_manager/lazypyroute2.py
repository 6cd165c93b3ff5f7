"""pyroute2 without its eager package ``__init__``.

pyroute2's ``__init__`` imports the whole library (NDB, IPDB, conntrack, ipset, ipvs,
devlink, wireless: ~130 modules, ~6 MB of RSS), and importing any of its submodules runs
it first. The ip-manager uses three submodules (``iproute.linux``, ``netlink``,
``netns``); with this package stand-in installed first, importing those runs only what
they need, and the real ``__init__`` runs the first time anything asks the package for a
name it defines (``from pyroute2 import IPRoute``), so nothing else changes. Measured
in a fresh interpreter: 32.3 → 26.5 MB and 370 → 241 modules for the ip-manager's
imports; the service itself (``make bench-footprint``) in ``BENCHMARKS.md``."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
from typing import Any


def install() -> None:
    """Put the stand-in in ``sys.modules`` unless pyroute2 is imported already."""
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.submodule_search_locations is None \
            or not isinstance(spec.loader, importlib.abc.InspectLoader):
        return  # not installed (the import itself will say so), or not loadable so
    loader = spec.loader
    pkg = types.ModuleType("pyroute2")
    pkg.__spec__ = spec
    pkg.__file__ = spec.origin
    pkg.__loader__ = spec.loader
    pkg.__package__ = "pyroute2"
    pkg.__path__ = list(spec.submodule_search_locations)
    loaded = [False]

    def __getattr__(name: str) -> Any:  # the module's own hook (PEP 562)
        if name.startswith("__"):
            raise AttributeError(name)
        if not loaded[0] and importlib.util.find_spec(f"pyroute2.{name}") is not None:
            return importlib.import_module(f"pyroute2.{name}")  # a submodule: just that
        if not loaded[0]:
            loaded[0] = True
            code = loader.get_code("pyroute2")
            if code is not None:
                exec(code, pkg.__dict__)  # the real __init__, in this module
            if name in pkg.__dict__:
                return pkg.__dict__[name]
        raise AttributeError(f"module 'pyroute2' has no attribute {name!r}")

    pkg.__getattr__ = __getattr__  # type: ignore[method-assign]
    sys.modules["pyroute2"] = pkg
