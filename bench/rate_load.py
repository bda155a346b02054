"""A constant-rate HTTP/1.1 load generator: open loop, requests evenly spaced at a fixed
rate, each one's latency measured from the instant it was scheduled (not from when it
left), so a target that falls behind is charged for the wait it causes.

    python bench/rate_load.py URL [--rate 1000] [--seconds 10] [--warmup 2]
                              [--method POST] [--body FILE] [--header 'Name: value' ...]

Request ``i`` is scheduled at ``start + i / rate``. One thread waits on epoll for a
periodic ``timerfd`` (nanosecond deadlines, no timer slack: it fires on each instant,
and its count of expirations says how many instants passed) and for the answers, which
httptools (llhttp) parses. Each request, built once as bytes, is written on a free
keep-alive connection; a request whose instant comes while every connection is busy
opens another (up to ``--max-connections``), then waits for the first to come free:
that wait is part of its latency. Requests are never pipelined.

The measured window follows ``--warmup`` seconds of the same schedule. The generator
prints ``go`` on stdout when the window's first request is due and ``done`` once every
request of the window is answered (or ``--timeout`` passed), so a caller can read the
target's CPU time at both; then one JSON line: requests, answers, non-2xx, errors, the
latency percentiles in ms from the scheduled instant and the generator's own send lag
(how long after its instant each request was written: the error of the schedule).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import select
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httptools

CLOCK_MONOTONIC = 1  # the clock of time.monotonic_ns()
TFD_TIMER_ABSTIME = 1
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def periodic_timer(first_ns: int, interval_ns: int) -> int:
    """A ``timerfd`` that expires at ``first_ns`` (``CLOCK_MONOTONIC``) and every
    ``interval_ns`` after (Python 3.11 has no ``os.timerfd_create``: libc's, by ctypes)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "timerfd_create")
    spec = _Itimerspec(
        _Timespec(interval_ns // 1_000_000_000, interval_ns % 1_000_000_000),
        _Timespec(first_ns // 1_000_000_000, first_ns % 1_000_000_000),
    )
    if libc.timerfd_settime(fd, TFD_TIMER_ABSTIME, ctypes.byref(spec), None) < 0:
        raise OSError(ctypes.get_errno(), "timerfd_settime")
    return int(fd)


@dataclass
class Connection:
    """One keep-alive connection and the request it is waiting for."""

    sock: socket.socket
    parser: httptools.HttpResponseParser = field(init=False)
    scheduled_ns: int = 0
    """When the request in flight was due (0: none in flight)."""
    done: bool = False
    keep_alive: bool = True
    """Whether the answer just completed lets the connection be used again (llhttp
    forgets it once the message is complete)."""

    def __post_init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)

    def on_message_complete(self) -> None:
        self.done = True
        self.keep_alive = self.parser.should_keep_alive()


@dataclass
class Tally:
    """What the window measured (warm-up answers are not kept)."""

    window_start_ns: int
    window_end_ns: int
    latencies_ns: list[int] = field(default_factory=list)
    lags_ns: list[int] = field(default_factory=list)
    sent: int = 0
    non2xx: int = 0
    errors: int = 0

    def in_window(self, scheduled_ns: int) -> bool:
        return self.window_start_ns <= scheduled_ns < self.window_end_ns


class Generator:
    """The connections, the free ones and the requests waiting for one."""

    def __init__(
        self, host: str, port: int, request: bytes, tally: Tally, max_connections: int
    ) -> None:
        self._address = (host, port)
        self._request = request
        self._tally = tally
        self._max = max_connections
        self._free: list[Connection] = []
        self._backlog: deque[int] = deque()
        self._by_fd: dict[int, Connection] = {}
        self.epoll = select.epoll()
        self.outstanding = 0

    @property
    def connections(self) -> int:
        return len(self._by_fd)

    def _open(self) -> Connection:
        sock = socket.create_connection(self._address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Connection(sock)
        self._by_fd[sock.fileno()] = conn
        self.epoll.register(sock.fileno(), select.EPOLLIN)
        return conn

    def open(self, n: int) -> None:
        self._free += [self._open() for _ in range(n)]

    def _send(self, conn: Connection, scheduled_ns: int) -> None:
        conn.scheduled_ns = scheduled_ns
        conn.done = False
        if self._tally.in_window(scheduled_ns):
            self._tally.lags_ns.append(time.monotonic_ns() - scheduled_ns)
        try:
            conn.sock.sendall(self._request)
        except OSError:
            self._fail(conn)

    def submit(self, scheduled_ns: int) -> None:
        """Send the request due at ``scheduled_ns``."""
        if self._tally.in_window(scheduled_ns):
            self._tally.sent += 1
        self.outstanding += 1
        if self._free:
            conn = self._free.pop()
        elif len(self._by_fd) < self._max:
            try:
                conn = self._open()
            except OSError:
                self._count_error(scheduled_ns)
                return
        else:
            self._backlog.append(scheduled_ns)
            return
        self._send(conn, scheduled_ns)

    def _count_error(self, scheduled_ns: int) -> None:
        self.outstanding -= 1
        if self._tally.in_window(scheduled_ns):
            self._tally.errors += 1

    def _fail(self, conn: Connection) -> None:
        """The connection broke: its request is an error; it is closed and forgotten."""
        fd = conn.sock.fileno()
        self.epoll.unregister(fd)
        del self._by_fd[fd]
        conn.sock.close()
        if conn.scheduled_ns:
            self._count_error(conn.scheduled_ns)
            conn.scheduled_ns = 0

    def _finished(self, conn: Connection, now_ns: int) -> None:
        scheduled, conn.scheduled_ns = conn.scheduled_ns, 0
        self.outstanding -= 1
        if self._tally.in_window(scheduled):
            self._tally.latencies_ns.append(now_ns - scheduled)
            if not 200 <= conn.parser.get_status_code() < 300:
                self._tally.non2xx += 1
        if not conn.keep_alive:
            self._fail(conn)
            conn = self._open()
        if self._backlog:
            self._send(conn, self._backlog.popleft())
        else:
            self._free.append(conn)

    def readable(self, fd: int) -> None:
        """Read what arrived on ``fd`` and finish the request it answers."""
        conn = self._by_fd.get(fd)
        if conn is None:
            return
        try:
            data = conn.sock.recv(262144)
        except OSError:
            data = b""
        if not data:
            self._fail(conn)
            return
        try:
            conn.parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail(conn)
            return
        if conn.done:
            self._finished(conn, time.monotonic_ns())

    def close(self) -> None:
        for conn in list(self._by_fd.values()):
            conn.sock.close()
        self.epoll.close()


def build_request(
    method: str, host: str, port: int, target: str, headers: list[str], body: bytes | None
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}:{port}", *headers]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def percentiles_ms(values_ns: list[int], points: tuple[float, ...]) -> dict[str, float]:
    """Nearest-rank percentiles of ``values_ns``, in ms (NaN when there are none)."""
    ordered = sorted(values_ns)
    out: dict[str, float] = {}
    for p in points:
        if not ordered:
            out[f"p{p:g}"] = float("nan")
            continue
        rank = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))
        out[f"p{p:g}"] = ordered[rank] / 1e6
    out["max"] = ordered[-1] / 1e6 if ordered else float("nan")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--rate", type=float, default=1000.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="the measured window")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--method", default="GET")
    parser.add_argument("--body", type=Path, help="a file whose bytes are the request body")
    parser.add_argument("--header", action="append", default=[], help="'Name: value'")
    parser.add_argument("--connections", type=int, default=4, help="opened before the start")
    parser.add_argument("--max-connections", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=10.0, help="to wait after the window")
    args = parser.parse_args()

    url = urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    target = url.path + (f"?{url.query}" if url.query else "")
    body = args.body.read_bytes() if args.body is not None else None
    request = build_request(args.method, host, port, target, args.header, body)

    interval_ns = int(1e9 / args.rate)
    warmup_n = int(args.warmup * args.rate)
    total = warmup_n + int(args.seconds * args.rate)
    start_ns = time.monotonic_ns() + 50_000_000
    window_start = start_ns + warmup_n * interval_ns
    tally = Tally(window_start, start_ns + total * interval_ns)
    gen = Generator(host, port, request, tally, args.max_connections)
    gen.open(args.connections)
    timer = periodic_timer(start_ns, interval_ns)
    gen.epoll.register(timer, select.EPOLLIN)
    cpu_start = time.process_time()
    due = 0
    while due < total:
        for fd, _ in gen.epoll.poll():
            if fd != timer:
                gen.readable(fd)
                continue
            expired = int.from_bytes(os.read(timer, 8), sys.byteorder)
            for i in range(due, min(total, due + expired)):
                if i == warmup_n:
                    print("go", flush=True)
                gen.submit(start_ns + i * interval_ns)
            due += expired
    gen.epoll.unregister(timer)
    os.close(timer)
    deadline = time.monotonic() + args.timeout
    while gen.outstanding and time.monotonic() < deadline:
        for fd, _ in gen.epoll.poll(0.05):
            gen.readable(fd)
    print("done", flush=True)
    cpu = time.process_time() - cpu_start
    unanswered = gen.outstanding
    gen.close()
    elapsed = (time.monotonic_ns() - start_ns) / 1e9
    result = {
        "rate": args.rate,
        "seconds": args.seconds,
        "sent": tally.sent,
        "answered": len(tally.latencies_ns),
        "unanswered": unanswered,
        "non2xx": tally.non2xx,
        "errors": tally.errors,
        "connections": gen.connections,
        "latency_ms": percentiles_ms(tally.latencies_ns, (50, 90, 99, 99.9)),
        "send_lag_ms": percentiles_ms(tally.lags_ns, (50, 99)),
        "generator_cpu_share": cpu / elapsed,
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
