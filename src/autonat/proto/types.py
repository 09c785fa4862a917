"""Small value types shared by every protocol core."""

from __future__ import annotations

import enum


class Transport(enum.StrEnum):
    """Transport protocol of a port mapping, with its IANA protocol number (used by PCP, RFC 6887 §11.1)."""

    UDP = "udp"
    TCP = "tcp"

    @property
    def iana_number(self) -> int:
        return 17 if self is Transport.UDP else 6

    @classmethod
    def from_iana_number(cls, number: int) -> Transport:
        for member in cls:
            if member.iana_number == number:
                return member
        raise ValueError(f"IP protocol {number} is neither UDP nor TCP")

    @classmethod
    def parse(cls, text: str) -> Transport:
        """Accept `udp`, `UDP`, `tcp`, `TCP` (routers and users spell it both ways)."""
        try:
            return cls(text.strip().lower())
        except ValueError:
            raise ValueError(f"transport must be udp or tcp, not {text!r}") from None
