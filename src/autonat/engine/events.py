"""Engine events as values: what happened (`EventKind`) and when. The fan-out to subscribers is
autonat.engine.bus; this module stays free of asyncio so the lifecycle core can name events."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any


class EventKind(enum.StrEnum):
    NAT_ADD = "nat-add"
    NAT_DEL = "nat-del"
    NAT_RENEW = "nat-renew"
    NAT_LOST = "nat-lost"
    NAT_ERROR = "nat-error"
    EXTERNAL_ADDRESS_CHANGE = "external-address-change"
    ROUTER_REBOOT = "router-reboot"
    DOUBLE_NAT = "double-nat"
    DISCOVERED = "discovered"
    CALL_START = "call-start"
    CALL_END = "call-end"
    SIP_REGISTER = "sip-register"


@dataclass(frozen=True, slots=True)
class Event:
    kind: EventKind
    data: dict[str, Any]
    at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {"event": str(self.kind), "at": round(self.at, 3), **self.data}
