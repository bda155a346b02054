"""``workers: N``: the ``run`` process (the supervisor) and its N worker processes.

The port is this instance's alone. The supervisor binds it before any worker starts: its
first socket without ``SO_REUSEPORT``, which the kernel refuses while any other process
holds the port (a second proxy, with any ``workers``), then marked ``SO_REUSEPORT`` so the
other N-1 sockets can join it. Each socket listens and is inherited by one worker (the
kernel spreads connections over the N accept queues); no worker binds the port itself, so
a second proxy, whose first bind is refused, never joins this one's port.

A worker that exits after it started serving (killed, crashed) is started again at once,
on the same listening socket (connections that arrived meanwhile wait in its queue); like
any process that opens a store after a crash, it recovers its shard's interrupted writes
at start. A worker that exits before it serves (a start-up failure), or more than
:data:`RESTART_LIMIT` times in :data:`RESTART_WINDOW_S`, stops the others: the proxy runs
whole or not at all. The supervisor logs every exit and publishes the workers' states to
``<store>.workers.json`` (beside ``store.path``), which worker 0's ``/readyz`` shows.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import socket
import subprocess
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

from proxy.private_files import write_private
from proxy.settings import ENV_PREFIX, Settings

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_SI_KERNEL = 0x80
"""``si_code`` of a signal the kernel sent, as the terminal's Ctrl-C to its process group."""
SUPERVISOR_ENV = "AUDIT_PROXY_SUPERVISOR_PID"
"""Set for the workers: the supervisor's pid (not under ``FHIR_AUDIT_``: it is no setting)."""
LISTEN_FD_ENV = "AUDIT_PROXY_LISTEN_FD"
"""Set for a worker: the descriptor of the listening socket it inherits."""
READY_FD_ENV = "AUDIT_PROXY_READY_FD"
"""Set for a worker: a pipe it writes one byte to once it serves."""
_PR_SET_PDEATHSIG = 1

RESTART_LIMIT = 5
"""Restarts of one worker within :data:`RESTART_WINDOW_S` before the proxy gives up."""
RESTART_WINDOW_S = 60.0
POLL_S = 0.25
"""How often the supervisor looks whether a starting worker serves yet."""
LISTEN_BACKLOG = 128
"""aiohttp's default backlog."""


# --- the port ----------------------------------------------------------------------------


def bind_listeners(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` listening sockets on one port of ``host`` (its first address), bound by
    this process: the first without ``SO_REUSEPORT`` (refused with ``EADDRINUSE`` while
    any other process holds the port), the others joining it. Port 0 picks one free port
    for all. Raises :class:`OSError` when the port cannot be bound."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sockets: list[socket.socket] = []
    try:
        for n in range(count):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            # SO_REUSEADDR: connections of an earlier run in TIME_WAIT do not hold the
            # port; a listening socket still does (on Linux, unlike the BSDs).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # "::" is both families, as for one worker (proxy.http.server.listen_hosts).
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(host != "::"))
            if n == 0:
                sock.bind(address)
                address = sock.getsockname()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if n > 0:
                sock.bind(address)
            sock.listen(LISTEN_BACKLOG)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


# --- the worker's side -------------------------------------------------------------------


def inherited_listener() -> socket.socket | None:
    """In a worker: the listening socket its supervisor passed on, or None."""
    fd = os.environ.get(LISTEN_FD_ENV)
    return socket.socket(fileno=int(fd)) if fd else None


def announce_serving() -> None:
    """In a worker: tell the supervisor it serves (once)."""
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is None:
        return
    with contextlib.suppress(OSError):  # a supervisor gone ends this worker anyway
        os.write(int(fd), b"1")
    with contextlib.suppress(OSError):
        os.close(int(fd))


def end_with_supervisor() -> bool:
    """In a worker: SIGTERM (a graceful stop) when the supervisor that started it dies,
    even by SIGKILL, so no worker serves on without it (Linux's ``PR_SET_PDEATHSIG``).
    False when the supervisor is already gone."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        log.warning("this system cannot tie a worker to its supervisor (no prctl)")
        return True
    supervisor = os.environ.get(SUPERVISOR_ENV)
    return supervisor is None or os.getppid() == int(supervisor)


# --- the workers' states ----------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerState:
    """One worker as its supervisor last saw it."""

    worker: int
    """Its index, which names its store shard."""
    pid: int
    """The process serving as this worker now."""
    serving: bool
    """It has started serving (its listener accepts connections); False while it starts."""
    restarts: int
    """How often it was started again after it exited on its own."""
    last_exit: str | None
    """How its previous process ended (``killed by SIGKILL``), or None."""


def status_path(store: Path) -> Path:
    """Where the supervisor of the workers of ``store`` (``store.path``) publishes their
    states."""
    return store.with_suffix(".workers.json")


def read_worker_states(path: Path, supervisor: int) -> list[WorkerState] | None:
    """The states the supervisor ``supervisor`` published, or None (none published, or by
    another run)."""
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("supervisor") != supervisor:
        return None
    return [WorkerState(**state) for state in data["workers"]]


# --- the supervisor ---------------------------------------------------------------------


def describe_exit(returncode: int) -> str:
    """A process's end in words: ``killed by SIGKILL``, ``exited with status 1``."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


class _Worker:
    """One worker slot: the process serving as it now, and its history."""

    def __init__(
        self, index: int, command: Sequence[str], env: dict[str, str], listener: socket.socket
    ) -> None:
        self.index = index
        self._command = [*command, "--worker", str(index)]
        self._env = env
        self._listener = listener
        self.process: subprocess.Popen[bytes] | None = None
        self._ready: int | None = None
        self.serving = False
        self.restarts = 0
        self._recent: deque[float] = deque()
        self.last_exit: str | None = None

    def start(self) -> None:
        read, write = os.pipe()
        fd = self._listener.fileno()
        env = self._env | {LISTEN_FD_ENV: str(fd), READY_FD_ENV: str(write)}
        try:
            self.process = subprocess.Popen(self._command, env=env, pass_fds=(fd, write))
        except BaseException:
            os.close(read)
            raise
        finally:
            os.close(write)
        self._ready = read
        self.serving = False

    def exited(self) -> int | None:
        """Its process's exit status (reaping it), or None while it runs."""
        return None if self.process is None else self.process.poll()

    def notice_serving(self) -> bool:
        """Read whether the worker said it serves; True when that is news."""
        if self._ready is None or not select.select([self._ready], [], [], 0)[0]:
            return False
        said = os.read(self._ready, 1)  # b"" (end of file): it exited without saying so
        self.close()
        self.serving = said == b"1"
        return self.serving

    def may_restart(self) -> bool:
        """False when it was restarted :data:`RESTART_LIMIT` times within the window."""
        horizon = time.monotonic() - RESTART_WINDOW_S
        while self._recent and self._recent[0] < horizon:
            self._recent.popleft()
        return len(self._recent) < RESTART_LIMIT

    def restart(self, how: str) -> None:
        """Start it again; ``how`` its previous process ended."""
        self._recent.append(time.monotonic())
        self.restarts += 1
        self.last_exit = how
        self.close()
        self.start()

    def state(self) -> WorkerState:
        assert self.process is not None
        return WorkerState(
            worker=self.index,
            pid=self.process.pid,
            serving=self.serving,
            restarts=self.restarts,
            last_exit=self.last_exit,
        )

    def stop(self) -> None:
        """SIGTERM: a graceful stop."""
        if self.exited() is None and self.process is not None:
            self.process.send_signal(signal.SIGTERM)

    def close(self) -> None:
        if self._ready is not None:
            os.close(self._ready)
            self._ready = None


def supervise(
    command: Sequence[str], settings: Settings, listeners: Sequence[socket.socket]
) -> bool:
    """Run ``settings.workers`` workers (``command`` with a hidden ``--worker N``), worker
    ``n`` on ``listeners[n]``, until they stop; restart one that exits while serving.
    SIGTERM, and a SIGINT sent to this process alone, are passed on to every worker; a
    Ctrl-C reaches them through the process group already. True when every worker
    stopped cleanly when asked to."""
    port = listeners[0].getsockname()[1]
    env = dict(os.environ) | {
        SUPERVISOR_ENV: str(os.getpid()),
        f"{ENV_PREFIX}LISTEN__PORT": str(port),  # the port chosen, when it was 0
    }
    status = status_path(settings.store.path)
    watched = {*STOP_SIGNALS, signal.SIGCHLD}
    # Blocked before the workers exist, so no signal is missed; each worker unblocks its own.
    signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    slots = [_Worker(n, command, env, listeners[n]) for n in range(settings.workers)]

    def publish() -> None:
        states = [asdict(slot.state()) for slot in slots]
        try:
            write_private(status, orjson.dumps({"supervisor": os.getpid(), "workers": states}))
        except OSError as exc:
            log.warning("the workers' states could not be published to %s: %s", status, exc)

    stopping = failed = False
    try:
        for slot in slots:
            slot.start()
        publish()
        # Every worker is polled (and reaped) each round, not only up to a live one.
        while not (stopping and all(slot.exited() is not None for slot in slots)):
            info = signal.sigtimedwait(watched, POLL_S)
            if info is not None and info.si_signo in STOP_SIGNALS:
                if not (info.si_signo == signal.SIGINT and info.si_code == _SI_KERNEL):
                    for slot in slots:
                        slot.stop()
                stopping = True
            changed = False
            for slot in slots:
                changed |= slot.notice_serving()
                code = slot.exited()
                if code is None or stopping:
                    continue
                changed = True
                pid, how = slot.state().pid, describe_exit(code)
                if slot.serving and slot.may_restart():
                    log.error(
                        "worker %d (pid %d) %s: starting it again; it recovers its shard's"
                        " interrupted writes at start",
                        slot.index,
                        pid,
                        how,
                    )
                    slot.restart(how)
                    continue
                why = (
                    "before it served"
                    if not slot.serving
                    else f"after {RESTART_LIMIT} restarts in {RESTART_WINDOW_S:.0f} s"
                )
                log.error(
                    "worker %d (pid %d) %s %s: stopping the others", slot.index, pid, how, why
                )
                for other in slots:
                    other.stop()
                stopping = failed = True
            if changed:
                publish()
    finally:
        for slot in slots:
            slot.close()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, watched)
    return not failed and all(slot.exited() == 0 for slot in slots)
