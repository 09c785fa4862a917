"""The contestants of bench/peers.py, one per process: autonat (this tree and the one before), the Python
libraries a user would pick instead, and the raw exchanges.

`python bench/_contestants.py NAME` answers one operation per line on stdin (`OP INDEX`) with the seconds
it took (or `!reason`). Each times only its own call, so the driver can interleave the contestants round
by round without its pipes in the figures. The peers run in the bench's own venv (bench/.venv), autonat
and the raw exchanges in the project's.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from _common import raw_exchange, soap_request

GATEWAY = "192.168.77.1"
LOCAL = "192.168.77.10"
ROOT_URL = f"http://{GATEWAY}:5000/rootDesc.xml"
CONTROL = (GATEWAY, 5000, "/ctl/IPConn")
SERVICE = "urn:schemas-upnp-org:service:WANIPConnection:1"
IGD = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
DISCOVERY_WINDOW = 1.0  # the peers' search window (miniupnpc's discoverdelay, the others' timeout)

Op = Callable[[int], float]


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def in_loop(loop: asyncio.AbstractEventLoop, action: Callable[[int], Awaitable[object]]) -> Op:
    """An operation run to completion in `loop`, timing only the awaited call."""

    async def measure(index: int) -> float:
        started = time.perf_counter()
        await action(index)
        return time.perf_counter() - started

    return lambda index: loop.run_until_complete(measure(index))


class Contestant:
    """Each operation returns the seconds it took; the port depends on the round index."""

    ops: dict[str, Op]


# --- autonat --------------------------------------------------------------------------------------------


class Autonat(Contestant):
    """autonat through its asyncio library (`RouterSession`), as a program already in its event loop."""

    def __init__(self, fast_loop: bool = False) -> None:
        if fast_loop:
            import uvloop

            self.loop = uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        from autonat.aio.router import RouterSession
        from autonat.mapper import MappingRequest
        from autonat.proto.types import Transport

        self.request, self.udp = MappingRequest, Transport.UDP
        self.session = self.loop.run_until_complete(RouterSession.open())
        self.loop.run_until_complete(self.session.upnp.discover())
        self.ops = {
            "discovery": self.wrap(self.discovery),
            "upnp external IP": self.wrap(lambda _: self.session.upnp.external_ip()),
            "upnp add+delete": self.wrap(self.upnp_add_delete),
            "upnp add+delete (README: delete by internal port)": self.wrap(self.upnp_add_delete_readme),
            "natpmp external IP": self.wrap(lambda _: self.session.natpmp.external_address()),
            "natpmp map+unmap": self.wrap(lambda i: self.map_unmap("natpmp", 21000 + i % 1000)),
            "pcp map+delete": self.wrap(lambda i: self.map_unmap("pcp", 31000 + i % 1000)),
        }

    def wrap(self, action: Callable[[int], Awaitable[object]]) -> Op:
        return in_loop(self.loop, action)

    async def discovery(self, _: int) -> None:
        from autonat.aio.upnp import UpnpClient
        from autonat.state import host_secret

        found = await UpnpClient(self.session.location, host_secret(), deadline=2.0).discover()
        assert found.external_ip is not None

    async def map_unmap(self, protocol: str, port: int) -> None:
        await self.session.add(self.request(self.udp, port, lifetime=3600), protocol)
        await self.session.delete(self.udp, port, protocol)

    async def upnp_add_delete(self, index: int) -> None:
        mapping = await self.session.add(self.request(self.udp, 41000 + index % 1000, lifetime=3600), "upnp")
        await self.session.upnp.delete_external(self.udp, mapping.external_port)

    async def upnp_add_delete_readme(self, index: int) -> None:
        port = 42000 + index % 1000
        await self.session.add(self.request(self.udp, port, lifetime=3600), "upnp")
        await self.session.delete(self.udp, port, "upnp")


class AutonatBlocking(Contestant):
    """autonat without an event loop, `autonat.open_router()`: PCP, NAT-PMP and (its `upnp`, a
    `BlockingUpnp`, aio/blocking_upnp.py) UPnP IGD, each on a blocking socket."""

    def __init__(self) -> None:
        import autonat

        self.request, self.udp = autonat.MappingRequest, autonat.Transport.UDP
        self.session = autonat.open_router()
        self.upnp = self.session.upnp
        self.upnp.discover()
        self.ops = {
            "natpmp external IP": lambda _: timed(self.session.external_address),
            "natpmp map+unmap": lambda i: timed(lambda: self.map_unmap("natpmp", 25000 + i % 1000)),
            "pcp map+delete": lambda i: timed(lambda: self.map_unmap("pcp", 35000 + i % 1000)),
            "upnp external IP": lambda _: timed(self.upnp.external_ip),
            "upnp add+delete": lambda i: timed(lambda: self.upnp_add_delete(47000 + i % 1000)),
            "upnp add+delete (README: delete by internal port)": lambda i: timed(
                lambda: self.upnp_add_delete_readme(48000 + i % 1000)
            ),
        }

    def map_unmap(self, protocol: Any, port: int) -> None:
        self.session.add(self.request(self.udp, port, lifetime=3600), protocol)
        self.session.delete(self.udp, port, protocol)

    def upnp_add_delete(self, port: int) -> None:
        self.upnp.remove(self.upnp.add(self.request(self.udp, port, lifetime=3600)))

    def upnp_add_delete_readme(self, port: int) -> None:
        self.upnp.add(self.request(self.udp, port, lifetime=3600))
        self.upnp.delete(self.udp, port)  # a mapping it made: one DeletePortMapping


# --- the peers ------------------------------------------------------------------------------------------


class Miniupnpc(Contestant):
    """miniupnpc's Python binding (the C library upnpc is built on), blocking."""

    def __init__(self) -> None:
        import miniupnpc

        self.module = miniupnpc
        self.upnp = self.discover()
        self.ops = {
            "discovery": lambda _: timed(self.discover),
            "upnp external IP": lambda _: timed(self.upnp.externalipaddress),
            "upnp add+delete": lambda i: timed(lambda: self.add_delete(43000 + i % 1000)),
        }

    def discover(self) -> Any:
        upnp = self.module.UPnP()
        upnp.discoverdelay = int(DISCOVERY_WINDOW * 1000)
        upnp.discover()
        upnp.selectigd()
        assert upnp.externalipaddress()
        return upnp

    def add_delete(self, port: int) -> None:
        assert self.upnp.addportmapping(port, "UDP", LOCAL, port, "miniupnpc", "", 3600)
        assert self.upnp.deleteportmapping(port, "UDP")


class NatPmp(Contestant):
    """The `nat-pmp` package, blocking; with the gateway given and with its own gateway lookup."""

    def __init__(self) -> None:
        import natpmp

        self.natpmp = natpmp
        self.ops = {
            "natpmp external IP": lambda _: timed(lambda: natpmp.get_public_address(gateway_ip=GATEWAY)),
            "natpmp external IP (gateway looked up)": lambda _: timed(natpmp.get_public_address),
            "natpmp map+unmap": lambda i: timed(lambda: self.map_unmap(22000 + i % 1000)),
        }

    def map_unmap(self, port: int) -> None:
        self.natpmp.map_udp_port(port, port, 3600, gateway_ip=GATEWAY)
        self.natpmp.map_udp_port(0, port, 0, gateway_ip=GATEWAY)


class AsyncUpnpClient(Contestant):
    """async-upnp-client (Home Assistant's), with its aiohttp requester."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.igd = self.loop.run_until_complete(self.discover())
        self.ops = {
            "discovery": self.wrap(lambda _: self.discover()),
            "upnp external IP": self.wrap(lambda _: self.igd.async_get_external_ip_address()),
            "upnp add+delete": self.wrap(lambda i: self.add_delete(44000 + i % 1000)),
        }

    def wrap(self, action: Callable[[int], Awaitable[object]]) -> Op:
        return in_loop(self.loop, action)

    async def discover(self) -> Any:
        from async_upnp_client.aiohttp import AiohttpRequester
        from async_upnp_client.client_factory import UpnpFactory
        from async_upnp_client.profiles.igd import IgdDevice
        from async_upnp_client.search import async_search

        locations: list[str] = []

        async def found(headers: Any) -> None:
            locations.append(headers["location"])

        await async_search(found, timeout=int(DISCOVERY_WINDOW), search_target=IGD, source=(LOCAL, 0))
        device = await UpnpFactory(AiohttpRequester(), non_strict=True).async_create_device(locations[0])
        igd = IgdDevice(device, None)
        assert await igd.async_get_external_ip_address()
        return igd

    async def add_delete(self, port: int) -> None:
        from datetime import timedelta
        from ipaddress import IPv4Address

        anywhere = IPv4Address("0.0.0.0")  # noqa: S104 (NewRemoteHost: any remote host)
        lease = timedelta(seconds=3600)
        await self.igd.async_add_port_mapping(anywhere, port, "UDP", port, IPv4Address(LOCAL), True, "aup", lease)
        await self.igd.async_delete_port_mapping(anywhere, port, "UDP")


class Upnpclient(Contestant):
    """upnpclient (requests + lxml), blocking."""

    def __init__(self) -> None:
        import upnpclient

        self.module = upnpclient
        self.service = self.discover()
        self.ops = {
            "discovery": lambda _: timed(self.discover),
            "upnp external IP": lambda _: timed(self.service.GetExternalIPAddress),
            "upnp add+delete": lambda i: timed(lambda: self.add_delete(45000 + i % 1000)),
        }

    def discover(self) -> Any:
        [device] = [d for d in self.module.discover(timeout=int(DISCOVERY_WINDOW)) if "rootDesc" in d.location]
        service = device.WANIPConn1
        assert service.GetExternalIPAddress()["NewExternalIPAddress"]
        return service

    def add_delete(self, port: int) -> None:
        self.service.AddPortMapping(
            NewRemoteHost="",
            NewExternalPort=port,
            NewProtocol="UDP",
            NewInternalPort=port,
            NewInternalClient=LOCAL,
            NewEnabled="1",
            NewPortMappingDescription="upnpclient",
            NewLeaseDuration=3600,
        )
        self.service.DeletePortMapping(NewRemoteHost="", NewExternalPort=port, NewProtocol="UDP")


# --- the raw exchanges ----------------------------------------------------------------------------------


class RawRequests(Contestant):
    """The raw exchanges' requests, the same bytes for the blocking and the asyncio floor."""

    client = b"\0" * 10 + b"\xff\xff" + socket.inet_aton(LOCAL)  # PCP's client address, IPv4-mapped (§5)
    external_ip = soap_request(SERVICE, "GetExternalIPAddress", "", CONTROL)  # prebuilt: it never changes

    @staticmethod
    def natpmp_requests(port: int) -> tuple[bytes, bytes]:
        """RFC 6886 §3.3: map `port` for an hour, then delete it."""
        return struct.pack("!BBHHHI", 0, 1, 0, port, port, 3600), struct.pack("!BBHHHI", 0, 1, 0, port, 0, 0)

    def pcp_requests(self, index: int, port: int) -> tuple[bytes, bytes]:
        """RFC 6887 §11.1: MAP `port` for an hour, then delete it (lifetime 0, the same nonce)."""
        nonce = index.to_bytes(12, "big")
        body = nonce + struct.pack("!B3xHH", 17, port, port) + b"\0" * 10 + b"\xff\xff" + b"\0" * 4
        return (
            struct.pack("!BBHI", 2, 1, 0, 3600) + self.client + body,
            struct.pack("!BBHI", 2, 1, 0, 0) + self.client + body,
        )

    @staticmethod
    def soap_requests(port: int) -> tuple[bytes, bytes]:
        """AddPortMapping of `port` for an hour, then DeletePortMapping."""
        common = (
            f"<NewRemoteHost></NewRemoteHost><NewExternalPort>{port}</NewExternalPort><NewProtocol>UDP</NewProtocol>"
        )
        add = soap_request(
            SERVICE,
            "AddPortMapping",
            f"{common}<NewInternalPort>{port}</NewInternalPort><NewInternalClient>{LOCAL}</NewInternalClient>"
            "<NewEnabled>1</NewEnabled><NewPortMappingDescription>raw</NewPortMappingDescription>"
            "<NewLeaseDuration>3600</NewLeaseDuration>",
            CONTROL,
        )
        return add, soap_request(SERVICE, "DeletePortMapping", common, CONTROL)


class Raw(RawRequests):
    """Prebuilt bytes on one blocking socket, no validation beyond the length: the floor."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOCAL, 0))
        self.sock.settimeout(2)
        self.sock.connect((GATEWAY, 5351))
        self.ops = {
            "natpmp external IP": lambda _: timed(lambda: self.call(b"\0\0", 12)),
            "natpmp map+unmap": lambda i: timed(lambda: self.natpmp_map_unmap(23000 + i % 1000)),
            "pcp map+delete": lambda i: timed(lambda: self.pcp_map_delete(i, 33000 + i % 1000)),
            "upnp external IP": lambda _: timed(lambda: raw_exchange(CONTROL[:2], self.external_ip)),
            "upnp add+delete": lambda i: timed(lambda: self.soap_add_delete(46000 + i % 1000)),
        }

    def call(self, request: bytes, size: int) -> None:
        self.sock.send(request)
        assert len(self.sock.recv(1100)) == size

    def natpmp_map_unmap(self, port: int) -> None:
        for request in self.natpmp_requests(port):
            self.call(request, 16)

    def pcp_map_delete(self, index: int, port: int) -> None:
        for request in self.pcp_requests(index, port):
            self.call(request, 60)

    def soap_add_delete(self, port: int) -> None:
        for request in self.soap_requests(port):
            raw_exchange(CONTROL[:2], request)


class _Answer(asyncio.DatagramProtocol):
    """The raw asyncio client's datagram endpoint: the next datagram completes the waiting future."""

    def __init__(self) -> None:
        self.waiting: asyncio.Future[bytes] | None = None

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.waiting is not None and not self.waiting.done():
            self.waiting.set_result(data)


class RawAsyncio(RawRequests):
    """The same prebuilt bytes through an event loop: the floor of a program already in asyncio (a
    connected datagram endpoint and a future per request with its 2 s timer; the loop's sock_* calls for
    HTTP, read until EOF). What it costs over `Raw` is the event loop's, which autonat's asyncio session
    pays too."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.endpoint, self.answers = self.loop.run_until_complete(
            self.loop.create_datagram_endpoint(_Answer, local_addr=(LOCAL, 0), remote_addr=(GATEWAY, 5351))
        )
        self.ops = {
            "natpmp external IP": self.wrap(lambda _: self.exchange(b"\0\0", 12)),
            "natpmp map+unmap": self.wrap(lambda i: self.natpmp_map_unmap(24000 + i % 1000)),
            "pcp map+delete": self.wrap(lambda i: self.pcp_map_delete(i, 34000 + i % 1000)),
            "upnp external IP": self.wrap(lambda _: self.http(self.external_ip)),
            "upnp add+delete": self.wrap(lambda i: self.soap_add_delete(49000 + i % 1000)),
        }

    def wrap(self, action: Callable[[int], Awaitable[object]]) -> Op:
        return in_loop(self.loop, action)

    async def exchange(self, request: bytes, size: int) -> None:
        waiting = self.answers.waiting = self.loop.create_future()
        timer = self.loop.call_later(2, waiting.cancel)
        self.endpoint.sendto(request)
        try:
            assert len(await waiting) == size
        finally:
            timer.cancel()

    async def natpmp_map_unmap(self, port: int) -> None:
        for request in self.natpmp_requests(port):
            await self.exchange(request, 16)

    async def pcp_map_delete(self, index: int, port: int) -> None:
        for request in self.pcp_requests(index, port):
            await self.exchange(request, 60)

    async def http(self, request: bytes) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await self.loop.sock_connect(sock, CONTROL[:2])
            await self.loop.sock_sendall(sock, request)
            chunks = []
            while chunk := await self.loop.sock_recv(sock, 65536):
                chunks.append(chunk)
        finally:
            sock.close()
        assert b"".join(chunks).startswith(b"HTTP/1.1 200")

    async def soap_add_delete(self, port: int) -> None:
        for request in self.soap_requests(port):
            await self.http(request)


CONTESTANTS: dict[str, Callable[[], Contestant]] = {
    "autonat": Autonat,
    "autonat+uvloop": lambda: Autonat(fast_loop=True),
    "autonat blocking": AutonatBlocking,
    "miniupnpc": Miniupnpc,
    "nat-pmp": NatPmp,
    "async-upnp-client": AsyncUpnpClient,
    "upnpclient": Upnpclient,
    "raw": Raw,
    "raw asyncio": RawAsyncio,
}


def serve(name: str) -> None:
    contestant = CONTESTANTS[name]()
    where = sys.modules["autonat"].__file__ if "autonat" in sys.modules else "-"
    print(f"ready {where}", flush=True)
    for line in sys.stdin:
        op, index = line.rsplit(" ", 1)
        try:
            elapsed = contestant.ops[op](int(index))
        except Exception as exc:  # a failed round is reported, not fatal
            print(f"!{type(exc).__name__}: {exc}".replace("\n", " "), flush=True)
        else:
            print(repr(elapsed), flush=True)


if __name__ == "__main__":
    serve(sys.argv[1])
