"""SIP client side (RFC 3261 §8.1, §9.1, §10.2, §13.2.2.4, §17.1; RFC 6026; RFC 3581) with a fake clock."""

from __future__ import annotations

import re
from typing import Protocol, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autonat.proto.errors import DecodeError
from autonat.sip.client import (
    ClientAction,
    ClientState,
    ClientTransaction,
    ClientTransactionTable,
    DeliverResponse,
    OutboundRegistration,
    RegistrationConfig,
    RegistrationState,
    SendRequest,
    TimedOut,
    TooManyTransactions,
    TransportError,
    _challenge_nonces,
    _contact_expires,
    _uri_identity,
    ack_for_2xx,
    ack_for_non2xx,
    make_cancel,
    make_request,
    new_branch,
    new_call_id,
    new_tag,
)
from autonat.sip.message import Request, Response, make_response, parse_message
from autonat.sip.transaction import Timers

T = Timers()  # T1 0.5, T2 4, T4 5: 64*T1 = 32


def request(method: str = "OPTIONS", *, branch: str | None = None, cseq: int = 1, **kw: object) -> Request:
    args: dict[str, object] = {
        "from_uri": "sip:alice@example.com",
        "from_tag": "ftag",
        "to_uri": "sip:bob@example.com",
        "call_id": "call-1@10.0.0.5",
        "cseq": cseq,
        "via_host": "10.0.0.5",
        "via_port": 5060,
        "transport": "udp",
        "branch": branch,
        "contact": "sip:alice@10.0.0.5:5060",
    }
    args.update(kw)
    built = make_request(method, "sip:bob@192.0.2.10", **args)  # type: ignore[arg-type]
    return reparse(built)


M = TypeVar("M", Request, Response)


def reparse(message: M) -> M:
    """The message as it arrives off the wire."""
    parsed = parse_message(message.serialize())
    assert isinstance(parsed, type(message))
    return parsed


def respond(
    req: Request, status: int, *, to_tag: str | None = "ttag", extra: tuple[tuple[str, str], ...] = ()
) -> Response:
    response = reparse(make_response(req, status, to_tag=to_tag if status > 100 else None, extra_headers=extra))
    assert isinstance(response, Response)
    return response


def sent(actions: list[ClientAction]) -> list[Request]:
    return [a.request for a in actions if isinstance(a, SendRequest)]


def delivered(actions: list[ClientAction]) -> list[int]:
    return [a.response.status for a in actions if isinstance(a, DeliverResponse)]


class Clocked(Protocol):
    def timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> list[ClientAction]: ...


def run_until(tx: Clocked, end: float) -> list[tuple[float, ClientAction]]:
    """Fire every timer due up to `end`, exactly at its time; (time, action) pairs."""
    log: list[tuple[float, ClientAction]] = []
    for _ in range(10_000):
        when = tx.timer()
        if when is None or when > end:
            return log
        log.extend((when, action) for action in tx.handle_timer(when))
    raise AssertionError("timer loop did not settle")


# --------------------------------------------------------------------------------------------- building


def test_identifiers_are_random_tokens() -> None:
    branches = {new_branch() for _ in range(100)}
    assert len(branches) == 100
    for branch in branches:
        assert re.fullmatch(r"z9hG4bK[0-9a-f]{24}", branch)
    assert re.fullmatch(r"[0-9a-f]{16}", new_tag())
    assert re.fullmatch(r"[0-9a-f]{32}@10\.0\.0\.5", new_call_id("10.0.0.5"))
    assert new_call_id("2001:db8::1").endswith("@[2001:db8::1]")
    assert "@" not in new_call_id("")


def test_make_request_headers_round_trip() -> None:
    req = make_request(
        "INVITE",
        "sip:bob@192.0.2.10",
        from_uri="sip:alice@example.com",
        from_tag="f1",
        to_uri="sip:bob@example.com",
        call_id="c1@h",
        cseq=7,
        via_host="10.0.0.5",
        via_port=5070,
        transport="tcp",
        branch="z9hG4bKabc",
        contact="sip:alice@10.0.0.5:5070;transport=tcp",
        route=["<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>"],
        extra_headers=[("Allow", "INVITE, ACK"), ("Content-Length", "99")],
        body=b"v=0\r\n",
        content_type="application/sdp",
    )
    assert parse_message(req.serialize()) == req
    headers = req.headers
    assert headers.get("Via") == "SIP/2.0/TCP 10.0.0.5:5070;branch=z9hG4bKabc;rport"
    assert req.top_via().rport == ""
    assert headers.get("From") == "<sip:alice@example.com>;tag=f1"
    assert headers.get("To") == "<sip:bob@example.com>"
    assert headers.get("CSeq") == "7 INVITE"
    assert headers.get("Max-Forwards") == "70"
    assert headers.get_all("Route") == ["<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>"]
    assert headers.get("Contact") == "<sip:alice@10.0.0.5:5070;transport=tcp>"
    assert headers.get("User-Agent") == "autonat"
    assert headers.get("Content-Type") == "application/sdp"
    assert headers.get_all("Content-Length") == ["5"]
    assert req.to_tag() is None and req.from_tag() == "f1"


def test_make_request_ipv6_and_dialog_tag() -> None:
    req = request(via_host="2001:db8::5", to_tag="tt", contact='"Alice" <sip:alice@[2001:db8::5]>')
    assert str(req.headers.get("Via")).startswith("SIP/2.0/UDP [2001:db8::5]:5060;branch=z9hG4bK")
    assert req.top_via().host == "2001:db8::5"
    assert req.to_tag() == "tt"
    assert req.headers.get("Contact") == '"Alice" <sip:alice@[2001:db8::5]>'


@pytest.mark.parametrize(
    "changes",
    [
        {"method": "IN VITE"},
        {"uri": "not a uri"},
        {"cseq": 2**31},
        {"max_forwards": 256},
        {"call_id": "a b"},
        {"from_tag": "a;b"},
        {"branch": "z9hG4bK x"},
        {"body": b"x"},
        {"to_uri": "sip:bob@example.com>\r\nX: y"},
        {"extra_headers": [("Subject", "a\r\nVia: evil")]},
        {"via_host": "bad host!"},
    ],
)
def test_make_request_refuses_bad_arguments(changes: dict[str, object]) -> None:
    args: dict[str, object] = {
        "method": "OPTIONS",
        "uri": "sip:bob@192.0.2.10",
        "from_uri": "sip:alice@example.com",
        "from_tag": "f",
        "to_uri": "sip:bob@example.com",
        "call_id": "c@h",
        "cseq": 1,
        "via_host": "10.0.0.5",
        "via_port": 5060,
        "transport": "udp",
    }
    args.update(changes)
    with pytest.raises(ValueError):
        make_request(**args)  # type: ignore[arg-type]


def test_ack_for_non2xx_fields() -> None:
    invite = request("INVITE", cseq=4, route=["<sip:proxy.example.com;lr>"])
    response = respond(invite, 486)
    ack = ack_for_non2xx(invite, response)
    assert parse_message(ack.serialize()) == ack
    assert ack.method == "ACK" and ack.uri == invite.uri
    assert ack.headers.get_all("Via") == [invite.headers.get("Via")]
    assert ack.cseq() == (4, "ACK")
    assert ack.to_tag() == "ttag"
    assert ack.headers.get("From") == invite.headers.get("From")
    assert ack.call_id() == invite.call_id()
    assert ack.headers.get_all("Route") == ["<sip:proxy.example.com;lr>"]
    assert ack.body == b""


def test_ack_for_2xx_fields() -> None:
    invite = request(
        "INVITE", cseq=9, route=["<sip:outbound.example.com;lr>"], extra_headers=[("Proxy-Authorization", "Digest x")]
    )
    ok = respond(
        invite,
        200,
        extra=(
            ("Contact", "<sip:bob@198.51.100.7:5062;transport=udp>;expires=30"),
            ("Record-Route", "<sip:p1.example.com;lr>, <sip:p2.example.com;lr>"),
        ),
    )
    branch = new_branch()
    ack = ack_for_2xx(invite, ok, branch=branch, body=b"v=0\r\n", content_type="application/sdp")
    assert parse_message(ack.serialize()) == ack
    assert ack.uri == "sip:bob@198.51.100.7:5062;transport=udp"
    assert ack.top_via().branch == branch != invite.top_via().branch
    assert ack.top_via().host == "10.0.0.5" and ack.top_via().rport == ""
    assert ack.cseq() == (9, "ACK")
    assert ack.to_tag() == "ttag"
    assert ack.headers.get_all("Route") == ["<sip:p2.example.com;lr>", "<sip:p1.example.com;lr>"]
    assert ack.headers.get("Proxy-Authorization") == "Digest x"
    assert ack.body == b"v=0\r\n"
    # Without a Contact (or Record-Route) the INVITE's URI is used and there is no Route.
    bare = ack_for_2xx(invite, respond(invite, 200), branch=branch)
    assert bare.uri == invite.uri and bare.headers.get("Route") is None


def test_make_cancel_fields() -> None:
    invite = request("INVITE", cseq=3, route=["<sip:proxy.example.com;lr>"])
    cancel = make_cancel(invite)
    assert parse_message(cancel.serialize()) == cancel
    assert cancel.method == "CANCEL" and cancel.uri == invite.uri
    assert cancel.cseq() == (3, "CANCEL")
    assert cancel.headers.get_all("Via") == [invite.headers.get("Via")]
    for name in ("From", "To", "Call-ID", "Route"):
        assert cancel.headers.get(name) == invite.headers.get(name)


# --------------------------------------------------------------------------------------------- transactions


def test_ack_is_not_a_transaction() -> None:
    invite = request("INVITE")
    with pytest.raises(ValueError):
        ClientTransaction(ack_for_non2xx(invite, respond(invite, 486)), 0.0)


def test_invite_timer_a_schedule_and_timer_b() -> None:
    invite = request("INVITE")
    tx = ClientTransaction(invite, 100.0)
    assert tx.start() == [SendRequest(invite)]
    assert tx.start() == []
    assert tx.state is ClientState.CALLING
    log = run_until(tx, 200.0)
    retransmits = [when - 100 for when, action in log if isinstance(action, SendRequest)]
    assert retransmits == [0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert [(when - 100, type(a)) for when, a in log if not isinstance(a, SendRequest)] == [(32.0, TimedOut)]
    assert tx.terminated and tx.timer() is None


def test_invite_reliable_no_retransmission() -> None:
    tx = ClientTransaction(request("INVITE"), 0.0, reliable=True)
    tx.start()
    log = run_until(tx, 100.0)
    assert [(when, type(a)) for when, a in log] == [(32.0, TimedOut)]


def test_non_invite_timer_e_schedule_and_timer_f() -> None:
    tx = ClientTransaction(request("OPTIONS"), 0.0)
    tx.start()
    log = run_until(tx, 100.0)
    retransmits = [when for when, action in log if isinstance(action, SendRequest)]
    assert retransmits == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert [(when, type(a)) for when, a in log if not isinstance(a, SendRequest)] == [(32.0, TimedOut)]
    assert tx.terminated


def test_non_invite_timer_e_every_t2_in_proceeding() -> None:
    req = request("REGISTER")
    tx = ClientTransaction(req, 0.0, timers=Timers(t1=0.1, t2=2.0))
    tx.start()
    assert [w for w, _ in run_until(tx, 0.15)] == [0.1]  # next is due at 0.3
    assert delivered(tx.receive_response(respond(req, 100), 0.2)) == [100]
    assert tx.state is ClientState.PROCEEDING
    log = run_until(tx, 10.0)
    times = [round(w, 6) for w, a in log if isinstance(a, SendRequest)]
    assert times == [0.3, 2.3, 4.3, 6.3]  # the pending E fires, then every T2; F at 6.4
    assert [type(a) for _, a in log][-1] is TimedOut


def test_timer_late_call_does_not_burst() -> None:
    tx = ClientTransaction(request("OPTIONS"), 0.0)
    tx.start()
    assert len(tx.handle_timer(5.0)) == 1  # one retransmission, however late
    assert tx.timer() == pytest.approx(6.0)  # rescheduled from now (interval 1 s after the first doubling)


def test_invite_non2xx_ack_and_retransmitted_final() -> None:
    invite = request("INVITE")
    tx = ClientTransaction(invite, 0.0)
    tx.start()
    busy = respond(invite, 486)
    actions = tx.receive_response(busy, 1.0)
    assert delivered(actions) == [486]
    (ack,) = sent(actions)
    assert ack == ack_for_non2xx(invite, busy)
    assert tx.state is ClientState.COMPLETED
    assert tx.timer() == 33.0  # Timer D = 32 s
    again = tx.receive_response(busy, 2.0)
    assert delivered(again) == [] and sent(again) == [ack]
    assert run_until(tx, 32.9) == []
    assert not tx.terminated
    assert run_until(tx, 33.0) == [] and tx.terminated
    assert tx.receive_response(busy, 34.0) == []


def test_invite_non2xx_reliable_terminates_at_once() -> None:
    invite = request("INVITE")
    tx = ClientTransaction(invite, 0.0, reliable=True)
    tx.start()
    actions = tx.receive_response(respond(invite, 603), 0.1)
    assert delivered(actions) == [603] and len(sent(actions)) == 1
    assert tx.terminated


def test_invite_timer_d_follows_long_t1() -> None:
    invite = request("INVITE")
    tx = ClientTransaction(invite, 0.0, timers=Timers(t1=1.0, t2=4.0))
    tx.start()
    tx.receive_response(respond(invite, 404), 0.0)
    assert tx.timer() == 64.0  # max(32 s, 64*T1)


def test_invite_2xx_accepted_state() -> None:
    invite = request("INVITE")
    tx = ClientTransaction(invite, 0.0)
    tx.start()
    assert delivered(tx.receive_response(respond(invite, 180), 0.2)) == [180]
    assert tx.state is ClientState.PROCEEDING
    assert run_until(tx, 10.0) == []  # Timer A stopped by the provisional
    ok = respond(invite, 200)
    assert delivered(tx.receive_response(ok, 10.0)) == [200]
    assert tx.state is ClientState.ACCEPTED
    assert delivered(tx.receive_response(ok, 10.5)) == [200]  # retransmission: the TU ACKs it again
    assert delivered(tx.receive_response(respond(invite, 200, to_tag="fork2"), 11.0)) == [200]
    assert tx.receive_response(respond(invite, 486), 11.0) == []
    assert tx.receive_response(respond(invite, 180), 11.0) == []
    assert tx.timer() == 42.0  # Timer M = 64*T1 after the first 2xx
    run_until(tx, 42.0)
    assert tx.terminated


def test_provisional_retransmission_delivered_once() -> None:
    invite = request("INVITE")
    tx = ClientTransaction(invite, 0.0)
    ringing = respond(invite, 180)
    assert delivered(tx.receive_response(ringing, 0.1)) == [180]
    assert tx.receive_response(ringing, 0.2) == []
    assert delivered(tx.receive_response(respond(invite, 183), 0.3)) == [183]
    assert delivered(tx.receive_response(respond(invite, 180, to_tag="other"), 0.3)) == [180]


def test_invite_timer_c_then_487_is_acked_not_delivered() -> None:
    invite = request("INVITE")
    tx = ClientTransaction(invite, 0.0, proceeding_timeout=60.0)
    tx.start()
    tx.receive_response(respond(invite, 180), 1.0)
    log = run_until(tx, 70.0)
    assert [(w, type(a)) for w, a in log] == [(60.0, TimedOut)]
    assert not tx.terminated and tx.timer() == 92.0  # 64*T1 for the answer to the TU's CANCEL
    assert tx.receive_response(respond(invite, 183), 61.0) == []
    actions = tx.receive_response(respond(invite, 487), 62.0)
    assert delivered(actions) == [] and [r.method for r in sent(actions)] == ["ACK"]
    run_until(tx, 62.0 + 32.0)
    assert tx.terminated


def test_invite_timer_c_then_2xx_still_delivered() -> None:
    invite = request("INVITE")
    tx = ClientTransaction(invite, 0.0, proceeding_timeout=60.0)
    tx.receive_response(respond(invite, 180), 1.0)
    run_until(tx, 60.0)
    assert delivered(tx.receive_response(respond(invite, 200), 70.0)) == [200]
    assert tx.state is ClientState.ACCEPTED


def test_invite_silent_after_timer_c_grace() -> None:
    invite = request("INVITE")
    tx = ClientTransaction(invite, 0.0, proceeding_timeout=40.0)
    tx.receive_response(respond(invite, 100), 0.5)
    log = run_until(tx, 1000.0)
    assert [(w, type(a)) for w, a in log] == [(40.0, TimedOut)]
    assert tx.terminated


def test_non_invite_final_and_timer_k() -> None:
    req = request("OPTIONS")
    tx = ClientTransaction(req, 0.0)
    tx.start()
    ok = respond(req, 200)
    assert delivered(tx.receive_response(ok, 0.7)) == [200]
    assert tx.state is ClientState.COMPLETED
    assert tx.receive_response(ok, 0.8) == []
    assert tx.receive_response(respond(req, 404), 0.9) == []
    assert tx.timer() == pytest.approx(5.7)  # Timer K = T4
    assert run_until(tx, 100.0) == []  # no retransmissions after the final response
    assert tx.terminated


def test_non_invite_reliable_final_terminates() -> None:
    req = request("OPTIONS")
    tx = ClientTransaction(req, 0.0, reliable=True)
    assert delivered(tx.receive_response(respond(req, 200), 0.1)) == [200]
    assert tx.terminated


def test_transport_error_is_a_timeout() -> None:
    req = request("OPTIONS")
    tx = ClientTransaction(req, 0.0)
    (error,) = tx.transport_error("connection refused")
    assert isinstance(error, TransportError) and isinstance(error, TimedOut)
    assert error.request == req and error.reason == "connection refused"
    assert tx.terminated and tx.transport_error() == []


# --------------------------------------------------------------------------------------------- table


def test_table_matches_branch_and_method() -> None:
    table = ClientTransactionTable()
    invite = request("INVITE", branch="z9hG4bKinv")
    options = request("OPTIONS", branch="z9hG4bKopt", cseq=2)
    assert table.start(invite, 0.0) == [SendRequest(invite)]
    assert table.start(options, 0.0) == [SendRequest(options)]
    assert len(table) == 2
    # Another branch, or the INVITE's branch with another CSeq method, finds nothing.
    other = request("OPTIONS", branch="z9hG4bKnope", cseq=2)
    assert table.receive_response(respond(other, 200), 0.1) == []
    cancel_like = respond(make_cancel(invite), 200)
    assert table.receive_response(cancel_like, 0.1) == []
    assert table.get(invite) is not None and table.get(invite).state is ClientState.CALLING  # type: ignore[union-attr]
    # A response whose top Via sent-by is not ours is discarded (§18.1.2).
    forged = respond(request("OPTIONS", branch="z9hG4bKopt", cseq=2, via_host="10.9.9.9"), 200)
    assert table.receive_response(forged, 0.1) == []
    assert delivered(table.receive_response(respond(options, 200), 0.2)) == [200]
    assert delivered(table.receive_response(respond(invite, 486), 0.3)) == [486]


def test_table_timers_and_cleanup() -> None:
    table = ClientTransactionTable()
    req = request("OPTIONS")
    table.start(req, 0.0)
    assert table.timer() == 0.5
    assert sent(table.handle_timer(0.5)) == [req]
    assert table.timer() == 1.5
    table.receive_response(respond(req, 200), 1.0)
    assert table.timer() == pytest.approx(6.0)
    assert table.handle_timer(5.9) == []
    assert len(table) == 1
    assert table.handle_timer(6.0) == []
    assert len(table) == 0 and table.timer() is None
    # A late retransmission of the final response is a stray now: dropped.
    assert table.receive_response(respond(req, 200), 7.0) == []


def test_table_timeout_removes_transaction() -> None:
    table = ClientTransactionTable()
    req = request("OPTIONS")
    table.start(req, 0.0)
    actions = [a for _, a in run_until(table, 40.0)]
    assert [type(a) for a in actions].count(TimedOut) == 1
    assert len(table) == 0


def test_table_stray_2xx_to_invite_delivered() -> None:
    table = ClientTransactionTable()
    invite = request("INVITE")
    assert delivered(table.receive_response(respond(invite, 200), 0.0)) == [200]
    assert table.receive_response(respond(invite, 486), 0.0) == []
    assert table.receive_response(respond(request("OPTIONS"), 200), 0.0) == []
    # After Accepted ends, 2xx retransmissions still reach the TU (it must ACK them).
    table.start(invite, 0.0)
    table.receive_response(respond(invite, 200), 1.0)
    run_until(table, 100.0)
    assert len(table) == 0
    assert delivered(table.receive_response(respond(invite, 200), 101.0)) == [200]


def test_table_capacity_and_duplicates() -> None:
    table = ClientTransactionTable(max_transactions=3)
    for _ in range(3):
        table.start(request("OPTIONS", branch=new_branch()), 0.0)
    with pytest.raises(TooManyTransactions):
        table.start(request("OPTIONS", branch=new_branch()), 0.0)
    small = ClientTransactionTable()
    req = request("OPTIONS")
    small.start(req, 0.0)
    with pytest.raises(ValueError):
        small.start(req, 0.0)
    invite = request("INVITE")
    ack = ack_for_non2xx(invite, respond(invite, 486))
    assert small.start(ack, 0.0) == [SendRequest(ack)] and len(small) == 1


def test_table_cancel_waits_for_provisional() -> None:
    table = ClientTransactionTable()
    invite = request("INVITE")
    table.start(invite, 0.0)
    assert table.cancel(invite, 0.1) == []  # §9.1: not before a provisional response
    assert table.cancel(invite, 0.1) == []
    actions = table.receive_response(respond(invite, 180), 0.4)
    assert delivered(actions) == [180]
    (cancel,) = sent(actions)
    assert cancel == make_cancel(invite)
    assert table.cancel(invite, 0.5) == []  # only once
    assert delivered(table.receive_response(respond(cancel, 200), 0.6)) == [200]
    actions = table.receive_response(respond(invite, 487), 0.7)
    assert delivered(actions) == [487] and [r.method for r in sent(actions)] == ["ACK"]


def test_table_cancel_in_proceeding_and_after_final() -> None:
    table = ClientTransactionTable()
    invite = request("INVITE")
    table.start(invite, 0.0)
    table.receive_response(respond(invite, 100), 0.1)
    assert [r.method for r in sent(table.cancel(invite, 0.2))] == ["CANCEL"]
    second = request("INVITE", branch=new_branch(), cseq=2)
    table.start(second, 0.0)
    assert table.cancel(second, 0.1) == []  # deferred
    table.receive_response(respond(second, 486), 0.2)  # final first: nothing to cancel any more
    assert (table.get(second).branch, "CANCEL") not in table.transactions  # type: ignore[union-attr]
    assert table.cancel(second, 0.3) == []
    assert table.cancel(request("OPTIONS", branch=new_branch()), 0.3) == []


def test_table_transport_error_and_forget() -> None:
    table = ClientTransactionTable()
    req = request("OPTIONS")
    table.start(req, 0.0)
    (error,) = table.transport_error(req, "ICMP port unreachable")
    assert isinstance(error, TransportError) and len(table) == 0
    table.start(req, 1.0)
    assert table.forget(req) and len(table) == 0 and not table.forget(req)
    assert table.timer() is None


# --------------------------------------------------------------------------------------------- property

STATUSES = [100, 180, 183, 200, 202, 302, 401, 486, 487, 500, 603]


@settings(max_examples=300)
@given(
    method=st.sampled_from(["INVITE", "OPTIONS", "REGISTER"]),
    reliable=st.booleans(),
    events=st.lists(
        st.tuples(st.floats(0, 3, allow_nan=False), st.sampled_from([None, *STATUSES]), st.booleans()), max_size=30
    ),
)
def test_transaction_random_events_terminate(
    method: str, reliable: bool, events: list[tuple[float, int | None, bool]]
) -> None:
    """Random responses and timer ticks: nothing raises, final outcomes reach the TU at most once (2xx to
    INVITE aside), and the transaction ends by 64*T1 + 32 s (plus Timer C when an INVITE got a 1xx)."""
    proceeding_timeout = 60.0
    req = request(method)
    tx = ClientTransaction(req, 0.0, reliable=reliable, proceeding_timeout=proceeding_timeout)
    actions = tx.start()
    now = 0.0
    ended_at: float | None = None
    provisional_seen = False

    def fire_until(end: float) -> None:
        nonlocal ended_at
        for _ in range(1000):
            when = tx.timer()
            if when is None or when > end:
                return
            actions.extend(tx.handle_timer(when))
            if tx.terminated and ended_at is None:
                ended_at = when
        raise AssertionError("timer loop did not settle")

    for delta, status, other_tag in events:
        now += delta * 4  # up to 12 s apart: events span the whole transaction life
        fire_until(now)
        if status is not None:
            if status < 200 and tx.state in (ClientState.CALLING, ClientState.TRYING):
                provisional_seen = True
            actions.extend(tx.receive_response(respond(req, status, to_tag="t2" if other_tag else "t1"), now))
            if tx.terminated and ended_at is None:
                ended_at = now
    fire_until(float("inf"))
    assert tx.terminated and ended_at is not None and tx.timer() is None
    bound = 64 * T.t1 + 32.0
    if method == "INVITE" and provisional_seen:
        bound = proceeding_timeout + 64 * T.t1 + 32.0
    assert ended_at <= bound + 1e-9
    # One outcome per transaction: a final response (for INVITE: a non-2xx one) or a timeout, never both,
    # never twice; only 2xx to INVITE may reach the TU repeatedly.
    outcomes = [
        a
        for a in actions
        if isinstance(a, TimedOut)
        or (isinstance(a, DeliverResponse) and a.response.status >= (300 if method == "INVITE" else 200))
    ]
    assert len(outcomes) <= 1
    if method != "INVITE":
        assert len(outcomes) == 1  # a non-INVITE always ends with a response or Timer F
        assert [r.method for r in sent(actions)] == [method] * len(sent(actions))
    else:
        assert {r.method for r in sent(actions)} <= {"INVITE", "ACK"}


# --------------------------------------------------------------------------------------------- registration

REGISTRAR = "sip:registrar.example.com:5060"
CONTACT = "sip:alice@203.0.113.9:5060"


class Authorizer:
    def __init__(self, answer: str | None = 'Digest username="alice", response="x"') -> None:
        self.answer = answer
        self.calls: list[tuple[int, str, str]] = []

    def __call__(self, response: Response, method: str, uri: str) -> str | None:
        self.calls.append((response.status, method, uri))
        return self.answer


def registration(**config: object) -> tuple[OutboundRegistration, Authorizer]:
    auth = Authorizer()
    values: dict[str, object] = {"registrar_uri": REGISTRAR, "aor": "sip:alice@example.com", "username": "alice"}
    values["password"] = "secret"  # noqa: S105 - a test fixture; `authorize` is a stub
    values.update(config)
    return OutboundRegistration(RegistrationConfig(**values), authorize=auth), auth  # type: ignore[arg-type]


def one_request(actions: list[ClientAction]) -> Request:
    (req,) = sent(actions)
    assert parse_message(req.serialize()) == req
    return req


def challenge(req: Request, status: int, nonce: str, *, stale: bool = False) -> Response:
    name = "WWW-Authenticate" if status == 401 else "Proxy-Authenticate"
    value = f'Digest realm="example.com", nonce="{nonce}", qop="auth", algorithm=MD5' + (
        ", stale=TRUE" if stale else ""
    )
    return respond(req, status, extra=((name, value),))


def ok(req: Request, *contacts: str, expires: str | None = None) -> Response:
    extra = [("Contact", c) for c in contacts]
    if expires is not None:
        extra.append(("Expires", expires))
    return respond(req, 200, extra=tuple(extra))


def start(reg: OutboundRegistration, now: float = 0.0) -> Request:
    return one_request(reg.start(now, via_host="203.0.113.9", via_port=5060, contact=CONTACT))


def test_registration_happy_path_with_digest() -> None:
    reg, auth = registration()
    assert reg.state is RegistrationState.UNREGED and reg.timer() is None
    first = start(reg, 10.0)
    assert reg.state is RegistrationState.TRYING
    assert first.method == "REGISTER" and first.uri == REGISTRAR
    assert first.cseq() == (1, "REGISTER") and first.call_id() == reg.call_id
    assert first.headers.get("To") == "<sip:alice@example.com>"
    assert first.headers.get("From") == f"<sip:alice@example.com>;tag={reg.from_tag}"
    assert first.headers.get("Contact") == f"<{CONTACT}>"
    assert first.headers.get("Expires") == "600"
    assert first.top_via().rport == "" and first.top_via().host == "203.0.113.9"
    assert first.headers.get("Authorization") is None
    assert reg.receive_response(respond(first, 100), 10.1) == []
    second = one_request(reg.receive_response(challenge(first, 401, "n1"), 10.2))
    assert auth.calls == [(401, "REGISTER", REGISTRAR)]
    assert second.cseq() == (2, "REGISTER") and second.call_id() == first.call_id()
    assert second.from_tag() == first.from_tag() and second.top_via().branch != first.top_via().branch
    assert second.headers.get("Authorization") == auth.answer
    assert second.headers.get("Proxy-Authorization") is None
    # The stale 401 retransmission for the first REGISTER is ignored.
    assert reg.receive_response(challenge(first, 401, "n1"), 10.25) == []
    assert reg.receive_response(ok(second, f"<{CONTACT}>;expires=300"), 10.3) == []
    assert reg.state is RegistrationState.REGED
    assert reg.expires_at == pytest.approx(310.3)
    assert reg.last_status == 200
    assert reg.timer() == pytest.approx(160.3)  # half the granted 300 s
    refresh = one_request(reg.handle_timer(160.3))
    assert reg.state is RegistrationState.REGISTER and reg.expires_at == pytest.approx(310.3)
    assert refresh.cseq() == (3, "REGISTER") and refresh.call_id() == reg.call_id
    assert refresh.headers.get("Authorization") is None  # a new attempt answers a fresh challenge
    reg.receive_response(ok(refresh, f"<{CONTACT}>;expires=300"), 161.0)
    assert reg.state is RegistrationState.REGED and reg.expires_at == pytest.approx(461.0)


def test_registration_407_then_401_keeps_both_credentials() -> None:
    reg, auth = registration()
    first = start(reg)
    second = one_request(reg.receive_response(challenge(first, 407, "p1"), 0.1))
    assert second.headers.get("Proxy-Authorization") == auth.answer
    assert second.headers.get("Authorization") is None
    third = one_request(reg.receive_response(challenge(second, 401, "r1"), 0.2))
    assert third.headers.get("Proxy-Authorization") == auth.answer
    assert third.headers.get("Authorization") == auth.answer
    assert third.cseq()[0] == 3
    assert [c[0] for c in auth.calls] == [407, 401, 407]  # the proxy's challenge answered anew
    reg.receive_response(ok(third), 0.3)
    assert reg.state is RegistrationState.REGED


def test_registration_bad_credentials_then_backoff() -> None:
    reg, _ = registration(retry=30.0, max_retry=100.0)
    first = start(reg)
    second = one_request(reg.receive_response(challenge(first, 401, "n1"), 0.1))
    assert reg.receive_response(challenge(second, 401, "n1"), 0.2) == []
    assert reg.state is RegistrationState.FAILED and reg.state == "FAIL_WAIT"
    assert reg.last_status == 401 and "rejected" in reg.last_reason
    assert reg.expires_at is None
    assert reg.timer() == pytest.approx(30.2)
    assert reg.handle_timer(30.0) == []
    retry = one_request(reg.handle_timer(30.2))
    assert reg.state is RegistrationState.TRYING and retry.cseq()[0] == 3
    reg.receive_response(respond(retry, 403), 31.0)
    assert reg.timer() == pytest.approx(91.0)  # doubled
    retry = one_request(reg.handle_timer(91.0))
    reg.receive_response(respond(retry, 500), 92.0)
    assert reg.timer() == pytest.approx(192.0)  # 120 capped at max_retry 100
    retry = one_request(reg.handle_timer(192.0))
    reg.receive_response(ok(retry), 193.0)
    assert reg.state is RegistrationState.REGED and reg.failures == 0


def test_registration_stale_nonce_is_answered_again() -> None:
    reg, _ = registration()
    first = start(reg)
    second = one_request(reg.receive_response(challenge(first, 401, "n1"), 0.1))
    third = one_request(reg.receive_response(challenge(second, 401, "n1", stale=True), 0.2))
    fourth = one_request(reg.receive_response(challenge(third, 401, "n2", stale=True), 0.3))
    assert fourth.headers.get("Authorization") is not None
    assert reg.state is RegistrationState.TRYING


def test_registration_endless_fresh_challenges_are_bounded() -> None:
    reg, _ = registration()
    req = start(reg)
    for round_ in range(20):
        actions = reg.receive_response(challenge(req, 401, f"n{round_}"), 0.1 * round_)
        if not actions:
            break
        req = one_request(actions)
    assert reg.state is RegistrationState.FAILED
    assert reg.cseq <= 6


def test_registration_authorize_cannot_answer() -> None:
    reg, auth = registration()
    auth.answer = None
    first = start(reg)
    assert reg.receive_response(challenge(first, 401, "n1"), 0.1) == []
    assert reg.state is RegistrationState.FAILED and reg.last_status == 401
    # A 401 without any Digest challenge cannot be answered either.
    reg2, _ = registration()
    first = start(reg2)
    assert reg2.receive_response(respond(first, 401), 0.1) == []
    assert reg2.state is RegistrationState.FAILED


def test_registration_423_uses_min_expires() -> None:
    reg, _ = registration(expires=60)
    first = start(reg)
    second = one_request(reg.receive_response(respond(first, 423, extra=(("Min-Expires", "1800"),)), 0.1))
    assert second.headers.get("Expires") == "1800" and second.cseq()[0] == 2
    reg.receive_response(ok(second), 0.2)
    assert reg.state is RegistrationState.REGED and reg.expires_at == pytest.approx(1800.2)
    refresh = one_request(reg.handle_timer(reg.timer()))  # type: ignore[arg-type]
    assert refresh.headers.get("Expires") == "1800"
    # A 423 that does not raise the interval is a failure, not a loop.
    assert reg.receive_response(respond(refresh, 423, extra=(("Min-Expires", "100"),)), 901.0) == []
    assert reg.state is RegistrationState.FAILED and reg.last_status == 423


def test_registration_timeout_then_retry() -> None:
    reg, _ = registration()
    first = start(reg)
    log = run_until(reg, 40.0)
    resent = [w for w, a in log if isinstance(a, SendRequest)]
    assert resent == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert all(a.request == first for _, a in log if isinstance(a, SendRequest))
    assert reg.state is RegistrationState.FAILED and reg.last_status == 408
    assert reg.timer() == pytest.approx(62.0)  # Timer F at 32 s, then `retry` 30 s
    retry = one_request(reg.handle_timer(62.0))
    assert retry.cseq()[0] == 2 and reg.state is RegistrationState.TRYING


def test_registration_refresh_time_from_expires_header_and_contacts() -> None:
    reg, _ = registration()
    first = start(reg)
    # Another binding's expires is not ours; the header decides.
    reg.receive_response(ok(first, "<sip:alice@198.51.100.1:5060>;expires=3600", expires="60"), 1.0)
    assert reg.expires_at == pytest.approx(61.0) and reg.timer() == pytest.approx(31.0)
    refresh = one_request(reg.handle_timer(31.0))
    # Host compared case-insensitively, URI parameters ignored; a short grant refreshes 5 s before expiry.
    reg.receive_response(ok(refresh, "<sip:alice@203.0.113.9:5060;ob>;expires=8;q=1", expires="60"), 32.0)
    assert reg.expires_at == pytest.approx(40.0) and reg.timer() == pytest.approx(35.0)
    refresh = one_request(reg.handle_timer(35.0))
    # Nothing granted in the 200: what we asked.
    reg.receive_response(ok(refresh), 36.0)
    assert reg.expires_at == pytest.approx(636.0) and reg.timer() == pytest.approx(336.0)


def test_contact_expires_matching() -> None:
    req = request("REGISTER")
    response = ok(req, '"A" <SIP:alice@REGISTRAR.example.COM>;expires=77', "<sip:bob@registrar.example.com>;expires=5")
    assert _contact_expires(response, "sip:alice@registrar.example.com") == 77
    assert _contact_expires(response, "sip:carol@registrar.example.com") is None
    assert _contact_expires(ok(req, "<sip:alice@h>;expires=junk"), "sip:alice@h") is None


def test_registration_zero_grant_is_failure() -> None:
    reg, _ = registration()
    first = start(reg)
    reg.receive_response(ok(first, f"<{CONTACT}>;expires=0"), 1.0)
    assert reg.state is RegistrationState.FAILED


def test_registration_retry_after_honoured() -> None:
    reg, _ = registration(retry=10.0, max_retry=300.0)
    first = start(reg)
    reg.receive_response(respond(first, 503, extra=(("Retry-After", "120 (maintenance);duration=60"),)), 1.0)
    assert reg.timer() == pytest.approx(121.0)


def test_registration_stop_unregisters() -> None:
    reg, _ = registration()
    first = start(reg)
    reg.receive_response(ok(first), 1.0)
    bye = one_request(reg.stop(2.0))
    assert reg.state is RegistrationState.NOREG and reg.expires_at is None
    assert bye.headers.get("Expires") == "0" and bye.cseq()[0] == 2 and bye.call_id() == reg.call_id
    assert bye.headers.get("Contact") == f"<{CONTACT}>"
    # The unregister is challenged and answered, then done: no refresh, no retry.
    again = one_request(reg.receive_response(challenge(bye, 401, "n9"), 2.1))
    assert again.headers.get("Expires") == "0" and again.headers.get("Authorization") is not None
    assert reg.receive_response(ok(again), 2.2) == []
    assert reg.state is RegistrationState.NOREG and reg.timer() is None
    assert reg.stop(3.0) == []
    # Never started: nothing to remove.
    fresh, _ = registration()
    assert fresh.stop(0.0) == [] and fresh.state is RegistrationState.NOREG


def test_registration_stop_failure_stays_noreg() -> None:
    reg, _ = registration()
    start(reg)
    bye = one_request(reg.stop(1.0))
    run_until(reg, 100.0)
    assert reg.state is RegistrationState.NOREG and reg.last_status == 408 and reg.timer() is None
    del bye


def test_registration_update_contact() -> None:
    reg, _ = registration()
    first = start(reg)
    reg.receive_response(ok(first), 1.0)
    new_contact = "sip:alice@198.51.100.20:40000"
    update = one_request(reg.update_contact(5.0, via_host="198.51.100.20", via_port=40000, contact=new_contact))
    assert reg.state is RegistrationState.TRYING and reg.expires_at is None
    assert update.cseq()[0] == 2 and update.call_id() == reg.call_id
    assert update.top_via().host == "198.51.100.20" and update.top_via().port == 40000
    assert update.headers.get_all("Contact") == [f"<{new_contact}>", f"<{CONTACT}>;expires=0"]
    reg.receive_response(ok(update, f"<{new_contact}>;expires=120"), 5.5)
    assert reg.state is RegistrationState.REGED and reg.expires_at == pytest.approx(125.5)
    refresh = one_request(reg.handle_timer(reg.timer()))
    assert refresh.headers.get_all("Contact") == [f"<{new_contact}>"]  # the old one is gone now
    later = one_request(reg.update_contact(70.0, via_host="198.51.100.20", via_port=40000, contact=new_contact))
    # The refresh was in flight when the address changed: its late 200 is ignored.
    assert reg.receive_response(ok(refresh), 70.1) == [] and reg.state is RegistrationState.TRYING
    assert later.headers.get_all("Contact") == [f"<{new_contact}>"]
    # Before start, update_contact starts; after stop, it only remembers.
    fresh, _ = registration()
    assert len(sent(fresh.update_contact(0.0, via_host="10.0.0.1", via_port=5060, contact=CONTACT))) == 1
    fresh.stop(1.0)
    assert fresh.update_contact(2.0, via_host="10.0.0.2", via_port=5060, contact=CONTACT) == []


def test_registration_ignores_foreign_responses() -> None:
    reg, _ = registration()
    first = start(reg)
    assert reg.receive_response(respond(request("OPTIONS"), 200), 0.1) == []
    assert reg.state is RegistrationState.TRYING
    reg.receive_response(ok(first), 0.2)
    assert reg.receive_response(ok(first), 0.3) == []  # retransmitted 200
    assert reg.state is RegistrationState.REGED


def test_registration_config_validation() -> None:
    with pytest.raises(ValueError):
        registration(expires=0)
    with pytest.raises(ValueError):
        registration(retry=400.0, max_retry=300.0)
    with pytest.raises(ValueError):
        registration(registrar_uri="registrar")
    reg, _ = registration(transport="tcp")
    req = start(reg)
    assert req.top_via().transport == "TCP"
    assert run_until(reg, 1.0) == []  # reliable: no Timer E


@settings(max_examples=300)
@given(st.lists(st.text(max_size=80), max_size=3), st.text(max_size=80))
def test_header_scanners_never_raise(values: list[str], uri: str) -> None:
    nonces, stale = _challenge_nonces(values)
    assert isinstance(nonces, set) and isinstance(stale, bool)
    identity = _uri_identity(uri)
    assert identity is None or identity[2] == identity[2].lower()


def test_challenge_scanner_reads_digest() -> None:
    nonces, stale = _challenge_nonces(
        ['Digest realm="a,b", nonce="x\\"y", stale=true', 'Basic realm="r", Digest nonce=plain, algorithm=SHA-256']
    )
    assert nonces == {'x"y', "plain"} and stale
    assert _challenge_nonces(['Basic nonce="no"']) == (set(), False)


HEADER_VALUES = st.one_of(
    st.sampled_from(
        [
            "<sip:alice@203.0.113.9:5060>;expires=30",
            "<sip:alice@203.0.113.9:5060>;expires=99999999999999",
            "sip:alice@203.0.113.9:5060;expires=x",
            "<sip:alice@203.0.113.9:5060",
            "*",
            'Digest nonce="a", stale=true',
            'Digest nonce="unterminated',
            "Digest ,,,=,=",
            "0",
            "4294967296",
        ]
    ),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60),
)


@settings(max_examples=300)
@given(
    status=st.sampled_from([100, 200, 401, 407, 423, 403, 503]),
    headers=st.lists(
        st.tuples(
            st.sampled_from(
                ["Contact", "Expires", "WWW-Authenticate", "Proxy-Authenticate", "Min-Expires", "Retry-After"]
            ),
            HEADER_VALUES,
        ),
        max_size=5,
    ),
)
def test_registration_random_responses_never_raise(status: int, headers: list[tuple[str, str]]) -> None:
    """Hostile registrar answers: the machine only changes state (parsed input, so only parsable values)."""
    reg, _ = registration()
    req = start(reg)
    for name, value in headers:
        req_response = make_response(req, status, to_tag="x", extra_headers=[(name, value)])
        try:
            parsed = parse_message(req_response.serialize())
        except DecodeError:
            continue
        assert isinstance(parsed, Response)
        actions = reg.receive_response(parsed, 1.0)
        for action in actions:
            assert isinstance(action, SendRequest)
            req = action.request
    run_until(reg, 1000.0)
    assert reg.state in set(RegistrationState)


def test_registration_repeated_address_changes_remove_every_old_contact() -> None:
    reg, _ = registration()
    start(reg)
    b, c = "sip:alice@198.51.100.2:5060", "sip:alice@198.51.100.3:5060"
    reg.update_contact(1.0, via_host="198.51.100.2", via_port=5060, contact=b)
    third = one_request(reg.update_contact(2.0, via_host="198.51.100.3", via_port=5060, contact=c))
    assert third.headers.get_all("Contact") == [f"<{c}>", f"<{CONTACT}>;expires=0", f"<{b}>;expires=0"]
    back = one_request(reg.update_contact(3.0, via_host="203.0.113.9", via_port=5060, contact=CONTACT))
    assert back.headers.get_all("Contact") == [f"<{CONTACT}>", f"<{b}>;expires=0", f"<{c}>;expires=0"]
    reg.receive_response(ok(back), 3.5)
    refresh = one_request(reg.handle_timer(reg.timer()))  # type: ignore[arg-type]
    assert refresh.headers.get_all("Contact") == [f"<{CONTACT}>"]
