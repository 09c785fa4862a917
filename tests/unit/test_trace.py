"""The wire trace (issue 13, "Logs an admin can use"; issue 14's `doctor --share`): each protocol's
messages, built with the project's own encoders, read back in one line; the caps and the rate limit on a
fake clock; redaction of digest responses and tokens; arbitrary bytes for every protocol never raise and
stay within the cap; nothing at all while it is off; and the shells' hooks on loopback."""

# ruff: noqa: S106  (the passwords here are test values, not secrets)

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import socket
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autonat.aio import trace
from autonat.aio.trace import RECORD_CAP, HttpToken, Tracer
from autonat.daemon import logs
from autonat.doctor import report
from autonat.doctor.findings import Measurements, judge
from autonat.proto import igd, natpmp, pcp, ssdp, stun
from autonat.proto.types import Transport
from autonat.sip.digest import DigestServer, client_authorization
from autonat.sip.message import Headers, Request, Response, make_response

GATEWAY = (IPv4Address("192.168.77.1"), 5351)
STUN_SERVER = (IPv4Address("192.0.2.5"), 3478)
SIP_PEER = ("203.0.113.9", 5073)
LAN = IPv4Address("192.168.77.10")
EXTERNAL = IPv4Address("203.0.113.5")
NONCE = bytes.fromhex("0123456789abcdef01234567")
SERVICE = "urn:schemas-upnp-org:service:WANIPConnection:2"
CONTROL = "http://192.168.77.1:5000/ctl/IPConn"


class Clock:
    """The fake clock the tracer's hooks are driven with."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self, step: float = 0.0) -> float:
        self.now += step
        return self.now


def tracer(protocols: str = "all", **kwargs: Any) -> tuple[Tracer, list[tuple[str, str, dict[str, object]]]]:
    """A tracer logging `protocols` into a list: (protocol, text, fields) per logged record."""
    logged: list[tuple[str, str, dict[str, object]]] = []
    t = Tracer(emit=lambda protocol, text, fields: logged.append((protocol, text, dict(fields))), **kwargs)
    t.set(trace.parse(protocols))
    return t, logged


def texts(logged: list[tuple[str, str, dict[str, object]]]) -> list[str]:
    return [text for _, text, _ in logged]


@pytest.fixture(autouse=True)
def _fresh_trace() -> Iterator[None]:
    """The process's tracer off and empty before and after each test (and its logger as found)."""
    logger = logging.getLogger(trace.LOGGER)
    handlers, propagate = logger.handlers[:], logger.propagate
    trace.reset()
    yield
    trace.reset()
    logger.handlers[:], logger.propagate = handlers, propagate


# --- PCP (RFC 6887) ---------------------------------------------------------------------------------------


def test_a_pcp_map_request_and_its_answer_read_as_one_line_each_with_the_round_trip() -> None:
    t, logged = tracer("pcp")
    request = pcp.Request.new_map(LAN, NONCE, Transport.UDP, 5060, 7200, prefer_failure=True).encode()
    granted = pcp.MapData(NONCE, 17, 5060, 5062, EXTERNAL)
    answer = pcp.Response(2, pcp.Opcode.MAP, pcp.ResultCode.SUCCESS, 7200, 3012, granted).encode()
    t.datagram("->", request, GATEWAY, 10.0, started=10.0)
    t.datagram("<-", answer, GATEWAY, 10.0015)
    assert texts(logged) == [
        "trace pcp -> 192.168.77.1:5351 MAP request lifetime=7200 protocol=udp internal=192.168.77.10:5060"
        " external=0.0.0.0:0 nonce=01234567… options=PREFER_FAILURE",
        "trace pcp <- 192.168.77.1:5351 (1.50 ms) MAP SUCCESS lifetime=7200 epoch=3012 protocol=udp"
        " internal=:5060 external=203.0.113.5:5062 nonce=01234567…",
    ]
    assert logged[1][2] == {"protocol": "pcp", "direction": "<-", "peer": "192.168.77.1:5351", "elapsed_ms": 1.5}
    assert NONCE.hex() not in " ".join(texts(logged))  # the nonce is shown short


def test_pcp_errors_announce_and_version_negotiation_are_named() -> None:
    t, logged = tracer("pcp")
    t.datagram("->", pcp.Request.announce(LAN).encode(), GATEWAY, 1.0)
    refused = pcp.Response(2, pcp.Opcode.MAP, pcp.ResultCode.NOT_AUTHORIZED, 30, 7, None).encode()
    t.datagram("<-", refused, GATEWAY, 1.1)
    t.datagram("<-", b"\x02\x81\x00\x00" + bytes(20), GATEWAY, 1.2)  # a successful MAP without its data
    # A PCP version 1 server names its version (RFC 6887 §9), here on the announcement port.
    t.datagram("<-", bytes([1, 0x81, 0, 1]) + bytes(20), (IPv4Address("192.168.77.1"), 5350), 1.3)
    lines = texts(logged)
    assert lines[0].endswith("ANNOUNCE request lifetime=0 client=192.168.77.10")
    assert "MAP NOT_AUTHORIZED lifetime=30 epoch=7" in lines[1]
    assert "UNSUPP_VERSION: the server speaks version 1" in lines[3]
    assert lines[2] == (
        "trace pcp <- 192.168.77.1:5351 undecodable (PCP MAP response truncated): 24 bytes hex 02810000" + "00" * 20
    )


# --- NAT-PMP (RFC 6886) -------------------------------------------------------------------------------------


def test_nat_pmp_address_map_and_error_replies() -> None:
    t, logged = tracer("natpmp")
    t.datagram("->", natpmp.ExternalAddressRequest().encode(), GATEWAY, 5.0, started=5.0)
    t.datagram("<-", natpmp.ExternalAddressResponse(0, 99, EXTERNAL).encode(), GATEWAY, 5.0002)
    t.datagram("->", natpmp.MapRequest(Transport.TCP, 8080, 0, 3600).encode(), GATEWAY, 6.0, started=5.5, attempt=2)
    t.datagram("<-", natpmp.MapResponse(Transport.TCP, 0, 99, 8080, 8081, 3600).encode(), GATEWAY, 6.0)
    t.datagram("<-", natpmp.ErrorResponse(9, natpmp.ResultCode.UNSUPPORTED_OPCODE, 99).encode(), GATEWAY, 6.1)
    assert texts(logged) == [
        "trace natpmp -> 192.168.77.1:5351 EXTERNAL_ADDRESS request",
        "trace natpmp <- 192.168.77.1:5351 (0.20 ms) EXTERNAL_ADDRESS SUCCESS epoch=99 address=203.0.113.5",
        "trace natpmp -> 192.168.77.1:5351 try 2 MAP_TCP request internal=8080 external=0 lifetime=3600",
        # the elapsed time counts from the request's first transmission, not the retransmission
        "trace natpmp <- 192.168.77.1:5351 (500.00 ms) MAP_TCP SUCCESS epoch=99 internal=8080 external=8081"
        " lifetime=3600",
        "trace natpmp <- 192.168.77.1:5351 opcode 9 UNSUPPORTED_OPCODE epoch=99",
    ]


# --- STUN (RFC 8489, RFC 5780) ------------------------------------------------------------------------------


def test_stun_binding_with_change_request_and_the_answers_addresses() -> None:
    t, logged = tracer("stun")
    tid = bytes(range(12))
    change = stun.Attribute(stun.AttributeType.CHANGE_REQUEST, b"\x00\x00\x00\x06")
    request = stun.StunMessage(stun.MessageClass.REQUEST, stun.Method.BINDING, tid, (change,)).encode()
    other = stun.Attribute(stun.AttributeType.OTHER_ADDRESS, stun.encode_mapped_address(STUN_SERVER[0], 3479).value)
    success = stun.StunMessage(
        stun.MessageClass.SUCCESS,
        stun.Method.BINDING,
        tid,
        (stun.encode_xor_mapped_address(EXTERNAL, 40000, tid), other),
    ).encode()
    error = stun.StunMessage(
        stun.MessageClass.ERROR, stun.Method.BINDING, tid, (stun.encode_error_code(401, "Unauthorized"),)
    ).encode()
    t.datagram("->", request, STUN_SERVER, 1.0)
    t.datagram("<-", success, (STUN_SERVER[0], 3479), 1.004)
    t.datagram("<-", error, STUN_SERVER, 1.005)
    assert texts(logged)[:2] == [
        "trace stun -> 192.0.2.5:3478 Binding request tid=00010203… CHANGE-REQUEST=ip+port",
        "trace stun <- 192.0.2.5:3479 Binding success tid=00010203… XOR-MAPPED-ADDRESS=203.0.113.5:40000"
        " OTHER-ADDRESS=192.0.2.5:3479",
    ]
    assert texts(logged)[2] == (
        "trace stun <- 192.0.2.5:3478 (5.00 ms) Binding error tid=00010203…"
        " ERROR-CODE=401 unauthenticated (the server wants credentials) (Unauthorized)"
    )


# --- SSDP and SOAP (UPnP) ------------------------------------------------------------------------------------


def test_ssdp_search_its_reply_and_a_notify() -> None:
    t, logged = tracer("upnp")
    reply = (
        b"HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nST: urn:schemas-upnp-org:device:InternetGatewayDevice:2\r\n"
        b"USN: uuid:1234::urn:schemas-upnp-org:device:InternetGatewayDevice:2\r\n"
        b"LOCATION: http://192.168.77.1:5000/rootDesc.xml\r\nSERVER: Debian/12 UPnP/1.1 MiniUPnPd/2.3.3\r\n\r\n"
    )
    notify = (
        b"NOTIFY * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nNT: upnp:rootdevice\r\nNTS: ssdp:byebye\r\n"
        b"USN: uuid:1234::upnp:rootdevice\r\n\r\n"
    )
    t.ssdp("->", ssdp.build_msearch(ssdp.ST_IGD2, host="192.168.77.1:1900"), ("192.168.77.1", 1900), 2.0)
    t.ssdp("<-", reply, ("192.168.77.1", 1900), 2.0009)
    t.ssdp("<-", notify, ("192.168.77.1", 1900), 2.5)
    t.ssdp("<-", b"HTTP/1.1 200 OK\r\nST: x\r\n\r\n", ("192.168.77.66", 1900), 2.6)
    t.ssdp("->", ssdp.build_msearch(ssdp.ST_ALL), ("239.255.255.250", 1900), 3.0)
    t.ssdp("<-", reply.replace(b"InternetGatewayDevice:2\r\nUSN", b"WANDevice:2\r\nUSN"), ("192.168.77.1", 1900), 3.002)
    assert texts(logged)[:3] == [
        "trace upnp -> 192.168.77.1:1900 M-SEARCH * HTTP/1.1 ST=urn:schemas-upnp-org:device:InternetGatewayDevice:2"
        " MX=1 HOST=192.168.77.1:1900",
        "trace upnp <- 192.168.77.1:1900 (0.90 ms) HTTP/1.1 200 OK"
        " ST=urn:schemas-upnp-org:device:InternetGatewayDevice:2 LOCATION=http://192.168.77.1:5000/rootDesc.xml"
        " SERVER=Debian/12 UPnP/1.1 MiniUPnPd/2.3.3 USN=uuid:1234::urn:schemas-upnp-org:device:InternetGatewayDevice:2",
        "trace upnp <- 192.168.77.1:1900 NOTIFY * HTTP/1.1 NT=upnp:rootdevice NTS=ssdp:byebye"
        " USN=uuid:1234::upnp:rootdevice",
    ]
    assert texts(logged)[3] == (
        "trace upnp <- 192.168.77.66:1900 undecodable (SSDP: SSDP response has no LOCATION header): 26 bytes"
        ' "HTTP/1.1 200 OK\\r\\nST: x\\r\\n\\r\\n"'
    )
    # an answer to ssdp:all names its own target: timed from the ssdp:all search
    assert "(2.00 ms) HTTP/1.1 200 OK ST=urn:schemas-upnp-org:device:WANDevice:2 " in texts(logged)[5]


def soap_reply(action: str, outputs: dict[str, str]) -> bytes:
    args = "".join(f"<{k}>{v}</{k}>" for k, v in outputs.items())
    return (
        f'<?xml version="1.0"?><s:Envelope xmlns:s="{igd.SOAP_ENVELOPE}"><s:Body>'
        f'<u:{action}Response xmlns:u="{SERVICE}">{args}</u:{action}Response></s:Body></s:Envelope>'
    ).encode()


def soap_fault(code: int, description: str) -> bytes:
    return (
        f'<?xml version="1.0"?><s:Envelope xmlns:s="{igd.SOAP_ENVELOPE}"><s:Body><s:Fault>'
        "<faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>"
        f'<UPnPError xmlns="urn:schemas-upnp-org:control-1-0"><errorCode>{code}</errorCode>'
        f"<errorDescription>{description}</errorDescription></UPnPError></detail></s:Fault></s:Body></s:Envelope>"
    ).encode()


def test_soap_actions_their_arguments_out_arguments_and_faults() -> None:
    t, logged = tracer("upnp")
    peer = ("192.168.77.1", 5000)
    get = igd.get_external_ip_address(SERVICE)
    token = t.http_request("POST", CONTROL, get.headers(), get.body(), peer, 3.0)
    assert token is not None
    t.http_reply(token, 200, soap_reply("GetExternalIPAddress", {"NewExternalIPAddress": str(EXTERNAL)}), 3.0006)
    add = igd.add_port_mapping(
        SERVICE,
        external_port=5060,
        transport=Transport.UDP,
        internal_port=5060,
        internal_client=str(LAN),
        description="autonat:1a2b sip",
        lease=3600,
    )
    token = t.http_request("POST", CONTROL, add.headers(), add.body(), peer, 4.0)
    assert token is not None
    t.http_reply(token, 500, soap_fault(718, "ConflictInMappingEntry"), 4.001)
    token = t.http_request("POST", CONTROL, get.headers(), get.body(), peer, 5.0)
    assert token is not None
    t.http_error(token, TimeoutError("router did not answer within 2 s"), 7.0)
    lines = texts(logged)
    assert lines[0] == (f"trace upnp -> 192.168.77.1:5000 POST {CONTROL} SOAPAction={SERVICE}#GetExternalIPAddress")
    assert lines[1] == (
        "trace upnp <- 192.168.77.1:5000 (0.60 ms) HTTP 200 GetExternalIPAddressResponse"
        " NewExternalIPAddress=203.0.113.5"
    )
    assert lines[2] == (
        f"trace upnp -> 192.168.77.1:5000 POST {CONTROL} SOAPAction={SERVICE}#AddPortMapping NewRemoteHost="
        " NewExternalPort=5060 NewProtocol=UDP NewInternalPort=5060 NewInternalClient=192.168.77.10"
        " NewEnabled=1 NewPortMappingDescription=autonat:1a2b sip NewLeaseDuration=3600"
    )
    assert lines[3] == (
        "trace upnp <- 192.168.77.1:5000 (1.00 ms) HTTP 500 fault 718 ConflictInMappingEntry: ConflictInMappingEntry"
    )
    assert lines[5] == (
        "trace upnp <- 192.168.77.1:5000 (2000.00 ms) GetExternalIPAddress failed: router did not answer within 2 s"
    )


def test_a_description_fetch_names_the_device() -> None:
    t, logged = tracer("upnp")
    body = (
        b'<?xml version="1.0"?><root xmlns="urn:schemas-upnp-org:device-1-0"><device>'
        b"<deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:2</deviceType>"
        b"<friendlyName>Lab router</friendlyName><manufacturer>Debian</manufacturer><modelName>MiniUPnPd</modelName>"
        b"<UDN>uuid:1</UDN><deviceList><device><deviceType>urn:schemas-upnp-org:device:WANDevice:2</deviceType>"
        b"<UDN>uuid:2</UDN><deviceList><device><deviceType>urn:schemas-upnp-org:device:WANConnectionDevice:2"
        b"</deviceType><UDN>uuid:3</UDN><serviceList><service><serviceType>"
        + SERVICE.encode()
        + b"</serviceType><serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId><controlURL>/ctl/IPConn</controlURL>"
        b"<SCPDURL>/WANIPCn.xml</SCPDURL><eventSubURL>/evt/IPConn</eventSubURL></service></serviceList>"
        b"</device></deviceList></device></deviceList></device></root>"
    )
    url = "http://192.168.77.1:5000/rootDesc.xml"
    token = t.http_request("GET", url, {}, b"", ("192.168.77.1", 5000), 1.0)
    assert token is not None
    t.http_reply(token, 200, body, 1.002)
    t.http_reply(token, 404, b"<html>not here</html>", 1.003)
    scpd = (
        b'<?xml version="1.0"?><scpd xmlns="urn:schemas-upnp-org:service-1-0"><actionList>'
        b"<action><name>GetExternalIPAddress</name></action><action><name>AddPortMapping</name></action>"
        b"</actionList></scpd>"
    )
    t.http_reply(token, 200, scpd, 1.004)
    assert texts(logged)[0] == f"trace upnp -> 192.168.77.1:5000 GET {url}"
    assert texts(logged)[1].endswith(
        f"(2.00 ms) HTTP 200 {len(body)} bytes: Lab router (Debian MiniUPnPd) WAN services: WANIPConnection:2"
    )
    assert texts(logged)[2].endswith('HTTP 404 21 bytes "<html>not here</html>"')
    assert texts(logged)[3].endswith(
        f"HTTP 200 {len(scpd)} bytes: service description, 2 actions: AddPortMapping, GetExternalIPAddress"
    )


# --- SIP (RFC 3261) ------------------------------------------------------------------------------------------


def register(authorization: str | None = None, cseq: int = 1) -> Request:
    pairs = [
        ("Via", "SIP/2.0/UDP 203.0.113.9:5073;branch=z9hG4bK-1;rport"),
        ("From", "<sip:105@203.0.113.5>;tag=a1"),
        ("To", "<sip:105@203.0.113.5>"),
        ("Call-ID", "reg-1@203.0.113.9"),
        ("CSeq", f"{cseq} REGISTER"),
        ("Contact", "<sip:105@203.0.113.9:5073>"),
        ("Expires", "60"),
        ("Max-Forwards", "70"),
    ]
    if authorization is not None:
        pairs.append(("Authorization", authorization))
    return Request("REGISTER", "sip:203.0.113.5", "SIP/2.0", Headers.of(*pairs))


def digest_exchange() -> tuple[Response, Request, str, str]:
    """A 401 challenge and the REGISTER answering it, with the digest response and cnonce it carries."""
    server = DigestServer("autonat", b"0123456789abcdef0123456789abcdef")
    challenge = server.challenge(1000.0)
    unauthorized = make_response(
        register(), 401, to_tag="t1", extra_headers=[("WWW-Authenticate", challenge.header_value())]
    )
    cnonce = "c0ffee0123456789"
    value = client_authorization(
        challenge, method="REGISTER", uri="sip:203.0.113.5", username="105", password="pw105", cnonce=cnonce
    )
    response = re.search(r'response="([0-9a-f]+)"', value)
    assert response is not None
    return unauthorized, register(value, cseq=2), response[1], cnonce


def test_a_digest_register_reads_in_order_and_never_shows_the_response_or_cnonce() -> None:
    t, logged = tracer("sip")
    unauthorized, authorized, digest, cnonce = digest_exchange()
    t.sip("<-", register().serialize(), "udp", SIP_PEER, 1.0)  # a datagram: raw bytes
    t.sip("->", unauthorized, "udp", SIP_PEER, 1.0004)
    t.sip("<-", authorized, "tcp", SIP_PEER, 1.1)  # a stream: the framed message
    t.sip("->", make_response(authorized, 200, to_tag="t2"), "tcp", SIP_PEER, 1.1012)
    lines = texts(logged)
    assert lines[0] == (
        "trace sip <- 203.0.113.9:5073 udp REGISTER sip:203.0.113.5 SIP/2.0"
        " | Via: SIP/2.0/UDP 203.0.113.9:5073;branch=z9hG4bK-1;rport | From: <sip:105@203.0.113.5>;tag=a1"
        " | To: <sip:105@203.0.113.5> | Call-ID: reg-1@203.0.113.9 | CSeq: 1 REGISTER"
        " | Contact: <sip:105@203.0.113.9:5073> | Expires: 60"
    )
    assert lines[1].startswith("trace sip -> 203.0.113.9:5073 udp (0.40 ms) SIP/2.0 401 Unauthorized | Via: ")
    assert 'WWW-Authenticate: Digest realm="autonat", nonce="' in lines[1]
    assert "response=<redacted>" in lines[2] and "cnonce=<redacted>" in lines[2]
    assert 'username="105"' in lines[2] and "CSeq: 2 REGISTER" in lines[2]
    assert lines[3].startswith("trace sip -> 203.0.113.9:5073 tcp (1.20 ms) SIP/2.0 200 OK")
    everything = "\n".join(lines + list(t.ring))
    assert digest not in everything and cnonce not in everything


def test_an_invite_shows_its_sdp_media_lines() -> None:
    t, logged = tracer("sip")
    sdp = (
        b"v=0\r\no=- 1 1 IN IP4 203.0.113.9\r\ns=-\r\nc=IN IP4 203.0.113.9\r\nt=0 0\r\n"
        b"m=audio 6100 RTP/AVP 0 8\r\na=rtpmap:0 PCMU/8000\r\n"
    )
    headers = Headers.of(
        ("Via", "SIP/2.0/UDP 203.0.113.9:5073;branch=z9hG4bK-2"),
        ("From", "<sip:caller@203.0.113.9>;tag=x"),
        ("To", "<sip:9196@203.0.113.5>"),
        ("Call-ID", "call-1"),
        ("CSeq", "1 INVITE"),
        ("Content-Type", "application/sdp"),
    )
    t.sip("<-", Request("INVITE", "sip:9196@203.0.113.5", "SIP/2.0", headers, sdp), "udp", SIP_PEER, 1.0)
    assert texts(logged)[0].endswith(" | SDP c=IN IP4 203.0.113.9 m=audio 6100 RTP/AVP 0 8")


def test_a_digest_response_in_an_undecodable_message_is_redacted_too() -> None:
    t, logged = tracer("sip")
    digest = "5d41402abc4b2a76b9719d911017c592"
    garbage = (
        b'REGISTER sip:x SIP/2.0\r\nAuthorization: Digest username="a", response="'
        + digest.encode()
        + b'", cnonce="abcd"\r\nCSeq: nonsense\r\n\r\n'
    )
    t.sip("<-", garbage, "udp", SIP_PEER, 1.0)
    t.sip("<-", garbage[:60], "udp", SIP_PEER, 1.1)  # cut inside the value: what is left is redacted
    everything = "\n".join(texts(logged))
    assert "undecodable" in everything or "malformed" in everything
    assert digest not in everything and digest[:8] not in everything
    assert "abcd" not in everything


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            'Digest username="a", response="0123abcd", cnonce="xyz"',
            'Digest username="a", response=<redacted>, cnonce=<redacted>',
        ),
        ("GET /api?token=s3cret&x=1", "GET /api?token=<redacted>&x=1"),
        ('{"password": "hunter2"}', '{"password": <redacted>}'),
        ("NewPassword=abc NewAuthToken=def", "NewPassword=<redacted> NewAuthToken=<redacted>"),
        ("<NewPassword>abc</NewPassword>", "<NewPassword><redacted></NewPassword>"),
        (
            "GetExternalIPAddressResponse NewExternalIPAddress=1.2.3.4",
            "GetExternalIPAddressResponse NewExternalIPAddress=1.2.3.4",
        ),
        ('response="cut in the midd', "response=<redacted>"),
    ],
)
def test_redaction(text: str, expected: str) -> None:
    assert trace.redact(text) == expected


# --- the caps --------------------------------------------------------------------------------------------


def test_a_record_is_cut_at_the_cap_with_a_mark_saying_how_much() -> None:
    t, logged = tracer("sip")
    long_value = "x" * 5000
    headers = Headers.of(
        *(("Via", f"SIP/2.0/UDP h{i}.example;branch=z9hG4bK{long_value}") for i in range(5)),
        *((name, f"<sip:{long_value}@example>") for name in ("From", "To", "Contact")),
        ("Call-ID", long_value),
        ("CSeq", "1 INVITE"),
        *((name, f"Digest realm={long_value}") for name in ("Authorization", "Proxy-Authorization")),
        ("Content-Type", "application/sdp"),
    )
    sdp = "".join(f"m=audio {port} RTP/AVP {long_value}\r\n" for port in range(10)).encode()
    t.sip("<-", Request("INVITE", "sip:" + long_value, "SIP/2.0", headers, sdp), "udp", SIP_PEER, 1.0)
    record = texts(logged)[0]
    assert len(record.encode()) <= RECORD_CAP
    assert re.search(r"…\[cut \d+ bytes\]$", record)
    assert record.startswith("trace sip <- 203.0.113.9:5073 udp INVITE sip:xxx")  # the head survives
    assert "(+2 Via)" in record  # every value was bounded on its own first


def test_the_rate_cap_counts_what_it_drops_and_says_so_once_a_second() -> None:
    clock = Clock()
    t, logged = tracer("natpmp,pcp", rate=200)
    request = natpmp.ExternalAddressRequest().encode()
    for _ in range(250):  # 250 in half a second: 200 recorded, 50 suppressed
        t.datagram("->", request, GATEWAY, clock(0.002))
    t.datagram("->", pcp.Request.announce(LAN).encode(), GATEWAY, clock(0.0))  # PCP has its own budget
    assert len(logged) == 201
    assert not any("suppressed" in text for text in texts(logged))
    t.datagram("->", request, GATEWAY, clock(0.6))  # a new second: the count first, then the record
    assert texts(logged)[-2:] == [
        "trace: 50 natpmp records suppressed (over 200 a second)",
        "trace natpmp -> 192.168.77.1:5351 EXTERNAL_ADDRESS request",
    ]
    assert logged[-2][2] == {"protocol": "natpmp", "suppressed": 50}
    for _ in range(300):
        t.datagram("->", request, GATEWAY, clock(0.001))
    assert t.records(clock(5.0))[-1].endswith("trace: 101 natpmp records suppressed (over 200 a second)")


def test_a_sip_flood_is_counted_not_parsed_past_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    from autonat.sip import message

    parses = 0
    real = message.parse_message

    def counting(data: bytes) -> Any:
        nonlocal parses
        parses += 1
        return real(data)

    monkeypatch.setattr(message, "parse_message", counting)
    t, logged = tracer("sip")
    datagram = register().serialize()
    for _ in range(1000):
        t.sip("<-", datagram, "udp", SIP_PEER, 7.0)
    assert (len(logged), parses) == (200, 200)
    assert t.records(8.5)[-1].endswith("trace: 800 sip records suppressed (over 200 a second)")


def test_the_ring_keeps_the_last_records_only() -> None:
    clock = Clock()
    t, _ = tracer("natpmp", ring_size=5)
    for port in range(1, 11):
        t.datagram("->", natpmp.MapRequest(Transport.UDP, port, 0, 60).encode(), GATEWAY, clock(0.01))
    ring = t.records(clock())
    assert len(ring) == 5
    assert [int(re.search(r"internal=(\d+)", line)[1]) for line in ring] == [6, 7, 8, 9, 10]  # type: ignore[index]
    assert ring[0].startswith("+0.050s trace natpmp -> ")


def test_kept_protocols_go_to_the_ring_only() -> None:
    t, logged = tracer("sip")
    t.set(["sip"], ["pcp"])
    t.datagram("->", pcp.Request.announce(LAN).encode(), GATEWAY, 1.0)
    assert logged == []
    assert len(t.records(1.0)) == 1


# --- untrusted input: never an exception, always within the cap ----------------------------------------------


@settings(max_examples=300)
@given(data=st.binary(max_size=1200), port=st.sampled_from([5351, 5350, 3478, 3479, 40000]), incoming=st.booleans())
def test_any_datagram_reads_as_a_bounded_record(data: bytes, port: int, incoming: bool) -> None:
    t, logged = tracer()
    t.datagram("<-" if incoming else "->", data, (IPv4Address("192.168.77.1"), port), 1.0)
    t.ssdp("<-" if incoming else "->", data, ("192.168.77.1", 1900), 1.0)
    t.sip("<-" if incoming else "->", data, "udp", SIP_PEER, 1.0)
    assert len(logged) == 3
    assert all(len(text.encode()) <= RECORD_CAP and "\n" not in text and "\r" not in text for text in texts(logged))
    assert t.internal_errors == 0


@settings(max_examples=200)
@given(
    body=st.binary(max_size=3000),
    status=st.integers(100, 599),
    action=st.sampled_from(["", "GetExternalIPAddress", "Add Port<Mapping>", "#"]),
)
def test_any_http_reply_reads_as_a_bounded_record(body: bytes, status: int, action: str) -> None:
    t, logged = tracer("upnp")
    headers = {"SOAPAction": f'"{SERVICE}#{action}"'} if action else {}
    token = t.http_request("POST", CONTROL, headers, body, ("192.168.77.1", 5000), 1.0)
    assert token is not None
    t.http_reply(token, status, body, 1.1)
    assert len(logged) == 2
    assert all(len(text.encode()) <= RECORD_CAP and "\n" not in text for text in texts(logged))
    assert t.internal_errors == 0


@settings(max_examples=100)
@given(text=st.text(max_size=3000))
def test_any_sip_looking_text_is_redacted_and_bounded(text: str) -> None:
    t, logged = tracer("sip")
    digest = "0badc0ffee0badc0ffee0badc0ffee00"
    data = f'REGISTER sip:a SIP/2.0\r\nAuthorization: Digest response="{digest}"\r\n{text}'.encode(errors="replace")
    t.sip("<-", data, "udp", SIP_PEER, 1.0)
    record = texts(logged)[0]
    assert digest[:8] not in record and len(record.encode()) <= RECORD_CAP


# --- the module's API: off by default, configure, pin, logging ------------------------------------------------


def test_off_means_no_record_and_no_log(caplog: pytest.LogCaptureFixture) -> None:
    assert trace.ON is False and not any(trace.enabled(p) for p in trace.PROTOCOLS)
    with caplog.at_level(logging.DEBUG):
        trace.datagram_sent(natpmp.ExternalAddressRequest().encode(), GATEWAY)
        trace.sip_received(register().serialize(), "udp", SIP_PEER)
        trace.ssdp_sent(ssdp.build_msearch(ssdp.ST_ALL), ("239.255.255.250", 1900))
        assert trace.http_sent("GET", "http://192.168.77.1/", {}, b"", ("192.168.77.1", 80)) is None
    assert trace.records() == []
    assert caplog.records == []


def test_configure_names_the_valid_protocols_for_an_unknown_one_and_changes_nothing() -> None:
    trace.configure(["pcp"])
    with pytest.raises(ValueError, match=r"^unknown trace protocol 'upnpp': use pcp, natpmp, upnp, stun, sip or all$"):
        trace.configure(["sip", "upnpp"])
    assert trace.enabled("pcp") and not trace.enabled("sip")
    trace.configure("all")
    assert all(trace.enabled(p) for p in trace.PROTOCOLS)
    trace.configure("natpmp, SIP")
    assert {p for p in trace.PROTOCOLS if trace.enabled(p)} == {"natpmp", "sip"}


def test_a_reload_keeps_the_ring_and_the_command_line_s_protocols() -> None:
    trace.pin("sip")  # autonat run --trace sip
    trace.configure(["pcp"])  # [log] trace = ["pcp"] at start
    trace.datagram_sent(pcp.Request.announce(LAN).encode(), GATEWAY)
    trace.configure([])  # a reload that drops [log] trace
    assert trace.ON and trace.enabled("sip") and not trace.enabled("pcp")
    assert len(trace.records()) == 1  # what was traced before the reload is still there
    trace.pin([])
    assert trace.ON is False


def test_records_go_through_logging_in_the_daemon_s_formats_whatever_the_level() -> None:
    stream = io.StringIO()
    logs.configure("error", "json", stream=stream)  # --log-level error: trace records still show
    try:
        trace.configure(["natpmp"])
        trace.datagram_sent(natpmp.ExternalAddressRequest().encode(), GATEWAY)
        line = json.loads(stream.getvalue().splitlines()[-1])
        assert line["level"] == "debug" and line["logger"] == "autonat.trace"
        assert (line["protocol"], line["direction"], line["peer"]) == ("natpmp", "->", "192.168.77.1:5351")
        assert line["message"] == "trace natpmp -> 192.168.77.1:5351 EXTERNAL_ADDRESS request"
        text = io.StringIO()
        logs.trace_output("text", stream=text, environ={})  # a one-shot command: the trace alone, on stderr
        trace.datagram_sent(natpmp.ExternalAddressRequest().encode(), GATEWAY)
        assert re.fullmatch(
            r"\d{4}-\d\d-\d\dT[\d:.]+[+-]\d\d:\d\d autonat\[\d+\]: DEBUG trace natpmp -> 192\.168\.77\.1:5351"
            r" EXTERNAL_ADDRESS request\n",
            text.getvalue(),
        )
    finally:
        root = logging.getLogger("autonat")
        root.handlers.clear()
        root.setLevel(logging.NOTSET)
        root.propagate = True


def test_doctor_share_attaches_the_trace_fenced_and_masked() -> None:
    trace.configure([], keep="all")
    trace.datagram_received(natpmp.ExternalAddressResponse(0, 9, EXTERNAL).encode(), GATEWAY)
    trace.datagram_received(b"``` not a fence `````", GATEWAY)
    m = Measurements(gateway="192.168.77.1", local_address=str(LAN), external_ip=str(EXTERNAL))
    findings = judge(m)
    shared = report.share(m, findings, trace=trace.records())
    section = shared[shared.index("## Wire trace") :]
    assert "EXTERNAL_ADDRESS SUCCESS epoch=9 address=x.x.x.x" in section
    assert report.masked(shared, str(EXTERNAL))
    assert "\n``````text\n" in section and section.endswith("``````\n")  # longer than any run inside
    shown = report.share(m, findings, show_address=True, trace=trace.records())
    assert f"address={EXTERNAL}" in shown
    assert "## Wire trace" not in report.share(m, findings)  # a library caller without a trace


# --- the shells' hooks, on loopback ---------------------------------------------------------------------------


async def test_the_channel_traces_nat_pmp_and_pcp_against_a_fake_router(tmp_path: Path) -> None:
    import os

    from autonat.aio.channel import DatagramChannel
    from autonat.aio.natpmp import NatPmpClient
    from autonat.aio.pcp import PcpClient
    from autonat.aio.router import reply_key
    from autonat.mapper import MappingRequest
    from tests.fakes.pcp_natpmp_router import start_fake_router

    os.environ["AUTONAT_STATE_DIR"] = str(tmp_path)
    trace.configure(["natpmp", "pcp"])
    router, port = await start_fake_router()
    loopback = IPv4Address("127.0.0.1")
    channel = await DatagramChannel.open(loopback, reply_key)
    try:
        async with asyncio.timeout(10):
            await NatPmpClient(channel, loopback, loopback, deadline=1.0, port=port).external_address()
            client = PcpClient(channel, loopback, loopback, b"s" * 32, deadline=1.0, port=port)
            await client.add(MappingRequest(Transport.UDP, 5070, lifetime=600))
    finally:
        channel.close()
        router.transport.close()  # type: ignore[union-attr]
        del os.environ["AUTONAT_STATE_DIR"]
    lines = "\n".join(trace.records())
    assert f"trace natpmp -> 127.0.0.1:{port} EXTERNAL_ADDRESS request" in lines
    assert re.search(rf"trace natpmp <- 127\.0\.0\.1:{port} \([\d.]+ ms\) EXTERNAL_ADDRESS SUCCESS", lines)
    assert re.search(
        rf"trace pcp <- 127\.0\.0\.1:{port} \([\d.]+ ms\) MAP SUCCESS lifetime=600 .* internal=:5070", lines
    )


async def test_http_traces_a_soap_call_to_a_fake_igd(tmp_path: Path) -> None:
    from autonat.aio import http
    from tests.fakes.igd_server import SERVICE as FAKE_SERVICE
    from tests.fakes.igd_server import FakeIgd

    trace.configure(["upnp"])
    fake = FakeIgd("normal", "127.0.0.1", str(tmp_path / "igd.log"), external="203.0.113.9")
    server = await asyncio.start_server(fake.http, "127.0.0.1", 0)
    fake.port = server.sockets[0].getsockname()[1]
    get = igd.get_external_ip_address(FAKE_SERVICE)
    url = f"http://127.0.0.1:{fake.port}/ctl/IPConn"
    try:
        async with asyncio.timeout(10):
            await http.request("POST", url, max_body=65536, deadline=2, headers=get.headers(), content=get.body())
            with pytest.raises(http.RouterHttpError):
                await http.request("GET", f"http://127.0.0.1:{_closed_port()}/x", max_body=100, deadline=2)
    finally:
        server.close()
        await server.wait_closed()
    lines = trace.records()
    assert lines[0].endswith(
        f"trace upnp -> 127.0.0.1:{fake.port} POST {url} SOAPAction={FAKE_SERVICE}#GetExternalIPAddress"
    )
    assert re.search(
        r"\([\d.]+ ms\) HTTP 200 GetExternalIPAddressResponse NewExternalIPAddress=203\.0\.113\.9$", lines[1]
    )
    assert "refused the connection" in lines[3]


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_ssdp_traces_the_search_and_a_reply() -> None:
    from autonat.aio.route import RouterLocation
    from autonat.aio.ssdp import search

    trace.configure(["upnp"])
    loopback = IPv4Address("127.0.0.1")
    async with asyncio.timeout(5), search(RouterLocation(loopback, loopback, "lo")) as protocol:
        protocol.datagram_received(
            b"HTTP/1.1 200 OK\r\nST: upnp:rootdevice\r\nLOCATION: http://127.0.0.1:1/\r\n\r\n", ("127.0.0.1", 1900)
        )
    lines = trace.records()
    assert any("trace upnp -> 127.0.0.1:1900 M-SEARCH * HTTP/1.1 ST=" in line for line in lines)
    received = r"trace upnp <- 127\.0\.0\.1:1900 \([\d.]+ ms\) HTTP/1\.1 200 OK ST=upnp:rootdevice LOCATION="
    assert any(re.search(received, line) for line in lines), lines


async def test_the_sip_transport_traces_what_it_receives_and_sends() -> None:
    from autonat.service.transport import SipTransport

    trace.configure(["sip"])
    replies: list[bytes] = []

    def answer(message: object, peer: Any) -> None:
        if isinstance(message, Request):
            transport.send(make_response(message, 200), peer)

    transport = SipTransport("127.0.0.1", 0, answer, tcp=False)
    # port 0 for UDP: bind, then read the port back
    await transport.start()
    try:
        port = transport._udp.get_extra_info("sockname")[1]  # type: ignore[union-attr]
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.bind(("127.0.0.1", 0))
            client.setblocking(False)
            client.sendto(register().serialize(), ("127.0.0.1", port))
            async with asyncio.timeout(5):
                replies.append(await loop.sock_recv(client, 65536))
            client_port = client.getsockname()[1]
    finally:
        await transport.stop()
    assert replies and replies[0].startswith(b"SIP/2.0 200")
    lines = trace.records()
    assert f"trace sip <- 127.0.0.1:{client_port} udp REGISTER sip:203.0.113.5 SIP/2.0" in lines[0]
    assert re.search(rf"trace sip -> 127\.0\.0\.1:{client_port} udp \([\d.]+ ms\) SIP/2\.0 200 OK", lines[1])


def test_http_token_is_all_a_reply_needs() -> None:
    t, logged = tracer("upnp")
    t.http_reply(HttpToken("http://x/", "192.168.77.1:80", "", "", 1.0), 204, b"", 1.5)
    assert texts(logged) == ["trace upnp <- 192.168.77.1:80 (500.00 ms) HTTP 204 0 bytes"]


@pytest.mark.parametrize("command", [["probe"], ["map", "add", "5060", "udp"], ["doctor"], ["run"]])
def test_an_unknown_trace_protocol_is_one_line_naming_the_valid_ones(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from autonat.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main.main([*command, "--trace", "pcp,sipp"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "unknown trace protocol 'sipp': use pcp, natpmp, upnp, stun, sip or all" in err
    assert trace.ON is False  # refused before anything was switched on
