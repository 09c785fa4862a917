"""UPnP IGD core: descriptions, SCPD, SOAP envelopes and faults, typed actions, hostile XML."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from ipaddress import IPv4Address
from xml.sax.saxutils import escape

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autonat.proto import igd
from autonat.proto.errors import DecodeError
from autonat.proto.igd import PortMappingEntry, Service, SoapRequest, StatusInfo, UpnpError
from autonat.proto.types import Transport

DESCRIPTION_URL = "http://192.168.77.1:5000/rootDesc.xml"
WANIP1 = "urn:schemas-upnp-org:service:WANIPConnection:1"
WANIP2 = "urn:schemas-upnp-org:service:WANIPConnection:2"
WANPPP1 = "urn:schemas-upnp-org:service:WANPPPConnection:1"


def root_description(wan_ip_type: str = WANIP2, *, url_base: str = "", control_url: str = "/ctl/IPConn") -> bytes:
    """A description shaped like miniupnpd's: IGD > WANDevice > WANConnectionDevice > WANIPConnection."""
    base = f"<URLBase>{url_base}</URLBase>" if url_base else ""
    return f"""<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0" configId="1337">
  <specVersion><major>1</major><minor>1</minor></specVersion>
  {base}
  <device>
    <deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:2</deviceType>
    <friendlyName>Lab Router</friendlyName>
    <manufacturer>autonat lab</manufacturer>
    <modelName>labgw</modelName>
    <modelNumber>2.3.3</modelNumber>
    <UDN>uuid:6b3a1c2e-3d1f-4a5b-9c8d-0e1f2a3b4c5d</UDN>
    <serviceList>
      <service>
        <serviceType>urn:schemas-upnp-org:service:Layer3Forwarding:1</serviceType>
        <serviceId>urn:upnp-org:serviceId:L3Forwarding1</serviceId>
        <SCPDURL>/L3F.xml</SCPDURL>
        <controlURL>/ctl/L3F</controlURL>
        <eventSubURL>/evt/L3F</eventSubURL>
      </service>
    </serviceList>
    <deviceList>
      <device>
        <deviceType>urn:schemas-upnp-org:device:WANDevice:2</deviceType>
        <friendlyName>WANDevice</friendlyName>
        <UDN>uuid:6b3a1c2e-3d1f-4a5b-9c8d-0e1f2a3b4c5e</UDN>
        <serviceList>
          <service>
            <serviceType>urn:schemas-upnp-org:service:WANCommonInterfaceConfig:1</serviceType>
            <serviceId>urn:upnp-org:serviceId:WANCommonIFC1</serviceId>
            <SCPDURL>/WANCfg.xml</SCPDURL>
            <controlURL>/ctl/CmnIfCfg</controlURL>
            <eventSubURL>/evt/CmnIfCfg</eventSubURL>
          </service>
        </serviceList>
        <deviceList>
          <device>
            <deviceType>urn:schemas-upnp-org:device:WANConnectionDevice:2</deviceType>
            <friendlyName>WANConnectionDevice</friendlyName>
            <UDN>uuid:6b3a1c2e-3d1f-4a5b-9c8d-0e1f2a3b4c5f</UDN>
            <serviceList>
              <service>
                <serviceType>{wan_ip_type}</serviceType>
                <serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId>
                <SCPDURL>/WANIPCn.xml</SCPDURL>
                <controlURL>{control_url}</controlURL>
                <eventSubURL>/evt/IPConn</eventSubURL>
              </service>
            </serviceList>
          </device>
        </deviceList>
      </device>
    </deviceList>
    <presentationURL>http://192.168.77.1/</presentationURL>
  </device>
</root>
""".encode()


SCPD = b"""<?xml version="1.0"?>
<scpd xmlns="urn:schemas-upnp-org:service-1-0">
  <specVersion><major>1</major><minor>0</minor></specVersion>
  <actionList>
    <action><name>GetExternalIPAddress</name>
      <argumentList><argument><name>NewExternalIPAddress</name><direction>out</direction>
        <relatedStateVariable>ExternalIPAddress</relatedStateVariable></argument></argumentList>
    </action>
    <action><name>AddPortMapping</name></action>
    <action><name>AddAnyPortMapping</name></action>
    <action><name>DeletePortMapping</name></action>
    <action><name> GetListOfPortMappings </name></action>
    <action><name></name></action>
  </actionList>
  <serviceStateTable>
    <stateVariable sendEvents="no"><name>ExternalIPAddress</name><dataType>string</dataType></stateVariable>
  </serviceStateTable>
</scpd>
"""


def envelope(body: str) -> bytes:
    return (
        '<?xml version="1.0"?>\r\n'
        '<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
        's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/">'
        f"<s:Body>{body}</s:Body></s:Envelope>\r\n"
    ).encode()


def response(action: str, service_type: str, outputs: dict[str, str]) -> bytes:
    arguments = "".join(f"<{name}>{escape(value)}</{name}>" for name, value in outputs.items())
    return envelope(f'<u:{action}Response xmlns:u="{service_type}">{arguments}</u:{action}Response>')


def fault(code: str, description: str | None = "") -> bytes:
    desc = "" if description is None else f"<errorDescription>{description}</errorDescription>"
    return envelope(
        "<s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring>"
        '<detail><UPnPError xmlns="urn:schemas-upnp-org:control-1-0">'
        f"<errorCode>{code}</errorCode>{desc}</UPnPError></detail></s:Fault>"
    )


@contextmanager
def within(seconds: float) -> Iterator[None]:
    start = time.perf_counter()
    yield
    assert time.perf_counter() - start < seconds


# --- device description ---------------------------------------------------------------------------


def test_miniupnpd_description() -> None:
    description = igd.parse_device_description(root_description(), DESCRIPTION_URL)
    root = description.root
    assert description.url_base == DESCRIPTION_URL
    assert root.device_type == "urn:schemas-upnp-org:device:InternetGatewayDevice:2"
    assert (root.friendly_name, root.manufacturer, root.model_name, root.model_number) == (
        "Lab Router",
        "autonat lab",
        "labgw",
        "2.3.3",
    )
    assert root.udn == "uuid:6b3a1c2e-3d1f-4a5b-9c8d-0e1f2a3b4c5d"
    assert root.devices[0].devices[0].device_type == "urn:schemas-upnp-org:device:WANConnectionDevice:2"
    assert [s.service_type.rsplit(":", 2)[1] for s in description.all_services()] == [
        "Layer3Forwarding",
        "WANCommonInterfaceConfig",
        "WANIPConnection",
    ]
    assert description.connection_services() == (
        Service(
            service_type=WANIP2,
            service_id="urn:upnp-org:serviceId:WANIPConn1",
            control_url="http://192.168.77.1:5000/ctl/IPConn",
            scpd_url="http://192.168.77.1:5000/WANIPCn.xml",
            event_sub_url="http://192.168.77.1:5000/evt/IPConn",
        ),
    )


def test_url_base_and_absolute_urls() -> None:
    data = root_description(WANIP1, url_base="http://192.168.77.1:5000/sub/", control_url="ctl")
    description = igd.parse_device_description(data, DESCRIPTION_URL)
    assert description.url_base == "http://192.168.77.1:5000/sub/"
    assert description.connection_services()[0].control_url == "http://192.168.77.1:5000/sub/ctl"
    absolute = root_description(WANIP1, control_url="http://192.168.77.1:5000/ctl/IPConn?x=1#frag")
    service = igd.parse_device_description(absolute, DESCRIPTION_URL).connection_services()[0]
    assert service.control_url == "http://192.168.77.1:5000/ctl/IPConn?x=1"


def test_default_port_is_the_same_origin() -> None:
    data = root_description(WANIP1, control_url="http://192.168.77.1:80/ctl")
    service = igd.parse_device_description(data, "http://192.168.77.1/rootDesc.xml").connection_services()[0]
    assert service.control_url == "http://192.168.77.1/ctl"


def test_missing_namespaces_are_tolerated() -> None:
    data = root_description().replace(b' xmlns="urn:schemas-upnp-org:device-1-0"', b"")
    assert igd.parse_device_description(data, DESCRIPTION_URL).connection_services()[0].service_type == WANIP2


def test_connection_service_ranking() -> None:
    services = "".join(
        f"<service><serviceType>{service_type}</serviceType><controlURL>/c{i}</controlURL></service>"
        for i, service_type in enumerate(
            [
                "urn:dslforum-org:service:WANPPPConnection:1",
                WANPPP1,
                "urn:schemas-upnp-org:service:WANIPv6FirewallControl:1",
                "urn:dslforum-org:service:WANIPConnection:1",
                WANIP1.upper(),
                WANIP2,
                WANIP1,
            ]
        )
    )
    data = f"<root><device><serviceList>{services}</serviceList></device></root>".encode()
    ranked = igd.parse_device_description(data, DESCRIPTION_URL).connection_services()
    assert [s.control_url.rsplit("/", 1)[1] for s in ranked] == ["c5", "c4", "c6", "c1", "c3", "c0"]


@pytest.mark.parametrize(
    ("control_url", "reason"),
    [
        ("http://192.168.77.66:5000/ctl", "leaves the description's host"),
        ("http://192.168.77.1:5001/ctl", "leaves the description's host"),
        ("http://192.168.77.1/ctl", "leaves the description's host"),
        ("https://192.168.77.1:5000/ctl", "not an http URL"),
        ("//169.254.169.254/latest", "leaves the description's host"),
        ("http://127.0.0.1:5000/ctl", "leaves the description's host"),
        ("http://user@192.168.77.1:5000/ctl", "user info"),
        ("file:///etc/passwd", "not an http URL"),
        ("http://192.168.77.1:99999/ctl", "not a valid URL"),
        ("http://[fd00::1/ctl", "not a valid URL"),
        ("/ctl\\@evil", "backslash"),
        ("/ctl with space", "characters not allowed"),
        ("", "has no controlURL"),
    ],
)
def test_control_url_must_stay_on_the_description_origin(control_url: str, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        igd.parse_device_description(root_description(control_url=control_url), DESCRIPTION_URL)


def test_url_base_elsewhere_is_refused() -> None:
    data = root_description(url_base="http://10.0.0.1:5000/")
    with pytest.raises(DecodeError, match="URLBase leaves"):
        igd.parse_device_description(data, DESCRIPTION_URL)


def test_other_services_urls_are_checked_too() -> None:
    data = root_description().replace(b"<SCPDURL>/L3F.xml</SCPDURL>", b"<SCPDURL>http://8.8.8.8/x</SCPDURL>")
    with pytest.raises(DecodeError, match="SCPDURL leaves"):
        igd.parse_device_description(data, DESCRIPTION_URL)


def test_missing_optional_urls_are_empty() -> None:
    data = root_description().replace(b"<SCPDURL>/WANIPCn.xml</SCPDURL>", b"").replace(b"/evt/IPConn", b"")
    service = igd.parse_device_description(data, DESCRIPTION_URL).connection_services()[0]
    assert (service.scpd_url, service.event_sub_url) == ("", "")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"<scpd/>", "not <root>"),
        (b"<root><specVersion/></root>", "no <device>"),
        (
            b"<root><device><serviceList><service><controlURL>/x</controlURL></service></serviceList></device></root>",
            "without serviceType",
        ),
        (b"", "not well-formed"),
        (b"<root>", "not well-formed"),
        (b"<u:root/>", "not well-formed"),
    ],
)
def test_bad_descriptions(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        igd.parse_device_description(data, DESCRIPTION_URL)


def test_device_nesting_limit() -> None:
    def nested(levels: int) -> bytes:
        inner = "<device><deviceType>leaf</deviceType></device>"
        for _ in range(levels - 1):
            inner = f"<device><deviceList>{inner}</deviceList></device>"
        return f"<root>{inner}</root>".encode()

    description = igd.parse_device_description(nested(16), DESCRIPTION_URL)
    assert description.root.devices
    with within(1.0), pytest.raises(DecodeError, match="deeper than 16"):
        igd.parse_device_description(nested(17), DESCRIPTION_URL)
    with within(1.0), pytest.raises(DecodeError, match="deeper than 16"):
        igd.parse_device_description(nested(5000), DESCRIPTION_URL)


def test_service_and_device_count_limits() -> None:
    service = "<service><serviceType>urn:x:service:Other:1</serviceType></service>"
    ok = f"<root><device><serviceList>{service * 64}</serviceList></device></root>".encode()
    assert len(igd.parse_device_description(ok, DESCRIPTION_URL).all_services()) == 64
    too_many = f"<root><device><serviceList>{service * 65}</serviceList></device></root>".encode()
    with pytest.raises(DecodeError, match="more than 64 services"):
        igd.parse_device_description(too_many, DESCRIPTION_URL)
    wide = "<device/>" * 64
    with pytest.raises(DecodeError, match="more than 64 devices"):
        igd.parse_device_description(
            f"<root><device><deviceList>{wide}</deviceList></device></root>".encode(), DESCRIPTION_URL
        )


def test_router_text_is_cleaned() -> None:
    # XML 1.0 cannot carry ESC or BEL at all, but C1 controls (NEL, CSI) and bidi overrides it can.
    data = root_description().replace(b"Lab Router", b"Lab&#x9b;31m&#x85; Router&#x202e;")
    assert igd.parse_device_description(data, DESCRIPTION_URL).root.friendly_name == "Lab31m Router"
    with pytest.raises(DecodeError, match="not well-formed"):
        igd.parse_device_description(root_description().replace(b"Lab", b"Lab\x1b[31m"), DESCRIPTION_URL)


# --- SCPD -----------------------------------------------------------------------------------------


def test_scpd_actions() -> None:
    assert igd.parse_scpd(SCPD) == {
        "GetExternalIPAddress",
        "AddPortMapping",
        "AddAnyPortMapping",
        "DeletePortMapping",
        "GetListOfPortMappings",
    }
    assert igd.parse_scpd(b"<scpd/>") == frozenset()
    with pytest.raises(DecodeError, match="not <scpd>"):
        igd.parse_scpd(b"<root/>")


# --- hostile XML ----------------------------------------------------------------------------------

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<root><device><friendlyName>&lol9;</friendlyName></device></root>
"""

XXE = b"""<?xml version="1.0"?>
<!DOCTYPE root [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<root><device><friendlyName>&xxe;</friendlyName></device></root>
"""

EXTERNAL_DTD = b"""<?xml version="1.0"?>
<!DOCTYPE root SYSTEM "http://192.168.77.66/evil.dtd">
<root><device/></root>
"""

PLAIN_DTD = b"""<?xml version="1.0"?>
<!DOCTYPE root>
<root><device/></root>
"""

ALL_PARSERS: list[tuple[str, Callable[[bytes], object]]] = [
    ("description", lambda data: igd.parse_device_description(data, DESCRIPTION_URL)),
    ("scpd", igd.parse_scpd),
    ("soap", lambda data: igd.parse_soap_response(data, igd.get_external_ip_address(WANIP1), 200)),
    ("listing", lambda data: igd.port_listing_from({"NewPortListing": data.decode("latin-1")})),
]


@pytest.mark.parametrize("document", [BILLION_LAUGHS, XXE, EXTERNAL_DTD, PLAIN_DTD], ids=["bomb", "xxe", "ext", "dtd"])
@pytest.mark.parametrize(("name", "parse"), ALL_PARSERS, ids=[name for name, _ in ALL_PARSERS])
def test_dtds_and_entities_are_refused_quickly(name: str, parse: Callable[[bytes], object], document: bytes) -> None:
    with within(1.0), pytest.raises(DecodeError, match="DTD"):
        parse(document)


def test_undeclared_entity_is_refused() -> None:
    with pytest.raises(DecodeError, match="not well-formed"):
        igd.parse_scpd(b"<scpd>&xxe;</scpd>")


@pytest.mark.parametrize(
    ("parse", "limit"),
    [
        (igd.parse_scpd, igd.MAX_DESCRIPTION_SIZE),
        (lambda data: igd.parse_device_description(data, DESCRIPTION_URL), igd.MAX_DESCRIPTION_SIZE),
        (lambda data: igd.parse_soap_response(data, igd.get_status_info(WANIP1), 200), igd.MAX_SOAP_SIZE),
        (lambda data: igd.port_listing_from({"NewPortListing": data.decode()}), igd.MAX_SOAP_SIZE),
    ],
)
def test_oversized_documents_are_refused_before_parsing(parse: Callable[[bytes], object], limit: int) -> None:
    # Not even well-formed: a parser would fail differently, so the message proves no parse happened.
    with within(1.0), pytest.raises(DecodeError, match=f"over the {limit} byte limit"):
        parse(b"<" * (limit + 1))


def test_size_caps() -> None:
    assert igd.MAX_DESCRIPTION_SIZE == 256 * 1024
    assert igd.MAX_SOAP_SIZE == 64 * 1024


def test_deep_generic_nesting_is_harmless() -> None:
    depth = 20_000
    document = b"<scpd>" + b"<a>" * depth + b"</a>" * depth + b"</scpd>"
    with within(1.0):
        assert igd.parse_scpd(document) == frozenset()


@pytest.mark.parametrize(
    "document",
    [
        b'<?xml version="1.0" encoding="x-no-such-encoding"?><scpd/>',
        b"\xff\xfe\xff\xfe",
        b"<scpd>\xff</scpd>",
        b"<scpd>&#0;</scpd>",
        b"<scpd>&#xD800;</scpd>",
        b"<scpd/><scpd/>",
        b"<!-- only a comment -->",
    ],
)
def test_garbage_xml(document: bytes) -> None:
    with pytest.raises(DecodeError):
        igd.parse_scpd(document)


# --- SOAP requests --------------------------------------------------------------------------------


def test_soap_request_known_answer() -> None:
    request = igd.add_port_mapping(
        WANIP1,
        external_port=5060,
        transport=Transport.UDP,
        internal_port=5060,
        internal_client="192.168.77.10",
        description="autonat sip",
        lease=3600,
    )
    assert request.headers() == {
        "Content-Type": 'text/xml; charset="utf-8"',
        "SOAPAction": '"urn:schemas-upnp-org:service:WANIPConnection:1#AddPortMapping"',
    }
    assert request.body() == (
        b'<?xml version="1.0"?>'
        b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
        b's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
        b'<u:AddPortMapping xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:1">'
        b"<NewRemoteHost></NewRemoteHost><NewExternalPort>5060</NewExternalPort><NewProtocol>UDP</NewProtocol>"
        b"<NewInternalPort>5060</NewInternalPort><NewInternalClient>192.168.77.10</NewInternalClient>"
        b"<NewEnabled>1</NewEnabled><NewPortMappingDescription>autonat sip</NewPortMappingDescription>"
        b"<NewLeaseDuration>3600</NewLeaseDuration>"
        b"</u:AddPortMapping></s:Body></s:Envelope>"
    )


def test_argument_order_and_names() -> None:
    def names(request: SoapRequest) -> list[str]:
        return [name for name, _ in request.arguments]

    mapping = names(
        igd.add_port_mapping(
            WANIP2,
            any_port=True,
            external_port=0,
            transport=Transport.TCP,
            internal_port=80,
            internal_client="192.168.77.10",
            description="",
            lease=0,
            enabled=False,
        )
    )
    assert mapping == [
        "NewRemoteHost",
        "NewExternalPort",
        "NewProtocol",
        "NewInternalPort",
        "NewInternalClient",
        "NewEnabled",
        "NewPortMappingDescription",
        "NewLeaseDuration",
    ]
    delete = igd.delete_port_mapping(WANIP1, external_port=5060, transport=Transport.TCP, remote_host="1.2.3.4")
    assert delete.arguments == (
        ("NewRemoteHost", "1.2.3.4"),
        ("NewExternalPort", "5060"),
        ("NewProtocol", "TCP"),
    )
    specific = igd.get_specific_port_mapping_entry(WANIP1, external_port=1, transport=Transport.UDP)
    assert specific.action == "GetSpecificPortMappingEntry"
    assert specific.arguments == (("NewRemoteHost", ""), ("NewExternalPort", "1"), ("NewProtocol", "UDP"))
    generic = igd.get_generic_port_mapping_entry(WANIP1, 3)
    assert generic.arguments == (("NewPortMappingIndex", "3"),)
    listing = igd.get_list_of_port_mappings(WANIP2, transport=Transport.UDP)
    assert listing.arguments == (
        ("NewStartPort", "0"),
        ("NewEndPort", "65535"),
        ("NewProtocol", "UDP"),
        ("NewManage", "0"),
        ("NewNumberOfPorts", "1000"),
    )
    assert igd.get_external_ip_address(WANIP1).arguments == ()
    assert igd.get_status_info(WANPPP1).soap_action == f'"{WANPPP1}#GetStatusInfo"'


def test_description_is_sanitised() -> None:
    assert igd.sanitize_description("  a\x00b\r\nc\u202ed\ud800  ") == "abcd"
    assert igd.sanitize_description("x" * 100) == "x" * 64
    # 64 bytes, never half a character: 21 three-byte characters make 63 bytes.
    assert igd.sanitize_description("\u20ac" * 40) == "\u20ac" * 21
    request = igd.add_port_mapping(
        WANIP1,
        external_port=1,
        transport=Transport.UDP,
        internal_port=1,
        internal_client="192.168.77.10",
        description="evil\x1b]0;title\x07 </NewPortMappingDescription><x>",
        lease=0,
    )
    assert dict(request.arguments)["NewPortMappingDescription"] == "evil]0;title </NewPortMappingDescription><x>"
    assert b"&lt;/NewPortMappingDescription&gt;&lt;x&gt;" in request.body()


@pytest.mark.parametrize(
    "build",
    [
        lambda: SoapRequest("Add Port", WANIP1),
        lambda: SoapRequest("", WANIP1),
        lambda: SoapRequest("1Add", WANIP1),
        lambda: SoapRequest("Add", 'urn:x"y'),
        lambda: SoapRequest("Add", "urn:x\r\nX: y"),
        lambda: SoapRequest("Add", ""),
        lambda: SoapRequest("Add", WANIP1, (("u:x", "1"),)),
        lambda: SoapRequest("Add", WANIP1, (("x", "\x00"),)),
        lambda: igd.add_port_mapping(
            WANIP1,
            external_port=70000,
            transport=Transport.UDP,
            internal_port=1,
            internal_client="h",
            description="",
            lease=0,
        ),
        lambda: igd.add_port_mapping(
            WANIP1,
            external_port=1,
            transport=Transport.UDP,
            internal_port=0,
            internal_client="h",
            description="",
            lease=0,
        ),
        lambda: igd.add_port_mapping(
            WANIP1,
            external_port=1,
            transport=Transport.UDP,
            internal_port=1,
            internal_client="h",
            description="",
            lease=2**32,
        ),
        lambda: igd.add_port_mapping(
            WANIP1,
            external_port=1,
            transport="udp",  # type: ignore[arg-type]
            internal_port=1,
            internal_client="h",
            description="",
            lease=0,
        ),
        lambda: igd.add_port_mapping(
            WANIP1,
            external_port=True,
            transport=Transport.UDP,
            internal_port=1,
            internal_client="h",
            description="",
            lease=0,
        ),
        lambda: igd.add_port_mapping(
            WANIP1,
            external_port=1,
            transport=Transport.UDP,
            internal_port=1,
            internal_client="",
            description="",
            lease=0,
        ),
        lambda: igd.get_list_of_port_mappings(WANIP2, start_port=10, end_port=5, transport=Transport.UDP),
        lambda: igd.get_generic_port_mapping_entry(WANIP1, -1),
    ],
)
def test_builders_reject_caller_bugs(build: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        build()


# --- SOAP responses -------------------------------------------------------------------------------


def test_external_ip_response() -> None:
    request = igd.get_external_ip_address(WANIP1)
    outputs = igd.parse_soap_response(
        response("GetExternalIPAddress", WANIP1, {"NewExternalIPAddress": " 203.0.113.7 "}), request, 200
    )
    assert outputs == {"NewExternalIPAddress": "203.0.113.7"}
    assert igd.external_ip_from(outputs) == IPv4Address("203.0.113.7")


@pytest.mark.parametrize("text", ["", "0.0.0.0"])
def test_no_external_ip(text: str) -> None:
    assert igd.external_ip_from({"NewExternalIPAddress": text}) is None
    assert igd.external_ip_from({}) is None


@pytest.mark.parametrize("text", ["router", "2001:db8::1", "203.0.113.256", "203.0.113.7\x00"])
def test_bad_external_ip(text: str) -> None:
    with pytest.raises(DecodeError, match="NewExternalIPAddress"):
        igd.external_ip_from({"NewExternalIPAddress": text})


def test_response_without_namespaces_and_empty_values() -> None:
    data = (
        b"<Envelope><Body><GetStatusInfoResponse>"
        b"<NewConnectionStatus>Connected</NewConnectionStatus><NewLastConnectionError/>"
        b"<NewUptime>86400</NewUptime></GetStatusInfoResponse></Body></Envelope>"
    )
    outputs = igd.parse_soap_response(data, igd.get_status_info(WANIP1), 200)
    assert outputs == {"NewConnectionStatus": "Connected", "NewLastConnectionError": "", "NewUptime": "86400"}
    assert igd.status_info_from(outputs) == StatusInfo("Connected", "", 86400)
    assert igd.status_info_from({"NewConnectionStatus": "Disconnected"}) == StatusInfo("Disconnected", "", None)
    with pytest.raises(DecodeError, match="NewUptime"):
        igd.status_info_from({"NewUptime": "-1"})


def test_the_legacy_dslforum_uptime_spelling_is_read() -> None:
    """TR-064 services (urn:dslforum-org) answer NewUpTime (docs/QUIRKS.md U13)."""
    outputs = {"NewConnectionStatus": "Connected", "NewLastConnectionError": "ERROR_NONE", "NewUpTime": "42"}
    assert igd.status_info_from(outputs) == StatusInfo("Connected", "ERROR_NONE", 42)
    assert igd.status_info_from({**outputs, "NewUptime": "7"}).uptime == 7  # the standard name first
    with pytest.raises(DecodeError):
        igd.status_info_from({"NewUpTime": "soon"})


@pytest.mark.parametrize(
    ("code", "description", "text"),
    [
        ("718", "ConflictInMappingEntry", "UPnP error 718 (ConflictInMappingEntry)"),
        ("725", "OnlyPermanentLeasesSupported", "UPnP error 725 (OnlyPermanentLeasesSupported)"),
        ("606", "Action not authorized", "UPnP error 606 (Action not authorized)"),
        (" 402 ", None, "UPnP error 402 (Invalid Args)"),
        ("899", "Vendor Thing", "UPnP error 899 (Vendor Thing)"),
        ("898", "", "UPnP error 898 (unknown error)"),
    ],
)
def test_faults(code: str, description: str | None, text: str) -> None:
    request = igd.add_port_mapping(
        WANIP1,
        external_port=5060,
        transport=Transport.UDP,
        internal_port=5060,
        internal_client="192.168.77.10",
        description="x",
        lease=3600,
    )
    with pytest.raises(UpnpError) as caught:
        igd.parse_soap_response(fault(code, description), request, 500)
    assert caught.value.code == int(code)
    assert str(caught.value) == text
    assert "\n" not in str(caught.value)
    if description:
        assert caught.value.description == description


def test_fault_is_honoured_even_with_http_200() -> None:
    with pytest.raises(UpnpError, match="730"):
        igd.parse_soap_response(fault("730", "PortMappingNotFound"), igd.get_status_info(WANIP1), 200)


def test_error_names_table() -> None:
    expected = {
        402: "Invalid Args",
        501: "Action Failed",
        606: "Action not authorized",
        714: "NoSuchEntryInArray",
        715: "WildCardNotPermittedInSrcIP",
        716: "WildCardNotPermittedInExtPort",
        718: "ConflictInMappingEntry",
        724: "SamePortValuesRequired",
        725: "OnlyPermanentLeasesSupported",
        726: "RemoteHostOnlySupportsWildcard",
        727: "ExternalPortOnlySupportsWildcard",
        728: "NoPortMapsAvailable",
        729: "ConflictWithOtherMechanisms",
        730: "PortMappingNotFound",
        731: "ReadOnly",
        732: "WildCardNotPermittedInIntPort",
        733: "InconsistentParameters",
    }
    for code, name in expected.items():
        assert igd.ERROR_NAMES[code] == name
        assert UpnpError(code).name == name


@pytest.mark.parametrize(
    ("data", "status", "reason"),
    [
        (fault("abc", "x"), 500, "errorCode is not a number"),
        (fault("", "x"), 500, "errorCode is not a number"),
        (fault("-1", "x"), 500, "errorCode is not a number"),
        (
            envelope("<s:Fault><faultstring>Boom</faultstring></s:Fault>"),
            500,
            r"without UPnPError detail \(Boom\)",
        ),
        (envelope(""), 200, "no GetExternalIPAddressResponse"),
        (response("GetStatusInfo", WANIP1, {}), 200, "no GetExternalIPAddressResponse"),
        (response("GetExternalIPAddress", WANIP1, {"A": "1"}), 500, "HTTP status 500 without a SOAP fault"),
        (b"<s:Envelope xmlns:s='urn:x'/>", 200, "no Body"),
        (b"<Body/>", 200, "not an Envelope"),
        (b"Internal Server Error", 500, "not well-formed"),
        (b"", 200, "not well-formed"),
        (
            envelope(
                "<u:GetExternalIPAddressResponse xmlns:u='x'>"
                "<NewExternalIPAddress>1.2.3.4</NewExternalIPAddress>"
                "<NewExternalIPAddress>6.6.6.6</NewExternalIPAddress></u:GetExternalIPAddressResponse>"
            ),
            200,
            "repeats NewExternalIPAddress",
        ),
    ],
)
def test_bad_soap_responses(data: bytes, status: int, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        igd.parse_soap_response(data, igd.get_external_ip_address(WANIP1), status)


# --- port mapping entries -------------------------------------------------------------------------


def test_add_any_port_mapping_reserved_port() -> None:
    request = igd.add_port_mapping(
        WANIP2,
        any_port=True,
        external_port=5060,
        transport=Transport.UDP,
        internal_port=5060,
        internal_client="192.168.77.10",
        description="sip",
        lease=3600,
    )
    outputs = igd.parse_soap_response(response("AddAnyPortMapping", WANIP2, {"NewReservedPort": "5061"}), request, 200)
    assert igd.reserved_port_from(outputs) == 5061
    for bad in ({"NewReservedPort": "0"}, {"NewReservedPort": "65536"}, {"NewReservedPort": "+5"}, {}):
        with pytest.raises(DecodeError, match="NewReservedPort"):
            igd.reserved_port_from(bad)


def test_specific_entry() -> None:
    outputs = {
        "NewInternalPort": "5060",
        "NewInternalClient": "192.168.77.10",
        "NewEnabled": "1",
        "NewPortMappingDescription": "autonat sip",
        "NewLeaseDuration": "3542",
    }
    assert igd.specific_entry_from(outputs, 5060, Transport.UDP) == PortMappingEntry(
        remote_host="",
        external_port=5060,
        transport=Transport.UDP,
        internal_port=5060,
        internal_client="192.168.77.10",
        enabled=True,
        description="autonat sip",
        lease_duration=3542,
    )
    sparse = igd.specific_entry_from({"NewInternalPort": "80", "NewInternalClient": "192.168.77.10"}, 80, Transport.TCP)
    assert (sparse.enabled, sparse.description, sparse.lease_duration) == (True, "", 0)


@pytest.mark.parametrize(
    ("protocol", "transport"), [("UDP", Transport.UDP), ("tcp", Transport.TCP), ("Udp", Transport.UDP)]
)
def test_generic_entry_protocol_any_case(protocol: str, transport: Transport) -> None:
    outputs = {
        "NewRemoteHost": "",
        "NewExternalPort": "8080",
        "NewProtocol": protocol,
        "NewInternalPort": "80",
        "NewInternalClient": "192.168.77.10",
        "NewEnabled": "false",
        "NewPortMappingDescription": "web",
        "NewLeaseDuration": "0",
    }
    entry = igd.generic_entry_from(outputs)
    assert entry.transport is transport
    assert (entry.external_port, entry.internal_port, entry.enabled, entry.lease_duration) == (
        8080,
        80,
        False,
        0,
    )


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("NewExternalPort", "65536", "NewExternalPort is not an integer in 0..65535"),
        ("NewExternalPort", "-1", "NewExternalPort"),
        ("NewExternalPort", "80.0", "NewExternalPort"),
        ("NewExternalPort", "\u0668\u0660", "NewExternalPort"),
        ("NewExternalPort", "", "NewExternalPort"),
        ("NewInternalPort", "99999999999999999999", "NewInternalPort"),
        ("NewProtocol", "SCTP", "neither UDP nor TCP"),
        ("NewProtocol", "", "neither UDP nor TCP"),
        ("NewEnabled", "maybe", "NewEnabled is not a boolean"),
        ("NewLeaseDuration", "4294967296", "NewLeaseDuration is not an integer in 0..4294967295"),
        ("NewLeaseDuration", "1e3", "NewLeaseDuration"),
    ],
)
def test_entries_parse_numbers_strictly(field: str, value: str, reason: str) -> None:
    outputs = {
        "NewExternalPort": "8080",
        "NewProtocol": "TCP",
        "NewInternalPort": "80",
        "NewInternalClient": "192.168.77.10",
        "NewEnabled": "1",
        "NewLeaseDuration": "0",
        field: value,
    }
    with pytest.raises(DecodeError, match=reason):
        igd.generic_entry_from(outputs)


def test_entries_require_key_fields() -> None:
    with pytest.raises(DecodeError, match="no NewInternalClient"):
        igd.specific_entry_from({"NewInternalPort": "80"}, 80, Transport.TCP)
    with pytest.raises(DecodeError, match="no NewProtocol"):
        igd.generic_entry_from({"NewExternalPort": "80", "NewInternalPort": "80", "NewInternalClient": "h"})


PORT_LISTING = """<?xml version="1.0" encoding="UTF-8"?>
<p:PortMappingList xmlns:p="urn:schemas-upnp-org:gw:WANIPConnection"
 xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
 xsi:schemaLocation="urn:schemas-upnp-org:gw:WANIPConnection http://www.upnp.org/schemas/gw/WANIPConnection-v2.xsd">
<p:PortMappingEntry>
<p:NewRemoteHost></p:NewRemoteHost>
<p:NewExternalPort>5060</p:NewExternalPort>
<p:NewProtocol>UDP</p:NewProtocol>
<p:NewInternalPort>5060</p:NewInternalPort>
<p:NewInternalClient>192.168.77.10</p:NewInternalClient>
<p:NewEnabled>1</p:NewEnabled>
<p:NewDescription>autonat sip &amp; rtp</p:NewDescription>
<p:NewLeaseTime>3600</p:NewLeaseTime>
</p:PortMappingEntry>
<p:PortMappingEntry>
<p:NewRemoteHost>198.51.100.4</p:NewRemoteHost>
<p:NewExternalPort>8443</p:NewExternalPort>
<p:NewProtocol>tcp</p:NewProtocol>
<p:NewInternalPort>443</p:NewInternalPort>
<p:NewInternalClient>192.168.77.11</p:NewInternalClient>
<p:NewEnabled>0</p:NewEnabled>
<p:NewDescription></p:NewDescription>
<p:NewLeaseTime>0</p:NewLeaseTime>
</p:PortMappingEntry>
</p:PortMappingList>
"""


def test_port_listing() -> None:
    request = igd.get_list_of_port_mappings(WANIP2, transport=Transport.UDP, manage=True, count=10)
    data = response("GetListOfPortMappings", WANIP2, {"NewPortListing": PORT_LISTING})
    assert b"&lt;p:PortMappingList" in data
    outputs = igd.parse_soap_response(data, request, 200)
    assert igd.port_listing_from(outputs) == [
        PortMappingEntry("", 5060, Transport.UDP, 5060, "192.168.77.10", True, "autonat sip & rtp", 3600),
        PortMappingEntry("198.51.100.4", 8443, Transport.TCP, 443, "192.168.77.11", False, "", 0),
    ]


def test_empty_and_bad_port_listings() -> None:
    assert igd.port_listing_from({}) == []
    assert igd.port_listing_from({"NewPortListing": ""}) == []
    assert igd.port_listing_from({"NewPortListing": "<p:PortMappingList xmlns:p='x'/>"}) == []
    with pytest.raises(DecodeError, match="not a PortMappingList"):
        igd.port_listing_from({"NewPortListing": "<Other/>"})
    with pytest.raises(DecodeError, match="neither UDP nor TCP"):
        igd.port_listing_from({"NewPortListing": PORT_LISTING.replace(">tcp<", ">icmp<")})
    with pytest.raises(DecodeError, match="repeats NewProtocol"):
        igd.port_listing_from(
            {
                "NewPortListing": PORT_LISTING.replace(
                    "<p:NewEnabled>0", "<p:NewProtocol>UDP</p:NewProtocol><p:NewEnabled>0"
                )
            }
        )
    with pytest.raises(DecodeError, match="not well-formed"):
        igd.port_listing_from({"NewPortListing": PORT_LISTING[:200]})


# --- properties -----------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_only_decode_error(data: bytes) -> None:
    for parse in (
        lambda d: igd.parse_device_description(d, DESCRIPTION_URL),
        igd.parse_scpd,
        lambda d: igd.parse_soap_response(d, igd.get_external_ip_address(WANIP1), 200),
        lambda d: igd.parse_soap_response(d, igd.get_external_ip_address(WANIP1), 500),
        lambda d: igd.port_listing_from({"NewPortListing": d.decode("latin-1")}),
    ):
        with suppress(DecodeError, UpnpError):
            parse(data)


_SAMPLES: list[tuple[bytes, Callable[[bytes], object]]] = [
    (root_description(), lambda d: igd.parse_device_description(d, DESCRIPTION_URL)),
    (SCPD, igd.parse_scpd),
    (
        fault("718", "ConflictInMappingEntry"),
        lambda d: igd.parse_soap_response(d, igd.get_status_info(WANIP1), 500),
    ),
    (
        response("GetListOfPortMappings", WANIP2, {"NewPortListing": PORT_LISTING}),
        lambda d: igd.port_listing_from(
            igd.parse_soap_response(d, igd.get_list_of_port_mappings(WANIP2, transport=Transport.UDP), 200)
        ),
    ),
    (
        response(
            "GetGenericPortMappingEntry",
            WANIP1,
            {"NewExternalPort": "1", "NewProtocol": "UDP", "NewInternalPort": "1", "NewInternalClient": "h"},
        ),
        lambda d: igd.generic_entry_from(
            igd.parse_soap_response(d, igd.get_generic_port_mapping_entry(WANIP1, 0), 200)
        ),
    ),
]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(_SAMPLES), st.data())
def test_mutated_documents_only_decode_error(
    sample: tuple[bytes, Callable[[bytes], object]], data: st.DataObject
) -> None:
    document, parse = sample
    at = data.draw(st.integers(0, len(document)))
    cut = data.draw(st.integers(0, 12))
    insert = data.draw(st.sampled_from([b"", b"<", b">", b"&", b"/", b'"', b"\x00", b"\xff", b"</a>", b"<a>", b"1"]))
    with suppress(DecodeError, UpnpError):
        parse(document[:at] + insert + document[at + cut :])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=30), st.text(max_size=30), max_size=10))
def test_output_parsers_only_decode_error(outputs: dict[str, str]) -> None:
    for parse in (
        igd.external_ip_from,
        igd.status_info_from,
        igd.reserved_port_from,
        igd.generic_entry_from,
        igd.port_listing_from,
        lambda o: igd.specific_entry_from(o, 1, Transport.UDP),
    ):
        with suppress(DecodeError):
            parse(outputs)


_xml_text = st.text(
    # Every character XML 1.0 can carry (§2.2): utf-8 excludes surrogates, the filter the rest.
    alphabet=st.characters(codec="utf-8").filter(lambda c: (c >= " " or c in "\t\n\r") and c not in "\ufffe\uffff"),
    max_size=40,
) | st.sampled_from(["<&>\"'", "]]>", "&amp;", "\u00e9\u4e2d\U0001f600", "a\r\nb", "\r"])
_names = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,15}\Z")


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([WANIP1, WANIP2, WANPPP1]),
    _names,
    st.lists(st.tuples(_names, _xml_text), max_size=6, unique_by=lambda pair: pair[0]),
)
def test_soap_round_trip(service_type: str, action: str, arguments: list[tuple[str, str]]) -> None:
    request = SoapRequest(action, service_type, tuple(arguments))
    body = request.body()
    # Turn our request envelope into the router's response envelope: rename the action element.
    reply = body.replace(f"<u:{action} ".encode(), f"<u:{action}Response ".encode(), 1).replace(
        f"</u:{action}>".encode(), f"</u:{action}Response>".encode(), 1
    )
    outputs = igd.parse_soap_response(reply, request, 200)
    assert outputs == {name: value.strip(" \t\r\n") for name, value in arguments}
    assert list(outputs) == [name for name, _ in arguments]
