"""UPnP IGD:2 WANIPv6FirewallControl:1 (proto/pinhole.py): the actions sent, the answers read, faults."""

from __future__ import annotations

from ipaddress import IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autonat.proto import igd, pinhole
from autonat.proto.errors import DecodeError
from autonat.proto.types import Transport
from tests.unit.test_igd import fault, response

ST = pinhole.SERVICE_TYPE
OURS = IPv6Address("2001:db8:0:77::10")


def arguments(request: igd.SoapRequest) -> dict[str, str]:
    return dict(request.arguments)


def test_add_pinhole_carries_the_5_tuple_in_spec_order_and_iana_protocol_numbers() -> None:
    request = pinhole.add_pinhole(internal_client=OURS, internal_port=5060, transport=Transport.UDP, lease=3600)
    assert request.action == "AddPinhole" and request.service_type == ST
    assert [name for name, _ in request.arguments] == [
        "RemoteHost",
        "RemotePort",
        "InternalClient",
        "InternalPort",
        "Protocol",
        "LeaseTime",
    ]
    assert arguments(request) == {
        "RemoteHost": "",  # §2.3.1: empty is the wildcard
        "RemotePort": "0",
        "InternalClient": "2001:db8:0:77::10",
        "InternalPort": "5060",
        "Protocol": "17",  # §2.3.5: IANA numbers, not "UDP"
        "LeaseTime": "3600",
    }
    tcp = pinhole.add_pinhole(
        internal_client=OURS,
        internal_port=80,
        transport=Transport.TCP,
        lease=1,
        remote_host=IPv6Address("2001:db8::5"),
        remote_port=443,
    )
    assert arguments(tcp)["Protocol"] == "6" and arguments(tcp)["RemoteHost"] == "2001:db8::5"
    body = request.body()
    assert b"<InternalClient>2001:db8:0:77::10</InternalClient>" in body and b"#AddPinhole" not in body
    assert request.headers()["SOAPAction"] == f'"{ST}#AddPinhole"'


def test_update_delete_check_and_timeout_actions() -> None:
    update = pinhole.update_pinhole(unique_id=7, lease=120)
    assert (update.action, arguments(update)) == ("UpdatePinhole", {"UniqueID": "7", "NewLeaseTime": "120"})
    delete = pinhole.delete_pinhole(unique_id=0)
    assert (delete.action, arguments(delete)) == ("DeletePinhole", {"UniqueID": "0"})
    check = pinhole.check_pinhole_working(unique_id=65535)
    assert (check.action, arguments(check)) == ("CheckPinholeWorking", {"UniqueID": "65535"})
    packets = pinhole.get_pinhole_packets(unique_id=3)
    assert packets.action == "GetPinholePackets"
    timeout = pinhole.get_outbound_pinhole_timeout(internal_client=OURS, internal_port=5060, transport=Transport.UDP)
    assert timeout.action == "GetOutboundPinholeTimeout" and "LeaseTime" not in arguments(timeout)
    assert pinhole.get_firewall_status().arguments == ()


@pytest.mark.parametrize(
    "call",
    [
        lambda: pinhole.add_pinhole(internal_client=OURS, internal_port=5060, transport=Transport.UDP, lease=0),
        lambda: pinhole.add_pinhole(internal_client=OURS, internal_port=5060, transport=Transport.UDP, lease=86401),
        lambda: pinhole.add_pinhole(internal_client=OURS, internal_port=0, transport=Transport.UDP, lease=60),
        lambda: pinhole.add_pinhole(internal_client=OURS, internal_port=True, transport=Transport.UDP, lease=60),
        lambda: pinhole.add_pinhole(
            internal_client=IPv6Address("fe80::1%eth0"), internal_port=1, transport=Transport.UDP, lease=60
        ),
        lambda: pinhole.add_pinhole(
            internal_client=IPv6Address("::ffff:192.0.2.1"), internal_port=1, transport=Transport.UDP, lease=60
        ),
        lambda: pinhole.add_pinhole(
            internal_client=IPv6Address("::"), internal_port=1, transport=Transport.UDP, lease=6
        ),
        lambda: pinhole.add_pinhole(internal_client="2001:db8::1", internal_port=1, transport=Transport.UDP, lease=6),  # type: ignore[arg-type]
        lambda: pinhole.add_pinhole(internal_client=OURS, internal_port=1, transport="udp", lease=6),  # type: ignore[arg-type]
        lambda: pinhole.update_pinhole(unique_id=65536, lease=60),
        lambda: pinhole.delete_pinhole(unique_id=-1),
    ],
)
def test_caller_bugs_are_value_errors(call: object) -> None:
    with pytest.raises(ValueError):
        call()  # type: ignore[operator]


def test_answers_are_read_strictly() -> None:
    add = pinhole.add_pinhole(internal_client=OURS, internal_port=5060, transport=Transport.UDP, lease=60)
    outputs = pinhole.parse_response(response("AddPinhole", ST, {"UniqueID": "12"}), add, 200)
    assert pinhole.unique_id_from(outputs) == 12
    for bad in ({"UniqueID": "65536"}, {"UniqueID": "-1"}, {"UniqueID": "x"}, {"UniqueID": ""}, {}):
        with pytest.raises(DecodeError):
            pinhole.unique_id_from(bad)
    assert pinhole.firewall_status_from({"FirewallEnabled": "1", "InboundPinholeAllowed": "false"}) == (
        pinhole.FirewallStatus(enabled=True, inbound_pinhole_allowed=False)
    )
    with pytest.raises(DecodeError, match="InboundPinholeAllowed"):
        pinhole.firewall_status_from({"FirewallEnabled": "1"})
    with pytest.raises(DecodeError, match="not a boolean"):
        pinhole.is_working_from({"IsWorking": "maybe"})
    assert pinhole.is_working_from({"IsWorking": "YES"}) is True
    assert pinhole.outbound_timeout_from({"OutboundPinholeTimeout": "4294967295"}) == 2**32 - 1
    with pytest.raises(DecodeError):
        pinhole.outbound_timeout_from({"OutboundPinholeTimeout": "4294967296"})
    assert pinhole.pinhole_packets_from({"PinholePackets": "0"}) == 0


def test_faults_are_named_from_this_services_table() -> None:
    check = pinhole.check_pinhole_working(unique_id=1)
    with pytest.raises(pinhole.PinholeError) as caught:
        pinhole.parse_response(fault("704"), check, 500)
    assert caught.value.code == 704 and caught.value.name == "NoSuchEntry"  # WANIPConnection's 704 differs
    assert "NoSuchEntry" in str(caught.value)
    with pytest.raises(pinhole.PinholeError) as caught:
        pinhole.parse_response(fault("709", "NoTrafficReceived"), check, 500)
    assert caught.value.code == 709
    with pytest.raises(pinhole.PinholeError) as caught:
        pinhole.parse_response(fault("606", "Action not authorized"), check, 500)
    assert caught.value.code == 606 and isinstance(caught.value, igd.UpnpError)


def test_the_firewall_service_is_found_in_a_description() -> None:
    root = "http://[2001:db8:0:77::1]:5000/rootDesc.xml"
    xml = """<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0"><device>
<deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:2</deviceType><friendlyName>r</friendlyName>
<deviceList><device><deviceType>urn:schemas-upnp-org:device:WANDevice:2</deviceType><friendlyName>w</friendlyName>
<deviceList><device><deviceType>urn:schemas-upnp-org:device:WANConnectionDevice:2</deviceType>
<friendlyName>c</friendlyName><serviceList>
<service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:2</serviceType><serviceId>a</serviceId>
<controlURL>/ctl/IPConn</controlURL><eventSubURL>/e</eventSubURL><SCPDURL>/s.xml</SCPDURL></service>
<service><serviceType>urn:schemas-upnp-org:service:WANIPv6FirewallControl:1</serviceType><serviceId>b</serviceId>
<controlURL>/ctl/IP6FCtl</controlURL><eventSubURL>/e6</eventSubURL><SCPDURL>/s6.xml</SCPDURL></service>
</serviceList></device></deviceList></device></deviceList></device></root>"""
    description = igd.parse_device_description(xml.encode(), root)
    service = pinhole.firewall_service(description)
    assert service is not None and service.control_url == "http://[2001:db8:0:77::1]:5000/ctl/IP6FCtl"
    without = igd.parse_device_description(xml.replace("WANIPv6FirewallControl", "Other").encode(), root)
    assert pinhole.firewall_service(without) is None


_TEXT = st.text(max_size=40)
_OUTPUTS = st.dictionaries(
    st.sampled_from(["UniqueID", "IsWorking", "FirewallEnabled", "InboundPinholeAllowed", "PinholePackets", "X"]),
    _TEXT | st.integers(-5, 2**33).map(str),
    max_size=5,
)


@given(_OUTPUTS)
def test_value_parsers_take_anything_and_answer_a_value_or_a_decode_error(outputs: dict[str, str]) -> None:
    for parse in (
        pinhole.unique_id_from,
        pinhole.is_working_from,
        pinhole.firewall_status_from,
        pinhole.pinhole_packets_from,
        pinhole.outbound_timeout_from,
    ):
        try:
            value = parse(outputs)
        except DecodeError as exc:
            assert "\n" not in str(exc)  # one line
        else:
            if parse is pinhole.unique_id_from:
                assert isinstance(value, int) and 0 <= value <= 65535


@given(st.binary(max_size=600) | st.sampled_from([response("AddPinhole", ST, {"UniqueID": "1"}), fault("704")]))
def test_parse_response_takes_any_bytes(data: bytes) -> None:
    request = pinhole.add_pinhole(internal_client=OURS, internal_port=5060, transport=Transport.UDP, lease=60)
    try:
        outputs = pinhole.parse_response(data, request, 200)
    except (DecodeError, pinhole.PinholeError) as exc:
        assert str(exc) and "\n" not in str(exc)  # one line for the user, whatever the bytes
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in outputs.items())


@given(st.integers(0, 65535), st.integers(1, 86400))
def test_update_round_trips_through_a_response(unique_id: int, lease: int) -> None:
    request = pinhole.update_pinhole(unique_id=unique_id, lease=lease)
    assert arguments(request) == {"UniqueID": str(unique_id), "NewLeaseTime": str(lease)}
    add = pinhole.add_pinhole(internal_client=OURS, internal_port=1, transport=Transport.TCP, lease=lease)
    outputs = pinhole.parse_response(response("AddPinhole", ST, {"UniqueID": str(unique_id)}), add, 200)
    assert pinhole.unique_id_from(outputs) == unique_id
