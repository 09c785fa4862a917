"""SSDP codec (UPnP DA 1.1 §1): M-SEARCH, search responses, NOTIFY, and the LOCATION SSRF guard; then
what the search hands on (aio/ssdp.py) and how discovery reports its candidates (aio/upnp.py)."""

from __future__ import annotations

from contextlib import suppress
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autonat.aio import http as aio_http
from autonat.aio import ssdp as aio_ssdp
from autonat.aio import upnp_core
from autonat.aio.route import RouterLocation
from autonat.aio.upnp import Candidate, _reasons
from autonat.proto import ssdp
from autonat.proto.errors import DecodeError
from autonat.proto.ssdp import Location, Notify, SearchResponse

GATEWAY = IPv4Address("192.168.77.1")
LAN = IPv4Network("192.168.77.0/24")

MINIUPNPD_RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"CACHE-CONTROL: max-age=120\r\n"
    b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
    b"USN: uuid:6b3a1c2e-3d1f-4a5b-9c8d-0e1f2a3b4c5d::urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
    b"EXT:\r\n"
    b"SERVER: OpenWRT/23.05 UPnP/1.1 MiniUPnPd/2.3.3\r\n"
    b"LOCATION: http://192.168.77.1:5000/rootDesc.xml\r\n"
    b'OPT: "http://schemas.upnp.org/upnp/1/0/"; ns=01\r\n'
    b"01-NLS: 1700000000\r\n"
    b"BOOTID.UPNP.ORG: 1700000000\r\n"
    b"CONFIGID.UPNP.ORG: 1337\r\n"
    b"\r\n"
)

MINIUPNPD_ALIVE = (
    b"NOTIFY * HTTP/1.1\r\n"
    b"HOST: 239.255.255.250:1900\r\n"
    b"CACHE-CONTROL: max-age=120\r\n"
    b"LOCATION: http://192.168.77.1:5000/rootDesc.xml\r\n"
    b"SERVER: OpenWRT/23.05 UPnP/1.1 MiniUPnPd/2.3.3\r\n"
    b"NT: urn:schemas-upnp-org:service:WANIPConnection:1\r\n"
    b"USN: uuid:6b3a1c2e-3d1f-4a5b-9c8d-0e1f2a3b4c5f::urn:schemas-upnp-org:service:WANIPConnection:1\r\n"
    b"NTS: ssdp:alive\r\n"
    b"BOOTID.UPNP.ORG: 1700000001\r\n"
    b"CONFIGID.UPNP.ORG: 1337\r\n"
    b"\r\n"
)

MINIUPNPD_BYEBYE = (
    b"NOTIFY * HTTP/1.1\r\n"
    b"HOST: 239.255.255.250:1900\r\n"
    b"NT: upnp:rootdevice\r\n"
    b"USN: uuid:6b3a1c2e-3d1f-4a5b-9c8d-0e1f2a3b4c5d::upnp:rootdevice\r\n"
    b"NTS: ssdp:byebye\r\n"
    b"BOOTID.UPNP.ORG: 1700000001\r\n"
    b"\r\n"
)


def _headers(message: bytes) -> dict[str, str]:
    lines = message.decode().split("\r\n")
    return dict(line.split(": ", 1) for line in lines[1:] if line)


# --- M-SEARCH -------------------------------------------------------------------------------------


def test_constants() -> None:
    assert str(ssdp.MULTICAST_ADDRESS) == "239.255.255.250"
    assert ssdp.PORT == 1900
    assert ssdp.MAX_DATAGRAM == 8192
    assert ssdp.ST_IGD2.endswith("InternetGatewayDevice:2")
    assert ssdp.ST_WANIP2.endswith("WANIPConnection:2")
    assert ssdp.DEFAULT_SEARCH_TARGETS[0] == ssdp.ST_IGD2
    assert ssdp.DEFAULT_SEARCH_TARGETS[-1] == ssdp.ST_ALL
    assert set(ssdp.DEFAULT_SEARCH_TARGETS) == {
        ssdp.ST_IGD1,
        ssdp.ST_IGD2,
        ssdp.ST_WANIP1,
        ssdp.ST_WANIP2,
        ssdp.ST_WANPPP1,
        ssdp.ST_ALL,
    }


def test_msearch_known_answer() -> None:
    message = ssdp.build_msearch(ssdp.ST_IGD1)
    assert message.startswith(b"M-SEARCH * HTTP/1.1\r\n")
    assert message.endswith(b"\r\n\r\n")
    assert b"\n" not in message.replace(b"\r\n", b"")
    headers = _headers(message)
    assert headers["HOST"] == "239.255.255.250:1900"
    assert headers["MAN"] == '"ssdp:discover"'
    assert headers["MX"] == "1"
    assert headers["ST"] == ssdp.ST_IGD1
    assert "UPnP/1.1" in headers["USER-AGENT"]
    assert "autonat/" in headers["USER-AGENT"]


@pytest.mark.parametrize(("mx", "sent"), [(-3, "1"), (0, "1"), (1, "1"), (3, "3"), (5, "5"), (120, "5")])
def test_msearch_clamps_mx(mx: int, sent: str) -> None:
    assert _headers(ssdp.build_msearch(ssdp.ST_ALL, mx=mx))["MX"] == sent


def test_msearch_unicast_host() -> None:
    assert _headers(ssdp.build_msearch(ssdp.ST_WANIP1, host="192.168.77.1:1900"))["HOST"] == "192.168.77.1:1900"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"search_target": "ssdp:all\r\nX-Evil: 1"},
        {"search_target": ""},
        {"search_target": "ssdp:all", "host": "a\nb"},
        {"search_target": "ssdp:all", "mx": True},
    ],
)
def test_msearch_rejects_header_injection(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ssdp.build_msearch(**kwargs)  # type: ignore[arg-type]


def test_our_own_msearch_is_not_a_response() -> None:
    with pytest.raises(DecodeError, match="not a response"):
        ssdp.parse_datagram(ssdp.build_msearch(ssdp.ST_IGD2))


# --- search responses -----------------------------------------------------------------------------


def test_miniupnpd_search_response() -> None:
    assert ssdp.parse_search_response(MINIUPNPD_RESPONSE) == SearchResponse(
        location="http://192.168.77.1:5000/rootDesc.xml",
        search_target="urn:schemas-upnp-org:device:InternetGatewayDevice:1",
        usn="uuid:6b3a1c2e-3d1f-4a5b-9c8d-0e1f2a3b4c5d::urn:schemas-upnp-org:device:InternetGatewayDevice:1",
        server="OpenWRT/23.05 UPnP/1.1 MiniUPnPd/2.3.3",
        max_age=120,
    )
    assert ssdp.parse_datagram(MINIUPNPD_RESPONSE) == ssdp.parse_search_response(MINIUPNPD_RESPONSE)


def test_odd_casing_lf_endings_http10_and_padding() -> None:
    data = (
        b"HTTP/1.0 200 OK\n"
        b"location:   http://192.168.77.1:5000/rootDesc.xml  \n"
        b"St:\turn:schemas-upnp-org:service:WANIPConnection:1\n"
        b'Cache-Control: no-cache="Ext", MAX-AGE = "1800"\n'
        b"\n"
    )
    response = ssdp.parse_search_response(data)
    assert response.location == "http://192.168.77.1:5000/rootDesc.xml"
    assert response.search_target == ssdp.ST_WANIP1
    assert response.max_age == 1800
    assert response.usn == ""
    assert response.server is None


def test_missing_final_blank_line_is_tolerated() -> None:
    data = b"HTTP/1.1 200 OK\r\nST: ssdp:all\r\nLOCATION: http://192.168.77.1/d.xml"
    assert ssdp.parse_search_response(data).location == "http://192.168.77.1/d.xml"


@pytest.mark.parametrize(
    ("cache_control", "max_age"),
    [
        (b"max-age=1800", 1800),
        (b"max-age = 60", 60),
        (b"public, max-age=5", 5),
        (b"max-age=", None),
        (b"max-age=-5", None),
        (b"max-age=ten", None),
        (b"max-age=99999999999", None),
        (b"no-cache", None),
    ],
)
def test_cache_control_is_lenient(cache_control: bytes, max_age: int | None) -> None:
    data = b"HTTP/1.1 200 OK\r\nST: x\r\nLOCATION: http://1.2.3.4/\r\nCACHE-CONTROL: " + cache_control + b"\r\n\r\n"
    assert ssdp.parse_search_response(data).max_age == max_age


def test_non_utf8_bytes_are_read_as_latin1() -> None:
    data = b"HTTP/1.1 200 OK\r\nST: x\r\nLOCATION: http://1.2.3.4/\r\nSERVER: Caf\xe9 router\r\n\r\n"
    assert ssdp.parse_search_response(data).server == "Caf\u00e9 router"


def test_identical_duplicate_header_is_harmless() -> None:
    data = MINIUPNPD_RESPONSE.replace(b"EXT:\r\n", b"LOCATION: http://192.168.77.1:5000/rootDesc.xml\r\n")
    assert ssdp.parse_search_response(data).location == "http://192.168.77.1:5000/rootDesc.xml"


def test_conflicting_duplicate_location_is_refused() -> None:
    data = MINIUPNPD_RESPONSE.replace(b"EXT:\r\n", b"location: http://192.168.77.66/evil.xml\r\n")
    with pytest.raises(DecodeError, match="LOCATION repeated"):
        ssdp.parse_search_response(data)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"HTTP/1.1 404 Not Found\r\nST: x\r\nLOCATION: http://1.2.3.4/\r\n\r\n", "not 200"),
        (b"HTTP/2 200 OK\r\nST: x\r\nLOCATION: http://1.2.3.4/\r\n\r\n", "HTTP/1.0 or HTTP/1.1"),
        (b"HTTP/1.1\r\nST: x\r\nLOCATION: http://1.2.3.4/\r\n\r\n", "status line"),
        (b"HTTP/1.1 200 OK\r\nLOCATION: http://1.2.3.4/\r\n\r\n", "no ST"),
        (b"HTTP/1.1 200 OK\r\nST: x\r\n\r\n", "no LOCATION"),
        (b"HTTP/1.1 200 OK\r\nST: x\r\nLOCATION:\r\n\r\n", "no LOCATION"),
        (b"HTTP/1.1 200 OK\r\nST x\r\nLOCATION: http://1.2.3.4/\r\n\r\n", "malformed"),
        (b"HTTP/1.1 200 OK\r\nS T: x\r\nLOCATION: http://1.2.3.4/\r\n\r\n", "malformed"),
        (b"HTTP/1.1 200 OK\r\nST: x\r\n  folded\r\nLOCATION: http://1.2.3.4/\r\n\r\n", "continuation"),
        (b"HTTP/1.1 200 OK\r\nST: x\x00y\r\nLOCATION: http://1.2.3.4/\r\n\r\n", "control character"),
        (b"HTTP/1.1 200 OK\r\nST: x\rLOCATION: http://1.2.3.4/\r\n\r\n", "control character"),
        (b"NOTIFY * HTTP/1.1\r\n\r\n", "not an SSDP search response"),
    ],
)
def test_bad_search_responses(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        ssdp.parse_search_response(data)


def test_caps() -> None:
    head = b"HTTP/1.1 200 OK\r\nST: x\r\nLOCATION: http://1.2.3.4/\r\n"
    with pytest.raises(DecodeError, match="over the 8192 byte limit"):
        ssdp.parse_search_response(head + b"X: " + b"a" * 9000 + b"\r\n\r\n")
    with pytest.raises(DecodeError, match="longer than 1024"):
        ssdp.parse_search_response(head + b"X: " + b"a" * 1100 + b"\r\n\r\n")
    ok = head + b"X: " + b"a" * 1000 + b"\r\n\r\n"
    assert ssdp.parse_search_response(ok).search_target == "x"
    # `head` holds two header lines.
    many = head + b"".join(b"X-%d: 1\r\n" % i for i in range(63)) + b"\r\n"
    with pytest.raises(DecodeError, match="more than 64 header lines"):
        ssdp.parse_search_response(many)
    exactly = head + b"".join(b"X-%d: 1\r\n" % i for i in range(62)) + b"\r\n"
    assert ssdp.parse_search_response(exactly).search_target == "x"


# --- NOTIFY ---------------------------------------------------------------------------------------


def test_miniupnpd_alive() -> None:
    expected = Notify(
        nt="urn:schemas-upnp-org:service:WANIPConnection:1",
        nts="ssdp:alive",
        usn="uuid:6b3a1c2e-3d1f-4a5b-9c8d-0e1f2a3b4c5f::urn:schemas-upnp-org:service:WANIPConnection:1",
        location="http://192.168.77.1:5000/rootDesc.xml",
        max_age=120,
        boot_id=1700000001,
    )
    assert ssdp.parse_notify(MINIUPNPD_ALIVE) == expected
    assert ssdp.parse_datagram(MINIUPNPD_ALIVE) == expected


def test_byebye_needs_no_location() -> None:
    notify = ssdp.parse_datagram(MINIUPNPD_BYEBYE)
    assert isinstance(notify, Notify)
    assert notify.nts == ssdp.NTS_BYEBYE
    assert notify.location is None
    assert notify.max_age is None
    assert notify.nt == "upnp:rootdevice"


def test_update_and_odd_case_nts() -> None:
    data = MINIUPNPD_ALIVE.replace(b"NTS: ssdp:alive", b"nts: SSDP:Update").replace(
        b"BOOTID.UPNP.ORG: 1700000001", b"BootId.UPnP.Org: garbage"
    )
    notify = ssdp.parse_notify(data)
    assert notify.nts == ssdp.NTS_UPDATE
    assert notify.boot_id is None


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (MINIUPNPD_ALIVE.replace(b"NTS: ssdp:alive", b"NTS: ssdp:propchange"), "unknown SSDP NTS"),
        (MINIUPNPD_ALIVE.replace(b"NTS: ssdp:alive\r\n", b""), "no NTS"),
        (MINIUPNPD_ALIVE.replace(b"NT: urn", b"X-NT: urn"), "no NT header"),
        (MINIUPNPD_ALIVE.replace(b"USN:", b"X-USN:"), "no USN"),
        (MINIUPNPD_ALIVE.replace(b"LOCATION:", b"X-LOCATION:"), "alive has no LOCATION"),
        (MINIUPNPD_ALIVE.replace(b"NOTIFY * HTTP/1.1", b"NOTIFY /x HTTP/1.1"), "request line"),
        (MINIUPNPD_ALIVE.replace(b"NOTIFY * HTTP/1.1", b"NOTIFY * HTTP/3"), "HTTP/1.0 or HTTP/1.1"),
    ],
)
def test_bad_notify(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        ssdp.parse_notify(data)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nST: ssdp:all\r\n\r\n", "not a response"),
        (b"GET / HTTP/1.1\r\n\r\n", "not an SSDP message"),
        (b"\r\n\r\n", "not an SSDP message"),
        (b"\xff\xfe\x00", "control character"),
    ],
)
def test_parse_datagram_rejects(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        ssdp.parse_datagram(data)


# --- LOCATION guard -------------------------------------------------------------------------------


def _validate(
    location: str,
    responder: IPv4Address | IPv6Address = GATEWAY,
    gateway: IPv4Address | IPv6Address = GATEWAY,
    network: IPv4Network | IPv6Network = LAN,
) -> Location:
    return ssdp.validate_location(location, responder=responder, gateway=gateway, local_network=network)


def test_location_from_the_gateway_is_normalised() -> None:
    assert _validate("http://192.168.77.1:5000/rootDesc.xml") == Location(
        url="http://192.168.77.1:5000/rootDesc.xml", host=GATEWAY, port=5000, path="/rootDesc.xml"
    )
    assert _validate(" HTTP://192.168.77.1 ") == Location(
        url="http://192.168.77.1:80/", host=GATEWAY, port=80, path="/"
    )
    assert _validate("http://192.168.77.1:/d.xml?x=1#frag").url == "http://192.168.77.1:80/d.xml?x=1"
    assert _validate("http://192.168.77.1?x").path == "/?x"


def test_location_from_another_responder_is_accepted() -> None:
    # A second IGD (or a mesh node) on the LAN that answered with its own address.
    other = IPv4Address("192.168.77.2")
    location = _validate("http://192.168.77.2:49152/desc.xml", responder=other)
    assert location.host == other
    assert location.url == "http://192.168.77.2:49152/desc.xml"


def test_ipv6_location() -> None:
    gateway = IPv6Address("fd00:77::1")
    network = IPv6Network("fd00:77::/64")
    location = _validate("http://[fd00:77::1]:5000/rootDesc.xml", gateway, gateway, network)
    assert location == Location("http://[fd00:77::1]:5000/rootDesc.xml", gateway, 5000, "/rootDesc.xml")


@pytest.mark.parametrize(
    ("location", "reason"),
    [
        ("http://127.0.0.1:5000/rootDesc.xml", "LOCATION points to 127.0.0.1: loopback"),
        ("http://169.254.169.254/latest/meta-data/", "LOCATION points to 169.254.169.254: link-local"),
        ("http://239.255.255.250:1900/", "LOCATION points to 239.255.255.250: multicast"),
        ("http://0.0.0.0:5000/", "LOCATION points to 0.0.0.0: unspecified"),
        ("http://255.255.255.255/", "LOCATION points to 255.255.255.255: broadcast"),
        ("http://192.168.77.255/", "LOCATION points to 192.168.77.255: broadcast"),
        ("http://240.0.0.1/", "LOCATION points to 240.0.0.1: reserved"),
        (
            "http://192.168.77.66:5000/",
            "LOCATION host 192.168.77.66 is neither the responder nor the gateway",
        ),
        ("http://10.0.0.1:5000/", "LOCATION host 10.0.0.1 is outside the local network 192.168.77.0/24"),
        ("http://8.8.8.8/", "outside the local network"),
        ("http://router.lan:5000/rootDesc.xml", "LOCATION host must be an IP address, not a name"),
        ("http://localhost/", "not a name"),
        ("http://3232255233/", "not a name"),
        ("http://0xc0.168.77.1/", "not a name"),
        ("http://192.168.077.001/", "not a name"),
        ("https://192.168.77.1:5000/rootDesc.xml", "LOCATION must be an http URL"),
        ("file:///etc/passwd", "LOCATION must be an http URL"),
        ("gopher://192.168.77.1/", "LOCATION must be an http URL"),
        ("192.168.77.1:5000/rootDesc.xml", "LOCATION must be an http URL"),
        ("http://admin:pw@192.168.77.1/", "must not carry user info"),
        ("http://192.168.77.66@192.168.77.1/", "must not carry user info"),
        ("http://[::1]:5000/", "LOCATION points to ::1: loopback"),
        ("http://[::ffff:192.168.77.1]/", "IPv4-mapped"),
        ("http://[192.168.77.1]/", "brackets must hold an IPv6 address"),
        ("http://fd00::1/", "IPv6 host must be in brackets"),
        ("http://[fd00::1/", "unterminated"),
        ("http://[fd00::1]x/", "junk after"),
        ("http://192.168.77.1:0/", "port '0' is invalid"),
        ("http://192.168.77.1:65536/", "port '65536' is invalid"),
        ("http://192.168.77.1:http/", "port 'http' is invalid"),
        ("http://192.168.77.1:-80/", "is invalid"),
        ("http://192.168.77.1:5000\\@8.8.8.8/", "characters not allowed"),
        ("http://192.168.77.1/a b", "characters not allowed"),
        ("http://192.168.77.1/\r\nHost: evil", "characters not allowed"),
        ("http://192.168.77.\u0661/", "characters not allowed"),
        ("http:///x", "no host"),
        ("http://:80/x", "no host"),
        ("http://" + "1" * 2000, "too long"),
    ],
)
def test_ssrf_guard(location: str, reason: str) -> None:
    with pytest.raises(DecodeError) as caught:
        _validate(location)
    assert reason in caught.value.reason


def test_ssrf_guard_ipv6_classes() -> None:
    gateway = IPv6Address("fd00:77::1")
    network = IPv6Network("fd00:77::/64")
    for location, reason in [
        ("http://[::1]/", "loopback"),
        ("http://[fe80::1]/", "link-local"),
        ("http://[fe80::1%25eth0]/", "zone"),
        ("http://[ff02::c]/", "multicast"),
        ("http://[::]/", "unspecified"),
        ("http://[::ffff:127.0.0.1]/", "IPv4-mapped"),
        ("http://[fd00:77::66]/", "neither the responder nor the gateway"),
        ("http://192.168.77.1/", "outside the local network"),
    ]:
        with pytest.raises(DecodeError, match=reason):
            _validate(location, gateway, gateway, network)


# --- properties -----------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_only_decode_error(data: bytes) -> None:
    for parse in (ssdp.parse_datagram, ssdp.parse_search_response, ssdp.parse_notify):
        with suppress(DecodeError):
            parse(data)


_mutation_targets = st.sampled_from([MINIUPNPD_RESPONSE, MINIUPNPD_ALIVE, MINIUPNPD_BYEBYE])


@settings(max_examples=400, deadline=None)
@given(_mutation_targets, st.integers(0, 600), st.binary(max_size=8), st.integers(0, 8))
def test_mutated_messages_only_decode_error(base: bytes, at: int, insert: bytes, cut: int) -> None:
    data = base[:at] + insert + base[at + cut :]
    try:
        result = ssdp.parse_datagram(data)
    except DecodeError:
        return
    assert isinstance(result, SearchResponse | Notify)


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=80))
def test_arbitrary_locations_only_decode_error(text: str) -> None:
    for candidate in (text, "http://" + text, "http://192.168.77.1" + text):
        try:
            location = _validate(candidate)
        except DecodeError:
            continue
        assert location.host == GATEWAY
        assert location.url.startswith("http://192.168.77.1:")
        # Idempotent: the normalised URL passes the guard unchanged.
        assert _validate(location.url) == location


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(ssdp.DEFAULT_SEARCH_TARGETS), st.integers(-10, 10))
def test_msearch_parses_as_msearch(target: str, mx: int) -> None:
    with pytest.raises(DecodeError, match="not a response"):
        ssdp.parse_datagram(ssdp.build_msearch(target, mx))


# --- the asyncio side: what a search hands on (aio/ssdp.py), and what discovery reports (aio/upnp.py) ---

WHERE = RouterLocation(GATEWAY, IPv4Address("192.168.77.10"), "eth0", LAN)


def _reply(location: str) -> bytes:
    return MINIUPNPD_RESPONSE.replace(b"http://192.168.77.1:5000/rootDesc.xml", location.encode("latin-1"))


def _offered(protocol: aio_ssdp._SearchProtocol) -> list[aio_ssdp.Found | aio_ssdp.Refused]:
    offered = []
    while not protocol.found.empty():
        offered.append(protocol.found.get_nowait())
    return offered


async def test_a_refused_location_is_handed_on_with_its_reason_once() -> None:
    protocol = aio_ssdp._SearchProtocol(WHERE)
    for _ in range(3):  # every search target and retransmission draws the same answer
        protocol.datagram_received(_reply("http://127.0.0.1:5000/rootDesc.xml"), ("192.168.77.1", 1900))
        protocol.datagram_received(MINIUPNPD_RESPONSE, ("192.168.77.1", 1900))
    refused, found = _offered(protocol)
    assert isinstance(refused, aio_ssdp.Refused) and isinstance(found, aio_ssdp.Found)
    assert refused.location == "http://127.0.0.1:5000/rootDesc.xml" and "127.0.0.1" in refused.reason
    assert str(refused.responder) == "192.168.77.1"
    assert found.location.url == "http://192.168.77.1:5000/rootDesc.xml"
    assert sum(count for reason, count in protocol.drops.items() if "LOCATION" in reason) == 1


async def test_what_one_host_and_all_hosts_can_offer_is_bounded() -> None:
    protocol = aio_ssdp._SearchProtocol(WHERE)
    for port in range(2000, 2100):
        protocol.datagram_received(_reply(f"http://192.168.77.66:{port}/d.xml"), ("192.168.77.66", 1900))
    assert len(_offered(protocol)) == upnp_core.MAX_LOCATIONS_PER_RESPONDER
    for host in range(100, 200):  # forged source addresses, one LOCATION each
        protocol.datagram_received(_reply(f"http://192.168.77.{host}:80/d.xml"), (f"192.168.77.{host}", 1900))
    assert len(_offered(protocol)) == upnp_core.MAX_CANDIDATES - upnp_core.MAX_LOCATIONS_PER_RESPONDER
    assert protocol.drops["too many LOCATIONs offered; the rest ignored"] == 96 + 88


async def test_a_location_another_host_points_at_the_gateway_is_fetched_once() -> None:
    protocol = aio_ssdp._SearchProtocol(WHERE)
    protocol.datagram_received(MINIUPNPD_RESPONSE, ("192.168.77.1", 1900))
    protocol.datagram_received(MINIUPNPD_RESPONSE, ("192.168.77.66", 1900))
    assert len(_offered(protocol)) == 1


@given(st.lists(st.tuples(st.integers(1, 254), st.binary(max_size=200)), max_size=60))
@settings(max_examples=150)
def test_whatever_is_offered_the_search_hands_on_a_bounded_printable_list(offers: list[tuple[int, bytes]]) -> None:
    protocol = aio_ssdp._SearchProtocol(WHERE)
    for host, location in offers:
        reply = MINIUPNPD_RESPONSE.replace(b"http://192.168.77.1:5000/rootDesc.xml", location)
        protocol.datagram_received(reply, (f"192.168.77.{host}", 1900))
    offered = _offered(protocol)
    assert len(offered) <= upnp_core.MAX_CANDIDATES
    for item in offered:
        if isinstance(item, aio_ssdp.Refused):
            assert item.location.isprintable() and "\n" not in item.reason
        else:
            assert item.location.host in (item.responder, GATEWAY)


@given(st.text(max_size=300))
def test_untrusted_text_is_quoted_on_one_line(text: str) -> None:
    shown = upnp_core.printable(text)
    assert len(shown) <= upnp_core.SHOWN_LOCATION + 3
    assert len(shown.splitlines()) <= 1 and shown.isprintable()


def test_an_unfinished_candidate_names_the_exchange_that_stalled() -> None:
    candidate = Candidate("http://192.168.77.1:5000/rootDesc.xml", "192.168.77.1", started=10.0)
    done = aio_http.Progress("http://192.168.77.1:5000/rootDesc.xml", 1000, phase=aio_http.DONE)
    stalled = aio_http.Progress("http://192.168.77.1:5000/ctl", 1000, phase=aio_http.WAITING)
    candidate.trace += [done, stalled]
    candidate.unfinished(12.04)
    assert candidate.to_dict() == {
        "location": "http://192.168.77.1:5000/rootDesc.xml",
        "responder": "192.168.77.1",
        "outcome": "unfinished",
        "reason": "http://192.168.77.1:5000/ctl: connected, request sent, no reply, unfinished after 2.0 s",
    }
    candidate.unfinished(20.0)  # settled once: a later cut-off changes nothing
    assert "after 2.0 s" in candidate.reason


def test_the_error_names_the_first_few_candidates_and_counts_the_rest() -> None:
    candidates = [Candidate(f"http://192.168.77.{n}:80/d.xml", f"192.168.77.{n}", 0.0) for n in range(2, 8)]
    candidates[0].settle("refused", "LOCATION points to 127.0.0.1: loopback")
    candidates[1].settle("usable", "fine")
    for candidate in candidates[2:]:
        candidate.settle("failed", f"router's description from {candidate.location} is unusable")
    text = _reasons(candidates)
    assert text.startswith(" (192.168.77.2 offered LOCATION http://192.168.77.2:80/d.xml, refused: LOCATION points")
    assert "fine" not in text and text.endswith("; and 2 more)")
    assert "http://192.168.77.4:80/d.xml: router's" not in text  # the location is named once, not twice
    assert _reasons([]) == ""


def test_a_named_gateway_admits_no_stand_in() -> None:
    """--gateway pins discovery: the CARP leniency (another responder's LOCATION on the gateway, or the
    responder's own host) gives way; only the named gateway, answering for itself, is taken."""
    validate_location = ssdp.validate_location
    net = IPv4Network("192.168.1.0/24")
    gateway, other = IPv4Address("192.168.1.1"), IPv4Address("192.168.1.2")
    url = "http://192.168.1.1:5000/rootDesc.xml"
    assert validate_location(url, responder=gateway, gateway=gateway, local_network=net, pinned=True).host == gateway
    assert validate_location(url, responder=other, gateway=gateway, local_network=net).host == gateway  # CARP
    with pytest.raises(DecodeError, match=r"answered by 192\.168\.1\.2, not the gateway 192\.168\.1\.1 asked for"):
        validate_location(url, responder=other, gateway=gateway, local_network=net, pinned=True)
    with pytest.raises(DecodeError, match=r"LOCATION host 192\.168\.1\.2 is not the gateway"):
        validate_location(
            "http://192.168.1.2/d.xml", responder=gateway, gateway=gateway, local_network=net, pinned=True
        )
