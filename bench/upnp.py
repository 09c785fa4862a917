"""UPnP IGD speed: cold discovery and SOAP add+delete, side by side with `upnpc` and a raw exchange.

Brings up its own lab (prefix `bu`), measures inside the lan host, prints p50/p90 and ratios, and
tears the lab down. Needs root.

    .venv/bin/python bench/upnp.py [--rounds 100] [--json]
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import main_args, percentiles, raw_soap, report, run_in_lab, timed_async, timed_sync

GATEWAY = "192.168.77.1"
LOCAL = "192.168.77.10"
ROOT_URL = f"http://{GATEWAY}:5000/rootDesc.xml"
SERVICE = "urn:schemas-upnp-org:service:WANIPConnection:1"


def raw_add_delete(index: int, control: tuple[str, int, str]) -> None:
    port = 40000 + index % 1000
    raw_soap(
        SERVICE,
        "AddPortMapping",
        f"<NewRemoteHost></NewRemoteHost><NewExternalPort>{port}</NewExternalPort><NewProtocol>UDP</NewProtocol>"
        f"<NewInternalPort>{port}</NewInternalPort><NewInternalClient>{LOCAL}</NewInternalClient>"
        "<NewEnabled>1</NewEnabled><NewPortMappingDescription>raw</NewPortMappingDescription>"
        "<NewLeaseDuration>3600</NewLeaseDuration>",
        control,
    )
    raw_soap(
        SERVICE,
        "DeletePortMapping",
        f"<NewRemoteHost></NewRemoteHost><NewExternalPort>{port}</NewExternalPort><NewProtocol>UDP</NewProtocol>",
        control,
    )


def upnpc(*args: str) -> None:
    subprocess.run(["upnpc", *args], check=True, capture_output=True, timeout=30)


async def measure_autonat(rounds: int) -> dict[str, list[float]]:
    from autonat.aio.route import locate_router
    from autonat.aio.upnp import UpnpClient
    from autonat.mapper import MappingRequest
    from autonat.proto.types import Transport
    from autonat.state import host_secret

    secret = host_secret()
    results: dict[str, list[float]] = {}

    async def cold(_: int) -> None:
        found = await UpnpClient(locate_router(), secret, deadline=2.0).discover()
        assert found.external_ip is not None

    results["autonat cold discovery to usable IGD (in-process)"] = await timed_async(rounds, cold)
    upnp = UpnpClient(locate_router(), secret, deadline=2.0)
    control = (await upnp.discover()).service.control_url

    async def add_delete(index: int) -> None:
        port = 41000 + index % 1000
        mapping = await upnp.add(MappingRequest(Transport.UDP, port, lifetime=3600))
        await upnp.delete_external(Transport.UDP, mapping.external_port)

    # Interleaved with the raw exchange, round by round, so machine noise hits both alike.
    host_port, path = control.removeprefix("http://").split("/", 1)
    host, port = host_port.split(":")
    raw_control = (host, int(port), "/" + path)
    ours: list[float] = []
    raw: list[float] = []
    for index in range(rounds):
        ours += await timed_async(1, lambda _, i=index: add_delete(i))
        raw += timed_sync(1, lambda _, i=index: raw_add_delete(i, raw_control))
    results["autonat SOAP add+delete"] = ours
    results["raw SOAP add+delete"] = raw

    async def add_delete_by_internal(index: int) -> None:
        port = 42000 + index % 1000
        await upnp.add(MappingRequest(Transport.UDP, port, lifetime=3600))
        await upnp.delete(Transport.UDP, port)

    results["autonat SOAP add+delete by internal port (3 calls)"] = await timed_async(rounds, add_delete_by_internal)
    return results


def measure_blocking(rounds: int) -> dict[str, list[float]]:
    """The blocking client (aio/blocking_upnp.py), interleaved with the raw exchange round by round."""
    from autonat.aio.blocking_upnp import BlockingUpnp
    from autonat.aio.route import locate_router
    from autonat.mapper import MappingRequest
    from autonat.proto.types import Transport
    from autonat.state import host_secret

    upnp = BlockingUpnp(locate_router(), host_secret(), deadline=2.0)
    control = upnp.discover().service.control_url
    host_port, path = control.removeprefix("http://").split("/", 1)
    host, port = host_port.split(":")
    raw_control = (host, int(port), "/" + path)

    def add_delete(index: int) -> None:
        upnp.remove(upnp.add(MappingRequest(Transport.UDP, 44000 + index % 1000, lifetime=3600)))

    ours: list[float] = []
    raw: list[float] = []
    for index in range(rounds):
        ours += timed_sync(1, lambda _, i=index: add_delete(i))
        raw += timed_sync(1, lambda _, i=index: raw_add_delete(i, raw_control))
    return {"autonat blocking SOAP add+delete": ours, "raw SOAP add+delete (blocking run)": raw}


def inside(rounds: int) -> dict[str, dict[str, float]]:
    samples = asyncio.run(measure_autonat(rounds))
    samples |= measure_blocking(rounds)
    slow_rounds = max(5, rounds // 20)
    samples["upnpc -i -s (SSDP discovery + status, process)"] = timed_sync(slow_rounds, lambda _: upnpc("-i", "-s"))
    autonat = str(Path(sys.executable).with_name("autonat"))
    samples["autonat probe --protocol upnp (process)"] = timed_sync(
        slow_rounds,
        lambda _: subprocess.run([autonat, "probe", "--protocol", "upnp"], check=True, capture_output=True, timeout=30),
    )
    samples["upnpc -u URL add + delete (two processes)"] = timed_sync(
        max(20, rounds // 5),
        lambda i: (
            upnpc("-u", ROOT_URL, "-a", LOCAL, str(43000 + i), str(43000 + i), "UDP", "3600"),
            upnpc("-u", ROOT_URL, "-d", str(43000 + i), "UDP"),
        ),
    )
    return {name: percentiles(values) for name, values in samples.items()}


RATIOS = [
    ("autonat cold discovery to usable IGD (in-process)", "upnpc -i -s (SSDP discovery + status, process)"),
    ("autonat probe --protocol upnp (process)", "upnpc -i -s (SSDP discovery + status, process)"),
    ("autonat SOAP add+delete", "raw SOAP add+delete"),
    ("autonat SOAP add+delete", "upnpc -u URL add + delete (two processes)"),
    ("autonat blocking SOAP add+delete", "raw SOAP add+delete (blocking run)"),
]


def main() -> None:
    args = main_args(__doc__.splitlines()[0])
    if args.inside:
        print(json.dumps(inside(args.rounds)))
        return
    figures = run_in_lab(__file__, "bu", args.rounds)
    report(figures, RATIOS, "targets: discovery <= 0.05x upnpc -s; SOAP add+delete <= 2x raw", args.json)


if __name__ == "__main__":
    main()
