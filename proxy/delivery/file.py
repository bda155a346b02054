"""The ``file`` mode: NDJSON appended and fsynced, for log shippers (Fluent Bit, Vector,
Filebeat) that tail it. A write that fails (a full disk, a path that is a directory) is
:class:`RepositoryUnavailable`; nothing is ever rejected."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson
from pydantic import model_validator

from proxy.delivery.sink import Origin, RepositoryBase, RepositoryUnavailable, Sink
from proxy.private_files import create_private_parents
from proxy.settings_base import redact_url, writable_file_problems


class FileRepository(RepositoryBase):
    """An NDJSON file as the repository."""

    url: str | None = None
    """The file's path (``file://`` optional)."""
    mode: Literal["file"] = "file"

    @property
    def path(self) -> Path:
        """The file events are appended to."""
        assert self.url is not None
        return Path(self.url.removeprefix("file://"))

    @model_validator(mode="after")
    def _url_is_a_path(self) -> FileRepository:
        if self.url is not None:
            if urlsplit(self.url).scheme not in ("", "file"):
                raise ValueError(
                    f"mode file takes a file path as url, not {redact_url(self.url)!r};"
                    " use mode bundle, single or transaction for a FHIR server"
                )
            if not self.url.removeprefix("file://").strip():
                raise ValueError("mode file needs url: the path of the NDJSON file")
        return self

    def path_problems(self) -> list[str]:
        if self.url is None:
            return []
        return list(writable_file_problems("repository.url", self.path, os.O_WRONLY | os.O_APPEND))

    async def open_sink(self, origin: Origin) -> Sink:
        return FileSink(self.path)


class FileSink:
    """NDJSON, one event per line, appended and fsynced in one write per batch (a retry
    never leaves a half line)."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def _write(self, data: bytes) -> None:
        # The events carry PHI: owner only (directories 0700, the file 0600), whatever
        # the umask.
        create_private_parents(self._path)
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)

    async def send(self, events: Sequence[dict[str, Any]]) -> None:
        data = b"".join(orjson.dumps(e) + b"\n" for e in events)
        try:
            await asyncio.to_thread(self._write, data)
        except OSError as exc:
            raise RepositoryUnavailable(f"cannot append to {self._path}: {exc}") from exc

    async def close(self) -> None:
        return None
