"""What the web listener reads, and the JSON of `/api/status` (docs/WEB.md has its keys).

The daemon hands over its parts as `Sources`; this module only reads them. Each part's own status is
the one the control channel serves (`nat_map status --json`, `profile status --json`, `calls`), so the
page, the CLI and scripts see the same values.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from autonat.engine.engine import NatEngine
from autonat.errors import AutonatError
from autonat.service.profiles import ProfileManager
from autonat.service.sip import SipService

log = logging.getLogger("autonat.web")

STATUS_SCHEMA = 1  # the `schema` key of /api/status; raised when a key is removed or renamed


def _no_report() -> dict[str, Any] | None:
    return None


def _no_refusals() -> Mapping[str, int]:
    return {}


@dataclass
class Sources:
    """The daemon's parts the web listener reads. `doctor_report` is the daemon's last `autonat doctor`
    report (None: none yet); `control_refusals` the control channel's refusals since start, by reason."""

    engine: NatEngine
    profiles: ProfileManager | None = None
    sip: SipService | None = None
    doctor_report: Callable[[], dict[str, Any] | None] = field(default=_no_report)
    control_refusals: Callable[[], Mapping[str, int]] = field(default=_no_refusals)


def profiles_status(sources: Sources) -> list[dict[str, Any]]:
    """Each profile's addresses (Ext-SIP-IP, Ext-RTP-IP and where they come from) and its SIP counters.
    A profile whose addresses cannot be worked out right now (no route) shows that error, one line."""
    if sources.profiles is None:
        return []
    result = []
    for name in sorted(sources.profiles.profiles):
        try:
            entry = sources.profiles.status(name).to_dict()
        except AutonatError as exc:
            entry = {"name": name, "error": str(exc)}
        entry["sip"] = sources.sip.status(name) if sources.sip is not None else {}
        result.append(entry)
    return result


def gather(sources: Sources, wall: float, *, event_streams: int, token_required: bool) -> dict[str, Any]:
    """The whole `/api/status` object (schema STATUS_SCHEMA), `wall` being the time it describes."""
    engine, sip = sources.engine, sources.sip
    probe = engine.probe
    return {
        "schema": STATUS_SCHEMA,
        "now": round(wall, 3),
        "engine": engine.status_object().to_dict(wall),
        "router": None if probe is None else probe.to_dict(),
        "profiles": profiles_status(sources),
        "calls": [] if sip is None else [call.describe() for call in sip.calls],
        "registrations": [] if sip is None else sip.registrations(),
        "doctor": sources.doctor_report(),
        "web": {"event_streams": event_streams, "token_required": token_required},
    }
