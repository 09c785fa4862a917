"""HTTP/1.1 requests in, bytes out: the web listener's parsing and framing, with caps and no I/O.

httptools (llhttp, the parser of Node.js and uvicorn) does the framing: request line, headers,
Content-Length and chunked bodies, malformed input. This module adds what a peer on the LAN must never
be able to do: make us buffer an unbounded head (httptools accumulates a header line that has not
ended yet itself, so the cap is counted on the wire, before the parser sees the bytes), send more
header lines than any browser, or hand us a body. Every refusal is an `HttpError`: a status and one line.

Caps (RFC 9110 §15.5 statuses):
  - the head of a request (request line, headers, blank line) is at most `max_size` bytes on the wire
    (default 8 KiB, nginx's `large_client_header_buffers` and Apache's `LimitRequestFieldSize`),
    counted as bytes arrive: 431. Pipelined requests are allowed; when one read holds the end of one
    request and the start of the next, the whole read is counted against the next (an over-count,
    never an under-count: httptools does not say where one request ended);
  - at most `MAX_HEADERS` header lines (Apache's `LimitRequestFields` is 100; a browser sends ~15): 431;
  - a request target of at most `MAX_TARGET` bytes: 414;
  - no request body: every route is GET or HEAD, so a Content-Length above 0 or chunked body is 413;
  - no protocol upgrade (WebSocket, h2c): 400.
Simplification, declared: targets are matched as sent (no percent-decoding of the path), so
`/static/app%2Ejs` is simply not found; the routes are plain ASCII.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Final
from urllib.parse import parse_qsl

import httptools

MAX_HEADERS: Final = 100
MAX_TARGET: Final = 2048  # the page's longest URL is under 40 bytes
MAX_QUERY_FIELDS: Final = 16
DEFAULT_MAX_SIZE: Final = 8192
METHODS: Final = frozenset({"GET", "HEAD"})


class HttpError(Exception):
    """A request refused: `status` and a one-line `message` for the error body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names; a repeated header's values joined (`; ` for Cookie)
    keep_alive: bool

    def header(self, name: str) -> str:
        return self.headers.get(name, "")


@dataclass(slots=True)
class _Message:
    target: bytearray = field(default_factory=bytearray)
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    method: str = ""
    keep_alive: bool = False


class RequestReader:
    """Bytes of one connection in, complete requests out (`feed`); raises HttpError on the first mistake.

    After an HttpError the reader is spent: the connection answers the error and closes.
    """

    def __init__(self, max_size: int = DEFAULT_MAX_SIZE) -> None:
        self.max_size = max_size
        self._parser = httptools.HttpRequestParser(self)
        self._pending = 0  # wire bytes fed since the last request ended
        self._message: _Message | None = None
        self._done: list[Request] = []

    @property
    def idle(self) -> bool:
        """No request has started since the last one ended (nothing partial is buffered)."""
        return self._message is None and self._pending == 0

    def feed(self, data: bytes) -> list[Request]:
        view = memoryview(data)
        while view:
            room = self.max_size - self._pending
            piece, view = view[:room], view[room:]
            ended_before = len(self._done)
            self._pending += len(piece)
            self._feed(piece)
            if self._message is None:
                self._pending = 0
            elif len(self._done) != ended_before:
                self._pending = len(piece)  # a pipelined request began in this piece: count it all
            if self._message is not None and self._pending >= self.max_size:
                raise HttpError(431, f"request head larger than {self.max_size} bytes")
        done, self._done = self._done, []
        return done

    def _feed(self, data: memoryview) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            raise cause if isinstance(cause, HttpError) else HttpError(400, "malformed request") from None
        except httptools.HttpParserUpgrade:
            raise HttpError(400, "connection upgrades (WebSocket, h2c) are not served here") from None
        except httptools.HttpParserError as exc:
            reason = str(exc).strip().rstrip(".") or type(exc).__name__
            raise HttpError(400, f"malformed request: {_printable(reason)}") from None

    # --- httptools callbacks (an exception raised here stops feed_data) --------------------------

    def on_message_begin(self) -> None:
        self._message = _Message()

    def on_url(self, url: bytes) -> None:
        assert self._message is not None
        self._message.target += url
        if len(self._message.target) > MAX_TARGET:
            raise HttpError(414, f"request target longer than {MAX_TARGET} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._message is not None
        self._message.headers.append((name, value))
        if len(self._message.headers) > MAX_HEADERS:
            raise HttpError(431, f"more than {MAX_HEADERS} header lines")

    def on_headers_complete(self) -> None:
        message = self._message
        assert message is not None
        for name, value in message.headers:
            lowered = name.lower()
            if (lowered == b"content-length" and value.strip() not in (b"", b"0")) or (
                lowered == b"transfer-encoding" and value.strip()
            ):
                raise HttpError(413, "requests here carry no body")
        message.method = self._parser.get_method().decode("ascii", "replace")
        message.keep_alive = bool(self._parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        raise HttpError(413, "requests here carry no body")  # unreachable after on_headers_complete; kept as a guard

    def on_message_complete(self) -> None:
        message, self._message = self._message, None
        assert message is not None
        self._done.append(_request(message))


def _request(message: _Message) -> Request:
    try:
        target = message.target.decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(400, "request target is not ASCII") from None
    if not target.startswith("/"):
        raise HttpError(400, "request target must be a path (origin form, RFC 9112 §3.2.1)")
    path, _, query_text = target.partition("?")
    path = path.partition("#")[0]
    try:
        query = dict(parse_qsl(query_text, max_num_fields=MAX_QUERY_FIELDS))
    except ValueError:
        raise HttpError(400, f"more than {MAX_QUERY_FIELDS} query parameters") from None
    headers: dict[str, str] = {}
    for raw_name, raw_value in message.headers:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1").strip()
        if name in headers:
            headers[name] += ("; " if name == "cookie" else ", ") + value
        else:
            headers[name] = value
    return Request(message.method, target, path, query, headers, message.keep_alive)


def _printable(text: str, limit: int = 120) -> str:
    cut = text[:limit]
    return "".join(c if c.isprintable() else "?" for c in cut)


# --- responses ---------------------------------------------------------------------------------------

# Sent with every response: nothing is framed, sniffed, or leaked to another origin.
SECURITY_HEADERS: Final = (
    (
        "Content-Security-Policy",
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self';"
        " frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
)


def response(
    status: int,
    body: bytes = b"",
    *,
    content_type: str = "text/plain; charset=utf-8",
    headers: tuple[tuple[str, str], ...] = (),
    keep_alive: bool = True,
    head_only: bool = False,
) -> bytes:
    """A complete HTTP/1.1 response; `head_only` (HEAD) leaves the body out, Content-Length kept."""
    lines = [
        f"HTTP/1.1 {status} {_reason(status)}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        *(f"{name}: {value}" for name, value in (*SECURITY_HEADERS, *headers)),
    ]
    if not keep_alive:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


def stream_head(headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """The head of an event stream (HTML Living Standard §9.2): no length, it ends when the connection does."""
    lines = [
        "HTTP/1.1 200 OK",
        "Content-Type: text/event-stream; charset=utf-8",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{name}: {value}" for name, value in (*SECURITY_HEADERS, *headers)),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def error_response(error: HttpError, *, head_only: bool = False, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """The one-line error body, and the connection closed after it (the reader may be spent)."""
    body = f"error: {error.message}\n".encode()
    return response(error.status, body, headers=headers, keep_alive=False, head_only=head_only)


def sse_event(data: str, *, event_id: str | None = None, event: str | None = None) -> bytes:
    """One server-sent event (HTML Living Standard §9.2.5). `data` must be one line: JSON from
    json.dumps is (it escapes every control character), and a stray line break is refused here."""
    if "\n" in data or "\r" in data:
        raise ValueError("an event's data must be one line")
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if event is not None:
        lines.append(f"event: {event}")
    lines.append(f"data: {data}")
    return ("\n".join(lines) + "\n\n").encode()


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"
