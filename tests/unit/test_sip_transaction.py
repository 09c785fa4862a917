"""Server transactions (RFC 3261 §17.2, RFC 6026) driven with a fake clock."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autonat.sip.message import Request, make_response, parse_message
from autonat.sip.transaction import (
    AckTimeout,
    Action,
    Deliver,
    InviteServerTransaction,
    NonInviteServerTransaction,
    State,
    Terminated,
    Timers,
    TransactionKey,
    TransactionStateError,
    TransactionTable,
    Transmit,
    Uas2xxRetransmitter,
    transaction_key,
)

SOURCE = ("203.0.113.7", 40000)


def request(
    method: str = "INVITE",
    *,
    branch: str = "z9hG4bK-abc",
    cseq: int = 1,
    to_tag: str | None = None,
    uri: str = "sip:echo@192.0.2.10",
    via_host: str = "10.0.0.5:5061",
    call_id: str = "call-1@10.0.0.5",
) -> Request:
    to = "<sip:echo@192.0.2.10>" + (f";tag={to_tag}" if to_tag else "")
    lines = [
        f"{method} {uri} SIP/2.0",
        f"Via: SIP/2.0/UDP {via_host};branch={branch};rport",
        "From: <sip:alice@10.0.0.5>;tag=from1",
        f"To: {to}",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {method}",
        "Max-Forwards: 70",
        "Content-Length: 0",
    ]
    message = parse_message(("\r\n".join(lines) + "\r\n\r\n").encode())
    assert isinstance(message, Request)
    return message


def transmitted(actions: list[Action]) -> list[int]:
    return [a.response.status for a in actions if isinstance(a, Transmit)]


def run_timers(
    tx: InviteServerTransaction | NonInviteServerTransaction | Uas2xxRetransmitter, until: float
) -> list[tuple[float, Action]]:
    """Fire every timer up to `until`, as a caller's event loop would; (time, action) pairs."""
    out: list[tuple[float, Action]] = []
    while (when := tx.timer()) is not None and when <= until:
        out += [(when, action) for action in tx.handle_timer(when)]
    return out


# --------------------------------------------------------------------------------------------- INVITE


def test_invite_delivered_then_100_trying_after_200_ms() -> None:
    invite = request()
    tx = InviteServerTransaction(invite, 0.0, destination=SOURCE)
    assert tx.receive_request(invite, 0.0) == [Deliver(invite)]
    assert tx.state is State.PROCEEDING
    assert tx.timer() == pytest.approx(0.2)
    assert tx.handle_timer(0.1) == []
    actions = tx.handle_timer(0.2)
    assert transmitted(actions) == [100]
    assert isinstance(actions[0], Transmit)
    assert actions[0].destination == SOURCE
    assert tx.timer() is None


def test_no_100_when_tu_answers_within_200_ms() -> None:
    invite = request()
    tx = InviteServerTransaction(invite, 0.0)
    tx.receive_request(invite, 0.0)
    assert transmitted(tx.send_response(make_response(invite, 180, to_tag="t1"), 0.05)) == [180]
    assert tx.handle_timer(0.2) == []


def test_retransmitted_invite_in_proceeding_resends_last_provisional() -> None:
    invite = request()
    tx = InviteServerTransaction(invite, 0.0)
    tx.receive_request(invite, 0.0)
    # Before any response: 100 Trying at once.
    assert transmitted(tx.receive_request(invite, 0.1)) == [100]
    tx.send_response(make_response(invite, 180, to_tag="t1"), 0.3)
    assert transmitted(tx.receive_request(invite, 0.5, destination=("198.51.100.1", 1))) == [180]
    assert tx.destination == ("198.51.100.1", 1)  # replies follow the latest source


@pytest.mark.parametrize("timers", [Timers(), Timers(t1=0.01, t2=0.08, t4=0.1)])
def test_2xx_accepted_then_timer_l(timers: Timers) -> None:
    invite = request()
    tx = InviteServerTransaction(invite, 0.0, timers=timers)
    tx.receive_request(invite, 0.0)
    ok = make_response(invite, 200, to_tag="t1")
    assert transmitted(tx.send_response(ok, 0.0)) == [200]
    assert tx.state is State.ACCEPTED
    # RFC 6026: INVITE retransmissions absorbed, 2xx from the TU passed on, ACK delivered.
    assert tx.receive_request(invite, 0.1) == []
    assert transmitted(tx.send_response(ok, timers.t1)) == [200]
    ack = request("ACK", to_tag="t1")
    assert tx.receive_request(ack, 0.2) == [Deliver(ack)]
    assert tx.timer() == pytest.approx(64 * timers.t1)
    assert run_timers(tx, 1000) == [(64 * timers.t1, Terminated(None))]
    assert tx.state is State.TERMINATED
    with pytest.raises(TransactionStateError):
        tx.send_response(make_response(invite, 486), 100)


@pytest.mark.parametrize("reliable", [False, True])
def test_486_timer_g_ack_absorbed_confirmed_then_timer_i(reliable: bool) -> None:
    invite = request()
    tx = InviteServerTransaction(invite, 0.0, reliable=reliable)
    tx.receive_request(invite, 0.0)
    busy = make_response(invite, 486, to_tag="t1")
    assert transmitted(tx.send_response(busy, 1.0)) == [486]
    assert tx.state is State.COMPLETED
    fired = run_timers(tx, 8.6)
    expected_times = [] if reliable else [1.5, 2.5, 4.5, 8.5]
    assert [t for t, _ in fired] == pytest.approx(expected_times)
    assert all(isinstance(a, Transmit) and a.response == busy for _, a in fired)
    assert transmitted(tx.receive_request(invite, 9.0)) == [486]  # retransmitted INVITE
    actions = tx.receive_request(request("ACK", to_tag="t1"), 9.0)
    if reliable:
        assert actions == [Terminated(None)]  # Timer I = 0
        return
    assert actions == []  # absorbed, not delivered
    assert tx.state is State.CONFIRMED
    assert tx.receive_request(invite, 9.5) == []
    assert tx.receive_request(request("ACK", to_tag="t1"), 9.5) == []
    assert tx.timer() == pytest.approx(14.0)  # T4
    assert run_timers(tx, 100) == [(14.0, Terminated(None))]


def test_486_without_ack_times_out_after_64_t1() -> None:
    invite = request()
    tx = InviteServerTransaction(invite, 0.0)
    tx.receive_request(invite, 0.0)
    tx.send_response(make_response(invite, 486), 0.0)
    fired = run_timers(tx, 100)
    retransmits = [t for t, a in fired if isinstance(a, Transmit)]
    assert retransmits == pytest.approx([0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5])
    assert fired[-2:] == [(32.0, AckTimeout(invite)), (32.0, Terminated(None))]


def test_late_timer_call_still_advances() -> None:
    invite = request()
    tx = InviteServerTransaction(invite, 0.0)
    tx.receive_request(invite, 0.0)
    tx.send_response(make_response(invite, 486), 0.0)
    assert transmitted(tx.handle_timer(10.0)) == [486]  # one retransmission, not a burst
    when = tx.timer()
    assert when is not None and when > 10.0


def test_invite_rejects_responses_out_of_state() -> None:
    invite = request()
    tx = InviteServerTransaction(invite, 0.0)
    tx.receive_request(invite, 0.0)
    tx.send_response(make_response(invite, 486), 0.0)
    with pytest.raises(TransactionStateError):
        tx.send_response(make_response(invite, 200), 0.0)


# --------------------------------------------------------------------------------------------- 2xx helper


@pytest.mark.parametrize("timers", [Timers(), Timers(t1=0.05, t2=0.4, t4=0.5)])
def test_2xx_retransmitted_until_timeout(timers: Timers) -> None:
    invite = request()
    ok = make_response(invite, 200, to_tag="t1")
    helper = Uas2xxRetransmitter(invite, ok, 0.0, timers=timers, destination=SOURCE)
    fired = run_timers(helper, 1000)
    times = [t for t, a in fired if isinstance(a, Transmit)]
    expected, t, interval = [], timers.t1, timers.t1
    while t < 64 * timers.t1:
        expected.append(t)
        interval = min(2 * interval, timers.t2)
        t += interval
    assert times == pytest.approx(expected)
    if timers == Timers():
        assert times[:5] == pytest.approx([0.5, 1.5, 3.5, 7.5, 11.5])
    assert fired[-1] == (pytest.approx(64 * timers.t1), AckTimeout(invite))
    assert all(a == Transmit(ok, SOURCE) for _, a in fired[:-1])
    assert helper.done and not helper.acked and helper.timer() is None


def test_2xx_retransmission_stops_on_matching_ack() -> None:
    invite = request()
    ok = make_response(invite, 200, to_tag="t1")
    helper = Uas2xxRetransmitter(invite, ok, 0.0)
    assert run_timers(helper, 1.6) != []
    assert not helper.receive_ack(request("ACK", to_tag="other"))
    assert not helper.receive_ack(request("ACK", to_tag="t1", cseq=2))
    assert not helper.receive_ack(request("ACK", to_tag="t1", call_id="x@y"))
    assert helper.receive_ack(request("ACK", branch="z9hG4bK-new-branch", to_tag="t1"))
    assert helper.acked and helper.timer() is None and helper.handle_timer(100) == []


def test_2xx_helper_over_tcp_only_times_out() -> None:
    invite = request()
    helper = Uas2xxRetransmitter(invite, make_response(invite, 200, to_tag="t"), 0.0, reliable=True)
    assert run_timers(helper, 100) == [(32.0, AckTimeout(invite))]


def test_2xx_helper_needs_2xx() -> None:
    invite = request()
    with pytest.raises(ValueError, match="2xx"):
        Uas2xxRetransmitter(invite, make_response(invite, 486), 0.0)


# --------------------------------------------------------------------------------------------- non-INVITE


@pytest.mark.parametrize("method", ["BYE", "OPTIONS", "REGISTER"])
def test_non_invite_retransmission_answered_from_stored_response(method: str) -> None:
    req = request(method, to_tag="t1" if method == "BYE" else None)
    tx = NonInviteServerTransaction(req, 0.0)
    assert tx.state is State.TRYING
    assert tx.receive_request(req, 0.0) == [Deliver(req)]
    assert tx.receive_request(req, 0.5) == []  # Trying: absorbed
    assert transmitted(tx.send_response(make_response(req, 100), 0.6)) == [100]
    assert tx.state is State.PROCEEDING
    assert transmitted(tx.receive_request(req, 0.7)) == [100]
    assert transmitted(tx.send_response(make_response(req, 200, to_tag="t1"), 1.0)) == [200]
    assert tx.state is State.COMPLETED
    assert transmitted(tx.receive_request(req, 5.0)) == [200]
    assert tx.timer() == pytest.approx(33.0)  # Timer J = 64*T1
    assert run_timers(tx, 100) == [(33.0, Terminated(None))]
    with pytest.raises(TransactionStateError):
        tx.send_response(make_response(req, 200), 40)


def test_non_invite_over_tcp_terminates_at_once() -> None:
    req = request("OPTIONS")
    tx = NonInviteServerTransaction(req, 0.0, reliable=True)
    tx.receive_request(req, 0.0)
    actions = tx.send_response(make_response(req, 200), 0.0)
    assert transmitted(actions) == [200] and actions[-1] == Terminated(None)
    assert tx.timer() is None


def test_non_invite_abandoned_when_tu_never_answers() -> None:
    req = request("OPTIONS")
    tx = NonInviteServerTransaction(req, 0.0, timers=Timers(abandon=3.0))
    tx.receive_request(req, 0.0)
    assert run_timers(tx, 100) == [(3.0, Terminated(None))]


def test_timers_validation() -> None:
    with pytest.raises(ValueError, match="T1"):
        Timers(t1=0)
    with pytest.raises(ValueError, match="T1"):
        Timers(t1=5, t2=4)
    assert Timers().timeout == 32.0


# --------------------------------------------------------------------------------------------- keys


def test_key_rfc3261() -> None:
    invite = request(branch="z9hG4bK-XyZ", via_host="Host.Example:5070")
    key = transaction_key(invite)
    assert key == TransactionKey("z9hg4bk-xyz", "host.example", 5070, "INVITE")
    # ACK maps to the INVITE; CANCEL and other methods are their own transactions.
    assert transaction_key(request("ACK", branch="z9hG4bK-XyZ", via_host="host.example:5070", to_tag="t")) == key
    assert transaction_key(request("CANCEL", branch="z9hG4bK-XyZ", via_host="host.example:5070")).method == "CANCEL"
    assert transaction_key(request(branch="z9hG4bK-other", via_host="host.example:5070")) != key
    assert transaction_key(request(branch="z9hG4bK-XyZ", via_host="host.example:5071")) != key


def test_key_rfc2543_fallback() -> None:
    invite = request(branch="old-branch")
    key = transaction_key(invite)
    assert key.legacy is not None
    assert key.legacy[0] == "sip:echo@192.0.2.10" and key.legacy[3] == "call-1@10.0.0.5" and key.legacy[4] == 1
    # The ACK for a non-2xx carries the response's To tag and its own CSeq method: still the INVITE's key.
    assert transaction_key(request("ACK", branch="old-branch", to_tag="t1")) == key
    assert transaction_key(request(branch="old-branch", cseq=2)) != key
    assert transaction_key(request(branch="old-branch", uri="sip:other@192.0.2.10")) != key
    assert transaction_key(request(branch="old-branch", call_id="c2@x")) != key
    bye = transaction_key(request("BYE", branch="old-branch", to_tag="a"))
    assert bye != transaction_key(request("BYE", branch="old-branch", to_tag="b"))


# --------------------------------------------------------------------------------------------- table


def drive(table: TransactionTable, until: float) -> list[tuple[float, Action]]:
    out: list[tuple[float, Action]] = []
    while (when := table.timer()) is not None and when <= until:
        out += [(when, action) for action in table.handle_timer(when)]
    return out


def test_table_invite_flow_with_100_trying_and_forgetting() -> None:
    table = TransactionTable()
    invite = request()
    assert table.receive_request(invite, 0.0, destination=SOURCE) == [Deliver(invite)]
    assert len(table) == 1
    fired = drive(table, 0.3)
    assert [(t, transmitted([a])) for t, a in fired] == [(pytest.approx(0.2), [100])]
    assert transmitted(table.receive_request(invite, 0.4)) == [100]  # retransmission absorbed
    ok = make_response(invite, 200, to_tag="t1")
    assert table.send_response(invite, ok, 0.5) == [Transmit(ok, SOURCE)]
    # The ACK for a 2xx has its own branch: no transaction matches, so the TU/dialog gets it.
    ack = request("ACK", branch="z9hG4bK-ack", to_tag="t1")
    assert table.receive_request(ack, 0.6) == [Deliver(ack)]
    key = transaction_key(invite)
    assert drive(table, 100) == [(pytest.approx(32.5), Terminated(key))]
    assert len(table) == 0 and table.timer() is None
    with pytest.raises(KeyError):
        table.send_response(invite, ok, 40)


def test_table_non_2xx_ack_absorbed_and_tcp() -> None:
    table = TransactionTable()
    invite = request()
    table.receive_request(invite, 0.0, reliable=True)
    table.send_response(invite, make_response(invite, 486, to_tag="t1"), 0.0)
    assert drive(table, 1.0) == []  # no Timer G over TCP
    key = transaction_key(invite)
    assert table.receive_request(request("ACK", to_tag="t1"), 0.1) == [Terminated(key)]
    assert len(table) == 0


def test_table_rfc2543_ack_must_match_response_to_tag() -> None:
    table = TransactionTable()
    invite = request(branch="legacy")
    table.receive_request(invite, 0.0)
    table.send_response(invite, make_response(invite, 486, to_tag="t1"), 0.0)
    stray = request("ACK", branch="legacy", to_tag="zz")
    assert table.receive_request(stray, 0.1) == [Deliver(stray)]
    assert table.receive_request(request("ACK", branch="legacy", to_tag="t1"), 0.1) == []
    assert table.get(invite) is not None and table.get(invite).state is State.CONFIRMED  # type: ignore[union-attr]


def test_table_non_invite_and_cancel() -> None:
    table = TransactionTable()
    invite = request()
    table.receive_request(invite, 0.0)
    cancel = request("CANCEL")
    assert table.receive_request(cancel, 0.1) == [Deliver(cancel)]
    assert len(table) == 2
    assert table.find_invite_for_cancel(cancel) is table.get(invite)
    assert table.find_invite_for_cancel(request("CANCEL", branch="z9hG4bK-none")) is None
    table.send_response(cancel, make_response(cancel, 200), 0.2)
    assert transmitted(table.receive_request(cancel, 0.3)) == [200]
    legacy = request(branch="legacy-2")
    table.receive_request(legacy, 0.0)
    assert table.find_invite_for_cancel(request("CANCEL", branch="legacy-2")) is table.get(legacy)


def test_table_bound_gives_503() -> None:
    table = TransactionTable(max_transactions=3)
    for i in range(3):
        table.receive_request(request("OPTIONS", branch=f"z9hG4bK-{i}"), 0.0)
    extra = request("OPTIONS", branch="z9hG4bK-extra")
    actions = table.receive_request(extra, 0.0, destination=SOURCE)
    assert len(actions) == 1 and isinstance(actions[0], Transmit)
    assert actions[0].response.status == 503 and actions[0].destination == SOURCE
    assert actions[0].response.headers.get("Retry-After") == "5"
    assert len(table) == 3
    # Retransmissions of existing transactions are still absorbed, ACKs still delivered.
    assert table.receive_request(request("OPTIONS", branch="z9hG4bK-0"), 0.1) == []
    ack = request("ACK", branch="z9hG4bK-ack2", to_tag="x")
    assert table.receive_request(ack, 0.1) == [Deliver(ack)]
    drive(table, 100)  # abandoned after 64*T1
    assert len(table) == 0
    assert table.receive_request(extra, 100) == [Deliver(extra)]


def test_a_full_table_drops_the_oldest_answered_transaction_before_refusing() -> None:
    table = TransactionTable(max_transactions=3)
    answered = [request("OPTIONS", branch=f"z9hG4bK-a{i}") for i in range(2)]
    for number, options in enumerate(answered):
        table.receive_request(options, number * 0.1)
        table.send_response(options, make_response(options, 200), number * 0.1)  # Completed: lingering
    waiting = request("OPTIONS", branch="z9hG4bK-w")
    table.receive_request(waiting, 0.2)  # not answered yet: never dropped
    fresh = request("OPTIONS", branch="z9hG4bK-new")
    assert table.receive_request(fresh, 0.3) == [Deliver(fresh)]
    assert table.get(answered[0]) is None and table.get(answered[1]) is not None and table.evicted == 1
    newer = request("OPTIONS", branch="z9hG4bK-newer")
    assert table.receive_request(newer, 0.4) == [Deliver(newer)]
    assert table.get(answered[1]) is None and table.get(waiting) is not None
    last = request("OPTIONS", branch="z9hG4bK-last")
    refused = table.receive_request(last, 0.5)  # three transactions all waiting for the TU
    assert len(refused) == 1 and isinstance(refused[0], Transmit) and refused[0].response.status == 503
    assert len(table) == 3
    drive(table, 100)
    assert len(table) == 0 and len(table._lingering) == 0 and len(table._timers) == 0


# --------------------------------------------------------------------------------------------- property

EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["retransmit", "ack", "answer1xx", "answerfinal", "tick"]),
        st.floats(min_value=0.0, max_value=3.0),
        st.sampled_from([180, 200, 486, 603]),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(
    method=st.sampled_from(["INVITE", "OPTIONS", "BYE"]),
    reliable=st.booleans(),
    events=EVENTS,
)
def test_random_interleavings_never_raise_and_terminate(
    method: str, reliable: bool, events: list[tuple[str, float, int]]
) -> None:
    timers = Timers(t1=0.05, t2=0.4, t4=0.5)
    table = TransactionTable(timers=timers)
    req = request(method, to_tag="t1" if method == "BYE" else None)
    now = 0.0
    actions: list[Action] = list(table.receive_request(req, now, reliable=reliable))
    for kind, dt, status in events:
        now += dt
        actions += table.handle_timer(now)
        if kind == "retransmit":  # may recreate the transaction once the table forgot it
            actions += table.receive_request(req, now, reliable=reliable)
        elif kind == "ack":
            actions += table.receive_request(request("ACK", to_tag="t1"), now, reliable=reliable)
        elif kind.startswith("answer") and table.get(req) is not None:
            code = status if kind == "answerfinal" else 180
            # The TU answering twice is its bug (TransactionStateError); the transaction stays consistent.
            with contextlib.suppress(TransactionStateError):
                actions += table.send_response(req, make_response(req, code, to_tag="t1"), now)
    # A TU that answers in the end: every transaction is over within 64*T1 + T4 of its answer.
    tx = table.get(req)
    if tx is not None and tx.state in (State.TRYING, State.PROCEEDING):
        actions += table.send_response(req, make_response(req, 200, to_tag="t1"), now)
    actions += table.handle_timer(now + timers.timeout + timers.t4)
    assert len(table) == 0 and table.timer() is None
    created = sum(a == Deliver(req) for a in actions)
    assert sum(isinstance(a, Terminated) for a in actions) == created >= 1
    assert sum(isinstance(a, AckTimeout) for a in actions) <= created
    for action in actions:
        if isinstance(action, Transmit):
            assert action.response.cseq() == req.cseq()


def test_table_timer_heap_stays_small_under_retransmissions() -> None:
    table = TransactionTable()
    invite = request()
    table.receive_request(invite, 0.0)
    table.send_response(invite, make_response(invite, 486, to_tag="t1"), 0.0)
    for i in range(1000):
        table.receive_request(invite, i * 0.001)
    assert len(table._timers._heap) <= 3
    fired = drive(table, 100)
    assert sum(isinstance(a, AckTimeout) for _, a in fired) == 1
    assert len(table) == 0 and table._timers._heap == [] and len(table._timers) == 0


def test_timer_heap_reschedules_unschedules_and_pops_in_order() -> None:
    from autonat.sip.timerheap import TimerHeap

    heap: TimerHeap[str] = TimerHeap()
    heap.set("a", 5.0)
    heap.set("b", 1.0)
    heap.set("a", 0.5)  # moved earlier: the old entry is skipped when it surfaces
    heap.set("c", 3.0)
    heap.set("c", None)
    assert heap.next() == 0.5 and len(heap) == 2
    assert heap.pop_due(0.4) is None
    assert [heap.pop_due(10.0), heap.pop_due(10.0), heap.pop_due(10.0)] == ["a", "b", None]
    assert heap.next() is None and len(heap) == 0
