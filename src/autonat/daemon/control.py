"""The daemon's control channel: JSON lines over a Unix socket (owner-only), optionally TCP with a token.

Protocol. One request per line, one reply per line; a line is UTF-8 JSON ending in "\\n" (a "\\r" before
it is allowed):
    {"cmd": "status"}                                  -> {"ok": true, "result": {...}}
    {"cmd": "add", "port": 5060, "proto": "udp", "sticky": false, "external_port": 0}
    {"cmd": "del", "port": 5060, "proto": "udp"}
    ("family": 6 in add or del: an IPv6 firewall pinhole for our stable address, with [nat] ipv6 on)
    {"cmd": "republish"} | {"cmd": "reinit"} | {"cmd": "mapping", "enable": true}
    {"cmd": "profiles"} | {"cmd": "profile", "name": "external"} | {"cmd": "calls"} | {"cmd": "registrations"}
    {"cmd": "advertise", "name": "external", "destination": "203.0.113.5", "media": false}
    {"cmd": "reload"}                                  -> {"ok": true, "result": {"changes": [...], ...}}
    {"cmd": "call", "uri": "sip:9196@203.0.113.50:5060", "profile": "external", "seconds": 5}
                                                       -> {"ok": true, "result": {"verdict": "ok: ...", ...}}
    {"cmd": "doctor-report", "report": {...}}          -> {"ok": true, "result": {"stored": true}}
    {"cmd": "doctor-report"}                           -> {"ok": true, "result": the last report or null}
    {"cmd": "events"}                                  -> {"ok": true}, then one event per line
Every error is one line, {"ok": false, "error": "..."}. An error that starts with "closed:" is the last
line of the connection: the daemon closes it right after. Requests are answered in order, one at a time.

`call` is the test call (`autonat call`): the SIP service calls `uri` (sip:/sips: with an IP literal host, at
most 256 characters) from `profile` (optional: the first SIP profile) as a phone behind the NAT, plays a known
signal for `seconds` (optional, 1-60, default 5) once answered, hangs up and answers when the call is over and
its RTP mappings are released: at most the answer timeout (15 s) + `seconds` + 1 s + a BYE later. The result
is autonat.sip.probecall.report's object (the verdict line, packets each way, round-trip time, loss, RFC 3550
jitter, the media addresses and whether the echo came in through the router mapping our SDP advertised); a
call that fails is still a result ("ok": false). An error line instead when the daemon has no SIP profile,
the URI or seconds are malformed, or a test call is already running (one at a time: it uses router mappings).

`doctor-report` is how `autonat doctor` hands its summary (autonat.doctor.report.summary: status, external
address, reachability, findings, the text lines) to the running daemon, whose status page shows the last one;
the report must be a JSON object of at most MAX_DOCTOR_REPORT bytes re-encoded. Without "report" it answers
the last one held (null before any).

Authentication. The Unix socket is created 0600: its file mode is the authentication, it needs no token.
Over TCP (only when `control.tcp` is configured) the first line must be `AUTH <token>`; the daemon
answers {"ok": true} and the protocol above follows. Anything else as the first line is answered with
"closed: bad or missing token" and the connection is closed. The token is compared as raw bytes with
`hmac.compare_digest` before a single byte of the connection is decoded or parsed, and that first line
may be at most MAX_AUTH_LINE bytes, so a peer without the token costs one bounded buffer and one
constant-time comparison, never a JSON parse.

Limits. Requests are untrusted input; every limit holds on partial input (a line that has not ended yet
is refused as soon as it is too long) and every refusal is a one-line error, never a traceback:
  - a request line is at most MAX_REQUEST bytes, the TCP AUTH line at most MAX_AUTH_LINE;
  - it must be UTF-8, standard JSON (no NaN/Infinity), an object, nested at most MAX_DEPTH deep (counted
    on the raw bytes before parsing, so the parser never recurses deeper), and with integers of at most
    MAX_INT_DIGITS digits (refused while parsing, long before Python's 4300-digit conversion limit);
  - a connection that holds no complete request for REQUEST_TIMEOUT seconds (from connect or from its
    previous reply) is closed, and so is one that does not read its reply within that time.

Connections. The Unix socket and TCP each have their own capacity (MAX_UNIX_CLIENTS, MAX_TCP_CLIENTS), so
the network can never take a slot the owner needs. When a listener is full, a new connection evicts the
one idle longest: on the Unix socket any connection waiting for a request, over TCP only one that has not
authenticated yet (a peer without the token cannot push out one that proved it). If none can be evicted
(every slot is running a command, or is an authenticated TCP client), the newcomer is refused at accept:
one error line, closed at once. So an owner-side client (the CLI connects and writes its request in the
same instant) always gets through, even while a thousand idle connections are opened against the socket.
`events` streams live as long as their client and are counted apart (MAX_UNIX_STREAMS, MAX_TCP_STREAMS);
an events stream is one-way: what its client sends is dropped, and end of input from it ends the stream.
Held descriptors stay under MAX_UNIX_CLIENTS + MAX_TCP_CLIENTS + MAX_UNIX_STREAMS + MAX_TCP_STREAMS = 100
(plus connections being closed, each for at most CLOSE_GRACE s), far below the usual 1024 soft limit.
Refusals, evictions, time-outs and bad tokens are logged as one summary line at most every
SUMMARY_INTERVAL seconds, not one line per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hmac
import itertools
import json
import logging
import operator
import os
import re
import socket
import stat
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

from autonat.daemon.config import MAX_TEXT_LENGTH, ConfigError
from autonat.engine.engine import NatEngine, Wanted
from autonat.errors import AutonatError
from autonat.proto.types import Transport
from autonat.service.profiles import ProfileManager
from autonat.service.sip import SipService
from autonat.sip.probecall import DEFAULT_SECONDS

log = logging.getLogger("autonat.control")

# A request line with its newline. The longest real request is under 200 bytes; 64 KiB is what the
# channel always accepted, so no script that worked stops working.
MAX_REQUEST: Final = 64 * 1024
MAX_DOCTOR_REPORT: Final = 32 * 1024  # doctor's summary is ~2-4 KiB; the page shows it whole
# `AUTH ` + the longest token the config accepts (MAX_TEXT_LENGTH characters, up to 4 UTF-8 bytes each)
# + CRLF. All an unauthenticated TCP peer can make the daemon buffer.
MAX_AUTH_LINE: Final = len(b"AUTH ") + 4 * MAX_TEXT_LENGTH + 2
# Requests are flat objects (depth 1). 32 leaves room for any nested argument a command may ever take
# and keeps the json module's recursion (the C scanner recurses per level) far from the interpreter's.
MAX_DEPTH: Final = 32
# Every integer of the protocol is a port (5 digits); 20 digits hold any 64-bit value. Python's own
# int-str limit (4300 digits) is a guard against quadratic conversion, not a sane protocol value.
MAX_INT_DIGITS: Final = 20
# From connect (or the previous reply) to a complete request line, and for a reply to be read. The CLI
# writes its request in the same instant it connects; 10 s is ample even for a person typing into socat.
REQUEST_TIMEOUT: Final = 10.0
# Request/reply connections per listener. The CLI uses one per command; 64 concurrent owner-side
# scripts is far beyond real use. TCP gets its own, smaller pool: it serves a remote tool or two.
MAX_UNIX_CLIENTS: Final = 64
MAX_TCP_CLIENTS: Final = 16
# `events` subscribers per listener: each is a dashboard or a logger, a handful in practice.
MAX_UNIX_STREAMS: Final = 16
MAX_TCP_STREAMS: Final = 4
# A connection being closed gets this long to take its last error line before its socket is aborted,
# so a peer that never reads cannot keep a descriptor alive after its slot was given away.
CLOSE_GRACE: Final = 1.0
# Refusals are summed up in one log line at most this often: a flood is a few lines, not one per attempt.
SUMMARY_INTERVAL: Final = 60.0
# How much of a client's value an error quotes back, and how long an error line may be.
MAX_QUOTED: Final = 40
MAX_ERROR: Final = 300
# Listen queue of each socket (the asyncio default): connections waiting to be accepted and judged.
BACKLOG: Final = 100


class ControlError(AutonatError):
    exit_code = 8


# --- requests: bytes in, a request object or a one-line ControlError out (no IO) ---------------------

# A JSON string as the json module reads it: from a quote to the next unescaped quote. Every branch can
# match, so the pattern never backtracks (linear time); an unterminated string runs to the end.
_STRING = re.compile(rb'"[^"\\]*(?:\\.?[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_OPENS_AS_ONE = bytes.maketrans(b"[{]}", b"\x01\x01\x00\x00")


def nesting_depth(line: bytes) -> int:
    """How deep arrays and objects nest in `line`, counted on the raw bytes before any parsing.

    Strings are skipped the way the json module tokenizes them, so the parser never recurses deeper
    than this count (the brackets it reaches are a subset of those counted here, even in invalid JSON).
    C speed: a regex, two translations and iterator arithmetic, about 6 ms for 64 KiB of brackets.
    """
    brackets = _STRING.sub(b"", line).translate(None, _NOT_BRACKETS)
    # depth after each bracket = opened so far - closed so far = 2 * opened - brackets so far
    opened = itertools.accumulate(brackets.translate(_OPENS_AS_ONE))
    return max(0, max(map(operator.sub, map(operator.mul, opened, itertools.repeat(2)), itertools.count(1)), default=0))


def _parse_int(text: str) -> int:
    if len(text) - text.startswith("-") > MAX_INT_DIGITS:
        raise ControlError(f"a number has more than {MAX_INT_DIGITS} digits")
    return int(text)


def _refuse_constant(name: str) -> Any:
    raise ControlError(f"{name} is not a JSON number")


def parse_request(line: bytes) -> dict[str, Any]:
    """One request line (its newline removed) as a JSON object, or ControlError with a one-line reason."""
    if len(line) >= MAX_REQUEST:
        raise ControlError(f"a request line is limited to {MAX_REQUEST} bytes")
    try:
        text = line.decode()
    except UnicodeDecodeError as exc:
        raise ControlError(f"request is not UTF-8 (byte {exc.start})") from None
    if nesting_depth(line) > MAX_DEPTH:
        raise ControlError(f"request nests deeper than {MAX_DEPTH} levels")
    try:
        request = json.loads(text, parse_int=_parse_int, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise ControlError(f"request is not JSON: {exc.msg} (character {exc.pos})") from None
    except RecursionError:  # cannot happen after the depth count; kept so it could never be a traceback
        raise ControlError(f"request nests deeper than {MAX_DEPTH} levels") from None
    if not isinstance(request, dict):
        raise ControlError("a request is a JSON object")
    return request


def check_auth(line: bytes, token: bytes) -> bool:
    """Is `line` (its newline removed) exactly `AUTH <token>`? Raw bytes, constant time in the token."""
    return hmac.compare_digest(line.removesuffix(b"\r"), b"AUTH " + token)


def one_line(text: str, limit: int = MAX_ERROR) -> str:
    """`text` cut to `limit` characters, control characters (newlines too) and lone surrogates escaped."""
    cut = text[:limit] + ("..." if len(text) > limit else "")
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode() for c in cut)


def _quote(value: object) -> str:
    shown = repr(value)
    return shown if len(shown) <= MAX_QUOTED else shown[: MAX_QUOTED - 3] + "..."


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode() + b"\n"


def _error(text: str) -> bytes:
    return _encode({"ok": False, "error": one_line(text)})


def _describe(exc: BaseException) -> str:
    return one_line(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


def _port(value: object, name: str = "port") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
        raise ControlError(f"{name} must be a port number 1-65535")
    return value


def _family(value: object) -> int:
    if type(value) is not int or value not in (4, 6):
        raise ControlError("family must be 4 (a port mapping) or 6 (an IPv6 pinhole)")
    return value


def _transport(value: object) -> Transport:
    if not isinstance(value, str):
        raise ControlError("proto must be udp or tcp")
    try:
        return Transport.parse(value)
    except ValueError as exc:
        raise ControlError(one_line(str(exc))) from None


# --- connections -------------------------------------------------------------------------------------


class _State(enum.Enum):
    NEW = "new"  # accepted, not judged yet
    AUTH = "auth"  # TCP: waiting for `AUTH <token>`
    IDLE = "idle"  # waiting for a request line
    BUSY = "busy"  # a command runs; reading is paused
    STREAM = "stream"  # an events stream
    CLOSED = "closed"


@dataclass(eq=False)
class _Listener:
    """One listening socket's capacity: request/reply clients (the one idle longest first) and streams."""

    name: str
    needs_token: bool
    max_clients: int
    max_streams: int
    clients: dict[_Connection, None] = field(default_factory=dict)
    streams: set[_Connection] = field(default_factory=set)

    def idlest(self) -> _Connection | None:
        """The connection a newcomer may evict: idle longest; over TCP only one that has not authenticated."""
        evictable = _State.AUTH if self.needs_token else _State.IDLE
        return next((c for c in self.clients if c.state is evictable), None)

    def touch(self, connection: _Connection) -> None:
        """`connection` has just become idle: it moves to the back of the eviction order."""
        self.clients.pop(connection, None)
        self.clients[connection] = None

    def release(self, connection: _Connection) -> None:
        self.clients.pop(connection, None)
        self.streams.discard(connection)


class _Refusals:
    """Counts refused, evicted, timed-out and unauthenticated connections; one summary line at most every
    SUMMARY_INTERVAL s (the first one at once, so the log shows a flood when it starts)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.total: Counter[str] = Counter()  # since start, for tests and a future status field
        self._logged_at: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    def count(self, what: str) -> None:
        self.counts[what] += 1
        self.total[what] += 1
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._logged_at is None or now - self._logged_at >= SUMMARY_INTERVAL:
            self.flush(now)
        elif self._timer is None:
            self._timer = loop.call_at(self._logged_at + SUMMARY_INTERVAL, self.flush)

    def flush(self, now: float | None = None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.counts:
            summary = ", ".join(f"{n} {what}" for what, n in sorted(self.counts.items()))
            log.warning("control channel: %s", summary)
            self.counts.clear()
            self._logged_at = asyncio.get_running_loop().time() if now is None else now


class _Connection(asyncio.Protocol):
    """One control connection. It frames lines and keeps the timers; `ControlServer` decides."""

    def __init__(self, server: ControlServer, listener: _Listener) -> None:
        self.server = server
        self.listener = listener
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.state = _State.NEW
        self.buffer = bytearray()
        self._scanned = 0  # bytes of `buffer` known to hold no newline (a slow sender is scanned once)
        self.eof = False
        self.task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False
        self._writable: asyncio.Future[None] | None = None

    # asyncio.Protocol: every callback is guarded, an exception in one would be logged with a traceback.
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._guarded(self.server._admit, self)

    def data_received(self, data: bytes) -> None:
        if self.state in (_State.AUTH, _State.IDLE, _State.BUSY):
            self.buffer += data
            if self.state is not _State.BUSY:
                self._guarded(self._advance)
        # An events stream is one-way and a closed connection is done: their input is dropped unread.

    def eof_received(self) -> bool:
        self.eof = True
        if self.state is _State.STREAM:
            self.close()
        elif self.state in (_State.AUTH, _State.IDLE):
            self._guarded(self._advance)
        # True keeps our side open: `printf '{"cmd":"status"}\n' | nc -NU sock` half-closes and reads.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def _guarded(self, function: Callable[..., object], *args: object) -> None:
        try:
            function(*args)
        except Exception as exc:
            log.error("control channel: %s connection failed: %s", self.listener.name, _describe(exc))
            self.close("closed: internal error", abort=True)

    # framing
    def _advance(self) -> None:
        """Take the complete lines out of the buffer while the connection waits for one."""
        while self.state in (_State.AUTH, _State.IDLE):
            cap = MAX_AUTH_LINE if self.state is _State.AUTH else MAX_REQUEST
            end = self.buffer.find(b"\n", self._scanned, cap)
            if end < 0:
                self._scanned = min(len(self.buffer), cap)
                if len(self.buffer) >= cap:
                    self.server._refusals.count(f"{self.listener.name} lines too long")
                    self.close(f"closed: a request line is limited to {cap} bytes")
                elif self.eof:
                    self.close("closed: the request line has no end" if self.buffer.strip() else None)
                return
            line = bytes(self.buffer[:end])
            del self.buffer[: end + 1]
            self._scanned = 0
            if self.state is _State.AUTH:
                self.server._authenticate(self, line)
            else:
                self._start(line)

    def _start(self, line: bytes) -> None:
        assert self.transport is not None
        self.state = _State.BUSY
        self._disarm()
        self.transport.pause_reading()  # one request at a time: what is pipelined waits in the kernel
        self.task = self.loop.create_task(self._serve(line))

    async def _serve(self, line: bytes) -> None:
        try:
            reply = await self.server._reply(self, line)
            if reply is not None and self.state is _State.BUSY:
                self.write(reply)
                try:
                    async with asyncio.timeout(REQUEST_TIMEOUT):
                        await self.drain()
                except TimeoutError:
                    self.server._refusals.count(f"{self.listener.name} replies not read")
                    self.close(abort=True)
            if self.state is _State.BUSY:
                assert self.transport is not None
                self.idle()
                self.transport.resume_reading()
                self._advance()
        except Exception as exc:  # _reply answers every failure itself; this is the last resort
            log.error("control channel: %s connection failed: %s", self.listener.name, _describe(exc))
            self.close("closed: internal error", abort=True)
        finally:
            if self.state is _State.CLOSED:
                self.listener.release(self)

    # state
    def idle(self, state: _State = _State.IDLE) -> None:
        """Wait for the next line: in the eviction order's back, with a fresh request timer."""
        self.state = state
        self.listener.touch(self)
        self._disarm()
        self._timer = self.loop.call_later(REQUEST_TIMEOUT, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        self.server._refusals.count(f"{self.listener.name} connections timed out")
        self.close(f"closed: no complete request within {REQUEST_TIMEOUT:g} s")

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the peer has more than the transport's high-water mark of our output unread."""
        while self._paused and self.state is not _State.CLOSED:
            self._writable = self.loop.create_future()
            await self._writable

    def close(self, message: str | None = None, *, abort: bool = False) -> None:
        """Close with `message` as the last line; the slot is free at once unless a command still runs."""
        if self.state is _State.CLOSED:
            return
        was = self.state
        self.state = _State.CLOSED
        self._disarm()
        if was is _State.STREAM and self.task is not None:
            self.task.cancel()
        if self.task is None or self.task.done() or was is _State.STREAM:
            self.listener.release(self)
        # else: the running command keeps its slot until it ends (_serve releases it), so clients that
        # hang up mid-command cannot pile up more concurrent commands than the cap.
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if abort:
            transport.abort()
            return
        if message is not None and transport.get_write_buffer_size() == 0:
            transport.write(_error(message))
        transport.close()
        if transport.get_write_buffer_size():
            self.loop.call_later(CLOSE_GRACE, transport.abort)


class ControlServer:
    def __init__(
        self,
        engine: NatEngine,
        socket_path: Path,
        tcp: tuple[str, int] | None,
        token: str | None,
        profiles: ProfileManager | None = None,
        sip: SipService | None = None,
        reload: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        self.engine = engine
        self.profiles = profiles
        self.sip = sip
        self._reload = reload
        self.last_doctor_report: dict[str, Any] | None = None  # the last `autonat doctor` summary (the page's)
        self.socket_path = socket_path
        self.tcp = tcp
        self.token = token
        self._token = None if token is None else token.encode()
        self._servers: list[asyncio.Server] = []
        self._unix = _Listener("unix", False, MAX_UNIX_CLIENTS, MAX_UNIX_STREAMS)
        self._tcp = _Listener("tcp", True, MAX_TCP_CLIENTS, MAX_TCP_STREAMS)
        self._refusals = _Refusals()
        self._stopping = False

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        """The TCP listener's bound (IP, port), or None without one (a test may bind port 0)."""
        if self.tcp is None or len(self._servers) < 2:
            return None
        host, port = self._servers[1].sockets[0].getsockname()[:2]
        return str(host), int(port)

    @property
    def refusals(self) -> Counter[str]:
        """Refused, evicted, timed-out and unauthenticated connections since start, by reason."""
        return self._refusals.total

    async def start(self) -> None:
        self._claim_socket_path()
        self.socket_path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        old_umask = os.umask(0o177)  # the socket is born owner-only: no window where others could connect
        try:
            server = await loop.create_unix_server(
                lambda: _Connection(self, self._unix), path=str(self.socket_path), backlog=BACKLOG
            )
        finally:
            os.umask(old_umask)
        os.chmod(self.socket_path, 0o600)
        self._servers.append(server)
        if self.tcp is not None:
            host, port = self.tcp
            tcp_server = await loop.create_server(lambda: _Connection(self, self._tcp), host, port, backlog=BACKLOG)
            self._servers.append(tcp_server)
            log.warning("control channel also listening on TCP %s:%d (token required)", host, port)

    def _claim_socket_path(self) -> None:
        """Refuse to start beside a live daemon; remove a socket a dead one left behind."""
        path = self.socket_path
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise ControlError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink(missing_ok=True)  # stale
        else:
            raise ControlError(f"another autonat daemon is running (control socket {path})")
        finally:
            probe.close()

    async def stop(self) -> None:
        self._stopping = True
        for server in self._servers:
            server.close()
        # Event streams never end on their own and commands may be waiting on the router: a stopping
        # daemon ends them all (every connection is closed before wait_closed, which waits for them).
        tasks = []
        for listener in (self._unix, self._tcp):
            for connection in [*listener.clients, *listener.streams]:
                if connection.task is not None and not connection.task.done():
                    connection.task.cancel()
                    tasks.append(connection.task)
                connection.close("closed: the daemon is stopping")
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_GRACE)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()
        self._refusals.flush()
        with contextlib.suppress(OSError):
            self.socket_path.unlink()

    # decisions
    def _admit(self, connection: _Connection) -> None:
        """At accept: take the connection, evicting the one idle longest if full, or refuse it at once."""
        listener = connection.listener
        if self._stopping:
            connection.close("closed: the daemon is stopping")
            return
        if len(listener.clients) >= listener.max_clients:
            victim = listener.idlest()
            if victim is None:
                self._refusals.count(f"{listener.name} connections refused (all {listener.max_clients} busy)")
                connection.close(f"closed: too many control connections ({listener.max_clients})")
                return
            waiting = "unauthenticated" if listener.needs_token else "idle"
            self._refusals.count(f"{listener.name} {waiting} connections evicted")
            victim.close("closed: too many control connections; this one was idle longest")
        connection.idle(_State.AUTH if listener.needs_token else _State.IDLE)

    def _authenticate(self, connection: _Connection, line: bytes) -> None:
        if self._token is not None and check_auth(line, self._token):
            connection.write(_encode({"ok": True}))
            connection.idle()
            return
        self._refusals.count(f"{connection.listener.name} bad or missing tokens")
        connection.close("closed: bad or missing token (the first line must be AUTH <token>)")

    async def _reply(self, connection: _Connection, line: bytes) -> bytes | None:
        """The reply line to `line`; None when the connection became an events stream (and it ended)."""
        command: object = None
        try:
            try:
                request = parse_request(line)
            except ControlError:
                self._refusals.count(f"{connection.listener.name} malformed requests")
                raise
            command = request.get("cmd")
            if command == "events":
                await self._stream(connection)
                return None
            return _encode({"ok": True, "result": await self._command(request)})
        except AutonatError as exc:
            return _error(str(exc))
        except Exception as exc:
            # A command that breaks is a bug of ours, not the client's: one line each side, no traceback.
            log.error("control channel: command %s failed: %s", one_line(_quote(command)), _describe(exc))
            return _error(f"internal error in command {_quote(command)} ({type(exc).__name__}); see the daemon log")

    async def _stream(self, connection: _Connection) -> None:
        listener = connection.listener
        if len(listener.streams) >= listener.max_streams:
            raise ControlError(f"too many event streams ({listener.max_streams})")
        assert connection.transport is not None
        listener.clients.pop(connection, None)
        listener.streams.add(connection)
        connection.state = _State.STREAM
        connection.write(_encode({"ok": True}))
        connection.transport.resume_reading()  # only to see the client go: its input is dropped
        if connection.eof:
            connection.close()
            return
        # A reader that falls behind waits here; the bus keeps its newest events (SUBSCRIBER_QUEUE).
        async for event in self.engine.events.subscribe():
            connection.write(_encode(event.to_dict()))
            await connection.drain()
            if connection.state is not _State.STREAM:
                return

    async def _command(self, request: dict[str, Any]) -> Any:
        engine = self.engine
        command = request.get("cmd")
        if command == "status":
            return engine.status()
        if command in ("profile", "profiles", "advertise"):
            return self._profile_command(command, request)
        if command == "calls":
            return [] if self.sip is None else [call.describe() for call in {id(c): c for c in self.sip.calls}.values()]
        if command == "registrations":
            return [] if self.sip is None else self.sip.registrations()
        if command == "call":
            return await self._test_call(request)
        if command == "doctor-report":
            return self._doctor_report(request)
        if command == "reload":
            if self._reload is None:
                raise ControlError("this daemon cannot reload")
            try:
                return await self._reload()
            except ConfigError as exc:
                raise ControlError(f"reload refused, nothing changed: {'; '.join(exc.problems)}") from None
        if not engine.settings.enabled and command in ("add", "del", "republish", "reinit", "mapping"):
            raise ControlError("NAT is disabled (--nonat)")
        if command == "add":
            if not engine.mapping_enabled:
                raise ControlError("NAT port mapping is disabled")
            sticky = request.get("sticky", False)
            if not isinstance(sticky, bool):
                raise ControlError("sticky must be true or false")
            external = request.get("external_port", 0)
            family = _family(request.get("family", 4))
            wanted = Wanted(
                _transport(request.get("proto")),
                _port(request.get("port")),
                0 if external == 0 else _port(external, "external_port"),
                sticky,
                "manual",
                family,
            )
            try:
                return (await engine.add(wanted)).to_dict(time.time())
            except AutonatError as exc:  # a pinhole with [nat] ipv6 off
                raise ControlError(str(exc)) from None
        if command == "del":
            family = _family(request.get("family", 4))
            found = await engine.delete(_transport(request.get("proto")), _port(request.get("port")), family)
            if not found:
                raise ControlError("no such mapping" if family == 4 else "no such pinhole")
            return {"deleted": True}
        if command == "republish":
            await engine.republish()
            return engine.status()
        if command == "reinit":
            probe = await engine.reinit()
            return probe.to_dict()
        if command == "mapping":
            enable = request.get("enable")
            if not isinstance(enable, bool):
                raise ControlError("mapping needs enable: true or false")
            await engine.set_mapping_enabled(enable)
            return {"mapping_enabled": engine.mapping_enabled}
        raise ControlError(f"unknown command {_quote(command)}")

    async def _test_call(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.sip is None:
            raise ControlError("call: this daemon has no SIP profile to call from (add a [[profile]])")
        uri, profile = request.get("uri"), request.get("profile")
        if not isinstance(uri, str):
            raise ControlError("call needs uri, a SIP URI (e.g. sip:9196@203.0.113.50)")
        if profile is not None and not isinstance(profile, str):
            raise ControlError("call: profile must be a profile name")
        # The service checks the rest (the URI, seconds: any JSON value) and answers SipError, one line.
        return await self.sip.test_call(profile, uri, request.get("seconds", DEFAULT_SECONDS))

    def _doctor_report(self, request: dict[str, Any]) -> Any:
        if "report" not in request:
            return self.last_doctor_report
        report = request["report"]
        if not isinstance(report, dict):
            raise ControlError("doctor-report: report must be an object")
        if len(json.dumps(report)) > MAX_DOCTOR_REPORT:
            raise ControlError(f"doctor-report: the report is limited to {MAX_DOCTOR_REPORT} bytes")
        self.last_doctor_report = {**report, "received": time.time()}
        return {"stored": True}

    def _profile_command(self, command: str, request: dict[str, Any]) -> Any:
        if self.profiles is None:
            raise ControlError("no profiles are configured")
        if command == "profiles":
            return sorted(self.profiles.profiles)
        name = request.get("name")
        if not isinstance(name, str):
            raise ControlError("name must be a profile name")
        if command == "profile":
            status = self.profiles.status(name).to_dict()
            if self.sip is not None:
                status.update(self.sip.status(name))
            return status
        destination, media = request.get("destination"), request.get("media", False)
        if not isinstance(destination, str) or not isinstance(media, bool):
            raise ControlError("advertise needs destination (an IP) and media (true/false)")
        try:
            return str(self.profiles.advertise(name, destination, media))
        except ValueError as exc:
            raise ControlError(f"destination: {exc}") from None


class ControlClient:
    """The CLI's side: one connection, JSON lines."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> ControlClient:
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(str(self.socket_path), limit=1 << 22)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(f"no autonat daemon is running (no control socket at {self.socket_path})") from None
        except PermissionError:
            raise ControlError(
                f"no permission to use the control socket {self.socket_path} (run as its owner)"
            ) from None
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._writer is not None:
            self._writer.close()

    async def send(self, request: dict[str, Any]) -> None:
        assert self._writer is not None
        self._writer.write(json.dumps(request).encode() + b"\n")
        await self._writer.drain()

    async def receive(self) -> dict[str, Any]:
        assert self._reader is not None
        line = await self._reader.readline()
        if not line:
            raise ControlError("the daemon closed the control connection")
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def call(self, request: dict[str, Any]) -> Any:
        await self.send(request)
        reply = await self.receive()
        if not reply.get("ok"):
            raise ControlError(str(reply.get("error", "the daemon refused")))
        return reply.get("result")
