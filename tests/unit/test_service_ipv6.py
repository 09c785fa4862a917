"""A dual-stack profile end to end on loopback (127.0.0.1 and ::1), with a fake engine honouring the engine's
IPv6 API (`add(Wanted(..., family=6))`, `delete(..., family=6)`, `lookup(key, family=6)`, `relabel(...,
family=6)`, `ipv6_local_address`): the profile listens on both families, its SIP ports get pinholes at start
and lose them at stop, an IPv6 call is answered from the IPv6 socket with `IN IP6` and its RTP pair comes from
the pool of pinholes (autonat.service.pinholes), whose pinholes are closed at the BYE.

`::1` is loopback, which needs no pinhole; the profile manager here treats it as a peer outside, so the call takes
the path an internet peer's would (tests/lab/test_ipv6_sip.py proves that path against the real router).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import cast

from autonat.acl import AclSet
from autonat.addresses import IPAddress
from autonat.advertise import Addressing
from autonat.engine.bus import EventBus
from autonat.engine.engine import MappingStatus, NatEngine, Wanted
from autonat.engine.lifecycle import Key, State
from autonat.engine.settings import NatSettings
from autonat.proto.errors import DecodeError
from autonat.proto.types import Transport
from autonat.service.pinholes import FamilyEngine
from autonat.service.profiles import ProfileManager
from autonat.service.settings import ProfileSettings, ProfileSip, SipSettings
from autonat.service.sip import SipService
from autonat.service.transport import SipTransport
from autonat.sip import client as sipclient
from autonat.sip.message import Request, Response, parse_message
from autonat.sip.peer import Peer
from autonat.sip.session import describe

V4, V6 = "127.0.0.1", "::1"
RTP = bytes([0x80, 8]) + b"\x00\x01" + b"\x00" * 8 + b"payload" * 20


@dataclass
class FakeEngine:
    """NatEngine as the SIP service and the pools use it, pinholes (family 6) beside mappings (family 4)."""

    settings: NatSettings = field(default_factory=lambda: NatSettings(ipv6=True))
    external_ip: IPAddress | None = None
    ipv6_local_address: str | None = V6
    mapping_enabled: bool = True
    session: None = None
    events: EventBus = field(default_factory=EventBus)
    holes: dict[tuple[int, Key], MappingStatus] = field(default_factory=dict)
    log: list[tuple[str, int, Key]] = field(default_factory=list)

    async def add(self, wanted: Wanted, wait: float | None = None) -> MappingStatus:
        external: IPAddress = IPv6Address(V6) if wanted.family == 6 else IPv4Address("203.0.113.1")
        status = MappingStatus(wanted.transport, wanted.internal_port, wanted.owner, wanted.sticky, State.ACTIVE,
                               "pcp", external, wanted.internal_port, 7200, 7200.0, None, wanted.family)  # fmt: skip
        self.holes[(wanted.family, wanted.key)] = status
        self.log.append(("add", wanted.family, wanted.key))
        return status

    async def delete(self, transport: Transport, internal_port: int, family: int = 4) -> bool:
        self.log.append(("delete", family, (transport, internal_port)))
        return self.holes.pop((family, (transport, internal_port)), None) is not None

    def lookup(self, key: Key, family: int = 4) -> MappingStatus | None:
        return self.holes.get((family, key))

    def relabel(self, transport: Transport, internal_port: int, owner: str, family: int = 4) -> None:
        status = self.holes[(family, (transport, internal_port))]
        self.holes[(family, (transport, internal_port))] = MappingStatus(
            status.transport, status.port, owner, status.sticky, status.state, status.protocol, status.external_ip,
            status.external_port, status.lease, status.expires_in, status.last_error, status.family,
        )  # fmt: skip

    def map_budget(self) -> float:
        return 100.0

    async def wait_ready(self, timeout: float, family: int = 4) -> bool:
        return family == 4 or self.ipv6_local_address is not None

    def pinholes(self, owner: str | None = None) -> set[int]:
        return {key[1] for (family, key), s in self.holes.items() if family == 6 and owner in (None, s.owner)}


class OutsideProfiles(ProfileManager):
    """Every IPv6 peer counts as outside (see the module docstring)."""

    def pinhole(self, name: str, destination: str) -> bool:
        return self.serves_over_ipv6(name, destination)


def free_port() -> int:
    """A port free for UDP and TCP on both loopbacks (the profile binds all four)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind((V6, 0))
            port = int(probe.getsockname()[1])
        try:
            with contextlib.ExitStack() as stack:
                for family, host in ((socket.AF_INET, V4), (socket.AF_INET6, V6)):
                    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                        stack.enter_context(socket.socket(family, kind)).bind((host, port))
        except OSError:
            continue
        return port
    raise AssertionError("no free port")


class Phone(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.inbox: asyncio.Queue[tuple[Request | Response, tuple[str, int]]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        with contextlib.suppress(DecodeError):
            message = parse_message(data)
            if isinstance(message, Request | Response):
                self.inbox.put_nowait((message, addr))

    async def expect(self, what: str, timeout: float = 3.0) -> tuple[Request | Response, tuple[str, int]]:
        async with asyncio.timeout(timeout):
            while True:
                message, source = await self.inbox.get()
                if (isinstance(message, Request) and message.method == what) or (
                    isinstance(message, Response) and str(message.status) == what
                ):
                    return message, source


@contextlib.asynccontextmanager
async def running() -> AsyncIterator[tuple[SipService, FakeEngine, int]]:
    port = free_port()
    start = free_port() & ~1
    settings = SipSettings(rtp_start_port=start, rtp_end_port=start + 11, t1=0.05, t2=0.2, inactivity=2.0, pool_size=1)
    profile = ProfileSettings(
        "test",
        Addressing(sip_ip=IPv4Address(V4), sip_port=port),
        ProfileSip(auth_calls=False, ipv6=True, sip_ip6=IPv6Address(V6)),
    )
    engine = FakeEngine()
    nat = cast(NatEngine, engine)
    service = SipService(settings, OutsideProfiles((profile,), AclSet(), nat), nat, b"k" * 32)
    await service.start()
    try:
        yield service, engine, port
    finally:
        await service.stop()


def invite(phone_port: int, port: int, media_port: int) -> Request:
    sdp = (
        f"v=0\r\no=- 1 1 IN IP6 {V6}\r\ns=-\r\nc=IN IP6 {V6}\r\nt=0 0\r\n"
        f"m=audio {media_port} RTP/AVP 8 101\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
    )
    return sipclient.make_request(
        "INVITE",
        f"sip:9196@[{V6}]:{port}",
        from_uri=f"sip:caller@[{V6}]",
        from_tag=sipclient.new_tag(),
        to_uri=f"sip:9196@[{V6}]",
        call_id=sipclient.new_call_id(V6),
        cseq=1,
        via_host=V6,
        via_port=phone_port,
        transport="udp",
        contact=f"sip:caller@[{V6}]:{phone_port}",
        body=sdp.encode(),
        content_type="application/sdp",
    )


async def until(check: object, timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not callable(check) or not check():
            await asyncio.sleep(0.01)


async def test_an_ipv6_echo_call_is_answered_in_ip6_through_pinholes_closed_at_the_bye() -> None:
    loop = asyncio.get_running_loop()
    async with running() as (service, engine, port):
        # The profile's SIP ports: pinholes (family 6) for both transports; no IPv4 mapping (no ext-sip-ip).
        sip = {(6, (Transport.UDP, port)), (6, (Transport.TCP, port))}
        await until(lambda: {k for k, status in engine.holes.items() if status.owner == "sip:test"} == sip)
        assert not [key for family, key in engine.holes if family == 4]
        await until(lambda: len(engine.pinholes("rtp-pool")) == 2)  # the pool of pinholes: one pair ahead
        ready = engine.pinholes("rtp-pool")
        transport, phone = await loop.create_datagram_endpoint(Phone, local_addr=(V6, 0))
        media_got: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

        class Media(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                media_got.put_nowait((data, addr))

        media, _ = await loop.create_datagram_endpoint(Media, local_addr=(V6, 0))
        try:
            phone_port, media_port = transport.get_extra_info("sockname")[1], media.get_extra_info("sockname")[1]
            request = invite(phone_port, port, media_port)
            transport.sendto(request.serialize(), (V6, port))
            ok, source = await phone.expect("200")
            assert isinstance(ok, Response)
            assert source[:2] == (V6, port)  # answered from the IPv6 socket
            assert ok.headers.get("Contact") == f"<sip:9196@[{V6}]:{port}>"
            answer = describe(ok.body)
            assert answer is not None and answer.audio.address == IPv6Address(V6)
            assert b"c=IN IP6 ::1\r\n" in ok.body and b" IN IP6 ::1\r\n" in ok.body.split(b"o=", 1)[1]
            rtp = answer.audio.port
            assert {rtp, rtp + 1} == ready  # the pair of the pool, its pinholes now the call's
            assert all(engine.holes[(6, (Transport.UDP, p))].owner.startswith("call:") for p in (rtp, rtp + 1))
            transport.sendto(sipclient.ack_for_2xx(request, ok, branch=sipclient.new_branch()).serialize(), (V6, port))
            media.sendto(RTP, (V6, rtp))
            echoed, echo_source = await asyncio.wait_for(media_got.get(), 2)
            assert echoed[12:] == RTP[12:] and echo_source[:2] == (V6, rtp)
            bye = sipclient.make_request(
                "BYE", f"sip:9196@[{V6}]:{port}", from_uri=f"sip:caller@[{V6}]", from_tag=request.from_tag() or "",
                to_uri=f"sip:9196@[{V6}]", to_tag=ok.to_tag(), call_id=request.call_id(), cseq=2, via_host=V6,
                via_port=phone_port, transport="udp",
            )  # fmt: skip
            transport.sendto(bye.serialize(), (V6, port))
            await phone.expect("200")
            await until(lambda: not ({rtp, rtp + 1} & engine.pinholes()))  # closed at the hang-up
            assert ("delete", 6, (Transport.UDP, rtp)) in engine.log and service.calls == []
        finally:
            transport.close()
            media.close()
    assert not engine.pinholes("sip:test")  # the SIP ports' pinholes go at stop


async def test_the_ipv4_socket_still_answers_ipv4_peers() -> None:
    loop = asyncio.get_running_loop()
    async with running() as (_, _, port):
        transport, phone = await loop.create_datagram_endpoint(Phone, local_addr=(V4, 0))
        try:
            options = sipclient.make_request(
                "OPTIONS", f"sip:{V4}:{port}", from_uri=f"sip:probe@{V4}", from_tag="t", to_uri=f"sip:{V4}",
                call_id="c1", cseq=1, via_host=V4, via_port=transport.get_extra_info("sockname")[1], transport="udp",
            )  # fmt: skip
            transport.sendto(options.serialize(), (V4, port))
            answer, source = await phone.expect("200")
            assert isinstance(answer, Response) and source[:2] == (V4, port)
        finally:
            transport.close()


async def test_a_stream_to_an_ipv6_peer_leaves_from_the_profiles_ipv6_address() -> None:
    """RFC 5118 §4: the source must be the address our Via and Contact name (not a temporary one)."""
    accepted: asyncio.Queue[tuple[str, int]] = asyncio.Queue()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.put_nowait(writer.get_extra_info("peername")[:2])
        writer.close()

    server = await asyncio.start_server(on_connect, V6, 0)
    target = server.sockets[0].getsockname()[1]
    sip = SipTransport(V4, free_port(), lambda message, peer: None, host6=V6)
    await sip.start()
    try:
        peer = await sip.connect("tcp", V6, target)
        assert isinstance(peer, Peer) and peer.ip == V6
        source = await asyncio.wait_for(accepted.get(), 2)
        assert source[0] == V6
    finally:
        await sip.stop()
        server.close()
        await server.wait_closed()


async def test_the_family_engine_speaks_family_6_only() -> None:
    engine = FakeEngine()
    family = FamilyEngine(cast(NatEngine, engine))
    added = await family.add(Wanted(Transport.UDP, 16384, owner="rtp-pool"))
    assert added.family == 6 and family.lookup((Transport.UDP, 16384)) == added
    assert engine.lookup((Transport.UDP, 16384)) is None  # not an IPv4 mapping
    family.relabel(Transport.UDP, 16384, "call:x")
    assert engine.holes[(6, (Transport.UDP, 16384))].owner == "call:x"
    assert await family.delete(Transport.UDP, 16384) and not engine.holes
    assert await family.wait_ready(0.1)
    engine.ipv6_local_address = None  # IPv6 discovery not done: the pool waits, bounded
    assert not await family.wait_ready(0.3)
