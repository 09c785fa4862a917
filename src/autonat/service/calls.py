"""Calls and dialogs of the SIP service (RFC 3261 §12 dialogs, §13 INVITE, §15 BYE), as plain state.

A `Leg` is one dialog with one peer; a `Call` is one or two legs and their media. The service
(autonat.service.sip) drives them; this module only holds what a dialog needs to build its next
in-dialog request, so it stays free of I/O.
"""

from __future__ import annotations

import itertools
import re
import time
from dataclasses import dataclass, field
from typing import Any

from autonat.addresses import IPAddress
from autonat.engine.pool import RtpPorts
from autonat.proto.errors import DecodeError
from autonat.service.transport import Peer
from autonat.sip.admission import Refusal, Ticket
from autonat.sip.message import Request, Response

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
    """The user part of a SIP URI (§19.1.1), unescaped only for the common %xx of digits; None if absent."""
    match = _USER.match(uri.strip())
    return match.group(1) if match else None


@dataclass
class MediaPorts:
    """One leg's media: the local RTP port (RTCP is +1), what the peer is told, and the router mappings
    when the ports came from the pool."""

    local_port: int
    advertised: IPAddress
    advertised_port: int
    advertised_rtcp: int
    mapped: RtpPorts | None = None


@dataclass
class Leg:
    """One dialog (§12): `uas` when the peer called us. Requests go to `peer` (the source of what the peer
    sent, or the connection), never to a Contact that may be private (NAT rule)."""

    peer: Peer
    call_id: str
    local_tag: str
    local_uri: str
    remote_uri: str
    remote_target: str
    uas: bool
    sip_address: IPAddress  # our address for this peer (Via, Contact)
    remote_tag: str | None = None
    route_set: list[str] = field(default_factory=list)
    local_cseq: int = 1
    invite: Request | None = None
    media: MediaPorts | None = None
    answered: bool = False
    acked: bool = False
    remote_sdp: bytes = b""
    local_sdp: bytes = b""

    @classmethod
    def from_invite(cls, invite: Request, peer: Peer, local_tag: str, sip_address: IPAddress) -> Leg:
        """The UAS side of a dialog created by `invite` (§12.1.1)."""
        contact = invite.headers.get("Contact")
        remote_uri = uri_of(invite.headers.get("From") or "")
        return cls(
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
            local_cseq=0,
            invite=invite,
            remote_sdp=invite.body,
        )

    def confirm_uac(self, response: Response) -> None:
        """The UAC side learns the dialog from a 2xx (§12.1.2): remote tag, target, reversed route set."""
        self.remote_tag = response.to_tag()
        contact = response.headers.get("Contact")
        if contact:
            self.remote_target = uri_of(contact)
        self.route_set = list(reversed(response.headers.get_all("Record-Route")))
        self.remote_sdp = response.body

    def next_cseq(self) -> int:
        self.local_cseq += 1
        return self.local_cseq


@dataclass
class Call:
    """A call: leg `a` is the caller (always a UAS dialog), `b` the leg we placed (bridged calls)."""

    kind: str  # "echo", "user", "gateway"
    number: str
    a: Leg
    profile: str
    b: Leg | None = None
    id: str = field(default_factory=lambda: f"c{next(_ids)}")
    started: float = field(default_factory=time.time)
    answered_at: float | None = None
    ended: bool = False
    end_reason: str | None = None
    media: Any = None  # RtpEcho | RtpRelay
    auth_tried: bool = False
    ticket: Ticket | None = None  # what admission granted it (released at hang-up)
    refusal: Refusal | None = None  # why its media could not be had (a cap), answered with 503 + Retry-After

    def legs(self) -> list[Leg]:
        return [self.a] if self.b is None else [self.a, self.b]

    def describe(self) -> dict[str, Any]:
        """`autonat calls`: who, where, which ports (local and mapped), how long."""
        legs = []
        for leg in self.legs():
            media = leg.media
            legs.append(
                {
                    "peer": str(leg.peer),
                    "call_id": leg.call_id,
                    "rtp_port": None if media is None else media.local_port,
                    "advertised": None if media is None else f"{media.advertised}:{media.advertised_port}",
                    "mapped": media is not None and media.mapped is not None,
                }
            )
        stats: dict[str, Any] = {}
        media_obj = self.media
        if media_obj is not None:
            if hasattr(media_obj, "stats"):
                stats = {"received": media_obj.stats.received, "sent": media_obj.stats.sent}
            elif hasattr(media_obj, "a"):
                stats = {
                    "a_received": media_obj.a.received,
                    "b_received": media_obj.b.received,
                }
        return {
            "id": self.id,
            "profile": self.profile,
            "kind": self.kind,
            "number": self.number,
            "state": "answered" if self.answered_at else "ringing",
            "duration": round(time.time() - (self.answered_at or self.started), 1),
            "legs": legs,
            "rtp": stats,
        }


def safe_call_id(message: Request | Response) -> str | None:
    try:
        return message.call_id()
    except DecodeError:
        return None
