"""Server state loss detection from epoch values (RFC 6886 §3.6, RFC 6887 §8.5)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autonat.proto.epoch import EpochRule, EpochTracker, natpmp_epoch_valid, pcp_epoch_valid

Validator = Callable[[int, float, int, float], bool]

MAX_EPOCH = 2**32 - 1
both_rules = pytest.mark.parametrize("valid", [natpmp_epoch_valid, pcp_epoch_valid])


@both_rules
def test_normal_progress_is_valid(valid: Validator) -> None:
    assert valid(1000, 50.0, 1060, 110.0)
    assert valid(0, 0.0, 3600, 3600.0)
    assert valid(500, 10.0, 500, 10.0)


@both_rules
def test_reboot_is_detected(valid: Validator) -> None:
    # An hour on the client's clock, and the server's epoch restarted near zero.
    assert not valid(100_000, 0.0, 12, 3600.0)
    assert not valid(3600, 100.0, 5, 200.0)


@both_rules
def test_small_clock_skew_is_tolerated(valid: Validator) -> None:
    # Server clock a little slow or a little fast relative to the client over ten minutes.
    assert valid(1000, 0.0, 1000 + 590, 600.0)
    assert valid(1000, 0.0, 1000 + 602, 600.0)
    # One-second jitter between the two clocks on back-to-back replies.
    assert valid(1000, 0.0, 1001, 0.2)
    assert valid(1000, 5.0, 1000, 6.5)


@both_rules
def test_large_backward_step_is_invalid(valid: Validator) -> None:
    assert not valid(1000, 0.0, 997, 0.0)
    assert not valid(1000, 0.0, 900, 1.0)


def test_natpmp_seven_eighths_rule_boundaries() -> None:
    # Elapsed 800 s: the conservative estimate is 1000 + 700; 2 s of slack below is still fine.
    assert natpmp_epoch_valid(1000, 0.0, 1698, 800.0)
    assert not natpmp_epoch_valid(1000, 0.0, 1697, 800.0)
    # A server clock running 7/8 of real time for a long time is still within the rule.
    assert natpmp_epoch_valid(0, 0.0, 87_500, 100_000.0)


def test_natpmp_ignores_a_fast_server_clock() -> None:
    # RFC 6886 only checks for a clock that fell behind; PCP also catches one that jumped ahead.
    assert natpmp_epoch_valid(1000, 0.0, 50_000, 10.0)
    assert not pcp_epoch_valid(1000, 0.0, 50_000, 10.0)


def test_natpmp_backward_within_slack_is_tolerated() -> None:
    # The RFC's 2-second slack absorbs a reordered reply from the same epoch.
    assert natpmp_epoch_valid(1000, 0.0, 998, 0.0)
    assert natpmp_epoch_valid(1000, 10.0, 999, 9.0)  # client clock went back: no elapsed time


def test_pcp_formula_boundaries() -> None:
    # new < prev - 1 is invalid, prev - 1 itself is not.
    assert pcp_epoch_valid(1000, 0.0, 999, 0.0)
    assert not pcp_epoch_valid(1000, 0.0, 998, 0.0)
    # server_delta + 2 < client_delta - client_delta/16: client_delta 160 -> 150, server 147 is
    # invalid, 148 is not.
    assert pcp_epoch_valid(0, 0.0, 148, 160.0)
    assert not pcp_epoch_valid(0, 0.0, 147, 160.0)
    # client_delta + 2 < server_delta - server_delta/16: server_delta 160 -> 150, client 147.5 is
    # invalid, 148 is not.
    assert pcp_epoch_valid(0, 0.0, 160, 148.0)
    assert not pcp_epoch_valid(0, 0.0, 160, 147.5)


@both_rules
def test_32_bit_values_do_not_crash(valid: Validator) -> None:
    assert valid(MAX_EPOCH - 10, 0.0, MAX_EPOCH, 10.0)
    # A wrap looks like a reboot, which is the safe reading.
    assert not valid(MAX_EPOCH, 0.0, 3, 4.0)


@both_rules
def test_out_of_range_epoch_is_rejected(valid: Validator) -> None:
    with pytest.raises(ValueError, match="32-bit"):
        valid(0, 0.0, 2**32, 1.0)
    with pytest.raises(ValueError, match="32-bit"):
        valid(-1, 0.0, 0, 1.0)


@given(
    st.integers(0, MAX_EPOCH - 10**6),
    st.floats(0, 1e6),
    st.integers(0, 10**6),
)
def test_server_in_lockstep_is_always_valid(prev_epoch: int, prev_time: float, elapsed: int) -> None:
    for valid in (natpmp_epoch_valid, pcp_epoch_valid):
        assert valid(prev_epoch, prev_time, prev_epoch + elapsed, prev_time + elapsed)


@given(st.integers(1000, 10**6), st.integers(0, 10))
def test_restart_after_long_uptime_is_always_detected(uptime: int, new_epoch: int) -> None:
    for valid in (natpmp_epoch_valid, pcp_epoch_valid):
        assert not valid(uptime, 0.0, new_epoch, float(uptime))


@given(st.integers(0, MAX_EPOCH), st.floats(-1e9, 1e9), st.integers(0, MAX_EPOCH), st.floats(-1e9, 1e9))
def test_any_32_bit_input_gives_a_bool(prev_epoch: int, prev_time: float, new: int, now: float) -> None:
    assert isinstance(natpmp_epoch_valid(prev_epoch, prev_time, new, now), bool)
    assert isinstance(pcp_epoch_valid(prev_epoch, prev_time, new, now), bool)


# --- tracker --------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["natpmp", "pcp", EpochRule.NATPMP, EpochRule.PCP])
def test_tracker_first_observation_is_not_a_reboot(rule: str) -> None:
    tracker = EpochTracker(rule)
    assert tracker.last is None
    assert tracker.observe(123_456, 10.0) is False
    assert tracker.last == (123_456, 10.0)


@pytest.mark.parametrize("rule", list(EpochRule))
def test_tracker_detects_reboot_and_then_follows_the_new_epoch(rule: EpochRule) -> None:
    tracker = EpochTracker(rule)
    assert not tracker.observe(50_000, 0.0)
    assert not tracker.observe(50_060, 60.0)
    assert not tracker.observe(50_120, 120.0)
    assert tracker.observe(3, 300.0)  # router rebooted
    assert tracker.last == (3, 300.0)
    assert not tracker.observe(63, 360.0)  # judged against the new epoch


def test_tracker_rule_matters() -> None:
    natpmp_tracker = EpochTracker(EpochRule.NATPMP)
    pcp_tracker = EpochTracker(EpochRule.PCP)
    for tracker in (natpmp_tracker, pcp_tracker):
        tracker.observe(100, 0.0)
    assert natpmp_tracker.observe(100_000, 10.0) is False
    assert pcp_tracker.observe(100_000, 10.0) is True


def test_tracker_reset() -> None:
    tracker = EpochTracker("pcp")
    tracker.observe(10_000, 0.0)
    tracker.reset()
    assert tracker.last is None
    assert tracker.observe(1, 1.0) is False


def test_tracker_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        EpochTracker("upnp")
    tracker = EpochTracker("natpmp")
    with pytest.raises(ValueError, match="32-bit"):
        tracker.observe(2**32, 0.0)
    assert tracker.last is None
