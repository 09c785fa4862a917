"""Renewal/verification timing (RFC 6887 §11.2.1) and the event bus."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autonat.engine import schedule
from autonat.engine.bus import SUBSCRIBER_QUEUE, EventBus
from autonat.engine.events import EventKind


@given(
    granted=st.floats(0, 1e6),
    lease=st.floats(1, 1e6),
    rand=st.floats(0, 1),
)
def test_first_renewal_is_between_half_and_five_eighths(granted: float, lease: float, rand: float) -> None:
    at = schedule.first_renewal(granted, lease, lambda: rand)
    assert granted + lease / 2 - 1e-6 <= at <= granted + lease * 5 / 8 + 1e-6


def test_retries_walk_three_quarters_seven_eighths_until_expiry() -> None:
    assert schedule.retry_renewal(0, 800, now=450) == 600  # 3/4
    assert schedule.retry_renewal(0, 800, now=600) == 700  # 7/8
    assert schedule.retry_renewal(0, 800, now=700) == 750  # 15/16
    assert schedule.retry_renewal(0, 800, now=799.5) is None  # under a second left


@given(now=st.floats(0, 1e6), lease=st.floats(1, 1e5), elapsed=st.floats(0, 1))
def test_retry_is_always_ahead_and_before_expiry(now: float, lease: float, elapsed: float) -> None:
    at = schedule.retry_renewal(now, lease, now + lease * elapsed)
    if at is not None:
        assert now + lease * elapsed < at < now + lease


def test_verification_spreads_a_burst() -> None:
    draws = iter([0.0, 0.5, 1.0])
    times = [schedule.first_verification(100, 60, lambda: next(draws)) for _ in range(3)]
    assert times == [130, 145, 160]
    assert schedule.next_verification(0, 60, lambda: 0.0) == pytest.approx(54)
    assert schedule.next_verification(0, 60, lambda: 1.0) == pytest.approx(66)


async def test_every_subscriber_gets_every_event_in_order() -> None:
    bus = EventBus()
    first, second = bus.subscribe(), bus.subscribe()
    waiting = [asyncio.ensure_future(anext(first)), asyncio.ensure_future(anext(second))]
    await asyncio.sleep(0)
    bus.publish(EventKind.NAT_ADD, port=5060)
    bus.publish(EventKind.NAT_DEL, port=5060)
    assert [(await w).kind for w in waiting] == [EventKind.NAT_ADD, EventKind.NAT_ADD]
    assert (await anext(first)).to_dict()["event"] == "nat-del"
    await first.aclose()
    await second.aclose()


async def test_a_slow_subscriber_loses_the_oldest_never_blocks() -> None:
    bus = EventBus()
    stream = bus.subscribe()
    pending = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    for port in range(SUBSCRIBER_QUEUE + 10):
        bus.publish(EventKind.NAT_RENEW, port=port)
    # The queue holds the newest SUBSCRIBER_QUEUE events: the ten oldest were dropped, in order.
    assert (await pending).data["port"] == 10
    assert (await anext(stream)).data["port"] == 11
    await stream.aclose()
