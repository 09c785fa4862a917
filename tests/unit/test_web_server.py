"""The web listener on loopback (autonat.web.server) over a real engine driven by a fake router: routes,
the token and the DNS-rebinding guard, every cap with its one-line refusal, server-sent event framing,
replay and bounded queues, and the `autonat_*` metrics (promtool checks a scrape)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from autonat.aio.router import ProbeResult
from autonat.engine.engine import NatEngine, Wanted
from autonat.engine.events import EventKind
from autonat.engine.settings import NatSettings
from autonat.errors import RouterRefused
from autonat.mapper import MappingRequest
from autonat.proto import igd, natpmp, pcp
from autonat.proto.types import Transport
from autonat.web import server as web_server
from autonat.web.metrics import MAX_CODE_LABELS, error_code
from autonat.web.server import MAX_STREAMS, STATIC_FILES, STREAM_BACKLOG, WebServer
from autonat.web.settings import WebConfig
from autonat.web.status import Sources
from tests.fakes.fake_session import FakeSession, factory_for

TOKEN = "web-test-token-0123456"  # noqa: S105 (a test value)
Reply = tuple[int, dict[str, str], bytes]


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


class UpnpSession(FakeSession):
    """The fake router, selected as an IGD: what a quirk router's UPnP error codes come through."""

    async def probe(self, protocol: str = "auto") -> ProbeResult:
        return dataclasses.replace(await super().probe(protocol), selected="upnp")


def new_engine(session: FakeSession, protocol: str = "pcp") -> NatEngine:
    # verify_interval: the fake has no UPnP GetSpecificPortMappingEntry, so no verification in a test's time.
    settings = NatSettings(protocol=protocol, map_rate=0, verify_interval=3600)  # type: ignore[arg-type]
    return NatEngine(settings, None, session_factory=factory_for(session))


async def running_engine(session: FakeSession, *wanted: Wanted, protocol: str = "pcp") -> NatEngine:
    engine = new_engine(session, protocol)
    await engine.start(wanted)
    assert await engine.wait_ready(2)
    return engine


def state_of(engine: NatEngine, transport: Transport, port: int) -> str | None:
    status = engine.lookup((transport, port))
    return None if status is None else str(status.state)


@pytest.fixture
async def engine() -> AsyncIterator[NatEngine]:
    engine = await running_engine(FakeSession(), Wanted(Transport.UDP, 5060, owner="config"))
    await until(lambda: state_of(engine, Transport.UDP, 5060) == "active")
    try:
        yield engine
    finally:
        await engine.stop()


@pytest.fixture
async def serve(engine: NatEngine) -> AsyncIterator[Callable[..., Any]]:
    servers: list[WebServer] = []

    async def start(sources: Sources | None = None, **config: Any) -> WebServer:
        server = WebServer(WebConfig(listen=("127.0.0.1", 0), **config), sources or Sources(engine))
        await server.start()
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            await server.stop()


@pytest.fixture
async def web(serve: Callable[..., Any]) -> WebServer:
    server: WebServer = await serve()
    return server


def address(server: WebServer) -> tuple[str, int]:
    found = server.address
    assert found is not None
    return found


def request_bytes(path: str, *, method: str = "GET", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parse(data: bytes) -> Reply:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


async def exchange(server: WebServer, raw: bytes, timeout: float = 5.0) -> bytes:
    """Send `raw`, read until the server closes."""
    reader, writer = await asyncio.open_connection(*address(server))
    try:
        writer.write(raw)
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


async def get(server: WebServer, path: str, **kwargs: Any) -> Reply:
    return parse(await exchange(server, request_bytes(path, **kwargs)))


def one_line_error(reply: Reply, status: int, text: str) -> None:
    code, headers, body = reply
    assert code == status, reply
    assert body.startswith(b"error: ") and body.endswith(b"\n") and body.count(b"\n") == 1, body
    assert text in body.decode(), body
    assert headers["connection"] == "close" and headers["content-type"].startswith("text/plain")


# --- routes ----------------------------------------------------------------------------------------


async def test_the_page_and_its_files_are_served_with_a_strict_policy(web: WebServer) -> None:
    status, headers, body = await get(web, "/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert b'<script src="/static/app.js" defer></script>' in body and b"no report yet" in body
    assert "script-src 'self'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY"
    for name, content_type in STATIC_FILES.items():
        status, headers, body = await get(web, f"/static/{name}")
        assert (status, headers["content-type"]) == (200, content_type) and body
        etag = headers["etag"]
        status, _, body = await get(web, f"/static/{name}", headers={"If-None-Match": etag})
        assert (status, body) == (304, b"")
    status, headers, body = await get(web, "/", method="HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 1000


async def test_status_json_has_the_engine_the_router_and_the_doctor_hook(
    engine: NatEngine, serve: Callable[..., Any]
) -> None:
    web = await serve()
    status, headers, body = await get(web, "/api/status")
    assert status == 200 and headers["content-type"] == "application/json" and headers["cache-control"] == "no-store"
    data = json.loads(body)
    assert data["schema"] == 1 and abs(data["now"] - time.time()) < 60
    (mapping,) = data["engine"]["mappings"]
    assert (mapping["port"], mapping["proto"], mapping["state"], mapping["owner"]) == (5060, "udp", "active", "config")
    assert data["engine"]["external_ip"] == "203.0.113.1" and data["router"]["selected"] == "pcp"
    assert (data["profiles"], data["calls"], data["registrations"]) == ([], [], [])
    assert data["doctor"] is None and data["web"] == {"event_streams": 0, "token_required": False}
    report = {"verdict": "ok", "lines": ["gateway answers"]}
    with_report = await serve(Sources(engine, doctor_report=lambda: report))
    assert json.loads((await get(with_report, "/api/status"))[2])["doctor"] == report


async def test_unknown_paths_and_methods_get_one_line_errors(web: WebServer) -> None:
    one_line_error(await get(web, "/nope"), 404, "nothing at /nope")
    one_line_error(await get(web, "/static/../../etc/passwd"), 404, "nothing at")
    reply = await get(web, "/api/status", method="POST")
    one_line_error(reply, 405, "method POST is not served here")
    assert reply[1]["allow"] == "GET, HEAD"
    assert web.counters["web-bad-requests"] == 1  # the 405; a 404 is no refusal


async def test_keep_alive_and_pipelined_requests_are_answered_in_order(web: WebServer) -> None:
    keep = request_bytes("/api/status").replace(b"Connection: close", b"Connection: keep-alive")
    data = await exchange(web, keep + keep + request_bytes("/static/style.css"))
    assert data.count(b"HTTP/1.1 200 OK") == 3 and data.index(b"application/json") < data.index(b"text/css")


async def test_a_client_that_half_closes_after_its_request_still_gets_the_answer(web: WebServer) -> None:
    reader, writer = await asyncio.open_connection(*address(web))
    writer.write(b"GET /api/status HTTP/1.0\r\n\r\n")
    writer.write_eof()
    status, _, body = parse(await asyncio.wait_for(reader.read(), 5))
    assert status == 200 and json.loads(body)["schema"] == 1
    writer.close()


@pytest.mark.parametrize(
    ("host", "allowed"),
    [("127.0.0.1:80", True), ("localhost:8080", True), ("[::1]:80", True), ("192.168.1.2", True),
     ("evil.example", False), ("evil.example:8080", False), ("127.0.0.1.nip.io", False)],
)  # fmt: skip
async def test_without_a_token_the_host_must_be_an_address_or_localhost(
    web: WebServer, host: str, allowed: bool
) -> None:
    raw = f"GET /api/status HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    reply = parse(await exchange(web, raw))
    if allowed:
        assert reply[0] == 200
    else:
        one_line_error(reply, 403, "DNS rebinding guard")


async def test_a_token_guards_every_route_and_a_browser_logs_in_once(serve: Callable[..., Any]) -> None:
    web = await serve(token=TOKEN)
    for path in ("/", "/api/status", "/metrics", "/api/events", "/static/app.js"):
        reply = await get(web, path)
        one_line_error(reply, 401, "the token is needed")
        assert reply[1]["www-authenticate"] == 'Bearer realm="autonat"'
    one_line_error(await get(web, "/api/status", headers={"Authorization": "Bearer wrong"}), 401, "token")
    assert (await get(web, "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}))[0] == 200
    one_line_error(await get(web, "/?token=wrong"), 401, "wrong token")
    status, headers, _ = await get(web, f"/?token={TOKEN}")
    assert status == 303 and headers["location"] == "/"
    assert headers["set-cookie"] == f"autonat_token={TOKEN}; Path=/; HttpOnly; SameSite=Strict"
    cookie = {"Cookie": f"other=1; autonat_token={TOKEN}", "Host": "pbx.lan"}  # any Host with a token
    assert (await get(web, "/api/status", headers=cookie))[0] == 200
    assert web.counters["web-auth"] == 7


# --- caps ------------------------------------------------------------------------------------------


async def test_a_full_listener_evicts_the_idlest_connection_then_refuses(serve: Callable[..., Any]) -> None:
    web = await serve(max_connections=3)
    idle = [await asyncio.open_connection(*address(web)) for _ in range(3)]
    await until(lambda: web.connections == 3)
    assert (await get(web, "/api/status"))[0] == 200  # the oldest idle one made room
    assert await asyncio.wait_for(idle[0][0].read(), 5) == b""  # closed without a word: it asked nothing
    assert web.counters["web-evictions"] == 1
    for _, writer in idle:
        writer.close()
    await until(lambda: web.connections == 0)
    streams = [await asyncio.open_connection(*address(web)) for _ in range(3)]
    for reader, writer in streams:
        writer.write(request_bytes("/api/events"))
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 OK")
    await until(lambda: web.streams == 3)
    one_line_error(await get(web, "/"), 503, "too many connections to the status page")
    assert web.counters["web-connections"] == 1
    for _, writer in streams:
        writer.close()


async def test_event_streams_have_their_own_cap(web: WebServer) -> None:
    streams = [await asyncio.open_connection(*address(web)) for _ in range(MAX_STREAMS)]
    for reader, writer in streams:
        writer.write(request_bytes("/api/events"))
        await reader.readuntil(b"\r\n\r\n")
    one_line_error(await get(web, "/api/events"), 503, f"too many event streams ({MAX_STREAMS})")
    assert web.counters["web-event-streams"] == 1 and web.streams == MAX_STREAMS
    assert web.counters["web-bad-requests"] == 0  # counted once, under its own cap
    assert (await get(web, "/api/status"))[0] == 200  # the other routes still answer
    for _, writer in streams:
        writer.close()
    await until(lambda: web.streams == 0)


async def test_a_request_not_complete_in_time_is_closed(serve: Callable[..., Any]) -> None:
    web = await serve(idle_timeout=0.2)
    reader, writer = await asyncio.open_connection(*address(web))
    writer.write(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Drip: a")  # a drip never resets the clock
    await asyncio.sleep(0.1)
    writer.write(b"b")
    one_line_error(parse(await asyncio.wait_for(reader.read(), 5)), 408, "no complete request in time")
    assert web.counters["web-idle-timeout"] == 1
    silent_reader, silent = await asyncio.open_connection(*address(web))
    assert await asyncio.wait_for(silent_reader.read(), 5) == b""  # nothing asked, nothing said, not counted
    assert web.counters["web-idle-timeout"] == 1 and web.connections == 0
    writer.close()
    silent.close()


async def test_oversized_and_malformed_requests_get_one_line_and_are_counted(serve: Callable[..., Any]) -> None:
    web = await serve(max_request_size=1024)
    big = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n"
    one_line_error(parse(await exchange(web, big)), 431, "request head larger than 1024 bytes")
    one_line_error(parse(await exchange(web, b"\x00\x01\x02\r\n\r\n")), 400, "malformed request")
    one_line_error(parse(await exchange(web, b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")), 413, "no body")
    assert (web.counters["web-request-size"], web.counters["web-bad-requests"]) == (2, 1)
    assert (await get(web, "/api/status"))[0] == 200


# --- event streams ---------------------------------------------------------------------------------


async def read_frame(reader: asyncio.StreamReader) -> dict[str, str]:
    """One server-sent event block: its fields (a comment-only block is returned as {"comment": ...})."""
    block = (await asyncio.wait_for(reader.readuntil(b"\n\n"), 5)).decode()
    fields: dict[str, str] = {}
    for line in block.strip("\n").split("\n"):
        name, _, value = line.partition(":")
        fields[name or "comment"] = value.removeprefix(" ")
    return fields


_WRITERS: list[asyncio.StreamWriter] = []  # a writer collected by the GC closes its connection


async def open_stream(web: WebServer, path: str = "/api/events", **headers: str) -> asyncio.StreamReader:
    reader, writer = await asyncio.open_connection(*address(web))
    _WRITERS.append(writer)
    writer.write(request_bytes(path, headers=headers))
    status, head, _ = parse(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5))
    assert status == 200 and head["content-type"] == "text/event-stream; charset=utf-8"
    assert "content-length" not in head and head["cache-control"] == "no-store"
    assert await read_frame(reader) == {"retry": "2000"}
    return reader


async def test_events_stream_live_and_a_new_page_gets_the_recent_ones_first(engine: NatEngine, web: WebServer) -> None:
    first = await open_stream(web)
    assert await read_frame(first) == {"event": "live", "data": "{}"}  # nothing to replay yet
    engine.events.publish(EventKind.EXTERNAL_ADDRESS_CHANGE, old="203.0.113.1", new="203.0.113.7")
    frame = await read_frame(first)
    assert re.fullmatch(r"[0-9a-f]{8}\.1", frame["id"]), frame
    assert json.loads(frame["data"])["new"] == "203.0.113.7"
    second = await open_stream(web)
    assert json.loads((await read_frame(second))["data"])["event"] == "external-address-change"  # replayed
    assert (await read_frame(second))["event"] == "live"
    resumed = await open_stream(web, **{"Last-Event-ID": frame["id"]})  # a reconnect misses nothing, repeats nothing
    assert (await read_frame(resumed))["event"] == "live"
    engine.events.publish(EventKind.ROUTER_REBOOT, reason="epoch went back", gateway="192.168.77.1")
    for reader in (first, second, resumed):
        assert json.loads((await read_frame(reader))["data"])["event"] == "router-reboot"
    status = json.loads((await get(web, "/api/status"))[2])
    assert status["web"]["event_streams"] == 3


async def test_a_stream_ends_when_its_time_is_up(web: WebServer) -> None:
    reader = await open_stream(web, "/api/events?seconds=1")
    started = time.monotonic()
    assert (await read_frame(reader))["event"] == "live"
    await asyncio.wait_for(reader.read(), 5)
    assert 0.8 < time.monotonic() - started < 4
    await until(lambda: web.streams == 0)


async def test_a_client_that_stops_reading_is_dropped_not_buffered(engine: NatEngine, web: WebServer) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a tiny window: the server backs up soon
    sock.connect(address(web))
    sock.sendall(request_bytes("/api/events"))
    await until(lambda: web.streams == 1)
    backlogs = []
    payload = "x" * 8000
    try:
        for _ in range(4000):
            engine.events.publish(EventKind.DOUBLE_NAT, external_ip="203.0.113.1", reason=payload)
            await asyncio.sleep(0)
            stream = next(iter(web._streams), None)
            if stream is None:
                break
            backlogs.append(len(stream.backlog))
        assert web.streams == 0, "the client that never reads is still being buffered for"
        assert web.counters["web-slow-client"] == 1
        assert max(backlogs) <= STREAM_BACKLOG
    finally:
        sock.close()


# --- metrics ---------------------------------------------------------------------------------------


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one series in a Prometheus text exposition (None: not there)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        base, _, label_text = series.partition("{")
        if base == name and ",".join(sorted(label_text.rstrip("}").split(","))) == wanted:
            return float(value)
    return None


async def scrape(web: WebServer, accept: str = "*/*") -> tuple[str, str]:
    status, headers, body = await get(web, "/metrics", headers={"Accept": accept})
    assert status == 200
    return body.decode(), headers["content-type"]


async def test_metrics_show_mappings_events_and_caps(engine: NatEngine, web: WebServer) -> None:
    engine.events.publish(EventKind.EXTERNAL_ADDRESS_CHANGE, old="203.0.113.1", new="203.0.113.7")
    engine.events.publish(EventKind.ROUTER_REBOOT, reason="epoch went back", gateway="192.168.77.1")
    engine.events.publish(EventKind.NAT_RENEW, port=5060, proto="udp", protocol="pcp", elapsed=0.004)
    await asyncio.sleep(0.05)
    await get(web, "/nope", method="DELETE")
    text, content_type = await scrape(web)
    assert content_type.startswith("text/plain; version=")  # 0.0.4, or 1.0.0 from prometheus-client 0.22 on
    assert sample(text, "autonat_mappings", protocol="pcp", state="active") == 1
    assert sample(text, "autonat_mappings", protocol="pcp", state="failed") == 0
    assert sample(text, "autonat_nat_state", state="ready") == 1
    assert sample(text, "autonat_external_address_changes_total") == 1
    assert sample(text, "autonat_router_reboots_total") == 1
    assert sample(text, "autonat_mapping_renewals_total", protocol="pcp") == 1
    assert sample(text, "autonat_router_request_duration_seconds_count", protocol="pcp", operation="renew") == 1
    assert sample(text, "autonat_caps_hit_total", cap="web-bad-requests") == 1
    assert sample(text, "autonat_caps_hit_total", cap="control-connections") == 0
    assert sample(text, "autonat_web_event_streams") == 0
    assert (sample(text, "autonat_process_resident_memory_bytes") or 0) > 1e6
    assert all(line.startswith(("autonat_", "# HELP autonat_", "# TYPE autonat_")) for line in text.splitlines())
    openmetrics, content_type = await scrape(web, "application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text") and openmetrics.endswith("# EOF\n")


async def test_control_refusals_are_caps_and_token_failures(engine: NatEngine, serve: Callable[..., Any]) -> None:
    refusals = {
        "unix connections refused (all 64 busy)": 2,
        "tcp unauthenticated connections evicted": 3,
        "unix connections timed out": 4,
        "tcp bad or missing tokens": 5,
        "unix malformed requests": 6,
        "tcp lines too long": 7,
        "unix replies not read": 8,
        "unix something new": 9,
    }
    web = await serve(Sources(engine, control_refusals=lambda: refusals))
    text, _ = await scrape(web)
    assert sample(text, "autonat_caps_hit_total", cap="control-connections") == 2
    assert sample(text, "autonat_caps_hit_total", cap="control-evictions") == 3
    assert sample(text, "autonat_caps_hit_total", cap="control-idle-timeout") == 4
    assert sample(text, "autonat_caps_hit_total", cap="control-bad-requests") == 6
    assert sample(text, "autonat_caps_hit_total", cap="control-request-size") == 7
    assert sample(text, "autonat_caps_hit_total", cap="control-slow-client") == 8
    assert sample(text, "autonat_caps_hit_total", cap="control-other") == 9
    assert sample(text, "autonat_control_auth_failures_total") == 5


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: install Debian's prometheus package (./scripts/install.sh)")
    return path


async def test_promtool_finds_nothing_wrong_with_a_scrape(engine: NatEngine, web: WebServer) -> None:
    engine.events.publish(EventKind.NAT_ERROR, port=80, proto="tcp", protocol=None, last_error="no answer within 2 s")
    await asyncio.sleep(0.05)
    text, _ = await scrape(web)
    command = [promtool(), "check", "metrics"]
    checked = subprocess.run(command, input=text, capture_output=True, text=True, timeout=30, check=False)
    assert checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip(), checked


# --- failures by the router's error code ----------------------------------------------------------


@pytest.mark.parametrize("code", [402, 501, 606, 718, 725, 727, 728])
async def test_a_upnp_error_code_from_the_router_is_its_own_series(serve: Callable[..., Any], code: int) -> None:
    """The refusal as the UPnP client raises it (`router refused AddPortMapping ...: UPnP error N (Name)`),
    through the real engine: its nat-error event counts under the router's code."""
    session = UpnpSession()

    def refuse(request: MappingRequest) -> None:
        if request.internal_port == 80:
            error = igd.UpnpError(code)
            raise RouterRefused(f"router refused AddPortMapping tcp 80: {error}", protocol="upnp", code=code)

    session.upnp.before_add = refuse
    engine = new_engine(session, "upnp")
    web = await serve(Sources(engine))  # before the engine, as the daemon starts them: no event is missed
    await engine.start([Wanted(Transport.TCP, 80), Wanted(Transport.UDP, 5060)])
    try:
        assert await engine.wait_ready(2)
        await until(lambda: state_of(engine, Transport.TCP, 80) == "failed")
        await asyncio.sleep(0.05)
        text, _ = await scrape(web)
        assert sample(text, "autonat_mapping_failures_total", protocol="upnp", code=str(code)) == 1
        assert sample(text, "autonat_mappings", protocol="upnp", state="failed") == 1
        assert sample(text, "autonat_mappings", protocol="upnp", state="active") == 1
        status = json.loads((await get(web, "/api/status"))[2])
        failed = next(m for m in status["engine"]["mappings"] if m["port"] == 80)
        assert f"UPnP error {code}" in failed["last_error"]
    finally:
        await engine.stop()


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        ({"last_error": f"router refused AddPortMapping tcp 80: {igd.UpnpError(606)}"}, ("upnp", "606")),
        ({"last_error": f"router's mapping table is full ({igd.UpnpError(728)}); try again"}, ("upnp", "728")),
        ({"last_error": f"router refused: {pcp.describe_result(2)}", "protocol": None}, ("pcp", "2")),
        ({"last_error": f"router refused: {natpmp.describe_result(3)}"}, ("natpmp", "3")),
        ({"last_error": "router answered HTTP 500 for http://192.168.77.1:5000/ctl"}, ("upnp", "http-500")),
        ({"last_error": "no answer from PCP MAP within 2 s (3 tries)", "protocol": "pcp"}, ("pcp", "timeout")),
        ({"last_error": "something else", "protocol": None}, ("natpmp", "other")),  # the engine's protocol
        ({"last_error": "UPnP error 606 (x)", "error_code": 718, "error_protocol": "upnp"}, ("upnp", "718")),
    ],
)
def test_the_error_code_comes_from_the_event_or_its_error_line(
    event: dict[str, Any], expected: tuple[str, str]
) -> None:
    assert error_code(event, "natpmp") == expected


async def test_a_router_inventing_codes_gets_a_bounded_number_of_series(engine: NatEngine, web: WebServer) -> None:
    for code in range(900, 900 + MAX_CODE_LABELS + 20):
        engine.events.publish(EventKind.NAT_ERROR, port=80, proto="tcp", last_error=str(igd.UpnpError(code)))
        await asyncio.sleep(0)
    await asyncio.sleep(0.05)
    text, _ = await scrape(web)
    series = [line for line in text.splitlines() if line.startswith("autonat_mapping_failures_total{")]
    assert len(series) == MAX_CODE_LABELS + 1
    assert sample(text, "autonat_mapping_failures_total", protocol="upnp", code="other") == 20


async def test_a_port_taken_is_one_line_naming_the_listener(web: WebServer, engine: NatEngine) -> None:
    host, port = address(web)
    taken = WebServer(WebConfig(listen=(host, port)), Sources(engine))
    with pytest.raises(web_server.WebError, match=rf"cannot listen on 127.0.0.1:{port} for the status page"):
        await taken.start()


def test_the_static_files_are_package_data() -> None:
    """pyproject.toml ships web/static/*: every file the server serves is in the package."""
    static = Path(web_server.__file__).parent / "static"
    assert {path.name for path in static.iterdir()} >= set(STATIC_FILES)
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '"web/static/*"' in pyproject
