"""HTTP/1.1 to the router: one request per connection, parsed by httptools, with hard caps.

httptools (the llhttp parser from Node.js, as used by uvicorn) parses the router's reply: framing,
chunked bodies, malformed input. This module adds what a router must never be able to do to us: make
us wait past a total deadline (a server that drips one byte a second defeats per-read timeouts), make
us read an unbounded header or body, or redirect us elsewhere. It reads no proxy settings from the
environment: router traffic goes to the router.

The caps hold on partial input, as bytes arrive, because llhttp reports a header only once it is
complete and httptools meanwhile accumulates the partial value itself (by concatenation: quadratic).
A header line that never ends was therefore never capped: measured on a LAN host answering SSDP with
a 100 MB header line, `probe --timeout 2` ran 46.7 s and grew to 231 MB. So:

- the head (status line, headers, blank line) may take at most `MAX_HEADER_SIZE` bytes of the wire,
  counted as they are fed: the parser never sees more than that before the headers are complete;
- at most `MAX_HEADERS` header lines (trailers included);
- the body is capped by the caller's `max_body` in decoded bytes, and on the wire (chunk framing and
  trailers included) at twice that beyond the read that ended the head, so a reply of one-byte
  chunks or an endless chunk extension cannot stream forever under the body cap;
- one deadline covers connect, send and every read. asyncio's timeout only fires when the task
  suspends, and `sock_recv` returns without suspending while data is ready, so the loop also checks
  the clock after every read: a sender that keeps the socket full cannot starve the timer.

Why not a full client library: a connection per request, or one kept alive where the router keeps
it (miniupnpd closes after every reply: docs/QUIRKS.md H1), is all a router needs, and the layers cost
more than the router does. Measured in the lab for one SOAP POST: raw blocking socket 0.12 ms, this
module 0.23 ms, h11 over asyncio streams 0.55 ms, httpx 2.0 ms; a SOAP add+delete through httpx was
3.2x the raw exchange. The waits are a reader or writer on the socket under one timer per request
(see `_Deadline`), not asyncio's sock_* helpers under two timeout context managers.

The caps and the request bytes are sans-IO, in `autonat.proto.httpwire`, shared with the blocking shell
(aio/blocking_http.py), which gives the same guarantees without an event loop.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Coroutine
from typing import Any

import httptools

from autonat.aio import trace as wiretrace
from autonat.aio.blocking_http import KEEP_IDLE, Connections
from autonat.proto.httpwire import (
    BODY,
    BODY_WIRE_FACTOR,
    CONNECT_TIMEOUT,
    CONNECTING,
    DONE,
    FAILED,
    HEAD,
    MAX_HEADER_SIZE,
    MAX_HEADERS,
    READ_SIZE,
    SENDING,
    USER_AGENT,
    WAITING,
    ConnectTimeout,
    HttpReply,
    Progress,
    RouterHttpError,
    StaleConnection,
    failure,
    peer_of,
    reply_of,
    serialize,
    split_url,
)

# The parser side and the request bytes live in proto/httpwire.py (shared with the blocking shell,
# aio/blocking_http.py, as is `Connections`); their names stay importable from here.
__all__ = [
    "BODY",
    "BODY_WIRE_FACTOR",
    "CONNECTING",
    "CONNECT_TIMEOUT",
    "DONE",
    "FAILED",
    "HEAD",
    "KEEP_IDLE",
    "MAX_HEADERS",
    "MAX_HEADER_SIZE",
    "SENDING",
    "USER_AGENT",
    "WAITING",
    "Connections",
    "HttpReply",
    "Progress",
    "RouterHttpError",
    "request",
]


class _Deadline:
    """The one timer of an exchange: it fails whatever the exchange is waiting for when it fires.

    Waiting is a reader or writer on the socket and a future, not asyncio's sock_* helpers and
    timeout context managers, which cost two timers and a task switch more per SOAP call."""

    __slots__ = ("_waiting", "expired", "loop", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, end: float) -> None:
        self.loop = loop
        self.expired = False
        self._waiting: asyncio.Future[None] | None = None
        self.timer = loop.call_at(end, self._expire)

    def _expire(self) -> None:
        self.expired = True
        if self._waiting is not None and not self._waiting.done():
            self._waiting.set_exception(TimeoutError())

    async def wait(self, fd: int, writable: bool, until: float | None = None) -> None:
        """Until `fd` is readable (writable); TimeoutError at the deadline, or at `until` if sooner."""
        if self.expired:
            raise TimeoutError
        loop = self.loop
        future: asyncio.Future[None] = loop.create_future()
        self._waiting = future
        early = None if until is None else loop.call_at(until, _fail, future)
        if writable:
            loop.add_writer(fd, _ready, future)
        else:
            loop.add_reader(fd, _ready, future)
        try:
            await future
        finally:
            self._waiting = None
            if early is not None:
                early.cancel()
            if writable:
                loop.remove_writer(fd)
            else:
                loop.remove_reader(fd)


def _ready(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _fail(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


def request(
    method: str,
    url: str,
    *,
    max_body: int,
    deadline: float,
    headers: dict[str, str] | None = None,
    content: bytes = b"",
    trace: list[Progress] | None = None,
    connections: Connections | None = None,
) -> Coroutine[Any, Any, HttpReply]:
    """One request, within `deadline` seconds in all; errors are one line. Await it.

    On a new connection, closed after the reply, unless `connections` is given: then a connection the
    router keeps open is reused for the next request to it (see `Connections`).
    `trace`, if given, gets this exchange's `Progress` appended at the start, so a caller that
    cancels it (its own deadline came first) can still say how far it got.
    With the wire trace on for upnp (aio/trace.py), the request and its answer or failure are traced;
    a plain function returning the coroutine, so that with it off this costs no extra coroutine.
    """
    exchange = _request(method, url, max_body, deadline, headers, content, trace, connections)
    if not wiretrace.ON:
        return exchange
    return _traced(exchange, method, url, headers or {}, content)


async def _traced(
    exchange: Coroutine[Any, Any, HttpReply], method: str, url: str, headers: dict[str, str], content: bytes
) -> HttpReply:
    token = wiretrace.http_sent(method, url, headers, content, peer_of(url))
    try:
        reply = await exchange
    except BaseException as exc:
        wiretrace.http_failed(token, exc)
        raise
    wiretrace.http_received(token, reply.status, reply.body)
    return reply


async def _request(
    method: str,
    url: str,
    max_body: int,
    deadline: float,
    headers: dict[str, str] | None,
    content: bytes,
    trace: list[Progress] | None,
    connections: Connections | None,
) -> HttpReply:
    host, port, target, netloc = split_url(url)
    payload = serialize(method, target, netloc, headers or {}, content, connections is not None)
    progress = Progress(url, max_body)
    if trace is not None:
        trace.append(progress)
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    timer = _Deadline(loop, end)
    address = (host, port)
    try:
        kept = connections.take(address, loop.time()) if connections is not None else None
        if kept is not None:
            try:
                return await _exchange(timer, address, payload, progress, end, kept, connections)
            except StaleConnection:
                progress = Progress(url, max_body)
                if trace is not None:
                    trace[-1] = progress
        return await _exchange(timer, address, payload, progress, end, None, connections)
    except (OSError, ConnectTimeout, RouterHttpError) as exc:  # TimeoutError is an OSError
        raise failure(exc, progress, url, deadline) from None
    finally:
        timer.timer.cancel()


def _start_connect(address: tuple[str, int]) -> tuple[socket.socket, bool]:
    """A non-blocking connect: (socket, True) if it completed at once, (socket, False) if in progress."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        try:
            sock.connect(address)
        except BlockingIOError:
            return sock, False
    except BaseException:
        sock.close()
        raise
    return sock, True


async def _finish_connect(timer: _Deadline, sock: socket.socket) -> None:
    try:
        await timer.wait(sock.fileno(), True, timer.loop.time() + CONNECT_TIMEOUT)
    except TimeoutError:
        if timer.expired:
            raise
        raise ConnectTimeout from None
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, os.strerror(error)) from None


async def _exchange(
    timer: _Deadline,
    address: tuple[str, int],
    payload: bytes,
    progress: Progress,
    end: float,
    kept: socket.socket | None,
    connections: Connections | None,
) -> HttpReply:
    loop = timer.loop
    parser = httptools.HttpResponseParser(progress)
    # On a LAN the handshake has often completed by the time connect() returns EINPROGRESS: the
    # request is sent at once, and only a send that would block waits for the connection (one loop
    # turn less per SOAP call than waiting for writability first).
    sock, connected = (kept, True) if kept is not None else _start_connect(address)
    keep = False
    try:
        fd = sock.fileno()
        progress.phase = SENDING
        view = memoryview(payload)
        while view:
            try:
                view = view[sock.send(view) :]
            except BlockingIOError:
                if not connected:
                    progress.phase = CONNECTING
                    await _finish_connect(timer, sock)
                    connected = True
                    progress.phase = SENDING
                    continue
                await timer.wait(fd, True)
            except (BrokenPipeError, ConnectionResetError):
                if kept is not None:
                    raise StaleConnection from None
                raise
        progress.phase = WAITING
        while not progress.complete:
            try:
                data = sock.recv(READ_SIZE)
            except BlockingIOError:
                await timer.wait(fd, False)
                continue
            except ConnectionResetError:
                if kept is not None and progress.head_bytes == 0:
                    raise StaleConnection from None
                raise
            if not data:
                if kept is not None and progress.head_bytes == 0:
                    raise StaleConnection
                progress.closed()  # a reply that ends at EOF, or one cut short
                break
            progress.feed(parser, data)
            if loop.time() >= end:
                raise TimeoutError  # the socket never ran dry, so the timer never got its turn
        keep = connections is not None and progress.keep_alive
    finally:
        if keep and connections is not None:
            connections.give(address, sock, loop.time())
        else:
            sock.close()
    return reply_of(parser, progress)
