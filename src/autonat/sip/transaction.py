"""SIP server transactions, sans-IO (RFC 3261 §17.2, with RFC 6026's "Accepted" state for INVITE 2xx).

The caller owns sockets and clock, as in `autonat.proto.exchange`: it passes `now` in, performs the
returned actions, and calls `handle_timer(now)` when `timer()` says so:

    table = TransactionTable()
    actions = table.receive_request(request, now, reliable=False, destination=source)
    ... the TU answers: table.send_response(request, response, now)
    ... at table.timer(): table.handle_timer(now)

Actions: `Transmit(response, destination)` (send to `destination`, the packet's source or TCP connection
the caller gave with the request: NAT rule "reply to the source"), `Deliver(request)` (hand it to the TU),
`AckTimeout(request)` (no ACK came for a final response: for a 2xx the UAS sends BYE) and
`Terminated(key)`.

Deliberate choices:
- A retransmitted INVITE before the TU answered gets a 100 Trying at once; otherwise 100 Trying is sent
  when the TU has not answered within `Timers.trying` (200 ms, §17.2.1 SHOULD).
- The INVITE transaction does not retransmit 2xx (RFC 6026 §7.1: the TU does); `Uas2xxRetransmitter`
  is that TU helper (§13.3.1.4), kept by the dialog layer.
- RFC 2543 fallback matching (§17.2.3) of INVITE and ACK ignores the To tag in the key; the table then
  checks that an ACK's To tag equals the one in the response sent, as §17.2.3 asks.
- A non-INVITE transaction the TU never answers stays until `Timers.abandon` (64*T1 by default), so a
  TU bug cannot leak table entries; the RFC defines no such timer on the server side.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field

from autonat.proto.errors import DecodeError
from autonat.sip.message import Request, Response, make_response
from autonat.sip.timerheap import TimerHeap

__all__ = [
    "DEFAULT_MAX_TRANSACTIONS",
    "AckTimeout",
    "Action",
    "Deliver",
    "InviteServerTransaction",
    "NonInviteServerTransaction",
    "ServerTransaction",
    "State",
    "Terminated",
    "Timers",
    "TransactionKey",
    "TransactionStateError",
    "TransactionTable",
    "Transmit",
    "Uas2xxRetransmitter",
    "transaction_key",
]

DEFAULT_MAX_TRANSACTIONS = 10_000


@dataclass(frozen=True, slots=True)
class Timers:
    """§17.1.1.1 timer values in seconds (Table 4); shrink them in tests and the lab.

    `trying` is the §17.2.1 "200 ms" before an unanswered INVITE gets 100 Trying; `abandon` bounds a
    transaction the TU never answers (None: 64*T1)."""

    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0
    trying: float = 0.2
    abandon: float | None = None

    def __post_init__(self) -> None:
        if not (0 < self.t1 <= self.t2) or self.t4 < 0 or self.trying < 0:
            raise ValueError("timers need 0 < T1 <= T2, T4 >= 0 and trying >= 0")

    @property
    def timeout(self) -> float:
        """64*T1: Timers B, F, H, J and L (§17.1.1.1, RFC 6026 §8.11)."""
        return 64 * self.t1

    @property
    def abandon_after(self) -> float:
        return self.timeout if self.abandon is None else self.abandon


# --------------------------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Transmit:
    """Send `response` to `destination` (whatever the caller passed with the request)."""

    response: Response
    destination: Hashable = None


@dataclass(frozen=True, slots=True)
class Deliver:
    """Hand `request` to the TU: a new request, or an ACK for a 2xx (§17.2.1, RFC 6026 §7.1)."""

    request: Request


@dataclass(frozen=True, slots=True)
class AckTimeout:
    """No ACK within 64*T1 for the final response to `request` (Timer H, §17.2.1; §13.3.1.4 for a 2xx:
    the UAS SHOULD then send BYE)."""

    request: Request


@dataclass(frozen=True, slots=True)
class Terminated:
    """The transaction `key` is over (§17.2.1, §17.2.2); the table has forgotten it."""

    key: TransactionKey | None


Action = Transmit | Deliver | AckTimeout | Terminated


class TransactionStateError(ValueError):
    """The TU sent a response the transaction cannot send in its state (a programming error)."""


# --------------------------------------------------------------------------------------------- keys


@dataclass(frozen=True, slots=True)
class TransactionKey:
    """§17.2.3 matching key. RFC 3261 (magic cookie): branch, sent-by and method, with ACK mapped to INVITE
    (CANCEL is its own transaction, §9.2). RFC 2543 fallback: `legacy` holds Request-URI, To tag (None for
    INVITE/ACK), From tag, Call-ID, CSeq number and the whole top Via."""

    branch: str
    host: str
    port: int | None
    method: str
    legacy: tuple[str, str | None, str | None, str, int, str] | None = None


def transaction_key(request: Request) -> TransactionKey:
    """The §17.2.3 key of `request`; DecodeError when it lacks what matching needs."""
    via = request.top_via()
    method = "INVITE" if request.method == "ACK" else request.method
    branch = via.branch or ""
    if via.has_magic_cookie:
        return TransactionKey(branch.lower(), via.host.lower(), via.port, method)
    to_tag = None if method == "INVITE" else request.to_tag()
    top = request.headers.get("Via") or ""
    legacy = (request.uri, to_tag, request.from_tag(), request.call_id(), request.cseq()[0], top)
    return TransactionKey(branch, via.host.lower(), via.port, method, legacy)


# --------------------------------------------------------------------------------------------- transactions


class State(enum.Enum):
    TRYING = "Trying"
    PROCEEDING = "Proceeding"
    ACCEPTED = "Accepted"
    COMPLETED = "Completed"
    CONFIRMED = "Confirmed"
    TERMINATED = "Terminated"


_LINGERING = frozenset({State.ACCEPTED, State.COMPLETED, State.CONFIRMED})  # answered; only absorbing


class ServerTransaction:
    """Common part of §17.2.1 and §17.2.2: the request, the last response sent, and where replies go."""

    def __init__(
        self,
        request: Request,
        now: float,
        *,
        reliable: bool = False,
        timers: Timers = Timers(),
        destination: Hashable = None,
        key: TransactionKey | None = None,
    ) -> None:
        self.request = request
        self.reliable = reliable
        self.timers = timers
        self.destination = destination
        self.key = key
        self.created = now
        self.last_response: Response | None = None
        self._state = State.PROCEEDING
        self._delivered = False

    @property
    def state(self) -> State:
        return self._state

    @property
    def terminated(self) -> bool:
        return self._state is State.TERMINATED

    def timer(self) -> float | None:
        """When `handle_timer` must next be called (None: no timer runs)."""
        raise NotImplementedError

    def handle_timer(self, now: float) -> list[Action]:
        raise NotImplementedError

    def receive_request(self, request: Request, now: float, destination: Hashable = None) -> list[Action]:
        """The request that created the transaction (first call: `Deliver`), a retransmission or an ACK.
        A non-None `destination` replaces the stored one: replies follow the latest source."""
        raise NotImplementedError

    def send_response(self, response: Response, now: float) -> list[Action]:
        raise NotImplementedError

    def _transmit(self, response: Response) -> Transmit:
        return Transmit(response, self.destination)

    def _terminate(self) -> list[Action]:
        self._state = State.TERMINATED
        return [Terminated(self.key)]

    def _first(self, destination: Hashable) -> list[Action] | None:
        if destination is not None:
            self.destination = destination
        if self._delivered:
            return None
        self._delivered = True
        return [Deliver(self.request)]


class InviteServerTransaction(ServerTransaction):
    """§17.2.1 with RFC 6026 §7.1: Proceeding -> Completed (3xx-6xx; Timer G retransmits the final response
    over UDP, T1 doubling to T2; Timer H = 64*T1 gives up with `AckTimeout`) -> Confirmed (ACK; Timer I =
    T4 over UDP, 0 reliable) -> Terminated; or Proceeding -> Accepted (2xx; Timer L = 64*T1) -> Terminated.
    In Accepted, further 2xx from the TU are passed on, INVITE retransmissions absorbed, ACKs delivered."""

    def __init__(
        self,
        request: Request,
        now: float,
        *,
        reliable: bool = False,
        timers: Timers = Timers(),
        destination: Hashable = None,
        key: TransactionKey | None = None,
    ) -> None:
        super().__init__(request, now, reliable=reliable, timers=timers, destination=destination, key=key)
        self._trying_at: float | None = now + timers.trying
        self._g_at: float | None = None
        self._g_interval = timers.t1
        self._end_at: float | None = None  # Timer H, I or L

    def timer(self) -> float | None:
        times = [t for t in (self._trying_at, self._g_at, self._end_at) if t is not None]
        return min(times) if times and not self.terminated else None

    def _trying(self) -> Transmit:
        self._trying_at = None
        self.last_response = make_response(self.request, 100)
        return self._transmit(self.last_response)

    def receive_request(self, request: Request, now: float, destination: Hashable = None) -> list[Action]:
        first = self._first(destination)
        if first is not None:
            return first
        if request.method == "ACK":
            if self._state is State.ACCEPTED:
                return [Deliver(request)]
            if self._state is State.COMPLETED:
                self._state = State.CONFIRMED
                self._g_at = None
                if self.reliable:
                    return self._terminate()
                self._end_at = now + self.timers.t4  # Timer I
            return []
        if self._state is State.PROCEEDING:
            return [self._transmit(self.last_response) if self.last_response is not None else self._trying()]
        if self._state is State.COMPLETED and self.last_response is not None:
            return [self._transmit(self.last_response)]
        return []  # Accepted (RFC 6026 §7.1), Confirmed, Terminated: absorbed

    def send_response(self, response: Response, now: float) -> list[Action]:
        status = response.status
        if self._state is State.ACCEPTED and 200 <= status <= 299:
            return [self._transmit(response)]
        if self._state is not State.PROCEEDING:
            raise TransactionStateError(f"INVITE transaction in {self._state.value} cannot send {status}")
        self._trying_at = None
        self.last_response = response
        if status < 200:
            return [self._transmit(response)]
        self._end_at = now + self.timers.timeout  # Timer L (2xx) or H
        if status <= 299:
            self._state = State.ACCEPTED
        else:
            self._state = State.COMPLETED
            if not self.reliable:
                self._g_at = now + self.timers.t1
        return [self._transmit(response)]

    def handle_timer(self, now: float) -> list[Action]:
        actions: list[Action] = []
        if self._trying_at is not None and now >= self._trying_at and self._state is State.PROCEEDING:
            actions.append(self._trying())
        if self._end_at is not None and now >= self._end_at:
            if self._state is State.COMPLETED:
                actions.append(AckTimeout(self.request))
            return actions + self._terminate()
        if self._g_at is not None and now >= self._g_at and self.last_response is not None:
            actions.append(self._transmit(self.last_response))
            self._g_interval = min(2 * self._g_interval, self.timers.t2)
            self._g_at += self._g_interval
            if self._g_at <= now:
                self._g_at = now + self._g_interval
        return actions


class NonInviteServerTransaction(ServerTransaction):
    """§17.2.2: Trying -> Proceeding (1xx) -> Completed (final; Timer J = 64*T1 over UDP, 0 reliable) ->
    Terminated. A retransmitted request gets the last response again (nothing while Trying)."""

    def __init__(
        self,
        request: Request,
        now: float,
        *,
        reliable: bool = False,
        timers: Timers = Timers(),
        destination: Hashable = None,
        key: TransactionKey | None = None,
    ) -> None:
        super().__init__(request, now, reliable=reliable, timers=timers, destination=destination, key=key)
        self._state = State.TRYING
        self._end_at: float | None = now + timers.abandon_after

    def timer(self) -> float | None:
        return None if self.terminated else self._end_at

    def receive_request(self, request: Request, now: float, destination: Hashable = None) -> list[Action]:
        first = self._first(destination)
        if first is not None:
            return first
        if self._state in (State.PROCEEDING, State.COMPLETED) and self.last_response is not None:
            return [self._transmit(self.last_response)]
        return []

    def send_response(self, response: Response, now: float) -> list[Action]:
        if self._state not in (State.TRYING, State.PROCEEDING):
            raise TransactionStateError(f"transaction in {self._state.value} cannot send {response.status}")
        self.last_response = response
        actions: list[Action] = [self._transmit(response)]
        if response.status < 200:
            self._state = State.PROCEEDING
            return actions
        self._state = State.COMPLETED
        if self.reliable:
            return actions + self._terminate()
        self._end_at = now + self.timers.timeout  # Timer J
        return actions

    def handle_timer(self, now: float) -> list[Action]:
        if self._end_at is not None and now >= self._end_at and not self.terminated:
            return self._terminate()
        return []


# --------------------------------------------------------------------------------------------- 2xx helper


class Uas2xxRetransmitter:
    """§13.3.1.4: the UAS core retransmits its 2xx to INVITE, T1 doubling to T2, until the ACK arrives;
    without ACK after 64*T1 it reports `AckTimeout` (the caller then sends BYE and releases the call).

    The first transmission is the caller's (via the transaction); this object only retransmits. Over a
    reliable transport there is nothing to retransmit but the ACK timeout still runs."""

    def __init__(
        self,
        invite: Request,
        response: Response,
        now: float,
        *,
        reliable: bool = False,
        timers: Timers = Timers(),
        destination: Hashable = None,
    ) -> None:
        if not 200 <= response.status <= 299:
            raise ValueError("Uas2xxRetransmitter needs a 2xx response")
        self.invite = invite
        self.response = response
        self.destination = destination
        self.timers = timers
        self._interval = timers.t1
        self._next: float | None = None if reliable else now + timers.t1
        self._deadline = now + timers.timeout
        self.done = False
        self.acked = False

    def timer(self) -> float | None:
        if self.done:
            return None
        return self._deadline if self._next is None else min(self._next, self._deadline)

    def handle_timer(self, now: float) -> list[Action]:
        if self.done:
            return []
        if now >= self._deadline:
            self.done = True
            return [AckTimeout(self.invite)]
        if self._next is None or now < self._next:
            return []
        self._interval = min(2 * self._interval, self.timers.t2)
        self._next += self._interval
        if self._next <= now:
            self._next = now + self._interval
        return [Transmit(self.response, self.destination)]

    def matches_ack(self, ack: Request) -> bool:
        """Whether `ack` acknowledges this 2xx (§13.2.2.4, §12.2.1.1): same Call-ID, From tag, To tag and
        CSeq number. Malformed ACKs do not match."""
        try:
            return (
                ack.method == "ACK"
                and ack.call_id() == self.response.call_id()
                and ack.cseq()[0] == self.response.cseq()[0]
                and ack.from_tag() == self.response.from_tag()
                and ack.to_tag() == self.response.to_tag()
            )
        except DecodeError:
            return False

    def receive_ack(self, ack: Request) -> bool:
        """Stop retransmitting when `ack` matches; returns whether it did."""
        if self.done or not self.matches_ack(ack):
            return False
        self.done = self.acked = True
        return True


# --------------------------------------------------------------------------------------------- table


@dataclass(slots=True)
class TransactionTable:
    """Finds or creates server transactions (§17.2.3), absorbs retransmissions, forgets terminated ones,
    and holds at most `max_transactions` so a flood cannot eat memory (about 3.3 KB each).

    When full, the oldest *lingering* transaction (answered: Completed, Confirmed or Accepted, kept only
    to absorb retransmissions for 64*T1) is dropped to make room; only when every transaction is still
    waiting for the TU is a new request refused with 503 (§21.5.4). Without that, a sustained call rate
    above max_transactions / (2 * 64*T1) -- 156 calls/s with the defaults -- would be refused although the
    CPU has room: every call keeps its INVITE and its BYE transaction lingering for 32 s."""

    timers: Timers = Timers()
    max_transactions: int = DEFAULT_MAX_TRANSACTIONS
    transactions: dict[TransactionKey, ServerTransaction] = field(default_factory=dict)
    _timers: TimerHeap[TransactionKey] = field(default_factory=TimerHeap)
    _lingering: OrderedDict[TransactionKey, None] = field(default_factory=OrderedDict)
    evicted: int = 0

    def __len__(self) -> int:
        return len(self.transactions)

    def get(self, request: Request) -> ServerTransaction | None:
        return self.transactions.get(transaction_key(request))

    def find_invite_for_cancel(self, cancel: Request) -> ServerTransaction | None:
        """§9.2: the INVITE transaction a CANCEL refers to (same key but for the method)."""
        key = transaction_key(cancel)
        legacy = key.legacy and (key.legacy[0], None, *key.legacy[2:])
        found = self.transactions.get(TransactionKey(key.branch, key.host, key.port, "INVITE", legacy))
        return found if isinstance(found, InviteServerTransaction) else None

    def receive_request(
        self, request: Request, now: float, *, reliable: bool = False, destination: Hashable = None
    ) -> list[Action]:
        """Route a request: to its transaction, to a new one, or (an ACK matching none) to the TU."""
        key = transaction_key(request)
        tx = self.transactions.get(key)
        if tx is not None and request.method == "ACK" and key.legacy is not None:
            sent = tx.last_response
            if sent is None or sent.to_tag() != request.to_tag():
                tx = None  # §17.2.3: the ACK's To tag must match the response's
        if tx is None:
            if request.method == "ACK":
                return [Deliver(request)]
            if len(self.transactions) >= self.max_transactions:
                if not self._lingering:
                    return [Transmit(make_response(request, 503, extra_headers=[("Retry-After", "5")]), destination)]
                oldest, _ = self._lingering.popitem(last=False)
                self.transactions.pop(oldest, None)
                self._timers.set(oldest, None)
                self.evicted += 1
            kind = InviteServerTransaction if request.method == "INVITE" else NonInviteServerTransaction
            tx = kind(request, now, reliable=reliable, timers=self.timers, destination=destination, key=key)
            self.transactions[key] = tx
        return self._after(tx, tx.receive_request(request, now, destination))

    def send_response(self, request: Request, response: Response, now: float) -> list[Action]:
        """The TU's response to `request`; KeyError when its transaction is gone."""
        tx = self.transactions[transaction_key(request)]
        return self._after(tx, tx.send_response(response, now))

    def timer(self) -> float | None:
        return self._timers.next()

    def handle_timer(self, now: float) -> list[Action]:
        actions: list[Action] = []
        while (key := self._timers.pop_due(now)) is not None:
            tx = self.transactions[key]
            actions += self._after(tx, tx.handle_timer(now))
        return actions

    def _after(self, tx: ServerTransaction, actions: list[Action]) -> list[Action]:
        key = tx.key
        assert key is not None
        self._timers.set(key, None if tx.terminated else tx.timer())
        if tx.terminated:
            self.transactions.pop(key, None)
            self._lingering.pop(key, None)
        elif tx.state in _LINGERING and key not in self._lingering:
            self._lingering[key] = None
        return actions
