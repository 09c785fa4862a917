"""The test call in the call core (SipCore.place_probe) with the fake clock and shell of test_sip_harness:
the INVITE a phone behind the NAT would send, the answer, the ACK, the signal's window, the BYE, and every way
it can end (refused, no answer, unreachable, hung up by the peer, aborted), one at a time."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from ipaddress import IPv4Address

import pytest

from autonat.proto.sdp import parse_sdp_addresses
from autonat.sip import client as sipclient
from autonat.sip import core, probecall
from autonat.sip.message import Request, Response, make_response
from autonat.sip.peer import Peer
from autonat.sip.probecall import parse_target
from tests.unit.test_sip_harness import OUTSIDE, T1, US, Net, echo_profile

ECHO = Peer("udp", "203.0.113.100", 5060)  # an echo service on the internet
LAN_ECHO = Peer("udp", "10.0.0.5", 5060)  # one on our side of the router


@dataclass
class ProbeNet(Net):
    """The harness, playing the shell's part for the test call's media too (it binds at once)."""

    probes: list[core.StartProbe] = field(default_factory=list)

    def run(self, actions: list[core.Action]) -> None:
        queue: deque[core.Action] = deque(actions)
        while queue:
            action = queue.popleft()
            if isinstance(action, core.StartProbe):
                self.actions.append(action)
                self.probes.append(action)
                queue.extend(self.core.media_started(action.call, None, self.now))
            elif isinstance(action, core.AcquirePorts) and not self.hold_ports:
                self.actions.append(action)
                queue.extend(self.core.ports_ready(action.call, action.leg, self._ports(action), self.now))
            else:
                super().run([action])

    def place(self, peer: Peer = ECHO, seconds: float = 5, **kw: float) -> str:
        uri = f"sip:9196@{peer.ip}:{peer.port};transport={peer.transport}"
        call, actions = self.core.place_probe("p", parse_target(uri), seconds, self.now, **kw)
        self.run(actions)
        return call

    def ended(self) -> core.ProbeEnded:
        (ended,) = self.of(core.ProbeEnded)
        return ended


def answer_sdp(port: int = 6000, formats: str = "0") -> bytes:
    return (
        f"v=0\r\no=sipp 1 1 IN IP4 {ECHO.ip}\r\ns=-\r\nc=IN IP4 {ECHO.ip}\r\nt=0 0\r\n"
        f"m=audio {port} RTP/AVP {formats}\r\na=rtpmap:0 PCMU/8000\r\n"
    ).encode()


def respond(net: ProbeNet, invite: Request, status: int, *, body: bytes = b"", tag: str = "echo") -> Response:
    extra = [("Contact", f"<sip:echo@{ECHO.ip}:{ECHO.port}>")]
    if body:
        extra.append(("Content-Type", "application/sdp"))
    response = make_response(invite, status, to_tag=tag, extra_headers=extra, body=body)
    net.deliver(response, ECHO)
    return response


def bye_from_peer(invite: Request, ok: Response) -> Request:
    return sipclient.make_request(
        "BYE",
        f"sip:autonat@{OUTSIDE}:5060",
        from_uri=f"sip:9196@{ECHO.ip}",
        from_tag=ok.to_tag() or "",
        to_uri=(invite.headers.get("From") or "").split(";")[0],
        to_tag=invite.from_tag(),
        call_id=invite.call_id(),
        cseq=1,
        via_host=ECHO.ip,
        via_port=ECHO.port,
        transport="udp",
    )


def test_the_test_call_invites_like_a_phone_behind_the_nat_plays_its_seconds_and_hangs_up() -> None:
    net = ProbeNet(echo_profile())
    call_id = net.place(seconds=5)
    (acquire,) = net.of(core.AcquirePorts)
    assert acquire.mapped  # the peer is outside: ports from the pool, mapped on the router
    (start,) = net.probes
    assert (start.local, start.port, start.seconds) == (IPv4Address(US), 20000, 5.0)
    invite = net.take(ECHO, "INVITE")
    assert isinstance(invite, Request) and invite.uri == f"sip:9196@{ECHO.ip}:5060"
    via = invite.top_via()
    assert (via.host, via.port) == (OUTSIDE, 5060) and via.rport == ""  # RFC 3581: the answer comes back to us
    assert invite.headers.get("Contact") == f"<sip:autonat@{OUTSIDE}:5060>"
    sdp = parse_sdp_addresses(invite.body.decode())
    assert sdp.connection is not None and sdp.connection.address == OUTSIDE  # the router's address ...
    assert sdp.media[0].port == 30000 and sdp.media[0].formats == ("0", "8")  # ... and the mapped port
    assert [e.data["app"] for e in net.of(core.Publish) if e.kind == "call-start"] == ["probe"]
    net.advance(0.002)
    respond(net, invite, 180)
    assert not net.of(core.ProbeAnswered)
    ok = respond(net, invite, 200, body=answer_sdp())
    ack = net.take(ECHO, "ACK")
    assert isinstance(ack, Request) and ack.to_tag() == "echo" and ack.cseq() == (1, "ACK")
    (answered,) = net.of(core.ProbeAnswered)
    assert (answered.call, answered.remote, answered.payload_type) == (call_id, (ECHO.ip, 6000), 0)
    respond(net, invite, 200, body=answer_sdp())  # a retransmitted 2xx: ACKed again, nothing else
    assert isinstance(net.take(ECHO, "ACK"), Request) and len(net.of(core.ProbeAnswered)) == 1
    net.advance(5 + probecall.DRAIN - 0.01)
    assert net.none(ECHO, "BYE") and not net.of(core.ProbeEnded)
    net.advance(0.02)
    bye = net.take(ECHO, "BYE")
    assert isinstance(bye, Request) and bye.to_tag() == ok.to_tag() and bye.uri == f"sip:echo@{ECHO.ip}:5060"
    net.deliver(make_response(bye, 200), ECHO)
    (released,) = net.released
    assert [ports.local for ports in released.ports] == [20000]  # the pair goes back (and off the router)
    ended = net.ended()
    assert net.actions.index(released) < net.actions.index(ended)  # released first: the shell waits for it
    outcome = ended.outcome
    assert (outcome.answered, outcome.status, outcome.phrase, outcome.reason) == (True, 200, "OK", "test call done")
    assert outcome.setup == pytest.approx(0.002) and outcome.duration == pytest.approx(5 + probecall.DRAIN, abs=0.02)
    assert outcome.local == (US, 20000) and outcome.advertised == outcome.mapping == (OUTSIDE, 30000)
    assert outcome.through_mapping and outcome.remote == (ECHO.ip, 6000) and outcome.codec == "PCMU"
    assert outcome.uri == "sip:9196@203.0.113.100:5060" and outcome.call_id == invite.call_id()
    assert net.core.calls == [] and net.core.admission.calls == 0 and net.core.admission.media_calls == 0
    assert net.core.status("p", net.now)["CALLS-OUT"] == 1


def test_a_peer_on_our_side_is_called_with_our_local_address_and_no_mapping() -> None:
    net = ProbeNet(echo_profile())
    net.place(LAN_ECHO, seconds=1)
    (acquire,) = net.of(core.AcquirePorts)
    assert not acquire.mapped
    invite = net.take(LAN_ECHO, "INVITE")
    assert isinstance(invite, Request) and invite.headers.get("Contact") == f"<sip:autonat@{US}:5060>"
    sdp = parse_sdp_addresses(invite.body.decode())
    assert sdp.connection is not None and sdp.connection.address == US and sdp.media[0].port == 20000
    net.deliver(make_response(invite, 486, to_tag="busy"), LAN_ECHO)
    outcome = net.ended().outcome
    assert outcome.mapping is None and outcome.advertised == (US, 20000) and not outcome.through_mapping


def test_a_refusal_is_acked_by_the_transaction_and_ends_the_call_with_its_status() -> None:
    net = ProbeNet(echo_profile())
    net.place()
    invite = net.take(ECHO, "INVITE")
    assert isinstance(invite, Request)
    respond(net, invite, 486)
    assert isinstance(net.take(ECHO, "ACK"), Request)  # §17.1.1.3, by the client transaction
    outcome = net.ended().outcome
    assert (outcome.answered, outcome.status, outcome.phrase, outcome.reason) == (
        False,
        486,
        "Busy Here",
        "refused 486 Busy Here",
    )
    assert probecall.verdict(outcome, None) == (False, "fail: call refused 486 Busy Here")
    assert len(net.released) == 1 and net.none(ECHO, "CANCEL") and net.none(ECHO, "BYE")


def test_a_peer_that_rings_too_long_is_cancelled_no_answer() -> None:
    net = ProbeNet(echo_profile())
    net.place(answer_timeout=3.0)
    invite = net.take(ECHO, "INVITE")
    assert isinstance(invite, Request)
    respond(net, invite, 180)
    net.advance(2.9)
    assert net.none(ECHO, "CANCEL")
    net.advance(0.2)
    cancel = net.take(ECHO, "CANCEL")
    assert isinstance(cancel, Request) and cancel.top_via().branch == invite.top_via().branch  # §9.1
    outcome = net.ended().outcome
    assert (outcome.answered, outcome.status, outcome.reason) == (False, None, "no answer")
    # The 200 that crosses the CANCEL is ACKed and ended at once (§9.1, §15).
    respond(net, invite, 200, body=answer_sdp())
    assert isinstance(net.take(ECHO, "ACK"), Request) and isinstance(net.take(ECHO, "BYE"), Request)
    assert not net.of(core.ProbeAnswered) and len(net.of(core.ProbeEnded)) == 1


def test_a_silent_peer_is_no_answer_and_a_new_test_call_may_follow() -> None:
    net = ProbeNet(echo_profile())
    net.place(answer_timeout=3.0)
    net.advance(3.0)
    assert net.ended().outcome.reason == "no answer"
    assert net.none(ECHO, "CANCEL")  # §9.1: no CANCEL before a provisional response
    net.place()  # the first one is over: the next may start


def test_one_test_call_at_a_time_and_bad_arguments_are_value_errors() -> None:
    net = ProbeNet(echo_profile())
    net.place()
    target = parse_target("sip:9196@203.0.113.100")
    for profile, seconds, kw, error in [
        ("p", 5, {}, "a test call is already running"),
        ("nosuch", 5, {}, "no SIP profile 'nosuch'"),
        ("p", 0, {}, "seconds must be 1-60, not 0"),
        ("p", 5, {"answer_timeout": 0.0}, "the answer timeout must be"),
    ]:
        with pytest.raises(ValueError, match=error):
            net.core.place_probe(profile, target, seconds, net.now, **kw)


def test_the_peer_hanging_up_ends_the_test_call() -> None:
    net = ProbeNet(echo_profile())
    net.place()
    invite = net.take(ECHO, "INVITE")
    assert isinstance(invite, Request)
    ok = respond(net, invite, 200, body=answer_sdp())
    net.advance(1.0)
    net.deliver(bye_from_peer(invite, ok), ECHO)
    assert isinstance(net.take(ECHO, "200"), Response)
    outcome = net.ended().outcome
    assert outcome.answered and outcome.reason == "bye from callee" and outcome.duration == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (answer_sdp(formats="9"), "the answer accepts neither PCMU nor PCMA"),
        (b"", "the answer has no audio stream we can use"),
    ],
)
def test_an_answer_without_audio_we_can_send_is_hung_up_at_once(body: bytes, reason: str) -> None:
    net = ProbeNet(echo_profile())
    net.place()
    invite = net.take(ECHO, "INVITE")
    assert isinstance(invite, Request)
    respond(net, invite, 200, body=body)
    assert isinstance(net.take(ECHO, "ACK"), Request) and isinstance(net.take(ECHO, "BYE"), Request)
    assert not net.of(core.ProbeAnswered)
    outcome = net.ended().outcome
    assert outcome.answered and outcome.reason == reason
    assert probecall.verdict(outcome, probecall.Figures(0, 0)) == (False, f"fail: no audio sent ({reason})")


def test_pcma_only_answer_and_abort() -> None:
    net = ProbeNet(echo_profile())
    net.place()
    invite = net.take(ECHO, "INVITE")
    assert isinstance(invite, Request)
    respond(net, invite, 200, body=answer_sdp(formats="8"))
    (answered,) = net.of(core.ProbeAnswered)
    assert answered.payload_type == 8
    net.run(net.core.abort_probe(net.now))
    assert isinstance(net.take(ECHO, "BYE"), Request)
    assert net.ended().outcome.reason == "aborted"
    assert net.core.abort_probe(net.now) == []  # nothing left to abort


def test_no_ports_in_time_ends_the_test_call_before_any_invite() -> None:
    net = ProbeNet(echo_profile())
    net.hold_ports = True  # the router is slow to map the pair
    net.place(answer_timeout=2.0)
    net.advance(2.0)
    assert net.ended().outcome.reason == "no RTP ports in time" and net.none(ECHO, "INVITE")
    net.release_ports()  # the pair arrives after all: straight back
    assert len(net.released) == 1 and net.core.admission.calls == 0


def test_a_transport_failure_is_peer_unreachable() -> None:
    net = ProbeNet(echo_profile())
    net.place(Peer("tcp", ECHO.ip, 5060))
    invite = net.take(Peer("tcp", ECHO.ip, 5060), "INVITE")
    assert isinstance(invite, Request)
    net.run(net.core.send_failed("p", invite, net.now))
    assert net.ended().outcome.reason == "peer unreachable"
    assert probecall.verdict(net.ended().outcome, None) == (False, "fail: peer unreachable")


def test_shutdown_ends_the_test_call_too() -> None:
    net = ProbeNet(echo_profile())
    net.place()
    net.advance(64 * T1)  # Timer B: nobody answered the INVITE at all
    assert net.ended().outcome.reason == "no answer"
    net.place()
    net.run(net.core.stop(net.now))
    assert net.of(core.ProbeEnded)[-1].outcome.reason == "shutdown"
