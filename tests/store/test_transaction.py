"""The writer process's transaction as named steps, run here on the test's own connection
(the writer process runs the same committer): what a batch costs in statements, and that
a new step slots into the same transaction as one more entry."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

import orjson
import pytest

from proxy.audit.balp import AuditContext, build_events, store_entries, store_rows
from proxy.log.entry import EntryTemplate, entry_of
from proxy.log.tree import leaf_hash, root_of
from proxy.store.database import connect, load_codec
from proxy.store.faces import StoreError
from proxy.store.fans import fan_of
from proxy.store.index import event_row
from proxy.store.leaves import template_leaves, tile_hashes, tree_size
from proxy.store.records import Capture, FanOut, member_id
from proxy.store.tables import INSERTED, DeliveryState
from proxy.store.transaction import STEPS, Committer, Step, Transaction
from proxy.store.wire import Submission
from tests.factories import queued_event, search_exchange

NOW = datetime(2026, 12, 2, 8, 0, tzinfo=UTC)


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    opened = connect(tmp_path / "audit.db", True, 1 << 30)
    try:
        yield opened
    finally:
        opened.close()


def _submission(
    *events: int, complete: int | None = None, intent: bytes | None = None
) -> Submission:
    return Submission(
        rows=[event_row(queued_event(n)) for n in events],
        complete_intent=complete,
        intent=intent,
        capture=None,
    )


def _traced(conn: sqlite3.Connection) -> list[str]:
    """The first word of each statement run from now on, but the disk budget's reads of
    the pages in use (every 256 commits, and near the limit). SQLite reports a statement
    again as each of its triggers starts: once is counted."""
    statements: list[str] = []
    last = [""]

    def trace(sql: str) -> None:
        if sql != last[0] and not sql.startswith("--") and "pragma_page_count" not in sql:
            statements.append(sql.split()[0].upper())
        last[0] = sql

    conn.set_trace_callback(trace)
    return statements


def test_a_batch_of_plain_events_is_its_leaves_and_its_events_in_one_transaction(
    conn: sqlite3.Connection,
) -> None:
    committer = Committer(conn, load_codec(conn), max_bytes=1 << 30)
    statements = _traced(conn)
    assert committer.commit_batch([_submission(1, 2), _submission(3)]) == [None, None]
    # The first commit reads where the events end, and where the tree ends (its tiles,
    # its newest row); then the events with their leaves.
    assert statements == ["BEGIN", "PRAGMA", "SELECT", "SELECT", "INSERT", "COMMIT"]
    assert conn.execute("SELECT COUNT(*) FROM events").fetchone() == (3,)
    leaves = conn.execute("SELECT leaf, length(leaf_hashes) FROM events ORDER BY seq").fetchall()
    assert leaves == [(0, 32), (1, 32), (2, 32)]
    assert conn.execute("SELECT COUNT(*) FROM log_hashes").fetchone() == (0,), "no tile complete"
    assert conn.execute("SELECT COUNT(*) FROM log_tiles").fetchone() == (0,)

    # The next ones know both ends, unless another connection committed since: a batch
    # that completes no tile reads nothing.
    statements.clear()
    assert committer.commit_batch([_submission(4)]) == [None]
    assert statements == ["BEGIN", "PRAGMA", "INSERT", "COMMIT"]
    assert conn.execute("SELECT seq, leaf FROM events ORDER BY seq DESC LIMIT 1").fetchone() == (
        4,
        3,
    )


def test_where_the_tables_end_is_read_again_after_a_failed_commit(
    conn: sqlite3.Connection,
) -> None:
    committer = Committer(conn, load_codec(conn), max_bytes=1 << 30)
    once = _submission(1)
    assert committer.commit_batch([once]) == [None]
    (failed,) = committer.commit_batch([once])  # the same event id again
    assert isinstance(failed, StoreError)
    # Rows another connection appended while the writer was not looking (as a restored
    # or hand-mended store might have) are found by the next commit, not overwritten.
    conn.execute(
        "INSERT INTO events (seq, leaf, leaf_hashes, event_id, recorded, recorded_ts, body)"
        " VALUES (9, 1, zeroblob(32), 'x', '', 0, x'00')"
    )
    statements = _traced(conn)
    assert committer.commit_batch([_submission(2)]) == [None]
    assert statements[:4] == ["BEGIN", "PRAGMA", "SELECT", "SELECT"]
    assert conn.execute("SELECT seq, leaf FROM events ORDER BY seq DESC LIMIT 1").fetchone() == (
        10,
        2,
    )


def test_two_writers_on_one_file_each_find_where_the_other_left_the_tables(
    tmp_path: Path,
) -> None:
    """Another engine's writer, or an admin command, may commit to the same file: rows and
    leaves stay unique and without a gap, each writer reading the ends again after the
    other committed (a committer that trusted the ends it kept failed here, UNIQUE
    constraint failed: events.seq, and would have given two events one leaf)."""
    first = connect(tmp_path / "audit.db", True, 1 << 30)
    second = connect(tmp_path / "audit.db", True, 1 << 30)
    try:
        writers = [
            Committer(first, load_codec(first), max_bytes=1 << 30),
            Committer(second, load_codec(second), max_bytes=1 << 30),
        ]
        # 300 leaves: the first tile is completed by one writer with leaves of both.
        for n in range(150):
            assert writers[n % 3 % 2].commit_batch([_submission(n, 1000 + n)]) == [None]
        rows = first.execute("SELECT seq, leaf, leaf_hashes FROM events ORDER BY seq").fetchall()
        assert [seq for seq, _, _ in rows] == list(range(1, 301))
        assert [leaf for _, leaf, _ in rows] == list(range(300))
        hashes = [h for _, _, h in rows]
        assert tile_hashes(first, 0, 0, 300) == hashes
        assert tile_hashes(first, 1, 0, 1) == [root_of(hashes[:256])]
        # Alone again, the first writer trusts what it knows.
        statements = _traced(first)
        writers[0].commit_batch([_submission(500)])
        writers[0].commit_batch([_submission(501)])
        assert statements[-4:] == ["BEGIN", "PRAGMA", "INSERT", "COMMIT"]
    finally:
        first.close()
        second.close()


def test_a_commit_that_completes_a_tile_writes_it_with_the_known_end(
    conn: sqlite3.Connection,
) -> None:
    committer = Committer(conn, load_codec(conn), max_bytes=1 << 30)
    assert committer.commit_batch([_submission(*range(255))]) == [None]
    assert conn.execute("SELECT COUNT(*) FROM log_hashes").fetchone() == (0,)
    statements = _traced(conn)
    assert committer.commit_batch([_submission(1000)]) == [None]
    # The committer kept the tile's first 255 leaf hashes from its last commit.
    assert statements[0] == "BEGIN" and "SELECT" not in statements, statements
    # The tile is one row; level 0 of the tile hashes keeps only what pruning copies.
    assert conn.execute("SELECT COUNT(*), SUM(length(hashes)) FROM log_tiles").fetchone() == (
        1,
        256 * 32,
    )
    assert conn.execute("SELECT COUNT(*) FROM log_hashes WHERE level = 0").fetchone() == (0,)
    assert tile_hashes(conn, 1, 0, 1) == [root_of(tile_hashes(conn, 0, 0, 256))]
    # A committer that does not know them (a restart, another writer) reads them back,
    # and the tile is the same as the events' own leaf hashes.
    assert committer.commit_batch([_submission(*range(2000, 2255))]) == [None]
    statements.clear()
    fresh = Committer(conn, load_codec(conn), max_bytes=1 << 30)
    assert fresh.commit_batch([_submission(3000)]) == [None]
    assert "SELECT" in statements, "the tile's first leaves read"
    stored = [h for (h,) in conn.execute("SELECT leaf_hashes FROM events ORDER BY seq")]
    assert tile_hashes(conn, 0, 0, 512) == stored
    assert tile_hashes(conn, 1, 0, 2) == [root_of(stored[:256]), root_of(stored[256:])]


def test_a_completed_tile_is_copied_to_the_tile_hashes_in_its_commit(
    conn: sqlite3.Connection,
) -> None:
    committer = Committer(conn, load_codec(conn), max_bytes=1 << 30)
    n = 0
    while n < 300:
        built = build_events(
            search_exchange([f"Patient/{p}" for p in range(7)]), AuditContext.default(), NOW
        )
        fan_out = Submission(
            rows=store_rows(built), complete_intent=None, intent=None, capture=None
        )
        batch = [_submission(n + i) for i in range(40)]
        assert committer.commit_batch([*batch, fan_out]) == [None] * 41
        n += 40 + len(built)
    assert tree_size(conn) == n
    hashes = tile_hashes(conn, 0, 0, n)
    assert len(hashes) == n
    (joined,) = conn.execute("SELECT hashes FROM log_tiles WHERE idx = 0").fetchone()
    assert joined == b"".join(hashes[:256]), "the first tile, once complete"
    assert conn.execute("SELECT COUNT(*) FROM log_tiles").fetchone() == (1,), "and no more"
    assert tile_hashes(conn, 1, 0, 2) == [root_of(hashes[:256])]
    codec = load_codec(conn)
    for seq, fan, leaf, body, patients, first_id in conn.execute(
        "SELECT seq, fan, leaf, body, patients, event_id FROM events ORDER BY seq"
    ):
        if fan is None:
            assert hashes[leaf] == leaf_hash(entry_of(codec.decode(body)))
            continue
        fanned = fan_of(first_id, patients, codec.decompress(body))
        for i in range(fan):
            entry = entry_of(orjson.loads(fanned.event(i)[1]))
            assert hashes[leaf + i] == leaf_hash(entry), (seq, i)


def test_a_batch_whose_steps_plan_one_statement_runs_it_without_begin(
    conn: sqlite3.Connection,
) -> None:
    committer = Committer(conn, load_codec(conn), max_bytes=1 << 30)
    statements = _traced(conn)
    (intent,) = committer.commit_batch([_submission(intent=b'{"n":1}')])
    assert isinstance(intent, int)
    assert statements == ["INSERT"]


def test_intents_recorded_and_settled_in_one_transaction_in_step_order(
    conn: sqlite3.Connection,
) -> None:
    committer = Committer(conn, load_codec(conn), max_bytes=1 << 30)
    (first,) = committer.commit_batch([_submission(intent=b'{"n":1}')])
    assert isinstance(first, int)
    statements = _traced(conn)
    results = committer.commit_batch(
        [_submission(1, complete=first), _submission(intent=b'{"n":2}'), _submission(2)]
    )
    assert statements == [
        "BEGIN",
        "PRAGMA",  # whether another connection committed
        "SELECT",  # where the events end
        "SELECT",  # where the tree ends: its tiles, its newest row
        "INSERT",
        "DELETE",
        "INSERT",
        "COMMIT",
    ]
    assert results[0] is None and results[2] is None
    assert conn.execute("SELECT id FROM intents").fetchall() == [(results[1],)]


def test_a_fan_out_gets_its_seqs_from_the_first_free_one(conn: sqlite3.Connection) -> None:
    committer = Committer(conn, load_codec(conn), max_bytes=1 << 30)
    committer.commit_batch([_submission(1)])
    built = build_events(
        search_exchange(["Patient/a", "Patient/b", "Patient/c"]), AuditContext.default(), NOW
    )
    fan_out = Submission(rows=store_rows(built), complete_intent=None, intent=None, capture=None)
    committer.commit_batch([fan_out, _submission(2)])
    rows = conn.execute("SELECT seq, fan, leaf FROM events ORDER BY seq").fetchall()
    assert rows == [(1, None, 0), (4, 3, 1), (5, None, 4)], "each event of a fan-out a leaf"


def test_entries_are_joined_as_the_builder_s_template_says_or_made_from_the_json(
    conn: sqlite3.Connection,
) -> None:
    committer = Committer(conn, load_codec(conn), max_bytes=1 << 30)
    patients = ["Patient/a", "Patient/b", "Patient/c"]
    builds = [build_events(search_exchange(patients), AuditContext.default(), NOW) for _ in "ab"]
    made = [b"".join(leaf_hash(entry_of(b.event)) for b in built) for built in builds]
    templates = store_entries(builds[0])
    assert templates is not None and len(templates) == 1 and store_entries(builds[1])
    template = templates[0]
    assert template is not None
    # The builder's parts are what the writer joins (a mark in them is in every leaf it
    # makes); without them it makes each entry from the event's JSON.
    marked = template._replace(after=template.after[:-1] + b',"mark":true}')
    entries: list[list[EntryTemplate | None] | None] = [[marked], None]
    committer.commit_batch(
        [
            Submission(
                rows=store_rows(built),
                complete_intent=None,
                intent=None,
                capture=None,
                entries=given,
            )
            for built, given in zip(builds, entries, strict=True)
        ]
    )
    stored = [h for (h,) in conn.execute("SELECT leaf_hashes FROM events ORDER BY seq")]
    rows = store_rows(builds[0])
    assert len(rows) == 1 and isinstance(rows[0], FanOut)
    fan = rows[0]
    expected = b"".join(
        leaf_hash(template.entry(member_id(fan.first_id, i), [p])[:-1] + b',"mark":true}')
        for i, p in enumerate(patients)
    )
    assert stored == [expected, made[1]]
    assert template_leaves(template, 3, fan.stored()) == [made[0][i : i + 32] for i in (0, 32, 64)]


class _Leaves:
    """A step as the Merkle log's will be: one row per event, by seq, in the same
    transaction as the events."""

    name: ClassVar[str] = "test leaves"

    def __init__(self, tx: Transaction) -> None:
        self._events = [(new.fan or 1) for new in tx.rows]
        if self._events:
            tx.plan(statements=1, incoming=32 * sum(self._events))

    def write(self, tx: Transaction) -> None:
        if not self._events:
            return
        assert tx.seqs is not None, "assign seqs ran first"
        leaves = [
            (s,)
            for seq, n in zip(tx.seqs, self._events, strict=True)
            for s in range(seq - n + 1, seq + 1)
        ]
        tx.conn.executemany("INSERT INTO leaves (seq) VALUES (?)", leaves)


def test_a_new_step_slots_in_and_shares_the_transaction(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE leaves (seq INTEGER PRIMARY KEY)")
    steps: list[type[Step]] = [*STEPS]
    steps.insert(2, _Leaves)
    committer = Committer(conn, load_codec(conn), max_bytes=1 << 30, steps=steps)
    statements = _traced(conn)
    assert committer.commit_batch([_submission(1, 2), _submission(3)]) == [None, None]
    assert statements[0] == "BEGIN" and statements[-1] == "COMMIT", "one transaction"
    leaves = [s for (s,) in conn.execute("SELECT seq FROM leaves ORDER BY seq")]
    assert leaves == [s for (s,) in conn.execute("SELECT seq FROM events ORDER BY seq")]
    assert leaves == [1, 2, 3]

    # A step that fails takes the whole batch with it, and says which step it was.
    conn.execute(
        "CREATE TRIGGER no_leaf BEFORE INSERT ON leaves BEGIN SELECT RAISE(ABORT, 'no'); END"
    )
    (failed,) = committer.commit_batch([_submission(4)])
    assert isinstance(failed, StoreError) and "(test leaves)" in str(failed)
    assert conn.execute("SELECT COUNT(*) FROM events").fetchone() == (3,)


def test_a_capture_is_committed_with_its_events(conn: sqlite3.Connection) -> None:
    codec = load_codec(conn)
    committer = Committer(conn, codec, max_bytes=1 << 30)
    capture = Capture(request_id="r-1", request=b'{"a":1}', response=None)
    submission = _submission(1)._replace(capture=capture)
    assert committer.commit_batch([submission]) == [None]
    request, response = conn.execute(
        "SELECT request, response FROM captures WHERE request_id = 'r-1'"
    ).fetchone()
    assert codec.decompress(request) == b'{"a":1}' and response is None


def test_the_declared_columns_are_the_events_table(conn: sqlite3.Connection) -> None:
    """Migrations and the records' declarations describe the same table: every column is
    inserted (where the writer places a row, and the builder's row) or delivery state."""
    columns = [name for _, name, *_ in conn.execute("PRAGMA table_info(events)")]
    assert sorted(columns) == sorted([*INSERTED, *DeliveryState._fields])
    assert {step.name for step in STEPS} == {
        "assign seqs",
        "append leaves",
        "insert events",
        "settle intents",
        "record intents",
        "insert captures",
    }
