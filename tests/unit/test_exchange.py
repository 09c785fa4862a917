"""The sans-IO retransmission/exchange core, driven with a fake clock."""

import itertools
from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autonat.proto.errors import DecodeError
from autonat.proto.exchange import (
    NATPMP_SCHEDULE,
    PCP_SCHEDULE,
    Exchange,
    RetransmitSchedule,
    State,
)

SERVER = (IPv4Address("192.168.77.1"), 5351)


def accept_ok(data: bytes) -> bytes:
    if data != b"ok":
        raise DecodeError("not ok")
    return data


def run_silent(exchange: Exchange[bytes]) -> list[float]:
    """Drive an exchange against a router that never answers; return the send times."""
    sent: list[float] = []
    now = exchange.started
    for _ in range(1000):
        if exchange.datagrams_to_send(now):
            sent.append(now)
        timer = exchange.timer()
        if timer is None:
            break
        now = timer
        exchange.handle_timer(now)
    return sent


def test_natpmp_schedule_doubles_from_250ms_until_the_deadline() -> None:
    exchange = Exchange(b"req", SERVER, accept_ok, now=100.0, deadline=2.0, schedule=NATPMP_SCHEDULE)
    sent = run_silent(exchange)
    assert [round(t - 100, 3) for t in sent] == [0, 0.25, 0.75, 1.75]
    assert exchange.timed_out and exchange.state is State.TIMED_OUT
    assert exchange.transmissions == 4


def test_interval_is_capped_so_a_long_deadline_keeps_retrying() -> None:
    exchange = Exchange(b"req", SERVER, accept_ok, now=0.0, deadline=10.0, schedule=NATPMP_SCHEDULE)
    sent = run_silent(exchange)
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert gaps[:3] == [0.25, 0.5, 1.0]
    assert all(gap == 2.0 for gap in gaps[3:])
    assert sent[-1] < 10.0


def test_pcp_jitter_stays_within_ten_percent() -> None:
    for value in (0.0, 1.0):
        exchange = Exchange(
            b"r", SERVER, accept_ok, now=0.0, deadline=2.0, schedule=PCP_SCHEDULE, rand=lambda v=value: v
        )
        sent = run_silent(exchange)
        first_gap = sent[1] - sent[0]
        assert first_gap == pytest.approx(0.25 * (0.9 if value == 0.0 else 1.1))


def test_answer_from_the_server_completes() -> None:
    exchange = Exchange(b"req", SERVER, accept_ok, now=0.0)
    assert exchange.datagrams_to_send(0.0) == [b"req"]
    assert exchange.receive(b"ok", SERVER, 0.001) is None
    assert exchange.done and exchange.result == b"ok"
    assert exchange.round_trip == pytest.approx(0.001)
    assert exchange.timer() is None
    assert exchange.datagrams_to_send(5.0) == []


def test_wrong_source_and_garbage_are_dropped_and_counted() -> None:
    exchange = Exchange(b"req", SERVER, accept_ok, now=0.0)
    exchange.datagrams_to_send(0.0)
    assert exchange.receive(b"ok", (IPv4Address("192.168.77.66"), 5351), 0.01) == "reply from another address"
    assert exchange.receive(b"ok", (SERVER[0], 5350), 0.01) == "reply from another address"
    assert exchange.receive(b"junk", SERVER, 0.01) == "not ok"
    assert not exchange.done
    assert exchange.drops == {"reply from another address": 2, "not ok": 1}
    assert exchange.receive(b"ok", SERVER, 0.02) is None
    assert exchange.receive(b"ok", SERVER, 0.03) == "late reply"


def test_no_send_before_due() -> None:
    exchange = Exchange(b"req", SERVER, accept_ok, now=0.0)
    assert exchange.datagrams_to_send(0.0) == [b"req"]
    assert exchange.datagrams_to_send(0.1) == []
    assert exchange.timer() == pytest.approx(0.25)


def test_invalid_parameters() -> None:
    with pytest.raises(ValueError):
        RetransmitSchedule(initial=0, ceiling=1)
    with pytest.raises(ValueError):
        RetransmitSchedule(initial=2, ceiling=1)
    with pytest.raises(ValueError):
        RetransmitSchedule(initial=1, ceiling=2, jitter=0.5)
    with pytest.raises(ValueError):
        Exchange(b"", SERVER, accept_ok, now=0.0, deadline=0)


@given(
    deadline=st.floats(min_value=0.01, max_value=60),
    initial=st.floats(min_value=0.01, max_value=2),
    jitter=st.floats(min_value=0, max_value=0.25),
    rand=st.floats(min_value=0, max_value=1),
)
def test_every_schedule_ends_by_its_deadline(deadline: float, initial: float, jitter: float, rand: float) -> None:
    schedule = RetransmitSchedule(initial=initial, ceiling=max(initial, 2.0), jitter=jitter)
    exchange = Exchange(b"r", SERVER, accept_ok, now=0.0, deadline=deadline, schedule=schedule, rand=lambda: rand)
    sent = run_silent(exchange)
    assert exchange.timed_out
    assert sent[0] == 0.0
    assert all(t < deadline for t in sent)
    assert len(sent) <= 1 + deadline / (initial * (1 - jitter)) + 1
