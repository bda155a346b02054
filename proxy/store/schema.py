"""The queue's schema and its migrations, applied once each at start-up.

The schema version is SQLite's ``PRAGMA user_version``; each migration runs in its own
transaction together with the version bump, so a crash mid-migration leaves the previous
version intact.
"""

from __future__ import annotations

import sqlite3

MIGRATIONS: tuple[str, ...] = (
    # 1: events with their delivery state, and write intents.
    """
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY,
        event_id TEXT NOT NULL UNIQUE,
        recorded TEXT NOT NULL,
        recorded_ts REAL NOT NULL,
        action TEXT,
        outcome TEXT,
        subtypes TEXT NOT NULL DEFAULT '|',
        patients TEXT NOT NULL DEFAULT '|',
        user_id TEXT,
        status TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL,
        last_error TEXT,
        delivered_at REAL,
        body BLOB NOT NULL
    );
    CREATE INDEX events_status_seq ON events (status, seq);
    CREATE INDEX events_recorded ON events (recorded_ts);
    CREATE TABLE intents (
        id INTEGER PRIMARY KEY,
        created_at REAL NOT NULL,
        summary BLOB NOT NULL
    );
    """,
    # 2: the zstd dictionaries event bodies are compressed with (proxy/store/codec.py).
    """
    CREATE TABLE dictionaries (
        id INTEGER PRIMARY KEY,
        data BLOB NOT NULL
    );
    """,
)
"""Migration ``n`` (1-based) takes the schema from version ``n - 1`` to ``n``. Append only."""

SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the migrations the database has not seen; returns the version reached."""
    current: int = conn.execute("PRAGMA user_version").fetchone()[0]
    if current > SCHEMA_VERSION:
        raise RuntimeError(
            f"store schema version {current} is newer than this proxy knows ({SCHEMA_VERSION})"
        )
    for version in range(current + 1, SCHEMA_VERSION + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[version - 1].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return SCHEMA_VERSION
