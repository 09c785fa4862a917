"""Run on the lab's lan host: an engine with an RTP pool against the real router; prints JSON facts."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from autonat.engine.engine import NatEngine
from autonat.engine.journal import Journal
from autonat.engine.pool import RtpPool
from autonat.engine.settings import NatSettings

ROOT_URL = sys.argv[1]
ENTRY = re.compile(r"^\s*\d+\s+(UDP|TCP)\s+(\d+)->([\d.]+):(\d+)\s")


def router_ports() -> list[int]:
    listing = subprocess.run(
        ["upnpc", "-u", ROOT_URL, "-l"], check=True, capture_output=True, text=True, timeout=20
    ).stdout
    return sorted(int(m[4]) for line in listing.splitlines() if (m := ENTRY.match(line)) and 30000 <= int(m[4]) < 30010)


async def until(check: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def main() -> None:
    facts: dict[str, object] = {}
    engine = NatEngine(NatSettings(protocol="pcp"), Journal(Path(tempfile.mkdtemp()) / "journal.sqlite"))
    pool = RtpPool(engine, range(30000, 30010), size=2)
    await engine.start()
    await pool.start()
    facts["filled"] = await until(lambda: pool.ready == 2, 10)
    facts["after_fill"] = router_ports()
    started = time.perf_counter()
    ports = pool.take("call-1")
    facts["take_ms"] = (time.perf_counter() - started) * 1000
    assert ports is not None
    facts["taken"] = [ports.rtp, ports.rtcp, str(ports.external_ip), ports.external_rtp, ports.external_rtcp]
    released = time.perf_counter()
    await pool.release(ports)
    facts["release_ms"] = (time.perf_counter() - released) * 1000
    facts["after_release"] = router_ports()
    facts["refilled"] = await until(lambda: pool.ready == 2, 10)
    facts["after_refill"] = router_ports()
    await pool.stop()
    await engine.stop()
    facts["after_stop"] = router_ports()
    print(json.dumps(facts))


asyncio.run(main())
