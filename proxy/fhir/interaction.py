"""Which FHIR REST interaction a request is: pure classification from method, path, query,
headers and body. No I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class InteractionKind(StrEnum):
    """The interaction, named by its code in ``http://hl7.org/fhir/restful-interaction``
    where one exists."""

    READ = "read"
    VREAD = "vread"
    UPDATE = "update"
    PATCH = "patch"
    DELETE = "delete"
    CREATE = "create"
    HISTORY_INSTANCE = "history-instance"
    HISTORY_TYPE = "history-type"
    HISTORY_SYSTEM = "history-system"
    SEARCH_TYPE = "search-type"
    SEARCH_SYSTEM = "search-system"
    SEARCH_COMPARTMENT = "search-compartment"
    """``Patient/1/Observation``: restful-interaction has no code of its own; events use search-type."""
    CAPABILITIES = "capabilities"
    BATCH = "batch"
    TRANSACTION = "transaction"
    OPERATION = "operation"
    UNKNOWN = "unknown"
    """Not a FHIR interaction (malformed path, unsupported method); still audited."""


WRITE_KINDS = frozenset(
    {
        InteractionKind.UPDATE,
        InteractionKind.PATCH,
        InteractionKind.DELETE,
        InteractionKind.CREATE,
        InteractionKind.BATCH,
        InteractionKind.TRANSACTION,
    }
)


@dataclass(frozen=True, slots=True)
class Interaction:
    """A classified request. Everything that can be known before the response arrives."""

    kind: InteractionKind
    """What the request does."""
    method: str
    """The HTTP method, upper case."""
    resource_type: str | None = None
    """The resource type in the path (``Patient`` in ``Patient/1``), or the compartment's
    target type for compartment searches (``Observation`` in ``Patient/1/Observation``)."""
    resource_id: str | None = None
    """The logical id in the path."""
    version_id: str | None = None
    """The version in ``_history/{vid}``."""
    operation: str | None = None
    """The operation name without ``$`` (``everything``)."""
    compartment: tuple[str, str] | None = None
    """``(type, id)`` of the compartment searched (``("Patient", "1")``)."""
    conditional: bool = False
    """Conditional create (``If-None-Exist``), update, patch or delete (``Type?params``)."""
    search: tuple[tuple[str, str], ...] = ()
    """The search parameters, from the query string and a form body, in order;
    ``_format`` and ``_pretty`` removed."""
    detail: str | None = None
    """Why the request is UNKNOWN, for ``outcomeDesc``."""

    @property
    def is_write(self) -> bool:
        """Whether the request may change server state (an intent record goes first).
        Operations count as writes when sent by POST."""
        if self.kind is InteractionKind.OPERATION:
            return self.method == "POST"
        return self.kind in WRITE_KINDS

    @property
    def restful_code(self) -> str | None:
        """The ``restful-interaction`` code for ``AuditEvent.subtype``."""
        if self.kind is InteractionKind.UNKNOWN:
            return None
        if self.kind is InteractionKind.SEARCH_COMPARTMENT:
            return InteractionKind.SEARCH_TYPE.value
        return self.kind.value
