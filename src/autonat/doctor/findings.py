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
    deleted: bool | None = None

    @property
    def made(self) -> bool:
        return self.external_port is not None


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
    announcements: int = 0
    notifies: int = 0
    elapsed: float = 0.0
    quick: bool = False


def _protocol_findings(m: Measurements) -> list[Finding]:
    found = []
    answered = [p for p in m.protocols.values() if p.available]
    if not answered:
        reasons = "; ".join(f"{p.protocol}: {p.reason}" for p in m.protocols.values()) or m.error or "no answer"
        no_wan = "no usable WAN address" in reasons
        found.append(
            Finding(
                "protocols",
                Verdict.FAIL,
                f"no port-mapping protocol answers ({reasons})",
                "check the router's internet connection (it reports no WAN address)"
                if no_wan
                else "turn on UPnP IGD or NAT-PMP/PCP in the router's settings (often under 'NAT' or 'Advanced')",
                "U8" if no_wan else None,
            )
        )
        return found
    for answer in m.protocols.values():
        timing = "" if answer.elapsed_ms is None else f" in {answer.elapsed_ms:.1f} ms"
        if answer.available:
            epoch = "" if answer.epoch is None else f", epoch {answer.epoch}"
            found.append(Finding(f"protocol {answer.protocol}", Verdict.OK, f"answers{timing}{epoch}"))
        else:
            found.append(Finding(f"protocol {answer.protocol}", Verdict.OK, f"not available: {answer.reason}"))
    return found


def _address_findings(m: Measurements) -> list[Finding]:
    if m.external_ip is None:
        return [
            Finding(
                "external address",
                Verdict.WARNING,
                "the router does not say its external address (no WAN connection, or a PCP-only router with"
                " no mapping yet)",
                "check the router's internet connection",
                "U8",
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
        if not trial.made:
            found.append(
                Finding(name, Verdict.FAIL, f"refused: {trial.error}", "allow UPnP/NAT-PMP mappings for this host")
            )
            continue
        lease = trial.granted_lease
        if lease == 0:
            found.append(
                Finding(
                    name,
                    Verdict.WARNING,
                    f"granted only as a permanent mapping (asked {trial.requested_lease} s; the router answers 725,"
                    " or 402, to a finite lease)",
                    "autonat deletes it at stop and after a crash; prefer a router that honours leases",
                    "U1",
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
            found.append(
                Finding(
                    f"{name}: port",
                    Verdict.OK,
                    f"the router refused external port {trial.internal_port}; autonat took {trial.external_port}"
                    " from its port sequence",
                    quirk="U4",
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
    found += _protocol_findings(m)
    if any(p.available for p in m.protocols.values()):
        found += _address_findings(m)
    found += _trial_findings(m)
    found += _path_findings(m)
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
