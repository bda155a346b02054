"""Files and directories that hold PHI or secrets (the store, the NDJSON repository file,
the token key, the workers' reports): created for their owner alone, whatever the umask."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def create_private_parents(path: Path) -> None:
    """Create the missing directories above ``path``, each 0700 (``mkdir -p`` would give
    them the umask's mode, commonly 0755)."""
    missing = []
    parent = path.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process got there first
            directory.mkdir(mode=0o700)
            os.chmod(directory, 0o700)


def write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``, whole (a reader never sees half a file), readable by
    its owner only."""
    partial = path.with_name(path.name + ".partial")
    with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as file:
        file.write(data)
    os.replace(partial, path)
