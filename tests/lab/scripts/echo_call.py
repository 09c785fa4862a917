"""Run on the lab's lan host: a pooled RTP pair plus an RTP echo on it, until stdin closes; prints
`ready EXTERNAL_PORT` once listening and the echo's counters as JSON at the end."""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path

from autonat.engine.engine import NatEngine
from autonat.engine.journal import Journal
from autonat.engine.pool import RtpPool
from autonat.engine.settings import NatSettings
from autonat.service.media import RtpEcho


async def main() -> None:
    engine = NatEngine(NatSettings(protocol="pcp"), Journal(Path(tempfile.mkdtemp()) / "journal.sqlite"))
    pool = RtpPool(engine, range(31000, 31010), size=1)
    await engine.start()
    await pool.start()
    for _ in range(500):
        if pool.ready:
            break
        await asyncio.sleep(0.02)
    ports = pool.take("echo-call")
    assert ports is not None and engine.session is not None
    echo = RtpEcho(engine.session.location.local_address, ports.rtp, inactivity=30)
    await echo.start()
    print(f"ready {ports.external_rtp}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # the test closes stdin when done
    await echo.close()
    await pool.release(ports)
    await pool.stop()
    await engine.stop()
    print(json.dumps({"received": echo.stats.received, "sent": echo.stats.sent, "source": echo.stats.last_source}))


asyncio.run(main())
