"""Kubernetes: the mutating admission webhook that injects the proxy as a sidecar
(``webhook.py``), the pod patch it builds (``patch.py``, pure), the init container's
traffic redirect (``redirect.py``) and the exec probe (``probe.py``)."""
