"""Event bodies as stored: zstd frames compressed against a dictionary trained on the
events this proxy builds (``events.zdict``, made by ``scripts/make_store_dictionary.py``),
since most of an event is the same system URLs, codes and displays as in every other.

Each frame names its dictionary by id. Every dictionary a store was written with is kept
in the store itself (table ``dictionaries``), so rows stay readable after the proxy ships
a new dictionary. Bodies written before compression (schema 1) are plain JSON and read
as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import Any

import orjson
import zstandard

LEVEL = 3
"""The zstd level new bodies are compressed at."""


def shipped_dictionary() -> bytes:
    """The dictionary new rows are written with."""
    return resources.files("proxy.store").joinpath("events.zdict").read_bytes()


def dictionary_id(data: bytes) -> int:
    """The id a dictionary writes into each frame it compresses."""
    return int(zstandard.ZstdCompressionDict(data).dict_id())


class CodecError(Exception):
    """A stored body cannot be read (unknown dictionary or damaged frame)."""


class BodyCodec:
    """Encodes new bodies with the current dictionary; decodes with any known one.

    Not thread-safe (zstd contexts are reused): the store's writer process compresses
    with its own codec; in the proxy one thread decodes."""

    def __init__(self, current: bytes, known: dict[int, bytes]) -> None:
        current_dict = zstandard.ZstdCompressionDict(current)
        current_dict.precompute_compress(level=LEVEL)
        self._compressor = zstandard.ZstdCompressor(
            level=LEVEL, dict_data=current_dict, write_checksum=False, write_dict_id=True
        )
        self._known = {**known, current_dict.dict_id(): current}
        self._decompressors: dict[int, zstandard.ZstdDecompressor] = {}

    def encode(self, event: dict[str, Any]) -> bytes:
        return self._compressor.compress(orjson.dumps(event))

    def compress_many(self, bodies: Sequence[bytes]) -> list[bytes]:
        """Each JSON body as its own frame, as :meth:`encode` makes it."""
        # On the reused context: multi_compress_to_buffer would make one per call.
        compress = self._compressor.compress
        return [compress(body) for body in bodies]

    def decode(self, body: bytes) -> dict[str, Any]:
        if body[:1] == b"{":  # written before compression
            decoded: dict[str, Any] = orjson.loads(body)
            return decoded
        try:
            decoded = orjson.loads(self.decompress(body))
        except orjson.JSONDecodeError as exc:
            raise CodecError(f"stored event cannot be decoded: {exc}") from exc
        return decoded

    def decompress(self, frame: bytes) -> bytes:
        """The bytes of one frame made by :meth:`compress_many`."""
        try:
            dict_id = zstandard.get_frame_parameters(frame).dict_id
            decompressor = self._decompressors.get(dict_id)
            if decompressor is None:
                if dict_id not in self._known:
                    raise CodecError(f"stored body uses unknown dictionary {dict_id}")
                data = zstandard.ZstdCompressionDict(self._known[dict_id])
                decompressor = zstandard.ZstdDecompressor(dict_data=data)
                self._decompressors[dict_id] = decompressor
            data_out: bytes = decompressor.decompress(frame)
        except zstandard.ZstdError as exc:
            raise CodecError(f"stored body cannot be decoded: {exc}") from exc
        return data_out
