"""The RTP echo on loopback: symmetric and re-originated (own SSRC, own RTCP, the caller's RTCP never reflected),
rtcp-mux, ICE-lite answers, hold, non-RTP dropped, ends on inactivity and max duration."""

from __future__ import annotations

import asyncio
import socket
from ipaddress import IPv4Address

from autonat.proto.stun import (
    Attribute,
    AttributeType,
    MessageClass,
    Method,
    StunMessage,
    binding_success_address,
    check_integrity,
    parse_message,
)
from autonat.service.media import RtpEcho
from autonat.sip.rtp import is_rtcp

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
    assert all(packet[12:] == RTP[12:] and packet[8:12] == echo.stream.ssrc.to_bytes(4, "big") for packet in got)
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
            assert (await asyncio.wait_for(loop.sock_recv(peer, 2048), 2))[12:] == RTP[12:]
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


RTCP_BYE = bytes([0x81, 203, 0, 1]) + b"\x00\x00\x00\x01"  # the caller's BYE for its SSRC 1


async def test_the_callers_rtcp_is_never_reflected_and_ours_is_sent() -> None:
    """RFC 3550 §6: the echo speaks for its own SSRC: the caller's RTCP (its BYE included) stays here, and
    the echo's own Sender Report goes to where the caller's RTCP comes from."""
    port = free_even_port()
    echo = RtpEcho(LOOPBACK, port, inactivity=0.4)  # RTCP every min(inactivity/4, 5 s) while packets flow
    await echo.start()
    loop = asyncio.get_running_loop()
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rtp,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rtcp,
    ):
        for sock in (rtp, rtcp):
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
        await loop.sock_sendto(rtcp, RTCP_BYE, ("127.0.0.1", port + 1))
        await loop.sock_sendto(rtcp, RTCP_BYE, ("127.0.0.1", port))  # onto the RTP port: not echoed either
        await asyncio.sleep(0.05)  # both arrived
        echo.stream.packets = 1  # as if it had sent already: reports are due at once
        echo._last_report = -10.0
        echo._tick(loop.time())
        report = await asyncio.wait_for(loop.sock_recv(rtcp, 2048), 2)
    assert is_rtcp(report) and report[1] == 200 and report[4:8] == echo.stream.ssrc.to_bytes(4, "big")
    assert echo.stats.rtcp_received == 2 and echo.stats.sent == 0 and echo.stats.rtcp_sent == 1
    await echo.close()


async def test_rtcp_mux_uses_one_port_and_hold_stops_sending_without_ending() -> None:
    port = free_even_port()
    echo = RtpEcho(LOOPBACK, port, inactivity=0.2, rtcp=False, hold=True, sending=False)
    await echo.start()
    loop = asyncio.get_running_loop()
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as free,
    ):
        peer.bind(("127.0.0.1", 0))
        peer.setblocking(False)
        free.bind(("127.0.0.1", port + 1))  # rtcp-mux: the RTCP port is not ours
        await loop.sock_sendto(peer, RTP, ("127.0.0.1", port))
        await loop.sock_sendto(peer, RTCP_BYE, ("127.0.0.1", port))
        await asyncio.sleep(0.6)  # three inactivity periods of silence while held
        assert not echo.ended.is_set() and echo.stats.sent == 0 and echo.stats.rtcp_received == 1
        echo.update(sending=True, hold=False)  # resumed
        await loop.sock_sendto(peer, RTP, ("127.0.0.1", port))
        back = await asyncio.wait_for(loop.sock_recv(peer, 2048), 2)
        assert back[12:] == RTP[12:]
        await asyncio.wait_for(echo.ended.wait(), 2)  # not held any more: silence ends it
    assert echo.stats.reason == "inactivity"


def check_request(tid: bytes, username: bytes, pwd: bytes) -> bytes:
    attributes = (Attribute(AttributeType.USERNAME, username), Attribute(AttributeType.USE_CANDIDATE, b""))
    return StunMessage(MessageClass.REQUEST, Method.BINDING, tid, attributes).encode(integrity=pwd, fingerprint=True)


async def test_ice_lite_answers_checks_made_with_our_credentials_only() -> None:
    """RFC 8445 §7.3: a check with USERNAME "ours:theirs" and MESSAGE-INTEGRITY under our ice-pwd gets a
    signed Binding success naming its source; anything else gets nothing."""
    port = free_even_port()
    echo = RtpEcho(LOOPBACK, port, inactivity=5, ice=("ufrag123", "p" * 24))
    await echo.start()
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.bind(("127.0.0.1", 0))
        peer.setblocking(False)
        for target in (port, port + 1):  # RTP and RTCP are both ICE components
            tid = target.to_bytes(12, "big")
            await loop.sock_sendto(peer, check_request(tid, b"wrong:them", b"p" * 24), ("127.0.0.1", target))
            await loop.sock_sendto(peer, check_request(tid, b"ufrag123:them", b"q" * 24), ("127.0.0.1", target))
            await loop.sock_sendto(peer, check_request(tid, b"ufrag123:them", b"p" * 24), ("127.0.0.1", target))
            answer = await asyncio.wait_for(loop.sock_recv(peer, 2048), 2)
            message = parse_message(answer)
            assert message.message_class is MessageClass.SUCCESS and message.transaction_id == tid
            assert binding_success_address(message) == (LOOPBACK, peer.getsockname()[1])
            assert check_integrity(answer, b"p" * 24)
    assert echo.stats.stun_answered == 2 and echo.stats.dropped == 4
    await echo.close()
