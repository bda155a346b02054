"""The BALP vocabulary every event is made of: code systems, codings, the per-profile
patterns (action, agent types, entity kind) and the constant fragments shared by events."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.fhir.interaction import InteractionKind

PROFILE_BASE = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit."
DCM = "http://dicom.nema.org/resources/ontology/DCM"
RESTFUL_INTERACTION = "http://hl7.org/fhir/restful-interaction"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
BALP_ENTITY_TYPE = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"
USER_AGENT_TYPES = "https://profiles.ihe.net/ITI/BALP/CodeSystem/UserAgentTypes"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
SECURITY_SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
OPERATION_SYSTEM = "urn:fhir-audit-proxy:operation"
"""Second subtype coding naming the operation (``$everything``); BALP has no code for it."""
TOKEN_VERIFICATION_EXT = "urn:fhir-audit-proxy:extension:token-verification"
"""On the user agent: whether the bearer token's signature was checked and held."""
TRACEPARENT_DETAIL = "traceparent"
"""``entity.detail.type`` on the X-Request-Id entity, holding the W3C traceparent of the
request's server span."""


def coding(system: str, code: str, display: str | None = None) -> dict[str, str]:
    """A FHIR Coding (``display`` left out when empty)."""
    out = {"system": system, "code": code}
    if display:
        out["display"] = display
    return out


def concept(system: str, code: str, display: str) -> dict[str, Any]:
    """A FHIR CodeableConcept of one coding."""
    return {"coding": [coding(system, code, display)]}


TYPE_REST = coding(
    "http://terminology.hl7.org/CodeSystem/audit-event-type", "rest", "Restful Operation"
)
SOURCE_ROLE = concept(DCM, "110153", "Source Role ID")
DESTINATION_ROLE = concept(DCM, "110152", "Destination Role ID")
APPLICATION = concept(DCM, "110150", "Application")
CUSTODIAN = concept(
    "http://terminology.hl7.org/CodeSystem/provenance-participant-type", "custodian", "Custodian"
)
USER_RECIPIENT = coding(PARTICIPATION, "IRCP", "information recipient")
USER_AUTHOR = coding(PARTICIPATION, "AUT", "author (originator)")
USER_OAUTH = coding(USER_AGENT_TYPES, "UserOauthAgent", "User OAuth Agent participant")
PERSON = coding(ENTITY_TYPE, "1", "Person")
SYSTEM_OBJECT = coding(ENTITY_TYPE, "2", "System Object")
ROLE_PATIENT = coding(OBJECT_ROLE, "1", "Patient")
ROLE_DOMAIN_RESOURCE = coding(OBJECT_ROLE, "4", "Domain Resource")
ROLE_QUERY = coding(OBJECT_ROLE, "24", "Query")
XREQUEST_ID = coding(BALP_ENTITY_TYPE, "XrequestId", "X-Request-Id")


@dataclass(frozen=True, slots=True)
class Pattern:
    """How one family of interactions is recorded (the BALP per-profile table)."""

    profile: str | None
    """Basic profile name (``Read``); the Patient* variant prefixes ``Patient``."""
    action: str
    client_type: dict[str, Any]
    server_type: dict[str, Any]
    user_type: dict[str, str]
    entity: str
    """``data`` (the resource) or ``query`` (the raw request)."""


CREATE = Pattern("Create", "C", SOURCE_ROLE, DESTINATION_ROLE, USER_AUTHOR, "data")
READ = Pattern("Read", "R", DESTINATION_ROLE, SOURCE_ROLE, USER_RECIPIENT, "data")
UPDATE = Pattern("Update", "U", SOURCE_ROLE, DESTINATION_ROLE, USER_AUTHOR, "data")
DELETE = Pattern("Delete", "D", APPLICATION, CUSTODIAN, USER_AUTHOR, "data")
QUERY = Pattern("Query", "E", SOURCE_ROLE, DESTINATION_ROLE, USER_RECIPIENT, "query")
# Not in BALP's RESTful profiles: recorded in the same shape, without a profile claim.
HISTORY = Pattern(None, "R", DESTINATION_ROLE, SOURCE_ROLE, USER_RECIPIENT, "query")
CAPABILITIES = Pattern(None, "R", DESTINATION_ROLE, SOURCE_ROLE, USER_RECIPIENT, "query")
EXECUTE = Pattern(None, "E", SOURCE_ROLE, DESTINATION_ROLE, USER_RECIPIENT, "query")

PATTERNS: dict[InteractionKind, Pattern] = {
    InteractionKind.CREATE: CREATE,
    InteractionKind.READ: READ,
    InteractionKind.VREAD: READ,
    InteractionKind.UPDATE: UPDATE,
    InteractionKind.PATCH: UPDATE,
    InteractionKind.DELETE: DELETE,
    InteractionKind.SEARCH_TYPE: QUERY,
    InteractionKind.SEARCH_SYSTEM: QUERY,
    InteractionKind.SEARCH_COMPARTMENT: QUERY,
    InteractionKind.HISTORY_INSTANCE: HISTORY,
    InteractionKind.HISTORY_TYPE: HISTORY,
    InteractionKind.HISTORY_SYSTEM: HISTORY,
    InteractionKind.CAPABILITIES: CAPABILITIES,
    InteractionKind.OPERATION: EXECUTE,
    InteractionKind.BATCH: EXECUTE,
    InteractionKind.TRANSACTION: EXECUTE,
    InteractionKind.UNKNOWN: EXECUTE,
}
