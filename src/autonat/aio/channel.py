"""A UDP socket that drives sans-IO `Exchange`s with asyncio: one socket, one timer, no decisions.

One channel serves every request to one gateway (NAT-PMP and PCP share the server port 5351), so a
probe, a map and an unmap reuse one socket and several exchanges can be in flight at once: each
datagram is offered to the pending exchanges until one accepts it, and counted as dropped otherwise.

What the warm path costs, and why it is built this way (measured in the lab against miniupnpd, one
NAT-PMP external-address request: a blocking socket 51 µs, asyncio's datagram transport 90 µs, a
reader on the socket itself 61 µs):

- The socket is read by a reader callback of our own, `recv(MAX_DATAGRAM + 1)`, not through asyncio's
  datagram transport, whose `recvfrom(256 KiB)` allocates and frees a quarter megabyte per datagram.
- One timer for the whole channel, not one per request: it is re-armed only when a new exchange is
  due earlier than the armed time, so a warm request creates no timer at all.
- Opened with `remote=` (what `RouterSession` does) the socket is connected to the server: the kernel
  filters other sources, and an ICMP port unreachable (a router whose daemon is stopped) arrives as
  ECONNREFUSED, which ends every pending exchange at once (`Exchange.unreachable`) instead of at the
  deadline; silence still waits for the deadline. An unconnected channel (several servers) checks the
  source itself and cannot see ICMP errors.
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import Callable, Hashable
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, TypeVar

from autonat.aio import trace as wiretrace
from autonat.aio.udp import MAX_DATAGRAM, open_socket
from autonat.errors import RouterTimeout
from autonat.proto.exchange import Endpoint, Exchange

__all__ = ["MAX_DATAGRAM", "DatagramChannel", "open_socket"]

R = TypeVar("R")
READS_PER_WAKEUP = 64  # datagrams read per readiness callback before the loop gets its turn back
SOURCE_CACHE = 64  # parsed source addresses remembered by an unconnected channel


class _Pending:
    __slots__ = ("counted", "exchange", "future", "what")

    def __init__(self, exchange: Exchange[Any], future: asyncio.Future[Any], what: str) -> None:
        self.exchange = exchange
        self.future = future
        self.what = what
        self.counted = True  # in the channel's `_unsettled` until settled or abandoned


class DatagramChannel:
    """Owns one UDP socket bound to our local address; use `open()`, `request()`, `close()`."""

    def __init__(
        self,
        sock: socket.socket,
        reply_key: Callable[[bytes], Hashable | None] | None = None,
        remote: Endpoint | None = None,
    ) -> None:
        self._loop = self.loop = asyncio.get_running_loop()
        self._sock: socket.socket | None = sock
        self._fd = sock.fileno()
        self._remote = remote
        self._pending: list[_Pending] = []
        self._by_key: dict[Hashable, list[_Pending]] = {}
        self._reply_key = reply_key
        self._sources: dict[tuple[Any, ...], Endpoint] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._unsettled = 0  # pending exchanges whose future is not done yet
        self.drops: Counter[str] = Counter()
        sock.setblocking(False)
        self._loop.add_reader(self._fd, self._read_ready)

    @classmethod
    async def open(
        cls,
        local_address: IPv4Address | IPv6Address,
        reply_key: Callable[[bytes], Hashable | None] | None = None,
        *,
        remote: Endpoint | None = None,
    ) -> DatagramChannel:
        """`reply_key` maps a datagram to the `key` of the exchange it answers (see Exchange);
        `remote`, when every exchange goes to that one server, connects the socket to it."""
        return cls(open_socket(local_address, remote), reply_key, remote)

    @property
    def sockname(self) -> tuple[Any, ...]:
        """Our local (address, port)."""
        if self._sock is None:
            raise RouterTimeout("the channel is closed")
        name: tuple[Any, ...] = self._sock.getsockname()
        return name

    # --- receiving ------------------------------------------------------------------------------------

    def _read_ready(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(READS_PER_WAKEUP):
            try:
                if self._remote is not None:
                    data = sock.recv(MAX_DATAGRAM + 1)
                    source = self._remote
                else:
                    data, addr = sock.recvfrom(MAX_DATAGRAM + 1)
                    source = self._source(addr)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionRefusedError:
                self._unreachable()
                continue
            except OSError as exc:
                self.drops[f"socket error: {exc.strerror or exc}"] += 1
                return
            self._datagram(data, source)
            if not self._unsettled:
                # Nothing waits any more: return to the loop now, so the caller resumes without first
                # paying a recv that can only fail (EAGAIN). Anything more that came is read at the next
                # readiness callback (the selector reports a readable socket again).
                return

    def _source(self, addr: tuple[Any, ...]) -> Endpoint:
        source = self._sources.get(addr)
        if source is None:
            source = (ip_address(addr[0]), addr[1])
            if len(self._sources) < SOURCE_CACHE:  # anything on the LAN can send: bounded
                self._sources[addr] = source
        return source

    def _datagram(self, data: bytes, source: Endpoint) -> None:
        if wiretrace.ON:
            wiretrace.datagram_received(data, source, self._loop.time())
        if len(data) > MAX_DATAGRAM:
            self.drops["oversized datagram"] += 1
            return
        now = self._loop.time()
        # With many exchanges in flight (a thousand renewals), find the addressee by key first
        # instead of letting every pending exchange parse the datagram.
        key = self._reply_key(data) if self._reply_key is not None else None
        keyed = self._by_key.get(key) if key is not None else None
        reason = "no request pending"
        if keyed:
            for pending in keyed:
                refused = pending.exchange.receive(data, source, now)
                if refused is None:
                    self._settle(pending)
                    return
                reason = refused
        # The others still get their turn (a short error reply may not carry the full key), so the
        # index only ever makes delivery faster, never different.
        for pending in self._pending:
            if keyed and pending in keyed:
                continue
            refused = pending.exchange.receive(data, source, now)
            if refused is None:
                self._settle(pending)
                return
            reason = refused
        self.drops[reason] += 1

    def _unreachable(self) -> None:
        """ICMP port unreachable from the server we are connected to: every pending exchange ends."""
        if wiretrace.ON:
            wiretrace.unreachable(self._remote)
        self.drops["ICMP port unreachable"] += 1
        for pending in list(self._pending):
            pending.exchange.unreachable()
            self._settle(pending)

    # --- driving exchanges ------------------------------------------------------------------------------

    async def request(self, exchange: Exchange[R], what: str) -> R:
        """Run an exchange to its end. `what` names it in the error ("NAT-PMP at 192.168.77.1:5351")."""
        pending = _Pending(exchange, self._loop.create_future(), what)
        self._pending.append(pending)
        self._unsettled += 1
        key = exchange.key
        if key is not None:
            same = self._by_key.get(key)
            if same is None:
                self._by_key[key] = [pending]
            else:
                same.append(pending)
        try:
            self._pump(pending, self._loop.time())
            if not pending.future.done():
                self._arm(exchange.timer())
            result: R = await pending.future
            return result
        finally:
            if pending.counted:  # cancelled, or the socket closed: never settled
                pending.counted = False
                self._unsettled -= 1
            self._pending.remove(pending)
            if key is not None:
                same = self._by_key[key]
                same.remove(pending)
                if not same:
                    del self._by_key[key]

    def _pump(self, pending: _Pending, now: float) -> None:
        exchange = pending.exchange
        exchange.handle_timer(now)
        for datagram in exchange.datagrams_to_send(now):
            if wiretrace.ON:
                wiretrace.datagram_sent(datagram, exchange.server, exchange.started, exchange.transmissions)
            self._send(datagram, exchange.server)
            if exchange.done:  # the send itself learned that nothing listens there
                break
        if exchange.done:
            self._settle(pending)

    def _send(self, datagram: bytes, server: Endpoint) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            if self._remote is not None:
                sock.send(datagram)
            else:
                sock.sendto(datagram, (str(server[0]), server[1]))
        except ConnectionRefusedError:
            # A connected socket reports an earlier ICMP port unreachable on the next send.
            self._unreachable()
        except OSError as exc:
            # A full buffer or a firewall's EPERM: the datagram is lost, retransmission covers it.
            self.drops[f"socket error: {exc.strerror or exc}"] += 1

    def _arm(self, when: float | None) -> None:
        """One timer for the channel, at the earliest time a pending exchange needs its turn."""
        if when is None:
            return
        if self._timer is not None:
            if self._timer_at <= when:
                return  # fires earlier anyway and re-arms for what is due then
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._on_timer)
        self._timer_at = when

    def _on_timer(self) -> None:
        self._timer = None
        now = self._loop.time()
        for pending in list(self._pending):
            if not pending.future.done():
                self._pump(pending, now)
        self._arm(min((t for p in self._pending if (t := p.exchange.timer()) is not None), default=None))

    def _settle(self, pending: _Pending) -> None:
        if pending.future.done():
            return
        if pending.counted:
            pending.counted = False
            self._unsettled -= 1
        failure = pending.exchange.failure(pending.what)
        if failure is not None:
            pending.future.set_exception(failure)
        else:
            pending.future.set_result(pending.exchange.result)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._loop.remove_reader(self._fd)
        sock.close()
        for pending in list(self._pending):
            if not pending.future.done():
                pending.future.set_exception(RouterTimeout(f"{pending.what}: socket closed"))

    async def __aenter__(self) -> DatagramChannel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
