"""Small helpers shared by test modules (tests never import from each other's files)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A loopback port nothing listens on right now, for a process that must be told its
    port up front (a subprocess proxy or demo). Another process could take it before use;
    on a test machine that is rare enough."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
