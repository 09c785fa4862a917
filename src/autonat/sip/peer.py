"""Where a SIP message came from, or where one goes: the one address type the call core and the transports share.

RFC 3261 §18 with the NAT rule of SIP-NOTES: a response goes to the packet's source (over UDP) or on the same
connection (TCP/TLS, §18.2.2), so a message is always handed up with the `Peer` it arrived from.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Peer"]


@dataclass(frozen=True, slots=True)
class Peer:
    """`transport` "udp", "tcp" or "tls"; `connection` identifies a stream (0 for UDP, and for a stream not yet
    opened: the transport connects, or reuses an open connection to that address, §18.1.1)."""

    transport: str
    ip: str
    port: int
    connection: int = 0

    @property
    def reliable(self) -> bool:
        return self.transport != "udp"

    def __str__(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{self.transport}:{host}:{self.port}"
