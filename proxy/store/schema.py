"""The queue's schema and its migrations, applied once each at start-up.

The schema version is SQLite's ``PRAGMA user_version``; each migration runs in its own
transaction together with the version bump, so a crash mid-migration leaves the previous
version intact.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
from collections.abc import Callable

import orjson

from proxy.store.codec import BodyCodec, CodecError, shipped_dictionary
from proxy.store.fans import fan_of
from proxy.store.index import who_of

log = logging.getLogger(__name__)

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
    # 3: what the admin search and the viewer filter on. ``event_terms`` is an inverted
    # index kept by triggers from ``events.terms`` (see ``event_row``): ordered by
    # (term, recorded time, seq), so "this patient's or this agent's events, newest first,
    # after this cursor" is one index range however many events the store holds.
    # Rows stored before this version get their patient and user terms from the columns
    # they already had: see BACKFILLS.
    """
    ALTER TABLE events ADD COLUMN terms TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE events ADD COLUMN type_code TEXT;
    ALTER TABLE events ADD COLUMN entity_types TEXT NOT NULL DEFAULT '|';
    ALTER TABLE events ADD COLUMN request_id TEXT;
    ALTER TABLE events ADD COLUMN updated_ts REAL;
    CREATE TABLE event_terms (
        term TEXT NOT NULL,
        ts REAL NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (term, ts, seq)
    ) WITHOUT ROWID;
    CREATE TRIGGER events_terms_insert AFTER INSERT ON events BEGIN
        INSERT OR IGNORE INTO event_terms (term, ts, seq)
            SELECT value, NEW.recorded_ts, NEW.seq FROM json_each(NEW.terms);
    END;
    CREATE TRIGGER events_terms_delete AFTER DELETE ON events BEGIN
        DELETE FROM event_terms WHERE seq = OLD.seq AND ts = OLD.recorded_ts
            AND term IN (SELECT value FROM json_each(OLD.terms));
    END;
    """,
    # 4: why an intent was abandoned (the store refused its events), so that the event
    # recorded for it after a restart still says so.
    """
    ALTER TABLE intents ADD COLUMN reason TEXT;
    """,
    # 5: the bodies of an exchange (``audit.capture_bodies``), compressed like event
    # bodies, by the exchange's request id; pruned as delivered events are.
    """
    CREATE TABLE captures (
        request_id TEXT PRIMARY KEY,
        created_at REAL NOT NULL,
        request BLOB,
        response BLOB
    );
    """,
    # 6: a row may hold several events that differ only in their id and one patient
    # (records.FanOut.stored): ``fan`` is how many, NULL for a row of one event. The row's
    # seq is its last event's; the seqs below it, down to ``seq - fan + 1``, are its other
    # events' and no row takes them (see proxy/store/fans.py).
    """
    ALTER TABLE events ADD COLUMN fan INTEGER;
    """,
    # 7: what the privacy reports read (proxy/store/reports.py), kept by triggers.
    # ``access_pairs``: each (user, patient) an event names, ordered by time, so a user's
    # first access to a patient is one index seek (admin reads of the trail are no access
    # to a patient's record and are left out). Its patients are those of the row's
    # ``patients`` column, unversioned: read from the column for a row naming one (most
    # rows: no JSON to parse), from the ``e:`` terms for a row naming several (a fan-out
    # row: all its patients, under the row's seq). ``activity``: events counted per
    # quarter hour (``slot`` = recorded_ts // 900, so that a day in any zone is whole
    # slots), action, outcome and whether they record admin access (the
    # ``k:admin-access`` term, proxy/store/marks.py), so an activity chart over the whole
    # store reads a row per slot, not every event.
    # Rows stored before this version get both from BACKFILLS.
    """
    CREATE TABLE access_pairs (
        user_id TEXT NOT NULL,
        patient TEXT NOT NULL,
        ts REAL NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (user_id, patient, ts, seq)
    ) WITHOUT ROWID;
    CREATE TRIGGER events_pairs_insert_one AFTER INSERT ON events
    WHEN NEW.user_id IS NOT NULL AND NEW.patients != '|'
    AND instr(substr(NEW.patients, 2), '|') = length(NEW.patients) - 1
    AND instr(NEW.terms, '"k:admin-access"') = 0 BEGIN
        INSERT OR IGNORE INTO access_pairs (user_id, patient, ts, seq) VALUES (
            NEW.user_id,
            CASE WHEN instr(NEW.patients, '/_history/')
                THEN substr(NEW.patients, 2, instr(NEW.patients, '/_history/') - 2)
                ELSE substr(NEW.patients, 2, length(NEW.patients) - 2) END,
            NEW.recorded_ts,
            NEW.seq);
    END;
    CREATE TRIGGER events_pairs_insert_many AFTER INSERT ON events
    WHEN NEW.user_id IS NOT NULL
    AND instr(substr(NEW.patients, 2), '|') < length(NEW.patients) - 1
    AND instr(NEW.terms, '"k:admin-access"') = 0 BEGIN
        INSERT OR IGNORE INTO access_pairs (user_id, patient, ts, seq)
            SELECT NEW.user_id, substr(value, 3), NEW.recorded_ts, NEW.seq
            FROM json_each(NEW.terms)
            WHERE substr(value, 1, 2) = 'e:' AND instr(value, '/_history/') = 0
            AND (instr(NEW.patients, '|' || substr(value, 3) || '|')
                 OR instr(NEW.patients, '|' || substr(value, 3) || '/_history/'));
    END;
    CREATE TRIGGER events_pairs_delete_one AFTER DELETE ON events
    WHEN OLD.user_id IS NOT NULL AND OLD.patients != '|'
    AND instr(substr(OLD.patients, 2), '|') = length(OLD.patients) - 1 BEGIN
        DELETE FROM access_pairs WHERE user_id = OLD.user_id
            AND patient = CASE WHEN instr(OLD.patients, '/_history/')
                THEN substr(OLD.patients, 2, instr(OLD.patients, '/_history/') - 2)
                ELSE substr(OLD.patients, 2, length(OLD.patients) - 2) END
            AND ts = OLD.recorded_ts AND seq = OLD.seq;
    END;
    CREATE TRIGGER events_pairs_delete_many AFTER DELETE ON events
    WHEN OLD.user_id IS NOT NULL
    AND instr(substr(OLD.patients, 2), '|') < length(OLD.patients) - 1 BEGIN
        DELETE FROM access_pairs
            WHERE user_id = OLD.user_id AND ts = OLD.recorded_ts AND seq = OLD.seq
            AND patient IN (SELECT substr(value, 3) FROM json_each(OLD.terms)
                            WHERE substr(value, 1, 2) = 'e:');
    END;
    CREATE TABLE activity (
        slot INTEGER NOT NULL,
        action TEXT NOT NULL,
        outcome TEXT NOT NULL,
        admin INTEGER NOT NULL,
        events INTEGER NOT NULL,
        PRIMARY KEY (slot, action, outcome, admin)
    ) WITHOUT ROWID;
    CREATE TRIGGER events_activity_insert AFTER INSERT ON events BEGIN
        INSERT INTO activity (slot, action, outcome, admin, events)
            VALUES (CAST(NEW.recorded_ts / 900 AS INTEGER), COALESCE(NEW.action, ''),
                    COALESCE(NEW.outcome, ''), instr(NEW.terms, '"k:admin-access"') > 0,
                    COALESCE(NEW.fan, 1))
            ON CONFLICT DO UPDATE SET events = events + excluded.events;
    END;
    CREATE TRIGGER events_activity_delete AFTER DELETE ON events BEGIN
        UPDATE activity SET events = events - COALESCE(OLD.fan, 1)
            WHERE slot = CAST(OLD.recorded_ts / 900 AS INTEGER)
            AND action = COALESCE(OLD.action, '') AND outcome = COALESCE(OLD.outcome, '')
            AND admin = (instr(OLD.terms, '"k:admin-access"') > 0);
    END;
    """,
    # 8: who acted in each event as the privacy reports list it (``EventRow.who``: the
    # requestor's name and roles, the OAuth client, the network address), so that a
    # report's summary of thousands of events reads their rows, not their JSON. Rows
    # stored before this version get it from their bodies: see BACKFILLS.
    """
    ALTER TABLE events ADD COLUMN who TEXT;
    """,
    # 9: the Merkle log (proxy/log). ``leaf`` is the leaf index of a row's first event (a
    # fan-out's events have the ``fan`` leaves from it); NULL for rows stored before this
    # version, which are not in the log. Leaves grow with seqs, so a leaf's row is found
    # by seq (proxy/store/leaves.py) and ``leaf`` needs no index of its own to write.
    # ``leaf_hashes``: the row's events' leaf hashes. ``log_hashes`` keeps the tree as its
    # tile hashes (level 0: the leaf hashes of complete tiles and of pruned events; level
    # L: each complete run of 256**L leaves), kept after their events are pruned;
    # ``log_pruned`` the leaf ranges whose events pruning deleted;
    # ``log_checkpoints`` the signed checkpoints; ``log_meta`` the log's random id, which
    # names it in its origin.
    """
    ALTER TABLE events ADD COLUMN leaf INTEGER;
    ALTER TABLE events ADD COLUMN leaf_hashes BLOB;
    CREATE TABLE log_hashes (
        level INTEGER NOT NULL,
        idx INTEGER NOT NULL,
        hash BLOB NOT NULL,
        PRIMARY KEY (level, idx)
    ) WITHOUT ROWID;
    CREATE TABLE log_pruned (
        first INTEGER PRIMARY KEY,
        last INTEGER NOT NULL
    );
    CREATE TABLE log_checkpoints (
        size INTEGER PRIMARY KEY,
        created_at REAL NOT NULL,
        note TEXT NOT NULL,
        shipped_at REAL,
        ship_error TEXT
    );
    CREATE TABLE log_meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    INSERT INTO log_meta (key, value) VALUES ('id', lower(hex(randomblob(8))));
    """,
    # 10: a complete level-0 tile of the log as one row: its 256 leaf hashes joined (8 KB),
    # written by the commit that completes it. It was 256 rows of ``log_hashes``, whose
    # insert was the largest part of what the log cost the writer. ``log_hashes`` level 0
    # still holds what pruning copies out of the rows of a tile not yet complete, and the
    # tiles completed before this version (readers take both).
    """
    CREATE TABLE log_tiles (
        idx INTEGER PRIMARY KEY,
        hashes BLOB NOT NULL
    );
    """,
)
"""Migration ``n`` (1-based) takes the schema from version ``n - 1`` to ``n``. Append only."""

SCHEMA_VERSION = len(MIGRATIONS)

BACKFILLS: dict[int, str] = {
    # 3: search terms of the rows stored before it, from their patient and user columns.
    3: """
    WITH RECURSIVE split(seq, rest, item) AS (
        SELECT seq, substr(patients, 2), NULL FROM events
        WHERE patients != '|' AND seq > :lo AND seq <= :hi
        UNION ALL
        SELECT seq, substr(rest, instr(rest, '|') + 1), substr(rest, 1, instr(rest, '|') - 1)
        FROM split WHERE rest != ''
    ), old_terms(seq, term) AS (
        SELECT seq, 'e:' || item FROM split WHERE item IS NOT NULL AND item != ''
        UNION
        SELECT seq, 'a:' || user_id FROM events
        WHERE user_id IS NOT NULL AND seq > :lo AND seq <= :hi
    )
    UPDATE events SET terms = (
        SELECT json_group_array(term) FROM old_terms WHERE old_terms.seq = events.seq
    ), updated_ts = recorded_ts
    WHERE seq IN (SELECT seq FROM old_terms);
    UPDATE events SET updated_ts = recorded_ts
        WHERE updated_ts IS NULL AND seq > :lo AND seq <= :hi;
    INSERT OR IGNORE INTO event_terms (term, ts, seq)
        SELECT j.value, e.recorded_ts, e.seq FROM events e, json_each(e.terms) j
        WHERE e.seq > :lo AND e.seq <= :hi;
    """,
    # 7: the access pairs and activity counts of the rows stored before it.
    7: """
    INSERT OR IGNORE INTO access_pairs (user_id, patient, ts, seq)
        SELECT e.user_id, substr(j.value, 3), e.recorded_ts, e.seq
        FROM events e, json_each(e.terms) j
        WHERE e.seq > :lo AND e.seq <= :hi AND e.user_id IS NOT NULL AND e.patients != '|'
        AND instr(e.terms, '"k:admin-access"') = 0
        AND substr(j.value, 1, 2) = 'e:' AND instr(j.value, '/_history/') = 0
        AND (instr(e.patients, '|' || substr(j.value, 3) || '|')
             OR instr(e.patients, '|' || substr(j.value, 3) || '/_history/'));
    INSERT INTO activity (slot, action, outcome, admin, events)
        SELECT CAST(recorded_ts / 900 AS INTEGER), COALESCE(action, ''),
               COALESCE(outcome, ''), instr(terms, '"k:admin-access"') > 0,
               SUM(COALESCE(fan, 1))
        FROM events WHERE seq > :lo AND seq <= :hi
        GROUP BY 1, 2, 3, 4
        ON CONFLICT DO UPDATE SET events = events + excluded.events;
    """,
}
"""Row rewrites that go with migration ``n``, run after its statements in the same
transaction, over the events table ``BACKFILL_ROWS`` rows at a time (by seq, bounds
``:lo`` exclusive and ``:hi`` inclusive) so that progress can be logged. A rewrite SQL
cannot make is a function of the connection and the bounds (:data:`BODY_BACKFILLS`)."""


Backfill = Callable[[sqlite3.Connection, int, int], None]
"""One rewrite of the rows whose seqs are in ``(lo, hi]``, given the connection, lo, hi."""


def _who_backfill(conn: sqlite3.Connection, lo: int, hi: int) -> None:
    """``who`` of the rows in ``(lo, hi]`` that have none, read from their bodies (a body
    that cannot be read leaves it NULL: the reports then read it as nobody named)."""
    codec = BodyCodec(shipped_dictionary(), dict(conn.execute("SELECT id, data FROM dictionaries")))
    found: list[tuple[str, int]] = []
    for seq, fan, event_id, patients, body in conn.execute(
        "SELECT seq, fan, event_id, patients, body FROM events"
        " WHERE seq > ? AND seq <= ? AND who IS NULL",
        (lo, hi),
    ):
        if isinstance(body, str):  # SQLite keeps a body bound as text as text
            body = body.encode()
        if not isinstance(body, bytes):  # nor any other value a writer bound
            continue
        try:
            if fan is None:
                event = codec.decode(body)
            else:  # the agents are what a fan-out's events share
                event = orjson.loads(fan_of(event_id, patients, codec.decompress(body)).event(0)[1])
        except (CodecError, ValueError):
            continue
        agents = event.get("agent") if isinstance(event, dict) else None
        found.append((who_of(agents if isinstance(agents, list) else ()).column(), seq))
    conn.executemany("UPDATE events SET who = ? WHERE seq = ?", found)


BODY_BACKFILLS: dict[int, Backfill] = {
    8: _who_backfill,
}
"""Rewrites that go with migration ``n`` as :data:`BACKFILLS`, made in Python (from the
rows' bodies), given the connection and the bounds ``lo`` (exclusive) and ``hi``."""

BACKFILL_ROWS = 10_000
"""Rows per backfill step: one progress line each."""


def split_statements(script: str) -> list[str]:
    """The statements of ``script``; a trigger's body keeps its own semicolons."""
    out: list[str] = []
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                out.append(pending.strip())
            pending = ""
    return out


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
            for statement in split_statements(MIGRATIONS[version - 1]):
                conn.execute(statement)
            steps: list[Backfill] = [
                functools.partial(_run_statement, statement)
                for statement in split_statements(BACKFILLS.get(version, ""))
            ]
            if version in BODY_BACKFILLS:
                steps.append(BODY_BACKFILLS[version])
            if steps:
                _backfill(conn, version, steps)
            conn.execute(f"PRAGMA user_version = {version}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return SCHEMA_VERSION


def _run_statement(statement: str, conn: sqlite3.Connection, lo: int, hi: int) -> None:
    conn.execute(statement, {"lo": lo, "hi": hi})


def _backfill(
    conn: sqlite3.Connection,
    version: int,
    steps: list[Backfill],
) -> None:
    """Run ``steps`` over every events row, ``BACKFILL_ROWS`` at a time, logging
    progress at INFO after each step (a large store takes minutes)."""
    total: int = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    if not total:
        return
    log.info("store migration %d: rewriting %d events", version, total)
    done, lo = 0, -1
    while done < total:
        row = conn.execute(
            "SELECT seq FROM events WHERE seq > ? ORDER BY seq LIMIT 1 OFFSET ?",
            (lo, BACKFILL_ROWS - 1),
        ).fetchone()
        hi: int = row[0] if row else conn.execute("SELECT MAX(seq) FROM events").fetchone()[0]
        for step in steps:
            step(conn, lo, hi)
        done = min(total, done + BACKFILL_ROWS) if row else total
        log.info(
            "store migration %d: %d of %d events (%d%%)", version, done, total, done * 100 // total
        )
        lo = hi
