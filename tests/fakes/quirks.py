"""Named quirk profiles: one per router quirk of docs/QUIRKS.md that the fakes can show.

Each profile says how to configure the fakes (the fake IGD's scenario in `igd_server.py`, the keyword
arguments of `pcp_natpmp_router.FakeRouter`, or both) and what autonat must make of that router: the
protocol the engine ends up with, whether a mapping is possible, the lease it reports, the error codes
the router answers on the way (counted in `autonat_router_errors_total`), and the `autonat doctor` exit
status. tests/fakeigd/test_quirk_profiles.py and tests/fakeigd/test_doctor_quirks.py parametrize over
`PROFILES`; the quirk ID is what `autonat doctor --json` must name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

IGD_EXTERNAL = "203.0.113.9"  # what the fake IGD answers to GetExternalIPAddress
PMP_EXTERNAL = "203.0.113.1"  # what FakeRouter answers to a NAT-PMP address request / puts in a PCP MAP
DAY = 86400


@dataclass(frozen=True)
class Profile:
    name: str
    quirk: str  # the docs/QUIRKS.md ID `autonat doctor` names
    router: str  # who shows it, as docs/QUIRKS.md says
    igd: str | None = None  # tests/fakes/igd_server.py scenario (None: no IGD)
    pmp: Mapping[str, Any] | None = None  # FakeRouter keyword arguments (None: no PCP/NAT-PMP server)
    protocol: str = "upnp"  # what the engine selects
    maps: bool = True  # autonat gets a mapping out of it
    lease: int | None = None  # the lease the engine reports for it (None: what it asked)
    moved: bool = False  # the external port is not the internal one (a conflict moved it)
    codes: tuple[tuple[str, int], ...] = ()  # (protocol, code) the router answers while mapping
    doctor_status: int = 0  # `autonat doctor`'s exit status (0: autonat can work with it)
    doctor_full: bool = False  # the quirk shows only in doctor's full run (it waits PERSISTENCE)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def external_ip(self) -> str:
        return IGD_EXTERNAL if self.protocol == "upnp" else PMP_EXTERNAL

    def __str__(self) -> str:  # the test id
        return f"{self.quirk}-{self.name}"


PROFILES: tuple[Profile, ...] = (
    Profile("multicast_only", "S1", "Eero", igd="multicast_only"),
    Profile("other_port", "S2", "TP-Link ER605 v2, Sagemcom Home Hub 3000", igd="other_port"),
    Profile("ssdp_all_first_only", "S6", "Sagemcom F@st3890 V3, EE Smart Hub", igd="ssdp_all_first_only"),
    Profile("dslforum", "U13", "TR-064 (urn:dslforum-org) devices", igd="dslforum"),
    Profile("several_wan", "U12", "IGDs with several WAN connection services", igd="several_wan"),
    Profile("only_permanent", "U1", "MikroTik RouterOS", igd="only_permanent", lease=0, codes=(("upnp", 725),)),
    Profile("lease_402_finite", "U2", "ARRIS NVG578LX", igd="lease_402_finite", lease=0, codes=(("upnp", 402),)),
    Profile("lease_402", "U3", "n0-computer/net-tools#52", igd="lease_402", lease=604800, codes=(("upnp", 402),)),
    Profile(
        "always_725",
        "G11",
        "guarded against, no router named",
        igd="always_725",
        maps=False,
        codes=(("upnp", 725),),
        doctor_status=1,
    ),
    Profile(
        "conflict_501", "U4", "miniupnpd with CHECK_PORTINUSE", igd="conflict_501", moved=True, codes=(("upnp", 501),)
    ),
    Profile("external_zero", "U8", "miniupnpd behind another NAT", igd="external_zero", maps=False, doctor_status=1),
    Profile(
        "natpmp_no_wan",
        "P1",
        "miniupnpd 2.3.1 behind another NAT",
        pmp={"natpmp_result": 3, "pcp_refused_address": "10.0.0.2"},
        protocol="pcp",
        maps=False,
        codes=(("pcp", 8), ("natpmp", 3)),
        doctor_status=1,
    ),
    Profile(
        "natpmp_no_anonymous_port",
        "P5",
        "MikroTik RouterOS 7.14",
        pmp={"natpmp_only": True, "refuse_anonymous": 4},
        protocol="natpmp",
    ),
    Profile("drop_after", "U14", "Asuswrt-Merlin (miniupnpd clean_ruleset)", igd="drop_after", doctor_full=True),
    Profile("lease_day", "U15", "Technicolor (miniupnp#398)", igd="lease_day"),
    Profile(
        "natpmp_lease_forever",
        "G1",
        "guarded against, no router named",
        pmp={"natpmp_only": True, "granted_lifetime": 0xFFFFFFFF},
        protocol="natpmp",
        lease=DAY,
    ),
)

BY_NAME: dict[str, Profile] = {profile.name: profile for profile in PROFILES}
