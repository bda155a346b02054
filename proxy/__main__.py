"""``python -m proxy``: the same as the ``fhir-audit-proxy`` command."""

from proxy.cli import main

raise SystemExit(main())
