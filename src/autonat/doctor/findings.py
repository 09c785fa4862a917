"""What the measurements of `autonat doctor` mean, sans-IO: measurements in, verdicts out.

Every finding has a verdict (ok / warning / fail), one sentence saying what was seen, and, where the user
can act, the fix. Quirks with an entry in docs/QUIRKS.md are named by their ID. `exit_status` is 0 when
autonat can work with this router (warnings included) and 1 when something fails.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

from autonat.addresses import AddressKind

WEEK = 604800  # what autonat asks of a UPnP router that refuses both its lease and a permanent one (U3)
DAY = 86400  # a NAT-PMP/PCP grant this long or longer is taken as a day (mapper.MAX_GRANTED_LIFETIME, G1)
SSDP_PORT = 1900
NETWORK_FAILURE = 3  # NAT-PMP result 3 (RFC 6886 §3.5): the gateway has no WAN address (P1)


class Verdict(enum.StrEnum):
    OK = "ok"
    WARNING = "warning"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Finding:
    check: str
    verdict: Verdict
    summary: str
    fix: str | None = None
    quirk: str | None = None  # docs/QUIRKS.md ID

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Verdict) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True, slots=True)
class ProtocolAnswer:
    protocol: str
    available: bool
    reason: str
    elapsed_ms: float | None = None
    epoch: int | None = None
    external_ip: str | None = None
    code: int | None = None  # the result code of a refusal (NAT-PMP 3: no WAN address, P1)


@dataclass
class Trial:
    """One short-lived mapping of an unused UDP port, made with one protocol."""

    protocol: str
    internal_port: int
    requested_lease: int
    granted_lease: int | None = None
    external_port: int | None = None
    error: str | None = None
    renewal_keeps_port: bool | None = None
    reachable: bool | None = None  # None: not tested (no STUN server that can answer from elsewhere)
    still_reachable_after: tuple[float, bool] | None = None  # (seconds, reachable then)
    listed: bool | None = None  # UPnP: the router lists it (GetSpecificPortMappingEntry)
    router_lease: int | None = None  # UPnP: the lease the router lists for it (0: permanent)
    still_listed_after: tuple[float, bool] | None = None  # UPnP: (seconds, listed then)
    router_codes: list[int] = field(default_factory=list)  # error codes the router answered while mapping
    anonymous_port: int | None = None  # NAT-PMP: result code of a request with suggested port 0 (0: granted)
    deleted: bool | None = None

    @property
    def made(self) -> bool:
        return self.external_port is not None


@dataclass
class SsdpBehaviour:
    """How the gateway answers SSDP searches (UPnP DA 1.1 §1.3): a search sent to it, one sent to the
    multicast group, and `ssdp:all`, each from its own socket so that every answer is attributed."""

    unicast_answered: bool = False
    multicast_answered: bool = False
    source_ports: list[int] = field(default_factory=list)  # the gateway's reply source ports
    all_locations: list[str] = field(default_factory=list)  # LOCATIONs it gave to `ssdp:all`
    igd_location: str | None = None  # the root description autonat uses


@dataclass
class Measurements:
    gateway: str | None = None
    local_address: str | None = None
    interface: str | None = None
    error: str | None = None  # no router could be located at all
    protocols: dict[str, ProtocolAnswer] = field(default_factory=dict)
    selected: str | None = None
    igd: dict[str, Any] | None = None
    external_ip: str | None = None
    external_kind: AddressKind | None = None
    stun_server: str | None = None
    stun_address: str | None = None
    stun_error: str | None = None
    unsolicited_blocked: bool | None = None  # without a mapping, a reply from elsewhere is dropped
    trials: list[Trial] = field(default_factory=list)
    hairpin: bool | None = None
    ssdp: SsdpBehaviour | None = None
    announcements: int = 0
    notifies: int = 0
    elapsed: float = 0.0
    quick: bool = False
    call: dict[str, Any] | None = None  # the test call's result (autonat.sip.probecall.report), when one was made
    call_error: str | None = None  # why the test call asked for could not be made


def _protocol_findings(m: Measurements) -> list[Finding]:
    found = []
    answered = [p for p in m.protocols.values() if p.available]
    if not answered:
        reasons = "; ".join(f"{p.protocol}: {p.reason}" for p in m.protocols.values()) or m.error or "no answer"
        no_wan = "no usable WAN address" in reasons
        natpmp = m.protocols.get("natpmp")
        no_wan_natpmp = natpmp is not None and natpmp.code == NETWORK_FAILURE
        found.append(
            Finding(
                "protocols",
                Verdict.FAIL,
                f"no port-mapping protocol answers ({reasons})",
                "check the router's internet connection (it reports no WAN address)"
                if no_wan or no_wan_natpmp
                else "turn on UPnP IGD or NAT-PMP/PCP in the router's settings (often under 'NAT' or 'Advanced')",
                "U8" if no_wan else "P1" if no_wan_natpmp else None,
            )
        )
        return found
    for answer in m.protocols.values():
        timing = "" if answer.elapsed_ms is None else f" in {answer.elapsed_ms:.1f} ms"
        if answer.available:
            epoch = "" if answer.epoch is None else f", epoch {answer.epoch}"
            found.append(Finding(f"protocol {answer.protocol}", Verdict.OK, f"answers{timing}{epoch}"))
        elif answer.protocol == "natpmp" and answer.code == NETWORK_FAILURE:
            found.append(_no_wan_natpmp(answer))
        else:
            found.append(Finding(f"protocol {answer.protocol}", Verdict.OK, f"not available: {answer.reason}"))
    return found


def _no_wan_natpmp(answer: ProtocolAnswer) -> Finding:
    """NAT-PMP result 3 (network failure): miniupnpd behind another NAT answers so, with 0.0.0.0 (P1)."""
    return Finding(
        f"protocol {answer.protocol}",
        Verdict.WARNING,
        f"answers result 3 (network failure): the router has no WAN address of its own ({answer.reason})",
        "the router is behind another NAT or offline: put the upstream modem in bridge mode",
        "P1",
    )


def _address_findings(m: Measurements) -> list[Finding]:
    if m.external_ip is None:
        # NAT-PMP's result 3 says why (P1); a UPnP IGD without an address is not available at all (U8).
        natpmp = m.protocols.get("natpmp")
        return [
            Finding(
                "external address",
                Verdict.WARNING,
                "the router does not say its external address (no WAN connection, or a PCP-only router with"
                " no mapping yet)",
                "check the router's internet connection",
                "P1" if natpmp is not None and natpmp.code == NETWORK_FAILURE else None,
            )
        ]
    kind = m.external_kind
    if kind is AddressKind.PUBLIC:
        found = [Finding("external address", Verdict.OK, f"{m.external_ip} is public")]
    elif kind is AddressKind.SHARED:
        found = [
            Finding(
                "external address",
                Verdict.FAIL,
                f"{m.external_ip} is carrier-grade NAT space (RFC 6598): the provider shares one address",
                "ask the provider for a public IPv4 address (or use IPv6); mappings on this router cannot"
                " reach the internet",
            )
        ]
    else:
        found = [
            Finding(
                "external address",
                Verdict.FAIL,
                f"{m.external_ip} is {kind}: this router is behind another NAT (double NAT)",
                "put the upstream modem in bridge mode, or map the ports on the upstream router too",
                "P1",
            )
        ]
    if m.stun_server is not None:
        if m.stun_error is not None:
            found.append(Finding("STUN", Verdict.WARNING, f"{m.stun_server}: {m.stun_error}"))
        elif m.stun_address == m.external_ip:
            found.append(Finding("STUN", Verdict.OK, f"{m.stun_server} sees the same address"))
        else:
            found.append(
                Finding(
                    "STUN",
                    Verdict.FAIL,
                    f"{m.stun_server} sees {m.stun_address}, the router says {m.external_ip}: another NAT beyond"
                    " the router",
                    "the upstream device needs the port forwards too, or bridge mode",
                )
            )
    return found


def _trial_findings(m: Measurements) -> list[Finding]:
    found = []
    for trial in m.trials:
        name = f"mapping via {trial.protocol}"
        codes = trial.router_codes
        if not trial.made:
            found.append(_refusal(name, trial))
            continue
        lease = trial.granted_lease
        if lease == 0:
            # ARRIS NVG578LX says 402 where 725 is meant (U2); MikroTik, Netgear, ZyXEL say 725 (U1).
            arris = 402 in codes and 725 not in codes
            found.append(
                Finding(
                    name,
                    Verdict.WARNING,
                    f"granted only as a permanent mapping (asked {trial.requested_lease} s; the router answers"
                    f" {'402 Invalid Args' if arris else '725 OnlyPermanentLeasesSupported'} to a finite lease)",
                    "autonat deletes it at stop and after a crash; prefer a router that honours leases",
                    "U2" if arris else "U1",
                )
            )
        elif trial.protocol == "upnp" and lease == WEEK:
            found.append(
                Finding(
                    name,
                    Verdict.WARNING,
                    f"the router refused {trial.requested_lease} s and a permanent lease (402); a week was granted",
                    "autonat renews and deletes it as any other; prefer a router that honours leases",
                    "U3",
                )
            )
        elif lease is not None and lease > trial.requested_lease and lease >= DAY and trial.protocol != "upnp":
            found.append(
                Finding(
                    name,
                    Verdict.OK,
                    f"granted {lease} s for {trial.requested_lease} s asked: the router forces long leases (a grant"
                    " over a day is taken as a day, renewed on that schedule)",
                    quirk="G1",
                )
            )
        elif lease is not None and lease > trial.requested_lease:
            found.append(
                Finding(
                    name,
                    Verdict.OK,
                    f"granted {lease} s for {trial.requested_lease} s asked (the router clamps leases up)",
                    quirk="P4",
                )
            )
        elif lease is not None and lease < trial.requested_lease:
            found.append(
                Finding(name, Verdict.OK, f"granted {lease} s of {trial.requested_lease} s: renewed before it ends")
            )
        else:
            found.append(Finding(name, Verdict.OK, f"granted {lease} s (asked {trial.requested_lease} s)"))
        if trial.protocol == "upnp" and trial.external_port != trial.internal_port:
            # 501 for a port in use: miniupnpd with CHECK_PORTINUSE (U4); 718/729 the spec's conflict (U5).
            conflict = "U4" if 501 in codes else "U5" if {718, 729} & set(codes) else None
            found.append(
                Finding(
                    f"{name}: port",
                    Verdict.OK,
                    f"the router refused external port {trial.internal_port}"
                    f"{' (UPnP error ' + ', '.join(map(str, sorted(set(codes)))) + ')' if codes else ''};"
                    f" autonat took {trial.external_port} from its port sequence",
                    quirk=conflict,
                )
            )
        if trial.protocol == "upnp" and lease and trial.router_lease is not None and trial.router_lease > lease:
            found.append(
                Finding(
                    f"{name}: lease",
                    Verdict.OK,
                    f"the router holds it for {trial.router_lease} s, not the {lease} s granted (it ignores the"
                    " lease asked)",
                    "nothing to do: autonat deletes it at stop, and after a crash at its next start",
                    "U15",
                )
            )
        if trial.anonymous_port:
            found.append(
                Finding(
                    f"{name}: any port",
                    Verdict.OK,
                    f"the router refuses a suggested external port of 0 (NAT-PMP result {trial.anonymous_port});"
                    " autonat always suggests the internal port",
                    quirk="P5",
                )
            )
        if trial.renewal_keeps_port is False:
            found.append(
                Finding(
                    f"{name}: renewal",
                    Verdict.WARNING,
                    "a renewal moved the external port",
                    "autonat re-advertises the new port at once; nothing to do",
                )
            )
        if trial.reachable is True:
            found.append(Finding(f"{name}: from outside", Verdict.OK, "an unsolicited datagram came in through it"))
        elif trial.reachable is False:
            found.append(
                Finding(
                    f"{name}: from outside",
                    Verdict.FAIL,
                    "the router granted the mapping but did not let a datagram from outside through",
                    "check the router's firewall (inbound rules) and that no other device holds this port",
                )
            )
        if trial.still_reachable_after is not None:
            seconds, still = trial.still_reachable_after
            if not still:
                found.append(
                    Finding(
                        f"{name}: after {seconds:.0f} s",
                        Verdict.WARNING,
                        f"the mapping stopped letting traffic in within {seconds:.0f} s",
                        "autonat re-creates mappings every verify_interval; lower it (e.g. 20 s) for this router",
                        "U14",
                    )
                )
        if trial.still_listed_after is not None and not trial.still_listed_after[1]:
            seconds = trial.still_listed_after[0]
            found.append(
                Finding(
                    f"{name}: listed after {seconds:.0f} s",
                    Verdict.WARNING,
                    f"the router dropped the mapping within {seconds:.0f} s, long before its lease ended",
                    "autonat re-creates mappings every verify_interval; lower it (e.g. 20 s) for this router",
                    "U14",
                )
            )
        if trial.listed is False:
            found.append(Finding(f"{name}: listed", Verdict.WARNING, "the router does not list the mapping it granted"))
        if trial.deleted is False:
            found.append(
                Finding(
                    f"{name}: delete",
                    Verdict.WARNING,
                    "the router did not confirm the delete",
                    "the journal keeps it; the daemon deletes it at its next start",
                )
            )
    return found


def _refusal(name: str, trial: Trial) -> Finding:
    """A trial mapping the router refused, named where a quirk explains it."""
    if trial.router_codes.count(725) >= 2:
        # 725 to the finite lease and again to the permanent one (no router named yet: G11).
        return Finding(
            name,
            Verdict.FAIL,
            f"refused: {trial.error}",
            "the router's UPnP cannot map at all; use NAT-PMP/PCP if it has them, or a manual port forward",
            "G11",
        )
    if trial.error is not None and "double NAT" in trial.error:
        return Finding(
            name,
            Verdict.FAIL,
            f"refused: {trial.error}",
            "put the upstream modem in bridge mode, or map the ports on the upstream router too",
            "P1",
        )
    return Finding(name, Verdict.FAIL, f"refused: {trial.error}", "allow UPnP/NAT-PMP mappings for this host")


def _igd_findings(m: Measurements) -> list[Finding]:
    """The IGD's description: which WAN service autonat took, and why (U12, U13)."""
    igd = m.igd
    if igd is None:
        return []
    found = []
    service = str(igd.get("service_type") or "")
    skipped = [s for s in igd.get("skipped_services") or [] if isinstance(s, dict)]
    if skipped:
        passed = ", ".join(f"{s.get('service_type')} ({s.get('connection_status')})" for s in skipped)
        found.append(
            Finding(
                "IGD services",
                Verdict.OK,
                f"the IGD lists several WAN connections; autonat passed over {passed} and uses {service}, which"
                " is connected",
                quirk="U12",
            )
        )
    if service.lower().startswith("urn:dslforum-org:"):
        found.append(
            Finding(
                "IGD services",
                Verdict.OK,
                f"the IGD offers only the legacy DSL Forum (TR-064) service type {service}; autonat speaks it",
                quirk="U13",
            )
        )
    return found


def _ssdp_findings(m: Measurements) -> list[Finding]:
    """How the gateway answers SSDP searches (S1, S2, S6): each is handled, so each is an ok line."""
    behaviour = m.ssdp
    if behaviour is None:
        return []
    found = []
    if behaviour.multicast_answered and not behaviour.unicast_answered:
        found.append(
            Finding(
                "SSDP",
                Verdict.OK,
                "the router answers only a search sent to the multicast group, not one sent to it; autonat sends both",
                quirk="S1",
            )
        )
    other = sorted({port for port in behaviour.source_ports if port != SSDP_PORT})
    if other:
        found.append(
            Finding(
                "SSDP",
                Verdict.OK,
                f"the router answers from port {', '.join(map(str, other))}, not {SSDP_PORT}; autonat takes"
                " answers from any port",
                quirk="S2",
            )
        )
    igd = behaviour.igd_location
    if igd is not None and behaviour.all_locations and igd not in behaviour.all_locations:
        found.append(
            Finding(
                "SSDP",
                Verdict.OK,
                f"the router answers `ssdp:all` only with another description ({behaviour.all_locations[0]}), not"
                " its IGD; autonat also searches for the IGD's own types",
                quirk="S6",
            )
        )
    return found


def _call_findings(m: Measurements) -> list[Finding]:
    """The test call (`[doctor] call` / `--call`): audio both ways through the NAT, or why not."""
    if m.call_error is not None:
        return [
            Finding(
                "test call",
                Verdict.WARNING,
                f"not made: {m.call_error}",
                "start the daemon (autonat run) with a SIP profile, or leave out --call / [doctor] call",
            )
        ]
    call = m.call
    if call is None:
        return []
    rtp, rtt = call.get("rtp") or {}, call.get("rtt_ms") or {}
    figures = (
        f"; {rtp.get('received', 0)}/{rtp.get('sent', 0)} packets back, loss {rtp.get('loss_percent')} %,"
        f" RTT {rtt.get('avg')} ms, jitter {call.get('jitter_ms')} ms"
        if rtp.get("sent")
        else ""
    )
    summary = f"{call.get('verdict')} ({call.get('uri')}){figures}"
    if call.get("ok"):
        return [Finding("test call", Verdict.OK, summary)]
    if call.get("answered"):
        fix = (
            "the echo does not come back to the address our SDP gave: check `autonat profile status` (ext-rtp-ip"
            " should be auto-nat) and that the call's RTP mapping was made (`autonat nat_map status`)"
        )
    else:
        fix = "check the URI and that the echo service answers (a firewall on its side, a wrong port)"
    return [Finding("test call", Verdict.FAIL, summary, fix)]


def _path_findings(m: Measurements) -> list[Finding]:
    found = []
    if m.unsolicited_blocked is True:
        found.append(Finding("filtering", Verdict.OK, "without a mapping, traffic from elsewhere is dropped"))
    elif m.unsolicited_blocked is False:
        found.append(
            Finding(
                "filtering",
                Verdict.WARNING,
                "without a mapping, a reply from another address came in: the NAT does not filter (full cone)",
                "nothing needed for autonat; know that the router lets in more than it was asked",
            )
        )
    if m.stun_server is None and any(t.made for t in m.trials):
        found.append(
            Finding(
                "from outside",
                Verdict.WARNING,
                "not tested: no STUN server that can answer from a second address was given",
                "run `autonat doctor --stun stun:HOST` with a server that supports RFC 5780 CHANGE-REQUEST",
            )
        )
    if m.hairpin is True:
        found.append(Finding("hairpin", Verdict.OK, "the LAN reaches its own external address:port"))
    elif m.hairpin is False:
        found.append(
            Finding(
                "hairpin",
                Verdict.WARNING,
                "the LAN cannot reach its own external address:port (no NAT loopback)",
                "keep LAN phones in local-network-acl, so they are given the local address",
            )
        )
    return found


def judge(m: Measurements) -> list[Finding]:
    """Every finding, in the order a reader wants them: router, address, mappings, path."""
    if m.gateway is None:
        return [
            Finding(
                "router",
                Verdict.FAIL,
                f"no router found: {m.error or 'no default route'}",
                "pass --gateway IP (or --interface NAME) for the router to check",
            )
        ]
    found = [Finding("router", Verdict.OK, f"gateway {m.gateway}, our address {m.local_address}")]
    if m.igd is not None:
        model = " ".join(str(m.igd.get(k) or "") for k in ("manufacturer", "model_name", "model_number")).strip()
        found.append(Finding("IGD", Verdict.OK, f"{m.igd.get('friendly_name') or 'an IGD'} ({model or 'no model'})"))
    found += _igd_findings(m)
    found += _ssdp_findings(m)
    found += _protocol_findings(m)
    if any(p.available for p in m.protocols.values()):
        found += _address_findings(m)
    found += _trial_findings(m)
    found += _path_findings(m)
    found += _call_findings(m)
    if m.announcements or m.notifies:
        found.append(
            Finding(
                "announcements",
                Verdict.OK,
                f"{m.announcements} PCP/NAT-PMP announcement(s) and {m.notifies} SSDP NOTIFY(s) during the run",
            )
        )
    return found


def exit_status(findings: list[Finding]) -> int:
    return 1 if any(f.verdict is Verdict.FAIL for f in findings) else 0
