"""UpnpPinholeClient's decisions (aio/upnp.py) with the router's SOAP answers stubbed: which action follows
which answer, and which refusals mean "our pinhole is gone" (docs/QUIRKS.md U18, U19). No network."""

from __future__ import annotations

from ipaddress import IPv6Address, IPv6Network
from typing import Any

import pytest

from autonat.aio.route import RouterLocation
from autonat.aio.upnp import Igd, UpnpPinholeClient
from autonat.errors import RouterRefused
from autonat.mapper import MappingRequest
from autonat.proto import igd, pinhole
from autonat.proto.types import Transport

OURS = IPv6Address("2001:db8:0:77::10")
SERVICE = igd.Service(pinhole.SERVICE_TYPE, "b", "http://[2001:db8:0:77::1]:5000/ctl/IP6FCtl", "", "")


class Scripted(UpnpPinholeClient):
    """The client with `soap` answering from a script: action name -> UniqueID to answer, or a fault code."""

    def __init__(self, answers: dict[str, list[int | str]]) -> None:
        location = RouterLocation(IPv6Address("2001:db8:0:77::1"), OURS, "eth0", IPv6Network("2001:db8:0:77::/64"))
        super().__init__(location, b"s" * 32, deadline=1.0)
        self.answers = answers
        self.sent: list[tuple[str, dict[str, str]]] = []

    async def discover(self) -> Igd:
        description = igd.DeviceDescription.__new__(igd.DeviceDescription)
        return Igd("http://x/", "2001:db8:0:77::1", description, SERVICE, frozenset(), None, None, pinholes=True)

    async def soap(self, service: igd.Service, request: igd.SoapRequest, *, trace: Any = None) -> dict[str, str]:
        self.sent.append((request.action, dict(request.arguments)))
        answer = self.answers[request.action].pop(0)
        if isinstance(answer, str):
            raise pinhole.PinholeError(int(answer))
        return {"UniqueID": str(answer)} if request.action == "AddPinhole" else {}


@pytest.mark.parametrize("code", ["704", "402", "606"])
async def test_an_update_of_an_id_that_is_not_ours_any_more_adds_the_pinhole_again(code: str) -> None:
    client = Scripted({"UpdatePinhole": [code], "AddPinhole": [9]})
    mapping = await client.add(MappingRequest(Transport.UDP, 5060, lifetime=3600), unique_id=1)
    assert [action for action, _ in client.sent] == ["UpdatePinhole", "AddPinhole"]
    assert mapping.unique_id == 9 and mapping.external_ip == OURS and mapping.external_port == 5060
    assert client.known(Transport.UDP, 5060) == 9
    assert client.sent[1][1]["InternalClient"] == str(OURS)


async def test_an_update_the_router_grants_keeps_the_id_and_caps_the_lease() -> None:
    client = Scripted({"UpdatePinhole": [0]})
    mapping = await client.add(MappingRequest(Transport.UDP, 5060, lifetime=604800), unique_id=3)
    assert client.sent == [("UpdatePinhole", {"UniqueID": "3", "NewLeaseTime": "86400"})]  # §2.3.7 maximum
    assert (mapping.unique_id, mapping.lifetime) == (3, 86400)


async def test_other_refusals_are_final_and_name_the_action() -> None:
    client = Scripted({"UpdatePinhole": ["501"]})
    with pytest.raises(RouterRefused, match="UpdatePinhole 3"):
        await client.add(MappingRequest(Transport.UDP, 5060, lifetime=60), unique_id=3)
    client = Scripted({"AddPinhole": ["606"]})
    with pytest.raises(RouterRefused, match=f"only for the address a request comes from \\({OURS} here\\)"):
        await client.add(MappingRequest(Transport.UDP, 80, lifetime=60))


async def test_delete_without_an_id_learns_it_from_add_pinhole_then_deletes() -> None:
    client = Scripted({"AddPinhole": [7], "DeletePinhole": [0]})
    await client.delete(Transport.TCP, 8080)
    assert [(a, args.get("UniqueID"), args.get("LeaseTime")) for a, args in client.sent] == [
        ("AddPinhole", None, "1"),  # the shortest lease: a router that made a second one loses it at once
        ("DeletePinhole", "7", None),
    ]
    gone = Scripted({"DeletePinhole": ["704"]})
    await gone.delete_pinhole(7)  # one that is not there is deleted


@pytest.mark.parametrize(("code", "present"), [("709", True), ("704", False), ("402", False)])
async def test_check_reads_709_as_there(code: str, present: bool) -> None:
    client = Scripted({"CheckPinholeWorking": [code]})
    assert await client.check(4) is present
