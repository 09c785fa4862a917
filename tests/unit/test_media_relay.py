"""The RTP relay on loopback: forwarding both ways, latching, RTCP, drops, lifetime, port hygiene, re-latch rules."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import socket
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from ipaddress import IPv4Address, IPv6Address

import pytest

from autonat.service.media import LegStats, RtpRelay

LOOPBACK = IPv4Address("127.0.0.1")
HOST = "127.0.0.1"
Addr = tuple[str, int]


def rtp(tag: int) -> bytes:
    return bytes([0x80, 0x00, 0x00, tag & 0xFF]) + b"\x00" * 8 + b"payload"


def rtcp(tag: int) -> bytes:
    return bytes([0x81, 200, 0x00, 0x01]) + bytes([0, 0, 0, tag & 0xFF])


def free_pairs(count: int) -> list[int]:
    """`count` even ports whose port and port + 1 were all free together on 127.0.0.1."""
    held: list[socket.socket] = []
    found: list[int] = []
    try:
        for _ in range(200):
            if len(found) == count:
                return found
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.bind((HOST, 0))
                port = probe.getsockname()[1] & ~1
            pair = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
            try:
                pair[0].bind((HOST, port))
                pair[1].bind((HOST, port + 1))
            except OSError:
                for sock in pair:
                    sock.close()
                continue
            held += pair
            found.append(port)
    finally:
        for sock in held:
            sock.close()
    raise AssertionError("no free port pairs")


def bindable(*ports: int) -> bool:
    try:
        with contextlib.ExitStack() as stack:
            for port in ports:
                sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                sock.bind((HOST, port))
    except OSError:
        return False
    return True


class Peer:
    """A loopback UDP endpoint standing in for a phone (or an attacker)."""

    def __init__(self, port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, port))
        self.sock.setblocking(False)
        self.addr: Addr = self.sock.getsockname()

    def send(self, data: bytes, port: int) -> None:
        self.sock.sendto(data, (HOST, port))

    async def recv(self, timeout: float = 1.0) -> tuple[bytes, Addr]:
        data, addr = await asyncio.wait_for(asyncio.get_running_loop().sock_recvfrom(self.sock, 4096), timeout)
        return data, addr

    async def nothing(self, wait: float = 0.05) -> None:
        await asyncio.sleep(wait)
        with pytest.raises(BlockingIOError):
            self.sock.recvfrom(4096)

    async def drain(self, wait: float = 0.1) -> list[bytes]:
        await asyncio.sleep(wait)
        got = []
        with contextlib.suppress(BlockingIOError):
            while True:
                got.append(self.sock.recvfrom(4096)[0])
        return got

    def close(self) -> None:
        self.sock.close()


@contextlib.asynccontextmanager
async def running(**kwargs: float | bool) -> AsyncIterator[RtpRelay]:
    port_a, port_b = free_pairs(2)
    relay = RtpRelay(LOOPBACK, port_a, LOOPBACK, port_b, **kwargs)  # type: ignore[arg-type]  # kwargs are fields
    await relay.start()
    try:
        yield relay
    finally:
        await relay.close()


@contextlib.contextmanager
def peers(count: int) -> Iterator[list[Peer]]:
    made = [Peer() for _ in range(count)]
    try:
        yield made
    finally:
        for peer in made:
            peer.close()


async def until(condition: Callable[[], bool], timeout: float = 1.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def connect(relay: RtpRelay, alice: Peer, bob: Peer) -> None:
    """Latch both legs without a race: alice first (her packet is dropped, leg B has no peer), then bob."""
    alice.send(rtp(0), relay.port_a)
    await until(lambda: relay.a.peer is not None)
    bob.send(rtp(0), relay.port_b)
    assert (await alice.recv())[0] == rtp(0)


def counts(leg: LegStats) -> tuple[int, int, int]:
    return (leg.received, leg.sent, leg.dropped)


async def test_relays_both_ways_and_latches_to_sources_not_sdp_addresses() -> None:
    async with running(inactivity=5) as relay:
        with peers(4) as (alice, bob, sdp_a, sdp_b):
            relay.set_peer("a", sdp_a.addr)  # e.g. the private address in alice's SDP
            relay.set_peer("b", sdp_b.addr)
            # Before bob sends, his SDP address is all there is: alice's packet goes there, from leg B's socket.
            alice.send(rtp(1), relay.port_a)
            assert await sdp_b.recv() == (rtp(1), (HOST, relay.port_b))
            assert relay.a.peer == alice.addr
            # Bob's first packet latches leg B, and goes to alice's source, not to her SDP address.
            bob.send(rtp(2), relay.port_b)
            assert await alice.recv() == (rtp(2), (HOST, relay.port_a))
            assert relay.b.peer == bob.addr
            for tag in range(10, 20):
                alice.send(rtp(tag), relay.port_a)
                bob.send(rtp(tag + 100), relay.port_b)
            assert [(await bob.recv())[0] for _ in range(10)] == [rtp(tag) for tag in range(10, 20)]
            assert [(await alice.recv())[0] for _ in range(10)] == [rtp(tag + 100) for tag in range(10, 20)]
            await sdp_a.nothing()
            await sdp_b.nothing()
    assert counts(relay.a) == (11, 11, 0)
    assert counts(relay.b) == (11, 11, 0)
    assert relay.reason == "closed"


async def test_rtcp_goes_to_rtp_peer_plus_one_until_latched_separately() -> None:
    (alice_port, bob_port) = free_pairs(2)
    alice, alice_rtcp, bob, bob_rtcp = Peer(alice_port), Peer(alice_port + 1), Peer(bob_port), Peer(bob_port + 1)
    bob_rtcp_elsewhere = Peer()
    try:
        async with running(inactivity=5) as relay:
            await connect(relay, alice, bob)
            # RTCP follows the latched RTP sources' port + 1, sent from the relay's RTCP sockets.
            alice_rtcp.send(rtcp(3), relay.port_a + 1)
            assert await bob_rtcp.recv() == (rtcp(3), (HOST, relay.port_b + 1))
            # Bob's RTCP comes from elsewhere (its own NAT mapping): RTCP latches on its own, RTP is unaffected.
            bob_rtcp_elsewhere.send(rtcp(4), relay.port_b + 1)
            assert await alice_rtcp.recv() == (rtcp(4), (HOST, relay.port_a + 1))
            alice_rtcp.send(rtcp(5), relay.port_a + 1)
            assert (await bob_rtcp_elsewhere.recv())[0] == rtcp(5)
            alice.send(rtp(6), relay.port_a)
            assert (await bob.recv())[0] == rtp(6)
            assert relay.b.peer == bob.addr
            # RTP's minimum length does not apply to RTCP, and an RTCP-sized packet is no RTP packet.
            alice.send(rtcp(7), relay.port_a)
            alice_rtcp.send(rtcp(8)[:7], relay.port_a + 1)
            alice_rtcp.send(rtcp(9), relay.port_a + 1)
            assert (await bob_rtcp_elsewhere.recv())[0] == rtcp(9)
            await bob_rtcp.nothing()
            await bob.nothing()
        assert counts(relay.a) == (4, 2, 3)  # dropped: rtp(0) before leg B latched, then two malformed
        assert counts(relay.b) == (2, 4, 0)
    finally:
        for peer in (alice, alice_rtcp, bob, bob_rtcp, bob_rtcp_elsewhere):
            peer.close()


async def test_drops_what_is_not_rtp_and_counts_every_datagram_once() -> None:
    rng = random.Random(7)
    junk = [
        b"\x00\x01\x00\x00" + b"\x21\x12\xa4\x42" + b"\x00" * 12,  # STUN binding request
        b"\x16\xfe\xfd" + b"\x00" * 20,  # DTLS
        rtp(1)[:11],  # one byte short of an RTP header
        b"\x80" + b"\x00" * 2048,  # 2049 bytes
        b"",
        b"\x40" + b"\x00" * 20,  # version 1
        b"\xc0" + b"\x00" * 20,  # version 3
    ]
    junk += [bytes(rng.getrandbits(8) & 0x7F for _ in range(rng.randrange(0, 40))) for _ in range(20)]
    async with running(inactivity=5) as relay:
        with peers(2) as (alice, bob):
            for data in junk:
                alice.send(data, relay.port_a)
            bob.send(rtp(2), relay.port_b)  # sent before leg A latched anywhere: dropped, nowhere to go
            await bob.nothing()
            assert relay.a.peer is None  # junk never latches
            alice.send(rtp(3), relay.port_a)
            assert (await bob.recv())[0] == rtp(3)
            alice.send(b"\x80" + b"\x00" * 2047, relay.port_a)  # exactly 2048: the largest accepted
            assert len((await bob.recv())[0]) == 2048
    assert counts(relay.a) == (2, 0, len(junk))
    assert counts(relay.b) == (0, 2, 1)


async def test_ends_after_inactivity_on_both_legs_and_frees_its_ports() -> None:
    loop = asyncio.get_running_loop()
    async with running(inactivity=0.3) as relay:
        with peers(1) as (alice,):
            last = loop.time()
            for _ in range(6):  # 0.6 s of traffic on one leg keeps it alive past `inactivity`
                last = loop.time()
                alice.send(rtp(1), relay.port_a)
                await asyncio.sleep(0.1)
            assert not relay.ended.is_set()
            await asyncio.wait_for(relay.ended.wait(), 2)
            idle = loop.time() - last
        assert relay.reason == "inactivity"
        assert (
            0.3 <= idle < 0.3 + 0.075 + 0.3
        )  # from the last packet: never early; late by at most a watchdog tick plus scheduling
        await asyncio.sleep(0)
        assert bindable(relay.port_a, relay.port_a + 1, relay.port_b, relay.port_b + 1)
    assert relay.reason == "inactivity"  # close() after the end keeps the first reason


async def test_ends_at_max_duration_despite_traffic() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with running(inactivity=5, max_duration=0.4) as relay:
        with peers(2) as (alice, bob):
            while not relay.ended.is_set() and loop.time() - started < 2:
                alice.send(rtp(1), relay.port_a)
                bob.send(rtp(2), relay.port_b)
                await asyncio.sleep(0.05)
        lasted = loop.time() - started
    assert relay.reason == "max duration"
    assert 0.4 <= lasted < 1.0
    assert relay.a.received > 0 and relay.b.received > 0


async def test_close_is_idempotent_and_frees_ports() -> None:
    port_a, port_b = free_pairs(2)
    relay = RtpRelay(LOOPBACK, port_a, LOOPBACK, port_b, rtcp=False)
    await relay.start()
    assert not bindable(port_a) and not bindable(port_b)
    await relay.close()
    await relay.close()
    assert relay.reason == "closed" and relay.ended.is_set()
    assert bindable(port_a, port_b)
    with pytest.raises(RuntimeError):
        await relay.start()
    assert bindable(port_a, port_b)


async def test_start_failure_leaves_nothing_bound() -> None:
    port_a, port_b = free_pairs(2)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind((HOST, port_b + 1))  # leg B's RTCP: the last socket bound
        relay = RtpRelay(LOOPBACK, port_a, LOOPBACK, port_b)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            with pytest.raises(OSError):
                await relay.start()
            gc.collect()
        assert bindable(port_a, port_a + 1, port_b)
        assert not [w for w in caught if issubclass(w.category, ResourceWarning)]  # closed, not garbage-collected
    assert not relay.ended.is_set() and relay.reason is None


async def test_a_third_party_cannot_take_over_while_the_peer_talks() -> None:
    async with running(inactivity=5, relatch_after=0.3) as relay:
        with peers(3) as (alice, bob, mallory):
            await connect(relay, alice, bob)
            for tag in range(1, 41):  # 0.8 s, well past `relatch_after`, sprayed three to one
                alice.send(rtp(tag), relay.port_a)
                for _ in range(3):
                    mallory.send(rtp(0xEE), relay.port_a)
                await asyncio.sleep(0.02)
            assert await bob.drain() == [rtp(tag) for tag in range(1, 41)]
            assert relay.a.peer == alice.addr
            bob.send(rtp(99), relay.port_b)
            assert (await alice.recv())[0] == rtp(99)
            await mallory.nothing()
    assert relay.a.dropped == 1 + 120
    assert relay.a.received == 40


async def test_another_source_latches_after_the_peer_fell_silent() -> None:
    loop = asyncio.get_running_loop()
    async with running(inactivity=5, relatch_after=0.3) as relay:
        with peers(3) as (alice, bob, rebound):
            await connect(relay, alice, bob)
            silent_since = loop.time()  # before alice's last packet: the relay cannot see her silent any earlier
            alice.send(rtp(1), relay.port_a)
            assert (await bob.recv())[0] == rtp(1)
            refused = relay.a.dropped
            # Alice's NAT rebinds: her packets now come from another port, soon after her last from the old one.
            first = None
            for tag in range(2, 80):
                rebound.send(rtp(tag), relay.port_a)
                with contextlib.suppress(TimeoutError):
                    first = await bob.recv(0.02)
                    break
            assert first is not None
            latched_after = loop.time() - silent_since
            assert 0.3 <= latched_after < 0.3 + 0.15 + 0.3  # not before `relatch_after`, late by a tick at most
            assert relay.a.peer == rebound.addr
            bob.send(rtp(99), relay.port_b)
            assert (await rebound.recv())[0] == rtp(99)
            await alice.nothing()
    assert relay.a.dropped > refused  # the early packets from the new source were refused


async def test_set_peer_takes_ip_literals_and_ignores_unusable_sdp_addresses() -> None:
    relay = RtpRelay(LOOPBACK, 40000, IPv6Address("::1"), 40002)
    for leg, address in [
        ("a", ("localhost", 5000)),
        ("a", ("127.0.0.1", -1)),
        ("a", ("127.0.0.1", 65536)),
        ("a", ("127.0.0.1", "5000")),
        ("c", ("127.0.0.1", 5000)),
        ("a", ("127.0.0.1",)),
    ]:
        with pytest.raises(ValueError):
            relay.set_peer(leg, address)  # type: ignore[arg-type]
    relay.set_peer("b", ("::1", 5000))
    assert relay._rtp["b"].target == ("::1", 5000)
    assert relay._rtcp["b"].target == ("::1", 5001)
    for unusable in [("::1", 0), ("::", 5000), ("127.0.0.1", 5000)]:  # rejected stream, hold, wrong family
        relay.set_peer("b", ("::1", 5000))
        relay.set_peer("b", unusable)
        assert relay._rtp["b"].target is None and relay._rtcp["b"].target is None
    relay.set_peer("a", ("127.0.0.1", 65535))
    assert relay._rtcp["a"].target is None  # no port + 1 to guess
    with pytest.raises(ValueError):
        RtpRelay(LOOPBACK, 65535, LOOPBACK, 40000)  # no room for RTCP on port + 1
    with pytest.raises(ValueError):
        RtpRelay(LOOPBACK, 40000, LOOPBACK, 40002, inactivity=0)


async def test_a_new_sdp_address_forgets_the_latch_and_the_same_one_does_not() -> None:
    async with running(inactivity=5) as relay:
        with peers(4) as (alice, bob, moved, elsewhere):
            relay.set_peer("a", ("127.0.0.1", 9))  # alice's SDP: a private address in real life
            await connect(relay, alice, bob)
            relay.set_peer("a", ("127.0.0.1", 9))  # a re-INVITE with the same SDP keeps the latch
            assert relay.a.peer == alice.addr
            bob.send(rtp(0), relay.port_b)
            assert (await alice.recv())[0] == rtp(0)
            relay.set_peer("a", moved.addr)  # a re-INVITE moved leg A
            assert relay.a.peer is None
            bob.send(rtp(1), relay.port_b)
            assert (await moved.recv())[0] == rtp(1)
            elsewhere.send(rtp(2), relay.port_a)  # first packet after the move latches, from anywhere
            assert (await bob.recv())[0] == rtp(2)
            assert relay.a.peer == elsewhere.addr
            await alice.nothing()
