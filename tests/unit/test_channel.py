"""The asyncio channel's bookkeeping on loopback: it stops reading once nothing waits, and loses nothing."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest

from autonat.aio.channel import DatagramChannel
from autonat.errors import RouterTimeout
from autonat.proto.errors import DecodeError
from autonat.proto.exchange import Exchange

LOOPBACK = IPv4Address("127.0.0.1")


def echo_exchange(
    server: tuple[IPv4Address, int], payload: bytes, now: float, deadline: float = 2.0
) -> Exchange[bytes]:
    def parse(data: bytes) -> bytes:
        if data != payload:
            raise DecodeError("another payload")
        return data

    return Exchange(payload, server, parse, now=now, deadline=deadline)


@pytest.fixture
def server() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    yield sock
    sock.close()


async def test_a_late_extra_datagram_is_read_later_and_counted_not_lost(server: socket.socket) -> None:
    address = (LOOPBACK, server.getsockname()[1])
    channel = await DatagramChannel.open(LOOPBACK, remote=address)
    loop = asyncio.get_running_loop()
    try:
        request = asyncio.ensure_future(channel.request(echo_exchange(address, b"one", loop.time()), "echo"))
        sent, client = await loop.sock_recvfrom(server, 100)
        assert sent == b"one"
        server.sendto(b"one", client)
        server.sendto(b"stray", client)  # arrives with the answer, read once nothing waits any more
        assert await request == b"one"
        for _ in range(100):
            if channel.drops:
                break
            await asyncio.sleep(0.01)
        assert channel.drops == {"no request pending": 1}
        assert channel._unsettled == 0
    finally:
        channel.close()


async def test_a_cancelled_or_closed_request_leaves_no_count_behind(server: socket.socket) -> None:
    address = (LOOPBACK, server.getsockname()[1])
    channel = await DatagramChannel.open(LOOPBACK, remote=address)
    loop = asyncio.get_running_loop()
    request = asyncio.ensure_future(channel.request(echo_exchange(address, b"x", loop.time()), "echo"))
    await asyncio.sleep(0.05)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    assert channel._unsettled == 0
    closed = asyncio.ensure_future(channel.request(echo_exchange(address, b"y", loop.time()), "echo"))
    await asyncio.sleep(0.05)
    channel.close()
    with pytest.raises(RouterTimeout, match="socket closed"):
        await closed
    assert channel._unsettled == 0
