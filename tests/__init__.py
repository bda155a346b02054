"""The test suite. This module runs before anything of the proxy is imported (pytest
imports the package before its conftest): where the tree's compiled modules (mypyc,
built in place by ``scripts/setup``) are older than one of the proxy's sources, the
suite imports the pure-Python sources instead (``AUDIT_PROXY_PURE_PYTHON=1``, inherited
by the processes the tests start), so an edit is tested as written; the report says
which build ran. ``scripts/setup`` compiles the edited tree again."""

from __future__ import annotations

import os
from pathlib import Path

from proxy import PURE_PYTHON_ENV

ROOT = Path(__file__).resolve().parent.parent


def compiled_library() -> Path | None:
    """The shared library mypyc built in this tree, if there is one (at the top for
    several modules, beside the module for one)."""
    found = [*ROOT.glob("*__mypyc.*.so"), *(ROOT / "proxy").rglob("*__mypyc.*.so")]
    return min(found, key=lambda p: p.stat().st_mtime, default=None)


def edited_since_compiled() -> list[str]:
    """The proxy's sources newer than the compiled modules built from the tree (a compiled
    module may hold what it took from modules it imports, so every source counts)."""
    library = compiled_library()
    if library is None:
        return []
    built = library.stat().st_mtime
    return sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "proxy").rglob("*.py")
        if p.stat().st_mtime > built
    )


EDITED_SINCE_COMPILED = edited_since_compiled()
if EDITED_SINCE_COMPILED:
    os.environ[PURE_PYTHON_ENV] = "1"
