"""The admin listener: the local audit log over FHIR and Smile CDR style APIs, ingestion of
AuditEvents (Auditbox's API), the viewer (``/ui``), the dead-letter queue, health and
metrics; who may use which route and the audit of reading the trail (``auth``, ``access``)."""
