"""STUN client (RFC 8489) over a `DatagramChannel`: the reflexive address a STUN server sees.

This is the `stun:host[:port]` value of ext-sip-ip / ext-rtp-ip: ask a server on the internet which
address and port our datagrams arrive from. Behind a NAT that is the router's public address, with no
help from the router at all, which is why it still works where NAT-PMP, PCP and UPnP are off.

One Binding transaction per call (§6.2.1): the request goes out at 0, 0.5, 1.5, 3.5 ... s (RTO 500 ms,
doubling) until an answer or the caller's deadline, which covers the name lookup too.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from ipaddress import IPv4Address, IPv6Address

from autonat.addresses import IPAddress, parse_address
from autonat.aio.channel import DatagramChannel
from autonat.errors import AutonatError, RouterNotFound, RouterTimeout
from autonat.proto import stun
from autonat.proto.exchange import Exchange, RetransmitSchedule

__all__ = [
    "DEFAULT_DEADLINE",
    "STUN_SCHEDULE",
    "StunError",
    "StunTargetError",
    "StunTimeout",
    "parse_stun_target",
    "resolve_server",
    "stun_binding",
]

STUN_SCHEDULE = RetransmitSchedule(initial=0.5, ceiling=32.0)
"""§6.2.1: RTO 500 ms, doubled per retransmission, no jitter. The RFC stops after Rc = 7 transmissions
(39.5 s); here the caller's deadline ends it, and the 32 s ceiling only keeps the interval from growing
without bound if someone passes a deadline of minutes."""

DEFAULT_DEADLINE = 2.0
MAX_HOST_LENGTH = 253


class StunError(AutonatError):
    """A STUN lookup failed: bad target, unresolvable name, no socket, or an error response (`code`)."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class StunTimeout(StunError, RouterTimeout):
    """No answer (or no name resolution) within the deadline. Also a RouterTimeout, so callers that
    treat "nothing answered in time" alike need no new except clause; it keeps RouterTimeout's exit code."""


class StunTargetError(StunError, ValueError):
    """A `stun:` value that cannot be parsed; a ValueError too, for config loaders."""


def _check_host(host: str, text: str) -> str:
    labels = host.rstrip(".").split(".")
    valid = (
        0 < len(host) <= MAX_HOST_LENGTH
        and host.isascii()
        and all(0 < len(label) <= 63 for label in labels)
        and all(c.isalnum() or c in "-._" for c in host)
    )
    if not valid:
        raise StunTargetError(f"{text!r}: {host!r} is not a host name or IP address (non-ASCII names: use punycode)")
    return host


def parse_stun_target(text: str) -> tuple[str, int]:
    """Parse a `stun:host[:port]` value (RFC 7064 §3.1) into (host, port), port 3478 by default.

    IPv6 literals go in brackets (`stun:[2001:db8::1]:3478`); a bare IPv6 literal is accepted too,
    without a port, since it cannot be confused with host:port. The host comes back without brackets.
    StunTargetError (a ValueError) with one line for anything else, `stuns:` included: STUN over TLS
    is not implemented.
    """
    value = text.strip()
    scheme, sep, rest = value.partition(":")
    if scheme.lower() == "stuns":
        raise StunTargetError(f"{text!r}: stuns: (STUN over TLS) is not supported, use stun:")
    if not sep or scheme.lower() != "stun":
        raise StunTargetError(f"{text!r} is not a stun:host[:port] value")
    if rest.startswith("//"):
        raise StunTargetError(f"{text!r}: a stun: URI has no '//' (RFC 7064), write stun:host[:port]")
    if any(c in rest for c in "?#/@ \t"):
        raise StunTargetError(f"{text!r}: a stun: value is only host[:port]")
    port_text: str | None
    if rest.startswith("["):
        host, closed, after = rest[1:].partition("]")
        if not closed:
            raise StunTargetError(f"{text!r}: unclosed [ in the address")
        if after and not after.startswith(":"):
            raise StunTargetError(f"{text!r}: unexpected {after!r} after the address")
        port_text = after[1:] if after else None
        try:
            host = str(IPv6Address(host))
        except ValueError:
            raise StunTargetError(f"{text!r}: [{host}] is not an IPv6 address") from None
    elif rest.count(":") > 1:
        try:
            host, port_text = str(IPv6Address(rest)), None
        except ValueError:
            raise StunTargetError(f"{text!r}: an IPv6 address with a port goes in brackets: [addr]:port") from None
    else:
        host, colon, after = rest.partition(":")
        port_text = after if colon else None
        host = _check_host(host, text) if not _is_ipv4(host) else host
    if port_text is None:
        return host, stun.DEFAULT_PORT
    if not (port_text.isascii() and port_text.isdigit() and 0 < int(port_text) <= 0xFFFF):
        raise StunTargetError(f"{text!r}: the port must be 1-65535")
    return host, int(port_text)


def _is_ipv4(host: str) -> bool:
    try:
        IPv4Address(host)
    except ValueError:
        return False
    return True


def _bracketed(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_AddrInfo = list[tuple[int, int, int, str, tuple[object, ...]]]


def _getaddrinfo(host: str, port: int, family: int) -> asyncio.Future[_AddrInfo]:
    """socket.getaddrinfo in a daemon thread.

    Not loop.getaddrinfo: that uses the default executor, and asyncio.run() waits for its threads at
    shutdown, so a resolver hanging for its 5 s x attempts (an unreachable nameserver) would hold the
    process long after our deadline gave up on it (measured: 10 s in the lab's lan namespace). A daemon
    thread is simply abandoned.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_AddrInfo] = loop.create_future()

    def deliver(result: _AddrInfo | BaseException) -> None:
        if future.done():  # timed out and cancelled meanwhile
            return
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)

    def work() -> None:
        result: _AddrInfo | BaseException
        try:
            result = [
                (int(f), int(t), p, name, tuple(sockaddr))
                for f, t, p, name, sockaddr in socket.getaddrinfo(
                    host, port, family, socket.SOCK_DGRAM, socket.IPPROTO_UDP
                )
            ]
        except Exception as exc:  # handed to the awaiting task, which turns it into one line
            result = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            loop.call_soon_threadsafe(deliver, result)

    threading.Thread(target=work, name=f"stun-resolve-{host}", daemon=True).start()
    return future


async def resolve_server(
    host: str, port: int, *, family: int = socket.AF_UNSPEC, timeout: float, what: str = "host"
) -> IPAddress:
    """The address to send to: `host` itself if it is a literal, else its first IPv4 address (then IPv6)
    from getaddrinfo, within `timeout` seconds. `what` names the host in errors ("STUN server").

    IPv4 first because that is where NATs are: the reflexive address of an IPv6 path is normally our
    own. SRV records (RFC 8489 §8.1) are not looked up; give the port if the server is not on 3478.
    The lookup runs in a daemon thread of its own (see `_getaddrinfo`), so a resolver that hangs costs
    the caller nothing past the deadline.
    """
    if host.startswith("[") and host.endswith("]"):  # a URI-style IPv6 literal
        host = host[1:-1]
    try:
        literal = parse_address(host)
    except ValueError:
        pass
    else:
        wanted = {int(socket.AF_INET): 4, int(socket.AF_INET6): 6}.get(family)
        if wanted is not None and literal.version != wanted:
            raise StunError(f"{what} {host} is IPv{literal.version}, the local address is IPv{wanted}")
        return literal
    try:
        async with asyncio.timeout(timeout):
            infos = await _getaddrinfo(host, port, family)
    except TimeoutError:
        raise StunTimeout(f"could not resolve {what} {host!r} within {timeout:g} s") from None
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise StunError(f"cannot resolve {what} {host!r}: {reason}") from None
    found = [parse_address(str(info[4][0])) for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)]
    found.sort(key=lambda a: a.version)  # stable: the resolver's order within each family
    if not found:
        raise StunError(f"{what} {host!r} has no address{'' if family == socket.AF_UNSPEC else ' of our family'}")
    return found[0]


async def stun_binding(
    server: tuple[str, int],
    *,
    local_address: IPv4Address | IPv6Address | None = None,
    deadline: float = DEFAULT_DEADLINE,
    software: str | None = stun.SOFTWARE,
) -> tuple[IPAddress, int]:
    """Our reflexive transport address as `server` (host or IP literal, port) sees it: one Binding
    transaction from a fresh UDP socket on `local_address` (any address of the server's family if None).

    `deadline` covers the name lookup and every retransmission. Raises StunTimeout (no answer in time),
    StunError (unresolvable, no socket, an error response with its code, a nonsense address).
    Replies from another address or for another transaction are dropped, and the wait goes on.
    """
    if deadline <= 0:
        raise ValueError("deadline must be positive")
    host, port = server
    if host.startswith("[") and host.endswith("]"):  # a URI-style IPv6 literal
        host = host[1:-1]
    if not 0 < port <= 0xFFFF:
        raise StunError(f"STUN server port {port} is not 1-65535")
    loop = asyncio.get_running_loop()
    started = loop.time()
    family = socket.AF_UNSPEC
    if local_address is not None:
        family = socket.AF_INET if isinstance(local_address, IPv4Address) else socket.AF_INET6
    address = await resolve_server(host, port, family=family, timeout=deadline, what="STUN server")
    shown = _bracketed(host, port) if host == str(address) else f"{_bracketed(host, port)} ({address})"
    what = f"STUN server {shown}"
    remaining = deadline - (loop.time() - started)
    if remaining <= 0:
        raise StunTimeout(f"no answer from {what} within {deadline:g} s (the name lookup took it all)")
    if local_address is None:
        local_address = IPv4Address(0) if address.version == 4 else IPv6Address(0)
    try:
        channel = await DatagramChannel.open(local_address, stun.reply_key)
    except RouterNotFound as exc:
        raise StunError(str(exc)) from None
    transaction_id = stun.new_transaction_id()
    exchange = Exchange(
        stun.build_binding_request(transaction_id, software=software),
        (address, port),
        lambda data: stun.parse_binding_response(data, transaction_id),
        now=loop.time(),
        deadline=remaining,
        schedule=STUN_SCHEDULE,
        key=transaction_id,
    )
    try:
        reply = await channel.request(exchange, what)
    except RouterTimeout:
        # The channel's message would show the deadline left after the lookup; the caller gave `deadline`.
        tries = "try" if exchange.transmissions == 1 else "tries"
        raise StunTimeout(f"no answer from {what} within {deadline:g} s ({exchange.transmissions} {tries})") from None
    finally:
        channel.close()
    if isinstance(reply, stun.ErrorCode):
        raise StunError(f"{what} answered with an error: {reply.describe()}", code=reply.code)
    mapped, mapped_port = reply
    if mapped.is_unspecified or mapped.is_multicast or mapped_port == 0:
        raise StunError(f"{what} reported the unusable address {_bracketed(str(mapped), mapped_port)}")
    return mapped, mapped_port
