"""Turning admin query parameters into an :class:`EventQuery`; bad input raises
:class:`BadQuery`, which the handlers answer with a 400 OperationOutcome."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

MAX_PAGE = 1000


class BadQuery(ValueError):
    """A parameter the admin API cannot use, with a message for the caller."""


def parse_instant(value: str, name: str) -> tuple[datetime, datetime]:
    """``[start, end)`` covered by a FHIR date or dateTime at its own precision."""
    try:
        if len(value) == 4:
            start = datetime(int(value), 1, 1, tzinfo=UTC)
            return start, start.replace(year=start.year + 1)
        if len(value) == 7:
            year, month = int(value[:4]), int(value[5:7])
            start = datetime(year, month, 1, tzinfo=UTC)
            nxt = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
            return start, nxt
        if len(value) == 10:
            day = date.fromisoformat(value)
            start = datetime(day.year, day.month, day.day, tzinfo=UTC)
            return start, start + timedelta(days=1)
        instant = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadQuery(f"{name}: {value!r} is not a FHIR date or dateTime") from None
    if instant.tzinfo is None:
        instant = instant.replace(tzinfo=UTC)
    return instant, instant + timedelta(milliseconds=1)


def date_bounds(values: list[str]) -> tuple[datetime | None, datetime | None]:
    """The window that every ``date`` parameter (with its prefix) allows."""
    lower: datetime | None = None
    upper: datetime | None = None

    def raise_lower(value: datetime) -> None:
        nonlocal lower
        lower = value if lower is None else max(lower, value)

    def cut_upper(value: datetime) -> None:
        nonlocal upper
        upper = value if upper is None else min(upper, value)

    for raw in values:
        prefix = raw[:2] if raw[:2] in ("eq", "ge", "gt", "le", "lt") else "eq"
        start, end = parse_instant(raw[2:] if raw[:2] == prefix else raw, "date")
        if prefix in ("eq", "ge"):
            raise_lower(start)
        if prefix == "gt":
            raise_lower(end)
        if prefix in ("eq", "le"):
            cut_upper(end)
        if prefix == "lt":
            cut_upper(start)
    return lower, upper


def parse_count(value: str | None, name: str, default: int, cap: int | None = MAX_PAGE) -> int:
    """A non-negative whole number; page sizes are capped, offsets are not (``cap=None``)."""
    if value is None or value == "":
        return default
    try:
        count = int(value)
    except ValueError:
        raise BadQuery(f"{name} must be a whole number, not {value!r}") from None
    if count < 0:
        raise BadQuery(f"{name} must not be negative")
    return count if cap is None else min(count, cap)
