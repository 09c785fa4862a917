# ruff: noqa: S107  (test credentials)
"""A harness for the call core (autonat.sip.core) shared by its tests: a fake clock, a fake shell, scripted phones.

The shell's part is played synchronously: ports come from a counter, media "binds" at once, everything sent is
kept per destination. Every message goes through the codec both ways (serialize, then parse), as on the wire.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

from autonat.proto.errors import DecodeError
from autonat.sip import client as sipclient
from autonat.sip import core
from autonat.sip.admission import Admission, AdmissionLimits
from autonat.sip.dialog import Ports
from autonat.sip.dialplan import DEFAULT_DIALPLAN, Extension, GatewaySettings
from autonat.sip.digest import DigestServer
from autonat.sip.guard import AuthGuard
from autonat.sip.message import BadRequest, Request, Response, make_response, parse_message
from autonat.sip.peer import Peer
from autonat.sip.registrar import Registrar
from autonat.sip.transaction import Timers

US = "192.168.1.10"  # our local address, behind the router
US6 = "2001:db8:0:77::10"  # our global IPv6 address (a dual-stack profile's): no NAT in front of it
OUTSIDE = "203.0.113.1"  # the router's address, advertised to peers on the internet
T1 = 0.5


def offer(port: int, *, direction: str | None = "sendrecv", address: str = "198.51.100.7", extra: str = "") -> bytes:
    family = "IP6" if ":" in address else "IP4"
    lines = [
        "v=0",
        f"o=phone 42 {port} IN {family} {address}",
        "s=-",
        f"c=IN {family} {address}",
        "t=0 0",
        f"m=audio {port} RTP/AVP 0 8 101",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:101 telephone-event/8000",
    ]
    if direction is not None:
        lines.append(f"a={direction}")
    text = "\r\n".join(lines) + "\r\n" + extra
    return text.encode()


class Addresses:
    """Peers in 198.51.100.0/24 and 203.0.113.0/24 are outside (told OUTSIDE), 10.0.0.0/8 are local."""

    def __init__(self) -> None:
        self.external = True

    def _choose(self, peer_ip: str) -> IPv4Address:
        outside = not ip_address(peer_ip).is_private or peer_ip.startswith(("198.51.100.", "203.0.113."))
        return IPv4Address(OUTSIDE if outside and self.external else US)

    def sip_address(self, profile: str, peer_ip: str) -> IPv4Address:
        return self._choose(peer_ip)

    def media_address(self, profile: str, peer_ip: str) -> IPv4Address:
        return self._choose(peer_ip)

    def rtp_local(self, profile: str, peer_ip: str) -> IPv4Address:
        return IPv4Address(US)

    def pinhole(self, profile: str, peer_ip: str) -> bool:
        return False

    def external_known(self) -> bool:
        return self.external


@dataclass
class Sent:
    message: Request | Response
    peer: Peer


@dataclass
class Net:
    """The core plus everything around it."""

    profile: core.ProfileConfig
    users: tuple[tuple[str, str], ...] = (("105", "pw105"),)
    now: float = 1000.0
    session_expires: int = 1800
    sent: list[Sent] = field(default_factory=list)
    actions: list[core.Action] = field(default_factory=list)
    media: dict[str, core.StartEcho | core.StartRelay] = field(default_factory=dict)
    released: list[core.ReleaseMedia] = field(default_factory=list)
    hold_ports: bool = False  # AcquirePorts are left pending (as while the router maps)
    pending: list[core.AcquirePorts] = field(default_factory=list)
    ports: itertools.count[int] = field(default_factory=lambda: itertools.count(20000, 2))
    addresses: Addresses = field(default_factory=Addresses)
    core: core.SipCore = field(init=False)

    def __post_init__(self) -> None:
        config = core.CoreConfig(
            (self.profile,), Timers(t1=T1, t2=4 * T1), session_expires=self.session_expires, min_se=90
        )
        self.core = core.SipCore(
            config,
            self.addresses,
            registrar=Registrar(dict(self.users), DigestServer("autonat", b"k" * 32)),
            admission=Admission(AdmissionLimits(source_rate=0)),
            guard=AuthGuard(),
        )
        self.run(self.core.start(self.now))

    # ----------------------------------------------------------------------------------- the fake shell
    def run(self, actions: list[core.Action]) -> None:
        queue: deque[core.Action] = deque(actions)
        while queue:
            action = queue.popleft()
            self.actions.append(action)
            if isinstance(action, core.Send):
                # Over the wire: what the core sends must survive the codec, but for the answers to a broken
                # request, which copy the broken Via/From/To it came with (§8.2.6.2), and to an RFC 2543 one
                # (its Via has no branch, which the codec demands of the responses it reads).
                data = action.message.serialize()
                try:
                    wire = parse_message(data)
                except DecodeError as exc:
                    assert isinstance(action.message, Response)
                    assert action.message.status in (400, 501, 505, 513) or exc.reason == "top Via has no branch"
                    wire = action.message
                assert isinstance(wire, Request | Response)
                self.sent.append(Sent(wire, action.peer))
            elif isinstance(action, core.AcquirePorts):
                if self.hold_ports:
                    self.pending.append(action)
                    continue
                queue.extend(self.core.ports_ready(action.call, action.leg, self._ports(action), self.now))
            elif isinstance(action, core.StartEcho | core.StartRelay):
                self.media[action.call] = action
                queue.extend(self.core.media_started(action.call, None, self.now))
            elif isinstance(action, core.ReleaseMedia):
                self.released.append(action)

    def _ports(self, action: core.AcquirePorts) -> Ports:
        port = next(self.ports)
        if action.mapped and action.family == 6:  # pinholes: our own address, the ports themselves
            return Ports(port, IPv6Address(US6), port, port + 1, True, ("pool6", port))
        if action.mapped:
            return Ports(port, IPv4Address(OUTSIDE), port + 10000, port + 10001, True, ("pool", port))
        return Ports(port)

    def release_ports(self) -> None:
        """The router answers: every pending AcquirePorts gets its ports now."""
        pending, self.pending = self.pending, []
        self.hold_ports = False
        for action in pending:
            self.run(self.core.ports_ready(action.call, action.leg, self._ports(action), self.now))

    def deliver(self, message: Request | Response, peer: Peer) -> None:
        wire = parse_message(message.serialize())
        assert isinstance(wire, Request | Response)
        self.run(self.core.receive(self.profile.name, wire, peer, self.now))

    def deliver_bytes(self, data: bytes, peer: Peer) -> None:
        try:
            wire = parse_message(data)
        except BadRequest as bad:
            self.run(self.core.receive(self.profile.name, bad, peer, self.now))
            return
        assert isinstance(wire, Request | Response)
        self.run(self.core.receive(self.profile.name, wire, peer, self.now))

    def advance(self, seconds: float) -> None:
        """Time passes: every deadline on the way fires at its own time."""
        end = self.now + seconds
        while (when := self.core.timer()) is not None and when <= end:
            self.now = max(self.now, when)
            self.run(self.core.handle_timer(self.now))
        self.now = end

    # ----------------------------------------------------------------------------------- what was sent
    def to(self, peer: Peer) -> list[Request | Response]:
        return [s.message for s in self.sent if s.peer == peer]

    def take(self, peer: Peer, what: str) -> Request | Response:
        """The first message to `peer` whose method or status is `what`, removed from the record."""
        for index, sent in enumerate(self.sent):
            message = sent.message
            if sent.peer == peer and (
                (isinstance(message, Request) and message.method == what)
                or (isinstance(message, Response) and str(message.status) == what)
            ):
                del self.sent[index]
                return message
        seen = [m.method if isinstance(m, Request) else m.status for m in self.to(peer)]
        raise AssertionError(f"nothing {what!r} was sent to {peer}; sent there: {seen}")

    def none(self, peer: Peer, what: str) -> bool:
        return not any(
            (isinstance(m, Request) and m.method == what) or (isinstance(m, Response) and str(m.status) == what)
            for m in self.to(peer)
        )

    def of(self, kind: type[Any]) -> list[Any]:
        return [a for a in self.actions if isinstance(a, kind)]


def echo_profile(**kw: Any) -> core.ProfileConfig:
    return core.ProfileConfig("p", 5060, dialplan=DEFAULT_DIALPLAN, auth_calls=False, external_media=True, **kw)


def gateway_profile(gateway: GatewaySettings, dialplan: tuple[Extension, ...], **kw: Any) -> core.ProfileConfig:
    return core.ProfileConfig("p", 5060, dialplan=dialplan, gateways=(gateway,), auth_calls=False, **kw)


class Phone:
    """A scripted user agent at `peer`: builds the requests a phone sends in one dialog."""

    def __init__(self, net: Net, peer: Peer, user: str = "caller") -> None:
        self.net, self.peer, self.user = net, peer, user
        self.host = f"[{peer.ip}]" if ":" in peer.ip else peer.ip  # RFC 3261 §19.1.1: an IPv6 reference
        self.tag = sipclient.new_tag()
        self.call_id = sipclient.new_call_id(peer.ip)
        self.cseq = 0
        self.remote_tag: str | None = None
        self.invite: Request | None = None

    def request(self, method: str, number: str, *, body: bytes = b"", extra: list[tuple[str, str]] | None = None,
                cseq: int | None = None) -> Request:  # fmt: skip
        if cseq is None:
            self.cseq += 1
            cseq = self.cseq
        return sipclient.make_request(
            method,
            f"sip:{number}@{OUTSIDE}:5060",
            from_uri=f"sip:{self.user}@{self.host}",
            from_tag=self.tag,
            to_uri=f"sip:{number}@{OUTSIDE}",
            to_tag=self.remote_tag if method != "INVITE" or self.remote_tag else None,
            call_id=self.call_id,
            cseq=cseq,
            via_host=self.peer.ip,
            via_port=self.peer.port,
            transport=self.peer.transport,
            contact=f"sip:{self.user}@{self.host}:{self.peer.port}",
            extra_headers=extra or [],
            body=body,
            content_type="application/sdp" if body else None,
        )

    def call(
        self, number: str = "9196", body: bytes | None = None, extra: list[tuple[str, str]] | None = None
    ) -> Request:
        self.invite = self.request("INVITE", number, body=offer(40000) if body is None else body, extra=extra)
        self.net.deliver(self.invite, self.peer)
        return self.invite

    def answered(self) -> Response:
        ok = self.net.take(self.peer, "200")
        assert isinstance(ok, Response)
        self.remote_tag = ok.to_tag()
        return ok

    def ack(self, ok: Response, invite: Request | None = None, body: bytes = b"") -> None:
        sent = invite or self.invite
        assert sent is not None
        ack = sipclient.ack_for_2xx(
            sent, ok, branch=sipclient.new_branch(), body=body, content_type="application/sdp" if body else None
        )
        self.net.deliver(ack, self.peer)

    def reinvite(self, body: bytes, number: str = "9196", method: str = "INVITE") -> Request:
        request = self.request(method, number, body=body)
        self.net.deliver(request, self.peer)
        return request

    def respond(
        self, request: Request, status: int, *, body: bytes = b"", extra: list[tuple[str, str]] | None = None
    ) -> None:
        headers = list(extra or [])
        if body:
            headers.append(("Content-Type", "application/sdp"))
        if status < 300 and request.method == "INVITE":
            headers.append(("Contact", f"<sip:{self.user}@{self.host}:{self.peer.port}>"))
        response = make_response(request, status, to_tag=self.tag if request.to_tag() is None else None,
                                 extra_headers=headers, body=body)  # fmt: skip
        self.net.deliver(response, self.peer)


def register(net: Net, peer: Peer, user: str = "105", password: str = "pw105") -> Response:
    """A phone registers at `peer` (digest, §22): the 401 challenge, then the answer."""
    from autonat.sip.digest import client_authorization, parse_challenge

    call_id, tag = sipclient.new_call_id(peer.ip), sipclient.new_tag()

    def build(cseq: int, auth: str | None) -> Request:
        return sipclient.make_request(
            "REGISTER",
            f"sip:{OUTSIDE}:5060",
            from_uri=f"sip:{user}@{OUTSIDE}",
            from_tag=tag,
            to_uri=f"sip:{user}@{OUTSIDE}",
            call_id=call_id,
            cseq=cseq,
            via_host="10.9.9.9",  # a private Via/Contact, as behind a NAT
            via_port=5062,
            transport=peer.transport,
            contact=f"sip:{user}@10.9.9.9:5062",
            extra_headers=[("Expires", "3600")] + ([("Authorization", auth)] if auth else []),
        )

    net.deliver(build(1, None), peer)
    challenge = net.take(peer, "401")
    header = challenge.headers.get("WWW-Authenticate")
    assert header is not None
    auth = client_authorization(
        parse_challenge(header), method="REGISTER", uri=f"sip:{OUTSIDE}:5060", username=user, password=password,
        cnonce="c",
    )  # fmt: skip
    net.deliver(build(2, auth), peer)
    answer = net.take(peer, "200")
    assert isinstance(answer, Response)
    return answer
