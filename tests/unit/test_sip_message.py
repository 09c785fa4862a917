"""SIP message codec: real messages (SIPp, softphones), RFC 4475-style torture cases, response building,
TCP framing, caps that hold before heavy work, and fuzzing: a value or DecodeError, nothing else."""

from __future__ import annotations

import random
import time
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from autonat.proto.errors import DecodeError
from autonat.sip.message import (
    KEEPALIVE,
    MAX_TCP_MESSAGE,
    MAX_UDP_MESSAGE,
    BadRequest,
    Headers,
    KeepAlive,
    Request,
    Response,
    StreamParser,
    make_response,
    parse_message,
    with_received,
)

SDP = (
    b"v=0\r\n"
    b"o=user1 53655765 2353687637 IN IP4 127.0.0.1\r\n"
    b"s=-\r\n"
    b"c=IN IP4 127.0.0.1\r\n"
    b"t=0 0\r\n"
    b"m=audio 6000 RTP/AVP 0\r\n"
    b"a=rtpmap:0 PCMU/8000\r\n"
)


def msg(*lines: str, body: bytes = b"", eol: str = "\r\n") -> bytes:
    """A message from its head lines; `{len}` in a line becomes the body length."""
    head = eol.join(line.replace("{len}", str(len(body))) for line in lines)
    return (head + eol + eol).encode() + body


# SIPp's default uac scenario (sipp -sn uac), as it leaves the wire.
SIPP_INVITE = msg(
    "INVITE sip:service@192.0.2.10:5060 SIP/2.0",
    "Via: SIP/2.0/UDP 10.0.0.5:5061;branch=z9hG4bK-4242-1-0",
    "From: sipp <sip:sipp@10.0.0.5:5061>;tag=4242SIPpTag001",
    "To: service <sip:service@192.0.2.10:5060>",
    "Call-ID: 1-4242@10.0.0.5",
    "CSeq: 1 INVITE",
    "Contact: sip:sipp@10.0.0.5:5061",
    "Max-Forwards: 70",
    "Subject: Performance Test",
    "Content-Type: application/sdp",
    "Content-Length:   {len}",
    body=SDP,
)
REGISTER = msg(
    "REGISTER sip:example.com SIP/2.0",
    "Via: SIP/2.0/UDP 10.0.0.7:5060;rport;branch=z9hG4bKnashds7",
    "Max-Forwards: 70",
    'From: "Bob" <sip:bob@example.com>;tag=456248',
    "To: Bob <sip:bob@example.com>",
    "Call-ID: 843817637684230@998sdasdh09",
    "CSeq: 1826 REGISTER",
    "Contact: <sip:bob@10.0.0.7:5060;transport=udp>;expires=3600",
    'Authorization: Digest username="bob", realm="example.com", nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093",'
    ' uri="sip:example.com", response="6629fae49393a05397450978507c4ef1", algorithm=MD5',
    "Content-Length: 0",
)
OK_200 = msg(
    "SIP/2.0 200 OK",
    "Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKbye1;received=192.0.2.10",
    "From: <sip:service@192.0.2.10>;tag=srv1",
    "To: sipp <sip:sipp@10.0.0.5:5061>;tag=4242SIPpTag001",
    "Call-ID: 1-4242@10.0.0.5",
    "CSeq: 1 BYE",
    "Content-Length: 0",
)
TRYING = msg(
    "SIP/2.0 100 Trying",
    "Via: SIP/2.0/UDP 10.0.0.5:5061;branch=z9hG4bK-4242-1-0",
    "From: sipp <sip:sipp@10.0.0.5:5061>;tag=4242SIPpTag001",
    "To: service <sip:service@192.0.2.10:5060>",
    "Call-ID: 1-4242@10.0.0.5",
    "CSeq: 1 INVITE",
    "Content-Length: 0",
)
ACK = msg(
    "ACK sip:service@192.0.2.10:5060 SIP/2.0",
    "Via: SIP/2.0/UDP 10.0.0.5:5061;branch=z9hG4bK-4242-1-5",
    "From: sipp <sip:sipp@10.0.0.5:5061>;tag=4242SIPpTag001",
    "To: service <sip:service@192.0.2.10:5060>;tag=srv1",
    "Call-ID: 1-4242@10.0.0.5",
    "CSeq: 1 ACK",
    "Contact: sip:sipp@10.0.0.5:5061",
    "Max-Forwards: 70",
    "Content-Length: 0",
)
BYE = ACK.replace(b"ACK sip", b"BYE sip").replace(b"1 ACK", b"2 BYE").replace(b"-1-5", b"-1-7")
OPTIONS = msg(
    "OPTIONS sip:192.0.2.10 SIP/2.0",
    "Via: SIP/2.0/TCP [2001:db8::1]:5060;branch=z9hG4bKopt;rport",
    "Max-Forwards: 70",
    "To: <sip:192.0.2.10>",
    "From: <sip:probe@[2001:db8::1]>;tag=p1",
    "Call-ID: opt-1",
    "CSeq: 9 OPTIONS",
    "Accept: application/sdp",
    "Content-Length: 0",
)
SEEDS = [SIPP_INVITE, REGISTER, OK_200, TRYING, ACK, BYE, OPTIONS]


def parse_request(data: bytes) -> Request:
    message = parse_message(data)
    assert isinstance(message, Request)
    return message


def parse_response(data: bytes) -> Response:
    message = parse_message(data)
    assert isinstance(message, Response)
    return message


# --------------------------------------------------------------------------------------------- known messages


def test_sipp_invite() -> None:
    request = parse_request(SIPP_INVITE)
    assert (request.method, request.uri, request.version) == ("INVITE", "sip:service@192.0.2.10:5060", "SIP/2.0")
    assert request.body == SDP
    assert request.cseq() == (1, "INVITE")
    assert request.call_id() == "1-4242@10.0.0.5"
    assert request.from_tag() == "4242SIPpTag001"
    assert request.to_tag() is None
    assert request.max_forwards() == 70
    assert request.content_length() == len(SDP)
    assert request.headers.get("content-type") == "application/sdp"
    assert request.headers.get("Content-Length") == str(len(SDP))
    via = request.top_via()
    assert (via.transport, via.host, via.port, via.branch) == ("UDP", "10.0.0.5", 5061, "z9hG4bK-4242-1-0")
    assert via.has_magic_cookie
    assert via.rport is None and via.received is None
    # Re-serializing gives SIPp's bytes back but for the padding in "Content-Length:   129".
    assert request.serialize() == SIPP_INVITE.replace(b"Content-Length:   ", b"Content-Length: ")


def test_register_with_digest() -> None:
    request = parse_request(REGISTER)
    auth = request.headers.get("authorization")
    assert auth is not None and auth.startswith("Digest username=") and auth.endswith("algorithm=MD5")
    assert request.headers.get_all("Contact") == ["<sip:bob@10.0.0.7:5060;transport=udp>;expires=3600"]
    assert request.top_via().rport == ""
    assert request.from_tag() == "456248"


@pytest.mark.parametrize("data", [OK_200, TRYING])
def test_responses(data: bytes) -> None:
    response = parse_response(data)
    assert response.status in (100, 200)
    assert response.reason in ("OK", "Trying")
    assert response.max_forwards() is None
    assert parse_message(response.serialize()) == response


def test_response_accessors() -> None:
    response = parse_response(OK_200)
    assert response.cseq() == (1, "BYE")
    assert response.to_tag() == "4242SIPpTag001"
    assert response.top_via().received == "192.0.2.10"


@pytest.mark.parametrize("data", SEEDS)
def test_round_trip_of_known_messages(data: bytes) -> None:
    message = parse_message(data)
    assert parse_message(message.serialize()) == message  # type: ignore[union-attr]


def test_ack_and_bye() -> None:
    assert parse_request(ACK).cseq() == (1, "ACK")
    bye = parse_request(BYE)
    assert bye.cseq() == (2, "BYE") and bye.to_tag() == "srv1"


def test_ipv6_via_is_not_percent_encoded() -> None:
    request = parse_request(OPTIONS)
    via = request.top_via()
    assert (via.transport, via.host, via.port) == ("TCP", "2001:db8::1", 5060)
    assert b"Via: SIP/2.0/TCP [2001:db8::1]:5060;branch=z9hG4bKopt;rport\r\n" in request.serialize()
    assert b"%5B" not in request.serialize()


def test_compact_headers() -> None:
    data = msg(
        "BYE sip:a@192.0.2.1 SIP/2.0",
        "v: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKc1",
        "f: <sip:b@10.0.0.1>;tag=1",
        "t: <sip:a@192.0.2.1>;tag=2",
        "i: compact@10.0.0.1",
        "CSeq: 3 BYE",
        "m: <sip:b@10.0.0.1>",
        "k: timer",
        "s: hi",
        "Max-Forwards: 10",
        "l: 0",
    )
    request = parse_request(data)
    assert request.call_id() == "compact@10.0.0.1"
    assert request.headers.get("Supported") == "timer" and request.headers.get("subject") == "hi"
    assert request.headers.get("m") == "<sip:b@10.0.0.1>"
    wire = request.serialize()
    assert b"\r\nCall-ID: compact@10.0.0.1\r\n" in wire and b"\r\ni:" not in wire
    assert parse_message(wire) == request


def test_lf_only_and_folded_headers() -> None:
    # The SDP body kept its bare LFs, and Content-Length was written for CRLF: only the head is LF here.
    head, _, _ = SIPP_INVITE.partition(b"\r\n\r\n")
    lf = parse_request(head.replace(b"\r\n", b"\n") + b"\n\n" + SDP)
    assert lf == parse_request(SIPP_INVITE)
    folded = SIPP_INVITE.replace(b"Subject: Performance Test", b"Subject: Performance\r\n \t Test")
    assert parse_request(folded).headers.get("Subject") == "Performance Test"
    folded_via = SIPP_INVITE.replace(b"Via: SIP/2.0/UDP", b"Via:\r\n SIP/2.0/UDP")
    assert parse_request(folded_via).top_via().host == "10.0.0.5"


def test_multiple_via_in_one_header_and_across_headers() -> None:
    data = SIPP_INVITE.replace(
        b"Via: SIP/2.0/UDP 10.0.0.5:5061;branch=z9hG4bK-4242-1-0",
        b"Via: SIP/2.0/UDP 10.0.0.5:5061;branch=z9hG4bK-4242-1-0, SIP/2.0/TCP p1.example.com;branch=z9hG4bKp1\r\n"
        b"v: SIP/2.0/UDP [2001:db8::9];branch=z9hG4bKp2;received=2001:db8::9",
    )
    request = parse_request(data)
    assert [via.host for via in request.vias()] == ["10.0.0.5", "p1.example.com", "2001:db8::9"]
    assert request.headers.get_all("via")[1] == "SIP/2.0/TCP p1.example.com;branch=z9hG4bKp1"
    assert parse_message(request.serialize()) == request


def test_contact_star_and_lists() -> None:
    star = REGISTER.replace(b"Contact: <sip:bob@10.0.0.7:5060;transport=udp>;expires=3600", b"Contact: *")
    assert parse_request(star).headers.get_all("Contact") == ["*"]
    with pytest.raises(DecodeError, match=r"Contact \*"):
        parse_message(star.replace(b"Contact: *", b"Contact: *, <sip:x@y>"))
    two = REGISTER.replace(b"Contact: <sip", b'Contact: "Doe, John" <sip:j@d;a=1,2>, <sip')
    assert parse_request(two).headers.get_all("m") == [
        '"Doe, John" <sip:j@d;a=1,2>',
        "<sip:bob@10.0.0.7:5060;transport=udp>;expires=3600",
    ]


def test_keepalives_and_leading_crlf() -> None:
    assert parse_message(b"\r\n\r\n") is KEEPALIVE
    assert isinstance(parse_message(b"\r\n"), KeepAlive)
    assert parse_message(b"\r\n\r\n" + SIPP_INVITE) == parse_message(SIPP_INVITE)  # §7.5


def test_udp_body_framing() -> None:
    no_length = SIPP_INVITE.replace(f"Content-Length:   {len(SDP)}\r\n".encode(), b"")
    request = parse_request(no_length)
    assert request.body == SDP and request.headers.get("Content-Length") == str(len(SDP))
    assert parse_request(SIPP_INVITE + b"\r\ntrailing").body == SDP  # §18.3: extra bytes discarded
    with pytest.raises(DecodeError, match="shorter than its Content-Length"):
        parse_message(SIPP_INVITE[:-1])


# --------------------------------------------------------------------------------------------- torture cases


def test_torture_unusual_but_valid() -> None:
    """RFC 4475 §3.1.1.1-3 in spirit: whitespace everywhere it is allowed, odd tokens, escapes."""
    method = "!interesting-Method0123456789_*+`.%indeed'~"
    uri = "sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*:&it+has=1,weird!*pas$wo~d_too.(doesn't-it)@example.com"
    data = msg(
        f"{method} {uri} SIP/2.0",
        "Via  :  SIP / 2.0\t/ UDP   host1.example.com ;  branch = z9hG4bKkdjuw ; rport",
        "Max-Forwards  :\t68",
        "TO :\r\n <sip:sips%3Auser%40example.com@example.net>",
        'from   : "J Rosenberg \\\\\\"" <sip:jdrosen@example.com>\r\n  ;\r\n  tag = 98asjd8',
        "call-id: intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{",
        f"cseq: 0000139122385 {method}",
        "NewFangledHeader:   newfangled value\r\n continued newfangled value",
        "UnknownHeaderWithUnusualValue: ;;,,;;,;",
        "l: 0",
    )
    request = parse_request(data)
    assert request.method == method and request.uri == uri
    assert request.cseq() == (139122385, method)
    assert request.from_tag() == "98asjd8"
    assert request.top_via().host == "host1.example.com" and request.top_via().rport == ""
    assert request.headers.get("newfangledheader") == "newfangled value continued newfangled value"
    assert request.max_forwards() == 68
    assert parse_message(request.serialize()) == request


def test_torture_long_values() -> None:
    """RFC 4475 §3.1.1.13 (longreq) in spirit: long but within the caps."""
    long_tag = "t" * 2000
    data = SIPP_INVITE.replace(b"tag=4242SIPpTag001", f"tag={long_tag}".encode()).replace(
        b"Subject: Performance Test", b"Subject: " + b"x" * 8000
    )
    request = parse_request(data)
    assert request.from_tag() == long_tag
    assert parse_message(request.serialize()) == request


INVALID = {
    "clerr: Content-Length larger than the body": SIPP_INVITE.replace(b"Length:   129", b"Length: 9999"),
    "ncl: negative Content-Length": SIPP_INVITE.replace(b"Length:   129", b"Length: -999"),
    "badvers: SIP/7.0": SIPP_INVITE.replace(b"5060 SIP/2.0", b"5060 SIP/7.0"),
    "response version": OK_200.replace(b"SIP/2.0 200", b"SIP/2.1 200"),
    "status 1000": OK_200.replace(b"200 OK", b"1000 OK"),
    "status 099": OK_200.replace(b"200 OK", b"099 OK"),
    "space in Request-URI": SIPP_INVITE.replace(b"sip:service@192.0.2.10:5060 ", b"sip:service@192.0.2.10; lr "),
    "double space in request line": SIPP_INVITE.replace(b"INVITE sip", b"INVITE  sip"),
    "two CSeq": SIPP_INVITE.replace(b"CSeq: 1 INVITE", b"CSeq: 1 INVITE\r\nCSeq: 2 INVITE"),
    "two Call-ID (compact + long)": SIPP_INVITE.replace(b"Call-ID: 1-", b"i: other\r\nCall-ID: 1-"),
    "CSeq overflow": SIPP_INVITE.replace(b"CSeq: 1 INVITE", b"CSeq: 36893488147419103232 INVITE"),
    "Max-Forwards 300": SIPP_INVITE.replace(b"Max-Forwards: 70", b"Max-Forwards: 300"),
    "missing To": SIPP_INVITE.replace(b"To: service <sip:service@192.0.2.10:5060>\r\n", b""),
    "missing Via": SIPP_INVITE.replace(b"Via: SIP/2.0/UDP 10.0.0.5:5061;branch=z9hG4bK-4242-1-0\r\n", b""),
    "response Via without branch": OK_200.replace(b";branch=z9hG4bK", b";x=z9hG4bK", 1),
    "Via bad port": SIPP_INVITE.replace(b"10.0.0.5:5061;branch", b"10.0.0.5:99999;branch"),
    "Via bad rport": REGISTER.replace(b";rport;", b";rport=0;"),
    "Via brackets not IPv6": OPTIONS.replace(b"[2001:db8::1]:5060", b"[10.0.0.1]:5060"),
    "Via not SIP/2.0": SIPP_INVITE.replace(b"Via: SIP/2.0/UDP", b"Via: SIP/3.0/UDP"),
    "From without URI": SIPP_INVITE.replace(b"From: sipp <sip:sipp@10.0.0.5:5061>", b"From: sipp"),
    "unclosed <": SIPP_INVITE.replace(b"To: service <sip", b"To: service sip<"),
    "space in Call-ID": SIPP_INVITE.replace(b"Call-ID: 1-4242", b"Call-ID: 1 4242"),
    "NUL in a header": SIPP_INVITE.replace(b"Performance Test", b"Perf\x00Test"),
    "bare CR in a header": SIPP_INVITE.replace(b"Performance Test", b"Perf\rTest"),
    "continuation first": SIPP_INVITE.replace(b"\r\nVia:", b"\r\n Via:"),
    "header without colon": SIPP_INVITE.replace(b"Subject: Performance Test", b"Subject Performance Test"),
    "no empty line": SIPP_INVITE.partition(b"\r\n\r\n")[0],
    "empty": b"",
    "empty Via entry": SIPP_INVITE.replace(b"-1-0\r\n", b"-1-0, \r\n"),
}


@pytest.mark.parametrize("data", INVALID.values(), ids=INVALID.keys())
def test_invalid_messages(data: bytes) -> None:
    with pytest.raises(DecodeError):
        parse_message(data)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (BYE.replace(b"2 BYE", b"2 INVITE"), "CSeq method INVITE does not match request method BYE"),
        (OK_200.replace(b";branch=z9hG4bK", b";x=z9hG4bK", 1), "top Via has no branch"),
        (SIPP_INVITE.replace(b"Call-ID: 1-4242@10.0.0.5\r\n", b""), "missing Call-ID header"),
    ],
)
def test_one_line_reasons(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        parse_message(data)
    assert info.value.reason == reason


def test_branch_without_magic_cookie_is_flagged() -> None:
    request = parse_request(SIPP_INVITE.replace(b"branch=z9hG4bK-4242-1-0", b"branch=rfc2543-1"))
    assert request.top_via().branch == "rfc2543-1" and not request.top_via().has_magic_cookie


# --------------------------------------------------------------------------------------------- building


def test_make_response_copies_headers_in_order() -> None:
    request = parse_request(
        SIPP_INVITE.replace(
            b"Via: SIP/2.0/UDP 10.0.0.5:5061;branch=z9hG4bK-4242-1-0",
            b"Via: SIP/2.0/UDP proxy.example.com;branch=z9hG4bKp, SIP/2.0/UDP 10.0.0.5:5061;branch=z9hG4bK-4242-1-0",
        ).replace(b"Subject:", b"Record-Route: <sip:proxy.example.com;lr>\r\nTimestamp: 54\r\nSubject:")
    )
    ok = make_response(
        request, 200, to_tag="srv1", extra_headers=[("Contact", "<sip:echo@192.0.2.10>"), ("l", "99")], body=SDP
    )
    assert ok.reason == "OK" and ok.body == SDP
    assert [name for name, _ in ok.headers] == [
        "Via",
        "Via",
        "From",
        "To",
        "Call-ID",
        "CSeq",
        "Record-Route",
        "Contact",
        "Content-Length",
    ]
    assert ok.headers.get_all("Via") == request.headers.get_all("Via")
    assert ok.headers.get("To") == "service <sip:service@192.0.2.10:5060>;tag=srv1"
    assert ok.to_tag() == "srv1" and ok.from_tag() == "4242SIPpTag001"
    assert ok.headers.get("Content-Length") == str(len(SDP))
    assert parse_message(ok.serialize()) == ok

    trying = make_response(request, 100)
    assert trying.reason == "Trying" and trying.to_tag() is None
    assert trying.headers.get("Timestamp") == "54" and "Record-Route" not in trying.headers

    bye_ok = make_response(parse_request(BYE), 200, "Fine", to_tag="other")
    assert bye_ok.to_tag() == "srv1" and bye_ok.reason == "Fine"  # an existing To tag is kept
    with pytest.raises(ValueError, match="status"):
        make_response(request, 700)
    with pytest.raises(ValueError, match="CR, LF"):
        make_response(request, 200, extra_headers=[("X", "a\r\nInjected: 1")])


def test_with_received_fills_rport_and_received() -> None:
    request = parse_request(REGISTER)
    marked = with_received(request, "203.0.113.7", 40123)
    via = marked.top_via()
    assert via.rport == 40123 and via.received == "203.0.113.7"
    assert (
        marked.headers.get("Via") == "SIP/2.0/UDP 10.0.0.7:5060;rport=40123;branch=z9hG4bKnashds7;received=203.0.113.7"
    )
    # No rport asked, same address: nothing to add (§18.2.1); different address: received only.
    plain = parse_request(SIPP_INVITE)
    assert with_received(plain, IPv4Address("10.0.0.5"), 5061) == plain
    assert with_received(plain, IPv4Address("198.51.100.1"), 5061).top_via().received == "198.51.100.1"
    ipv6 = with_received(parse_request(OPTIONS), IPv6Address("2001:db8::99"), 6000).top_via()
    assert (ipv6.received, ipv6.rport) == ("2001:db8::99", 6000)
    # Only the top Via changes.
    two = parse_request(SIPP_INVITE.replace(b"-1-0\r\n", b"-1-0, SIP/2.0/UDP 10.9.9.9;branch=z9hG4bKlow;rport\r\n"))
    assert with_received(two, "198.51.100.1", 1).headers.get_all("Via")[1].endswith(";rport")


def test_headers_helpers() -> None:
    headers = Headers.of(("v", "a"), ("Subject", "x"), ("VIA", "b"))
    assert headers.get_all("Via") == ["a", "b"] and headers.get("s") == "x" and headers.get("nope") is None
    assert headers.with_header("Via", "top", first=True).get("via") == "top"
    assert headers.replace("Via", "c").items == (("Via", "c"), ("Subject", "x"))
    assert headers.replace("Via").items == (("Subject", "x"),)
    assert headers.without("subject").get("Subject") is None
    with pytest.raises(ValueError, match="CR, LF"):
        headers.with_header("X", "a\nb")
    request = parse_request(BYE)
    assert request.with_header("X-Test", "1").headers.get("x-test") == "1"
    assert request.replace(body=b"hi").serialize().endswith(b"Content-Length: 2\r\n\r\nhi")


# --------------------------------------------------------------------------------------------- TCP framing


def test_stream_two_messages_in_one_feed() -> None:
    parser = StreamParser()
    out = parser.feed(SIPP_INVITE + BYE)
    assert out == [parse_message(SIPP_INVITE), parse_message(BYE)]
    assert parser.buffered == 0


def test_stream_byte_by_byte_with_keepalives() -> None:
    parser = StreamParser()
    data = b"\r\n\r\n" + SIPP_INVITE + b"\r\n" + OK_200 + b"\r\n\r\n"
    out: list[object] = []
    for index in range(len(data)):
        out += parser.feed(data[index : index + 1])
    assert out == [KEEPALIVE, parse_message(SIPP_INVITE), parse_message(OK_200), KEEPALIVE]


def test_stream_errors_are_final() -> None:
    parser = StreamParser()
    no_length = BYE.replace(b"Content-Length: 0\r\n", b"")
    with pytest.raises(DecodeError, match="without Content-Length"):
        parser.feed(no_length)
    with pytest.raises(DecodeError, match="already failed"):
        parser.feed(BYE)


def test_stream_oversized_and_garbage() -> None:
    big = BYE.replace(b"Content-Length: 0", f"Content-Length: {MAX_TCP_MESSAGE}".encode())
    with pytest.raises(DecodeError, match="larger than"):
        StreamParser().feed(big)
    with pytest.raises(DecodeError):
        StreamParser().feed(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n")  # a TLS hello on the TCP port
    parser = StreamParser()
    with pytest.raises(DecodeError, match="header lines"):
        for _ in range(200):
            parser.feed(b"X-A: b\r\n")
    with pytest.raises(DecodeError, match="head larger"):
        StreamParser(max_message=1000).feed(b"A" * 1001)


def test_stream_waits_for_body() -> None:
    parser = StreamParser()
    assert parser.feed(SIPP_INVITE[:-10]) == []
    assert parser.feed(SIPP_INVITE[-10:]) == [parse_message(SIPP_INVITE)]


# --------------------------------------------------------------------------------------------- caps and cost


def test_caps_reject_before_heavy_work() -> None:
    huge = b"INVITE sip:a@b SIP/2.0\r\n" + b"X" * (10 * 1024 * 1024)
    many_lines = b"INVITE sip:a@b SIP/2.0\r\n" + b"X: y\r\n" * 10_000 + b"\r\n"
    long_line = b"INVITE sip:a@b SIP/2.0\r\nX: " + b"y" * 9000 + b"\r\n\r\n"
    for data, reason in ((huge, "larger than"), (many_lines[:MAX_UDP_MESSAGE], "header lines"), (long_line, "longer")):
        started = time.perf_counter()
        with pytest.raises(DecodeError, match=reason):
            parse_message(data)
        assert time.perf_counter() - started < 0.05
    started = time.perf_counter()
    with pytest.raises(DecodeError):
        StreamParser().feed(many_lines)
    assert time.perf_counter() - started < 0.05
    via_flood = SIPP_INVITE.replace(b"Via: ", b"Via: SIP/2.0/UDP h;branch=z9hG4bKx, " * 70 + b"Via: ")
    with pytest.raises(DecodeError, match="Via values"):
        parse_message(via_flood)


# --------------------------------------------------------------------------------------------- fuzzing


def answered(bad: BadRequest) -> None:
    """The answer to a broken request serializes (its Via and CSeq copied as they came, §8.2.6.2)."""
    wire = bad.response("t").serialize()
    assert wire.startswith(f"SIP/2.0 {bad.status} ".encode()) and b"\r\nVia: " in wire
    assert bad.method != "ACK" and 400 <= bad.status <= 599


def check(data: bytes, *, round_trip: bool = True) -> None:
    """The fuzz oracle: DecodeError or a value whose accessors work and which survives a round trip."""
    try:
        message = parse_message(data)
    except BadRequest as bad:
        answered(bad)
        return
    except DecodeError:
        return
    if isinstance(message, KeepAlive):
        return
    message.top_via()
    message.cseq()
    message.from_tag()
    message.to_tag()
    message.max_forwards()
    if round_trip:
        assert parse_message(message.serialize()) == message


@settings(max_examples=2_000, database=None)
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(data: bytes) -> None:
    check(data)
    check(b"INVITE sip:a@b SIP/2.0\r\n" + data)


def mutate(seed: int) -> bytes:
    """A deterministic mutation of a seed message: byte flips, truncation, duplicated or deleted lines,
    a huge header. Derived from one integer so hypothesis' per-example overhead stays tiny."""
    rng = random.Random(seed)
    data = bytearray(SEEDS[rng.randrange(len(SEEDS))])
    for _ in range(rng.randrange(4)):
        kind = rng.randrange(6)
        if kind == 0 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 1 and data:
            del data[rng.randrange(len(data)) :]
        elif kind in (2, 3):
            lines = bytes(data).split(b"\r\n")
            index = rng.randrange(len(lines))
            if kind == 2:
                lines.insert(index, lines[index])
            else:
                del lines[index]
            data = bytearray(b"\r\n".join(lines))
        elif kind == 4:
            cut = bytes(data).find(b"\r\n") + 2
            data[cut:cut] = b"X-Huge: " + b"a" * rng.choice((100, 8200, 70_000)) + b"\r\n"
        else:
            data.insert(rng.randrange(len(data) + 1), rng.choice(b',;:<>"\\ \t\r\n@[]='))
    return bytes(data)


@settings(max_examples=5_000, database=None)
@given(st.integers(min_value=0, max_value=2**63))
def test_fuzz_mutations_round_trip(seed: int) -> None:
    check(mutate(seed))


# The CI-sized run: 100,000 mutated messages. Hypothesis itself costs ~0.5-0.8 ms per example here
# (77 s for 100,000 examples of one case each), so each example derives five cases from its seed:
# 20,000 examples x 5 = 100,000 cases in ~12 s. The body stays cheap (no round trip, which the
# 5,000-example test above covers) and only the generate phase runs.
FUZZ_CASES = 100_000
CASES_PER_EXAMPLE = 5


@settings(
    max_examples=FUZZ_CASES // CASES_PER_EXAMPLE,
    deadline=None,
    database=None,
    phases=[Phase.generate],
    suppress_health_check=list(HealthCheck),
)
@given(st.integers(min_value=0, max_value=2**63))
def test_fuzz_mutations_100k(seed: int) -> None:
    for offset in range(CASES_PER_EXAMPLE):
        check(mutate((seed * CASES_PER_EXAMPLE + offset) % 2**64), round_trip=False)


@settings(max_examples=300, database=None)
@given(st.binary(min_size=1, max_size=64), st.integers(min_value=0, max_value=len(SEEDS) - 1))
def test_fuzz_stream(noise: bytes, which: int) -> None:
    parser = StreamParser()
    data = SEEDS[which] + noise + SEEDS[which]
    try:
        for index in range(0, len(data), 7):
            for item in parser.feed(data[index : index + 7]):
                assert isinstance(item, Request | Response | KeepAlive | BadRequest)
                if isinstance(item, BadRequest):
                    answered(item)
    except DecodeError:
        pass


TOKEN = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~", min_size=1, max_size=12
)
TEXT = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x2FF, exclude_characters="\x7f"), max_size=40)


@st.composite
def valid_messages(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(["INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "X-" + draw(TOKEN)]))
    response = draw(st.booleans())
    host = draw(st.sampled_from(["10.0.0.1", "[2001:db8::7]", "pbx.example.com"]))
    port = draw(st.one_of(st.none(), st.integers(1, 65535)))
    sent_by = host if port is None else f"{host}:{port}"
    vias = [
        f"SIP/2.0/{draw(st.sampled_from(['UDP', 'TCP', 'tls']))} {sent_by};branch=z9hG4bK{draw(TOKEN)}"
        + draw(st.sampled_from(["", ";rport", ";rport=5060", ";received=192.0.2.1"]))
        for _ in range(draw(st.integers(1, 3)))
    ]
    via_lines = [", ".join(vias)] if draw(st.booleans()) else vias
    names = {"Via": "v", "From": "f", "To": "t", "Call-ID": "i"}
    compact = draw(st.booleans())
    lines = [
        f"SIP/2.0 {draw(st.integers(100, 699))} {draw(TEXT).strip()}"
        if response
        else f"{method} sip:{draw(TOKEN)}@{host} SIP/2.0"
    ]
    lines += [f"{names['Via'] if compact else 'Via'}: {value}" for value in via_lines]
    fields = [
        (names["From"] if compact else "From", f'"{draw(TOKEN)}" <sip:a@{host}>;tag={draw(TOKEN)}'),
        (names["To"] if compact else "To", f"<sip:b@{host}>" + draw(st.sampled_from(["", ";tag=x1"]))),
        (names["Call-ID"] if compact else "Call-ID", draw(TOKEN) + "@" + draw(TOKEN)),
        ("CSeq", f"{draw(st.integers(0, 2**31 - 1))} {method}"),
        ("Max-Forwards", str(draw(st.integers(0, 255)))),
    ]
    fields += [(f"X-{draw(TOKEN)}", draw(TEXT).strip(" ")) for _ in range(draw(st.integers(0, 4)))]
    fields = draw(st.permutations(fields))
    lines += [f"{name}: {value}" for name, value in fields]
    body = draw(st.binary(max_size=200))
    if draw(st.booleans()):
        lines.append(f"Content-Length: {len(body)}")
    eol = draw(st.sampled_from(["\r\n", "\n"]))
    return (eol.join(lines) + eol + eol).encode("utf-8") + body


@settings(max_examples=1_000, database=None)
@given(valid_messages())
def test_generated_messages_round_trip(data: bytes) -> None:
    message = parse_message(data)
    assert isinstance(message, Request | Response)
    assert parse_message(message.serialize()) == message
    stream = StreamParser()
    assert stream.feed(message.serialize() * 2) == [message, message]


# --------------------------------------------------------------------------------------------- answerable defects


def test_rfc_2543_requests_parse_without_branch_or_max_forwards() -> None:
    """RFC 4475 §3.4.1: an RFC 3261 element keeps backwards compatibility with RFC 2543 requests."""
    old = SIPP_INVITE.replace(b";branch=z9hG4bK-4242-1-0", b"").replace(b"Max-Forwards: 70\r\n", b"")
    request = parse_request(old)
    assert request.top_via().branch is None and not request.top_via().has_magic_cookie
    assert request.max_forwards() is None
    bare_cookie = parse_request(SIPP_INVITE.replace(b"branch=z9hG4bK-4242-1-0", b"branch=z9hG4bK"))
    assert not bare_cookie.top_via().has_magic_cookie  # RFC 4475 §3.2.1: no identifier after the cookie


def test_control_characters_only_as_quoted_pairs() -> None:
    quoted = SIPP_INVITE.replace(b"From: sipp <", b'From: "a\\\x00b\\\x07" <')
    assert parse_request(quoted).from_tag() == "4242SIPpTag001"
    bare = SIPP_INVITE.replace(b"From: sipp <", b'From: "a\x00b" <')
    with pytest.raises(DecodeError, match="control character"):
        parse_message(bare)


@pytest.mark.parametrize(
    ("data", "status", "phrase"),
    [
        (SIPP_INVITE.replace(b"Call-ID: 1-4242@10.0.0.5\r\n", b""), 400, "Bad Request: missing Call-ID header"),
        (SIPP_INVITE.replace(b"5060 SIP/2.0", b"5060 SIP/3.0"), 505, "Version Not Supported"),
        (SIPP_INVITE.replace(b"INVITE sip", b"FOO sip"), 501, "Not Implemented"),  # its CSeq says INVITE
        (SIPP_INVITE.replace(b"From: sipp <", b"From: Doe, John <"), 400, "Bad Request: From display name"),
        (SIPP_INVITE.replace(b"Subject: Performance Test", b"Subject: " + b"x" * 9000), 513, "Message Too Large"),
    ],
)
def test_a_broken_request_carries_its_answer(data: bytes, status: int, phrase: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_message(data)
    response = info.value.response(to_tag="ours")
    assert (response.status, response.reason[: len(phrase)]) == (status, phrase)
    assert response.headers.get("Via") == "SIP/2.0/UDP 10.0.0.5:5061;branch=z9hG4bK-4242-1-0"
    assert response.cseq() == (1, "INVITE") and response.to_tag() == "ours"
    answered(info.value)
    assert (response.headers.get("Allow") is not None) is (status == 501)


@pytest.mark.parametrize(
    "data",
    [
        OK_200.replace(b"CSeq: 1 BYE", b"CSeq: x BYE"),  # responses are never answered
        ACK.replace(b"Call-ID:", b"X-Call-ID:"),  # neither is an ACK (§17.1.1.3)
        SIPP_INVITE.replace(b"Via: SIP/2.0/UDP 10.0.0.5:5061;branch=z9hG4bK-4242-1-0\r\n", b"").replace(
            b"Call-ID:", b"X-Call-ID:"
        ),  # no Via: the answer could reach no transaction
    ],
)
def test_unanswerable_defects_stay_plain_decode_errors(data: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        parse_message(data)
    assert not isinstance(info.value, BadRequest)


def test_a_stream_answers_a_broken_request_and_reads_on() -> None:
    parser = StreamParser()
    broken = BYE.replace(b"2 BYE", b"2 INVITE")
    out = parser.feed(broken + BYE)
    assert isinstance(out[0], BadRequest) and out[0].response().status == 400
    assert out[1] == parse_message(BYE)
