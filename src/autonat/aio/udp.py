"""The UDP socket both shells drive exchanges on (asyncio's DatagramChannel, the blocking session)."""

from __future__ import annotations

import socket
from ipaddress import IPv4Address, IPv6Address

from autonat.errors import RouterNotFound
from autonat.proto.exchange import Endpoint

MAX_DATAGRAM = 2048  # larger than any NAT-PMP or PCP message (PCP caps at 1100, RFC 6887 §7)
# The ICMP error queue (ip(7) IP_RECVERR, ipv6(7) IPV6_RECVERR): how an SSDP search learns that nothing
# listens on the gateway's port 1900. Python names them only from 3.12.
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)  # <linux/in.h>
IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)  # <linux/in6.h>


def open_socket(local_address: IPv4Address | IPv6Address, remote: Endpoint | None = None) -> socket.socket:
    """A UDP socket bound to `local_address` (any port), connected to `remote` when given."""
    family = socket.AF_INET if isinstance(local_address, IPv4Address) else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind((str(local_address), 0))
        if remote is not None:
            sock.connect((str(remote[0]), remote[1]))
    except OSError as exc:
        sock.close()
        where = f"{local_address}" if remote is None else f"{local_address} to {remote[0]}:{remote[1]}"
        raise RouterNotFound(f"cannot open a UDP socket on {where}: {exc.strerror}") from None
    return sock
