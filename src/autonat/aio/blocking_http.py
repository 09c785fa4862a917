"""HTTP/1.1 to the router without an event loop: the guarantees of aio/http.py on a blocking socket.

The bytes are read by the same sans-IO code as the asyncio shell's (`autonat.proto.httpwire`: httptools
under caps on head size, header count and body that hold on partial input); this shell only moves them.
One deadline covers connect, send and every read: each blocking call gets the time that is left as its
socket timeout (and connect at most `CONNECT_TIMEOUT` of it), and the clock is checked after every read,
so a router that drips a byte at a time ends at the deadline, not a timeout per read later. A refused
connection or a reset is a one-line error at once; silence is RouterTimeout at the deadline, saying where
the exchange stalled. No redirects, no proxies (nothing is read from the environment).

Importing this loads neither asyncio nor logging: a blocking UPnP client (aio/blocking_upnp.py) costs the
interpreter little more than httptools. The wire trace (aio/trace.py) is looked up, never imported, as in
aio/blocking.py. Requests that do not change (GetExternalIPAddress) can be `prepare`d once and sent
many times.
"""

from __future__ import annotations

import socket
import sys
import time
from typing import NamedTuple

import httptools

from autonat.proto.httpwire import (
    CONNECT_TIMEOUT,
    READ_SIZE,
    SENDING,
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

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

KEEP_IDLE = 5.0  # seconds an idle kept connection is trusted; routers time idle ones out (miniupnpd keeps none)
_TRACE_MODULE = "autonat.aio.trace"


class Connections:
    """Idle connections to the router kept for the next request, at most one per (host, port).

    HTTP/1.1 connections persist unless a side says `Connection: close` (RFC 9112 §9.3). miniupnpd
    closes after every reply (docs/QUIRKS.md H1), so against it nothing is ever kept; a router that
    keeps the connection open saves a TCP handshake per SOAP call. A kept connection is used again only
    if it is at most KEEP_IDLE seconds old and the router has not closed it meanwhile; a request that
    finds it closed after all (the router's close crossed our request) is sent once more on a new one.
    Shared by both HTTP shells (aio/http.py sets its sockets non-blocking, this one gives them timeouts).
    """

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], tuple[socket.socket, float]] = {}

    def take(self, address: tuple[str, int], now: float) -> socket.socket | None:
        if not self._idle:
            return None  # the common case (miniupnpd keeps nothing): no work
        entry = self._idle.pop(address, None)
        if entry is None:
            return None
        sock, since = entry
        if now - since <= KEEP_IDLE:
            # A socket with a timeout would wait for readability first, whatever MSG_DONTWAIT says.
            timeout = sock.gettimeout()
            sock.setblocking(False)
            try:
                sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                sock.settimeout(timeout)
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


class Prepared(NamedTuple):
    """A request serialized once: where it goes and its bytes (and, for the wire trace, its parts)."""

    method: str
    url: str
    address: tuple[str, int]
    payload: bytes
    headers: dict[str, str]
    content: bytes


def prepare(
    method: str, url: str, headers: dict[str, str] | None = None, content: bytes = b"", *, keep: bool = True
) -> Prepared:
    """Serialize a request for `send`; RouterHttpError for a URL that is not http to an address.
    `keep`: leave out `Connection: close`, so a router that keeps connections can (see `Connections`)."""
    host, port, target, netloc = split_url(url)
    given = headers or {}
    return Prepared(method, url, (host, port), serialize(method, target, netloc, given, content, keep), given, content)


def _wiretrace() -> Any:
    module = sys.modules.get(_TRACE_MODULE)
    return module if module is not None and module.ON else None


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
) -> HttpReply:
    """One request, within `deadline` seconds in all; errors are one line (as aio/http.py `request`)."""
    prepared = prepare(method, url, headers, content, keep=connections is not None)
    return send(prepared, max_body=max_body, deadline=deadline, trace=trace, connections=connections)


def send(
    prepared: Prepared,
    *,
    max_body: int,
    deadline: float,
    trace: list[Progress] | None = None,
    connections: Connections | None = None,
) -> HttpReply:
    """Send `prepared` and read the reply, within `deadline` seconds over connect, send and every read.

    RouterHttpError (a RouterRefused) for a refused or reset connection, a redirect, a malformed or
    oversized reply; RouterTimeout at the deadline, saying where it stalled. `trace`, if given, gets the
    exchange's `Progress`. With `connections`, a connection the router keeps open is used again."""
    wiretrace = _wiretrace()
    if wiretrace is None:
        return _request(prepared, max_body, deadline, trace, connections)
    token = wiretrace.http_sent(
        prepared.method, prepared.url, prepared.headers, prepared.content, peer_of(prepared.url)
    )
    try:
        reply = _request(prepared, max_body, deadline, trace, connections)
    except BaseException as exc:
        wiretrace.http_failed(token, exc)
        raise
    wiretrace.http_received(token, reply.status, reply.body)
    return reply


def _request(
    prepared: Prepared,
    max_body: int,
    deadline: float,
    trace: list[Progress] | None,
    connections: Connections | None,
) -> HttpReply:
    url = prepared.url
    progress = Progress(url, max_body)
    if trace is not None:
        trace.append(progress)
    end = time.monotonic() + deadline
    try:
        kept = None if connections is None else connections.take(prepared.address, end - deadline)
        if kept is not None:
            try:
                return _exchange(prepared, progress, end, kept, connections)
            except StaleConnection:
                progress = Progress(url, max_body)
                if trace is not None:
                    trace[-1] = progress
        return _exchange(prepared, progress, end, None, connections)
    except (OSError, ConnectTimeout, RouterHttpError) as exc:  # TimeoutError is an OSError
        raise failure(exc, progress, url, deadline) from None


def _exchange(
    prepared: Prepared,
    progress: Progress,
    end: float,
    kept: socket.socket | None,
    connections: Connections | None,
) -> HttpReply:
    clock = time.monotonic
    address = prepared.address
    if kept is None:
        sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET, socket.SOCK_STREAM)
    else:
        sock = kept
    keep = False
    try:
        if kept is None:
            left = end - clock()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(min(left, CONNECT_TIMEOUT))
            try:
                sock.connect(address)
            except TimeoutError:
                if clock() >= end:
                    raise
                raise ConnectTimeout from None
        progress.phase = SENDING
        left = end - clock()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        try:
            sock.sendall(prepared.payload)  # the timeout bounds the whole sendall (Python 3.5+)
        except (BrokenPipeError, ConnectionResetError):
            if kept is not None:
                raise StaleConnection from None
            raise
        progress.phase = WAITING
        parser = httptools.HttpResponseParser(progress)
        feed = progress.feed
        recv = sock.recv
        while not progress.complete:
            try:
                data = recv(READ_SIZE)
            except ConnectionResetError:
                if kept is not None and progress.head_bytes == 0:
                    raise StaleConnection from None
                raise
            if not data:
                if kept is not None and progress.head_bytes == 0:
                    raise StaleConnection
                progress.closed()  # a reply that ends at EOF, or one cut short
                break
            feed(parser, data)
            if progress.complete:
                break
            # Every read gets only the time left: a drip ends at the deadline, not a timeout per byte later.
            left = end - clock()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
        keep = connections is not None and progress.keep_alive
    finally:
        if keep and connections is not None:
            connections.give(address, sock, clock())
        else:
            sock.close()
    return reply_of(parser, progress)
