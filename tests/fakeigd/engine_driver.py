"""Run the NAT engine against whatever router the gateway plays, inside the client namespace, and print
what it saw as one JSON object: `python engine_driver.py CONFIG`.

CONFIG (JSON): `gateway`; `port` (the UDP port wanted, 5000); `verify_interval` (s, 60); `renew`
(republish once the mapping is made); `lost` (seconds to wait for the router to drop the mapping and the
engine to re-make it, 0: do not wait). Every wait is bounded; the engine is stopped (its mappings
deleted) before the output is printed. Output: `events` (each as `autonat events` prints it), `status`
(`nat_map status --json` before the stop), `metrics` (the `/metrics` text before the stop).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

from autonat.engine.engine import NatEngine
from autonat.engine.lifecycle import Wanted
from autonat.engine.settings import NatSettings
from autonat.proto.types import Transport
from autonat.web.metrics import Metrics
from autonat.web.status import Sources

RESULT = ("nat-add", "nat-error")
FIRST_RESULT = 6.0  # discovery (three protocols in one burst) and the first mapping, with 0.5 s deadlines


async def until(check: Callable[[], bool], seconds: float) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while not check():
        if loop.time() > end:
            return False
        await asyncio.sleep(0.02)
    return True


async def run(config: dict[str, Any]) -> dict[str, Any]:
    settings = NatSettings(
        gateway=config["gateway"],
        timeout=0.5,
        lease=600,
        upnp_lease=600,
        verify_interval=float(config.get("verify_interval", 60)),
        external_ip_interval=600,
        shutdown_timeout=3.0,
    )
    engine = NatEngine(settings)
    metrics = Metrics(Sources(engine), {}, lambda: 0)
    events: list[dict[str, Any]] = []
    subscription = engine.events.subscribe()

    async def collect() -> None:
        async for event in subscription:
            events.append(event.to_dict())
            metrics.observe(event)

    collector = asyncio.ensure_future(collect())
    await asyncio.sleep(0)

    def seen(kinds: tuple[str, ...], after: int = 0) -> bool:
        return any(event["event"] in kinds for event in events[after:])

    await engine.start([Wanted(Transport.UDP, int(config.get("port", 5000)))])
    await until(lambda: seen(RESULT) or (engine.last_error is not None and engine.state != "ready"), FIRST_RESULT)
    if config.get("renew") and seen(("nat-add",)):
        mark = len(events)
        await engine.republish()
        await until(lambda: seen(("nat-renew", "nat-add", "nat-error"), mark), 3.0)
    lost = float(config.get("lost", 0))
    if lost:
        await until(lambda: seen(("nat-lost",)), lost)
        mark = next((i for i, event in enumerate(events) if event["event"] == "nat-lost"), len(events))
        await until(lambda: seen(("nat-add",), mark + 1), 3.0)
    status = engine.status()
    text = metrics.render("")[0].decode()
    await engine.stop()
    await until(lambda: seen(("nat-del",)) or not seen(("nat-add",)), 1.0)
    collector.cancel()
    return {"events": events, "status": status, "metrics": text, "state": engine.state}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(run(json.loads(sys.argv[1])))))
