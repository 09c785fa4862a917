"""SIP client side, sans-IO: request building (RFC 3261 §8.1.1), client transactions (§17.1 with RFC 6026's
"Accepted" state), response matching (§17.1.3), ACK and CANCEL construction (§17.1.1.3, §13.2.2.4, §9.1) and
an outbound registration (§10.2, RFC 3581 rport) in the manner of sofia-sip's gateway.

As with the server side (`autonat.sip.transaction`), the caller owns sockets and clock: it passes `now` in,
performs the returned actions and calls `handle_timer(now)` when `timer()` says so:

    table = ClientTransactionTable()
    actions = table.start(request, now)                 # [SendRequest(request)]
    ... a response arrives: table.receive_response(response, now)
    ... at table.timer(): table.handle_timer(now)

Actions: `SendRequest(request)` (transmit, or retransmit, to wherever the request goes), `DeliverResponse(response)`
(hand to the TU) and `TimedOut(request)` (treat as 408, §8.1.3.1; its subclass `TransportError` as 503).

Deliberate choices:
- An INVITE in Proceeding is bounded by a UAC "Timer C" (`proceeding_timeout`, 180 s from the INVITE, the value
  §16.6 gives proxies): RFC 3261 lets it wait forever, so a lost final response would leak a table entry. When it
  fires the TU gets `TimedOut` (it should CANCEL, §9.1); the transaction lives 64*T1 more so the 487 is ACKed
  (not delivered: the TU has its outcome) and a racing 2xx is still delivered so the TU can ACK and BYE it.
- Every response reaches the TU at most once, except 2xx to INVITE (RFC 6026 §8.4: in Accepted each 2xx, a
  retransmission or another fork, goes up so the TU can ACK it). A provisional response equal to one already
  delivered is a retransmission and dropped; a final response in Completed only re-triggers the ACK.
- A 2xx arriving in Completed (a broken proxy's fork) is delivered too: the TU must ACK and BYE it, or the far end
  keeps a half-open call.
- The table checks the top Via's sent-by as well as branch and CSeq method (§18.1.2: a response whose sent-by is
  not ours MUST be discarded).
- ACK for a 2xx uses loose routing only (§12.2.1.1; RFC 2543 strict routers are not supported).
"""

from __future__ import annotations

import enum
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from autonat.proto.errors import DecodeError
from autonat.proto.sdp import _contact_uri_span, _hostport, _scan_params
from autonat.sip.message import Headers, Request, Response, Via
from autonat.sip.timerheap import TimerHeap
from autonat.sip.transaction import DEFAULT_MAX_TRANSACTIONS, Timers

__all__ = [
    "DEFAULT_PROCEEDING_TIMEOUT",
    "USER_AGENT",
    "ClientAction",
    "ClientState",
    "ClientTransaction",
    "ClientTransactionTable",
    "DeliverResponse",
    "OutboundRegistration",
    "RegistrationConfig",
    "RegistrationState",
    "SendRequest",
    "TimedOut",
    "TooManyTransactions",
    "TransportError",
    "ack_for_2xx",
    "ack_for_non2xx",
    "make_cancel",
    "make_request",
    "new_branch",
    "new_call_id",
    "new_tag",
]

USER_AGENT = "autonat"
DEFAULT_PROCEEDING_TIMEOUT = 180.0
"""UAC Timer C: how long an INVITE may stay without a final response (see the module docstring)."""
_DEFAULT_TIMERS = Timers()
_MAX_SEEN_PROVISIONAL = 32  # distinct 1xx remembered per transaction for retransmission detection

_TOKEN = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:[!-~]+")  # §19.1, as the codec accepts it
_NAME_ADDR_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:[!-=?-~]+")  # no ">" inside <...>
_MAX_CSEQ = 2**31 - 1


# --------------------------------------------------------------------------------------------- identifiers


def new_branch() -> str:
    """A §8.1.1.7 branch: the magic cookie and 96 random bits, unique in space and time."""
    return "z9hG4bK" + secrets.token_hex(12)


def new_tag() -> str:
    """A §19.3 tag: 64 random bits (the RFC asks for at least 32)."""
    return secrets.token_hex(8)


def new_call_id(host: str) -> str:
    """A §8.1.1.4 Call-ID: 128 random bits, `@host` when a host is given (IPv6 in brackets)."""
    word = secrets.token_hex(16)
    return f"{word}@{_hostport(host, None)}" if host else word


# --------------------------------------------------------------------------------------------- building


def _check_uri(uri: str, what: str) -> None:
    if not _URI.fullmatch(uri):
        raise ValueError(f"{what} {uri!r} is not a URI")


def _name_addr(value: str, what: str) -> str:
    """`<uri>` for a bare URI; a value already in name-addr form (display name, `<...>`) is kept as written."""
    if "<" in value:
        return value
    if not _NAME_ADDR_URI.fullmatch(value):
        raise ValueError(f"{what} {value!r} is not a URI")
    return f"<{value}>"


def _via_value(transport: str, host: str, port: int | None, params: Iterable[tuple[str, str | None]]) -> str:
    text = "".join(f";{name}" if value is None else f";{name}={value}" for name, value in params)
    return f"SIP/2.0/{transport.upper()} {_hostport(host, port)}{text}"


def make_request(
    method: str,
    uri: str,
    *,
    from_uri: str,
    from_tag: str,
    to_uri: str,
    to_tag: str | None = None,
    call_id: str,
    cseq: int,
    via_host: str,
    via_port: int,
    transport: str,
    branch: str | None = None,
    contact: str | None = None,
    route: Sequence[str] = (),
    max_forwards: int = 70,
    extra_headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    content_type: str | None = None,
) -> Request:
    """A request built per §8.1.1: Via (`SIP/2.0/<TRANSPORT> host:port;branch=...;rport`, RFC 3581 so the
    response comes back through a NAT to the port we sent from), Max-Forwards, Route (each value as it goes
    in the header, e.g. `<sip:proxy;lr>`), From with tag, To (tag when in a dialog), Call-ID, CSeq, Contact,
    User-Agent, `extra_headers`, Content-Type, Content-Length.

    From/To/Contact take a URI (wrapped in `<>`) or a ready name-addr containing `<`. `branch` None draws a
    new one. Bad arguments raise ValueError (header injection included)."""
    if not _TOKEN.fullmatch(method):
        raise ValueError(f"method {method!r} is not a token")
    _check_uri(uri, "Request-URI")
    if not 0 <= cseq <= _MAX_CSEQ:
        raise ValueError(f"CSeq {cseq} is not 0-2**31-1")
    if not 0 <= max_forwards <= 255:
        raise ValueError(f"Max-Forwards {max_forwards} is not 0-255")
    if not _TOKEN.fullmatch(transport):
        raise ValueError(f"transport {transport!r} is not a token")
    branch = new_branch() if branch is None else branch
    if not _TOKEN.fullmatch(branch):
        raise ValueError(f"branch {branch!r} is not a token")
    if not _TOKEN.fullmatch(from_tag) or (to_tag is not None and not _TOKEN.fullmatch(to_tag)):
        raise ValueError("tags must be tokens")
    if not call_id or any(c in call_id for c in " \t"):
        raise ValueError(f"Call-ID {call_id!r} is empty or contains whitespace")
    if body and content_type is None:
        raise ValueError("a body needs a Content-Type (§20.15)")
    pairs: list[tuple[str, str]] = [
        ("Via", _via_value(transport, via_host, via_port, (("branch", branch), ("rport", None)))),
        ("Max-Forwards", str(max_forwards)),
        *(("Route", value) for value in route),
        ("From", f"{_name_addr(from_uri, 'From')};tag={from_tag}"),
        ("To", _name_addr(to_uri, "To") + (f";tag={to_tag}" if to_tag else "")),
        ("Call-ID", call_id),
        ("CSeq", f"{cseq} {method}"),
    ]
    if contact is not None:
        pairs.append(("Contact", _name_addr(contact, "Contact")))
    pairs.append(("User-Agent", USER_AGENT))
    pairs.extend((name, value) for name, value in extra_headers if name.lower() not in ("content-length", "l"))
    if content_type is not None:
        pairs.append(("Content-Type", content_type))
    pairs.append(("Content-Length", str(len(body))))
    return Request(method, uri, "SIP/2.0", Headers.of(*pairs), body)


def _required(message: Request | Response, name: str) -> str:
    value = message.headers.get(name)
    if value is None:
        raise DecodeError(f"missing {name} header")
    return value


def ack_for_non2xx(invite: Request, response: Response) -> Request:
    """§17.1.1.3: the ACK a client transaction sends for a 3xx-6xx: the INVITE's Request-URI, top Via (same
    branch: it belongs to the INVITE transaction), From, Call-ID and Route, the CSeq number with method ACK,
    and the response's To (with its tag). DecodeError when either message lacks those headers."""
    number, _ = invite.cseq()
    pairs: list[tuple[str, str]] = [
        ("Via", _required(invite, "Via")),
        ("Max-Forwards", "70"),
        *(("Route", value) for value in invite.headers.get_all("Route")),
        ("From", _required(invite, "From")),
        ("To", _required(response, "To")),
        ("Call-ID", _required(invite, "Call-ID")),
        ("CSeq", f"{number} ACK"),
        ("Content-Length", "0"),
    ]
    return Request("ACK", invite.uri, "SIP/2.0", Headers.of(*pairs))


def _first_contact_uri(message: Request | Response) -> str | None:
    value = message.headers.get("Contact")
    if value is None or value.strip() == "*":
        return None
    try:
        start, end = _contact_uri_span(value)
    except DecodeError:
        return None
    uri = value[start:end]
    return uri if _URI.fullmatch(uri) else None


def ack_for_2xx(
    invite: Request, response: Response, *, branch: str, body: bytes = b"", content_type: str | None = None
) -> Request:
    """§13.2.2.4: the ACK the UAC core sends for a 2xx, a transaction of its own (new `branch`), built as an
    in-dialog request (§12.2.1.1): Request-URI = the 2xx's Contact URI (else the INVITE's), Route = the 2xx's
    Record-Route reversed (§12.1.2, loose routing), From and Call-ID of the INVITE, To of the response (with
    its tag), CSeq number of the INVITE, and the INVITE's Authorization/Proxy-Authorization (§22.1). A late
    offer's answer goes in `body`."""
    if not _TOKEN.fullmatch(branch):
        raise ValueError(f"branch {branch!r} is not a token")
    if body and content_type is None:
        raise ValueError("a body needs a Content-Type (§20.15)")
    number, _ = invite.cseq()
    via = invite.top_via()
    params = [(name, branch if name == "branch" else value) for name, value in via.params if name != "received"]
    params = [(name, None if name == "rport" else value) for name, value in params]
    pairs: list[tuple[str, str]] = [
        ("Via", _via_value(via.transport, via.host, via.port, params)),
        ("Max-Forwards", "70"),
        *(("Route", value) for value in reversed(response.headers.get_all("Record-Route"))),
        ("From", _required(invite, "From")),
        ("To", _required(response, "To")),
        ("Call-ID", _required(invite, "Call-ID")),
        ("CSeq", f"{number} ACK"),
    ]
    for name in ("Authorization", "Proxy-Authorization"):
        pairs.extend((name, value) for value in invite.headers.get_all(name))
    if content_type is not None:
        pairs.append(("Content-Type", content_type))
    pairs.append(("Content-Length", str(len(body))))
    uri = _first_contact_uri(response) or invite.uri
    return Request("ACK", uri, "SIP/2.0", Headers.of(*pairs), body)


def make_cancel(request: Request) -> Request:
    """§9.1: the CANCEL of `request`: same Request-URI, Call-ID, From, To, CSeq number and Route, and only
    the top Via (same branch, so the server matches it to the INVITE, §9.2); method CANCEL, no body."""
    number, _ = request.cseq()
    pairs: list[tuple[str, str]] = [
        ("Via", _required(request, "Via")),
        ("Max-Forwards", "70"),
        *(("Route", value) for value in request.headers.get_all("Route")),
        ("From", _required(request, "From")),
        ("To", _required(request, "To")),
        ("Call-ID", _required(request, "Call-ID")),
        ("CSeq", f"{number} CANCEL"),
        ("User-Agent", USER_AGENT),
        ("Content-Length", "0"),
    ]
    return Request("CANCEL", request.uri, "SIP/2.0", Headers.of(*pairs))


# --------------------------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class SendRequest:
    """Transmit `request` (first time or a retransmission) to where the request goes (§18.1.1)."""

    request: Request


@dataclass(frozen=True, slots=True)
class DeliverResponse:
    """Hand `response` to the TU."""

    response: Response


@dataclass(frozen=True, slots=True)
class TimedOut:
    """No final response in time (Timer B or F, or the UAC Timer C): the TU treats it as 408 (§8.1.3.1)."""

    request: Request


@dataclass(frozen=True, slots=True)
class TransportError(TimedOut):
    """The transport failed (§17.1.4: ICMP error, connection refused); the TU treats it as 503 (§8.1.3.1).
    A `TimedOut` subclass, so code that only knows timeouts still ends the request."""

    reason: str = ""


ClientAction = SendRequest | DeliverResponse | TimedOut


class TooManyTransactions(RuntimeError):
    """`ClientTransactionTable.start` refused a request: the table holds its maximum of transactions."""


# --------------------------------------------------------------------------------------------- transaction


class ClientState(enum.Enum):
    CALLING = "Calling"
    TRYING = "Trying"
    PROCEEDING = "Proceeding"
    ACCEPTED = "Accepted"
    COMPLETED = "Completed"
    TERMINATED = "Terminated"


class ClientTransaction:
    """One client transaction; INVITE and non-INVITE behaviour chosen by the request's method.

    INVITE (§17.1.1.2, RFC 6026 §8.4): Calling (Timer A retransmits over UDP at T1 doubling; Timer B = 64*T1
    gives `TimedOut`) -> Proceeding (1xx; UAC Timer C, see the module docstring) -> Completed (3xx-6xx: ACK sent,
    and sent again for each retransmitted final response; Timer D = max(32 s, 64*T1) over UDP, 0 reliable) or
    Accepted (2xx; Timer M = 64*T1, every 2xx delivered) -> Terminated.

    Non-INVITE (§17.1.2.2): Trying (Timer E retransmits over UDP at T1 doubling to T2; Timer F = 64*T1 gives
    `TimedOut`) -> Proceeding (1xx; Timer E every T2) -> Completed (final; Timer K = T4 over UDP, 0 reliable) ->
    Terminated.

    ACK is not a transaction (§17.1.1.3, §13.2.2.4): ValueError.
    """

    def __init__(
        self,
        request: Request,
        now: float,
        *,
        reliable: bool = False,
        timers: Timers = _DEFAULT_TIMERS,
        proceeding_timeout: float = DEFAULT_PROCEEDING_TIMEOUT,
    ) -> None:
        if request.method == "ACK":
            raise ValueError("ACK is sent without a client transaction")
        self.request = request
        self.method = request.method
        self.invite = request.method == "INVITE"
        self.via: Via = request.top_via()
        self.branch: str = self.via.branch or ""
        self.reliable = reliable
        self.timers = timers
        self.created = now
        self._state = ClientState.CALLING if self.invite else ClientState.TRYING
        self._started = False
        self._interval = timers.t1
        self._retransmit_at: float | None = None if reliable else now + timers.t1  # Timer A or E
        self._timeout_at: float | None = now + timers.timeout  # Timer B or F
        self._c_at: float | None = None  # UAC Timer C (INVITE in Proceeding)
        self._end_at: float | None = None  # Timer D, K, M, or the grace after Timer C
        self._proceeding_timeout = proceeding_timeout
        self._timed_out = False
        self._seen: set[Response] = set()
        self.final_response: Response | None = None

    @property
    def state(self) -> ClientState:
        return self._state

    @property
    def terminated(self) -> bool:
        return self._state is ClientState.TERMINATED

    @property
    def key(self) -> tuple[str, str]:
        """The §17.1.3 matching key: top Via branch and CSeq method."""
        return (self.branch, self.method)

    def matches_sent_by(self, via: Via) -> bool:
        """§18.1.2: a response's top Via must carry the sent-by we inserted."""
        return (
            via.transport == self.via.transport
            and via.host.lower() == self.via.host.lower()
            and (via.port or None) == (self.via.port or None)
        )

    def start(self) -> list[ClientAction]:
        """The first transmission (once; later calls return nothing)."""
        if self._started or self.terminated:
            return []
        self._started = True
        return [SendRequest(self.request)]

    def timer(self) -> float | None:
        """When `handle_timer` must next be called (None: no timer runs)."""
        if self.terminated:
            return None
        times = [t for t in (self._retransmit_at, self._timeout_at, self._c_at, self._end_at) if t is not None]
        return min(times) if times else None

    def _terminate(self) -> None:
        self._state = ClientState.TERMINATED
        self._retransmit_at = self._timeout_at = self._c_at = self._end_at = None

    def _stop_retransmitting(self) -> None:
        self._retransmit_at = self._timeout_at = self._c_at = None

    def handle_timer(self, now: float) -> list[ClientAction]:
        if self.terminated:
            return []
        if self._end_at is not None and now >= self._end_at:
            self._terminate()
            return []
        if self._timeout_at is not None and now >= self._timeout_at:
            self._terminate()
            return [TimedOut(self.request)]
        if self._c_at is not None and now >= self._c_at:
            # Keep listening 64*T1 so the final response to the TU's CANCEL is ACKed (and a 2xx delivered).
            self._c_at = self._retransmit_at = None
            self._timed_out = True
            self._end_at = now + self.timers.timeout
            return [TimedOut(self.request)]
        if self._retransmit_at is not None and now >= self._retransmit_at:
            if self.invite:
                self._interval *= 2  # Timer A: no cap (§17.1.1.2)
            elif self._state is ClientState.PROCEEDING:
                self._interval = self.timers.t2
            else:
                self._interval = min(2 * self._interval, self.timers.t2)
            self._retransmit_at += self._interval
            if self._retransmit_at <= now:  # called late: do not burst to catch up
                self._retransmit_at = now + self._interval
            return [SendRequest(self.request)]
        return []

    def transport_error(self, reason: str = "") -> list[ClientAction]:
        """§17.1.4: the transport reported a failure for this request: the transaction ends, the TU is told."""
        if self.terminated or self._state not in (ClientState.CALLING, ClientState.TRYING, ClientState.PROCEEDING):
            return []
        self._terminate()
        return [] if self._timed_out else [TransportError(self.request, reason)]

    def _provisional(self, response: Response) -> list[ClientAction]:
        if response in self._seen or self._timed_out:
            return []
        if len(self._seen) < _MAX_SEEN_PROVISIONAL:
            self._seen.add(response)
        return [DeliverResponse(response)]

    def receive_response(self, response: Response, now: float) -> list[ClientAction]:
        """A response matched to this transaction (the table checks branch, method and sent-by)."""
        if self.terminated:
            return []
        if self.invite:
            return self._invite_response(response, now)
        return self._non_invite_response(response, now)

    def _invite_response(self, response: Response, now: float) -> list[ClientAction]:
        status = response.status
        state = self._state
        if state in (ClientState.CALLING, ClientState.PROCEEDING):
            if status < 200:
                if state is ClientState.CALLING:
                    self._state = ClientState.PROCEEDING
                    self._retransmit_at = self._timeout_at = None
                    if not self._timed_out:
                        self._c_at = max(now, self.created + self._proceeding_timeout)
                return self._provisional(response)
            self._stop_retransmitting()
            self.final_response = response
            if status < 300:
                self._state = ClientState.ACCEPTED
                self._end_at = now + self.timers.timeout  # Timer M
                return [DeliverResponse(response)]
            actions: list[ClientAction] = [] if self._timed_out else [DeliverResponse(response)]
            actions.append(SendRequest(ack_for_non2xx(self.request, response)))
            self._state = ClientState.COMPLETED
            if self.reliable:
                self._terminate()
            else:
                self._end_at = now + max(32.0, self.timers.timeout)  # Timer D
            return actions
        if 200 <= status < 300:
            return [DeliverResponse(response)]  # Accepted (RFC 6026 §8.4) or a broken fork in Completed
        if state is ClientState.COMPLETED and status >= 300:
            return [SendRequest(ack_for_non2xx(self.request, response))]  # §17.1.1.2: retransmitted final
        return []

    def _non_invite_response(self, response: Response, now: float) -> list[ClientAction]:
        if self._state not in (ClientState.TRYING, ClientState.PROCEEDING):
            return []  # Completed absorbs retransmitted final responses (§17.1.2.2)
        if response.status < 200:
            self._state = ClientState.PROCEEDING
            return self._provisional(response)
        self.final_response = response
        self._state = ClientState.COMPLETED
        self._stop_retransmitting()
        if self.reliable:
            self._terminate()
        else:
            self._end_at = now + self.timers.t4  # Timer K
        return [DeliverResponse(response)]


# --------------------------------------------------------------------------------------------- table


def _response_key(response: Response) -> tuple[tuple[str, str], Via]:
    via = response.top_via()
    return ((via.branch or "", response.cseq()[1]), via)


@dataclass(slots=True)
class ClientTransactionTable:
    """Client transactions keyed by top Via branch and CSeq method (§17.1.3), at most `max_transactions`
    at once (`start` raises `TooManyTransactions` beyond), terminated ones forgotten.

    Unmatched responses are dropped, except a 2xx to INVITE, delivered so the TU can ACK it (a retransmission
    after Accepted ended, or one from a fork, RFC 6026 §8.4). `cancel` sends a CANCEL for a pending INVITE,
    deferred until a provisional response arrives (§9.1)."""

    timers: Timers = field(default_factory=Timers)
    max_transactions: int = DEFAULT_MAX_TRANSACTIONS
    proceeding_timeout: float = DEFAULT_PROCEEDING_TIMEOUT
    transactions: dict[tuple[str, str], ClientTransaction] = field(default_factory=dict)
    _pending_cancels: dict[tuple[str, str], Request] = field(default_factory=dict)
    _timers: TimerHeap[tuple[str, str]] = field(default_factory=TimerHeap)

    def __len__(self) -> int:
        return len(self.transactions)

    def get(self, request: Request) -> ClientTransaction | None:
        """The live transaction of `request` (matched by its top Via branch and method)."""
        try:
            branch = request.top_via().branch or ""
        except DecodeError:
            return None
        return self.transactions.get((branch, request.method))

    def start(self, request: Request, now: float, *, reliable: bool = False) -> list[ClientAction]:
        """Start a transaction for `request` and return its first transmission. An ACK is passed straight
        through (it is no transaction). ValueError for a branch already in use, `TooManyTransactions` when
        the table is full."""
        return self._start(request, now, reliable=reliable, capped=True)

    def _start(self, request: Request, now: float, *, reliable: bool, capped: bool) -> list[ClientAction]:
        if request.method == "ACK":
            return [SendRequest(request)]
        if capped and len(self.transactions) >= self.max_transactions:
            raise TooManyTransactions(f"{len(self.transactions)} client transactions in progress (the maximum)")
        tx = ClientTransaction(
            request, now, reliable=reliable, timers=self.timers, proceeding_timeout=self.proceeding_timeout
        )
        if tx.key in self.transactions:
            raise ValueError(f"a {request.method} transaction with branch {tx.branch} is already in progress")
        self.transactions[tx.key] = tx
        return self._after(tx, tx.start())

    def receive_response(self, response: Response, now: float) -> list[ClientAction]:
        try:
            key, via = _response_key(response)
        except DecodeError:
            return []
        tx = self.transactions.get(key)
        if tx is None:
            if key[1] == "INVITE" and 200 <= response.status <= 299:
                return [DeliverResponse(response)]
            return []
        if not tx.matches_sent_by(via):
            return []
        actions = tx.receive_response(response, now)
        cancel = self._pending_cancels.get(key)
        if cancel is not None and tx.state is not ClientState.CALLING:
            del self._pending_cancels[key]
            if tx.state is ClientState.PROCEEDING:
                actions += self._start(cancel, now, reliable=tx.reliable, capped=False)
        return self._after(tx, actions)

    def cancel(self, request: Request, now: float) -> list[ClientAction]:
        """§9.1: CANCEL the INVITE `request`. Sent at once in Proceeding, when the first provisional response
        arrives in Calling (SHOULD NOT before); nothing when the INVITE is unknown, final or already cancelled."""
        tx = self.get(request)
        if tx is None or not tx.invite or tx.state not in (ClientState.CALLING, ClientState.PROCEEDING):
            return []
        if tx.key in self._pending_cancels or (tx.branch, "CANCEL") in self.transactions:
            return []
        cancel = make_cancel(tx.request)
        if tx.state is ClientState.CALLING:
            self._pending_cancels[tx.key] = cancel
            return []
        return self._start(cancel, now, reliable=tx.reliable, capped=False)

    def transport_error(self, request: Request, reason: str = "") -> list[ClientAction]:
        """§17.1.4: the transport failed sending `request`; its transaction ends with `TransportError`."""
        tx = self.get(request)
        if tx is None:
            return []
        return self._after(tx, tx.transport_error(reason))

    def forget(self, request: Request) -> bool:
        """Drop the transaction of `request` without any action (the TU gave up on it); whether one existed."""
        tx = self.get(request)
        if tx is None:
            return False
        tx._terminate()
        self._after(tx, [])
        return True

    def timer(self) -> float | None:
        return self._timers.next()

    def handle_timer(self, now: float) -> list[ClientAction]:
        actions: list[ClientAction] = []
        while (key := self._timers.pop_due(now)) is not None:
            tx = self.transactions[key]
            actions += self._after(tx, tx.handle_timer(now))
        return actions

    def _after(self, tx: ClientTransaction, actions: list[ClientAction]) -> list[ClientAction]:
        key = tx.key
        self._timers.set(key, None if tx.terminated else tx.timer())
        if tx.terminated:
            self._pending_cancels.pop(key, None)
            if self.transactions.get(key) is tx:
                del self.transactions[key]
        return actions


# --------------------------------------------------------------------------------------------- registration


class RegistrationState(enum.StrEnum):
    """sofia-sip gateway state names: REGISTER is a refresh in flight while still registered."""

    UNREGED = "UNREGED"
    TRYING = "TRYING"
    REGISTER = "REGISTER"
    REGED = "REGED"
    FAILED = "FAIL_WAIT"
    NOREG = "NOREG"


@dataclass(slots=True)
class RegistrationConfig:
    """What to register (§10.2): `registrar_uri` ("sip:host:port") is the Request-URI, `aor` ("sip:user@domain")
    goes in To and From. `password` is for the caller's `authorize` callback; it is not used here."""

    registrar_uri: str
    aor: str
    username: str
    password: str = field(repr=False)
    expires: int = 600
    retry: float = 30.0
    max_retry: float = 300.0
    transport: str = "udp"

    def __post_init__(self) -> None:
        _check_uri(self.registrar_uri, "registrar_uri")
        _check_uri(self.aor, "aor")
        if not 0 < self.expires <= 2**32 - 1:
            raise ValueError("expires must be 1..2**32-1 seconds")
        if not 0 < self.retry <= self.max_retry:
            raise ValueError("need 0 < retry <= max_retry")
        if not _TOKEN.fullmatch(self.transport):
            raise ValueError(f"transport {self.transport!r} is not a token")


_MAX_ROUNDS = 6
"""REGISTERs in one attempt (auth challenges, 423s) before giving up: a registrar answering every REGISTER
with a fresh challenge cannot make us loop."""
_MAX_DELTA = 2**32 - 1
_REFRESH_MARGIN = 5.0
_MAX_STALE_CONTACTS = 4


def _delta_seconds(text: str | None) -> int | None:
    """§25.1 delta-seconds (capped at 2**32-1), or None when absent or malformed."""
    if text is None:
        return None
    text = text.strip()
    if not text.isascii() or not text.isdigit() or len(text.lstrip("0")) > 10:
        return None
    return min(int(text), _MAX_DELTA)


def _uri_identity(uri: str) -> tuple[str, str, str, str] | None:
    """Scheme, userinfo, host (lower-cased) and port of a SIP URI (§19.1.4, URI parameters ignored)."""
    scheme, colon, rest = uri.partition(":")
    if not colon:
        return None
    rest = re.split(r"[?]", rest, maxsplit=1)[0]
    at = rest.rfind("@")
    user, hostport = (rest[:at], rest[at + 1 :]) if at >= 0 else ("", rest)
    hostport = hostport.split(";", 1)[0]
    if hostport.startswith("["):
        close = hostport.find("]")
        if close < 0:
            return None
        host, port = hostport[: close + 1], hostport[close + 1 :].removeprefix(":")
    else:
        host, _, port = hostport.partition(":")
    return (scheme.lower(), user, host.lower(), port)


def _contact_expires(response: Response, contact_uri: str) -> int | None:
    """§10.2.4: the `expires` parameter the registrar gave our Contact, None when it lists no such value."""
    ours = _uri_identity(contact_uri)
    if ours is None:
        return None
    for value in response.headers.get_all("Contact"):
        try:
            start, end = _contact_uri_span(value)
            params_at = end + 1 if value[end : end + 1] == ">" else end
            params, _ = _scan_params(value, params_at)
        except DecodeError:
            continue
        if _uri_identity(value[start:end]) != ours:
            continue
        for param in params:
            if param.name == "expires" and param.value_start is not None:
                return _delta_seconds(value[param.value_start : param.value_end])
        return None
    return None


def _challenge_nonces(values: Iterable[str]) -> tuple[set[str], bool]:
    """The nonces of the Digest challenges in WWW-/Proxy-Authenticate values (RFC 2617 §3.2.1, RFC 7616) and
    whether any says stale=true. Tolerant: a malformed tail is ignored, nothing raises."""
    nonces: set[str] = set()
    stale = False
    for value in values:
        scheme = ""
        index = 0
        length = len(value)
        while index < length:
            while index < length and value[index] in " \t,":
                index += 1
            start = index
            while index < length and value[index] not in " \t,=":
                index += 1
            token = value[start:index]
            while index < length and value[index] in " \t":
                index += 1
            if index < length and value[index] == "=":
                index += 1
                while index < length and value[index] in " \t":
                    index += 1
                if index < length and value[index] == '"':
                    chars: list[str] = []
                    index += 1
                    while index < length and value[index] != '"':
                        if value[index] == "\\" and index + 1 < length:
                            index += 1
                        chars.append(value[index])
                        index += 1
                    index += 1
                    param = "".join(chars)
                else:
                    start = index
                    while index < length and value[index] not in " \t,":
                        index += 1
                    param = value[start:index]
                if scheme == "digest":
                    name = token.lower()
                    if name == "nonce":
                        nonces.add(param)
                    elif name == "stale" and param.lower() == "true":
                        stale = True
            elif token:
                scheme = token.lower()
            else:
                break
    return nonces, stale


class OutboundRegistration:
    """Keeps one binding at a registrar (§10.2), sans-IO, in the manner of sofia-sip's gateway.

    One Call-ID and From tag for the life of the object, CSeq +1 per REGISTER (§10.2.4); each REGISTER runs
    its own non-INVITE client transaction (Timers E/F), so the caller routes every response whose Call-ID is
    `call_id` here and performs the `SendRequest` actions; timeouts are handled inside.

    - 401 -> Authorization, 407 -> Proxy-Authorization, from `authorize(challenge, "REGISTER", registrar_uri)`;
      credentials for both kinds are kept for the rest of the attempt (a proxy and a registrar may both
      challenge). A nonce is answered once: the same nonce challenged again without stale=true means the
      credentials are wrong -> FAIL_WAIT. At most 6 REGISTERs per attempt.
    - 423 -> again with Min-Expires (kept for later refreshes).
    - 2xx -> REGED; the granted time is our Contact's `expires` in the 200 (URI matched, host case-insensitive),
      else the Expires header, else what we asked. The refresh goes at half the granted time, but at least 5 s
      before expiry (never sooner than 1 s, or half the grant when that is shorter).
    - Any other final response or a timeout -> FAIL_WAIT; the retry comes after `retry` seconds, doubling per
      consecutive failure up to `max_retry` (a longer Retry-After is honoured up to `max_retry`). Deterministic.
    - `update_contact` re-registers at once; a changed Contact URI is removed in the same REGISTER
      (`;expires=0`, §10.2.2) so calls do not fork to the dead address.
    - `stop` sends Expires: 0 (§10.2.2) and leaves the state NOREG; an auth challenge to it is answered, any
      failure is left alone.

    `expires_at` is set only in REGED and REGISTER (the binding known to be in force).
    """

    def __init__(
        self,
        config: RegistrationConfig,
        *,
        authorize: Callable[[Response, str, str], str | None],
        timers: Timers = _DEFAULT_TIMERS,
    ) -> None:
        self.config = config
        self.timers = timers
        self._authorize = authorize
        self.call_id = new_call_id("")  # no "@host": which of our addresses would be a guess anyway
        self.from_tag = new_tag()
        self.cseq = 0
        self.state = RegistrationState.UNREGED
        self.expires_at: float | None = None
        self.last_status: int | None = None
        self.last_reason = ""
        self.failures = 0
        self.requested_expires = config.expires
        self.reliable = config.transport.lower() != "udp"
        self.via_host: str | None = None
        self.via_port = 0
        self.contact: str | None = None
        self._stale_contacts: list[str] = []  # old Contacts to remove with the next REGISTER (until a 2xx)
        self._tx: ClientTransaction | None = None
        self._unregistering = False
        self._next_at: float | None = None  # refresh or retry
        self._rounds = 0
        self._answered: set[str] = set()
        # header name -> (the challenge, a value computed for it and not yet sent)
        self._credentials: dict[str, tuple[Response, str | None]] = {}

    # ------------------------------------------------------------------ public

    def start(self, now: float, *, via_host: str, via_port: int, contact: str) -> list[ClientAction]:
        """Register (again) from `via_host:via_port` with `contact`; resets the back-off."""
        self.via_host, self.via_port, self.contact = via_host, via_port, contact
        self._stale_contacts.clear()
        self.failures = 0
        self._unregistering = False
        return self._begin(now, RegistrationState.TRYING)

    def update_contact(self, now: float, *, via_host: str, via_port: int, contact: str) -> list[ClientAction]:
        """Our address changed (NAT rebinding, new mapping): re-register at once. Before `start` this is
        `start`; after `stop` the address is only remembered."""
        if self.state is RegistrationState.UNREGED:
            return self.start(now, via_host=via_host, via_port=via_port, contact=contact)
        if self.contact is not None and self.contact != contact and self.cseq > 0:
            if self.contact not in self._stale_contacts:
                self._stale_contacts.append(self.contact)
            del self._stale_contacts[:-_MAX_STALE_CONTACTS]
        if contact in self._stale_contacts:
            self._stale_contacts.remove(contact)  # changed back: it is ours again
        self.via_host, self.via_port, self.contact = via_host, via_port, contact
        if self.state is RegistrationState.NOREG:
            self._stale_contacts.clear()
            return []
        self.failures = 0
        return self._begin(now, RegistrationState.TRYING)

    def stop(self, now: float) -> list[ClientAction]:
        """Remove the binding (REGISTER with Expires: 0) and stay NOREG."""
        sent_before = self.cseq > 0 and self.state is not RegistrationState.NOREG
        self.state = RegistrationState.NOREG
        self.expires_at = None
        self._next_at = None
        self._tx = None
        if not sent_before:
            return []
        self._unregistering = True
        self._new_attempt()
        return self._send(now)

    def timer(self) -> float | None:
        times = [t for t in (self._next_at, self._tx.timer() if self._tx else None) if t is not None]
        return min(times) if times else None

    def handle_timer(self, now: float) -> list[ClientAction]:
        actions: list[ClientAction] = []
        tx = self._tx
        if tx is not None and (when := tx.timer()) is not None and when <= now:
            for action in tx.handle_timer(now):
                if isinstance(action, TimedOut):
                    actions += self._failed(now, 408, "no response (timeout)", None)
                else:
                    actions.append(action)
            if tx.terminated and self._tx is tx:
                self._tx = None
        if self._next_at is not None and now >= self._next_at:
            self._next_at = None
            if self.state is RegistrationState.REGED:
                actions += self._begin(now, RegistrationState.REGISTER)
            elif self.state is RegistrationState.FAILED:
                actions += self._begin(now, RegistrationState.TRYING)
        return actions

    def receive_response(self, response: Response, now: float) -> list[ClientAction]:
        """A response with our Call-ID; one that is not for the REGISTER in flight is dropped."""
        tx = self._tx
        try:
            key, via = _response_key(response)
        except DecodeError:
            return []
        if tx is None or key != tx.key or not tx.matches_sent_by(via):
            return []
        actions: list[ClientAction] = []
        final: Response | None = None
        for action in tx.receive_response(response, now):
            if isinstance(action, DeliverResponse) and action.response.status >= 200:
                final = action.response
            elif isinstance(action, SendRequest):
                actions.append(action)
        if final is not None:
            # Retransmissions of this final response no longer match anything and are dropped, as Timer K
            # would absorb them.
            self._tx = None
            actions += self._final(final, now)
        return actions

    # ------------------------------------------------------------------ internals

    def _new_attempt(self) -> None:
        self._rounds = 0
        self._answered.clear()
        self._credentials.clear()

    def _begin(self, now: float, state: RegistrationState) -> list[ClientAction]:
        """A new attempt (initial, refresh, retry, new address): fresh auth state, one more CSeq."""
        self.state = state
        if state is not RegistrationState.REGISTER:
            self.expires_at = None
        self._next_at = None
        self._new_attempt()
        return self._send(now)

    def _send(self, now: float) -> list[ClientAction]:
        assert self.via_host is not None and self.contact is not None
        self.cseq += 1
        self._rounds += 1
        expires = 0 if self._unregistering else self.requested_expires
        extra: list[tuple[str, str]] = []
        if not self._unregistering:
            extra.extend(("Contact", f"{_name_addr(old, 'Contact')};expires=0") for old in self._stale_contacts)
        extra.append(("Expires", str(expires)))
        for name, (challenge, fresh) in self._credentials.items():
            # An older challenge (the proxy's, when the registrar challenges next) is answered anew, so the
            # callback can count nonce uses (RFC 7616 nc); the newest one was just computed.
            value = fresh if fresh is not None else self._authorize(challenge, "REGISTER", self.config.registrar_uri)
            self._credentials[name] = (challenge, None)
            if value is not None:
                extra.append((name, value))
        request = make_request(
            "REGISTER",
            self.config.registrar_uri,
            from_uri=self.config.aor,
            from_tag=self.from_tag,
            to_uri=self.config.aor,
            call_id=self.call_id,
            cseq=self.cseq,
            via_host=self.via_host,
            via_port=self.via_port,
            transport=self.config.transport,
            contact=self.contact,
            extra_headers=extra,
        )
        tx = ClientTransaction(request, now, reliable=self.reliable, timers=self.timers)
        self._tx = tx
        return tx.start()

    def _final(self, response: Response, now: float) -> list[ClientAction]:
        status = response.status
        self.last_status = status
        self.last_reason = response.reason
        if status in (401, 407):
            if self._challenge_answerable(response):
                return self._send(now)
            return self._failed(now, status, self.last_reason, response)
        if self._unregistering:
            self._unregistering = False
            return []
        if 200 <= status <= 299:
            return self._registered(response, now)
        if status == 423:
            minimum = _delta_seconds(response.headers.get("Min-Expires"))
            if minimum is not None and minimum > self.requested_expires and self._rounds < _MAX_ROUNDS:
                self.requested_expires = minimum
                return self._send(now)
            return self._failed(now, status, "interval too brief and no usable Min-Expires", response)
        return self._failed(now, status, self.last_reason, response)

    def _challenge_answerable(self, response: Response) -> bool:
        """Record credentials for a 401/407 when it is worth another REGISTER (see the class docstring)."""
        if self._rounds >= _MAX_ROUNDS:
            self.last_reason = "too many authentication rounds"
            return False
        challenge_header = "WWW-Authenticate" if response.status == 401 else "Proxy-Authenticate"
        nonces, stale = _challenge_nonces(response.headers.get_all(challenge_header))
        if not nonces:
            self.last_reason = f"{response.status} without a Digest challenge"
            return False
        if nonces <= self._answered and not stale:
            self.last_reason = "credentials rejected"
            return False
        name = "Authorization" if response.status == 401 else "Proxy-Authorization"
        value = self._authorize(response, "REGISTER", self.config.registrar_uri)
        if value is None:
            self.last_reason = "no credentials for this challenge"
            return False
        self._answered |= nonces
        self._credentials[name] = (response, value)
        return True

    def _registered(self, response: Response, now: float) -> list[ClientAction]:
        assert self.contact is not None
        contact_uri = self.contact
        if "<" in contact_uri:
            contact_uri = contact_uri[contact_uri.index("<") + 1 : contact_uri.find(">")]
        granted = _contact_expires(response, contact_uri)
        if granted is None:
            granted = _delta_seconds(response.headers.get("Expires"))
        if granted is None:
            granted = self.requested_expires
        if granted == 0:
            return self._failed(now, response.status, "registrar granted no time", response)
        self.state = RegistrationState.REGED
        self.failures = 0
        self._stale_contacts.clear()
        self.expires_at = now + granted
        delay = max(min(granted / 2, granted - _REFRESH_MARGIN), min(1.0, granted / 2))
        self._next_at = now + delay
        return []

    def _failed(self, now: float, status: int, reason: str, response: Response | None) -> list[ClientAction]:
        self._tx = None
        self.last_status = status
        self.last_reason = reason
        if self._unregistering or self.state is RegistrationState.NOREG:
            self._unregistering = False
            return []
        self.state = RegistrationState.FAILED
        self.expires_at = None
        self.failures += 1
        delay = min(self.config.retry * 2 ** min(self.failures - 1, 30), self.config.max_retry)
        retry_after = None
        if response is not None and (header := response.headers.get("Retry-After")) is not None:
            retry_after = _delta_seconds(re.split(r"[;(]", header, maxsplit=1)[0])  # §20.33: comment, params
        if retry_after is not None:
            delay = min(max(delay, float(retry_after)), self.config.max_retry)
        self._next_at = now + delay
        return []
