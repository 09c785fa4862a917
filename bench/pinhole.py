"""IPv6 pinhole speed: add+delete in-process (PCP MAP, UPnP IGD:2 AddPinhole/DeletePinhole) beside a raw
exchange of the same requests, interleaved round by round in one run.

Brings up its own lab (prefix `bh`), measures inside the lan host from its stable IPv6 address (the
router grants a pinhole only for the request's source: docs/QUIRKS.md U16), prints p50/p90 and the
ratios, and tears the lab down. Needs root.

    .venv/bin/python bench/pinhole.py [--rounds 200] [--json]
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import struct
import sys
from ipaddress import IPv6Address
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import main_args, percentiles, raw_soap, report, run_in_lab, timed_async, timed_sync

GATEWAY6 = "2001:db8:0:77::1"
LOCAL6 = "2001:db8:0:77::10"  # the lab LAN host's stable address
SERVICE = "urn:schemas-upnp-org:service:WANIPv6FirewallControl:1"
_UNIQUE_ID = re.compile(rb"<UniqueID>(\d+)</UniqueID>")


class RawPcp:
    """The least a PCP client can do: prebuilt bytes, one blocking socket bound to the stable address."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        self.sock.bind((LOCAL6, 0))
        self.sock.settimeout(2)
        self.sock.connect((GATEWAY6, 5351))
        self.client = IPv6Address(LOCAL6).packed

    def map_delete(self, index: int) -> None:
        port = 30000 + index % 1000
        nonce = index.to_bytes(12, "big")
        # RFC 6887 §11.1: MAP, protocol 17, suggested external port = internal, suggested address ::.
        body = nonce + struct.pack("!B3xHH", 17, port, port) + bytes(16)
        for lifetime in (3600, 0):
            self.sock.send(struct.pack("!BBHI", 2, 1, 0, lifetime) + self.client + body)
            reply = self.sock.recv(1100)
            assert len(reply) == 60 and reply[3] == 0, reply[:4]  # SUCCESS


def raw_upnp_add_delete(index: int, control: tuple[str, int, str]) -> None:
    port = 40000 + index % 1000
    reply = raw_soap(
        SERVICE,
        "AddPinhole",
        f"<RemoteHost></RemoteHost><RemotePort>0</RemotePort><InternalClient>{LOCAL6}</InternalClient>"
        f"<InternalPort>{port}</InternalPort><Protocol>17</Protocol><LeaseTime>3600</LeaseTime>",
        control,
        source=LOCAL6,
    )
    match = _UNIQUE_ID.search(reply)
    assert match, reply[-200:]
    raw_soap(SERVICE, "DeletePinhole", f"<UniqueID>{match.group(1).decode()}</UniqueID>", control, source=LOCAL6)


async def measure(rounds: int) -> dict[str, list[float]]:
    from autonat.aio.pinhole import PinholeSession
    from autonat.mapper import MappingRequest
    from autonat.proto.types import Transport

    results: dict[str, list[float]] = {name: [] for name in RATIO_NAMES}
    raw_pcp = RawPcp()
    async with await PinholeSession.open() as session:
        assert str(session.local_address) == LOCAL6, session.location
        upnp = session.upnp
        control_url = (await upnp.discover()).service.control_url
        host_port, path = control_url.removeprefix("http://").split("/", 1)
        host, port = host_port.rsplit(":", 1)
        control = (host.strip("[]"), int(port), "/" + path)

        async def pcp_add_delete(index: int) -> None:
            port = 31000 + index % 1000
            await session.pcp.add(MappingRequest(Transport.UDP, port, lifetime=3600))
            await session.pcp.delete(Transport.UDP, port)

        async def upnp_add_delete(index: int) -> None:
            port = 41000 + index % 1000
            pinhole = await upnp.add(MappingRequest(Transport.UDP, port, lifetime=3600))
            assert pinhole.unique_id is not None
            await upnp.delete_pinhole(pinhole.unique_id)

        async def session_add_remove(index: int) -> None:
            port = 42000 + index % 1000
            await session.remove(await session.add(MappingRequest(Transport.UDP, port, lifetime=3600), "upnp"))

        # Interleaved, round by round, so machine noise hits every contestant alike.
        for index in range(rounds):
            results["autonat PCP pinhole add+delete"] += await timed_async(1, lambda _, i=index: pcp_add_delete(i))
            results["raw PCP pinhole add+delete"] += timed_sync(1, lambda _, i=index: raw_pcp.map_delete(i))
            results["autonat UPnP pinhole add+delete"] += await timed_async(1, lambda _, i=index: upnp_add_delete(i))
            results["raw UPnP pinhole add+delete"] += timed_sync(1, lambda _, i=index: raw_upnp_add_delete(i, control))
            results["autonat PinholeSession.add+remove (UPnP)"] += await timed_async(
                1, lambda _, i=index: session_add_remove(i)
            )
    return results


RATIOS = [
    ("autonat PCP pinhole add+delete", "raw PCP pinhole add+delete"),
    ("autonat UPnP pinhole add+delete", "raw UPnP pinhole add+delete"),
    ("autonat PinholeSession.add+remove (UPnP)", "raw UPnP pinhole add+delete"),
]
RATIO_NAMES = list(dict.fromkeys(name for pair in RATIOS for name in pair))


def inside(rounds: int) -> dict[str, dict[str, float]]:
    samples = asyncio.run(measure(rounds))
    return {name: percentiles(values) for name, values in samples.items()}


def main() -> None:
    args = main_args(__doc__.splitlines()[0])
    if args.inside:
        print(json.dumps(inside(args.rounds)))
        return
    figures = run_in_lab(__file__, "bh", args.rounds)
    report(figures, RATIOS, "target: in-process pinhole add+delete <= 2x the raw exchange", args.json)


if __name__ == "__main__":
    main()
