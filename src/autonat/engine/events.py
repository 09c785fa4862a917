"""Engine events and their fan-out to subscribers (the Python API, `autonat events`, the control channel)."""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

SUBSCRIBER_QUEUE = 1024  # a subscriber this far behind loses the oldest events, never blocks the engine


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


class _Subscription:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[Event] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self.dropped = 0

    def offer(self, event: Event) -> None:
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(event)


class EventBus:
    """Publish never waits; each subscriber has its own bounded queue."""

    def __init__(self) -> None:
        self._subscriptions: set[_Subscription] = set()
        self.published = 0

    def publish(self, kind: EventKind, **data: Any) -> Event:
        event = Event(kind, data)
        self.published += 1
        for subscription in self._subscriptions:
            subscription.offer(event)
        return event

    async def subscribe(self) -> AsyncGenerator[Event, None]:
        """Events from now on, until the consumer stops iterating."""
        subscription = _Subscription()
        self._subscriptions.add(subscription)
        try:
            while True:
                yield await subscription.queue.get()
        finally:
            self._subscriptions.discard(subscription)
