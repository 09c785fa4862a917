"""`autonat doctor`'s verdicts from measurements (the sans-IO half) and its shared report."""

from __future__ import annotations

from autonat.addresses import AddressKind
from autonat.doctor import report
from autonat.doctor.findings import (
    Finding,
    Measurements,
    ProtocolAnswer,
    SsdpBehaviour,
    Trial,
    Verdict,
    exit_status,
    judge,
)


def healthy() -> Measurements:
    return Measurements(
        gateway="192.168.77.1",
        local_address="192.168.77.10",
        protocols={
            "pcp": ProtocolAnswer("pcp", True, "answered", 1.0, 5),
            "upnp": ProtocolAnswer("upnp", True, "IGD", 50.0),
        },
        selected="pcp",
        external_ip="203.0.113.1",
        external_kind=AddressKind.PUBLIC,
        stun_server="stun:203.0.113.100",
        stun_address="203.0.113.1",
        unsolicited_blocked=True,
        trials=[Trial("pcp", 40000, 600, 600, 40000, reachable=True, renewal_keeps_port=True, deleted=True)],
        hairpin=False,
    )


def verdicts(m: Measurements) -> dict[str, Verdict]:
    return {f.check: f.verdict for f in judge(m)}


def test_a_healthy_router_is_ok_with_a_hairpin_warning() -> None:
    found = judge(healthy())
    assert exit_status(found) == 0
    assert verdicts(healthy())["mapping via pcp: from outside"] is Verdict.OK
    assert [f.check for f in found if f.verdict is not Verdict.OK] == ["hairpin"]


def test_double_nat_cgnat_and_a_disagreeing_stun_server_fail_with_a_fix() -> None:
    m = healthy()
    m.external_ip, m.external_kind = "100.64.1.2", AddressKind.SHARED
    finding = next(f for f in judge(m) if f.check == "external address")
    assert finding.verdict is Verdict.FAIL and "carrier-grade" in finding.summary and finding.fix
    m.external_ip, m.external_kind = "10.0.0.2", AddressKind.PRIVATE
    finding = next(f for f in judge(m) if f.check == "external address")
    assert finding.quirk == "P1" and "double NAT" in finding.summary
    m = healthy()
    m.stun_address = "198.51.100.9"
    assert verdicts(m)["STUN"] is Verdict.FAIL and exit_status(judge(m)) == 1


def test_a_mapping_that_does_not_forward_or_drops_after_a_while_is_named() -> None:
    m = healthy()
    m.trials[0].reachable = False
    assert verdicts(m)["mapping via pcp: from outside"] is Verdict.FAIL
    m = healthy()
    m.trials[0].still_reachable_after = (12.0, False)
    dropped = next(f for f in judge(m) if f.check == "mapping via pcp: after 12 s")
    assert dropped.verdict is Verdict.WARNING and "verify_interval" in (dropped.fix or "")


def test_permanent_only_refused_and_no_protocol() -> None:
    m = healthy()
    m.trials = [Trial("upnp", 40002, 600, 0, 40002, reachable=True)]
    permanent = next(f for f in judge(m) if f.check == "mapping via upnp")
    assert permanent.verdict is Verdict.WARNING and permanent.quirk == "U1"
    m.trials = [Trial("natpmp", 40004, 600, error="router refused (2 not authorized)")]
    assert verdicts(m)["mapping via natpmp"] is Verdict.FAIL
    nothing = Measurements(gateway="192.168.1.1", local_address="192.168.1.5")
    nothing.protocols = {"pcp": ProtocolAnswer("pcp", False, "no answer within 2 s")}
    assert verdicts(nothing)["protocols"] is Verdict.FAIL
    assert judge(Measurements(error="no default route"))[0].verdict is Verdict.FAIL


def test_without_a_stun_server_reachability_is_a_warning_not_a_pass() -> None:
    m = healthy()
    m.stun_server = None
    m.trials[0].reachable = None
    assert verdicts(m)["from outside"] is Verdict.WARNING


def test_the_shared_report_masks_the_external_address_unless_asked() -> None:
    m = healthy()
    found = judge(m)
    shared = report.share(m, found)
    assert report.masked(shared, "203.0.113.1") and report.MASK in shared
    assert "203.0.113.100" in shared  # the STUN server's address is not ours: kept
    assert report.MASK + ":5060" in report._redact("seen at 203.0.113.1:5060", "203.0.113.1")
    assert not report.masked(report.share(m, found, show_address=True), "203.0.113.1")
    data = report.to_dict(m, found)
    assert data["status"] == 0 and data["reachability"] == {"pcp": True} and data["external_address"] == "203.0.113.1"


def named(m: Measurements, quirk: str) -> list[Finding]:
    return [f for f in judge(m) if f.quirk == quirk]


def quirks(m: Measurements) -> set[str]:
    return {f.quirk for f in judge(m) if f.quirk}


def test_ssdp_behaviour_names_multicast_only_other_port_and_a_partial_ssdp_all() -> None:
    m = healthy()
    root = "http://192.168.77.1:5000/rootDesc.xml"
    m.ssdp = SsdpBehaviour(True, True, [1900], [root], root)
    assert quirks(m) == set()  # a well-behaved router: nothing named
    m.ssdp = SsdpBehaviour(False, True, [1900], [root], root)
    assert quirks(m) == {"S1"}
    m.ssdp = SsdpBehaviour(False, False, [], [], root)  # no answer at all: nothing to conclude
    assert quirks(m) == set()
    m.ssdp = SsdpBehaviour(True, True, [1900, 37098], [root], root)
    [other_port] = named(m, "S2")
    assert "37098" in other_port.summary and other_port.verdict is Verdict.OK
    m.ssdp = SsdpBehaviour(True, True, [1900], ["http://192.168.77.1:1900/WFADevice.xml"], root)
    [partial] = named(m, "S6")
    assert "WFADevice" in partial.summary and exit_status(judge(m)) == 0


def test_the_igd_description_names_several_wan_services_and_dslforum_types() -> None:
    m = healthy()
    m.igd = {"service_type": "urn:schemas-upnp-org:service:WANIPConnection:1", "skipped_services": []}
    assert quirks(m) == set()
    m.igd = {
        "service_type": "urn:schemas-upnp-org:service:WANPPPConnection:1",
        "skipped_services": [
            {"service_type": "urn:schemas-upnp-org:service:WANIPConnection:1", "connection_status": "Disconnected"}
        ],
    }
    [several] = named(m, "U12")
    assert "Disconnected" in several.summary and "WANPPPConnection" in several.summary
    m.igd = {"service_type": "urn:dslforum-org:service:WANIPConnection:1", "skipped_services": []}
    assert quirks(m) == {"U13"}


def test_the_codes_the_router_answered_tell_which_lease_and_conflict_quirk_it_is() -> None:
    m = healthy()
    m.trials = [Trial("upnp", 40002, 600, 0, 40002, router_codes=[402])]
    assert quirks(m) == {"U2"}  # ARRIS: 402 where 725 is meant
    m.trials = [Trial("upnp", 40002, 600, 0, 40002, router_codes=[725])]
    assert quirks(m) == {"U1"}
    m.trials = [Trial("upnp", 40002, 600, 604800, 40002, router_codes=[402, 402])]
    assert quirks(m) == {"U3"}
    m.trials = [Trial("upnp", 40002, 600, 600, 51234, router_codes=[501])]
    assert quirks(m) == {"U4"}
    m.trials = [Trial("upnp", 40002, 600, 600, 51234, router_codes=[718])]
    assert quirks(m) == {"U5"}
    m.trials = [Trial("upnp", 40002, 600, error="router answers UPnP error 725 ...", router_codes=[725, 725])]
    [refused] = named(m, "G11")
    assert refused.verdict is Verdict.FAIL and refused.fix and exit_status(judge(m)) == 1
    m.trials = [Trial("upnp", 40002, 600, error="router ... is not public", router_codes=[725])]
    assert quirks(m) == set()  # one 725, then autonat's own refusal: not G11


def test_leases_the_router_forces_and_mappings_it_drops_are_named() -> None:
    m = healthy()
    m.trials = [Trial("natpmp", 40004, 600, 86400, 40004)]
    assert quirks(m) == {"G1"}
    m.trials = [Trial("pcp", 40004, 60, 120, 40004)]
    assert quirks(m) == {"P4"}  # miniupnpd's clamp up to 120 s
    m.trials = [Trial("upnp", 40004, 600, 600, 40004, listed=True, router_lease=86400)]
    [held] = named(m, "U15")
    assert "86400" in held.summary
    m.trials = [Trial("upnp", 40004, 600, 600, 40004, listed=True, router_lease=598)]
    assert quirks(m) == set()  # miniupnpd lists what is left of the lease
    m.trials = [Trial("upnp", 40004, 600, 600, 40004, listed=True, still_listed_after=(12.0, False))]
    [dropped] = named(m, "U14")
    assert dropped.verdict is Verdict.WARNING and "verify_interval" in (dropped.fix or "")
    m.trials = [Trial("natpmp", 40004, 600, 600, 40004, anonymous_port=4)]
    [anonymous] = named(m, "P5")
    assert "result 4" in anonymous.summary
    m.trials = [Trial("natpmp", 40004, 600, 600, 40004, anonymous_port=0)]
    assert quirks(m) == set()


def test_natpmp_without_a_wan_address_is_named_double_nat() -> None:
    m = healthy()
    m.external_ip = m.external_kind = None
    m.protocols["natpmp"] = ProtocolAnswer("natpmp", False, "network failure (NAT-PMP result 3)", 1.0, code=3)
    m.trials = [Trial("pcp", 40000, 600, error="router refused ... double NAT, no mapping from the internet")]
    assert quirks(m) == {"P1"} and exit_status(judge(m)) == 1
    nothing = Measurements(gateway="192.168.1.1", local_address="192.168.1.5")
    nothing.protocols = {"natpmp": ProtocolAnswer("natpmp", False, "network failure (NAT-PMP result 3)", code=3)}
    assert quirks(nothing) == {"P1"}


def test_the_test_call_is_a_line_of_its_own() -> None:
    m = healthy()
    assert "test call" not in verdicts(m)  # none asked for: no line
    m.call = {
        "ok": True,
        "answered": True,
        "verdict": "ok: audio both ways through the NAT",
        "uri": "sip:9196@203.0.113.100",
        "rtp": {"sent": 150, "received": 150, "loss_percent": 0.0},
        "rtt_ms": {"avg": 0.3},
        "jitter_ms": 0.05,
    }
    [line] = [f for f in judge(m) if f.check == "test call"]
    assert line.verdict is Verdict.OK and "150/150 packets back" in line.summary
    m.call = {**m.call, "ok": False, "verdict": "fail: no audio back", "rtp": {"sent": 150, "received": 0}}
    [line] = [f for f in judge(m) if f.check == "test call"]
    assert line.verdict is Verdict.FAIL and line.fix is not None and "ext-rtp-ip" in line.fix
    assert exit_status(judge(m)) == 1  # no audio back: autonat cannot carry calls through this path
    m.call = {**m.call, "answered": False, "verdict": "fail: no answer"}
    [line] = [f for f in judge(m) if f.check == "test call"]
    assert line.verdict is Verdict.FAIL and line.fix is not None and "URI" in line.fix
    m.call, m.call_error = None, "no autonat daemon is running (no control socket at /run/autonat/control.sock)"
    [line] = [f for f in judge(m) if f.check == "test call"]
    assert line.verdict is Verdict.WARNING and "no autonat daemon" in line.summary
    assert exit_status(judge(m)) == 0  # a call that could not be asked for is not the router's failure
