"""The store's writer process: its failures and its end (proxy.store.engine)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.store.faces import StoreError
from proxy.store.queue import AuditQueue
from tests.factories import NOW, OpenStore, audit_event

ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone as far as the store is concerned.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[AuditQueue]:
    opened = await AuditQueue.open(tmp_path / "audit.db", max_bytes=1 << 30)
    try:
        yield opened
    finally:
        await opened.close()


def _writer(queue: AuditQueue) -> int:
    pid = queue.engine.writer_pid
    assert pid is not None, "a writer process runs"
    return pid


async def _gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        await asyncio.sleep(0.05)
    return False


async def test_appends_are_committed_by_a_process_other_than_the_proxy(
    tmp_path: Path, open_store: OpenStore
) -> None:
    queue = await open_store(tmp_path / "audit.db", max_bytes=1 << 30)
    try:
        pid = queue.engine.writer_pid
        assert pid is not None and pid != os.getpid() and _alive(pid)
        event = audit_event(1)
        await queue.append([event])
        assert queue.commits == 1
        assert [q.event for q in await queue.claim(10, NOW)] == [event]
    finally:
        await queue.close()
    assert await _gone(pid), "close() stops the writer"


async def test_a_writer_killed_mid_commit_fails_that_batch_and_a_new_writer_takes_over(
    queue: AuditQueue,
) -> None:
    first = _writer(queue)
    os.kill(first, signal.SIGSTOP)  # the commit cannot finish...
    append = asyncio.ensure_future(queue.append([audit_event(1)]))
    await asyncio.sleep(0.2)
    assert not append.done()
    os.kill(first, signal.SIGKILL)  # ...and never will
    with pytest.raises(StoreError, match="writer process exited"):
        await asyncio.wait_for(append, 10)
    assert queue.refusing is not None, "readiness says the store is failing"
    event = audit_event(2)
    await queue.append([event])  # a new writer commits what follows
    assert _writer(queue) != first
    assert queue.refusing is None
    assert [q.event for q in await queue.claim(10, NOW)] == [event]


async def test_a_writer_that_died_between_commits_is_replaced_without_failing_anyone(
    queue: AuditQueue,
) -> None:
    first = _writer(queue)
    os.kill(first, signal.SIGKILL)
    assert await _gone(first)
    await asyncio.sleep(0.1)  # the engine hears of it
    await asyncio.gather(*(queue.append([audit_event(n)]) for n in range(1, 4)))
    assert _writer(queue) != first
    assert len(await queue.claim(10, NOW)) == 3


SCRIPT = """
import asyncio, sys
from pathlib import Path
from proxy.store.queue import AuditQueue
from tests.factories import audit_event

async def main():
    queue = await AuditQueue.open(Path(sys.argv[1]), max_bytes=1 << 30)
    print(queue.engine.writer_pid, flush=True)
    n = 0
    while sys.argv[2] == "busy":  # appends in flight when the kill comes
        n += 1
        await asyncio.gather(*(queue.append([audit_event(n * 100 + i)]) for i in range(32)))
    await asyncio.sleep(3600)

asyncio.run(main())
"""


@pytest.mark.parametrize("load", ["idle", "busy"])
async def test_the_writer_ends_when_the_proxy_is_killed(tmp_path: Path, load: str) -> None:
    """SIGKILL to the proxy leaves no writer behind: it reads end of file (or a reset,
    when answers were still unread) and exits, without a traceback."""
    proxy = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SCRIPT,
        str(tmp_path / "audit.db"),
        load,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert proxy.stdout is not None and proxy.stderr is not None
        writer = int(await asyncio.wait_for(proxy.stdout.readline(), 30))
        assert _alive(writer)
        await asyncio.sleep(0.5)
        proxy.kill()
        await proxy.wait()
        assert await _gone(writer), "the writer outlived the proxy"
        errors = (await proxy.stderr.read()).decode()
        assert "Traceback" not in errors, errors
    finally:
        if proxy.returncode is None:
            proxy.kill()
            await proxy.wait()


async def test_the_writer_ignores_the_terminal_s_ctrl_c(queue: AuditQueue) -> None:
    """SIGINT and SIGTERM to the process group do not cut a commit short: the proxy
    decides when its writer stops."""
    pid = _writer(queue)
    os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGTERM)
    await asyncio.sleep(0.2)
    assert _alive(pid)
    await queue.append([audit_event(1)])
    assert _writer(queue) == pid


async def test_a_store_opened_for_reading_starts_its_writer_only_at_an_append(
    tmp_path: Path,
    open_store: OpenStore,
) -> None:
    """Other workers' shards, read by the admin API and `dlq`, get no writer process
    unless something appends to them."""
    path = tmp_path / "audit.db"
    queue = await open_store(path, max_bytes=1 << 30)
    await queue.close()
    reader = await open_store(path, max_bytes=1 << 30, create=False, start_writer=False)
    try:
        assert reader.engine.writer_pid is None
        assert (await reader.stats()).pending == 0
        assert reader.engine.writer_pid is None
        event = audit_event(1)
        await reader.append([event])
        assert reader.engine.writer_pid is not None
        assert [q.event for q in await reader.claim(10, NOW)] == [event]
    finally:
        await reader.close()
    idle = await open_store(path, max_bytes=1 << 30, start_writer=False)
    await idle.close()  # nothing to stop
    assert idle.engine.writer_pid is None


@pytest.mark.parametrize(
    ("program", "error"),
    [
        ("import sys; sys.exit(3)", "exited at start"),
        ("import time; time.sleep(60)", "did not open the store within"),
    ],
)
async def test_a_writer_that_cannot_start_makes_the_store_fail_to_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, program: str, error: str, open_store: OpenStore
) -> None:
    """The proxy does not start on a store whose writer cannot run: the error is a
    StoreError, which the CLI reports in one line."""
    from proxy.store import engine

    monkeypatch.setattr(engine, "_WRITER_MAIN", program)
    monkeypatch.setattr(engine, "START_TIMEOUT_S", 1.0)
    with pytest.raises(StoreError, match=error):
        await open_store(tmp_path / "audit.db", max_bytes=1 << 30)
