"""C2SP ``signed-note`` with Ed25519 signatures: signing keys, verifier keys, signing and
opening notes.

A note is UTF-8 text ending in a newline, a blank line, then signature lines
``— <key name> <base64(key ID || signature)>``. The key ID is the first four bytes, big
endian, of ``SHA-256(key name || 0x0A || 0x01 || public key)`` (0x01: Ed25519). Keys are
written as Go's ``golang.org/x/mod/sumdb/note`` writes them, so its tools and this proxy
read each other's: a verifier key ``<name>+<hex key ID>+<base64(0x01 || public key)>``,
a signing key ``PRIVATE+KEY+<name>+<hex key ID>+<base64(0x01 || seed)>``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

# cryptography (tens of MB of OpenSSL bindings) is imported by the first key used, not
# with this module: a proxy that keeps no transparency log need not hold it in memory.
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

ED25519 = 0x01
"""The signature type byte of Ed25519."""
DASH = "\u2014 "
"""What a signature line begins with: an em dash and a space."""
PRIVATE_PREFIX = "PRIVATE+KEY+"
MAX_SIGNATURES = 100
"""Signature lines a note may have before it is refused outright."""


class NoteError(ValueError):
    """A key or note that cannot be used, or a signature that does not verify: the
    message says which."""


def check_name(name: str) -> str:
    """``name`` if it may name a key: non-empty, with no space and no ``+``."""
    if not name or "+" in name or any(c.isspace() for c in name):
        raise NoteError(f"a key name must be non-empty, without spaces or '+': {name!r}")
    return name


def key_id(name: str, public: bytes) -> int:
    """The key ID of an Ed25519 public key under ``name``."""
    digest = hashlib.sha256(name.encode() + b"\n" + bytes([ED25519]) + public).digest()
    value: int = struct.unpack(">I", digest[:4])[0]
    return value


def _raw_public(key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise NoteError(f"{what} is not base64: {exc}") from None


@dataclass(frozen=True, slots=True)
class Verifier:
    """A verifier key: a name and an Ed25519 public key."""

    name: str
    public: bytes
    """32 bytes (RFC 8032)."""
    id: int = field(init=False)
    """The key ID signatures name it by."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "id", key_id(self.name, self.public))

    @classmethod
    def parse(cls, vkey: str) -> Verifier:
        """The key written as ``<name>+<hex key ID>+<base64(0x01 || key)>``."""
        name, plus, rest = vkey.strip().partition("+")
        hex_id, plus2, encoded = rest.partition("+")
        if not plus or not plus2 or len(hex_id) != 8:
            raise NoteError("a verifier key is written <name>+<8 hex digits>+<base64 key>")
        data = _b64decode(encoded, "the verifier key")
        if len(data) != 33 or data[0] != ED25519:
            raise NoteError("the verifier key is not an Ed25519 key (0x01 and 32 bytes)")
        verifier = cls(check_name(name), data[1:])
        if f"{verifier.id:08x}" != hex_id.lower():
            raise NoteError(f"the verifier key's ID {hex_id} does not match its name and key")
        return verifier

    def text(self) -> str:
        """The key as a verifier key line: ``<name>+<hex key ID>+<base64 key>``."""
        encoded = base64.b64encode(bytes([ED25519]) + self.public).decode()
        return f"{self.name}+{self.id:08x}+{encoded}"

    def verifies(self, text: bytes, signature: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            Ed25519PublicKey.from_public_bytes(self.public).verify(signature, text)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True, slots=True)
class Signer:
    """A signing key: a name and an Ed25519 private key. Its ``repr`` shows no secret."""

    name: str
    private: Ed25519PrivateKey = field(repr=False)

    @classmethod
    def generate(cls, name: str) -> Signer:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return cls(check_name(name), Ed25519PrivateKey.generate())

    @classmethod
    def parse(cls, text: str) -> Signer:
        """The key written as ``PRIVATE+KEY+<name>+<hex key ID>+<base64(0x01 || seed)>``."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        text = text.strip()
        if not text.startswith(PRIVATE_PREFIX):
            raise NoteError(f"a signing key begins with {PRIVATE_PREFIX}")
        name, _, rest = text.removeprefix(PRIVATE_PREFIX).partition("+")
        hex_id, _, encoded = rest.partition("+")
        data = _b64decode(encoded, "the signing key")
        if len(data) != 33 or data[0] != ED25519:
            raise NoteError("the signing key is not an Ed25519 key (0x01 and a 32-byte seed)")
        signer = cls(check_name(name), Ed25519PrivateKey.from_private_bytes(data[1:]))
        if f"{signer.verifier.id:08x}" != hex_id.lower():
            raise NoteError(f"the signing key's ID {hex_id} does not match its name and key")
        return signer

    @property
    def verifier(self) -> Verifier:
        return Verifier(self.name, _raw_public(self.private.public_key()))

    def text(self) -> str:
        """The key as a signing key line (secret)."""
        seed = self.private.private_bytes_raw()
        encoded = base64.b64encode(bytes([ED25519]) + seed).decode()
        return f"{PRIVATE_PREFIX}{self.name}+{self.verifier.id:08x}+{encoded}"

    def sign(self, text: str) -> str:
        """The signed note of ``text`` (which ends in a newline)."""
        check_text(text)
        signature = self.private.sign(text.encode())
        encoded = base64.b64encode(struct.pack(">I", self.verifier.id) + signature).decode()
        return f"{text}\n{DASH}{self.name} {encoded}\n"


def check_text(text: str) -> None:
    """Raise :class:`NoteError` for a note text the format forbids."""
    if not text.endswith("\n"):
        raise NoteError("a note's text ends in a newline")
    if any(ord(c) < 0x20 and c != "\n" for c in text):
        raise NoteError("a note's text holds no control character other than newline")


@dataclass(frozen=True, slots=True)
class Signature:
    """One signature line of a note."""

    name: str
    id: int
    signature: bytes


def split(note: str) -> tuple[str, list[Signature]]:
    """The text of a signed note and its signature lines, unverified."""
    text, blank, block = note.rpartition("\n\n")
    if not blank:
        raise NoteError("not a signed note: no blank line before the signatures")
    text += "\n"
    check_text(text)
    if not block.endswith("\n"):
        raise NoteError("a signed note ends in a newline")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError(f"a signed note with more than {MAX_SIGNATURES} signatures")
    signatures = []
    for line in lines:
        if not line.startswith(DASH):
            raise NoteError(f"not a signature line: {line[:80]!r}")
        name, space, encoded = line.removeprefix(DASH).partition(" ")
        data = _b64decode(encoded, "a signature") if space else b""
        if len(data) < 5:
            raise NoteError(f"a malformed signature line: {line[:80]!r}")
        (sig_id,) = struct.unpack(">I", data[:4])
        signatures.append(Signature(check_name(name), sig_id, data[4:]))
    return text, signatures


def open_note(note: str, verifier: Verifier) -> str:
    """The text of ``note`` once ``verifier``'s signature on it is checked. Signatures of
    other keys are ignored; :class:`NoteError` when the key's signature is missing or
    does not verify."""
    text, signatures = split(note)
    mine = [s for s in signatures if s.name == verifier.name and s.id == verifier.id]
    if not mine:
        raise NoteError(f"no signature by {verifier.name}+{verifier.id:08x}")
    for s in mine:
        if not verifier.verifies(text.encode(), s.signature):
            raise NoteError(f"the signature by {verifier.name}+{verifier.id:08x} does not verify")
    return text
