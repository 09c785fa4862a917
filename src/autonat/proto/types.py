"""Small value types shared by every protocol core."""

from __future__ import annotations

import enum


def check_range(name: str, value: int, low: int, high: int) -> None:
    """A caller's integer field: an int (an IntEnum too, never a bool: a True port is a caller bug) in
    low..high, else ValueError naming the field."""
    if value.__class__ is int and low <= value <= high:
        return  # the common case, on every request built: one test
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in {low}..{high}, not {value!r}")


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
