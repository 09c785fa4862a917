"""HTTP/1.1 replies from the router, sans-IO: httptools fed under hard caps, and the request bytes.

Both HTTP shells use this, the asyncio one (aio/http.py) and the blocking one (aio/blocking_http.py);
neither decides anything about the bytes itself. No sockets, no clock: the shells own the deadline.

httptools (the llhttp parser from Node.js, as used by uvicorn) parses the router's reply (RFC 9112):
framing, chunked bodies, malformed input. What is added here is what a router must never be able to do
to us: make us read an unbounded head or body. The caps hold on partial input, as bytes arrive,
because llhttp reports a header only once it is complete and httptools meanwhile accumulates the
partial value itself (by concatenation: quadratic). A header line that never ends was therefore never
capped: measured on a LAN host answering SSDP with a 100 MB header line, `probe --timeout 2` ran 46.7 s
and grew to 231 MB. So:

- the head (status line, headers, blank line) may take at most `MAX_HEADER_SIZE` bytes of the wire,
  counted as they are fed: the parser never sees more than that before the headers are complete;
- at most `MAX_HEADERS` header lines (trailers included);
- the body is capped by the caller's `max_body` in decoded bytes, and on the wire (chunk framing and
  trailers included) at twice that beyond the read that ended the head, so a reply of one-byte
  chunks or an endless chunk extension cannot stream forever under the body cap.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple
from urllib.parse import urlsplit

import httptools

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


class HttpTimeout(RouterTimeout):
    """The exchange's deadline came first; `stalled` says where it stood (`Progress.stalled`)."""

    def __init__(self, url: str, deadline: float, stalled: str) -> None:
        super().__init__(f"router did not answer {url} within {deadline:g} s ({stalled})")
        self.url, self.stalled = url, stalled


class ConnectTimeout(Exception):
    """The connect alone took CONNECT_TIMEOUT (the exchange's deadline may still be far)."""


class StaleConnection(Exception):
    """A kept connection turned out closed before any byte of the reply: send again on a new one."""


def failure(exc: Exception, progress: Progress, url: str, deadline: float) -> RouterTimeout | RouterRefused:
    """The one-line error an exchange ends in when it raised `exc` (both HTTP shells); `progress` is
    marked failed, after a timeout has said where it stalled."""
    if isinstance(exc, TimeoutError):
        stalled = progress.stalled()
        progress.phase = FAILED
        return HttpTimeout(url, deadline, stalled)
    progress.phase = FAILED
    if isinstance(exc, RouterHttpError):
        return exc
    if isinstance(exc, ConnectTimeout):
        return RouterHttpError(f"router did not accept a connection for {url} within {CONNECT_TIMEOUT:g} s")
    if isinstance(exc, ConnectionRefusedError):
        return RouterHttpError(f"UPnP: the router refused the connection to {url} (nothing listens there)")
    if isinstance(exc, OSError):
        return RouterHttpError(f"HTTP to {url} failed: {exc.strerror or exc}")
    raise exc


class HttpReply(NamedTuple):
    """A reply's status and body (a tuple: the cheapest immutable value to make on every call)."""

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
    keep_alive: bool = False  # the router keeps the connection open after this reply (RFC 9112 §9.3)
    body: bytearray = field(default_factory=bytearray)
    parser: httptools.HttpResponseParser | None = None  # the one being fed, while it is

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
        # Asked now: once feed_data returns, llhttp has reset for the next message and says False.
        self.keep_alive = self.parser is not None and bool(self.parser.should_keep_alive())

    # --- feeding ----------------------------------------------------------------------------------

    def feed(self, parser: httptools.HttpResponseParser, data: bytes | memoryview) -> None:
        """Feed one read, counting it against the head cap until the head is complete and against
        the body's wire cap after; the parser never holds more than the caps allow."""
        self.parser = parser
        if not self.headers_done:
            self.phase = HEAD
            room = MAX_HEADER_SIZE - self.head_bytes
            if len(data) <= room:
                self.head_bytes += len(data)
                feed_parser(parser, data, self.url)
                if not self.headers_done and self.head_bytes >= MAX_HEADER_SIZE:
                    raise RouterHttpError(f"router's reply headers from {self.url} exceed {MAX_HEADER_SIZE} bytes")
                return
            # More than the head may still take: feed only that much; the rest only if the head ended in it.
            view = memoryview(data)
            self.head_bytes = MAX_HEADER_SIZE
            feed_parser(parser, view[:room], self.url)
            if not self.headers_done:
                raise RouterHttpError(f"router's reply headers from {self.url} exceed {MAX_HEADER_SIZE} bytes")
            data = view[room:]
        self.body_wire_bytes += len(data)
        if self.body_wire_bytes > self.max_body * BODY_WIRE_FACTOR:
            raise RouterHttpError(
                f"router's reply from {self.url} exceeds {self.max_body * BODY_WIRE_FACTOR} bytes on the wire"
                " (chunk framing and trailers included)"
            )
        feed_parser(parser, data, self.url)

    def closed(self) -> None:
        """The router closed the connection (EOF) before the parser saw the message end: a reply with
        neither Content-Length nor chunking ends so (RFC 9112 §6.3, item 8); anything else is cut short."""
        if self.headers_done and self.content_length is None and not self.chunked:
            self.phase = DONE
            return
        raise RouterHttpError(f"router closed the connection for {self.url} before the reply was complete")

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


def feed_parser(parser: httptools.HttpResponseParser, data: bytes | memoryview, url: str) -> None:
    """`parser.feed_data`, every failure turned into one RouterHttpError line."""
    try:
        parser.feed_data(data)
    except httptools.HttpParserCallbackError as exc:
        cause = exc.__context__
        raise cause if isinstance(cause, RouterHttpError) else RouterHttpError(str(exc)) from None
    except httptools.HttpParserUpgrade:
        raise RouterHttpError(f"router tried to upgrade the connection for {url}") from None
    except httptools.HttpParserError as exc:
        raise RouterHttpError(f"router sent malformed HTTP for {url}: {exc}") from None


def reply_of(parser: httptools.HttpResponseParser, progress: Progress) -> HttpReply:
    """The finished exchange's reply; a redirect (RFC 9110 §15.4) is refused: router traffic goes to the
    router, never where a reply points."""
    status: int = parser.get_status_code()
    if 300 <= status < 400:
        raise RouterHttpError(f"router redirected {progress.url} elsewhere; redirects are refused")
    return HttpReply(status, bytes(progress.body))


def serialize(method: str, target: str, host: str, headers: dict[str, str], content: bytes, keep: bool) -> bytes:
    """The request's bytes (RFC 9112 §3): `Connection: close` unless the connection is to be kept. The head
    is built once per method, target, host and headers; only Content-Length changes from one to the next."""
    before, after = _head(method, target, host, tuple(headers.items()), keep)
    return before + str(len(content)).encode() + after + content


@lru_cache(maxsize=64)
def _head(method: str, target: str, host: str, headers: tuple[tuple[str, str], ...], keep: bool) -> tuple[bytes, bytes]:
    """The head's bytes before and after the Content-Length value."""
    fixed = [f"{method} {target} HTTP/1.1", f"Host: {host}", f"User-Agent: {USER_AGENT}"]
    if not keep:
        fixed.append("Connection: close")
    given = [f"{name}: {value}" for name, value in headers]
    if _NOT_ONE_LINE.search("".join(fixed + given)):
        raise ValueError("HTTP header text must be single lines")  # a caller bug, never router input
    before = "".join(f"{line}\r\n" for line in fixed) + "Content-Length: "
    after = "".join(f"\r\n{line}" for line in given) + "\r\n\r\n"
    return before.encode("latin-1"), after.encode("latin-1")


_NOT_ONE_LINE = re.compile("[\r\n\0]")


@lru_cache(maxsize=64)
def split_url(url: str) -> tuple[str, int, str, str]:
    """(host, port, target, netloc) of an http URL to the router, else RouterHttpError. Cached: a client
    asks the same control URL again and again (a refused URL raises, and is not cached)."""
    try:
        parts = urlsplit(url)
        port = parts.port or 80
    except ValueError:
        raise RouterHttpError(f"refusing to fetch {url}: not a valid URL") from None
    if parts.scheme != "http" or parts.hostname is None:
        raise RouterHttpError(f"refusing to fetch {url}: only http URLs to the router")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, port, target, parts.netloc


def peer_of(url: str) -> tuple[str, int]:
    """(host, port) the wire trace names for `url`, whatever state the URL is in."""
    try:
        parts = urlsplit(url)
        return parts.hostname or url, parts.port or 80
    except ValueError:  # a malformed URL: the request itself says so
        return url, 0
