"""The control channel without a router: permissions, stale sockets, a second daemon, TCP tokens,
hostile requests, floods of connections. (The engine runs with NAT disabled, so nothing leaves the machine.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import operator
import socket
import stat
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autonat.daemon import control
from autonat.daemon.control import (
    MAX_AUTH_LINE,
    MAX_DEPTH,
    MAX_REQUEST,
    MAX_TCP_CLIENTS,
    MAX_UNIX_CLIENTS,
    MAX_UNIX_STREAMS,
    ControlClient,
    ControlError,
    ControlServer,
    nesting_depth,
    parse_request,
)
from autonat.engine.engine import NatEngine
from autonat.engine.events import EventKind
from autonat.engine.settings import NatSettings
from tests.helpers import ensure_open_files

TOKEN = "s3cret-token-of-16+"  # noqa: S105 (a test token)
AUTH = f"AUTH {TOKEN}\n".encode()

# The payloads that made main answer nothing and log a traceback, and their kin.
HOSTILE = [
    (b"\x00", "request is not JSON: Expecting value (character 0)"),
    (b"\x00\x00\x00", "request is not JSON: Expecting value (character 0)"),
    (b'{"cmd": "st\x00atus"}', "request is not JSON: Invalid control character at (character 11)"),
    (b"\xff\xfe", "request is not UTF-8 (byte 0)"),
    (b'{"cmd": "\xc3("}', "request is not UTF-8 (byte 9)"),
    (b"\xef\xbb\xbf{}", "request is not JSON: Unexpected UTF-8 BOM (decode using utf-8-sig) (character 0)"),
    (b"[" * 30000, "request nests deeper than 32 levels"),
    (b"[" * 30000 + b"]" * 30000, "request nests deeper than 32 levels"),
    (b'{"":' * 16000, "request nests deeper than 32 levels"),
    (b'{"cmd": "status", "x": ' + b"[" * 33 + b"]" * 33 + b"}", "request nests deeper than 32 levels"),
    (b'{"cmd": "status", "port": ' + b"1" * 5000 + b"}", "a number has more than 20 digits"),
    (b'{"cmd": "status", "port": -' + b"9" * 21 + b"}", "a number has more than 20 digits"),
    (b'{"cmd": "add", "port": NaN}', "NaN is not a JSON number"),
    (b'{"cmd": "add", "port": -Infinity}', "-Infinity is not a JSON number"),
    (b'{"cmd": "add", "proto": "udp", "port": 1' + b"0" * 5000 + b".5}", "NAT is disabled (--nonat)"),
    (b'{"cmd": "\\ud800"}', "unknown command '\\ud800'"),
    (b'{"cmd": "' + b"x" * 60000 + b'"}', "unknown command '" + "x" * 36 + "..."),
    (b'{"cmd": {"a": [1, 2]}}', "unknown command {'a': [1, 2]}"),
    (b"", "request is not JSON: Expecting value (character 0)"),
    (b"null", "a request is a JSON object"),
    (b"[1, 2]", "a request is a JSON object"),
    (b"not json", "request is not JSON: Expecting value (character 0)"),
    (b'{"cmd": "frobnicate"}', "unknown command 'frobnicate'"),
]


class Records(logging.Handler):
    """Every record of the control channel and of asyncio (where a protocol's traceback would go)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def assert_no_traceback(self) -> None:
        for record in self.records:
            assert record.exc_info is None and record.stack_info is None, record
            assert "\n" not in record.getMessage() and "Traceback" not in record.getMessage(), record
            assert record.name != "asyncio" or record.levelno < logging.WARNING, record.getMessage()


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    loggers = [logging.getLogger("autonat.control"), logging.getLogger("asyncio")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    yield handler
    for logger, level in zip(loggers, levels, strict=True):
        logger.removeHandler(handler)
        logger.setLevel(level)
    handler.assert_no_traceback()


@pytest.fixture
async def server(tmp_path: Path, records: Records) -> AsyncIterator[ControlServer]:
    engine = NatEngine(NatSettings(enabled=False))
    await engine.start()
    control = ControlServer(engine, tmp_path / "run" / "control.sock", ("127.0.0.1", 0), TOKEN)
    await control.start()
    yield control
    await control.stop()
    await engine.stop()


def tcp_port(control: ControlServer) -> int:
    assert control.tcp_address is not None
    return control.tcp_address[1]


async def ask_tcp(control: ControlServer, data: bytes, expect: int = 1) -> list[dict[str, Any]]:
    """The reply lines until the daemon closes or `expect` came; one more if it comes at once."""
    reader, writer = await asyncio.open_connection("127.0.0.1", tcp_port(control))
    writer.write(data)
    replies = []
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while line := await asyncio.wait_for(reader.readline(), 5 if len(replies) < expect else 0.05):
            replies.append(json.loads(line))
    writer.close()
    return replies


async def ask_unix(control: ControlServer, data: bytes) -> list[dict[str, Any]]:
    reader, writer = await asyncio.open_unix_connection(str(control.socket_path))
    writer.write(data)
    writer.write_eof()  # the reply still comes: a half-closed client (nc -N) is answered
    replies = []
    while line := await asyncio.wait_for(reader.readline(), 5):
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        replies.append(json.loads(line))
    writer.close()
    return replies


def open_idle(address: str | tuple[str, int], count: int) -> list[socket.socket]:
    """`count` connections that never send a byte (blocking connects: run it in a thread)."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.connect(address)  # blocking: a Unix connect waits while the listen queue is full
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def flood(control: ControlServer, address: str | tuple[str, int], count: int) -> list[socket.socket]:
    """`count` idle connections, opened in batches the daemon accepts before the next: a TCP listen
    queue that overflows drops SYNs, and the kernel retries them only a second later."""
    ensure_open_files(2 * count + 256)  # both ends of every connection live in this process
    sockets: list[socket.socket] = []
    try:
        while len(sockets) < count:
            before = sum(control.refusals.values()) + len(control._unix.clients) + len(control._tcp.clients)
            batch = min(50, count - len(sockets))
            sockets += await asyncio.to_thread(open_idle, address, batch)
            for _ in range(500):
                now = sum(control.refusals.values()) + len(control._unix.clients) + len(control._tcp.clients)
                if now >= before + batch:
                    break
                await asyncio.sleep(0.002)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def first_line(sock: socket.socket, timeout: float = 5) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


# --- requests --------------------------------------------------------------------------------------


async def test_socket_is_owner_only_and_answers(server: ControlServer) -> None:
    assert stat.S_IMODE(server.socket_path.stat().st_mode) == 0o600
    async with ControlClient(server.socket_path) as client:
        status = await client.call({"cmd": "status"})
    assert status["nat"] == "disabled" and status["mappings"] == []


async def test_commands_that_need_nat_say_it_is_disabled(server: ControlServer) -> None:
    async with ControlClient(server.socket_path) as client:
        with pytest.raises(ControlError, match=r"NAT is disabled \(--nonat\)"):
            await client.call({"cmd": "add", "port": 5060, "proto": "udp"})


async def test_doctor_hands_its_report_over_and_the_daemon_keeps_the_last_one(server: ControlServer) -> None:
    async with ControlClient(server.socket_path) as client:
        assert await client.call({"cmd": "doctor-report"}) is None  # none before the first doctor run
        first = {"status": 1, "text": "fail    gateway  no answer", "findings": []}
        assert await client.call({"cmd": "doctor-report", "report": first}) == {"stored": True}
        assert await client.call({"cmd": "doctor-report", "report": {"status": 0, "text": "ok"}}) == {"stored": True}
        held = await client.call({"cmd": "doctor-report"})
        with pytest.raises(ControlError, match=r"^doctor-report: report must be an object$"):
            await client.call({"cmd": "doctor-report", "report": ["not", "an", "object"]})
        with pytest.raises(ControlError, match=r"^doctor-report: the report is limited to 32768 bytes$"):
            await client.call({"cmd": "doctor-report", "report": {"text": "x" * 40_000}})
        assert await client.call({"cmd": "doctor-report"}) == held  # a refused report changes nothing
    assert held["status"] == 0 and held["text"] == "ok" and abs(held["received"] - time.time()) < 60
    assert server.last_doctor_report == held  # what the status page reads


@pytest.mark.parametrize(("payload", "error"), HOSTILE)
async def test_hostile_requests_get_one_line_errors(
    server: ControlServer, records: Records, payload: bytes, error: str
) -> None:
    # The connection survives the error: the next request on it is answered.
    replies = await ask_unix(server, payload + b"\n" + b'{"cmd": "status"}\n')
    assert replies[0] == {"ok": False, "error": error}
    assert replies[1]["ok"] is True and len(replies) == 2
    records.assert_no_traceback()


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_a_line_too_long_is_refused_before_it_ends(server: ControlServer, transport: str) -> None:
    if transport == "unix":
        reader, writer = await asyncio.open_unix_connection(str(server.socket_path))
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", tcp_port(server))
        writer.write(AUTH)
        assert json.loads(await reader.readline()) == {"ok": True}
    writer.write(b"x" * (MAX_REQUEST + 10))  # no newline: the daemon must not wait for one
    reply = json.loads(await asyncio.wait_for(reader.readline(), 5))
    assert reply == {"ok": False, "error": f"closed: a request line is limited to {MAX_REQUEST} bytes"}
    try:
        assert await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        assert transport == "tcp"  # closed with our input unread: TCP resets, after the error line was read
    writer.close()


async def test_pipelined_requests_are_answered_in_order(server: ControlServer) -> None:
    replies = await ask_unix(server, b'{"cmd": "nope"}\n{"cmd": "status"}\r\n{"cmd": "profiles"}\n')
    assert [r.get("error") for r in replies] == ["unknown command 'nope'", None, "no profiles are configured"]


async def test_a_request_in_pieces_is_answered_once_it_ends(server: ControlServer) -> None:
    reader, writer = await asyncio.open_unix_connection(str(server.socket_path))
    for byte in b'{"cmd": "status"}\n':
        assert not reader._buffer  # nothing is answered before the line ends
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(0.001)
    assert json.loads(await asyncio.wait_for(reader.readline(), 5))["ok"] is True
    writer.close()


async def test_a_request_without_its_newline_at_the_end_of_input(server: ControlServer) -> None:
    assert await ask_unix(server, b'{"cmd": "status"}') == [
        {"ok": False, "error": "closed: the request line has no end"}
    ]


async def test_a_command_that_breaks_is_one_line_each_side(
    server: ControlServer, records: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(server.engine, "status", broken)
    replies = await ask_unix(server, b'{"cmd": "status"}\n{"cmd": "profiles"}\n')
    assert replies == [
        {"ok": False, "error": "internal error in command 'status' (RuntimeError); see the daemon log"},
        {"ok": False, "error": "no profiles are configured"},
    ]
    errors = [r.getMessage() for r in records.records if r.levelno >= logging.ERROR]
    assert errors == ["control channel: command 'status' failed: RuntimeError: boom\\nsecond line"]


def test_nesting_depth_counts_brackets_outside_strings() -> None:
    assert nesting_depth(b'{"cmd": "status"}') == 1
    assert nesting_depth(b'{"a": "[[[[{{{{", "b": [[1], {"c": "\\"]]]"}]}') == 3
    assert nesting_depth(b"[" * 100) == 100
    assert nesting_depth(b"]]][[[[[") == 2  # the parser fails at the first "]" and never goes deeper
    assert nesting_depth(b'"\\') == 0  # an unterminated string with a lone backslash at the end


@settings(max_examples=300)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
        max_leaves=30,
    )
)
def test_nesting_depth_matches_the_parsed_value(value: object) -> None:
    def depth(v: object) -> int:
        if isinstance(v, list):
            return 1 + max((depth(x) for x in v), default=0)
        if isinstance(v, dict):
            return 1 + max((depth(x) for x in v.values()), default=0)
        return 0

    assert nesting_depth(json.dumps(value).encode()) == depth(value)
    assert nesting_depth(json.dumps(value, ensure_ascii=False).encode()) == depth(value)


def _json_requests() -> st.SearchStrategy[bytes]:
    commands = st.sampled_from(["status", "add", "del", "events", "mapping", "profile", "advertise", "calls", "x"])
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    values = st.recursive(
        scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c), max_leaves=8
    )
    keys = st.sampled_from(["port", "proto", "sticky", "external_port", "enable", "name", "destination", "media"])
    request = st.fixed_dictionaries({"cmd": commands}, optional={k: values for k in ["port", "proto", "enable"]})
    extra = st.dictionaries(keys, values, max_size=3)
    return st.builds(lambda r, e: json.dumps({**e, **r}).encode().replace(b"\n", b""), request, extra).filter(
        lambda line: b'"events"' not in line
    )


@settings(max_examples=400)
@given(st.one_of(st.binary(max_size=300), _json_requests(), st.text(max_size=100).map(str.encode)))
def test_parse_request_refuses_with_one_line_or_returns_an_object(line: bytes) -> None:
    try:
        request = parse_request(line)
    except ControlError as exc:
        assert "\n" not in str(exc) and str(exc)
    else:
        assert isinstance(request, dict)


class LiveServer:
    """A control server on its own event loop thread, for property tests that send real bytes."""

    def __init__(self, path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.records = Records()
        self.path = path
        self.control = self.run(self._start())

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    async def _start(self) -> ControlServer:
        engine = NatEngine(NatSettings(enabled=False))
        await engine.start()
        server = ControlServer(engine, self.path, ("127.0.0.1", 0), TOKEN)
        await server.start()
        return server

    async def _stop(self) -> None:
        await self.control.stop()
        await self.control.engine.stop()

    def close(self) -> None:
        self.run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path_factory.mktemp("live") / "control.sock")
    loggers = [logging.getLogger("autonat.control"), logging.getLogger("asyncio")]
    for logger in loggers:
        logger.addHandler(server.records)
    yield server
    for logger in loggers:
        logger.removeHandler(server.records)
    server.close()
    server.records.assert_no_traceback()


def _exchange(address: str | tuple[str, int], data: bytes) -> list[bytes]:
    """Send `data`, half-close, read every line until the daemon closes."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(address)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.endswith(b"\n")
    return received.splitlines()


@settings(max_examples=200)
@given(
    st.one_of(
        st.binary(max_size=200),
        _json_requests(),
        st.builds(
            operator.add, st.binary(max_size=20), st.integers(MAX_REQUEST - 25, MAX_REQUEST + 5).map(b"x".__mul__)
        ),
    )
)
def test_arbitrary_lines_get_one_line_replies_and_never_a_traceback(live: LiveServer, payload: bytes) -> None:
    line = payload.replace(b"\n", b" ")
    replies = [json.loads(r) for r in _exchange(str(live.path), line + b"\n")]
    if len(line) + 1 > MAX_REQUEST:
        assert replies == [{"ok": False, "error": f"closed: a request line is limited to {MAX_REQUEST} bytes"}]
    else:
        assert len(replies) == 1 and isinstance(replies[0]["ok"], bool)
        assert replies[0]["ok"] or "\n" not in replies[0]["error"]
    live.records.assert_no_traceback()


@settings(max_examples=150)
@given(st.binary(max_size=MAX_AUTH_LINE + 50))
def test_arbitrary_first_tcp_lines_are_refused_without_a_traceback(live: LiveServer, payload: bytes) -> None:
    assert live.control.tcp_address is not None
    replies = [json.loads(r) for r in _exchange(live.control.tcp_address, payload.replace(b"\n", b" ") + b"\n")]
    assert len(replies) == 1 and replies[0]["ok"] is False and replies[0]["error"].startswith("closed: ")
    live.records.assert_no_traceback()


# --- TCP: the token before anything else ----------------------------------------------------------


async def test_tcp_needs_the_token_first(server: ControlServer) -> None:
    refused = {"ok": False, "error": "closed: bad or missing token (the first line must be AUTH <token>)"}
    assert await ask_tcp(server, b'{"cmd": "status"}\n') == [refused]
    assert await ask_tcp(server, json.dumps({"cmd": "status", "token": TOKEN}).encode() + b"\n") == [refused]
    assert await ask_tcp(server, b"AUTH nope\n" + b'{"cmd": "status"}\n') == [refused]
    assert await ask_tcp(server, f"AUTH {TOKEN}x\n".encode()) == [refused]
    assert await ask_tcp(server, f"auth {TOKEN}\n".encode()) == [refused]
    right = await ask_tcp(server, f"AUTH {TOKEN}\r\n".encode() + b'{"cmd": "status"}\n', expect=2)
    assert right[0] == {"ok": True} and right[1]["ok"] is True and right[1]["result"]["nat"] == "disabled"


async def test_tcp_refuses_without_parsing_a_byte(server: ControlServer, monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[bytes] = []
    real = control.parse_request

    def spy(line: bytes) -> dict[str, Any]:
        parsed.append(line)
        return real(line)

    monkeypatch.setattr(control, "parse_request", spy)
    deep = b'{"token": "' + TOKEN.encode() + b'", "cmd": ' + b"[" * 30000 + b"\n"
    huge = b'{"cmd": "status", "n": ' + b"1" * 5000 + b"}\n"
    refused = "closed: bad or missing token (the first line must be AUTH <token>)"
    for payload in (b"AUTH wrong-token-1234\n" + deep, b"AUTH wrong-token-1234\n" + huge, b"\x00\xff\n" + huge):
        assert await ask_tcp(server, payload) == [{"ok": False, "error": refused}]
    # A first line longer than any AUTH line is refused while it is still arriving: no newline is ever sent.
    reader, writer = await asyncio.open_connection("127.0.0.1", tcp_port(server))
    writer.write(b"[" * (MAX_AUTH_LINE + 1))
    reply = json.loads(await asyncio.wait_for(reader.readline(), 5))
    assert reply == {"ok": False, "error": f"closed: a request line is limited to {MAX_AUTH_LINE} bytes"}
    writer.close()
    assert parsed == []
    assert server.refusals["tcp bad or missing tokens"] == 3
    # With the token, the same deep request is parsed (and refused as too deep, still one line).
    replies = await ask_tcp(server, AUTH + deep, expect=2)
    assert replies == [{"ok": True}, {"ok": False, "error": f"request nests deeper than {MAX_DEPTH} levels"}]
    assert len(parsed) == 1


# --- connections: caps at accept, eviction, time-outs, streams ------------------------------------


async def test_1000_idle_unix_connections_do_not_lock_out_status(server: ControlServer) -> None:
    flooders = await flood(server, str(server.socket_path), 1000)
    try:
        assert len(server._unix.clients) == MAX_UNIX_CLIENTS
        async with ControlClient(server.socket_path) as client:
            assert (await client.call({"cmd": "status"}))["nat"] == "disabled"
            assert (await client.call({"cmd": "status"}))["nat"] == "disabled"  # still there on its connection
        # The oldest idle ones made room, each told why in one line; the newest still wait.
        evicted = json.loads(await asyncio.to_thread(first_line, flooders[0]))
        assert evicted == {"ok": False, "error": "closed: too many control connections; this one was idle longest"}
        assert server.refusals["unix idle connections evicted"] == 1000 - MAX_UNIX_CLIENTS + 1
        # And they can still use the socket: the latest flooder sends a request and is answered.
        flooders[-1].sendall(b'{"cmd": "status"}\n')
        assert json.loads(await asyncio.to_thread(first_line, flooders[-1]))["ok"] is True
    finally:
        for sock in flooders:
            sock.close()


async def test_a_tcp_flood_never_takes_unix_capacity_nor_authenticated_clients(server: ControlServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", tcp_port(server))
    writer.write(AUTH)
    assert json.loads(await reader.readline()) == {"ok": True}
    address = ("127.0.0.1", tcp_port(server))
    flooders = await flood(server, address, 1000)
    try:
        assert len(server._tcp.clients) == MAX_TCP_CLIENTS and len(server._unix.clients) == 0
        async with ControlClient(server.socket_path) as client:
            assert (await client.call({"cmd": "status"}))["nat"] == "disabled"
        # The client that proved the token was never evicted by the flood.
        writer.write(b'{"cmd": "status"}\n')
        assert json.loads(await reader.readline())["ok"] is True
        # A newcomer with the token gets in by evicting an unauthenticated flooder.
        assert (await ask_tcp(server, AUTH + b'{"cmd": "status"}\n', expect=2))[1]["ok"] is True
    finally:
        for sock in flooders:
            sock.close()
        writer.close()


async def test_a_full_tcp_listener_refuses_at_accept(server: ControlServer) -> None:
    clients = []
    for _ in range(MAX_TCP_CLIENTS):
        reader, writer = await asyncio.open_connection("127.0.0.1", tcp_port(server))
        writer.write(AUTH)
        assert json.loads(await reader.readline()) == {"ok": True}
        clients.append((reader, writer))
    # Every slot holds a client that proved the token: the newcomer is refused at once, and not even
    # asked for its token.
    assert await ask_tcp(server, b"") == [
        {"ok": False, "error": f"closed: too many control connections ({MAX_TCP_CLIENTS})"}
    ]
    assert server.refusals[f"tcp connections refused (all {MAX_TCP_CLIENTS} busy)"] == 1
    clients[0][1].close()
    await asyncio.sleep(0.05)
    assert (await ask_tcp(server, AUTH + b'{"cmd": "status"}\n', expect=2))[1]["ok"] is True
    for _, writer in clients:
        writer.close()


async def test_a_unix_listener_full_of_running_commands_refuses_at_accept(
    server: ControlServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = asyncio.Event()
    real = server._command

    async def slow(request: dict[str, Any]) -> Any:
        if request.get("cmd") == "reinit":
            await release.wait()
        return await real(request)

    monkeypatch.setattr(server, "_command", slow)
    busy = []
    for _ in range(MAX_UNIX_CLIENTS):
        reader, writer = await asyncio.open_unix_connection(str(server.socket_path))
        writer.write(b'{"cmd": "reinit"}\n')
        busy.append((reader, writer))
    while sum(c.task is not None for c in server._unix.clients) < MAX_UNIX_CLIENTS:
        await asyncio.sleep(0.01)
    with pytest.raises(ControlError, match=r"^closed: too many control connections \(64\)$"):
        async with ControlClient(server.socket_path) as client:
            await client.call({"cmd": "status"})
    # A client that hangs up mid-command keeps its slot until the command ends: no pile of commands.
    busy[0][1].close()
    await asyncio.sleep(0.05)
    assert len(server._unix.clients) == MAX_UNIX_CLIENTS
    release.set()
    for reader, writer in busy[1:]:
        assert json.loads(await reader.readline()) == {"ok": False, "error": "NAT is disabled (--nonat)"}
        writer.close()
    async with ControlClient(server.socket_path) as client:
        assert (await client.call({"cmd": "status"}))["nat"] == "disabled"


@pytest.mark.parametrize("partial", [b"", b'{"cmd": "sta'])
async def test_idle_connections_time_out(
    server: ControlServer, monkeypatch: pytest.MonkeyPatch, partial: bytes
) -> None:
    monkeypatch.setattr(control, "REQUEST_TIMEOUT", 0.2)
    reader, writer = await asyncio.open_unix_connection(str(server.socket_path))
    writer.write(b'{"cmd": "status"}\n' + partial)  # the clock starts again after each reply
    assert json.loads(await reader.readline())["ok"] is True
    reply = json.loads(await asyncio.wait_for(reader.readline(), 5))
    assert reply == {"ok": False, "error": "closed: no complete request within 0.2 s"}
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert len(server._unix.clients) == 0
    # Over TCP the token must come within the same time.
    tcp_reader, tcp_writer = await asyncio.open_connection("127.0.0.1", tcp_port(server))
    tcp_writer.write(b"AUTH " + partial)
    assert json.loads(await asyncio.wait_for(tcp_reader.readline(), 5))["error"].startswith("closed: no complete")
    writer.close()
    tcp_writer.close()


async def test_event_streams_are_capped_apart_and_end_with_their_client(server: ControlServer) -> None:
    streams = []
    for _ in range(MAX_UNIX_STREAMS):
        reader, writer = await asyncio.open_unix_connection(str(server.socket_path))
        writer.write(b'{"cmd": "events"}\n')
        assert json.loads(await reader.readline()) == {"ok": True}
        streams.append((reader, writer))
    assert len(server._unix.streams) == MAX_UNIX_STREAMS and len(server._unix.clients) == 0
    # One more is refused in one line, and its connection still serves requests.
    replies = await ask_unix(server, b'{"cmd": "events"}\n{"cmd": "status"}\n')
    assert replies[0] == {"ok": False, "error": f"too many event streams ({MAX_UNIX_STREAMS})"}
    assert replies[1]["ok"] is True
    # Streams do not take request slots: a full request pool still fits beside them.
    flooders = await flood(server, str(server.socket_path), MAX_UNIX_CLIENTS)
    await asyncio.sleep(0.05)
    assert server.refusals["unix idle connections evicted"] == 0
    for sock in flooders:
        sock.close()
    await asyncio.sleep(0.05)
    # Every stream gets the event, whatever its client sends (dropped unread).
    streams[0][1].write(b"garbage that is never parsed\n" * 1000)
    server.engine.events.publish(EventKind.DISCOVERED, protocol="pcp")
    for reader, _ in streams:
        assert json.loads(await asyncio.wait_for(reader.readline(), 5))["event"] == "discovered"
    # A client that goes away ends its stream and frees its place.
    streams[0][1].close()
    streams[1][1].write_eof()
    for _ in range(100):
        if len(server._unix.streams) == MAX_UNIX_STREAMS - 2:
            break
        await asyncio.sleep(0.01)
    assert len(server._unix.streams) == MAX_UNIX_STREAMS - 2
    for _, writer in streams[2:]:
        writer.close()


async def test_stopping_closes_every_connection_in_one_line(tmp_path: Path, records: Records) -> None:
    engine = NatEngine(NatSettings(enabled=False))
    await engine.start()
    server = ControlServer(engine, tmp_path / "control.sock", None, None)
    await server.start()
    idle_reader, idle_writer = await asyncio.open_unix_connection(str(server.socket_path))
    stream_reader, stream_writer = await asyncio.open_unix_connection(str(server.socket_path))
    stream_writer.write(b'{"cmd": "events"}\n')
    assert json.loads(await stream_reader.readline()) == {"ok": True}
    await asyncio.sleep(0.01)
    await server.stop()
    await engine.stop()
    stopping = {"ok": False, "error": "closed: the daemon is stopping"}
    assert json.loads(await idle_reader.readline()) == stopping
    assert json.loads(await stream_reader.readline()) == stopping
    assert not server.socket_path.exists()
    idle_writer.close()
    stream_writer.close()
    records.assert_no_traceback()


# --- start-up ---------------------------------------------------------------------------------------


async def test_a_second_daemon_is_refused_and_a_stale_socket_replaced(server: ControlServer, tmp_path: Path) -> None:
    second = ControlServer(server.engine, server.socket_path, None, None)
    with pytest.raises(ControlError, match="another autonat daemon is running"):
        await second.start()
    stale = tmp_path / "stale.sock"
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(stale))
    leftover.close()  # the file stays, nobody listens: what a killed daemon leaves
    third = ControlServer(server.engine, stale, None, None)
    await third.start()
    await third.stop()
    assert not stale.exists()


async def test_a_regular_file_in_the_way_is_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    path.write_text("precious")
    engine = NatEngine(NatSettings(enabled=False))
    with pytest.raises(ControlError, match="is not a socket"):
        await ControlServer(engine, path, None, None).start()
    assert path.read_text() == "precious"


async def test_no_daemon_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="no autonat daemon is running"):
        async with ControlClient(tmp_path / "none.sock"):
            pass
