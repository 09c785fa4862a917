"""The lab: a home network with a real router (miniupnpd: UPnP IGD, NAT-PMP, PCP) in network namespaces.

    from autonat.lab import Lab
    lab = Lab("anl")          # namespaces anl-wan, anl-router, anl-lan (+ anl-router2, anl-lan2)
    lab.up()                  # idempotent; needs root
    lab.run("lan", ["natpmpc", "-g", Lab.GATEWAY])
    lab.restart_router(); lab.wipe_rules(); lab.set_wan_ip("203.0.113.2"); lab.set_loss(30)
    lab.down()

The same as a command: `autonat lab up|down|status|exec|fault ...`.
"""

from autonat.lab.errors import LabError
from autonat.lab.topology import (
    HOSTS,
    LINKS,
    ROUTERS,
    TEST_PROGRAMS,
    DaemonStatus,
    Lab,
    LabStatus,
    NatPmpReply,
    check_requirements,
)

__all__ = [
    "HOSTS",
    "LINKS",
    "ROUTERS",
    "TEST_PROGRAMS",
    "DaemonStatus",
    "Lab",
    "LabError",
    "LabStatus",
    "NatPmpReply",
    "check_requirements",
]
