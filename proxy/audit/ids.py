"""AuditEvent ids: time-ordered UUIDs (the UUIDv7 layout) from a pooled OS entropy source."""

from __future__ import annotations

import os
import secrets
import threading
import time


class _Entropy:
    """Random bytes from the OS, read 4 KiB at a time: one ``getrandom`` call per 400 ids
    instead of one per id (an id is made for every event, on the hot path)."""

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._forget)  # a child must not reuse them

    def _forget(self) -> None:
        self._pool, self._at = b"", 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bytes:
        # Events of large exchanges are built in a worker thread: two takers must never
        # get the same bytes.
        with self._lock:
            if self._at + n > len(self._pool):
                self._pool, self._at = secrets.token_bytes(4096), 0
            out = self._pool[self._at : self._at + n]
            self._at += n
            return out


_ENTROPY = _Entropy()


def new_event_id() -> str:
    """A UUID whose leading bits are the time in milliseconds (the UUIDv7 layout, RFC
    9562), so that the store's id index grows at its end instead of at random places."""
    raw = bytearray((time.time_ns() // 1_000_000).to_bytes(6, "big") + _ENTROPY.take(10))
    raw[6] = 0x70 | (raw[6] & 0x0F)  # version 7
    raw[8] = 0x80 | (raw[8] & 0x3F)  # variant 0b10
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
