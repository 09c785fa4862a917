"""Fixtures for tests against the real router (miniupnpd) in the lab namespaces.

- `lab` (session): one lab per test run under a unique prefix (`t<pid>`), always torn down at the end.
- `healthy_lab` (function): the same lab, first brought back to baseline (daemons running, no loss,
  original WAN address, rules intact, no double NAT), so a failed fault test does not poison the next one.
  Tests that ask for `lab` directly get the same treatment (autouse `_lab_baseline`).
- `double_nat_lab` (function): the lab with router2 + lan2 added; removed again afterwards.

Tests using these fixtures get the `lab` and `root` markers automatically (FIXTURE_MARKS in
tests/conftest.py). Without root or a needed Debian package they fail with the reason (never skip: a
skipped real-router test would hide a broken set-up); `pytest -m "not root"` leaves them out.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from autonat.lab import TEST_PROGRAMS, Lab, LabError, check_requirements
from tests.lab.daemon_helpers import Daemon


@pytest.fixture(scope="session")
def lab_prefix() -> str:
    """Prefix of this run's lab: unique per pytest process, short enough for the 12-char limit."""
    return f"t{os.getpid()}"


@pytest.fixture(scope="session")
def lab(lab_prefix: str) -> Iterator[Lab]:
    try:
        check_requirements(TEST_PROGRAMS)
    except LabError as exc:
        pytest.fail(f"lab unavailable: {exc} (run ./scripts/install.sh as root)")
    the_lab = Lab(lab_prefix)
    try:
        the_lab.up()  # cleans up after itself if it fails
        yield the_lab
    finally:
        the_lab.down()


def _baseline(lab: Lab) -> None:
    lab.up()  # restarts a dead daemon, rebuilds a broken lab
    lab.reset_faults()
    if lab.status().double_nat:
        lab.set_double_nat(False)


@pytest.fixture(autouse=True)
def _lab_baseline(request: pytest.FixtureRequest) -> None:
    if "lab" in request.fixturenames and "double_nat_lab" not in request.fixturenames:
        _baseline(request.getfixturevalue("lab"))


@pytest.fixture
def healthy_lab(lab: Lab) -> Lab:
    _baseline(lab)
    return lab


@pytest.fixture
def started() -> Iterator[list[Daemon]]:
    """Daemons a test started (tests/lab/daemon_helpers.Daemon), stopped with SIGTERM afterwards."""
    daemons: list[Daemon] = []
    yield daemons
    for daemon in daemons:
        daemon.stop(signal.SIGTERM, timeout=20)


@pytest.fixture
def double_nat_lab(lab: Lab) -> Iterator[Lab]:
    _baseline(lab)
    lab.set_double_nat(True)
    try:
        yield lab
    finally:
        lab.set_double_nat(False)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """A fresh autonat state directory (host secret, PCP nonces) for one test."""
    return tmp_path / "state"
