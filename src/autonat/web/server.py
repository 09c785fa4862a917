"""The web listener: the status page, `/api/status`, `/api/events` (server-sent events) and `/metrics`.

Routes (GET and HEAD only; nothing here changes the daemon's state):
    /                 the page (src/autonat/web/static/: plain HTML, CSS and JS, no build step)
    /static/NAME      its files, from a fixed list loaded at start
    /api/status       JSON: the engine's status, the router's probe, profiles, calls, registrations, the
                      last doctor report (autonat.web.status; docs/WEB.md)
    /api/events       the engine's event bus as server-sent events: the last RECENT_EVENTS first, then
                      an `event: live` marker, then each event as it is published
    /metrics          Prometheus text (OpenMetrics when asked for), series `autonat_*` (autonat.web.metrics)

Token. With `[web] token` set, every request carries it: `Authorization: Bearer TOKEN` (scrapers,
scripts), or the cookie a browser gets by opening `/?token=TOKEN` once (HttpOnly, SameSite=Strict; the
answer is a redirect to `/`, so the token leaves the address bar). It is compared in constant time. A
listener that is not loopback must have one (daemon/config.py). Without a token, the Host header must
be an IP address or `localhost`: a web page elsewhere cannot reach a loopback listener through a DNS
name rebound to 127.0.0.1 (DNS rebinding) and read the status.

Caps. This listener may face a LAN, and each refusal is one line and one count (`autonat_caps_hit_total`):
  - at most `max_connections` connections; when full, a newcomer evicts the connection idle longest
    (one that is waiting for a request, never an event stream), else it is refused with 503 at once;
  - at most `max_streams` event streams (MAX_STREAMS, and never more than the connection cap): 503;
  - the request head is capped in bytes, header lines and target length as it arrives (autonat.web.http);
  - a connection with no complete request `idle_timeout` s after it opened (or after its last response)
    is closed: a peer dripping a request one byte at a time gets no longer than one that sends nothing;
  - a client that does not read its responses stops being read (back-pressure: one response buffered);
  - an event stream buffers at most STREAM_BACKLOG events while its client does not read; one more and
    the client is dropped (it reconnects and the ring replays what it missed), never buffered without
    end; a stream lives at most MAX_STREAM_SECONDS (`?seconds=N` asks for less) and then ends, the
    browser's EventSource reconnecting with Last-Event-ID.
Refusals are logged as one summary line at most every SUMMARY_INTERVAL s.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Final, cast

from autonat.engine.events import Event
from autonat.errors import AutonatError
from autonat.web.http import (
    METHODS,
    HttpError,
    Request,
    RequestReader,
    error_response,
    response,
    sse_event,
    stream_head,
)
from autonat.web.metrics import WEB_AUTH, Metrics
from autonat.web.settings import WebConfig
from autonat.web.status import Sources, gather

log = logging.getLogger("autonat.web")

MAX_STREAMS: Final = 8  # open pages (each holds one stream): a household's phones and laptops
STREAM_BACKLOG: Final = 64  # events held for a stream whose client is not reading, beyond the socket buffer
RECENT_EVENTS: Final = 100  # replayed to a new stream: the page opens with the last events shown
MAX_STREAM_SECONDS: Final = 3600
KEEPALIVE: Final = 15.0  # a comment line this often: idle proxies and NATs keep the stream, dead peers show
RETRY_MS: Final = 2000  # how long an EventSource waits before reconnecting
SUMMARY_INTERVAL: Final = 60.0
COOKIE: Final = "autonat_token"
STATIC_FILES: Final = {
    "index.html": "text/html; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "icon.svg": "image/svg+xml",
}


class WebError(AutonatError):
    """The listener cannot start (its address is taken, or not ours to bind)."""

    exit_code = 8


@dataclass(frozen=True, slots=True)
class _Static:
    body: bytes
    content_type: str
    etag: str


def load_static() -> dict[str, _Static]:
    """The page's files, read once from the package (src/autonat/web/static/)."""
    folder = resources.files("autonat.web").joinpath("static")
    files = {}
    for name, content_type in STATIC_FILES.items():
        body = folder.joinpath(name).read_bytes()
        files[name] = _Static(body, content_type, '"' + hashlib.sha256(body).hexdigest()[:20] + '"')
    return files


class _Connection(asyncio.Protocol):
    """One HTTP connection: frames requests, keeps its timer and back-pressure; `WebServer` decides."""

    def __init__(self, server: WebServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.reader = RequestReader(server.config.max_request_size)
        self.streaming = False
        self.closed = False
        self.paused = False
        self.backlog: collections.deque[bytes] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._stream_end: asyncio.TimerHandle | None = None

    # asyncio.Protocol ------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._guarded(self.server._admit, self)

    def data_received(self, data: bytes) -> None:
        if self.closed or self.streaming:
            return  # a stream is one-way: what its client sends is dropped unread
        self._guarded(self._received, data)

    def eof_received(self) -> bool:
        self.close(flush=True)  # what was answered still goes out (`printf 'GET / ...' | nc -N` half-closes)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def pause_writing(self) -> None:
        self.paused = True
        if not self.streaming and self.transport is not None:
            self.transport.pause_reading()  # no new request until the client reads what it asked for

    def resume_writing(self) -> None:
        self.paused = False
        transport = self.transport
        if transport is None or self.closed:
            return
        while self.backlog and not self.paused:
            transport.write(self.backlog.popleft())
        if not self.streaming:
            transport.resume_reading()

    # framing ---------------------------------------------------------------------------------------
    def _received(self, data: bytes) -> None:
        try:
            requests = self.reader.feed(data)
        except HttpError as error:
            self.server._refused(_cap_of(error.status))
            self.send(error_response(error))
            self.close(flush=True)
            return
        for request in requests:
            if self.closed or self.streaming:
                return
            self.server._handle(self, request)

    def _guarded(self, function: Callable[..., object], *args: object) -> None:
        try:
            function(*args)
        except Exception as exc:
            # A bug of ours, not the client's: one log line, one error line, no traceback.
            log.error("web: connection failed: %s: %s", type(exc).__name__, exc)
            self.send(error_response(HttpError(500, "internal error; see the daemon log")))
            self.close(flush=True)

    # state -----------------------------------------------------------------------------------------
    def arm(self, timeout: float) -> None:
        """Wait for a complete request: `timeout` s from now, whatever arrives meanwhile."""
        self.disarm()
        self._timer = self.loop.call_later(timeout, self._timed_out)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if not self.reader.idle:
            self.server._refused("web-idle-timeout")
            self.send(error_response(HttpError(408, "no complete request in time")))
        self.close(flush=True)

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def offer(self, frame: bytes) -> None:
        """A stream's next frame: written, or held while the client is behind; past the backlog, dropped."""
        if self.closed:
            return
        if not self.paused:
            self.send(frame)
            return
        self.backlog.append(frame)
        if len(self.backlog) > STREAM_BACKLOG:
            self.server._refused("web-slow-client")
            self.close(abort=True)

    def end_stream_after(self, seconds: float) -> None:
        self._stream_end = self.loop.call_later(seconds, self.close, True)

    def close(self, flush: bool = False, *, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.disarm()
        if self._stream_end is not None:
            self._stream_end.cancel()
        self.backlog.clear()
        self.server._release(self)
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if abort:
            transport.abort()
            return
        transport.close()  # sends what is buffered, then closes
        if flush and transport.get_write_buffer_size():
            # A peer that never reads does not keep the descriptor: what it has not taken by then is dropped.
            self.loop.call_later(self.server.config.idle_timeout, transport.abort)


def _cap_of(status: int) -> str:
    return "web-request-size" if status in (413, 414, 431) else "web-bad-requests"


class WebServer:
    """The listener of `[web]`; reads `sources`, changes nothing. `start()` binds, `stop()` ends it all."""

    def __init__(self, config: WebConfig, sources: Sources) -> None:
        self.config = config
        self.sources = sources
        self.static = load_static()
        self.counters: collections.Counter[str] = collections.Counter()  # caps hit and token failures
        self.metrics = Metrics(sources, self.counters, lambda: len(self._streams))
        self.max_streams = min(MAX_STREAMS, config.max_connections)
        self._token = None if config.token is None else config.token.encode()
        self._server: asyncio.Server | None = None
        self._connections: dict[_Connection, None] = {}  # waiting for a request, idle longest first
        self._streams: set[_Connection] = set()
        self._recent: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=RECENT_EVENTS)
        self._sequence = 0
        self._boot = secrets.token_hex(4)  # event ids of an earlier run never match this one's
        self._follower: asyncio.Task[None] | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self._pending: collections.Counter[str] = collections.Counter()
        self._logged_at: float | None = None
        self._stopping = False

    @property
    def connections(self) -> int:
        """Open connections, event streams included."""
        return len(self._connections) + len(self._streams)

    @property
    def streams(self) -> int:
        return len(self._streams)

    @property
    def address(self) -> tuple[str, int] | None:
        """The bound (IP, port): a test may listen on port 0."""
        if self._server is None or not self._server.sockets:
            return None
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def start(self) -> None:
        assert self.config.listen is not None
        host, port = self.config.listen
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(lambda: _Connection(self), host, port, backlog=100)
        except OSError as exc:
            # asyncio words a bind error itself ("error while attempting to bind on address ..."): the errno's text.
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise WebError(f"cannot listen on {host}:{port} for the status page ([web] listen): {reason}") from None
        self._follower = loop.create_task(self._follow(self.sources.engine.events.subscribe()))
        self._keepalive = loop.call_later(KEEPALIVE, self._ping)
        address = self.address or (host, port)
        shown = f"[{address[0]}]" if ":" in address[0] else address[0]
        log.info(
            "status page on http://%s:%d/ (%s)",
            shown,
            address[1],
            "token required" if self._token is not None else "no token: loopback only",
        )

    async def stop(self) -> None:
        self._stopping = True
        if self._keepalive is not None:
            self._keepalive.cancel()
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
        if self._server is not None:
            self._server.close()
        for connection in [*self._connections, *self._streams]:
            connection.close(flush=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self._server.wait_closed()
            self._server = None
        self._flush_summary()

    # --- connections ---------------------------------------------------------------------------------

    def _admit(self, connection: _Connection) -> None:
        if self._stopping:
            connection.close()
            return
        if len(self._connections) + len(self._streams) >= self.config.max_connections:
            victim = next(iter(self._connections), None)
            if victim is None:
                self._refused("web-connections")
                connection.send(error_response(HttpError(503, "too many connections to the status page")))
                connection.close(flush=True)
                return
            self._refused("web-evictions")
            victim.close()
        self._connections[connection] = None
        connection.arm(self.config.idle_timeout)

    def _release(self, connection: _Connection) -> None:
        self._connections.pop(connection, None)
        self._streams.discard(connection)

    def _refused(self, what: str) -> None:
        """Count a refusal; one summary log line at most every SUMMARY_INTERVAL s (the first at once)."""
        self.counters[what] += 1
        self._pending[what] += 1
        now = time.monotonic()
        if self._logged_at is None or now - self._logged_at >= SUMMARY_INTERVAL:
            self._flush_summary(now)

    def _flush_summary(self, now: float | None = None) -> None:
        if self._pending:
            summary = ", ".join(f"{n} {what}" for what, n in sorted(self._pending.items()))
            log.warning("status page refused: %s", summary)
            self._pending.clear()
            self._logged_at = time.monotonic() if now is None else now

    # --- requests ------------------------------------------------------------------------------------

    def _handle(self, connection: _Connection, request: Request) -> None:
        head_only = request.method == "HEAD"
        try:
            data = self._route(connection, request)
        except HttpError as error:
            if error.status == 401:
                self._refused(WEB_AUTH)
            elif error.status in (400, 403, 405):
                self._refused("web-bad-requests")
            # 404 is no refusal; a 503 was counted under its cap where it was decided.
            extra = (("WWW-Authenticate", 'Bearer realm="autonat"'),) if error.status == 401 else ()
            if error.status == 405:
                extra = (("Allow", "GET, HEAD"),)
            connection.send(error_response(error, head_only=head_only, headers=extra))
            connection.close(flush=True)
            return
        if data is None:
            return  # the connection became an event stream
        connection.send(data)
        if not request.keep_alive:
            connection.close(flush=True)
            return
        self._connections.pop(connection, None)
        self._connections[connection] = None  # the back of the eviction order: it just did something
        connection.arm(self.config.idle_timeout)

    def _route(self, connection: _Connection, request: Request) -> bytes | None:
        if request.method not in METHODS:
            raise HttpError(405, f"method {request.method[:16]} is not served here: GET or HEAD")
        head_only = request.method == "HEAD"
        path = request.path
        if path == "/" and "token" in request.query:
            return self._login(request)
        self._authorize(request)
        if path == "/":
            return self._file("index.html", request)
        if path.startswith("/static/") and path[len("/static/") :] in self.static:
            return self._file(path[len("/static/") :], request)
        if path == "/api/status":
            status = gather(
                self.sources,
                time.time(),
                event_streams=len(self._streams),
                token_required=self._token is not None,
            )
            body = json.dumps(status, default=str).encode()
            return response(200, body, content_type="application/json", headers=_NO_STORE, head_only=head_only)
        if path == "/metrics":
            body, content_type = self.metrics.render(request.header("accept"))
            return response(200, body, content_type=content_type, headers=_NO_STORE, head_only=head_only)
        if path == "/api/events":
            if head_only:
                return response(200, b"", content_type=_EVENT_STREAM, headers=_NO_STORE, head_only=True)
            self._open_stream(connection, request)
            return None
        raise HttpError(404, f"nothing at {_shown(path)}")

    def _authorize(self, request: Request) -> None:
        if self._token is None:
            if not _local_host(request.header("host")):
                raise HttpError(403, "Host must be an IP address or localhost (DNS rebinding guard)")
            return
        presented = _bearer(request.header("authorization")) or _cookie(request.header("cookie"), COOKIE)
        if presented is None or not hmac.compare_digest(presented.encode(), self._token):
            raise HttpError(401, "the token is needed: open /?token=TOKEN once, or send Authorization: Bearer TOKEN")

    def _login(self, request: Request) -> bytes:
        """`/?token=TOKEN`: right, a cookie and a redirect to `/` (the token leaves the address bar)."""
        if self._token is None or not hmac.compare_digest(request.query["token"].encode(), self._token):
            raise HttpError(401, "wrong token" if self._token is not None else "this listener has no token")
        cookie = f"{COOKIE}={request.query['token']}; Path=/; HttpOnly; SameSite=Strict"
        return response(
            303,
            b"",
            headers=(("Location", "/"), ("Set-Cookie", cookie), *_NO_STORE),
            head_only=request.method == "HEAD",
        )

    def _file(self, name: str, request: Request) -> bytes:
        static = self.static[name]
        headers = (("ETag", static.etag), ("Cache-Control", "no-cache"))
        if request.header("if-none-match") == static.etag:
            return response(304, b"", content_type=static.content_type, headers=headers, head_only=True)
        return response(
            200, static.body, content_type=static.content_type, headers=headers, head_only=request.method == "HEAD"
        )

    # --- event streams -------------------------------------------------------------------------------

    def _open_stream(self, connection: _Connection, request: Request) -> None:
        if len(self._streams) >= self.max_streams:
            self._refused("web-event-streams")
            raise HttpError(503, f"too many event streams ({self.max_streams})")
        seconds = _seconds(request.query.get("seconds"))
        self._connections.pop(connection, None)
        self._streams.add(connection)
        connection.streaming = True
        connection.disarm()
        assert connection.transport is not None
        connection.transport.resume_reading()  # only to see the client go: its input is dropped
        connection.send(stream_head() + f"retry: {RETRY_MS}\n\n".encode())
        after = self._replay_from(request.header("last-event-id"))
        for sequence, frame in self._recent:
            if sequence > after:
                connection.offer(frame)
        connection.offer(sse_event("{}", event="live"))
        connection.end_stream_after(seconds)

    def _replay_from(self, last_id: str) -> int:
        """The sequence number after which a reconnecting stream resumes (0: replay everything kept)."""
        boot, _, number = last_id.partition(".")
        if boot == self._boot and number.isdigit() and len(number) < 12:
            return int(number)
        return 0

    async def _follow(self, events: AsyncGenerator[Event, None]) -> None:
        """The one subscription to the bus: every event is counted, kept in the ring, and fanned out."""
        try:
            async for event in events:
                try:
                    self.metrics.observe(event)
                except Exception as exc:  # a metric must never stop the stream
                    log.error("web: counting event %s failed: %s: %s", event.kind, type(exc).__name__, exc)
                self._sequence += 1
                frame = sse_event(json.dumps(event.to_dict(), default=str), event_id=f"{self._boot}.{self._sequence}")
                self._recent.append((self._sequence, frame))
                for connection in list(self._streams):
                    connection.offer(frame)
        finally:
            await events.aclose()

    def _ping(self) -> None:
        for connection in list(self._streams):
            connection.offer(b": keep-alive\n\n")
        self._keepalive = asyncio.get_running_loop().call_later(KEEPALIVE, self._ping)


_NO_STORE: Final = (("Cache-Control", "no-store"),)
_EVENT_STREAM: Final = "text/event-stream; charset=utf-8"


def _seconds(text: str | None) -> float:
    if text is None or not text.isdigit() or len(text) > 6:
        return float(MAX_STREAM_SECONDS)
    return float(min(max(int(text), 1), MAX_STREAM_SECONDS))


def _shown(path: str) -> str:
    cut = path[:80]
    return "".join(c if c.isprintable() else "?" for c in cut) + ("..." if len(path) > 80 else "")


def _local_host(host: str) -> bool:
    """Is a Host header an IP literal or localhost (with or without a port)? Empty: an HTTP/1.0 client."""
    if not host:
        return True
    name = host[1:].partition("]")[0] if host.startswith("[") else host.partition(":")[0].lower()
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _bearer(header: str) -> str | None:
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None
