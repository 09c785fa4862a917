"""Errors the library raises to its callers. Each carries one line fit for a user; the CLI prints it as is.

`exit_code` lets the CLI map each kind to its own status without a lookup table elsewhere.
"""

from __future__ import annotations


class AutonatError(Exception):
    """Base of every error autonat reports to a user."""

    exit_code = 1


class RouterNotFound(AutonatError):
    """No gateway could be determined (no default route, unsupported platform, bad override)."""

    exit_code = 3


class RouterTimeout(AutonatError):
    """The router did not answer within the caller's deadline."""

    exit_code = 4


class RouterUnreachable(RouterTimeout):
    """The router said at once that nothing listens there: an ICMP port unreachable for a datagram
    (reported on a connected UDP socket), a TCP RST or refused connection. Ends the request at once
    instead of at the deadline; a subclass of RouterTimeout so that callers treating "no answer" alike
    keep doing so."""


class RouterRefused(AutonatError):
    """The router answered with an error result (a NAT-PMP/PCP result code, later a UPnP error)."""

    exit_code = 5

    def __init__(self, message: str, *, protocol: str, code: int) -> None:
        super().__init__(message)
        self.protocol = protocol
        self.code = code


class NotPublic(AutonatError):
    """The router's "external" address is private or shared: there is another NAT beyond it."""

    exit_code = 6


class ProtocolUnavailable(AutonatError):
    """No port-mapping protocol works with this router (or the one asked for does not)."""

    exit_code = 7
