"""Calls and dialogs as plain state (RFC 3261 §12 dialogs, §13-§15; RFC 3264 offer/answer; RFC 4028 timers).

A `Leg` is one dialog with one peer: its identifiers, where its requests go, its media ports, the last session
descriptions each side sent and the offer/answer exchange in progress, its 2xx retransmissions and its session
timer. A `Call` is one or two legs: `a` the first (the caller's, a UAS dialog; for the test call, our own UAC dialog
towards the echo), `b` the leg we placed for a bridged call. Everything one call is made of lives here, in one
place; `autonat.sip.core` is the only code that changes it, and it holds no I/O: the asyncio shell only ever sees
the actions the core returns.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any

from autonat.addresses import IPAddress, uri_host
from autonat.proto.errors import DecodeError
from autonat.sip.admission import Refusal, Ticket
from autonat.sip.dialplan import GatewaySettings
from autonat.sip.message import Request, Response
from autonat.sip.peer import Peer
from autonat.sip.session import Description
from autonat.sip.transaction import Uas2xxRetransmitter

__all__ = ["Call", "Leg", "MediaPorts", "Ports", "safe_call_id", "uri_of", "user_of"]

_URI_IN_BRACKETS = re.compile(r"<([^>]*)>")
_USER = re.compile(r"^sips?:([^@;?>]+)@", re.I)
_ids = itertools.count(1)


def uri_of(value: str) -> str:
    """The URI of a name-addr or addr-spec header value (§20.10, §20.20, §20.39): inside <...>, else up
    to the first parameter."""
    match = _URI_IN_BRACKETS.search(value)
    if match:
        return match.group(1).strip()
    return value.split(";", 1)[0].strip()


def user_of(uri: str) -> str | None:
    """The user part of a SIP URI (§19.1.1), as written; None if absent."""
    match = _USER.match(uri.strip())
    return match.group(1) if match else None


def safe_call_id(message: Request | Response) -> str | None:
    try:
        return message.call_id()
    except DecodeError:
        return None


@dataclass(frozen=True, slots=True)
class Ports:
    """What the shell got for one leg's media: the local RTP port (RTCP on the next one) and, when the pair is
    mapped on the router, the external address and ports. `handle` is the shell's own (the pool's record),
    given back untouched when the ports are released."""

    local: int
    external_ip: IPAddress | None = None
    external_rtp: int = 0
    external_rtcp: int = 0
    mapped: bool = False
    handle: object = None


@dataclass(frozen=True, slots=True)
class MediaPorts:
    """One leg's media as its peer is told: `advertised` address and ports (the router's for a peer outside),
    and the local address the sockets bind."""

    ports: Ports
    local_address: IPAddress
    advertised: IPAddress
    advertised_port: int
    advertised_rtcp: int

    @property
    def local_port(self) -> int:
        return self.ports.local


@dataclass(eq=False, slots=True)
class Leg:
    """One dialog (§12). `uas` when the peer called us. Requests go to `peer` (the source of what the peer sent,
    or its connection), never to a Contact that may be private (NAT rule)."""

    role: str  # "a" (the caller) or "b" (the leg we placed)
    peer: Peer
    call_id: str
    local_tag: str
    local_uri: str
    remote_uri: str
    remote_target: str
    uas: bool
    sip_address: IPAddress  # our address for this peer (Via, Contact)
    media_address: IPAddress | None = None  # ... and in SDP, decided when its ports are asked for
    remote_tag: str | None = None
    route_set: list[str] = field(default_factory=list)
    local_cseq: int = 0
    remote_cseq: int | None = None
    invite: Request | None = None  # the INVITE that makes the dialog: received (uas) or sent (uac)
    answered: bool = False  # a 2xx to `invite` was sent (uas) or received (uac)
    acked: bool = False
    media: MediaPorts | None = None
    # --- offer/answer (RFC 3264; one exchange at a time per dialog, RFC 3261 §14)
    remote: Description | None = None  # the peer's last session description
    local_sdp: bytes = b""  # ours, as last sent
    session_id: int = 0
    sdp_version: int = 0
    ice: tuple[str, str] | None = None  # our (ufrag, pwd) when the peer uses ICE: we answer as ICE-lite
    allows_update: bool = False  # the peer listed UPDATE in Allow (RFC 3311 §5.1)
    offer_in: Request | None = None  # the peer's re-INVITE/UPDATE waiting for the other leg's answer
    out: Request | None = None  # our re-INVITE or UPDATE in flight on this dialog
    out_origin: Leg | None = None  # the leg whose offer `out` carries on (None: our own refresh)
    awaiting_answer: int | None = None  # CSeq of the INVITE whose 2xx carried our offer: the answer is in its ACK
    late_ack: Response | None = None  # (uac) the 2xx whose ACK waits for the other leg's answer
    retransmitters: dict[int, Uas2xxRetransmitter] = field(default_factory=dict)  # by INVITE CSeq
    # --- session timer (RFC 4028)
    se_interval: int | None = None
    se_refresher_us: bool = False
    se_at: float | None = None  # when we refresh (refresher us) or give up (refresher them)
    retry_at: float | None = None  # a refresh that met 491 goes again then (§14.1)
    # --- retries of our INVITE on leg b (once each)
    auth_tried: bool = False
    se_retried: bool = False

    @classmethod
    def from_invite(cls, invite: Request, peer: Peer, local_tag: str, sip_address: IPAddress) -> Leg:
        """The UAS side of a dialog created by `invite` (§12.1.1)."""
        contact = invite.headers.get("Contact")
        remote_uri = uri_of(invite.headers.get("From") or "")
        return cls(
            role="a",
            peer=peer,
            call_id=invite.call_id(),
            local_tag=local_tag,
            local_uri=uri_of(invite.headers.get("To") or ""),
            remote_uri=remote_uri,
            remote_target=uri_of(contact) if contact else remote_uri,
            uas=True,
            sip_address=sip_address,
            remote_tag=invite.from_tag(),
            route_set=list(invite.headers.get_all("Record-Route")),
            remote_cseq=invite.cseq()[0],
            invite=invite,
            allows_update=_allows_update(invite),
        )

    def confirm_uac(self, response: Response) -> None:
        """The UAC side learns the dialog from a 2xx (§12.1.2): remote tag, target, reversed route set."""
        self.remote_tag = response.to_tag()
        contact = response.headers.get("Contact")
        if contact:
            self.remote_target = uri_of(contact)
        self.route_set = list(reversed(response.headers.get_all("Record-Route")))
        self.allows_update = _allows_update(response)

    def next_cseq(self) -> int:
        self.local_cseq += 1
        return self.local_cseq

    @property
    def busy(self) -> bool:
        """An offer/answer exchange is under way on this dialog (RFC 3261 §14.1: no second one meanwhile)."""
        return self.out is not None or self.offer_in is not None or self.awaiting_answer is not None

    def deadline(self) -> float | None:
        times = [r.timer() for r in self.retransmitters.values()]
        times += [self.se_at, self.retry_at]
        present = [t for t in times if t is not None]
        return min(present) if present else None


def _allows_update(message: Request | Response) -> bool:
    return any(
        token.strip().upper() == "UPDATE" for value in message.headers.get_all("Allow") for token in value.split(",")
    )


@dataclass(eq=False, slots=True)
class BTarget:
    """Where leg b of a bridged call goes: the peer, the Request-URI and To, our From user, the gateway."""

    peer: Peer
    uri: str
    to_uri: str
    from_user: str | None
    gateway: GatewaySettings | None = None


@dataclass(eq=False, slots=True)
class Call:
    """A call: leg `a` is the caller's (a UAS dialog; the test call's is our UAC dialog), `b` the leg we placed
    (bridged calls)."""

    profile: str
    kind: str  # "echo", "user", "gateway"
    number: str
    a: Leg
    started: float  # the core's clock
    ticket: Ticket | None = None  # what admission granted it (released at hang-up)
    b: Leg | None = None
    target: BTarget | None = None
    id: str = field(default_factory=lambda: f"c{next(_ids)}")
    answered_at: float | None = None
    ended: bool = False
    end_reason: str | None = None
    refusal: Refusal | None = None  # why its media could not be had (a cap): 503 + Retry-After
    media: str = "none"  # "none", "starting" (the shell binds the sockets), "up"
    late: bool = False  # the caller's INVITE had no offer: ours goes in the 200, the answer in the ACK

    def legs(self) -> list[Leg]:
        return [self.a] if self.b is None else [self.a, self.b]

    def other(self, leg: Leg) -> Leg | None:
        return self.b if leg is self.a else self.a

    def deadline(self) -> float | None:
        times = [t for t in (leg.deadline() for leg in self.legs()) if t is not None]
        return min(times) if times else None

    def describe(self, now: float) -> dict[str, Any]:
        """`autonat calls`: who, where, which ports (local and mapped), how long."""
        legs = []
        for leg in self.legs():
            media = leg.media
            legs.append(
                {
                    "peer": str(leg.peer),
                    "call_id": leg.call_id,
                    "rtp_port": None if media is None else media.local_port,
                    "advertised": None if media is None else f"{uri_host(media.advertised)}:{media.advertised_port}",
                    "mapped": media is not None and media.ports.mapped,
                    # What the phone last said it does (RFC 3264 §6.1): "sendonly" while it holds the call.
                    "direction": None if leg.remote is None else leg.remote.direction,
                }
            )
        return {
            "id": self.id,
            "profile": self.profile,
            "kind": self.kind,
            "number": self.number,
            "state": "answered" if self.answered_at is not None else "ringing",
            "duration": round(now - (self.answered_at if self.answered_at is not None else self.started), 1),
            "legs": legs,
        }
