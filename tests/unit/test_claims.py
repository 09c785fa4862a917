"""README claims outside the engine and the SIP call control, each with a test that fails when its product
line breaks (issue 10, Build 6). Every test here was run against a copy of the tree with that line broken.

Nothing here needs root or leaves loopback. The CLI runs as a real subprocess; where it must meet a fake
router, `CLI_ON_FAKES` patches exactly one thing each: the UPnP root-URL guard (it refuses loopback by
design, and the fake IGD lives there) and, when asked, where `RouterSession.open` finds its NAT-PMP/PCP
server (the fake router's port instead of 5351). Everything after that is the product's own code.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import itertools
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, ip_address
from pathlib import Path

import pytest

import autonat
from autonat.aio import http, upnp_core
from autonat.aio import router as router_module
from autonat.aio.channel import DatagramChannel
from autonat.aio.http import MAX_HEADER_SIZE, MAX_HEADERS, RouterHttpError
from autonat.aio.route import RouterLocation
from autonat.aio.router import RouterSession, reply_key
from autonat.aio.upnp import alternative_ports
from autonat.daemon import control
from autonat.mapper import MappingRequest
from autonat.proto import natpmp, pcp
from autonat.proto.exchange import DEFAULT_DEADLINE
from autonat.proto.types import Transport
from autonat.service import transport as sip_transport
from autonat.service.transport import SipTransport
from autonat.state import SECRET_FILE
from tests.fakes.igd_server import FakeIgd
from tests.fakes.pcp_natpmp_router import start_fake_router
from tests.helpers import LOOPBACK, ensure_open_files, free_udp_tcp_port

ROOT = Path(__file__).parents[2]
SRC = Path(autonat.__file__).parents[1]  # subprocesses run the very code this process imported
README = " ".join((ROOT / "README.md").read_text().split())  # whitespace-normalised: claims wrap lines
SECRET = bytes(range(32))  # a host secret of our choosing, so derived values can be pinned
PRIVATE_WAN = "192.168.1.1"  # what a router behind another NAT reports as its external address
SILENT_GATEWAY = "127.0.0.2"  # loopback too (127/8), where a socket of the test can be silent on 5351


@contextlib.contextmanager
def silent_udp(host: str, port: int) -> Iterator[None]:
    """A UDP socket that takes every datagram and answers none: a router that drops, not refuses."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, port))
        yield


CLI_ON_FAKES = """
import os, sys
from ipaddress import ip_address

from autonat.aio import router, upnp
from autonat.aio.ssdp import Found
from autonat.proto import ssdp


def loopback_root(self):
    # The LOCATION guard refuses loopback by design; the fake IGD of these tests lives there.
    url = self._root_url
    host_port, _, path = url.removeprefix("http://").partition("/")
    host, _, port = host_port.rpartition(":")
    location = ssdp.Location(url, ip_address(host), int(port), "/" + path)
    return Found(location, self._location.gateway, "root-url", None)


upnp.UpnpClient._given_root = loopback_root
if os.environ.get("FAKE_ROUTER_PORT"):
    from autonat.aio.channel import DatagramChannel
    from autonat.aio.route import RouterLocation

    async def open_on_fake_router(gateway=None, interface=None, deadline=2.0, root_url=None, **kwargs):
        loopback = ip_address("127.0.0.1")
        channel = await DatagramChannel.open(loopback, router.reply_key)
        return router.RouterSession(
            RouterLocation(loopback, loopback, "lo"), channel, deadline,
            server_port=int(os.environ["FAKE_ROUTER_PORT"]), root_url=root_url, **kwargs,
        )

    router.RouterSession.open = open_on_fake_router
from autonat.cli.main import main

main(sys.argv[1:])
"""


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return self.stderr.strip().splitlines()


async def cli(*args: str, state: Path, router_port: int | None = None, timeout: float = 30) -> Run:
    """The `autonat` command in a subprocess (the test's event loop keeps serving the fakes meanwhile)."""
    env = {"AUTONAT_STATE_DIR": str(state), "PATH": "/usr/bin:/bin", "HOME": str(state), "PYTHONPATH": str(SRC)}
    if router_port is not None:
        env["FAKE_ROUTER_PORT"] = str(router_port)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLI_ON_FAKES, *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode())


def run_cli(*args: str, state: Path) -> Run:
    """The unpatched command, for what needs no router."""
    done = subprocess.run(
        [sys.executable, "-m", "autonat", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={"AUTONAT_STATE_DIR": str(state), "PATH": "/usr/bin:/bin", "HOME": str(state), "PYTHONPATH": str(SRC)},
        check=False,
    )
    return Run(done.returncode, done.stdout, done.stderr)


@contextlib.asynccontextmanager
async def fake_igd(tmp_path: Path, scenario: str = "normal", external: str = "203.0.113.9") -> AsyncIterator[FakeIgd]:
    """tests/fakes/igd_server.py's IGD, served on a loopback port of this process."""
    igd = FakeIgd(scenario, LOOPBACK, str(tmp_path / f"igd-{scenario}.log"), external=external)
    server = await asyncio.start_server(igd.http, LOOPBACK, 0)
    igd.port = server.sockets[0].getsockname()[1]
    try:
        yield igd
    finally:
        server.close()
        await server.wait_closed()


def root_url(igd: FakeIgd) -> str:
    return f"http://{LOOPBACK}:{igd.port}/rootDesc.xml"


def upnp_args(igd: FakeIgd) -> list[str]:
    return ["--gateway", LOOPBACK, "--protocol", "upnp", "--root-url", root_url(igd)]


def logged(igd: FakeIgd, kind: str) -> list[str]:
    path = Path(igd.log_path)
    return [line for line in path.read_text().splitlines() if line.startswith(kind)] if path.exists() else []


def state_with_secret(tmp_path: Path, secret: bytes = SECRET) -> Path:
    """A state directory whose host secret we chose (the file `autonat.state.host_secret` reads)."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    (state / SECRET_FILE).write_bytes(secret)
    (state / SECRET_FILE).chmod(0o600)
    return state


# --- "Every hole opened or closed in the router is logged on stderr (`-q` silences it)" ------------------


async def test_every_hole_is_logged_on_stderr_and_q_silences_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    async with fake_igd(tmp_path) as igd:
        opened = await cli("map", "add", "5000", "udp", *upnp_args(igd), state=state)
        assert opened.code == 0, opened.stderr
        assert opened.lines == ["autonat: opened udp 203.0.113.9:5000 -> 127.0.0.1:5000 via upnp, lease 7200 s"]
        closed = await cli("map", "del", "5000", "udp", *upnp_args(igd), state=state)
        assert closed.code == 0, closed.stderr
        assert closed.lines == ["autonat: closed udp 127.0.0.1:5000 via upnp"]

        quiet_add = await cli("-q", "map", "add", "5000", "udp", *upnp_args(igd), state=state)
        quiet_del = await cli("-q", "map", "del", "5000", "udp", *upnp_args(igd), state=state)
    assert (quiet_add.code, quiet_add.stderr) == (0, "")
    assert quiet_add.stdout.splitlines()[0] == "203.0.113.9:5000"  # the result itself is not silenced
    assert (quiet_del.code, quiet_del.stderr) == (0, "")
    assert logged(igd, "MAPPED") == ["MAPPED UDP 5000 -> 5000 lease 7200"] * 2
    assert logged(igd, "DELETED") == ["DELETED UDP 5000"] * 2


# --- "a router that only grants permanent leases gets one only after its external address checked out,
# and the CLI says so" ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scenario", "why"),
    [
        ("only_permanent", "only supports permanent leases (UPnP error 725)"),
        ("lease_402", "rejects finite leases (UPnP error 402)"),
    ],
)
async def test_a_permanent_lease_is_refused_when_the_external_address_is_private(
    tmp_path: Path, scenario: str, why: str
) -> None:
    async with fake_igd(tmp_path, scenario, external=PRIVATE_WAN) as igd:
        result = await cli("map", "add", "5000", "udp", *upnp_args(igd), state=tmp_path / "state")
    assert result.code == 6  # NotPublic
    assert result.lines == [
        f"autonat: router {why}, and its external address {PRIVATE_WAN} is not public:"
        " refusing to leave a permanent mapping for nothing"
    ]
    # The finite request was the only one: no lease-0 (or 604800 s) retry ever reached the router.
    assert logged(igd, "ADD") == ["ADD UDP 5000 -> 5000 lease 7200"]
    assert logged(igd, "MAPPED") == []


async def test_a_permanent_lease_is_taken_after_a_public_address_and_the_cli_says_so(tmp_path: Path) -> None:
    async with fake_igd(tmp_path, "only_permanent") as igd:
        result = await cli("map", "add", "5000", "udp", *upnp_args(igd), "--json", state=tmp_path / "state")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["lifetime"] == 0
    assert any("only grants permanent UPnP leases; delete this mapping yourself" in line for line in result.lines)
    assert logged(igd, "ADD") == ["ADD UDP 5000 -> 5000 lease 7200", "ADD UDP 5000 -> 5000 lease 0"]
    assert logged(igd, "MAPPED") == ["MAPPED UDP 5000 -> 5000 lease 0"]


# --- "Conflicts move to a port sequence derived from the host secret (the same after a restart)" -------

# Computed once from SECRET and written down: a change to the derivation moves every user's ports.
PINNED_UDP_5000 = [28802, 48086, 1990, 58318]


def test_the_conflict_port_sequence_is_pinned() -> None:
    assert list(itertools.islice(alternative_ports(SECRET, Transport.UDP, 5000), 4)) == PINNED_UDP_5000
    # Per mapping and per host: another transport, port or secret walks another sequence.
    assert next(alternative_ports(SECRET, Transport.TCP, 5000)) != PINNED_UDP_5000[0]
    assert next(alternative_ports(SECRET, Transport.UDP, 5001)) != PINNED_UDP_5000[0]
    assert next(alternative_ports(bytes(32), Transport.UDP, 5000)) != PINNED_UDP_5000[0]


@pytest.mark.parametrize(("scenario", "expected"), [("conflict_501", 0), ("conflict_718_twice", 1)])
async def test_conflicts_take_the_pinned_ports_in_every_process(tmp_path: Path, scenario: str, expected: int) -> None:
    state = state_with_secret(tmp_path)
    ports = []
    for _ in range(2):  # two processes on the same state directory: a restart
        async with fake_igd(tmp_path, scenario) as igd:
            result = await cli("map", "add", "5000", "udp", *upnp_args(igd), "--json", state=state)
        assert result.code == 0, result.stderr
        ports.append(json.loads(result.stdout)["external_port"])
    assert ports == [PINNED_UDP_5000[expected]] * 2


# --- "PCP mappings can only be deleted with the nonce that created them; ... `map del` in a later process
# removes what `map add` created" -------------------------------------------------------------------------


async def test_map_del_in_a_later_process_sends_the_nonce_map_add_used(tmp_path: Path) -> None:
    fake, port = await start_fake_router()
    try:
        state = tmp_path / "state"
        added = await cli("map", "add", "5060", "udp", "--protocol", "pcp", state=state, router_port=port)
        deleted = await cli("map", "del", "5060", "udp", "--protocol", "pcp", state=state, router_port=port)
        other_host = await cli(
            "map", "del", "5060", "udp", "--protocol", "pcp", state=tmp_path / "s2", router_port=port
        )
    finally:
        assert fake.transport is not None
        fake.transport.close()
    assert (added.code, deleted.code, other_host.code) == (0, 0, 0), added.stderr + deleted.stderr
    add, delete, foreign = (pcp.parse_request(data) for data in fake.received)
    assert add.map is not None and delete.map is not None and foreign.map is not None
    assert (add.lifetime, delete.lifetime) == (7200, 0)
    assert delete.map.nonce == add.map.nonce  # derived from the persisted secret, not made up per process
    assert foreign.map.nonce != add.map.nonce  # another state directory is another host


# --- "the choice is trusted for 30 s per gateway": within one process ------------------------------------


@dataclass
class ShiftedClock:
    """`time` as aio/router.py sees it, `offset` seconds in the future (the event loop keeps real time)."""

    offset: float = 0.0
    perf_counter: Callable[[], float] = field(default=time.perf_counter)

    def monotonic(self) -> float:
        return time.monotonic() + self.offset


async def test_the_protocol_choice_is_trusted_for_30_s_within_a_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTONAT_STATE_DIR", str(tmp_path))
    monkeypatch.setattr(router_module, "_probe_cache", {})
    clock = ShiftedClock()
    monkeypatch.setattr(router_module, "time", clock)
    fake, port = await start_fake_router()
    sessions: list[RouterSession] = []

    async def add_in_a_new_session(internal_port: int) -> list[bytes]:
        location = RouterLocation(IPv4Address(LOOPBACK), IPv4Address(LOOPBACK), "lo")
        session = RouterSession(
            location, await DatagramChannel.open(IPv4Address(LOOPBACK), reply_key), 2.0, server_port=port
        )
        sessions.append(session)
        before = len(fake.received)
        mapping = await session.add(MappingRequest(Transport.UDP, internal_port, lifetime=600))
        assert mapping.protocol == "pcp"
        return fake.received[before:]

    try:
        first = await add_in_a_new_session(6000)  # no probe yet: the burst, then the MAP
        clock.offset = 29.0
        trusted = await add_in_a_new_session(6001)  # another session, 29 s later: the MAP alone
        clock.offset = 31.0
        expired = await add_in_a_new_session(6002)  # 31 s: probed again
    finally:
        for session in sessions:
            await session.aclose()
        assert fake.transport is not None
        fake.transport.close()
    assert kinds(first) == kinds(expired) == ["natpmp-address", "pcp-announce", "pcp-map"]
    assert kinds(trusted) == ["pcp-map"]


def kinds(datagrams: list[bytes]) -> list[str]:
    named = []
    for data in datagrams:
        if data[:1] == b"\x00":
            named.append(
                "natpmp-address"
                if isinstance(natpmp.parse_request(data), natpmp.ExternalAddressRequest)
                else "natpmp-map"
            )
        else:
            named.append("pcp-map" if pcp.parse_request(data).map is not None else "pcp-announce")
    return sorted(named)


# --- "no redirects, no proxies" (HTTP to the router) ----------------------------------------------------


@dataclass
class Counting:
    """A loopback HTTP server that answers every request with `reply` and counts connections."""

    reply: bytes
    connections: int = 0
    server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(self.reply)
            await writer.drain()
        writer.close()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self.handle, LOOPBACK, 0)
        return f"http://{LOOPBACK}:{self.server.sockets[0].getsockname()[1]}/rootDesc.xml"

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


@pytest.mark.parametrize("status", [300, 301, 302, 303, 307, 308])
async def test_a_redirect_is_refused_and_its_target_never_contacted(status: int) -> None:
    target = Counting(ok(b"<elsewhere/>"))
    elsewhere = await target.start()
    router = Counting(b"HTTP/1.1 %d Moved\r\nLocation: %s\r\nContent-Length: 0\r\n\r\n" % (status, elsewhere.encode()))
    url = await router.start()
    try:
        with pytest.raises(
            RouterHttpError, match=f"router redirected {re.escape(url)} elsewhere; redirects are refused"
        ):
            await http.request("GET", url, max_body=1000, deadline=2)
    finally:
        await router.stop()
        await target.stop()
    assert (router.connections, target.connections) == (1, 0)


PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "https_proxy", "HTTPS_PROXY")


async def test_proxy_settings_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = Counting(ok(b"<from-the-proxy/>"))
    proxy_url = (await proxy.start()).removesuffix("/rootDesc.xml")
    router = Counting(ok(b"<from-the-router/>"))
    url = await router.start()
    for name in PROXY_VARIABLES:
        monkeypatch.setenv(name, proxy_url)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    try:
        for method in ("GET", "POST"):  # the description and every SOAP action
            reply = await http.request(
                method, url, max_body=1000, deadline=2, content=b"x" if method == "POST" else b""
            )
            assert (reply.status, reply.body) == (200, b"<from-the-router/>")
    finally:
        await router.stop()
        await proxy.stop()
    assert (router.connections, proxy.connections) == (2, 0)


HTTP_CLIENTS = {"urllib.request", "http.client", "httpx", "requests", "aiohttp", "urllib3", "httplib2"}


def test_the_bounded_client_is_the_only_http_client() -> None:
    """A general HTTP client would bring proxies (from the environment) and redirects back with it."""
    found = []
    for path in sorted((ROOT / "src" / "autonat").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            found += [f"{path.relative_to(ROOT)}: {name}" for name in names if name in HTTP_CLIENTS]
    assert found == []


# --- the SIP service's TCP listener: at most 1,024 connections (service/transport.py) --------------------


async def test_the_sip_tcp_listener_refuses_the_1025th_connection() -> None:
    assert sip_transport.DEFAULT_MAX_CONNECTIONS == 1024
    ensure_open_files(2 * 1025 + 256)  # both ends of every connection live in this process
    sip = SipTransport(LOOPBACK, free_udp_tcp_port(), lambda message, peer: None)  # the default cap
    await sip.start()
    clients: list[asyncio.StreamWriter] = []

    async def until(condition: Callable[[], bool]) -> None:
        for _ in range(500):
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the listener did not get there within 5 s")

    try:
        for _ in range(1024):
            _, writer = await asyncio.open_connection(LOOPBACK, sip.port)
            clients.append(writer)
        await until(lambda: sip.connections == 1024)
        reader, extra = await asyncio.open_connection(LOOPBACK, sip.port)
        clients.append(extra)
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # closed at accept
        assert sip.stats.refused_connections == 1 and sip.connections == 1024
        # A place freed is a place taken again.
        clients[0].close()
        await until(lambda: sip.connections == 1023)
        _, again = await asyncio.open_connection(LOOPBACK, sip.port)
        clients.append(again)
        await until(lambda: sip.connections == 1024)
        assert sip.stats.refused_connections == 1
    finally:
        for writer in clients:
            writer.close()
        await sip.stop()


# --- `autonat acl IP LIST`: true / false, --explain names the deciding node --------------------------------


ACL_CONFIG = """
[[acl]]
name = "lan"
default = "deny"
nodes = [["allow", "192.168.1.0/24"], ["deny", "192.168.1.1/32"]]
"""


@pytest.mark.parametrize(
    ("args", "stdout"),
    [
        (["192.168.1.50", "lan"], "true\n"),
        (["192.168.1.1", "lan"], "false\n"),  # the longer prefix wins
        (["192.168.1.1", "lan", "--explain"], "false\n192.168.1.1: deny by lan (node 2: deny 192.168.1.1/32)\n"),
        (["10.0.0.1", "lan", "--explain"], "false\n10.0.0.1: deny by lan (no node matches: the list's default)\n"),
        (["127.0.0.1", "loopback.auto"], "true\n"),
        (["::ffff:127.0.0.1", "loopback.auto"], "true\n"),  # IPv4-mapped IPv6 judged as IPv4
        (["198.51.100.7", "loopback.auto"], "false\n"),
        (["127.0.0.1", "localnet.auto"], "false\n"),  # loopback is not a local network
    ],
)
def test_acl_answers_true_or_false(tmp_path: Path, args: list[str], stdout: str) -> None:
    config = tmp_path / "acl.toml"
    config.write_text(ACL_CONFIG)
    result = run_cli("acl", *args, "--config", str(config), state=tmp_path)
    assert (result.code, result.stdout, result.stderr) == (0, stdout, "")


def test_acl_localnet_auto_allows_this_host_s_own_networks(tmp_path: Path) -> None:
    # Independent of the product: iproute2's view of this host's addresses.
    listing = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, timeout=10, check=True)
    addresses = [
        info["local"]
        for interface in json.loads(listing.stdout)
        for info in interface.get("addr_info", [])
        if not ip_address(info["local"]).is_loopback and not ip_address(info["local"]).is_link_local
    ]
    for address in addresses[:4]:
        assert run_cli("acl", address, "localnet.auto", state=tmp_path).stdout == "true\n", address
    assert run_cli("acl", "198.51.100.7", "localnet.auto", state=tmp_path).stdout == "false\n"


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["1.2.3.4", "localnet.autp"], 'autonat: unknown ACL list "localnet.autp" (did you mean "localnet.auto"?)'),
        (["999.1.1.1", "loopback.auto"], 'autonat: "999.1.1.1" is not an IP address'),
    ],
)
def test_acl_mistakes_are_one_line_and_never_a_silent_no(tmp_path: Path, args: list[str], line: str) -> None:
    result = run_cli("acl", *args, state=tmp_path)
    assert (result.code, result.stdout, result.lines) == (2, "", [line])


# --- more README claims no test noticed --------------------------------------------------------------------


async def test_the_default_timeout_is_2_s(tmp_path: Path) -> None:
    """`--timeout SECONDS` (default 2: no one waits 128 s for a dead router). A socket of ours holds
    127.0.0.2:5351 and never answers (silence, not a refusal), and no --timeout is given."""
    with silent_udp(SILENT_GATEWAY, 5351):
        started = time.monotonic()
        result = await cli(
            "map", "add", "5060", "udp", "--gateway", SILENT_GATEWAY, "--protocol", "pcp", state=tmp_path
        )
        elapsed = time.monotonic() - started
    assert result.code == 4  # RouterTimeout
    [line] = result.lines
    assert line.startswith(f"autonat: no answer from PCP at {SILENT_GATEWAY}:5351 within 2 s ("), line
    assert 1.9 < elapsed < 5  # generous: the deadline itself is the claim


async def test_a_router_without_the_service_fails_at_once_not_at_the_deadline(tmp_path: Path) -> None:
    """Issue 12: an ICMP port unreachable (nothing listens on 127.0.0.1:5351) ends the request at once,
    with one line naming the protocol; silence (above) still waits for the deadline."""
    started = time.monotonic()
    result = await cli("map", "add", "5060", "udp", "--gateway", LOOPBACK, "--protocol", "pcp", state=tmp_path)
    elapsed = time.monotonic() - started
    assert result.code == 4  # RouterUnreachable is a RouterTimeout
    assert result.lines == ["autonat: PCP at 127.0.0.1:5351 is unreachable: the router answered ICMP port unreachable"]
    assert elapsed < 1.5  # the interpreter's start-up, not the 2 s deadline


def test_config_mistakes_are_one_line_each_all_at_once_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "autonat.toml"
    config.write_text('[nat]\nprotocol = "smtp"\nleese = 5\n')
    result = run_cli("run", "--config", str(config), state=tmp_path)
    assert (result.code, result.stdout) == (2, "")
    assert result.lines == [
        f'autonat: {config}: nat.protocol must be one of auto, pcp, natpmp, upnp, not "smtp"',
        f"autonat: {config}: unknown key nat.leese (did you mean nat.lease?)",
    ]


async def test_probe_json_lists_every_igd_candidate(tmp_path: Path) -> None:
    async with fake_igd(tmp_path) as igd:
        result = await cli("probe", *upnp_args(igd), "--json", state=tmp_path)
    assert result.code == 0, result.stderr
    upnp = json.loads(result.stdout)["protocols"]["upnp"]
    assert upnp["available"] is True and upnp["external_ip"] == "203.0.113.9"
    assert upnp["candidates"] == [
        {
            "location": root_url(igd),
            "responder": LOOPBACK,
            "outcome": "usable",
            "reason": "urn:schemas-upnp-org:service:WANIPConnection:1, Connected, external address 203.0.113.9",
        }
    ]


FIGURES: list[tuple[str, object, object]] = [
    # (README text, the value in the code, the value the text states)
    ("`--timeout SECONDS` (default 2:", DEFAULT_DEADLINE, 2.0),
    ("at most 4 LOCATIONs per host", upnp_core.MAX_LOCATIONS_PER_RESPONDER, 4),
    ("and 16 in all are looked at", upnp_core.MAX_CANDIDATES, 16),
    ("reply heads are capped at 16 KiB", MAX_HEADER_SIZE, 16 * 1024),
    ("and 100 header lines", MAX_HEADERS, 100),
    ("a connection with no complete request for 10 s is closed", control.REQUEST_TIMEOUT, 10.0),
]


@pytest.mark.parametrize(("text", "actual", "stated"), FIGURES, ids=[figure[0] for figure in FIGURES])
def test_readme_figures_match_the_code(text: str, actual: object, stated: object) -> None:
    """Figures the behaviour tests read from the code's own constants: a change on either side alone fails."""
    assert text in README
    assert actual == stated
