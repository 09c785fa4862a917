# ruff: noqa: S106  (test credentials)
"""The call core with a fake clock and a fake shell (tests/unit/test_sip_harness.py): milliseconds, no sockets.

Offer/answer and hold (RFC 3264 §6.1, §8), re-INVITE and UPDATE through a bridge, late offer (RFC 3261 §13.2.1),
glare (§14.1, 491), CANCEL races (§9), session timers (RFC 4028), extensions (§8.2.2.3, 420), the §8.2 checks,
ICE-lite and rtcp-mux answers, and a gateway's first REGISTER waiting for the external address.
"""

from __future__ import annotations

import pytest

from autonat.proto.sdp import parse_sdp_addresses
from autonat.sip import client as sipclient
from autonat.sip import core
from autonat.sip.dialplan import DEFAULT_DIALPLAN, Action, Extension, GatewaySettings, compile_pattern
from autonat.sip.message import Request, Response, make_response
from autonat.sip.peer import Peer
from autonat.sip.session import describe
from tests.unit.test_sip_harness import (
    OUTSIDE,
    T1,
    US,
    Addresses,
    Net,
    Phone,
    echo_profile,
    gateway_profile,
    offer,
    register,
)

CALLER = Peer("udp", "198.51.100.7", 5070)
CALLEE = Peer("udp", "203.0.113.100", 5062)  # where phone 105 registered from
THIRD = Peer("udp", "198.51.100.9", 5080)


def direction(sdp: bytes) -> str:
    described = describe(sdp)
    assert described is not None
    return described.direction


def version(sdp: bytes) -> int:
    origin = next(line for line in sdp.decode().split("\r\n") if line.startswith("o="))
    return int(origin.split(" ")[2])


def echo_call(
    net: Net, phone: Phone, body: bytes | None = None, extra: list[tuple[str, str]] | None = None
) -> Response:
    phone.call("9196", body, extra)
    ok = phone.answered()
    phone.ack(ok)
    return ok


# --------------------------------------------------------------------------------------------- the echo call


def test_an_echo_call_is_answered_on_mapped_ports_resent_until_acked_and_released_at_bye() -> None:
    net = Net(echo_profile())
    phone = Phone(net, CALLER)
    phone.call()
    ok = phone.answered()
    sdp = parse_sdp_addresses(ok.body.decode())
    assert sdp.connection is not None and sdp.connection.address == OUTSIDE  # told the router's address
    assert sdp.media[0].port == 30000  # the mapped port
    assert ok.headers.get("Contact") == f"<sip:9196@{OUTSIDE}:5060>"
    net.advance(T1)
    assert isinstance(net.take(CALLER, "200"), Response)  # §13.3.1.4: resent until the ACK
    phone.ack(ok)
    net.advance(10 * T1)
    assert net.none(CALLER, "200")
    echo = net.media[net.core.calls[0].id]
    assert isinstance(echo, core.StartEcho) and echo.rtcp and echo.sending and not echo.hold and echo.ice is None
    phone.net.deliver(phone.request("BYE", "9196"), CALLER)
    assert isinstance(net.take(CALLER, "200"), Response)
    assert net.core.calls == [] and net.core.admission.calls == 0
    (released,) = net.released
    assert [p.local for p in released.ports] == [20000]
    assert [e.kind for e in net.of(core.Publish)] == ["call-start", "call-end"]


def test_a_second_call_from_a_source_holding_one_may_not_use_the_reserved_pair() -> None:
    """The pool's held-back pair goes to calls from calm sources only (sip/admission.py, engine/pool.py)."""
    net = Net(echo_profile())
    for phone in (Phone(net, CALLER), Phone(net, CALLER), Phone(net, THIRD)):
        phone.call()
        phone.answered()
    assert [(a.mapped, a.reserve) for a in net.of(core.AcquirePorts)] == [(True, True), (True, False), (True, True)]


def test_no_ack_ends_the_call_with_bye_after_64_t1() -> None:
    net = Net(echo_profile())
    phone = Phone(net, CALLER)
    phone.call()
    phone.answered()
    net.advance(64 * T1 + 1)
    bye = net.take(CALLER, "BYE")
    assert isinstance(bye, Request) and bye.to_tag() == phone.tag
    assert bye.uri == f"sip:caller@{CALLER.ip}:{CALLER.port}"
    assert net.core.calls == [] and net.released


# --------------------------------------------------------------------------------------------- hold and resume


def test_hold_and_resume_from_the_caller_get_the_directions_rfc_3264_asks() -> None:
    """§6.1: sendonly is answered recvonly, recvonly sendonly, inactive inactive; the echo stops sending while
    the caller does not want to receive, and the call is on hold."""
    net = Net(echo_profile())
    phone = Phone(net, CALLER)
    first = echo_call(net, phone)
    assert direction(first.body) == "sendrecv"
    versions = [version(first.body)]
    expected = [("sendonly", "recvonly", False, True), ("inactive", "inactive", False, True),
                ("recvonly", "sendonly", True, False), ("sendrecv", "sendrecv", True, False)]  # fmt: skip
    for offered, answered, sending, held in expected:
        request = phone.reinvite(offer(40000, direction=offered))
        ok = phone.answered()
        assert ok.cseq() == request.cseq() and direction(ok.body) == answered
        phone.ack(ok, request)
        update = net.of(core.UpdateMedia)[-1]
        assert (update.sending, update.hold) == (sending, held)
        versions.append(version(ok.body))
    assert versions == list(range(versions[0], versions[0] + 5))  # RFC 3264 §8: +1 per change
    same = phone.reinvite(offer(40000, direction="sendrecv"))  # nothing changes: the same version
    again = phone.answered()
    phone.ack(again, same)
    assert version(again.body) == versions[-1]


def test_old_style_hold_with_c_0_0_0_0_is_hold_too() -> None:
    net = Net(echo_profile())
    phone = Phone(net, CALLER)
    echo_call(net, phone)
    phone.reinvite(offer(40000, direction=None, address="0.0.0.0"))
    assert direction(phone.answered().body) == "recvonly"  # RFC 3264 §8.4


def bridged(net: Net) -> tuple[Phone, Phone, Request]:
    """Phone 105 registered from CALLEE; CALLER calls it; both sides answered and ACKed."""
    register(net, CALLEE)
    caller, callee = Phone(net, CALLER), Phone(net, CALLEE, user="105")
    caller.call("105")
    incoming = net.take(CALLEE, "INVITE")
    assert isinstance(incoming, Request)
    assert incoming.uri == "sip:105@10.9.9.9:5062"  # rung at its Contact, sent to where it registered from
    callee.call_id, callee.remote_tag = incoming.call_id(), incoming.from_tag()
    callee.respond(incoming, 180)
    assert isinstance(net.take(CALLER, "180"), Response)
    callee.respond(incoming, 200, body=offer(7000, address=CALLEE.ip))
    assert isinstance(net.take(CALLEE, "ACK"), Request)
    ok = caller.answered()
    caller.ack(ok)
    return caller, callee, incoming


def test_hold_in_a_bridged_call_reaches_the_other_phone_both_ways() -> None:
    net = Net(echo_profile(), users=(("105", "pw105"),))
    caller, callee, _ = bridged(net)
    relay = net.media[net.core.calls[0].id]
    assert isinstance(relay, core.StartRelay)
    # The caller holds: its re-INVITE goes on to the callee, whose answer comes back.
    hold = caller.reinvite(offer(40000, direction="sendonly"), number="105")
    forwarded = net.take(CALLEE, "INVITE")
    assert isinstance(forwarded, Request) and direction(forwarded.body) == "sendonly"
    assert forwarded.to_tag() == callee.tag and net.none(CALLER, "200")  # the caller waits for the callee
    callee.respond(forwarded, 200, body=offer(7000, direction="recvonly", address=CALLEE.ip))
    assert isinstance(net.take(CALLEE, "ACK"), Request)
    ok = caller.answered()
    assert ok.cseq() == hold.cseq() and direction(ok.body) == "recvonly"
    caller.ack(ok, hold)
    # The callee holds the caller (the other direction): the caller is asked, the callee gets its answer.
    held = callee.request("INVITE", "caller", body=offer(7000, direction="sendonly", address=CALLEE.ip))
    net.deliver(held, CALLEE)
    toward_caller = net.take(CALLER, "INVITE")
    assert isinstance(toward_caller, Request) and direction(toward_caller.body) == "sendonly"
    sdp = parse_sdp_addresses(toward_caller.body.decode())
    assert sdp.connection is not None and sdp.connection.address == OUTSIDE  # anchored on the relay
    caller.respond(toward_caller, 200, body=offer(40000, direction="recvonly"))
    assert isinstance(net.take(CALLER, "ACK"), Request)
    back = net.take(CALLEE, "200")
    assert isinstance(back, Response) and direction(back.body) == "recvonly"


def test_a_re_invite_without_an_offer_gets_ours_and_the_answer_comes_in_the_ack() -> None:
    net = Net(echo_profile())
    phone = Phone(net, CALLER)
    first = echo_call(net, phone)
    request = phone.reinvite(b"")
    ok = phone.answered()
    assert ok.body == first.body  # our current description, same version (RFC 3264 §8)
    phone.ack(ok, request, body=offer(40000, direction="sendonly"))
    update = net.of(core.UpdateMedia)[-1]
    assert (update.sending, update.hold) == (False, True)
    assert net.core.calls and net.none(CALLER, "BYE")


# --------------------------------------------------------------------------------------------- late offer


def test_late_offer_our_offer_in_the_200_and_the_answer_in_the_ack() -> None:
    net = Net(echo_profile())
    phone = Phone(net, CALLER)
    phone.call(body=b"")
    ok = phone.answered()
    ours = describe(ok.body)
    assert ours is not None and ours.audio.formats == ("0", "8", "9", "101") and ours.direction == "sendrecv"
    phone.ack(ok, body=offer(40000, direction="sendrecv").replace(b"0 8 101", b"8"))
    assert net.core.calls and net.none(CALLER, "BYE")
    assert net.of(core.UpdateMedia)[-1].sending is True


@pytest.mark.parametrize("answer", [b"", b"v=0\r\nm=video 5000 RTP/AVP 31\r\n"], ids=["no answer", "no audio"])
def test_late_offer_without_a_usable_answer_in_the_ack_ends_the_call(answer: bytes) -> None:
    net = Net(echo_profile())
    phone = Phone(net, CALLER)
    phone.call(body=b"")
    phone.ack(phone.answered(), body=answer)
    assert isinstance(net.take(CALLER, "BYE"), Request)
    assert net.core.calls == [] and net.released


def test_late_offer_through_a_bridge_waits_for_the_callers_answer_to_ack_the_callee() -> None:
    net = Net(echo_profile(), users=(("105", "pw105"),))
    register(net, CALLEE)
    caller, callee = Phone(net, CALLER), Phone(net, CALLEE, user="105")
    caller.call("105", body=b"")
    incoming = net.take(CALLEE, "INVITE")
    assert isinstance(incoming, Request) and incoming.body == b""  # no offer to anchor: none goes on
    callee.call_id = incoming.call_id()
    callee.respond(incoming, 200, body=offer(7000, address=CALLEE.ip))  # the callee offers in its 200
    assert net.none(CALLEE, "ACK")  # its ACK must carry the caller's answer
    ok = caller.answered()
    described = describe(ok.body)
    assert described is not None and described.audio.port == 30000  # anchored on our side of leg a
    caller.ack(ok, body=offer(40000))
    ack = net.take(CALLEE, "ACK")
    assert isinstance(ack, Request) and describe(ack.body) is not None
    assert describe(ack.body).audio.port == 30002  # type: ignore[union-attr]  # our side of leg b


# --------------------------------------------------------------------------------------------- glare


def test_glare_an_offer_while_ours_is_pending_gets_491_and_ours_is_retried() -> None:
    net = Net(echo_profile())
    phone = Phone(net, CALLER)
    echo_call(net, phone, extra=[("Session-Expires", "120;refresher=uas")])  # we refresh, at 60 s
    net.advance(60)
    ours = net.take(CALLER, "INVITE")  # the phone did not list UPDATE in Allow: a re-INVITE
    assert isinstance(ours, Request) and version(ours.body) == version(net.core.calls[0].a.local_sdp)
    phone.reinvite(offer(40000, direction="sendonly"))  # crosses ours
    assert isinstance(net.take(CALLER, "491"), Response)
    phone.respond(ours, 491)  # and ours meets the phone's pending one
    net.advance(2.0)  # §14.1: the caller made the Call-ID, so we retry within 0-2 s (it would wait 2.1-4 s)
    again = net.take(CALLER, "INVITE")
    assert isinstance(again, Request) and again.cseq()[0] == ours.cseq()[0] + 1


def test_glare_in_a_bridge_a_re_invite_while_the_other_leg_is_asked_gets_491() -> None:
    net = Net(echo_profile(), users=(("105", "pw105"),))
    caller, callee, _ = bridged(net)
    caller.reinvite(offer(40000, direction="sendonly"), number="105")
    forwarded = net.take(CALLEE, "INVITE")
    net.deliver(callee.request("INVITE", "caller", body=offer(7000, direction="sendonly", address=CALLEE.ip)), CALLEE)
    assert isinstance(net.take(CALLEE, "491"), Response)
    callee.respond(forwarded, 491)  # the callee refuses ours too: the caller learns it
    assert isinstance(net.take(CALLER, "491"), Response)
    assert net.core.calls  # a failed re-INVITE leaves the session as it was (§14.1)


def test_a_second_re_invite_before_the_first_is_answered_gets_500_with_retry_after() -> None:
    net = Net(echo_profile(), users=(("105", "pw105"),))
    caller, _callee, _ = bridged(net)
    caller.reinvite(offer(40000, direction="sendonly"), number="105")
    caller.reinvite(offer(40000, direction="inactive"), number="105")
    refused = net.take(CALLER, "500")
    assert isinstance(refused, Response) and refused.headers.get("Retry-After") is not None  # §14.2


# --------------------------------------------------------------------------------------------- CANCEL races


def cancel_of(invite: Request) -> Request:
    return sipclient.make_cancel(invite)


def test_cancel_while_the_router_maps_the_ports_gets_487_and_the_ports_come_back() -> None:
    net = Net(echo_profile())
    net.hold_ports = True
    phone = Phone(net, CALLER)
    invite = phone.call()
    net.deliver(cancel_of(invite), CALLER)
    assert isinstance(net.take(CALLER, "200"), Response)  # to the CANCEL (§9.2)
    assert isinstance(net.take(CALLER, "487"), Response)
    net.release_ports()  # the mapping completes after the call is gone
    assert net.none(CALLER, "200") and net.core.calls == []
    assert [p.local for r in net.released for p in r.ports] == [20000] and net.core.admission.calls == 0


def test_cancel_after_the_answer_changes_nothing() -> None:
    net = Net(echo_profile())
    phone = Phone(net, CALLER)
    invite = phone.call()
    ok = phone.answered()
    net.deliver(cancel_of(invite), CALLER)
    assert isinstance(net.take(CALLER, "200"), Response) and net.none(CALLER, "487")
    phone.ack(ok)
    assert net.core.calls


def test_cancel_of_an_unknown_invite_is_481() -> None:
    net = Net(echo_profile())
    phone = Phone(net, CALLER)
    net.deliver(cancel_of(phone.request("INVITE", "9196", body=offer(40000))), CALLER)
    assert isinstance(net.take(CALLER, "481"), Response)


def test_cancel_while_the_callee_rings_and_its_200_crossing_our_cancel_is_acked_and_ended() -> None:
    net = Net(echo_profile(), users=(("105", "pw105"),))
    register(net, CALLEE)
    caller, callee = Phone(net, CALLER), Phone(net, CALLEE, user="105")
    invite = caller.call("105")
    incoming = net.take(CALLEE, "INVITE")
    assert isinstance(incoming, Request)
    callee.respond(incoming, 180)
    net.deliver(cancel_of(invite), CALLER)
    assert isinstance(net.take(CALLER, "487"), Response)
    cancel = net.take(CALLEE, "CANCEL")
    assert isinstance(cancel, Request) and cancel.call_id() == incoming.call_id()
    callee.respond(incoming, 200, body=offer(7000, address=CALLEE.ip))  # it answered before the CANCEL came
    ack, bye = net.take(CALLEE, "ACK"), net.take(CALLEE, "BYE")
    assert isinstance(ack, Request) and isinstance(bye, Request) and bye.call_id() == incoming.call_id()
    assert net.core.calls == [] and net.core.admission.calls == 0


# --------------------------------------------------------------------------------------------- session timers


def test_a_short_session_interval_gets_422_with_our_min_se() -> None:
    net = Net(echo_profile())
    Phone(net, CALLER).call(extra=[("Session-Expires", "60"), ("Supported", "timer")])
    refused = net.take(CALLER, "422")
    assert isinstance(refused, Response) and refused.headers.get("Min-SE") == "90"  # RFC 4028 §8.1


def test_a_caller_that_supports_timers_refreshes_and_one_that_stops_is_hung_up() -> None:
    net = Net(echo_profile())
    phone = Phone(net, CALLER)
    ok = echo_call(net, phone, extra=[("Supported", "timer")])
    assert ok.headers.get("Session-Expires") == "1800;refresher=uac" and ok.headers.get("Require") == "timer"
    net.advance(900)
    refresh = phone.reinvite(b"", method="UPDATE")  # RFC 3311: a refresh without an offer
    answer = net.take(CALLER, "200")
    assert answer.cseq() == refresh.cseq() and answer.headers.get("Session-Expires") == "1800;refresher=uac"
    net.advance(1800 - 32 - 1)  # the interval restarted at the refresh
    assert net.none(CALLER, "BYE") and net.core.calls
    net.advance(2)  # RFC 4028 §10: BYE at interval - min(32, interval/3) without a refresh
    assert isinstance(net.take(CALLER, "BYE"), Request)
    assert net.core.calls == []


def test_when_we_refresh_we_use_update_if_allowed_and_a_failed_refresh_ends_the_call() -> None:
    net = Net(echo_profile())
    phone = Phone(net, CALLER)
    echo_call(net, phone, extra=[("Session-Expires", "300;refresher=uas"), ("Allow", "INVITE, ACK, BYE, UPDATE")])
    net.advance(150)
    update = net.take(CALLER, "UPDATE")
    assert isinstance(update, Request) and update.body == b"" and update.headers.get("Session-Expires")
    phone.respond(update, 200, extra=[("Session-Expires", "300;refresher=uac")])
    net.advance(150)
    second = net.take(CALLER, "UPDATE")
    assert isinstance(second, Request)
    net.advance(64 * T1 + 1)  # no answer at all: 408, the dialog is gone (RFC 4028 §10, §14.1)
    assert isinstance(net.take(CALLER, "BYE"), Request) and net.core.calls == []


# --------------------------------------------------------------------------------------------- §8.2 checks


@pytest.mark.parametrize(
    ("extra", "status", "header"),
    [
        ([("Require", "100rel")], 420, ("Unsupported", "100rel")),
        ([("Require", "precondition, timer")], 420, ("Unsupported", "precondition")),
        ([("Accept", "text/nobodyKnowsThis")], 406, ("Accept", "application/sdp")),
    ],
)
def test_invites_we_cannot_serve_get_the_answer_of_section_8_2(
    extra: list[tuple[str, str]], status: int, header: tuple[str, str]
) -> None:
    net = Net(echo_profile())
    Phone(net, CALLER).call(extra=extra)
    refused = net.take(CALLER, str(status))
    assert refused.headers.get(header[0]) == header[1]
    assert net.core.calls == [] and net.core.admission.calls == 0


def test_require_timer_is_supported() -> None:
    net = Net(echo_profile())
    phone = Phone(net, CALLER)
    echo_call(net, phone, extra=[("Require", "timer"), ("Session-Expires", "600")])
    assert net.core.calls


def test_methods_schemes_and_bodies() -> None:
    net = Net(echo_profile())
    phone = Phone(net, CALLER)
    unknown = phone.request("FROB", "9196")
    net.deliver(unknown, CALLER)
    answer = net.take(CALLER, "501")
    assert "INVITE" in (answer.headers.get("Allow") or "")
    net.deliver(phone.request("SUBSCRIBE", "9196"), CALLER)
    assert isinstance(net.take(CALLER, "405"), Response)  # known, not served here (§8.2.1)
    tel = phone.request("OPTIONS", "9196").replace(uri="tel:+15551234")
    net.deliver(tel, CALLER)
    assert isinstance(net.take(CALLER, "416"), Response)
    wrong_body = phone.request("INVITE", "9196", body=b"hello").replace(
        headers=phone.request("INVITE", "9196", body=b"hello").headers.replace("Content-Type", "text/plain")
    )
    net.deliver(wrong_body, CALLER)
    unsupported = net.take(CALLER, "415")
    assert unsupported.headers.get("Accept") == "application/sdp"
    net.deliver(phone.request("OPTIONS", "9196", extra=[("Require", "foo")]), CALLER)
    assert net.take(CALLER, "420").headers.get("Unsupported") == "foo"
    net.deliver(phone.request("OPTIONS", "9196"), CALLER)
    options = net.take(CALLER, "200")
    assert options.headers.get("Supported") == "timer" and options.headers.get("Accept") == "application/sdp"


def test_an_out_of_order_cseq_in_the_dialog_is_500() -> None:
    net = Net(echo_profile())
    phone = Phone(net, CALLER)
    echo_call(net, phone)
    net.deliver(phone.request("INFO", "9196", cseq=1), CALLER)  # the INVITE had CSeq 1
    assert isinstance(net.take(CALLER, "500"), Response)  # §12.2.2
    net.deliver(phone.request("INFO", "9196"), CALLER)
    assert isinstance(net.take(CALLER, "200"), Response)


# --------------------------------------------------------------------------------------------- media answers


ICE = (
    "a=ice-ufrag:theirs\r\na=ice-pwd:theirpasswordtheirpassword\r\n"
    "a=candidate:1 1 UDP 2130706431 198.51.100.7 40000 typ host\r\n"
)


def test_an_ice_offer_gets_an_ice_lite_answer_and_the_media_answers_checks() -> None:
    net = Net(echo_profile())
    phone = Phone(net, CALLER)
    ok = echo_call(net, phone, body=offer(40000, extra=ICE))
    text = ok.body.decode()
    assert "a=ice-lite\r\n" in text and "a=ice-ufrag:" in text and "a=ice-pwd:" in text
    candidates = [line.split(" ") for line in text.split("\r\n") if line.startswith("a=candidate:")]
    addresses = {(c[1], c[4], c[5]) for c in candidates}
    assert addresses == {("1", US, "20000"), ("1", OUTSIDE, "30000"), ("2", US, "20001"), ("2", OUTSIDE, "30001")}
    best = max(candidates, key=lambda c: int(c[3]))
    assert best[4] == OUTSIDE  # a peer outside should prefer the router's address
    echo = net.media[net.core.calls[0].id]
    assert isinstance(echo, core.StartEcho) and echo.ice is not None
    assert f"a=ice-ufrag:{echo.ice[0]}" in text and f"a=ice-pwd:{echo.ice[1]}" in text


def test_rtcp_mux_is_accepted_and_its_rtcp_mapping_dropped() -> None:
    net = Net(echo_profile())
    phone = Phone(net, CALLER)
    ok = echo_call(net, phone, body=offer(40000, extra="a=rtcp-mux\r\n"))
    assert "a=rtcp-mux" in ok.body.decode() and "a=rtcp:" not in ok.body.decode()
    echo = net.media[net.core.calls[0].id]
    assert isinstance(echo, core.StartEcho) and not echo.rtcp
    (dropped,) = net.of(core.DropRtcp)
    assert dropped.ports.local == 20000


def test_srtp_only_offers_get_488_and_optional_srtp_is_answered_plain() -> None:
    net = Net(echo_profile())
    savp = offer(40000).replace(b"RTP/AVP", b"RTP/SAVP") + b"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:x\r\n"
    Phone(net, CALLER).call(body=savp)
    refused = net.take(CALLER, "488")
    assert "SRTP" in (refused.headers.get("Warning") or "")
    best_effort = offer(40000) + b"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:x\r\n"
    ok = echo_call(net, Phone(net, THIRD), body=best_effort)
    assert b"RTP/AVP" in ok.body and b"a=crypto" not in ok.body


# --------------------------------------------------------------------------------------------- gateways


REGISTRAR = Peer("udp", "203.0.113.101", 5080)


def unknown_address() -> Addresses:
    addresses = Addresses()
    addresses.external = False  # discovery has not found the router's address yet
    return addresses


def test_the_first_register_waits_for_the_external_address() -> None:
    gateway = GatewaySettings("k", REGISTRAR.ip, REGISTRAR.port, username="200", password="pw")
    dialplan = (Extension(compile_pattern(r"0(\d+)"), Action.GATEWAY, "k"),)
    net = Net(gateway_profile(gateway, dialplan, external_sip=True), addresses=unknown_address())
    assert net.none(REGISTRAR, "REGISTER")  # a Contact now would be our private address
    assert net.core.status("p", net.now)["Gateways"]["k"]["state"] == "WAIT-ADDRESS"
    net.addresses.external = True
    net.run(net.core.address_changed(net.now))
    register = net.take(REGISTRAR, "REGISTER")
    assert register.headers.get("Contact") == f"<sip:200@{OUTSIDE}:5060>"


def test_a_register_that_waited_too_long_goes_and_moves_when_the_address_comes() -> None:
    gateway = GatewaySettings("k", REGISTRAR.ip, REGISTRAR.port, username="200", password="pw")
    net = Net(gateway_profile(gateway, (), external_sip=True), addresses=unknown_address())
    net.advance(9.9)
    assert net.none(REGISTRAR, "REGISTER")
    net.advance(0.2)  # register_wait (10 s) is over: with what the decision picks now
    first = net.take(REGISTRAR, "REGISTER")
    assert isinstance(first, Request) and first.headers.get("Contact") == f"<sip:200@{US}:5060>"
    net.deliver(make_response(first, 200, to_tag="r", extra_headers=[("Expires", "600")]), REGISTRAR)
    net.addresses.external = True
    net.run(net.core.address_changed(net.now))
    moved = net.take(REGISTRAR, "REGISTER")  # at once, the private Contact removed in the same request
    assert moved.headers.get_all("Contact") == [f"<sip:200@{OUTSIDE}:5060>", f"<sip:200@{US}:5060>;expires=0"]


def test_a_registrar_on_the_local_network_gets_no_wait() -> None:
    gateway = GatewaySettings("k", "10.1.2.3", 5060, username="200", password="pw")
    net = Net(gateway_profile(gateway, (), external_sip=True), addresses=unknown_address())
    register = net.take(Peer("udp", "10.1.2.3", 5060), "REGISTER")
    assert register.headers.get("Contact") == f"<sip:200@{US}:5060>"


# --------------------------------------------------------------------------------------------- reload


def reconfigured(net: Net, *profiles: core.ProfileConfig) -> tuple[list[str], list[str]]:
    config = core.CoreConfig(profiles, net.core.config.timers, session_expires=1800, min_se=90)
    actions, changes, restart = net.core.reconfigure(config, net.now)
    net.run(actions)
    return changes, restart


def test_a_reload_that_removes_a_profile_hangs_up_its_calls_and_forgets_it() -> None:
    net = Net(echo_profile())
    phone = Phone(net, CALLER)
    echo_call(net, phone)
    assert len(net.core.calls) == 1
    changes, restart = reconfigured(net)
    assert changes == ["-profile p"] and restart == []
    bye = net.take(CALLER, "BYE")
    assert isinstance(bye, Request) and bye.to_tag() == phone.tag
    assert net.core.calls == [] and net.core.admission.calls == 0 and net.released  # the call's ports given back
    assert "p" not in net.core.profiles and net.core.status("p", net.now) == {}
    phone.net.deliver(phone.request("BYE", "9196"), CALLER)  # what the closing listener still hears: dropped
    assert net.none(CALLER, "200")
    net.advance(64 * T1)  # its timers are skipped, nothing is retransmitted
    assert net.none(CALLER, "BYE")


def test_a_reload_that_adds_a_profile_starts_it_and_its_gateways_register() -> None:
    net = Net(echo_profile())
    gateway = GatewaySettings("k", REGISTRAR.ip, REGISTRAR.port, username="200", password="pw")
    added = core.ProfileConfig("q", 5070, dialplan=(), gateways=(gateway,), auth_calls=False)
    changes, restart = reconfigured(net, echo_profile(), added)
    assert changes == ["+profile q"] and restart == []
    register = net.take(REGISTRAR, "REGISTER")  # from the new profile's own port
    assert isinstance(register, Request) and register.headers.get("Contact") == f"<sip:200@{OUTSIDE}:5070>"
    assert set(net.core.profiles) == {"p", "q"} and net.core.status("q", net.now)["Gateways"]["k"]


def test_a_profile_moved_to_another_port_ends_its_calls_and_starts_again() -> None:
    net = Net(echo_profile())
    phone = Phone(net, CALLER)
    echo_call(net, phone)
    moved = core.ProfileConfig("p", 5080, dialplan=DEFAULT_DIALPLAN, auth_calls=False, external_media=True)
    changes, _ = reconfigured(net, moved)
    assert "+profile p" in changes
    assert isinstance(net.take(CALLER, "BYE"), Request) and net.core.calls == []
    assert net.core.profiles["p"].config.sip_port == 5080
    second = Phone(net, THIRD)
    echo_call(net, second)  # the profile answers again, on its new port's config
    assert len(net.core.calls) == 1
