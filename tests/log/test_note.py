"""C2SP signed notes and checkpoints: Go's ``sumdb/note`` example signed byte for byte,
keys in its text forms, and a checkpoint the proxy signs read by a verifier written in the
test from the specification."""

from __future__ import annotations

import pytest

from proxy.log.checkpoint import Checkpoint
from proxy.log.note import NoteError, Signer, Verifier, open_note
from tests.factories import independent_open_note, log_signer

# The example of golang.org/x/mod/sumdb/note's package documentation.
GO_SIGNING_KEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VERIFIER_KEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
GO_NOTE = (
    GO_TEXT + "\n\u2014 PeterNeumann "
    "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)


def test_gos_example_note_is_signed_byte_for_byte() -> None:
    signer = Signer.parse(GO_SIGNING_KEY)
    assert signer.verifier.text() == GO_VERIFIER_KEY
    assert signer.text() == GO_SIGNING_KEY
    assert signer.sign(GO_TEXT) == GO_NOTE
    assert open_note(GO_NOTE, Verifier.parse(GO_VERIFIER_KEY)) == GO_TEXT


def test_a_note_verifies_only_whole_and_by_its_key() -> None:
    verifier = Verifier.parse(GO_VERIFIER_KEY)
    with pytest.raises(NoteError, match="does not verify"):
        open_note(GO_NOTE.replace("cryptography", "Cryptography"), verifier)
    with pytest.raises(NoteError, match="no signature by PeterNeumann"):
        open_note(GO_NOTE.replace("PeterNeumann x08", "PaulNeumann x08"), verifier)
    other = log_signer()
    # Another key's signature beside it is ignored (the note format's rule).
    cosigned = GO_NOTE + other.sign(GO_TEXT).split("\n\n")[1]
    assert open_note(cosigned, verifier) == GO_TEXT
    assert open_note(cosigned, other.verifier) == GO_TEXT


@pytest.mark.parametrize(
    "bad",
    [
        "PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",  # wrong id
        "PeterNeumann+c74f20a3+ApTc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",  # not 0x01
        "Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "PeterNeumann+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
    ],
)
def test_malformed_verifier_keys_are_refused(bad: str) -> None:
    with pytest.raises(NoteError):
        Verifier.parse(bad)


def test_a_checkpoint_reads_back_and_verifies_independently() -> None:
    signer = log_signer("audit.example.org/ward3")
    checkpoint = Checkpoint(
        origin="audit.example.org/ward3/0a1b", size=70000, root=bytes(range(32))
    )
    note = checkpoint.sign(signer)
    text = independent_open_note(note, signer.verifier.text())
    assert text == (
        "audit.example.org/ward3/0a1b\n70000\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n"
    )
    assert Checkpoint.open(note, signer.verifier) == checkpoint
    for broken in (
        "a\n01\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n",
        "a\n1\nAAEC\n",
        "a\n1\n",
    ):
        with pytest.raises(NoteError):
            Checkpoint.parse(broken)
