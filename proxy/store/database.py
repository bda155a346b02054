"""The store file: how it is opened (by the proxy and by its writer process alike), the
dictionaries its bodies are compressed with, and its disk budget."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

from proxy.private_files import create_private_parents
from proxy.store.codec import BodyCodec, dictionary_id, shipped_dictionary
from proxy.store.schema import migrate


def used_bytes(conn: sqlite3.Connection) -> int:
    """Bytes in pages that hold data (free pages are reused before the file grows)."""
    page_size, pages, free = conn.execute(
        "SELECT page_size, page_count, freelist_count"
        " FROM pragma_page_size, pragma_page_count, pragma_freelist_count"
    ).fetchone()
    return int(page_size * (pages - free))


_SHM_BUDGET = 128 * 1024
"""Room kept for the WAL's shared-memory index (32 KiB per 4,096 WAL frames)."""


def wal_budget(max_bytes: int) -> int:
    """Bytes of ``max_bytes`` kept for the write-ahead log: an eighth, between 256 KiB
    and 64 MiB. The WAL is checkpointed when it holds half of it
    (``wal_autocheckpoint``) and truncated back to it (``journal_size_limit``)."""
    return min(64 * 1024 * 1024, max(256 * 1024, max_bytes // 8))


def database_budget(max_bytes: int) -> int:
    """Bytes the database's pages may use so that database, WAL and shared-memory index
    together stay under ``max_bytes``."""
    return max(0, max_bytes - wal_budget(max_bytes) - _SHM_BUDGET)


def is_full(exc: sqlite3.Error) -> bool:
    """Whether ``exc`` says the disk (or the database's size limit) is full."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code == sqlite3.SQLITE_FULL or "full" in str(exc).lower()


def create_private(path: Path) -> None:
    """Create the store's missing directories (0700) and its file (0600), and take group and
    other access away from an existing store and its ``-wal``/``-shm``: they hold PHI. The
    modes are set explicitly, whatever the umask; SQLite gives ``-wal`` and ``-shm`` the
    database file's mode when it creates them."""
    create_private_parents(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        companion = path.with_name(path.name + suffix)
        with contextlib.suppress(FileNotFoundError):
            if companion.stat().st_mode & 0o077:
                os.chmod(companion, 0o600)


def connect(path: Path, migrate_schema: bool, max_bytes: int) -> sqlite3.Connection:
    """A connection to the store at ``path`` in WAL mode with ``synchronous=FULL`` (every
    commit fsynced), the WAL bounded by :func:`wal_budget`; migrated when asked."""
    create_private(path)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=10000")
    # Only takes effect when the file is created. Compressed events are ~200 bytes, so
    # a group commit of 64 fills a few pages, and each of the three indexes rewrites
    # its last page per commit: with 4 KiB pages that is 4x fewer bytes to fsync than
    # with 16 KiB (raw SQLite, 64 rows/commit: 60k/s against 42k/s).
    conn.execute("PRAGMA page_size=4096")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    # max_bytes bounds the files, not only the pages: the WAL gets its own budget.
    budget = wal_budget(max_bytes)
    conn.execute(f"PRAGMA journal_size_limit={budget}")
    conn.execute(f"PRAGMA wal_autocheckpoint={max(16, budget // 4096 // 2)}")
    if migrate_schema:
        migrate(conn)
    return conn


def load_codec(conn: sqlite3.Connection) -> BodyCodec:
    """The shipped dictionary, recorded in the store before any row uses it, and every
    dictionary older rows were written with."""
    shipped = shipped_dictionary()
    conn.execute(
        "INSERT OR IGNORE INTO dictionaries (id, data) VALUES (?, ?)",
        (dictionary_id(shipped), shipped),
    )
    known = dict(conn.execute("SELECT id, data FROM dictionaries").fetchall())
    return BodyCodec(shipped, known)
