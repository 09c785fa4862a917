"""One UDP request/response transaction with retransmission, as a sans-IO state machine.

NAT-PMP (RFC 6886 §3.1) and PCP (RFC 6887 §8.1.1) clients both send a request, wait, and resend with
a growing interval until a valid reply arrives. This object decides *when* to send and *which* datagram
is the reply; the caller owns the socket and the clock:

    exchange = Exchange(request, server, parse, now=t0, deadline=2.0, schedule=NATPMP_SCHEDULE)
    send(exchange.datagrams_to_send(now))            # the first transmission
    ... on a datagram: exchange.receive(data, source, now)
    ... at exchange.timer(): exchange.handle_timer(now); send(exchange.datagrams_to_send(now))
    until exchange.done: exchange.result, or exchange.timed_out
    ... on an ICMP port unreachable from the server: exchange.unreachable()

Silence is answered with retransmissions until the deadline (RFC 6886 §3.1, RFC 6887 §8.1.1). An ICMP
port unreachable is not silence: the server host says nothing listens on the port, so retransmitting
can only be refused again; `unreachable()` ends the exchange at once (state UNREACHABLE). RFC 6887
§8.1.1 lets a client give up early on such hard errors; NAT-PMP says nothing either way.

Deliberate deviations, both in the client's favour on a one-hop link:
- The interval is capped at `ceiling` (2 s by default) instead of doubling up to 64 s (NAT-PMP) or
  1024 s (PCP MRT). The gateway is one hop away; a lost datagram should cost seconds, not minutes.
  What stops us from hammering a dead router is the caller's deadline, which every exchange has.
- PCP's initial interval is 250 ms like NAT-PMP's, not RFC 6887's 3 s: with the caller-facing 2 s
  deadline a 3 s IRT would mean a single transmission, so one lost packet would fail the call.
  The RFC's RAND jitter (±10 %) is kept so many clients behind one router do not retransmit in step.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable, Hashable
from ipaddress import IPv4Address, IPv6Address

from autonat.errors import AutonatError, RouterTimeout, RouterUnreachable
from autonat.proto.errors import DecodeError
from autonat.proto.record import Record, init_fields

# A one-shot NAT-PMP request loads this module: no `typing` (nor `dataclasses`, nor `random` until a
# schedule with jitter runs) on that path (autonat.proto.record says why). For the type checker the
# exchange is generic in its reply type as usual.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Generic, TypeVar

    R = TypeVar("R")

    class _Generic(Generic[R]):
        pass

else:
    R = object

    class _Generic:
        __slots__ = ()

        def __class_getitem__(cls, item: object) -> type:
            return cls


Endpoint = tuple[IPv4Address | IPv6Address, int]


class RetransmitSchedule(Record):
    """Initial interval, doubling per transmission, capped at `ceiling`, with ±`jitter` relative noise."""

    _fields = ("initial", "ceiling", "jitter")
    __slots__ = _fields
    initial: float
    ceiling: float
    jitter: float

    def __init__(self, initial: float, ceiling: float, jitter: float = 0.0) -> None:
        # RT grows from the previous *jittered* RT (RFC 6887 §8.1.1), so jitter must stay well below
        # 0.5 or the interval could stop growing; the RFC's own RAND is ±0.1.
        if not (0 < initial <= ceiling) or not (0 <= jitter <= 0.25):
            raise ValueError("retransmit schedule needs 0 < initial <= ceiling and 0 <= jitter <= 0.25")
        init_fields(self, initial, ceiling, jitter)

    def interval(self, previous: float | None, rand: Callable[[], float] | None) -> float:
        """RFC 6887 §8.1.1: RT = (1 + RAND) * MIN(2 * RTprev, MRT), with RT = (1 + RAND) * IRT first.
        `rand` in [0, 1); None: `random.random` (asked only when the schedule has jitter)."""
        base = self.initial if previous is None else min(2 * previous, self.ceiling)
        if not self.jitter:
            return base
        if rand is None:
            import random

            rand = random.random
        return base * (1 + self.jitter * (2 * rand() - 1))


NATPMP_SCHEDULE = RetransmitSchedule(initial=0.25, ceiling=2.0)  # RFC 6886 §3.1: 250 ms, doubling
PCP_SCHEDULE = RetransmitSchedule(initial=0.25, ceiling=2.0, jitter=0.1)  # RFC 6887 §8.1.1 RAND
DEFAULT_DEADLINE = 2.0


class State(enum.Enum):
    WAITING = "waiting"
    ANSWERED = "answered"
    TIMED_OUT = "timed out"
    UNREACHABLE = "unreachable"  # ICMP port unreachable: nothing listens on the server's port


# Module names for the states: the per-request methods below test them as globals, not enum attributes.
_WAITING = State.WAITING
_ANSWERED = State.ANSWERED
_TIMED_OUT = State.TIMED_OUT
_UNREACHABLE = State.UNREACHABLE


class Exchange(_Generic[R]):
    """A request sent to `server` until `parse` accepts a reply from it, or the deadline passes.

    `parse` gets each datagram from the server and returns the typed reply, or raises DecodeError
    when the datagram is not an answer to *this* request (wrong opcode, nonce, port...). Such
    datagrams, and any from another source, are dropped and counted in `drops` by reason.
    """

    # Slots: one exchange per request, and its methods read these fields on the warm path (bench/peers.py).
    __slots__ = (
        "_drops",
        "_interval",
        "_next_send",
        "_parse",
        "_rand",
        "_schedule",
        "_state",
        "answered_at",
        "deadline_at",
        "key",
        "request",
        "result",
        "server",
        "started",
        "transmissions",
    )

    def __init__(
        self,
        request: bytes,
        server: Endpoint,
        parse: Callable[[bytes], R],
        *,
        now: float,
        deadline: float = DEFAULT_DEADLINE,
        schedule: RetransmitSchedule = NATPMP_SCHEDULE,
        rand: Callable[[], float] | None = None,
        key: Hashable | None = None,
    ) -> None:
        """`key`, when given, is what `reply_key` of the protocol returns for this request's answers,
        so a caller with many exchanges in flight can find the right one without parsing for each."""
        if deadline <= 0:
            raise ValueError("deadline must be positive")
        self.request = request
        self.server = server
        self.key = key
        self.started = now
        self.deadline_at = now + deadline
        self.transmissions = 0
        self._drops: Counter[str] | None = None  # made on the first drop: most exchanges never drop
        self.result: R | None = None
        self.answered_at: float | None = None
        self._parse = parse
        self._schedule = schedule
        self._rand = rand
        self._interval: float | None = None
        self._next_send: float = now
        self._state = _WAITING

    @property
    def state(self) -> State:
        return self._state

    @property
    def drops(self) -> Counter[str]:
        """Datagrams offered that did not answer this request, by reason."""
        if self._drops is None:
            self._drops = Counter()
        return self._drops

    @property
    def done(self) -> bool:
        return self._state is not _WAITING

    @property
    def timed_out(self) -> bool:
        return self._state is _TIMED_OUT

    def datagrams_to_send(self, now: float) -> list[bytes]:
        """The request, when a (re)transmission is due at `now`; otherwise nothing."""
        if self._state is not _WAITING or now < self._next_send:
            return []
        if now >= self.deadline_at:
            self._state = _TIMED_OUT
            return []
        self.transmissions += 1
        self._interval = self._schedule.interval(self._interval, self._rand)
        self._next_send = now + self._interval
        return [self.request]

    def timer(self) -> float | None:
        """When the caller must call `handle_timer` next (None once done)."""
        if self._state is not _WAITING:
            return None
        return min(self._next_send, self.deadline_at)

    def handle_timer(self, now: float) -> None:
        if now >= self.deadline_at and self._state is _WAITING:
            self._state = _TIMED_OUT

    def unreachable(self) -> None:
        """The server's host answered with ICMP port unreachable: end now instead of at the deadline."""
        if self._state is _WAITING:
            self._state = _UNREACHABLE

    @property
    def failed(self) -> bool:
        """Ended without an answer: timed out, or refused by ICMP port unreachable."""
        return self._state is _TIMED_OUT or self._state is _UNREACHABLE

    @property
    def refused(self) -> bool:
        """Ended by an ICMP port unreachable (see `unreachable`)."""
        return self._state is _UNREACHABLE

    def receive(self, data: bytes, source: Endpoint, now: float) -> str | None:
        """Offer a datagram. Returns None if it answered this request, else the reason it was dropped."""
        if self._state is not _WAITING:
            reason = "late reply"
        elif source != self.server:
            reason = "reply from another address"
        else:
            try:
                self.result = self._parse(data)
            except DecodeError as exc:
                reason = exc.reason
            else:
                self._state = _ANSWERED
                self.answered_at = now
                return None
        self.drops[reason] += 1
        return reason

    def failure(self, what: str) -> AutonatError | None:
        """The one-line error for an exchange that ended without an answer (None if answered or
        still waiting); `what` names the server ("NAT-PMP at 192.168.77.1:5351")."""
        if self._state is _UNREACHABLE:
            return RouterUnreachable(f"{what} is unreachable: the router answered ICMP port unreachable")
        if self._state is _TIMED_OUT:
            seconds = self.deadline_at - self.started
            tries = "try" if self.transmissions == 1 else "tries"
            return RouterTimeout(f"no answer from {what} within {seconds:g} s ({self.transmissions} {tries})")
        return None

    @property
    def round_trip(self) -> float | None:
        """Time from the first transmission to the accepted answer."""
        return None if self.answered_at is None else self.answered_at - self.started
