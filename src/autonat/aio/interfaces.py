"""This host's interfaces and their addresses, from the kernel over rtnetlink (RTM_GETADDR dump).

The I/O half of the `.auto` ACL lists (autonat.acl builds them from what this returns) and of the
choice of the stable IPv6 address a pinhole is for (autonat.aio.route); the codec is
autonat.proto.netlink.
"""

from __future__ import annotations

import itertools
import socket
import sys

from autonat.acl import AclError, IPInterface
from autonat.proto import netlink
from autonat.proto.errors import DecodeError

_NETLINK_TIMEOUT = 1.0
_MAX_DUMP_SIZE = 16 * 1024 * 1024  # ~100k addresses; a kernel that sends more is not one we know
_seq = itertools.count(1)


class AddressDumpError(OSError):
    """The kernel could not be asked for the host's addresses; `str()` is one line."""


def host_addresses() -> list[netlink.AddressInfo]:
    """Every address of every interface, with its flags, scope and lifetimes (RTM_GETADDR over
    rtnetlink). Linux only: elsewhere the list is empty. AddressDumpError when the kernel can't be asked."""
    if sys.platform != "linux":
        return []
    seq = next(_seq)
    found: list[netlink.AddressInfo] = []
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
            sock.settimeout(_NETLINK_TIMEOUT)
            sock.sendto(netlink.build_getaddr_dump(seq), (0, 0))
            received = 0
            done = False
            while not done:
                data = sock.recv(65536)
                received += len(data)
                if received > _MAX_DUMP_SIZE:
                    raise AddressDumpError("netlink address dump: too large")
                entries, done = netlink.parse_getaddr_details(data, seq)
                found.extend(entries)
    except DecodeError as exc:
        raise AddressDumpError(f"netlink address dump: {exc.reason}") from None
    except TimeoutError:
        raise AddressDumpError("netlink address dump: the kernel did not answer") from None
    except AddressDumpError:
        raise
    except OSError as exc:
        raise AddressDumpError(f"cannot list the host's addresses over netlink: {exc.strerror or exc}") from None
    return found


def host_networks() -> list[tuple[str, IPInterface]]:
    """Every address of every interface of this host with its prefix, as (interface name, interface).

    Linux only (an RTM_GETADDR dump over rtnetlink); elsewhere the list is empty, so `localnet.auto`
    allows nobody and `nat.auto` is private space. Raises AclError when the kernel can't be asked.
    """
    if sys.platform != "linux":
        return []
    try:
        names = dict(socket.if_nameindex())
        found = host_addresses()
    except OSError as exc:
        raise AclError(str(exc) if isinstance(exc, AddressDumpError) else f"cannot list interfaces: {exc}") from None
    return [(info.label or names.get(info.index, f"if{info.index}"), info.interface) for info in found]
