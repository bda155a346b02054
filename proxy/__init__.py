"""fhir-audit-proxy: a sidecar reverse proxy that gives any FHIR server a durable IHE BALP
audit trail."""

__version__ = "0.1.0"
