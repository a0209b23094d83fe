"""Connection limits around uvicorn: a cap on open connections and a deadline for each request head.

uvicorn accepts every TCP connection and waits for its request head as long as the client likes, so
about 20,000 idle connections exhaust the file descriptors and nobody is served (and the API key does
not help: it is checked after the head arrives). `server_config` builds uvicorn's config with its HTTP
protocol wrapped in `_GuardedConnection`:

- a connection whose request head (the lines up to the blank one) is not complete `header_timeout`
  seconds after it opened, or after it began a new request on a kept-alive connection, is closed;
- at `max_connections` open connections, a newcomer makes room by closing the connection that has
  waited longest for its head; when every open one is inside a request, or those waiting have not yet had
  a turn of the event loop to be read, the newcomer is closed;
- those closings are logged at most once per `LOG_EVERY` seconds, as counts, never one line each.

Idle kept-alive connections are closed by uvicorn itself after `keep_alive_timeout` seconds.
This module knows TCP connections and uvicorn, not routes or models (serve/app.py).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import Counter
from dataclasses import dataclass

import h11

LOG_EVERY = 10.0  # seconds between two log lines about closed connections
HEAD_END = b"\r\n\r\n"
logger = logging.getLogger("uvicorn.error")


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 1000  # open TCP connections (`lmforge serve --max-connections`)
    header_timeout: float = 10.0  # seconds a connection may take to send a request head (`--header-timeout`)
    keep_alive_timeout: float = 5.0  # seconds an idle kept-alive connection stays open (`--keep-alive-timeout`)


DEFAULT_LIMITS = ConnectionLimits()


class _Guard:
    """The open connections of one server, those waiting for a request head (oldest first), and counts."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.open: set[_GuardedConnection] = set()
        self.waiting: dict[_GuardedConnection, None] = {}  # insertion-ordered: the first waited longest
        self.closed: Counter[str] = Counter()
        self.last_log = 0.0

    def count(self, reason: str) -> None:
        self.closed[reason] += 1
        now = time.monotonic()
        if now - self.last_log >= LOG_EVERY:
            parts = ", ".join(f"{number} {reason}" for reason, number in sorted(self.closed.items()))
            logger.warning(f"closed connections since the last report: {parts} (open now: {len(self.open)})")
            self.closed.clear()
            self.last_log = now


class _GuardedConnection(asyncio.Protocol):
    """uvicorn's h11 protocol for one connection, wrapped with the head deadline and the connection cap."""

    def __init__(self, inner, guard: _Guard) -> None:
        self.inner, self.guard = inner, guard
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.head = b""  # the start of the request head being waited for, up to its blank line
        self.refused = False
        # NOTE: uvicorn accepts up to 2,048 connections in one turn of the event loop, before any of them is read.
        # Under a flood, more than the cap may arrive in one turn: a client that sent its head at once (a /health
        # probe) must not be closed for newer idle ones before the server has had its turn to read it.
        self.evictable = False

    def connection_made(self, transport) -> None:
        guard = self.guard
        if len(guard.open) >= guard.limits.max_connections:
            oldest = next(iter(guard.waiting), None)  # the oldest is the first to become evictable
            if oldest is None or not oldest.evictable:
                self.refused = True
                transport.close()
                guard.count(f"over the cap of {guard.limits.max_connections} open connections, all busy or new")
                return
            oldest.close(f"waiting longest for a request head at the cap of {guard.limits.max_connections} "
                         "open connections")  # fmt: skip
        self.transport = transport
        # Its reader is added in the next turn and its data read in the one after: evictable only after that.
        loop = asyncio.get_running_loop()
        loop.call_soon(loop.call_soon, setattr, self, "evictable", True)
        guard.open.add(self)
        self._wait_for_head()
        self.inner.connection_made(transport)

    def _wait_for_head(self) -> None:
        self.head = b""
        self.guard.waiting[self] = None
        loop = asyncio.get_running_loop()
        reason = f"without a request head after {self.guard.limits.header_timeout:g} s"
        self.timer = loop.call_later(self.guard.limits.header_timeout, self.close, reason)

    def _head_arrived(self) -> None:
        self.guard.waiting.pop(self, None)
        if self.timer is not None:
            self.timer.cancel()

    def close(self, reason: str) -> None:
        self._head_arrived()
        if self.transport is not None and not self.transport.is_closing():
            self.guard.count(reason)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self not in self.guard.waiting and self.inner.conn.their_state is self.inner.conn.our_state is h11.IDLE:
            self._wait_for_head()  # a kept-alive connection begins its next request
        if self in self.guard.waiting:
            self.head = (self.head + data)[-len(data) - len(HEAD_END) :]
            if HEAD_END in self.head:
                self._head_arrived()
        self.inner.data_received(data)

    def eof_received(self):
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.refused:
            return
        self._head_arrived()
        self.guard.open.discard(self)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


def server_config(app, host: str, port: int, limits: ConnectionLimits, log_level: str = "info"):
    """uvicorn's Config for `app` with `limits` enforced (the file-descriptor limit raised to fit the cap)."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    limits = _fit_descriptor_limit(limits)
    guard = _Guard(limits)

    def protocol(**kwargs) -> _GuardedConnection:
        return _GuardedConnection(H11Protocol(**kwargs), guard)

    return uvicorn.Config(
        app, host=host, port=port, http=protocol, timeout_keep_alive=limits.keep_alive_timeout, log_level=log_level
    )


def _fit_descriptor_limit(limits: ConnectionLimits, spare: int = 128) -> ConnectionLimits:
    """Raise this process's soft limit on open files so the cap fits below it, or lower the cap to fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = limits.max_connections + spare  # the model's files, the scheduler, logs, sockets being closed
    if soft != resource.RLIM_INFINITY and soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != resource.RLIM_INFINITY and soft < wanted:
        fitted = max(soft - spare, 1)
        logger.warning(f"--max-connections {limits.max_connections} lowered to {fitted}: this process may open "
                       f"at most {soft} files (ulimit -n)")  # fmt: skip
        return ConnectionLimits(fitted, limits.header_timeout, limits.keep_alive_timeout)
    return limits
