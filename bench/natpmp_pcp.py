"""NAT-PMP and PCP speed, side by side with `natpmpc` and a minimal raw exchange, in one run.

Brings up its own lab (prefix `bn`), runs the measurements inside the lan host, prints p50/p90 per
operation and the ratios, and tears the lab down. Needs root.

    .venv/bin/python bench/natpmp_pcp.py [--rounds 200] [--json]
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import main_args, percentiles, report, run_in_lab, timed_async, timed_sync

GATEWAY = "192.168.77.1"
LOCAL = "192.168.77.10"


class Raw:
    """The least a client can do: prebuilt bytes, one blocking socket, no validation beyond length."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOCAL, 0))
        self.sock.settimeout(2)
        self.server = (GATEWAY, 5351)
        self.client = b"\0" * 10 + b"\xff\xff" + socket.inet_aton(LOCAL)

    def call(self, request: bytes) -> bytes:
        self.sock.sendto(request, self.server)
        return self.sock.recv(1100)

    def natpmp_external(self, _: int) -> None:
        assert len(self.call(b"\0\0")) == 12

    def natpmp_map_unmap(self, index: int) -> None:
        port = 20000 + index % 1000
        assert len(self.call(struct.pack("!BBHHHI", 0, 1, 0, port, port, 3600))) == 16
        assert len(self.call(struct.pack("!BBHHHI", 0, 1, 0, port, 0, 0))) == 16

    def pcp_map_delete(self, index: int) -> None:
        port = 30000 + index % 1000
        nonce = index.to_bytes(12, "big")
        head = struct.pack("!BBHI", 2, 1, 0, 3600) + self.client
        body = nonce + struct.pack("!B3xHH", 17, port, port) + b"\0" * 10 + b"\xff\xff" + b"\0" * 4
        assert len(self.call(head + body)) == 60
        head0 = struct.pack("!BBHI", 2, 1, 0, 0) + self.client
        assert len(self.call(head0 + body)) == 60


def natpmpc(*args: str) -> None:
    subprocess.run(["natpmpc", "-g", GATEWAY, *args], check=True, capture_output=True, timeout=10)


async def measure_autonat(rounds: int) -> dict[str, list[float]]:
    from autonat.aio.router import RouterSession
    from autonat.mapper import MappingRequest
    from autonat.proto.types import Transport

    results: dict[str, list[float]] = {}

    async def cold_external_ip(_: int) -> None:
        async with await RouterSession.open() as router:
            await router.natpmp.external_address()

    async def cold_probe(_: int) -> None:
        async with await RouterSession.open() as router:
            result = await router.probe()
            assert result.external_ip is not None

    results["autonat cold external IP (route + socket + NAT-PMP)"] = await timed_async(rounds, cold_external_ip)
    results["autonat cold probe of all three (PCP, NAT-PMP, UPnP)"] = await timed_async(
        max(20, rounds // 10), cold_probe
    )
    async with await RouterSession.open() as router:
        results["autonat external IP (NAT-PMP, warm)"] = await timed_async(
            rounds, lambda _: router.natpmp.external_address()
        )

        async def map_unmap(client: object, base: int, index: int) -> None:
            port = base + index % 1000
            await client.add(MappingRequest(Transport.UDP, port, lifetime=3600))  # type: ignore[attr-defined]
            await client.delete(Transport.UDP, port)  # type: ignore[attr-defined]

        results["autonat NAT-PMP map+unmap"] = await timed_async(rounds, lambda i: map_unmap(router.natpmp, 21000, i))
        results["autonat PCP map+delete"] = await timed_async(rounds, lambda i: map_unmap(router.pcp, 31000, i))
    return results


def inside(rounds: int) -> dict[str, dict[str, float]]:
    raw = Raw()
    samples: dict[str, list[float]] = {
        "raw NAT-PMP external IP": timed_sync(rounds, raw.natpmp_external),
        "raw NAT-PMP map+unmap": timed_sync(rounds, raw.natpmp_map_unmap),
        "raw PCP map+delete": timed_sync(rounds, raw.pcp_map_delete),
    }
    process_rounds = max(20, rounds // 5)
    samples["natpmpc external IP (process)"] = timed_sync(process_rounds, lambda _: natpmpc())
    samples["natpmpc map+unmap (two processes)"] = timed_sync(
        process_rounds,
        lambda i: (
            natpmpc("-a", str(22000 + i), str(22000 + i), "udp", "3600"),
            natpmpc("-a", str(22000 + i), "0", "udp", "0"),
        ),
    )
    samples.update(asyncio.run(measure_autonat(rounds)))
    return {name: percentiles(values) for name, values in samples.items()}


RATIOS = [
    ("autonat external IP (NAT-PMP, warm)", "raw NAT-PMP external IP"),
    ("autonat external IP (NAT-PMP, warm)", "natpmpc external IP (process)"),
    ("autonat cold external IP (route + socket + NAT-PMP)", "natpmpc external IP (process)"),
    ("autonat NAT-PMP map+unmap", "raw NAT-PMP map+unmap"),
    ("autonat NAT-PMP map+unmap", "natpmpc map+unmap (two processes)"),
    ("autonat PCP map+delete", "raw PCP map+delete"),
]


def main() -> None:
    args = main_args(__doc__.splitlines()[0])
    if args.inside:
        print(json.dumps(inside(args.rounds)))
        return
    figures = run_in_lab(__file__, "bn", args.rounds)
    report(figures, RATIOS, "target: in-process map+unmap <= 2x the raw exchange", args.json)


if __name__ == "__main__":
    main()
