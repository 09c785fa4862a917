"""The fan-out of engine events to subscribers (the Python API, `autonat events`, the control channel)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

from autonat.engine.events import Event, EventKind

SUBSCRIBER_QUEUE = 1024  # a subscriber this far behind loses the oldest events, never blocks the engine


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
