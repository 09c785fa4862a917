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
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httptools

from autonat.aio import trace as wiretrace
from autonat.errors import RouterRefused, RouterTimeout

MAX_HEADER_SIZE = 16 * 1024
"""The whole head of a reply, as h11 and node.js (`--max-http-header-size`, 16 KiB) bound it; a
router's head is a few hundred bytes."""

MAX_HEADERS = 100
"""Header lines per reply: Apache httpd's `LimitRequestFields` default (node.js allows 2000, for
browsers' cookie piles); miniupnpd sends 6."""

BODY_WIRE_FACTOR = 2
"""The body may take `max_body * BODY_WIRE_FACTOR` bytes on the wire: room for chunk framing and
trailers, never an unbounded stream of framing around a capped body."""

CONNECT_TIMEOUT = 1.0  # a router on the LAN accepts in a millisecond; the total deadline still applies
READ_SIZE = 65536
USER_AGENT = "autonat UPnP/1.1"

# How far an exchange got; the timeout message says where it stalled (a hang, a drip, a full socket).
CONNECTING, SENDING, WAITING, HEAD, BODY = "connecting", "sending", "waiting", "head", "body"
DONE, FAILED = "done", "failed"


class RouterHttpError(RouterRefused):
    """The router's HTTP side misbehaved: refused connection, redirect, malformed, oversized reply."""

    def __init__(self, message: str) -> None:
        super().__init__(message, protocol="upnp", code=0)


@dataclass(frozen=True, slots=True)
class HttpReply:
    status: int
    body: bytes


@dataclass(slots=True)
class Progress:
    """One exchange: httptools' callback target, enforcing the caps as bytes arrive, and a record of
    how far it got (read by a caller whose own deadline ends it first, e.g. SSDP discovery)."""

    url: str
    max_body: int
    phase: str = CONNECTING
    head_bytes: int = 0  # wire bytes fed while the head was incomplete
    body_wire_bytes: int = 0  # wire bytes fed after it
    headers: int = 0
    content_length: int | None = None
    chunked: bool = False
    headers_done: bool = False
    complete: bool = False
    body: bytearray = field(default_factory=bytearray)

    # --- httptools callbacks (an exception raised here aborts feed_data) -------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers += 1
        if self.headers > MAX_HEADERS:
            raise RouterHttpError(f"router's reply from {self.url} has more than {MAX_HEADERS} header lines")
        name = name.lower()
        if name == b"content-length" and value.strip().isdigit():
            self.content_length = int(value)
            if self.content_length > self.max_body:
                raise RouterHttpError(
                    f"router's reply from {self.url} is {self.content_length} bytes, over the {self.max_body} cap"
                )
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            self.chunked = True

    def on_headers_complete(self) -> None:
        self.headers_done = True
        self.phase = BODY

    def on_body(self, chunk: bytes) -> None:
        self.body += chunk
        if len(self.body) > self.max_body:
            raise RouterHttpError(f"router's reply from {self.url} exceeds the {self.max_body}-byte cap")

    def on_message_complete(self) -> None:
        self.complete = True
        self.phase = DONE

    # --- feeding ----------------------------------------------------------------------------------

    def feed(self, parser: httptools.HttpResponseParser, data: bytes | memoryview) -> None:
        """Feed one read, counting it against the head cap until the head is complete and against
        the body's wire cap after; the parser never holds more than the caps allow."""
        if not self.headers_done:
            self.phase = HEAD
            room = MAX_HEADER_SIZE - self.head_bytes
            if len(data) <= room:
                self.head_bytes += len(data)
                _feed(parser, data, self.url)
                if not self.headers_done and self.head_bytes >= MAX_HEADER_SIZE:
                    raise RouterHttpError(f"router's reply headers from {self.url} exceed {MAX_HEADER_SIZE} bytes")
                return
            # More than the head may still take: feed only that much; the rest only if the head ended in it.
            view = memoryview(data)
            self.head_bytes = MAX_HEADER_SIZE
            _feed(parser, view[:room], self.url)
            if not self.headers_done:
                raise RouterHttpError(f"router's reply headers from {self.url} exceed {MAX_HEADER_SIZE} bytes")
            data = view[room:]
        self.body_wire_bytes += len(data)
        if self.body_wire_bytes > self.max_body * BODY_WIRE_FACTOR:
            raise RouterHttpError(
                f"router's reply from {self.url} exceeds {self.max_body * BODY_WIRE_FACTOR} bytes on the wire"
                " (chunk framing and trailers included)"
            )
        _feed(parser, data, self.url)

    def stalled(self) -> str:
        """Where the exchange stood when its time ran out, in words."""
        if self.phase == CONNECTING:
            return "connection not accepted"
        if self.phase == SENDING:
            return "request not taken"
        if self.phase == WAITING:
            return "connected, request sent, no reply"
        if not self.headers_done:
            return f"reply headers incomplete ({self.head_bytes} bytes)"
        of = f" of {self.content_length}" if self.content_length is not None else ""
        return f"reply body incomplete ({len(self.body)}{of} bytes)"


def _feed(parser: httptools.HttpResponseParser, data: bytes | memoryview, url: str) -> None:
    try:
        parser.feed_data(data)
    except httptools.HttpParserCallbackError as exc:
        cause = exc.__context__
        raise cause if isinstance(cause, RouterHttpError) else RouterHttpError(str(exc)) from None
    except httptools.HttpParserUpgrade:
        raise RouterHttpError(f"router tried to upgrade the connection for {url}") from None
    except httptools.HttpParserError as exc:
        raise RouterHttpError(f"router sent malformed HTTP for {url}: {exc}") from None


def _serialize(method: str, target: str, host: str, headers: dict[str, str], content: bytes, keep: bool) -> bytes:
    lines = [
        f"{method} {target} HTTP/1.1",
        f"Host: {host}",
        f"User-Agent: {USER_AGENT}",
        *(() if keep else ("Connection: close",)),
        f"Content-Length: {len(content)}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    if any(bad in line for line in lines for bad in "\r\n\0"):
        raise ValueError("HTTP header text must be single lines")  # a caller bug, never router input
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + content


class Connections:
    """Idle connections to the router kept for the next request, at most one per (host, port).

    HTTP/1.1 connections persist unless a side says `Connection: close` (RFC 9112 §9.3). miniupnpd
    closes after every reply (docs/QUIRKS.md H1), so against it nothing is ever kept; a router that
    keeps the connection open saves a TCP handshake per SOAP call. A kept connection is used again only
    if it is at most KEEP_IDLE seconds old and the router has not closed it meanwhile; a request that
    finds it closed after all (the router's close crossed our request) is sent once more on a new one.
    """

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], tuple[socket.socket, float]] = {}

    def take(self, address: tuple[str, int], now: float) -> socket.socket | None:
        entry = self._idle.pop(address, None)
        if entry is None:
            return None
        sock, since = entry
        if now - since <= KEEP_IDLE:
            try:
                sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                return sock  # open, and nothing unasked-for waiting in it
            except OSError:
                pass
        sock.close()  # stale, closed by the router (EOF), or it sent something nobody asked for
        return None

    def give(self, address: tuple[str, int], sock: socket.socket, now: float) -> None:
        old = self._idle.pop(address, None)
        if old is not None:
            old[0].close()
        self._idle[address] = (sock, now)

    def close(self) -> None:
        for sock, _ in self._idle.values():
            sock.close()
        self._idle.clear()


KEEP_IDLE = 5.0  # seconds an idle kept connection is trusted; routers time idle ones out (miniupnpd keeps none)


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


class _ConnectTimeout(Exception):
    pass


class _StaleConnection(Exception):
    """A kept connection turned out closed before any byte of the reply: send again on a new one."""


def _split_url(url: str) -> tuple[str, int, str, str]:
    """(host, port, target, netloc) of an http URL to the router, else RouterHttpError."""
    try:
        parts = urlsplit(url)
        port = parts.port or 80
    except ValueError:
        raise RouterHttpError(f"refusing to fetch {url}: not a valid URL") from None
    if parts.scheme != "http" or parts.hostname is None:
        raise RouterHttpError(f"refusing to fetch {url}: only http URLs to the router")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, port, target, parts.netloc


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
    try:
        parts = urlsplit(url)
        peer = (parts.hostname or url, parts.port or 80)
    except ValueError:  # a malformed URL: the request itself says so
        peer = (url, 0)
    token = wiretrace.http_sent(method, url, headers, content, peer)
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
    host, port, target, netloc = _split_url(url)
    payload = _serialize(method, target, netloc, headers or {}, content, connections is not None)
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
            except _StaleConnection:
                progress = Progress(url, max_body)
                if trace is not None:
                    trace[-1] = progress
        return await _exchange(timer, address, payload, progress, end, None, connections)
    except TimeoutError:
        stalled, progress.phase = progress.stalled(), FAILED
        raise RouterTimeout(f"router did not answer {url} within {deadline:g} s ({stalled})") from None
    except _ConnectTimeout:
        progress.phase = FAILED
        raise RouterHttpError(f"router did not accept a connection for {url} within {CONNECT_TIMEOUT:g} s") from None
    except ConnectionRefusedError:
        progress.phase = FAILED
        raise RouterHttpError(f"UPnP: the router refused the connection to {url} (nothing listens there)") from None
    except OSError as exc:
        progress.phase = FAILED
        raise RouterHttpError(f"HTTP to {url} failed: {exc.strerror or exc}") from None
    except RouterHttpError:
        progress.phase = FAILED
        raise
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
        raise _ConnectTimeout from None
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
    url = progress.url
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
                    raise _StaleConnection from None
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
                    raise _StaleConnection from None
                raise
            if not data:
                if kept is not None and progress.head_bytes == 0:
                    raise _StaleConnection
                # A reply without Content-Length or chunking ends when the router closes.
                if progress.headers_done and progress.content_length is None and not progress.chunked:
                    progress.phase = DONE
                    break
                raise RouterHttpError(f"router closed the connection for {url} before the reply was complete")
            progress.feed(parser, data)
            if loop.time() >= end:
                raise TimeoutError  # the socket never ran dry, so the timer never got its turn
        keep = connections is not None and progress.complete and parser.should_keep_alive()
    finally:
        if keep and connections is not None:
            connections.give(address, sock, loop.time())
        else:
            sock.close()
    status = parser.get_status_code()
    if 300 <= status < 400:
        raise RouterHttpError(f"router redirected {url} elsewhere; redirects are refused")
    return HttpReply(status, bytes(progress.body))
