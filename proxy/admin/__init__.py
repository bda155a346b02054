"""The admin listener: the local audit log over FHIR and Smile CDR style APIs, the
dead-letter queue, health and metrics."""
