"""Builds fhir-audit-proxy: its hot-path modules (``[tool.fhir-audit-proxy.mypyc]`` in
pyproject.toml) compiled to C extensions by mypyc where a C compiler and Python's headers
are found; everything else, and everything when they are not (or when
``AUDIT_PROXY_PURE_PYTHON`` is set), pure Python. The metadata is pyproject.toml's.

A compiled module stands beside its source (``balp.py`` and ``balp.cpython-*.so``) and
Python imports the extension first; ``AUDIT_PROXY_PURE_PYTHON=1`` at run time imports the
sources instead (see ``proxy/__init__.py``).
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import tomllib
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
PURE_PYTHON_ENV = "AUDIT_PROXY_PURE_PYTHON"


def compiled_sources() -> list[str]:
    """The modules mypyc compiles, as paths relative to the project."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return list(config["tool"]["fhir-audit-proxy"]["mypyc"]["modules"])


def why_pure() -> str | None:
    """Why this build cannot or should not compile (None: it compiles)."""
    if os.environ.get(PURE_PYTHON_ENV, "") not in ("", "0"):
        return f"{PURE_PYTHON_ENV} is set"
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        return f"no C compiler ({compiler}) found"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return "Python's C headers (Python.h) are not installed"
    return None


def extensions() -> list[object]:
    reason = why_pure()
    if reason is not None:
        print(f"fhir-audit-proxy: pure Python ({reason})", file=sys.stderr)
        return []
    from mypyc.build import mypycify

    return list(
        mypycify(
            [
                # The project's [tool.mypy] needs plugins and stubs this isolated build
                # does not have; the code is type-checked by `mypy --strict` in CI. Here
                # mypy only gives mypyc the types: third-party ones it cannot see are Any.
                "--config-file=",
                "--ignore-missing-imports",
                "--follow-imports=silent",
                "--python-version=3.11",
                *compiled_sources(),
            ],
            opt_level="3",
        )
    )


setup(ext_modules=extensions())
