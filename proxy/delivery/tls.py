"""TLS to a stream or syslog receiver: the files a client's TLS context is made of, as the
broker modes name them, and the context itself (TLS 1.2 or later, the server verified)."""

from __future__ import annotations

import ssl
from pathlib import Path

from proxy.delivery.sink import SinkUnusable
from proxy.settings_base import Frozen, readable_file_problem


class TlsFiles(Frozen):
    """PEM files of a TLS client: the CA that signed the server (none: the system's), and
    for mutual TLS this client's certificate and key (Kubernetes Secret mounts)."""

    enabled: bool = False
    """Use TLS (``tls://`` and ``nats+tls://`` in a URL turn it on too)."""
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None
    """The name the server's certificate must carry, when it is not the URL's host."""

    def path_problems(self, section: str) -> list[str]:
        """One line per named file that cannot be read."""
        problems = [
            readable_file_problem(f"{section}.{name}", getattr(self, name), "the PEM file")
            for name in ("ca_file", "cert_file", "key_file")
        ]
        if (self.cert_file is None) != (self.key_file is None):
            problems.append(f"{section}: mutual TLS needs both cert_file and key_file")
        return [p for p in problems if p]

    def client_context(self, section: str) -> ssl.SSLContext:
        """A client context: TLS 1.2 or later, the server's certificate and name checked
        against ``ca_file`` (or the system's CAs), this client's pair when given."""
        try:
            context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            if self.cert_file is not None and self.key_file is not None:
                context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise SinkUnusable(f"{section}: the TLS files cannot be loaded: {exc}") from exc
        return context
