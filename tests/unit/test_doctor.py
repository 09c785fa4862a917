"""`autonat doctor`'s verdicts from measurements (the sans-IO half) and its shared report."""

from __future__ import annotations

from autonat.addresses import AddressKind
from autonat.doctor import report
from autonat.doctor.findings import Measurements, ProtocolAnswer, Trial, Verdict, exit_status, judge


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
