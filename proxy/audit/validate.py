"""Validation of AuditEvents with fhir.resources: R4 through the R4B models (R4 and R4B
AuditEvent have the same elements), R5 through the default models. Used in tests,
sampled off the request path (an invalid event is still stored and forwarded), and for
events ingested through the admin API (:class:`ValidationPool` for large requests)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import ValidationError

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

MODEL_MODULES = {"R4": "fhir.resources.R4B.auditevent", "R5": "fhir.resources.auditevent"}
"""The module of each FHIR version's AuditEvent model."""


def validate_event(event: dict[str, Any], fhir_version: str) -> str | None:
    """None when ``event`` is a valid AuditEvent of ``fhir_version``, else the errors."""
    model: Any
    if fhir_version == "R5":
        from fhir.resources.auditevent import AuditEvent as model
    else:
        from fhir.resources.R4B.auditevent import AuditEvent as model
    try:
        model.model_validate(event)
    except ValidationError as exc:
        return str(exc)[:4000]
    except (TypeError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"[:4000]
    return None


def validate_all(events_json: bytes, fhir_version: str) -> list[str | None]:
    """:func:`validate_event` of each event of a JSON array, in order (what the pool's
    process runs)."""
    return [validate_event(event, fhir_version) for event in orjson.loads(events_json)]


class ValidationUnavailable(Exception):
    """The pool's worker process died during a validation; a later call starts another."""


class ValidationPool:
    """Validates AuditEvents in a process of its own, so that validating megabytes of
    them (seconds of Python) never holds up the event loop and the traffic it serves.

    One worker process, started at first use, forked from multiprocessing's forkserver
    with the version's model already imported; at most ``max_waiting`` calls wait for it
    at once, the others wait their turn on the event loop. A worker that dies is replaced
    at the next call (the call it died in raises :class:`ValidationUnavailable`).
    :meth:`close` stops it.

    multiprocessing is imported at the first call, not with this module: most processes
    never validate a large ingestion and need not hold it in memory."""

    def __init__(self, fhir_version: str, *, max_waiting: int = 2) -> None:
        self._fhir_version = fhir_version
        self._executor: ProcessPoolExecutor | None = None
        self._turns = asyncio.Semaphore(max_waiting)

    async def problems(self, events: Sequence[Any]) -> list[str | None]:
        """:func:`validate_event` of each of ``events``, in order."""
        from concurrent.futures.process import BrokenProcessPool

        payload = orjson.dumps(list(events))
        async with self._turns:
            executor = self._running()
            try:
                # Submitting may start the worker, and the forkserver first: seconds of
                # waiting that must not be the event loop's.
                future = await asyncio.to_thread(
                    executor.submit, validate_all, payload, self._fhir_version
                )
                return await asyncio.wrap_future(future)
            except BrokenProcessPool as exc:
                self.close()
                raise ValidationUnavailable(str(exc)) from exc

    def _running(self) -> ProcessPoolExecutor:
        if self._executor is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([MODEL_MODULES[self._fhir_version]])
            self._executor = ProcessPoolExecutor(max_workers=1, mp_context=context)
        return self._executor

    def close(self) -> None:
        """Stop the worker (after the validation it runs, if any); a later call starts
        another."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
