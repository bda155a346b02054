"""Event ids: RFC 9562 UUIDv7, ordered by their millisecond, never repeated."""

from __future__ import annotations

import os
import threading
import time
import uuid

from proxy.audit.ids import new_event_id


def test_ids_are_uuid7_with_the_time_in_their_leading_bits() -> None:
    before = time.time_ns() // 1_000_000
    ids = [new_event_id() for _ in range(5000)]
    after = time.time_ns() // 1_000_000
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
        assert before <= parsed.int >> 80 <= after
    assert [i[:13] for i in ids] == sorted(i[:13] for i in ids)


def test_ids_taken_from_several_threads_are_all_different() -> None:
    taken: list[list[str]] = [[] for _ in range(4)]

    def take(into: list[str]) -> None:
        into.extend(new_event_id() for _ in range(20_000))

    threads = [threading.Thread(target=take, args=(into,)) for into in taken]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [i for ids in taken for i in ids]
    assert len(set(every)) == len(every) == 80_000


def test_the_random_bits_cover_every_variant_digit() -> None:
    assert {new_event_id()[19] for _ in range(2000)} == set("89ab")


def test_a_forked_worker_does_not_reuse_its_parents_random_bits() -> None:
    new_event_id()  # the parent holds unused random parts now
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        os.write(write_end, new_event_id().encode())
        os._exit(0)
    os.close(write_end)
    child = os.read(read_end, 100).decode()
    os.close(read_end)
    os.waitpid(pid, 0)
    assert child[14:] != new_event_id()[14:]
