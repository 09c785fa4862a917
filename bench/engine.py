"""The engine holding many live mappings on the real router: memory, CPU and how renewals spread.

Brings up its own lab (prefix `be`), runs a NatEngine with N mappings (PCP, short leases) on the lan
host for a few verification rounds, and reports peak RSS, the CPU share of one core in the steady
phase, and the largest share of the mappings renewed within any one second.
Targets (issue "The NAT engine and daemon"): <= 80 MB, <= 2 % of a core, no second above 5 %.

    .venv/bin/python bench/engine.py [--mappings 1000] [--duration 200] [--interval 60] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FIRST_PORT = 20000


async def hold(mappings: int, duration: float, interval: float, journal_dir: str) -> dict[str, Any]:
    from autonat.engine.engine import EngineSettings, NatEngine, Wanted
    from autonat.engine.events import EventKind
    from autonat.engine.journal import Journal
    from autonat.proto.types import Transport

    settings = EngineSettings(protocol="pcp", lease=120, verify_interval=interval, external_ip_interval=interval)
    journal = Journal(Path(journal_dir) / "journal.sqlite")
    engine = NatEngine(settings, journal)
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
    steady = {second: n for second, n in renewals.items() if second >= int(time.time() - duration)}
    return {
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
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        with tempfile.TemporaryDirectory() as journal_dir:
            print(json.dumps(asyncio.run(hold(args.mappings, args.duration, args.interval, journal_dir))))
        return
    from autonat.lab import Lab

    lab = Lab("be")
    lab.up()
    try:
        with tempfile.TemporaryDirectory() as state:
            argv = ["env", f"AUTONAT_STATE_DIR={state}", sys.executable, str(Path(__file__).resolve()), "--inside"]
            argv += [
                "--mappings",
                str(args.mappings),
                "--duration",
                str(args.duration),
                "--interval",
                str(args.interval),
            ]
            result = lab.run("lan", argv, timeout=args.duration + 600)
        if result.returncode != 0:
            sys.exit(f"benchmark failed inside the lab: {result.stderr.strip()[-2000:]}")
        figures = json.loads(result.stdout)
    finally:
        lab.down()
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    for name, value in figures.items():
        print(f"{name:<34} {value}")
    print("\ntargets: peak_rss_mb <= 80, cpu_share_of_one_core_pct <= 2, max_share_in_one_second_pct <= 5")


if __name__ == "__main__":
    main()
