"""The R5 form of an event: the same facts in R5's AuditEvent shape (``category``/``code``,
the ``outcome`` backbone, ``agent.network[x]``, ``entity.what``, ``patient``). BALP's
profiles are R4-only, so R5 events claim none."""

from __future__ import annotations

from typing import Any

OUTCOME_SYSTEM = "http://terminology.hl7.org/CodeSystem/audit-event-outcome"
OUTCOME_DISPLAY = {
    "0": "Success",
    "4": "Minor failure",
    "8": "Serious failure",
    "12": "Major failure",
}
SEVERITY = {"0": "informational", "4": "warning", "8": "error", "12": "critical"}
PATIENT_ROLE = "1"
REQUEST_ID_ROLE_TEXT = "X-Request-Id"
"""The role text of the entity naming the request: R5 has no ``entity.type`` to say it."""


def _agent(agent: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"type": agent["type"], "who": agent.get("who") or {"display": "unknown"}}
    if "requestor" in agent:
        out["requestor"] = agent["requestor"]
    network = agent.get("network")
    if network and network.get("address"):
        key = "networkUri" if network.get("type") == "5" else "networkString"
        out[key] = network["address"]
    if agent.get("purposeOfUse"):
        out["authorization"] = agent["purposeOfUse"]
    for name in ("policy", "role", "extension"):
        if agent.get(name):
            out[name] = agent[name]
    return out


def _entity(entity: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "what" in entity:
        out["what"] = entity["what"]
    if "role" in entity:
        out["role"] = {"coding": [entity["role"]]}
    if entity.get("securityLabel"):
        out["securityLabel"] = [{"coding": [label]} for label in entity["securityLabel"]]
    if "query" in entity:
        out["query"] = entity["query"]
    if entity.get("detail"):
        # R4's detail.type is a string, R5's a CodeableConcept.
        out["detail"] = [{**d, "type": {"text": d["type"]}} for d in entity["detail"]]
    if entity.get("type", {}).get("code") == "XrequestId":
        # R5 has no entity.type: say what the identifier is through the role's text.
        out["role"] = {"text": REQUEST_ID_ROLE_TEXT}
    return out


def to_r5(event: dict[str, Any]) -> dict[str, Any]:
    """The R5 AuditEvent for an R4 (BALP) event dict."""
    outcome = str(event.get("outcome", "0"))
    r5: dict[str, Any] = {"resourceType": "AuditEvent", "id": event["id"]}
    r5["category"] = [{"coding": [event["type"]]}]
    subtypes = event.get("subtype") or []
    r5["code"] = {"coding": subtypes} if subtypes else {"coding": [event["type"]]}
    r5["action"] = event["action"]
    r5["severity"] = SEVERITY.get(outcome, "error")
    if "period" in event:
        r5["occurredPeriod"] = event["period"]
    r5["recorded"] = event["recorded"]
    result: dict[str, Any] = {
        "code": {
            "system": OUTCOME_SYSTEM,
            "code": outcome,
            "display": OUTCOME_DISPLAY.get(outcome, outcome),
        }
    }
    if event.get("outcomeDesc"):
        result["detail"] = [{"text": event["outcomeDesc"]}]
    r5["outcome"] = result
    for entity in event.get("entity", []):
        if entity.get("role", {}).get("code") == PATIENT_ROLE and "what" in entity:
            r5["patient"] = entity["what"]
            break
    r5["agent"] = [_agent(a) for a in event.get("agent", [])]
    source = event["source"]
    r5_source: dict[str, Any] = {"observer": source["observer"]}
    if source.get("site"):
        r5_source["site"] = {"display": source["site"]}
    if source.get("type"):
        r5_source["type"] = [{"coding": [t]} for t in source["type"]]
    r5["source"] = r5_source
    r5["entity"] = [_entity(e) for e in event.get("entity", [])]
    return r5
