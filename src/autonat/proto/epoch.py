"""Detecting that a NAT-PMP or PCP server lost its mapping state, from its epoch field.

Both protocols stamp every reply with the seconds since the server's state began. A client compares
how far that clock moved with how far its own clock moved; a server clock that fell behind means
the server rebooted or otherwise forgot its mappings, and every mapping must be recreated.

NAT-PMP (RFC 6886 §3.6) only looks for a server clock running too slow (the 7/8 rule); PCP
(RFC 6887 §8.5) also rejects one running too fast. Times are seconds from a monotonic clock the
caller reads; nothing here reads a clock.
"""

from __future__ import annotations

import enum

__all__ = ["EpochRule", "EpochTracker", "natpmp_epoch_valid", "pcp_epoch_valid"]

MAX_EPOCH = 0xFFFF_FFFF
"""Both epoch fields are 32 bits."""

_SLACK_SECONDS = 2


class EpochRule(enum.StrEnum):
    """Which RFC's test an `EpochTracker` applies."""

    NATPMP = "natpmp"
    PCP = "pcp"


def _check_epoch(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_EPOCH:
        raise ValueError(f"{name} must be a 32-bit unsigned integer, not {value!r}")


def natpmp_epoch_valid(prev_epoch: int, prev_time: float, new_epoch: int, now: float) -> bool:
    """RFC 6886 §3.6: is `new_epoch` consistent with no loss of state since `prev_epoch`?

    The client expects at least prev_epoch + 7/8 of its own elapsed time (the gateway's clock may
    run slow) and allows 2 seconds of slack below that; anything lower means a reboot. So a step
    backwards of more than 2 seconds is always invalid. A step back of 2 seconds or less within
    the slack is tolerated, as the RFC's rule has it, which keeps a reordered reply from looking
    like a reboot. A client clock that went backwards counts as no time elapsed.
    """
    _check_epoch("prev_epoch", prev_epoch)
    _check_epoch("new_epoch", new_epoch)
    elapsed = max(0.0, now - prev_time)
    conservative_estimate = prev_epoch + elapsed * 7 / 8
    return new_epoch + _SLACK_SECONDS >= conservative_estimate


def pcp_epoch_valid(prev_epoch: int, prev_time: float, new_epoch: int, now: float) -> bool:
    """RFC 6887 §8.5: is `new_epoch` consistent with no loss of state since `prev_epoch`?

    Invalid when the server clock went back by more than one second, or when the two clocks'
    deltas differ by more than 2 seconds plus 1/16 of the larger one, in either direction.
    """
    _check_epoch("prev_epoch", prev_epoch)
    _check_epoch("new_epoch", new_epoch)
    if new_epoch < prev_epoch - 1:
        return False
    client_delta = now - prev_time
    server_delta = new_epoch - prev_epoch
    if client_delta + _SLACK_SECONDS < server_delta - server_delta / 16:
        return False
    return not server_delta + _SLACK_SECONDS < client_delta - client_delta / 16


class EpochTracker:
    """Remembers the last (epoch, time) seen from one server and flags loss of state.

    Use one tracker per server; `reset()` when switching servers, since another server's epoch
    says nothing about this one's.
    """

    __slots__ = ("_last", "rule")

    def __init__(self, rule: EpochRule | str) -> None:
        self.rule = EpochRule(rule)
        self._last: tuple[int, float] | None = None

    @property
    def last(self) -> tuple[int, float] | None:
        """The last observation as (epoch, time), or None before the first."""
        return self._last

    def observe(self, epoch: int, now: float) -> bool:
        """Record a server epoch seen at `now`; True if it shows the server lost its state.

        The first observation has nothing to compare with and returns False. Every observation is
        stored, whatever the verdict, so the next one is judged against the new epoch (§3.6, §8.5).
        """
        _check_epoch("epoch", epoch)
        previous = self._last
        self._last = (epoch, now)
        if previous is None:
            return False
        prev_epoch, prev_time = previous
        if self.rule is EpochRule.NATPMP:
            return not natpmp_epoch_valid(prev_epoch, prev_time, epoch, now)
        return not pcp_epoch_valid(prev_epoch, prev_time, epoch, now)

    def reset(self) -> None:
        """Forget the last observation; the next `observe` returns False."""
        self._last = None
