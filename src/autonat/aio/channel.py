"""A UDP socket that drives sans-IO `Exchange`s with asyncio timers.

One channel serves every request to one gateway (NAT-PMP and PCP share the server port 5351), so a
probe, a map and an unmap reuse one socket and several exchanges can be in flight at once: each
datagram is offered to the pending exchanges until one accepts it, and counted as dropped otherwise.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, TypeVar, cast

from autonat.errors import RouterNotFound, RouterTimeout
from autonat.proto.exchange import Endpoint, Exchange

R = TypeVar("R")
MAX_DATAGRAM = 2048  # larger than any NAT-PMP or PCP message (PCP caps at 1100, RFC 6887 §7)


@dataclass(eq=False)
class _Pending:
    exchange: Exchange[Any]
    future: asyncio.Future[Any]
    what: str
    timer: asyncio.TimerHandle | None = field(default=None)


class DatagramChannel(asyncio.DatagramProtocol):
    """Owns one UDP socket bound to our local address; use `open()`, `request()`, `close()`."""

    def __init__(self, reply_key: Callable[[bytes], Hashable | None] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.DatagramTransport | None = None
        self._pending: list[_Pending] = []
        self._by_key: dict[Hashable, list[_Pending]] = {}
        self._reply_key = reply_key
        self.drops: Counter[str] = Counter()

    @classmethod
    async def open(
        cls, local_address: IPv4Address | IPv6Address, reply_key: Callable[[bytes], Hashable | None] | None = None
    ) -> DatagramChannel:
        """`reply_key` maps a datagram to the `key` of the exchange it answers (see Exchange)."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET if isinstance(local_address, IPv4Address) else socket.AF_INET6
        try:
            _, channel = await loop.create_datagram_endpoint(
                lambda: cls(reply_key), local_addr=(str(local_address), 0), family=family
            )
        except OSError as exc:
            raise RouterNotFound(f"cannot open a UDP socket on {local_address}: {exc.strerror}") from None
        return channel

    # asyncio.DatagramProtocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's datagram transport does not subclass DatagramTransport, hence the cast.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if len(data) > MAX_DATAGRAM:
            self.drops["oversized datagram"] += 1
            return
        source: Endpoint = (ip_address(addr[0]), addr[1])
        now = self._loop.time()
        reason = "no request pending"
        # With many exchanges in flight (a thousand renewals), find the addressee by key first
        # instead of letting every pending exchange parse the datagram.
        key = self._reply_key(data) if self._reply_key is not None else None
        keyed = self._by_key.get(key, []) if key is not None else []
        # The others still get their turn (a short error reply may not carry the full key), so the
        # index only ever makes delivery faster, never different.
        for pending in itertools.chain(keyed, (p for p in self._pending if p not in keyed)):
            refused = pending.exchange.receive(data, source, now)
            if refused is None:
                self._settle(pending)
                return
            reason = refused
        self.drops[reason] += 1

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable from a router without the service) arrive here; the
        # retransmission schedule and the deadline already cover them, so they are only counted.
        self.drops[f"socket error: {exc}"] += 1

    def connection_lost(self, exc: Exception | None) -> None:
        for pending in list(self._pending):
            if not pending.future.done():
                pending.future.set_exception(RouterTimeout(f"{pending.what}: socket closed"))

    # driving exchanges
    async def request(self, exchange: Exchange[R], what: str) -> R:
        """Run an exchange to its end. `what` names it in the timeout error ("NAT-PMP at 192.168.77.1")."""
        pending = _Pending(exchange, self._loop.create_future(), what)
        self._pending.append(pending)
        if exchange.key is not None:
            self._by_key.setdefault(exchange.key, []).append(pending)
        try:
            self._pump(pending)
            result: R = await pending.future
            return result
        finally:
            if pending.timer is not None:
                pending.timer.cancel()
            self._pending.remove(pending)
            if exchange.key is not None:
                same = self._by_key[exchange.key]
                same.remove(pending)
                if not same:
                    del self._by_key[exchange.key]

    def _pump(self, pending: _Pending) -> None:
        exchange = pending.exchange
        now = self._loop.time()
        exchange.handle_timer(now)
        for datagram in exchange.datagrams_to_send(now):
            if self._transport is not None:
                self._transport.sendto(datagram, (str(exchange.server[0]), exchange.server[1]))
        if exchange.done:
            self._settle(pending)
            return
        when = exchange.timer()
        if when is not None:
            pending.timer = self._loop.call_at(when, self._pump, pending)

    def _settle(self, pending: _Pending) -> None:
        if pending.future.done():
            return
        if pending.timer is not None:
            pending.timer.cancel()
            pending.timer = None
        exchange = pending.exchange
        if exchange.timed_out:
            seconds = exchange.deadline_at - exchange.started
            tries = "try" if exchange.transmissions == 1 else "tries"
            pending.future.set_exception(
                RouterTimeout(f"no answer from {pending.what} within {seconds:g} s ({exchange.transmissions} {tries})")
            )
        else:
            pending.future.set_result(exchange.result)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    async def __aenter__(self) -> DatagramChannel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
