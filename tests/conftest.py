"""Suite-wide settings and the markers that split the suite.

- hypothesis runs without per-example deadlines (CI machines stall at random).
- Markers (registered in pyproject.toml):
  - `root`: needs root (network namespaces, nftables, the lab). `pytest -m "not root"` runs everything
    else as any user, and it passes there (tests/helpers.py raises what a login session limits lower).
  - `lab`: runs against the real router (miniupnpd) in the lab namespaces; always `root` too.
  - `slow`: takes more than SLOW_SECONDS alone on the project's 2-core machine (`-m "not slow"` for a
    quick loop). The CI run (`./scripts/test.sh`, root) selects no marker: it runs everything.

`root` and `lab` come from the fixtures a test uses (FIXTURE_MARKS), so a new test that asks for the lab
or the fake-IGD network is marked without anyone remembering to. `slow` is a decorator on the test, or an
entry in SLOW_TESTS (measured with `--durations`); an entry that no longer names a test in its file is
reported as a warning, so a rename does not silently drop the marker.
"""

from __future__ import annotations

import warnings

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("autonat", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("autonat")

SLOW_SECONDS = 5.0

FIXTURE_MARKS: dict[str, tuple[str, ...]] = {
    # tests/lab/conftest.py: the lab's namespaces, veths, nftables and miniupnpd need root.
    "lab": ("lab", "root"),
    "healthy_lab": ("lab", "root"),
    "double_nat_lab": ("lab", "root"),
    # tests/fakeigd/conftest.py: two namespaces and a veth pair of its own (`ip netns add`).
    "fakenet": ("root",),
}

SLOW_TESTS: dict[str, str] = {
    # node id (parameters left out) -> seconds, measured with `--durations` on the 2-core machine.
    # Listed here rather than decorated because these files belong to other work in progress; an owner
    # who next edits the file may move the mark onto the test and drop the entry.
    "tests/unit/test_sip_message.py::test_fuzz_mutations_100k": "15.8 s: 100,000 mutated messages",
    "tests/lab/test_abuse.py::test_after_loss_on_the_lan_link_the_router_holds_exactly_the_wanted_set": "69.4 s",
    "tests/lab/test_sip_calls.py::test_double_nat_registration_and_a_60_s_call_without_ack_timeout": "60.9 s",
    "tests/lab/test_natpmp_pcp.py::test_twenty_add_del_cycles_survive_30_percent_loss_each_way": "23-29 s each",
    "tests/lab/test_abuse.py::test_an_invite_flood_opens_no_hole_beyond_the_caps_and_leaves_none_behind": "16.3 s",
    "tests/lab/test_abuse.py::test_a_password_dictionary_is_throttled_logged_for_fail2ban"
    "_and_the_right_password_still_works": "14.9 s",
    "tests/lab/test_daemon.py::test_twenty_sigkills_leave_exactly_the_desired_mappings": "12.6 s",
    "tests/lab/test_sip_calls.py::test_a_caller_that_never_acks_gets_a_bye_and_the_mapping_is_released": "7.4 s",
    "tests/lab/test_natpmp_pcp.py::test_policy_refusal_is_one_clear_line": "7.4 s",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    modules: dict[str, object] = {}  # file -> its imported module, for the SLOW_TESTS check
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        for fixture, marks in FIXTURE_MARKS.items():
            if fixture in fixtures:
                for mark in marks:
                    item.add_marker(getattr(pytest.mark, mark))
        if item.get_closest_marker("lab") is not None and item.get_closest_marker("root") is None:
            item.add_marker(pytest.mark.root)  # a module's `pytestmark = pytest.mark.lab` included
        if item.nodeid.split("[", 1)[0] in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
        module = getattr(item, "module", None)
        if module is not None:
            modules.setdefault(item.nodeid.split("::", 1)[0], module)
    # Judged on the imported module, not on the items: `pytest FILE::other_test` collects one item. A
    # warning, not an error: the files listed belong to others, who must not be stopped by this one.
    for name in SLOW_TESTS:
        module = modules.get(name.split("::", 1)[0])
        if module is not None and not hasattr(module, name.split("::")[-1]):
            warnings.warn(
                pytest.PytestWarning(
                    f"tests/conftest.py SLOW_TESTS names {name}, which its file no longer has: the test is not"
                    " marked slow; mark it @pytest.mark.slow where it now lives and drop the entry"
                ),
                stacklevel=1,
            )
