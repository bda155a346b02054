"""The shipped artefacts: the Dockerfile lints clean, the example config loads and names
every setting, the console script answers, the hot path runs compiled where the build
could compile it and as pure Python when asked."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy import PURE_PYTHON_ENV, __version__, pure_python_wanted
from proxy.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run(
        [hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _leaf_paths(value: Any, prefix: str = "") -> set[str]:
    if isinstance(value, dict):
        out: set[str] = set()
        for key, child in value.items():
            out |= _leaf_paths(child, f"{prefix}{key}.")
        return out
    return {prefix.rstrip(".")}


def test_example_config_documents_every_setting() -> None:
    example = yaml.safe_load((ROOT / "config.example.yaml").read_text())
    documented = _leaf_paths(example)
    defaults = _leaf_paths(Settings().model_dump(mode="json"))
    assert defaults - documented == set(), "settings missing from config.example.yaml"
    assert documented - defaults == set(), "config.example.yaml names settings that do not exist"
    assert load_settings(ROOT / "config.example.yaml").model_dump() == Settings().model_dump()


def test_check_config_masks_secrets(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "repository:\n  auth:\n    type: oauth2_client_credentials\n"
        "    token_url: https://idp.example.org/token\n    client_id: proxy\n"
        "    client_secret: s3cr3t-value\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "-c", str(config), "check-config"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert "oauth2_client_credentials" in result.stdout
    assert "s3cr3t-value" not in result.stdout + result.stderr


def test_one_version_everywhere() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["version"] == __version__
    assert importlib.metadata.version("fhir-audit-proxy") == __version__


def test_installed_console_script_answers() -> None:
    script = Path(sys.executable).parent / "fhir-audit-proxy"
    result = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout == f"fhir-audit-proxy {__version__}\n"


def test_mutation_testing_covers_the_packages_that_audit_store_serve_and_deliver() -> None:
    """`scripts/mutation` judges the suite on the code a planted bug would hide in: the
    admin routes (auth, search, ingestion) and delivery (flusher, sinks) as much as the
    audit path."""
    scope = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    packages = {"audit", "fhir", "store", "admin", "delivery"}
    assert {f"proxy/{name}/*" for name in packages} <= set(scope["only_mutate"])
    assert all((ROOT / "proxy" / name).is_dir() for name in packages)


def test_the_example_configuration_ships_with_the_package(tmp_path: Path) -> None:
    """`--help` says to start from config.example.yaml: an installed proxy has it (package
    data, a link to the file at the top of the repository) and prints it."""
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "config.example.yaml" in package_data["package-data"]["proxy"]
    assert (ROOT / "proxy" / "config.example.yaml").resolve() == ROOT / "config.example.yaml"
    script = Path(sys.executable).parent / "fhir-audit-proxy"
    result = subprocess.run(
        [str(script), "config", "example"], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert result.stdout == (ROOT / "config.example.yaml").read_text()
    assert (
        "config example"
        in subprocess.run(
            [str(script), "--help"], capture_output=True, text=True, check=True, cwd=tmp_path
        ).stdout
    )


def test_license_changelog_and_references_exist_and_the_readme_links_them() -> None:
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text, "the full text"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == {"text": "Apache-2.0"}
    readme = (ROOT / "README.md").read_text()
    for linked in ("LICENSE", "CHANGELOG.md", "docs/metrics.md", "docs/logging.md"):
        assert f"]({linked})" in readme, linked
        assert (ROOT / linked).is_file(), linked


def test_the_changelog_says_what_each_store_schema_version_added() -> None:
    """The store migrates itself one way at start: the upgrade notes name every version."""
    from proxy.store.schema import SCHEMA_VERSION

    changelog = (ROOT / "CHANGELOG.md").read_text()
    rows = re.findall(r"^\| (\d+) \| \S", changelog, re.MULTILINE)
    assert [int(n) for n in rows] == list(range(1, SCHEMA_VERSION + 1))


PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
COMPILED = [
    path.removesuffix(".py").replace("/", ".")
    for path in PYPROJECT["tool"]["fhir-audit-proxy"]["mypyc"]["modules"]
]


def _c_compiler_found() -> bool:
    """What setup.py asks before it compiles (its other reason, the variable, aside)."""
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return shutil.which(compiler) is not None and headers.exists()


def test_the_hot_path_runs_compiled_where_the_build_could_compile_it() -> None:
    modules = [importlib.import_module(name) for name in COMPILED]
    files = {m.__name__: str(m.__file__) for m in modules}
    if pure_python_wanted():
        assert all(f.endswith(".py") for f in files.values()), files
        return
    if not _c_compiler_found():
        pytest.skip("no C compiler or Python headers here: the build is pure Python")
    assert all(f.endswith(tuple(EXTENSION_SUFFIXES)) for f in files.values()), (
        f"{files}: not compiled; scripts/setup compiles them (a C compiler is here)"
    )


def test_pure_python_is_imported_when_asked() -> None:
    program = (
        "import proxy.audit.balp as m, proxy.fhir.interaction as n; print(m.__file__, n.__file__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={**os.environ, PURE_PYTHON_ENV: "1"},
    )
    assert done.stdout.split() == [
        str(ROOT / "proxy" / "audit" / "balp.py"),
        str(ROOT / "proxy" / "fhir" / "interaction.py"),
    ]


def test_the_build_compiles_with_the_mypy_that_checks_the_code() -> None:
    """mypyc is mypy's: the build's and the type check's must be the same release."""
    build = [r for r in PYPROJECT["build-system"]["requires"] if r.startswith("mypy")]
    checks = [
        r for r in PYPROJECT["project"]["optional-dependencies"]["test"] if r.startswith("mypy")
    ]
    assert build == checks == [f"mypy=={importlib.metadata.version('mypy')}"]
