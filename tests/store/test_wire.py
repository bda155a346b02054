"""The messages between the commit engine and the writer process: each record arrives as
it was sent, named."""

from __future__ import annotations

from datetime import UTC, datetime

from proxy.audit.balp import AuditContext, build_events, store_rows
from proxy.store.faces import StoreError
from proxy.store.index import event_row
from proxy.store.records import Capture, EventRow, FanOut
from proxy.store.wire import (
    FRAME,
    Committed,
    Failed,
    Ready,
    Submission,
    decode_answer,
    decode_batch,
    encode_answer,
    encode_batch,
)
from tests.factories import queued_event, search_exchange

NOW = datetime(2026, 12, 2, 8, 0, tzinfo=UTC)


def test_a_batch_arrives_as_it_was_sent() -> None:
    fan_out = store_rows(
        build_events(search_exchange(["Patient/a", "Patient/b"]), AuditContext.default(), NOW)
    )
    batch = [
        Submission(
            rows=[event_row(queued_event(1)), *fan_out],
            complete_intent=7,
            intent=None,
            capture=Capture(request_id="r-1", request=b"{}", response=None),
        ),
        Submission(rows=[], complete_intent=None, intent=b'{"n":1}', capture=None),
    ]
    received = decode_batch(encode_batch(batch))
    assert received == batch
    assert type(received[0].rows[0]) is EventRow and type(received[0].rows[1]) is FanOut
    assert type(received[0].capture) is Capture


def test_the_writers_answers_arrive_as_they_were_sent() -> None:
    for answer in (
        Ready(journal_mode="wal", synchronous=2),
        Failed(reason="no room"),
        Committed(results=[None, 3, StoreError("duplicate id")], seconds=0.25, records=4),
    ):
        framed = encode_answer(answer)
        received = decode_answer(framed[FRAME.size :])
        assert type(received) is type(answer) and repr(received) == repr(answer)
