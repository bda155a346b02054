"""The proxy's HTTP mechanics: the listener clients connect to, the client of the FHIR
server, and the forwarding between them that holds each answer until its audit is
durable."""
