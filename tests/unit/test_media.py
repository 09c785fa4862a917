"""The RTP echo on loopback: symmetric echo, non-RTP dropped, ends on inactivity and max duration."""

from __future__ import annotations

import asyncio
import socket
from ipaddress import IPv4Address

from autonat.service.media import RtpEcho

LOOPBACK = IPv4Address("127.0.0.1")
RTP = bytes([0x80, 0x00]) + b"\x00\x01" + b"\x00" * 8 + b"payload"


def free_even_port() -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1] & ~1
        try:
            with (
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a,
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b,
            ):
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise AssertionError("no free port pair")


async def test_echoes_rtp_to_its_source_and_drops_the_rest() -> None:
    port = free_even_port()
    echo = RtpEcho(LOOPBACK, port, inactivity=5)
    await echo.start()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.bind(("127.0.0.1", 0))
        peer.setblocking(False)
        loop = asyncio.get_running_loop()
        for _ in range(10):
            await loop.sock_sendto(peer, RTP, ("127.0.0.1", port))
        await loop.sock_sendto(peer, b"\x00\x01 not rtp", ("127.0.0.1", port))
        got = [await asyncio.wait_for(loop.sock_recv(peer, 2048), 2) for _ in range(10)]
    assert got == [RTP] * 10
    assert (echo.stats.received, echo.stats.sent, echo.stats.dropped) == (10, 10, 1)
    await echo.close()
    assert echo.stats.reason == "closed"


async def test_ends_itself_when_idle_or_too_old() -> None:
    idle = RtpEcho(LOOPBACK, free_even_port(), inactivity=0.2, rtcp=False)
    await idle.start()
    await asyncio.wait_for(idle.ended.wait(), 2)
    assert idle.stats.reason == "inactivity"
    old = RtpEcho(LOOPBACK, free_even_port(), inactivity=5, max_duration=0.3, rtcp=False)
    await old.start()
    await asyncio.wait_for(old.ended.wait(), 2)
    assert old.stats.reason == "max duration"


async def test_traffic_keeps_it_alive_and_close_frees_the_ports() -> None:
    port = free_even_port()
    echo = RtpEcho(LOOPBACK, port, inactivity=0.2)
    await echo.start()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.bind(("127.0.0.1", 0))
        peer.setblocking(False)
        loop = asyncio.get_running_loop()
        for _ in range(6):  # 0.48 s of packets, more than twice `inactivity`
            await loop.sock_sendto(peer, RTP, ("127.0.0.1", port))
            assert await asyncio.wait_for(loop.sock_recv(peer, 2048), 2) == RTP
            await asyncio.sleep(0.08)
    assert not echo.ended.is_set()
    assert echo.stats.received == 6
    await echo.close()
    await echo.close()
    assert echo.stats.reason == "closed"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b:
        a.bind(("127.0.0.1", port))
        b.bind(("127.0.0.1", port + 1))


async def test_start_failure_leaves_nothing_bound() -> None:
    port = free_even_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind(("127.0.0.1", port + 1))
        echo = RtpEcho(LOOPBACK, port)
        try:
            await echo.start()
        except OSError:
            pass
        else:
            raise AssertionError("start() bound a port that was in use")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
            again.bind(("127.0.0.1", port))
