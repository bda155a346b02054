"""What every settings model is built from: the frozen base, the checks of URLs, ports and
files, and the masking of URL credentials. ``proxy.settings`` (the tree) and each delivery
mode's settings (``proxy.delivery.*``) build on it; it imports neither, so a mode's module
can declare its settings without an import circle."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr

MASK = "**********"

Positive = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]


class Frozen(BaseModel):
    """A settings section: read once at start-up, never mutated; unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def redact_url(url: str) -> str:
    """``url`` with any userinfo (``user:password@``) replaced by the mask."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{MASK}@{host}"))


def url_secret(url: str | None) -> str | None:
    """The password of ``url``'s userinfo, or the whole userinfo when it is a token alone
    (a user name such as "admin" is no secret and would mask that word everywhere)."""
    if not url or "@" not in url:
        return None
    userinfo = urlsplit(url).netloc.rsplit("@", 1)[0]
    return userinfo.partition(":")[2] or userinfo


def http_url(value: str) -> str:
    """Accept only an absolute http(s) URL with a host."""
    try:
        parts = urlsplit(value)
        has_host = bool(parts.hostname)
    except ValueError:
        has_host = False
        parts = urlsplit("")
    if parts.scheme not in ("http", "https") or not has_host:
        raise ValueError(
            f"must be an absolute http:// or https:// URL such as https://fhir.example.org/fhir"
            f" (got {redact_url(value)!r})"
        )
    return value


def optional_http_url(value: str | None) -> str | None:
    return None if value is None else http_url(value)


def tcp_port(value: int) -> int:
    if not 0 <= value <= 65535:
        raise ValueError(f"must be a TCP port from 1 to 65535, or 0 for any free one (got {value})")
    return value


def given_secrets(value: SecretStr | None, path: Path | None) -> set[str]:
    """A secret as masking needs it in clear: the one set inline and the one its file (a
    Kubernetes Secret mount) holds, stripped; a file that cannot be read gives none (start-up
    reports it through :func:`readable_file_problem`)."""
    found = {value.get_secret_value()} if value is not None else set()
    if path is not None:
        with contextlib.suppress(OSError):
            found.add(path.read_text().strip())
    return found


def readable_file_problem(setting: str, path: Path | None, what: str) -> str | None:
    """Why ``path`` (named by ``setting``, holding ``what``) cannot be read, or None. Tried
    by opening it, as the proxy will."""
    if path is None:
        return None
    try:
        with path.open("rb"):
            if path.is_file():
                return None
    except OSError:
        pass
    return f"{setting}: {path} is not a readable file; mount {what} there"


def writable_file_problems(setting: str, path: Path, flags: int) -> Iterator[str]:
    """Why the proxy could not open ``path`` with ``flags`` as it does at run time, tried
    for real rather than judged from permission bits (which miss read-only mounts as seen
    by root, append-only or immutable files, root-squashed network mounts): an existing
    file is opened (never created), a missing one tried by creating and removing a file in
    the nearest directory that exists."""
    if path.is_dir():
        yield f"{setting}: {path} is a directory; give the path of a file inside it"
        return
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        yield (
            f"{setting}: {path} cannot be created because {ancestor} is a file, not a directory;"
            " choose another path"
        )
    elif path.exists():
        try:
            os.close(os.open(path, flags))
        except OSError as exc:
            yield f"{setting}: {path} cannot be opened for writing by this user: {exc.strerror}"
    else:
        try:
            fd, probe = tempfile.mkstemp(dir=ancestor, prefix=".fhir-audit-proxy-check-")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            yield (
                f"{setting}: {path} cannot be created: {ancestor} is not writable by this"
                f" user ({exc.strerror})"
            )
