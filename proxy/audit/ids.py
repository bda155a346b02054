"""AuditEvent ids: time-ordered UUIDs (the UUIDv7 layout) from a pooled OS entropy source."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator

_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}
"""A random hex digit to the digit of variant ``0b10`` with the same two low bits."""
_IDS_PER_READ = 256


def _random_tails() -> Iterator[str]:
    """The random parts of the next ids (``7xxx-Vxxx-xxxxxxxxxxxx``: version 7, variant
    ``0b10``, 74 random bits), from one ``getrandom`` call: an id is made for every event,
    on the hot path. Threads may share the iterator: a list iterator hands each item out
    once."""
    pool = secrets.token_hex(_IDS_PER_READ * 10)
    tails = []
    for i in range(0, _IDS_PER_READ * 19, 19):
        r = pool[i : i + 19]
        tails.append(f"7{r[:3]}-{_VARIANT[r[3]]}{r[4:7]}-{r[7:]}")
    return iter(tails)


_tails: Iterator[str] = iter(())
_last_ms: tuple[int, str] = (-1, "")
"""The last millisecond an id was made in, and its ``xxxxxxxx-xxxx`` form."""


def _forget() -> None:
    global _tails
    _tails = iter(())  # a child must not reuse its parent's random parts


os.register_at_fork(after_in_child=_forget)


def new_event_id() -> str:
    """A UUID whose leading bits are the time in milliseconds (the UUIDv7 layout, RFC
    9562), so that the store's id index grows at its end instead of at random places."""
    global _tails, _last_ms
    tail = next(_tails, None)
    if tail is None:
        _tails = _random_tails()
        tail = next(_tails)
    ms = time.time_ns() // 1_000_000
    last = _last_ms
    if last[0] != ms:
        digits = f"{ms:012x}"
        _last_ms = last = (ms, f"{digits[:8]}-{digits[8:]}")
    return f"{last[1]}-{tail}"
