"""The repository modes: each mode's name beside the settings model that selects its sink.
Adding a sink is one module (a :class:`~proxy.delivery.sink.RepositoryBase` subclass whose
``open_sink`` returns the sink) and one entry here; ``repository:`` in the configuration is
validated as the model its ``mode`` names (``bundle`` when none is given)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Union

from pydantic import BeforeValidator, Field, TypeAdapter

from proxy.delivery.file import FileRepository
from proxy.delivery.http import HttpRepository
from proxy.delivery.jetstream import JetStreamRepository
from proxy.delivery.kafka import KafkaRepository
from proxy.delivery.sink import RepositoryBase
from proxy.delivery.syslog import SyslogRepository

REPOSITORY_MODES: Mapping[str, type[RepositoryBase]] = {
    "bundle": HttpRepository,
    "single": HttpRepository,
    "transaction": HttpRepository,
    "file": FileRepository,
    "jetstream": JetStreamRepository,
    "kafka": KafkaRepository,
    "syslog": SyslogRepository,
}
DEFAULT_MODE = "bundle"


def _with_mode(value: Any) -> Any:
    """A ``repository:`` mapping without ``mode`` is the default mode's."""
    if isinstance(value, Mapping) and "mode" not in value:
        return {**value, "mode": DEFAULT_MODE}
    return value


if TYPE_CHECKING:
    RepositorySettings = RepositoryBase
else:
    RepositorySettings = Annotated[
        Union[tuple(dict.fromkeys(REPOSITORY_MODES.values()))],  # noqa: UP007
        Field(discriminator="mode"),
        BeforeValidator(_with_mode),
    ]
"""``repository:``: the settings of the mode it names (for mypy, what every mode has)."""

_ADAPTER: TypeAdapter[RepositoryBase] = TypeAdapter(RepositorySettings)


def repository_settings(**values: Any) -> RepositoryBase:
    """``repository:`` settings from keyword values, validated as the configuration is
    (``repository_settings(mode="jetstream", url="nats://...")``)."""
    return _ADAPTER.validate_python(values)
