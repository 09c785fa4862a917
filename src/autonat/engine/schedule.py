"""When to renew and when to verify a mapping: pure functions of times, leases and a random draw.

RFC 6887 §11.2.1: renew first at a random moment between 1/2 and 5/8 of the lifetime, so that many
clients (or a thousand mappings of one client) never renew together; if that renewal fails, try
again at 3/4, 7/8, 15/16 ... of the lifetime until it expires. RFC 6886 §3.7 asks the same of NAT-PMP
clients (renew at half the lifetime), and UPnP leases are refreshed by the same rule.

Independently, each mapping is verified every `verify_interval` (±10 %), the first time at a random
point of the first interval, which spreads the checks of mappings created together.
"""

from __future__ import annotations

from collections.abc import Callable

Rand = Callable[[], float]


def first_renewal(granted_at: float, lease: float, rand: Rand) -> float:
    """RFC 6887 §11.2.1: uniformly between 1/2 and 5/8 of the lifetime."""
    return granted_at + lease * (0.5 + 0.125 * rand())


def retry_renewal(granted_at: float, lease: float, now: float) -> float | None:
    """After a failed renewal: the next of 3/4, 7/8, 15/16 ... of the lifetime still ahead; None once
    less than a second is left (the mapping is as good as expired)."""
    expires = granted_at + lease
    remaining_fraction = 0.25
    while expires - lease * remaining_fraction < now + 0.001:
        remaining_fraction /= 2
        if lease * remaining_fraction < 1.0:
            return None
    return expires - lease * remaining_fraction


def first_verification(now: float, interval: float, rand: Rand) -> float:
    """Somewhere in the first interval, so mappings made in one burst are checked spread out."""
    return now + interval * (0.5 + 0.5 * rand())


def next_verification(now: float, interval: float, rand: Rand) -> float:
    """The interval with ±10 % jitter, which keeps an initial spread from collapsing again."""
    return now + interval * (0.9 + 0.2 * rand())
