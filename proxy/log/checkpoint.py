"""C2SP ``tlog-checkpoint``: the note text of a tree head (origin, tree size, root hash),
signed as a C2SP signed note."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from proxy.log.note import NoteError, Signer, Verifier, open_note
from proxy.log.tree import HASH_SIZE


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    """A tree head: the log's origin, its size and its root hash."""

    origin: str
    """The log's identity, the first line."""
    size: int
    """Leaves in the tree."""
    root: bytes
    """The RFC 6962 root hash of those leaves."""

    def text(self) -> str:
        """The note text: ``origin``, size in decimal, base64 root, each on its line."""
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\n"

    def sign(self, signer: Signer) -> str:
        return signer.sign(self.text())

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        """The checkpoint a note text states (extension lines ignored)."""
        lines = text.split("\n")
        if len(lines) < 4 or lines[-1] != "" or not all(lines[:-1]):
            raise NoteError("a checkpoint is at least three non-empty lines, each ending in \\n")
        origin, size, root = lines[:3]
        if not size.isdigit() or (size != "0" and size.startswith("0")) or not size.isascii():
            raise NoteError(f"a checkpoint's tree size is a decimal number: {size!r}")
        try:
            digest = base64.b64decode(root, validate=True)
        except binascii.Error:
            digest = b""
        if len(digest) != HASH_SIZE:
            raise NoteError(f"a checkpoint's root hash is 32 bytes in base64: {root!r}")
        return cls(origin=origin, size=int(size), root=digest)

    @classmethod
    def open(cls, note: str, verifier: Verifier) -> Checkpoint:
        """The checkpoint of a signed note, its signature by ``verifier`` checked."""
        return cls.parse(open_note(note, verifier))
