"""The proxy listener on its sockets, for the life of the application that owns the
proxy's parts.

The parts (the store, the upstream pool, the flusher, the admin listener...) live in an
aiohttp ``web.Application`` and start and stop through its ``cleanup_ctx``; its public
life-cycle calls (``startup``, ``shutdown``, ``cleanup``) run them, as aiohttp's own
runners do, while the sockets serve a :class:`~proxy.http.listener.Listener` rather than
aiohttp's server.

:class:`Server` starts and stops one; :func:`run` serves until SIGINT or SIGTERM, as
``aiohttp.web.run_app`` does for an aiohttp server.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable, Sequence

from aiohttp import web

from proxy.http.listener import Listener

log = logging.getLogger(__name__)

ListenerFactory = Callable[[web.Application], Listener]
"""Makes the listener of an application whose start-up has run."""


class Server:
    """``app`` served by the listener ``make_listener`` makes for it, once started."""

    def __init__(self, app: web.Application, make_listener: ListenerFactory) -> None:
        self._app = app
        self._make_listener = make_listener
        self._listener: Listener | None = None
        self._servers: list[asyncio.Server] = []
        self._started = False

    async def start(
        self,
        *,
        host: str | Sequence[str] | None = None,
        port: int = 0,
        sock: socket.socket | None = None,
        reuse_port: bool | None = None,
    ) -> None:
        """Run the application's start-up, then listen on ``sock``, or on ``port`` of each
        ``host`` (every address when None). When start-up or binding fails, what started
        is stopped again and the error raised (an ``OSError`` names the address)."""
        app = self._app
        # As aiohttp's runners do: the contexts may still set the application's keys
        # while they start; then it is frozen.
        app.on_startup.freeze()
        try:
            await app.startup()
        except BaseException:
            await app.cleanup()
            raise
        app.freeze()
        self._started = True
        try:
            listener = self._listener = self._make_listener(app)
            loop = asyncio.get_running_loop()
            if sock is not None:
                self._servers.append(await loop.create_server(listener, sock=sock))
                return
            hosts: Sequence[str | None] = [host] if host is None or isinstance(host, str) else host
            for one in hosts:
                self._servers.append(
                    await loop.create_server(listener, one, port, reuse_port=reuse_port)
                )
        except BaseException:
            await self.stop(0)
            raise

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """``(host, port)`` of each listening socket."""
        found = []
        for server in self._servers:
            for sock in server.sockets:
                name = sock.getsockname()
                found.append((str(name[0]), int(name[1])))
        return found

    @property
    def host(self) -> str:
        """The host of the first listening socket."""
        return self.addresses[0][0]

    @property
    def port(self) -> int:
        """The port of the first listening socket."""
        return self.addresses[0][1]

    def urls(self) -> list[str]:
        """``http://host:port`` of each listening socket."""
        return [
            f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
            for host, port in self.addresses
        ]

    async def stop(self, grace: float) -> None:
        """Stop accepting connections and close the idle ones, let the answers in flight
        finish for ``grace`` seconds at most, then run the application's cleanup (its
        contexts in reverse order)."""
        if not self._started:
            return
        self._started = False
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        listener = self._listener
        if listener is not None:
            listener.pre_shutdown()
        try:
            await self._app.shutdown()
            if listener is not None:
                await listener.shutdown(grace)
        finally:
            await self._app.cleanup()
            for server in servers:
                await server.wait_closed()


def listen_hosts(host: str) -> list[str]:
    """The addresses a listener configured with ``host`` binds: ``::`` is every address of
    both families, as a Linux socket bound to ``::`` would take (asyncio binds ``::`` for
    IPv6 alone), so ``0.0.0.0`` and ``::``, or ``0.0.0.0`` alone on a kernel without IPv6.
    Any other host is bound as given."""
    if host != "::":
        return [host]
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::", 0))
    except OSError:
        log.warning("no IPv6 on this host: listening on IPv4 only")
        return ["0.0.0.0"]
    return ["0.0.0.0", "::"]


def run(
    app: web.Application,
    make_listener: ListenerFactory,
    *,
    host: str | Sequence[str] | None = None,
    port: int = 8080,
    sock: socket.socket | None = None,
    reuse_port: bool | None = None,
    shutdown_timeout: float = 60.0,
    announce: Callable[[str], None] | None = None,
    loop: asyncio.AbstractEventLoop | None = None,
) -> None:
    """Serve ``app`` (see :class:`Server`) on ``loop`` until SIGINT or SIGTERM, then stop
    with ``shutdown_timeout`` seconds of grace; ``announce`` is given a line naming the URLs
    once every socket listens. Start-up's errors are raised after what started stopped."""
    loop = loop or asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(
            _serve(app, make_listener, host, port, sock, reuse_port, shutdown_timeout, announce)
        )
    finally:
        _cancel_all_tasks(loop)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
        asyncio.set_event_loop(None)
        loop.close()


async def _serve(
    app: web.Application,
    make_listener: ListenerFactory,
    host: str | Sequence[str] | None,
    port: int,
    sock: socket.socket | None,
    reuse_port: bool | None,
    grace: float,
    announce: Callable[[str], None] | None,
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        server = Server(app, make_listener)
        await server.start(host=host, port=port, sock=sock, reuse_port=reuse_port)
        try:
            if announce is not None:
                urls = ", ".join(server.urls())
                announce(f"======== Running on {urls} ========\n(Press CTRL+C to quit)")
            await stop.wait()
        finally:
            await server.stop(grace)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def _cancel_all_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is still running and wait for it, as ``asyncio.run`` does."""
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
