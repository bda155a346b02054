"""fhir-audit-proxy: a sidecar reverse proxy that gives any FHIR server a durable IHE BALP
audit trail.

Installed where a C compiler is found, some of its modules are compiled by mypyc
(``setup.py``) and stand beside their sources as extension modules, which Python imports
first. With ``AUDIT_PROXY_PURE_PYTHON`` set (to anything but ``0``), its modules imported
from then on are imported from their Python sources instead: the same code, uncompiled
(processes the proxy starts inherit the variable)."""

import os
import sys
from collections.abc import Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import SOURCE_SUFFIXES, FileFinder, ModuleSpec, SourceFileLoader
from types import ModuleType

__version__ = "0.1.0"

PURE_PYTHON_ENV = "AUDIT_PROXY_PURE_PYTHON"
"""Not under ``FHIR_AUDIT_``: it is no setting of the proxy but a choice of its build."""


def pure_python_wanted() -> bool:
    """Whether the environment asks for the pure-Python modules."""
    return os.environ.get(PURE_PYTHON_ENV, "") not in ("", "0")


class SourceFinder(MetaPathFinder):
    """While :func:`pure_python_wanted`, finds this package's modules as Python sources,
    never as extension modules; otherwise leaves every import to the usual finders."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if path is None or not fullname.startswith(__name__ + ".") or not pure_python_wanted():
            return None
        for entry in path:
            spec = FileFinder(entry, (SourceFileLoader, SOURCE_SUFFIXES)).find_spec(
                fullname, target
            )
            if spec is not None and spec.loader is not None:
                return spec
        return None


if not any(isinstance(f, SourceFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, SourceFinder())
