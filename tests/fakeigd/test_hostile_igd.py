"""A hostile LAN host answering SSDP: each attack ends within the deadline (+10 %), with RSS growth under
20 MB, and the real reason in the one-line error, in `probe --json` and in the candidate list.

Time and memory are judged beyond the fixed cost of a CLI process here (`baseline`: interpreter start,
imports, a refused connection), and the in-process elapsed time is checked against the deadline too.
"""

from __future__ import annotations

import pytest

from tests.fakeigd.conftest import GATEWAY, Baseline, FakeNet, Result, RunningIgd

DEADLINE = 2.0
SLACK = 1.10  # the "+10 %": held by the request's own clock (probe --json's elapsed_ms)
# The whole process is judged beyond the baseline (best of three, measured once) with room for its start-up
# varying on a busy 2-core machine (CI: 2 cores; a run beside other work measured +0.1 s): not the deadline.
START_NOISE = 0.3
RSS_GROWTH_KB = 20 * 1024
LOCATION = f"http://{GATEWAY}:5000/rootDesc.xml"


def within_bounds(result: Result, baseline: Baseline) -> None:
    assert result.json()["protocols"]["upnp"]["elapsed_ms"] <= DEADLINE * SLACK * 1000
    assert result.seconds - baseline.seconds <= DEADLINE * SLACK + START_NOISE, (result.seconds, baseline.seconds)
    assert result.max_rss_kb - baseline.max_rss_kb < RSS_GROWTH_KB, (result.max_rss_kb, baseline.max_rss_kb)


def one_line_with(result: Result, fragment: str) -> str:
    assert result.code == 7, result.stderr
    [line] = result.error_lines
    assert line.startswith("autonat: no port-mapping protocol works with") and fragment in line, line
    return line


@pytest.mark.parametrize(
    ("fake_igd", "fragment", "outcome"),
    [
        ("huge_header_line", f"reply headers from {LOCATION} exceed 16384 bytes", "failed"),
        ("header_drip", f"{LOCATION}: reply headers incomplete (", "unfinished"),
        ("drip", f"{LOCATION}: reply body incomplete (", "unfinished"),  # a body drip, Content-Length 5000
        ("chunked_drip", f"{LOCATION}: reply body incomplete (", "unfinished"),
        ("chunked_flood", "on the wire (chunk framing and trailers included)", "failed"),
        ("many_headers", "more than 100 header lines", "failed"),
        ("hang", f"{LOCATION}: connected, request sent, no reply", "unfinished"),
        ("entity_bomb", "description is unusable", "failed"),
    ],
    indirect=["fake_igd"],
)
def test_a_hostile_igd_ends_in_time_and_memory_with_its_reason(
    fakenet: FakeNet, fake_igd: RunningIgd, baseline: Baseline, fragment: str, outcome: str
) -> None:
    result = fakenet.autonat("probe", "--protocol", "upnp", "--timeout", str(DEADLINE), "--json")
    line = one_line_with(result, fragment)
    upnp = result.json()["protocols"]["upnp"]
    assert upnp["available"] is False and fragment in upnp["reason"] and upnp["reason"] in line
    [candidate] = upnp["candidates"]
    assert candidate["location"] == LOCATION and candidate["responder"] == GATEWAY
    assert candidate["outcome"] == outcome and fragment.removeprefix(f"{LOCATION}: ") in candidate["reason"]
    if outcome == "unfinished":
        assert f"within {DEADLINE:g} s" in line  # the deadline was what ended it
    within_bounds(result, baseline)


@pytest.mark.parametrize("fake_igd", ["huge_header_line"], indirect=True)
def test_the_reason_reaches_the_one_line_error_of_map_add(fakenet: FakeNet, fake_igd: RunningIgd) -> None:
    result = fakenet.autonat("map", "add", "5000", "udp", "--protocol", "upnp", "--timeout", str(DEADLINE))
    assert result.code == 7
    [line] = result.error_lines
    assert f"reply headers from {LOCATION} exceed 16384 bytes" in line, line


@pytest.mark.parametrize("fake_igd", ["header_drip"], indirect=True)
def test_a_drip_with_a_given_root_url_names_where_it_stalled(
    fakenet: FakeNet, fake_igd: RunningIgd, baseline: Baseline
) -> None:
    result = fakenet.autonat("probe", "--protocol", "upnp", "--timeout", "1", "--root-url", LOCATION, "--json")
    line = one_line_with(result, f"within 1 s ({LOCATION}: reply headers incomplete (")
    assert result.json()["protocols"]["upnp"]["elapsed_ms"] <= 1.0 * SLACK * 1000, line
    assert result.seconds - baseline.seconds <= 1.0 * SLACK + START_NOISE, line


@pytest.mark.parametrize("fake_igd", ["location_loopback"], indirect=True)
def test_a_refused_location_is_the_reason_and_ends_discovery_early(
    fakenet: FakeNet, fake_igd: RunningIgd, baseline: Baseline
) -> None:
    result = fakenet.autonat("probe", "--protocol", "upnp", "--timeout", str(DEADLINE), "--json")
    line = one_line_with(result, f"{GATEWAY} offered LOCATION http://127.0.0.1:5000/rootDesc.xml, refused: LOCATION")
    assert "within" not in line  # settled by the refusal, not by the deadline
    [candidate] = result.json()["protocols"]["upnp"]["candidates"]
    assert candidate["outcome"] == "refused" and "127.0.0.1" in candidate["reason"]
    assert result.seconds - baseline.seconds < DEADLINE / 2  # the failure window (0.5 s), not the deadline
    assert not [entry for entry in fake_igd.requests() if entry.startswith("HTTP")]


@pytest.mark.parametrize("fake_igd", ["header_drip"], indirect=True)
def test_the_human_probe_lists_each_candidate(fakenet: FakeNet, fake_igd: RunningIgd) -> None:
    result = fakenet.autonat("probe", "--protocol", "upnp", "--timeout", "1")
    assert result.code == 7
    assert f"unfinished: {LOCATION} from {GATEWAY}: {LOCATION}: reply headers incomplete (" in result.stdout
