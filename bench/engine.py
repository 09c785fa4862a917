"""The engine holding many live mappings: memory, CPU and how renewals spread.

Runs a NatEngine with N mappings (PCP, short leases) for a few verification rounds and reports peak
RSS, the CPU share of one core in the steady phase, and the largest share of the mappings renewed
within any one second. Targets (issue "The NAT engine and daemon"): <= 80 MB, <= 2 % of a core, no
second above 5 %.

Two routers, because the real one cannot carry the full load: miniupnpd's nftables backend rescans
its rules on every request, so at ~700 mappings it runs at 93 % CPU and stops answering within 2 s
(measured). `--router real` runs in its own lab (prefix `be`) at a scale miniupnpd carries;
`--router fake` answers PCP on loopback instantly, so the figures are the engine's own.

    .venv/bin/python bench/engine.py --router fake --mappings 1000 --duration 200
    .venv/bin/python bench/engine.py --router real --mappings 300 --duration 200
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FIRST_PORT = 20000


FAKE_ROUTER = (
    "import asyncio, sys\n"
    "sys.path.insert(0, sys.argv[1])\n"
    "from tests.fakes.pcp_natpmp_router import start_fake_router\n"
    "async def main():\n"
    "    _, port = await start_fake_router()\n"
    "    print(port, flush=True)\n"
    "    await asyncio.sleep(3600)\n"
    "asyncio.run(main())\n"
)


async def fake_router_session(router: subprocess.Popen[str]) -> Any:
    """A RouterSession whose PCP/NAT-PMP server is the test suite's fake router, in its own process
    on loopback so that its CPU time is not counted as ours."""
    from ipaddress import IPv4Address

    from autonat.aio.channel import DatagramChannel
    from autonat.aio.route import RouterLocation
    from autonat.aio.router import RouterSession, reply_key

    assert router.stdout is not None
    port = int(router.stdout.readline())
    loopback = IPv4Address("127.0.0.1")

    async def factory(*_: Any, **__: Any) -> RouterSession:
        channel = await DatagramChannel.open(loopback, reply_key)
        return RouterSession(RouterLocation(loopback, loopback, "lo"), channel, 2.0, server_port=port)

    return factory


async def hold(mappings: int, duration: float, interval: float, journal_dir: str, fake: bool) -> dict[str, Any]:
    from autonat.aio.router import RouterSession
    from autonat.engine.engine import NatEngine, Wanted
    from autonat.engine.events import EventKind
    from autonat.engine.journal import Journal
    from autonat.engine.settings import NatSettings
    from autonat.proto.types import Transport

    # map_rate=0: the figures are the engine's cost of holding N mappings, not the flood cap's pace of
    # making them (10 new mappings a second by default would take N/10 s to get there).
    settings = NatSettings(
        protocol="pcp", lease=120, verify_interval=interval, external_ip_interval=interval, map_rate=0
    )
    journal = Journal(Path(journal_dir) / "journal.sqlite")
    router = None
    if fake:
        root = str(Path(__file__).resolve().parents[1])
        router = subprocess.Popen([sys.executable, "-c", FAKE_ROUTER, root], stdout=subprocess.PIPE, text=True)
    factory = await fake_router_session(router) if router is not None else RouterSession.open
    engine = NatEngine(settings, journal, session_factory=factory)
    renewals: collections.Counter[int] = collections.Counter()
    adds = 0

    async def count() -> None:
        nonlocal adds
        async for event in engine.events.subscribe():
            if event.kind is EventKind.NAT_RENEW:
                renewals[int(event.at)] += 1
            elif event.kind is EventKind.NAT_ADD:
                adds += 1

    counter = asyncio.ensure_future(count())
    started = time.monotonic()
    await engine.start(Wanted(Transport.UDP, FIRST_PORT + i) for i in range(mappings))
    while adds < mappings and time.monotonic() - started < 120:
        await asyncio.sleep(0.05)
    all_up = time.monotonic() - started
    cpu0, wall0 = time.process_time(), time.monotonic()
    await asyncio.sleep(duration)
    cpu = (time.process_time() - cpu0) / (time.monotonic() - wall0)
    counter.cancel()
    stop0 = time.monotonic()
    await engine.stop()
    stopped = time.monotonic() - stop0
    journal.close()
    if router is not None:
        router.kill()
        router.wait(timeout=10)
    steady = {second: n for second, n in renewals.items() if second >= int(time.time() - duration)}
    return {
        "router": "fake (loopback)" if fake else "miniupnpd (lab)",
        "mappings": mappings,
        "established": adds,
        "seconds_to_establish_all": round(all_up, 3),
        "steady_seconds": duration,
        "renewals": sum(renewals.values()),
        "rounds": round(sum(renewals.values()) / mappings, 2),
        "max_renewals_in_one_second": max(steady.values(), default=0),
        "max_share_in_one_second_pct": round(100 * max(steady.values(), default=0) / mappings, 2),
        "cpu_share_of_one_core_pct": round(100 * cpu, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "seconds_to_delete_all_at_stop": round(stopped, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mappings", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=200)
    parser.add_argument("--interval", type=float, default=60)
    parser.add_argument("--router", choices=["fake", "real"], default="fake")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    fake = args.router == "fake"
    if args.inside or fake:
        with tempfile.TemporaryDirectory() as directory:
            os.environ.setdefault("AUTONAT_STATE_DIR", directory)
            figures = asyncio.run(hold(args.mappings, args.duration, args.interval, directory, fake))
        if args.inside:
            print(json.dumps(figures))
            return
    else:
        figures = run_real(args)
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    for name, value in figures.items():
        print(f"{name:<34} {value}")
    print("\ntargets: peak_rss_mb <= 80, cpu_share_of_one_core_pct <= 2, max_share_in_one_second_pct <= 5")


def run_real(args: argparse.Namespace) -> dict[str, Any]:
    """Re-run this script on the lan host of a fresh lab (the engine must reach the real router)."""
    from autonat.lab import Lab

    lab = Lab("be")
    lab.up()
    try:
        with tempfile.TemporaryDirectory() as state:
            argv = ["env", f"AUTONAT_STATE_DIR={state}", sys.executable, str(Path(__file__).resolve()), "--inside"]
            argv += ["--router", "real", "--mappings", str(args.mappings), "--duration", str(args.duration)]
            argv += ["--interval", str(args.interval)]
            result = lab.run("lan", argv, timeout=args.duration + 600)
        if result.returncode != 0:
            sys.exit(f"benchmark failed inside the lab: {result.stderr.strip()[-2000:]}")
        figures: dict[str, Any] = json.loads(result.stdout)
        return figures
    finally:
        lab.down()


if __name__ == "__main__":
    main()
