"""Call admission and the rate limits under it, with a fake clock: which calls a flood gets, and what it costs."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autonat.limits import BucketTable, TokenBucket
from autonat.sip.admission import Admission, AdmissionLimits, Refusal, Ticket


def test_a_token_bucket_allows_its_burst_then_its_rate() -> None:
    bucket = TokenBucket(rate=2, burst=4)
    assert [bucket.take(0.0) for _ in range(5)] == [True, True, True, True, False]
    assert bucket.wait(0.0) == pytest.approx(0.5)
    assert not bucket.take(0.4)
    assert bucket.take(0.5)
    assert bucket.available(100.0) == 4  # never more than the burst saved up
    assert bucket.wait(100.0, 5) == math.inf  # more than the burst: never


def test_a_clock_going_back_takes_no_tokens_and_gives_none() -> None:
    bucket = TokenBucket(rate=1, burst=1)
    assert bucket.take(10.0)
    assert not bucket.take(5.0)
    assert bucket.take(11.0)


def test_rate_zero_means_no_limit() -> None:
    bucket = TokenBucket(rate=0, burst=0)
    assert all(bucket.take(0.0) for _ in range(10_000)) and bucket.wait(0.0) == 0
    table = BucketTable(0, 0, 1)
    assert all(table.take(f"10.0.{i // 256}.{i % 256}", 0.0) for i in range(1000)) and len(table) == 0


def test_invalid_buckets_are_refused() -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=-1, burst=1)
    with pytest.raises(ValueError):
        TokenBucket(rate=1, burst=0.5)
    with pytest.raises(ValueError):
        BucketTable(1, 1, 0)


@given(st.lists(st.tuples(st.integers(0, 50_000), st.floats(0, 1e6, allow_nan=False)), max_size=400))
def test_a_bucket_table_stays_bounded_whatever_the_keys(events: list[tuple[int, float]]) -> None:
    table = BucketTable(rate=1, burst=2, max_keys=16)
    for key, now in sorted(events, key=lambda e: e[1]):
        table.take(key, now)
        assert len(table) <= 16


@given(st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=300))
def test_a_bucket_never_grants_more_than_burst_plus_rate_times_time(times: list[float]) -> None:
    bucket = TokenBucket(rate=3, burst=5)
    times.sort()
    granted = sum(bucket.take(now) for now in times)
    assert granted <= 5 + 3 * (times[-1] - times[0]) + 1e-6


def admitted(result: Ticket | Refusal) -> Ticket:
    assert isinstance(result, Ticket), result
    return result


def test_one_source_is_held_to_its_rate_and_its_concurrent_calls_others_are_not() -> None:
    admission = Admission(AdmissionLimits(source_rate=5, source_burst=10, source_calls=16))
    flood = [admission.admit("203.0.113.100", "external", 0.0) for _ in range(1000)]
    assert sum(isinstance(r, Ticket) for r in flood) == 10  # the burst
    assert admission.refused[Refusal.SOURCE_RATE] == 990
    assert isinstance(admission.admit("203.0.113.101", "external", 0.0), Ticket)  # another address: welcome
    # A slow flood that never hangs up: at most source_calls at once from one address.
    slow = [admission.admit("198.51.100.7", "external", t / 2) for t in range(100)]
    assert sum(isinstance(r, Ticket) for r in slow) == 16
    assert admission.refused[Refusal.SOURCE_CALLS] > 0
    for ticket in [r for r in slow if isinstance(r, Ticket)]:
        admission.release(ticket)
    assert isinstance(admission.admit("198.51.100.7", "external", 100.0), Ticket)


def test_media_calls_are_capped_globally_and_per_profile_and_counted_once_per_call() -> None:
    admission = Admission(AdmissionLimits(max_media_calls=3, source_rate=0))
    tickets = [admitted(admission.admit(f"203.0.113.{i}", "a" if i < 4 else "b", 0.0)) for i in range(6)]
    assert admission.admit_media(tickets[0], 2, 0.0) is None
    assert admission.admit_media(tickets[0], 2, 0.0) is None  # the second leg of a bridge: same call
    assert admission.admit_media(tickets[1], 2, 0.0) is None
    assert admission.admit_media(tickets[2], 2, 0.0) is Refusal.PROFILE_MEDIA_CALLS  # profile a holds 2
    assert admission.admit_media(tickets[4], None, 0.0) is None
    assert admission.admit_media(tickets[5], None, 0.0) is Refusal.MEDIA_CALLS  # 3 in all
    assert admission.media_calls == 3 and admission.profile_media_calls("a") == 2
    admission.release(tickets[0])
    admission.release(tickets[0])  # idempotent
    assert admission.media_calls == 2 and admission.calls == 5
    assert admission.admit_media(tickets[5], None, 0.0) is None
    for ticket in tickets:
        admission.release(ticket)
    assert (admission.calls, admission.media_calls, admission.profile_media_calls("a")) == (0, 0, 0)


def test_max_calls_holds_whatever_the_sources() -> None:
    admission = Admission(AdmissionLimits(max_calls=5, source_rate=0))
    results = [admission.admit(f"10.0.0.{i}", "p", 0.0) for i in range(8)]
    assert [isinstance(r, Ticket) for r in results] == [True] * 5 + [False] * 3
    assert admission.refused[Refusal.CALLS] == 3


def test_refusals_are_summed_up_in_one_line_per_interval_naming_the_top_sources() -> None:
    admission = Admission(AdmissionLimits(source_rate=1, source_burst=1, summary_interval=10))
    assert admission.timer() is None and admission.summary(0.0) is None
    for i in range(5000):
        admission.admit("203.0.113.100", "p", 1.0 + i / 1000)
    admission.admit("203.0.113.9", "p", 2.0)
    admission.admit("203.0.113.9", "p", 2.0)
    assert admission.timer() == pytest.approx(11.001)  # the first refusal, at 1.001, opened the window
    assert admission.summary(5.0) is None  # not yet
    refused = admission.refused[Refusal.SOURCE_RATE]
    assert 4990 <= refused <= 4996  # 5001 asked in 5 s at 1/s with a burst of 1
    line = admission.summary(11.001)
    assert line is not None and "\n" not in line
    assert line.startswith(f"refused {refused} call(s) in the last 10 s (source-call-rate {refused})")
    assert f"top sources: 203.0.113.100 {refused - 1}, 203.0.113.9 1" in line
    assert admission.summary(30.0) is None and admission.timer() is None  # nothing new: nothing said


def test_the_summary_remembers_a_bounded_number_of_sources() -> None:
    admission = Admission(AdmissionLimits(max_calls=10**9, source_rate=1, source_burst=1, max_sources=100_000))
    for i in range(20_000):
        source = f"2001:db8::{i:x}"
        admission.admit(source, "p", 0.0)
        admission.admit(source, "p", 0.0)  # the second of each is refused
    assert len(admission._window_sources) <= 1000
    assert admission.refused[Refusal.SOURCE_RATE] == 20_000


def test_only_a_calm_source_may_use_the_reserve() -> None:
    """The pair held back in the pool and in map_rate goes to a source holding no mapped call and calling well
    under its burst: never to a flooding one, always to a person dialling in during the flood."""
    admission = Admission(AdmissionLimits(source_rate=5, source_burst=10, source_calls=16))
    flood = [admitted(admission.admit("203.0.113.100", "p", 0.0)) for _ in range(2)]
    assert admission.admit_media(flood[0], None, 0.0) is None and flood[0].reserve  # its first call is calm
    assert admission.admit_media(flood[1], None, 0.0) is None and not flood[1].reserve  # it holds one already
    admission.release(flood[0])
    admission.release(flood[1])
    flood += [admitted(admission.admit("203.0.113.100", "p", 0.0)) for _ in range(4)]
    assert admission.admit_media(flood[-1], None, 0.0) is None and not flood[-1].reserve  # over half its burst
    person = admitted(admission.admit("203.0.113.7", "p", 0.0))
    assert admission.admit_media(person, None, 0.0) is None and person.reserve
    for ticket in [*flood, person]:
        admission.release(ticket)
    # Calm again once it has stopped calling for a while and holds nothing.
    later = admitted(admission.admit("203.0.113.100", "p", 10.0))
    assert admission.admit_media(later, None, 10.0) is None and later.reserve
    admission.release(later)
    assert admission._per_source_media == {}  # live sources only


def test_without_a_source_rate_a_source_is_calm_while_it_holds_no_mapped_call() -> None:
    admission = Admission(AdmissionLimits(source_rate=0))
    first, second = (admitted(admission.admit("203.0.113.100", "p", 0.0)) for _ in range(2))
    assert admission.admit_media(first, None, 0.0) is None and first.reserve
    assert admission.admit_media(second, None, 0.0) is None and not second.reserve


def test_a_bucket_tables_level_reads_without_touching() -> None:
    table = BucketTable(rate=1, burst=4, max_keys=2)
    assert table.level("a", 0.0) == 4 and len(table) == 0  # unknown: a full bucket, nothing stored
    table.take("a", 0.0, 3)
    assert table.level("a", 0.0) == 1 and table.level("a", 2.0) == 3
    assert BucketTable(0, 0, 1).level("a", 0.0) == math.inf
