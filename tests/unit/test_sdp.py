"""SDP and SIP header rewriting: real offers, only the intended lines change, line endings survive,
hostile text gives a result or DecodeError."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autonat.proto.errors import DecodeError
from autonat.proto.sdp import (
    MAX_SDP_LINES,
    MAX_SDP_SIZE,
    Connection,
    Media,
    Rtcp,
    SdpSummary,
    add_received_rport,
    parse_sdp_addresses,
    rewrite_contact,
    rewrite_sdp,
    rewrite_via_sent_by,
)

PUBLIC = IPv4Address("203.0.113.1")
PUBLIC6 = IPv6Address("2001:db8::1")


def crlf(*lines: str) -> str:
    return "".join(f"{line}\r\n" for line in lines)


# SIPp's built-in uac scenario body, as it goes out from the lab's lan host (CRLF, RFC 8866 §5).
SIPP = crlf(
    "v=0",
    "o=user1 53655765 2353687637 IN IP4 192.168.77.10",
    "s=-",
    "c=IN IP4 192.168.77.10",
    "t=0 0",
    "m=audio 6000 RTP/AVP 0",
    "a=rtpmap:0 PCMU/8000",
)

# A baresip audio+video offer with ICE candidates, RTCP on its own port (RFC 3605).
BARESIP = crlf(
    "v=0",
    "o=- 1376373298 3217456287 IN IP4 192.168.77.10",
    "s=-",
    "c=IN IP4 192.168.77.10",
    "t=0 0",
    "a=tool:baresip 3.10.1",
    "a=ice-ufrag:d1Ew",
    "a=ice-pwd:MWu5b8yDpQ3cnRuPyaUtu9",
    "m=audio 10310 RTP/AVP 9 0 8 101",
    "b=AS:64",
    "a=rtpmap:9 G722/8000",
    "a=rtpmap:0 PCMU/8000",
    "a=rtpmap:8 PCMA/8000",
    "a=rtpmap:101 telephone-event/8000",
    "a=fmtp:101 0-15",
    "a=rtcp:10311 IN IP4 192.168.77.10",
    "a=sendrecv",
    "a=label:1",
    "a=rtcp-rsize",
    "a=ptime:20",
    "a=candidate:1 1 UDP 2113932031 192.168.77.10 10310 typ host",
    "a=candidate:1 2 UDP 2113932030 192.168.77.10 10311 typ host",
    "m=video 10312 RTP/AVP 96 97",
    "b=AS:1000",
    "a=rtpmap:96 H264/90000",
    "a=fmtp:96 packetization-mode=0;profile-level-id=42002a",
    "a=rtpmap:97 VP8/90000",
    "a=rtcp-fb:96 nack",
    "a=rtcp-fb:97 nack pli",
    "a=rtcp:10313",
    "a=sendrecv",
    "a=content:main",
    "a=label:2",
    "a=candidate:1 1 UDP 2113932031 192.168.77.10 10312 typ host",
)

# IPv6, with a rejected video stream (port 0, RFC 3264 §6) carrying its own c=.
IPV6 = crlf(
    "v=0",
    "o=alice 2890844526 2890844526 IN IP6 fd00::10",
    "s=-",
    "c=IN IP6 fd00::10",
    "t=0 0",
    "m=audio 49170 RTP/AVP 0",
    "a=rtcp:49171 IN IP6 fd00::10",
    "m=video 0 RTP/AVP 31",
    "c=IN IP6 fd00::10",
)


def changed_lines(before: str, after: str) -> dict[int, tuple[str, str]]:
    """Line number -> (old, new) for each line that differs, endings included."""
    old, new = before.splitlines(keepends=True), after.splitlines(keepends=True)
    assert len(old) == len(new)
    return {i: (a, b) for i, (a, b) in enumerate(zip(old, new, strict=True)) if a != b}


# --- realistic offers ------------------------------------------------------------------------------


def test_sipp_offer_gets_the_public_address_and_port() -> None:
    out = rewrite_sdp(SIPP, address=PUBLIC, ports={6000: 40000})
    assert changed_lines(SIPP, out) == {
        1: (
            "o=user1 53655765 2353687637 IN IP4 192.168.77.10\r\n",
            "o=user1 53655765 2353687637 IN IP4 203.0.113.1\r\n",
        ),
        3: ("c=IN IP4 192.168.77.10\r\n", "c=IN IP4 203.0.113.1\r\n"),
        5: ("m=audio 6000 RTP/AVP 0\r\n", "m=audio 40000 RTP/AVP 0\r\n"),
    }


def test_sipp_offer_without_port_mapping_changes_addresses_only() -> None:
    assert set(changed_lines(SIPP, rewrite_sdp(SIPP, address=PUBLIC))) == {1, 3}


def test_baresip_offer_changes_exactly_the_address_and_port_lines() -> None:
    out = rewrite_sdp(
        BARESIP,
        address=PUBLIC,
        ports={10310: 40310, 10312: 40312},
        rtcp_ports={10311: 40311, 10313: 40313},
    )
    changes = changed_lines(BARESIP, out)
    assert {i: new.rstrip("\r\n") for i, (_, new) in changes.items()} == {
        1: "o=- 1376373298 3217456287 IN IP4 203.0.113.1",
        3: "c=IN IP4 203.0.113.1",
        8: "m=audio 40310 RTP/AVP 9 0 8 101",
        15: "a=rtcp:40311 IN IP4 203.0.113.1",
        22: "m=video 40312 RTP/AVP 96 97",
        29: "a=rtcp:40313",
    }
    assert all(line.endswith("\r\n") for line in out.splitlines(keepends=True))
    # ICE candidates, rtcp-fb and the rest are byte for byte the same.
    assert [line for line in out.splitlines() if line.startswith("a=candidate")] == [
        line for line in BARESIP.splitlines() if line.startswith("a=candidate")
    ]


def test_baresip_summary() -> None:
    summary = parse_sdp_addresses(rewrite_sdp(BARESIP, address=PUBLIC, ports={10310: 1}, rtcp_ports={10311: 2}))
    local = Connection("IP4", "203.0.113.1")
    assert summary == SdpSummary(
        origin=local,
        connection=local,
        media=(
            Media("audio", 1, None, "RTP/AVP", ("9", "0", "8", "101"), None, Rtcp(2, local)),
            Media("video", 10312, None, "RTP/AVP", ("96", "97"), None, Rtcp(10313, None)),
        ),
        line_count=34,
    )
    assert summary.connection_for(1) == local


def test_ipv6_offer_and_the_rejected_stream() -> None:
    out = rewrite_sdp(IPV6, address=PUBLIC6, ports={49170: 50000}, rtcp_ports={49171: 50001})
    assert {i: new.rstrip("\r\n") for i, (_, new) in changed_lines(IPV6, out).items()} == {
        1: "o=alice 2890844526 2890844526 IN IP6 2001:db8::1",
        3: "c=IN IP6 2001:db8::1",
        5: "m=audio 50000 RTP/AVP 0",
        6: "a=rtcp:50001 IN IP6 2001:db8::1",
        8: "c=IN IP6 2001:db8::1",  # the rejected stream's address is hidden too; its port stays 0
    }
    summary = parse_sdp_addresses(out)
    assert [m.port for m in summary.media] == [50000, 0]
    assert summary.connection_for(1) == Connection("IP6", "2001:db8::1")
    assert summary.media[1].connection is not None and summary.media[1].connection.ip == PUBLIC6


def test_family_switches_with_the_address() -> None:
    to_v6 = parse_sdp_addresses(rewrite_sdp(SIPP, address=PUBLIC6))
    assert to_v6.origin == to_v6.connection == Connection("IP6", "2001:db8::1")
    to_v4 = parse_sdp_addresses(rewrite_sdp(IPV6, address=PUBLIC))
    assert to_v4.origin == to_v4.connection == Connection("IP4", "203.0.113.1")
    assert to_v4.media[0].rtcp == Rtcp(49171, Connection("IP4", "203.0.113.1"))


def test_port_zero_stays_zero() -> None:
    sdp = crlf("v=0", "c=IN IP4 10.0.0.1", "m=audio 0 RTP/AVP 0", "a=rtcp:0", "m=video 5000 RTP/AVP 31")
    out = rewrite_sdp(sdp, address=PUBLIC, ports={5000: 6000}, rtcp_ports={5001: 6001})
    assert [m.port for m in parse_sdp_addresses(out).media] == [0, 6000]
    assert "a=rtcp:0\r\n" in out
    with pytest.raises(ValueError, match="1-65535"):
        rewrite_sdp(sdp, address=PUBLIC, ports={0: 6000})


def test_port_count_is_kept() -> None:
    out = rewrite_sdp(crlf("m=video 49170/2 RTP/AVP 31"), address=PUBLIC, ports={49170: 50000})
    assert out == crlf("m=video 50000/2 RTP/AVP 31")
    assert parse_sdp_addresses(out).media[0].port_count == 2


def test_unlisted_ports_are_kept() -> None:
    assert "m=audio 6000 " in rewrite_sdp(SIPP, address=PUBLIC, ports={7000: 8000})


@pytest.mark.parametrize(
    "line",
    [
        "c=IN IP4 0.0.0.0",  # RFC 3264 §8.4 hold
        "c=IN IP6 ::",
        "c=IN IP4 224.2.1.1/127",  # multicast with TTL
        "c=IN IP4 224.2.1.1/127/3",
        "c=IN IP6 ff15::101/3",
        "c=IN IP4 239.1.1.1",
        "c=ATM NSAP 47.0005.80.ffe100.0000.f21a.0100.0000.0000.0000.0000.0000.0000",
        "c=IN IP4",  # malformed, from here on
        "c=IN IP4 10.0.0.1 extra",
        "c=IN IP5 10.0.0.1",
        "c= IN IP4 10.0.0.1",
        "c=IN IP4 10.0.0.1\x00",
        "o=too few fields IN IP4",
        "o=- 1 1 IN IP4",
        "m=audio abc RTP/AVP 0",
        "m=audio 70000 RTP/AVP 0",
        "m=audio",
        "a=rtcp:abc",
        "a=rtcp:5001 IN IP4",
        "a=rtcp:5001 IN IP4 10.0.0.1 x",
        "a=rtcp-fb:96 nack",
        "a=candidate:1 1 UDP 2113932031 192.168.77.10 5000 typ host",
        "x=unknown 10.0.0.1",
        "",
        "garbage without equals",
    ],
)
def test_lines_that_must_not_change(line: str) -> None:
    sdp = crlf("v=0", line, "m=audio 5000 RTP/AVP 0", line)
    out = rewrite_sdp(sdp, address=PUBLIC, ports={5001: 1, 70000 % 65536: 2}, rtcp_ports={5001: 3})
    assert changed_lines(sdp, out).keys() <= {2}  # only the well-formed m= line may change (it doesn't here)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("c=IN IP4 pbx.internal.example", "c=IN IP4 203.0.113.1"),  # an FQDN is replaced too
        ("c=in ip4 10.0.0.1", "c=in IP4 203.0.113.1"),  # tolerant of case, nettype kept as written
        ("c=IN  IP4\t10.0.0.1  ", "c=IN  IP4\t203.0.113.1  "),  # odd spacing kept
        ("c=IN IP6 10.0.0.1", "c=IN IP4 203.0.113.1"),  # wrong addrtype fixed on the way
        ("o=- 0 0 IN IP4 0.0.0.0", "o=- 0 0 IN IP4 203.0.113.1"),  # o= is not a hold address
        ("a=rtcp:5001 IN IP4 10.0.0.1", "a=rtcp:6001 IN IP4 203.0.113.1"),
        ("a=rtcp:5001 IN IP4 0.0.0.0", "a=rtcp:6001 IN IP4 0.0.0.0"),
        ("m=audio 5000 RTP/AVP", "m=audio 6000 RTP/AVP"),
    ],
)
def test_lines_that_change(line: str, expected: str) -> None:
    out = rewrite_sdp(line + "\r\n", address=PUBLIC, ports={5000: 6000}, rtcp_ports={5001: 6001})
    assert out == expected + "\r\n"


# --- line endings -----------------------------------------------------------------------------------


def test_each_line_keeps_its_own_ending() -> None:
    sdp = "v=0\r\no=- 1 1 IN IP4 10.0.0.1\nc=IN IP4 10.0.0.1\r\nm=audio 5000 RTP/AVP 0\na=rtcp:5001 IN IP4 10.0.0.1"
    out = rewrite_sdp(sdp, address=PUBLIC, ports={5000: 6000}, rtcp_ports={5001: 6001})
    assert out == (
        "v=0\r\no=- 1 1 IN IP4 203.0.113.1\nc=IN IP4 203.0.113.1\r\nm=audio 6000 RTP/AVP 0\n"
        "a=rtcp:6001 IN IP4 203.0.113.1"
    )


def test_lf_only_body_stays_lf() -> None:
    sdp = SIPP.replace("\r\n", "\n")
    out = rewrite_sdp(sdp, address=PUBLIC, ports={6000: 40000})
    assert "\r" not in out and out.count("\n") == sdp.count("\n")
    assert out == rewrite_sdp(SIPP, address=PUBLIC, ports={6000: 40000}).replace("\r\n", "\n")


def test_a_trailing_lone_cr_and_blank_lines_survive() -> None:
    sdp = "v=0\r\n\r\nc=IN IP4 10.0.0.1\r"
    assert rewrite_sdp(sdp, address=PUBLIC) == "v=0\r\n\r\nc=IN IP4 203.0.113.1\r"
    assert rewrite_sdp("", address=PUBLIC) == ""
    assert parse_sdp_addresses("").line_count == 0


def test_unicode_line_separators_are_not_line_breaks() -> None:
    sdp = "s=caf\u2028\u0085\x0c\r\nc=IN IP4 10.0.0.1\r\n"
    assert rewrite_sdp(sdp, address=PUBLIC) == "s=caf\u2028\u0085\x0c\r\nc=IN IP4 203.0.113.1\r\n"
    assert parse_sdp_addresses(sdp).line_count == 2


def test_rewriting_is_deterministic_and_idempotent() -> None:
    once = rewrite_sdp(BARESIP, address=PUBLIC, ports={10310: 40310})
    assert rewrite_sdp(BARESIP, address=PUBLIC, ports={10310: 40310}) == once
    assert rewrite_sdp(once, address=PUBLIC) == once


# --- parsing ----------------------------------------------------------------------------------------


def test_summary_of_a_multicast_and_malformed_body() -> None:
    sdp = crlf(
        "v=0",
        "o=- 1 1 IN IP4 pbx.example",
        "c=IN IP4 224.2.1.1/127",
        "c=IN IP4 10.9.9.9",  # a repeated c=: the first counts
        "m=audio abc RTP/AVP 0",
        "c=IN IP4 10.0.0.1",
        "a=rtcp:5001",
        "a=rtcp:5003",
        "m=video 5002/2 RTP/AVP 31",
        "c=bad",
    )
    summary = parse_sdp_addresses(sdp)
    assert summary.origin == Connection("IP4", "pbx.example") and summary.origin.ip is None
    assert summary.connection == Connection("IP4", "224.2.1.1/127")
    assert summary.connection.ip == IPv4Address("224.2.1.1")
    assert summary.media == (
        Media("audio", None, None, "", (), Connection("IP4", "10.0.0.1"), Rtcp(5001)),
        Media("video", 5002, 2, "RTP/AVP", ("31",)),
    )
    assert summary.connection_for(1) == summary.connection
    assert summary.line_count == 10


# --- caps and arguments -----------------------------------------------------------------------------


def test_size_caps() -> None:
    assert parse_sdp_addresses("a=x\n" * MAX_SDP_LINES).line_count == MAX_SDP_LINES
    assert parse_sdp_addresses("a=x\n" * (MAX_SDP_LINES - 1) + "a=x").line_count == MAX_SDP_LINES
    with pytest.raises(DecodeError, match="more than 1000 lines"):
        rewrite_sdp("a=x\n" * MAX_SDP_LINES + "a=x", address=PUBLIC)
    with pytest.raises(DecodeError, match="larger than 65536 bytes"):
        rewrite_sdp("s=" + "x" * MAX_SDP_SIZE, address=PUBLIC)
    with pytest.raises(DecodeError, match="larger than 65536 bytes"):  # counted in UTF-8 bytes
        parse_sdp_addresses("s=" + "\u00e9" * (MAX_SDP_SIZE // 2))
    assert parse_sdp_addresses("s=" + "\u00e9" * (MAX_SDP_SIZE // 2 - 1)).line_count == 1


def test_bad_port_maps_are_programming_errors() -> None:
    with pytest.raises(ValueError, match="ports: ports must be 1-65535"):
        rewrite_sdp(SIPP, address=PUBLIC, ports={6000: 70000})
    with pytest.raises(ValueError, match="rtcp_ports"):
        rewrite_sdp(SIPP, address=PUBLIC, rtcp_ports={-1: 5})


# --- hypothesis ---------------------------------------------------------------------------------------

fragments = st.sampled_from(
    [
        "c=", "o=", "m=", "a=rtcp:", "IN", "IP4", "IP6", " ", "  ", "\t", "/", "0", "5000", "99999", "10.0.0.1",
        "::1", "0.0.0.0", "224.1.1.1", "audio", "RTP/AVP", "-", "=", ":", "[", "]", "\x00", "é", "\u2028",
    ]
)  # fmt: skip
sdpish_lines = st.lists(st.one_of(fragments, st.text(max_size=8)), max_size=8).map("".join)
endings = st.sampled_from(["\r\n", "\n", "\r", ""])


@settings(max_examples=500)
@given(st.lists(st.tuples(sdpish_lines, endings), max_size=30), st.sampled_from([PUBLIC, PUBLIC6]))
def test_random_sdpish_text_never_crashes(lines: list[tuple[str, str]], address: IPv4Address | IPv6Address) -> None:
    sdp = "".join(line + ending for line, ending in lines)
    try:
        out = rewrite_sdp(sdp, address=address, ports={5000: 6000, 1: 2}, rtcp_ports={5000: 7000})
        parse_sdp_addresses(sdp)
    except DecodeError:
        return
    assert out.count("\n") == sdp.count("\n")
    assert out.count("\r") == sdp.count("\r")


addresses4 = st.builds(IPv4Address, st.integers(1, 2**32 - 1))
addresses6 = st.builds(IPv6Address, st.integers(1, 2**128 - 1))
sdp_ports = st.integers(0, 65535)


@st.composite
def valid_sdps(draw: st.DrawFn) -> tuple[str, int]:
    """A well-formed SDP body (session + media, random addresses, ports and endings), with its media count."""
    ending = draw(st.sampled_from(["\r\n", "\n"]))

    def conn() -> str:
        ip = draw(st.one_of(addresses4, addresses6))
        return f"IN IP{ip.version} {ip}"

    lines = ["v=0", f"o=- {draw(st.integers(0, 2**32))} 1 {conn()}", "s=-"]
    if draw(st.booleans()):
        lines.append(f"c={conn()}")
    lines.append("t=0 0")
    media = draw(st.integers(0, 4))
    for _ in range(media):
        lines.append(f"m={draw(st.sampled_from(['audio', 'video', 'text']))} {draw(sdp_ports)} RTP/AVP 0 96")
        if draw(st.booleans()):
            lines.append(f"c={conn()}")
        if draw(st.booleans()):
            lines.append(f"a=rtcp:{draw(sdp_ports)}" + (f" {conn()}" if draw(st.booleans()) else ""))
        lines += ["a=rtpmap:96 opus/48000/2", f"a=candidate:1 1 UDP 1 {draw(addresses4)} {draw(sdp_ports)} typ host"]
    return ending.join(lines) + ending, media


@settings(max_examples=300)
@given(valid_sdps(), st.one_of(addresses4, addresses6), st.dictionaries(st.integers(1, 65535), st.integers(1, 65535)))
def test_rewritten_valid_sdp_still_parses_the_same_way(
    body: tuple[str, int], address: IPv4Address | IPv6Address, ports: dict[int, int]
) -> None:
    sdp, media_count = body
    out = rewrite_sdp(sdp, address=address, ports=ports, rtcp_ports=ports)
    before, after = parse_sdp_addresses(sdp), parse_sdp_addresses(out)
    assert after.line_count == before.line_count and len(after.media) == len(before.media) == media_count
    family = f"IP{address.version}"
    for old, new in zip(before.media, after.media, strict=True):
        assert old.port is not None
        assert new.port == (ports.get(old.port, old.port) if old.port else 0)
        assert (new.media, new.proto, new.formats) == (old.media, old.proto, old.formats)
    for connection in (after.origin, after.connection, *(m.connection for m in after.media)):
        if connection is None or ip_address(connection.address).is_unspecified:
            continue  # a hold address stays
        if connection is after.origin or not ip_address(connection.address).is_multicast:
            assert connection == Connection(family, str(address))
    # Lines other than o=, c=, m=, a=rtcp: are untouched.
    for old_line, new_line in zip(sdp.splitlines(keepends=True), out.splitlines(keepends=True), strict=True):
        if not old_line.startswith(("o=", "c=", "m=", "a=rtcp:")):
            assert old_line == new_line


# --- Via -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("via", "host", "port", "expected"),
    [
        (
            "SIP/2.0/UDP 192.168.77.10:5060;branch=z9hG4bK776asdhds;rport",
            "203.0.113.1",
            5070,
            "SIP/2.0/UDP 203.0.113.1:5070;branch=z9hG4bK776asdhds;rport",
        ),
        (
            "SIP/2.0/UDP 192.168.77.10;branch=z9hG4bKx",
            "203.0.113.1",
            5060,
            "SIP/2.0/UDP 203.0.113.1:5060;branch=z9hG4bKx",
        ),
        (
            "SIP/2.0/TCP 192.168.77.10:5060;branch=z9hG4bKx",
            "203.0.113.1",
            None,
            "SIP/2.0/TCP 203.0.113.1;branch=z9hG4bKx",
        ),
        (
            "SIP/2.0/UDP [fd00::10]:5060;branch=z9hG4bKx",
            "2001:db8::1",
            5060,
            "SIP/2.0/UDP [2001:db8::1]:5060;branch=z9hG4bKx",
        ),
        ("SIP/2.0/UDP [fd00::10];branch=z9hG4bKx", "[2001:db8::1]", None, "SIP/2.0/UDP [2001:db8::1];branch=z9hG4bKx"),
        (
            "SIP/2.0/TLS pc33.example.com;branch=z9hG4bKx",
            "sip.example.org",
            5061,
            "SIP/2.0/TLS sip.example.org:5061;branch=z9hG4bKx",
        ),
        (
            " SIP / 2.0 / UDP  10.0.0.1 : 5060 ;branch=z9hG4bKx",
            "203.0.113.1",
            1,
            " SIP / 2.0 / UDP  203.0.113.1:1 ;branch=z9hG4bKx",
        ),
        (
            "SIP/2.0/UDP 10.0.0.1:5060;branch=a, SIP/2.0/UDP 10.0.0.2:5060;branch=b",
            "203.0.113.1",
            5060,
            "SIP/2.0/UDP 203.0.113.1:5060;branch=a, SIP/2.0/UDP 10.0.0.2:5060;branch=b",
        ),
        (
            "SIP/2.0/WSS df7jal23ls0d.invalid;branch=z9hG4bKx",
            "203.0.113.1",
            443,
            "SIP/2.0/WSS 203.0.113.1:443;branch=z9hG4bKx",
        ),
    ],
)
def test_rewrite_via_sent_by(via: str, host: str, port: int | None, expected: str) -> None:
    assert rewrite_via_sent_by(via, host, port) == expected


@pytest.mark.parametrize(
    "via",
    ["", "SIP/2.0/UDP", "192.168.1.1:5060", "SIP/2.0/UDP 10.0.0.1:abc;branch=x", "SIP/2.0/UDP @host", "x" * 9000],
)
def test_malformed_via_is_a_decode_error(via: str) -> None:
    with pytest.raises(DecodeError):
        rewrite_via_sent_by(via, "203.0.113.1", 5060)
    with pytest.raises(DecodeError):
        add_received_rport(via, PUBLIC, 5060)


@pytest.mark.parametrize(
    ("host", "port"), [("bad host", 5060), ("a;b", 5060), ("", 5060), ("x.example", 0), ("x", 70000)]
)
def test_bad_rewrite_arguments(host: str, port: int) -> None:
    with pytest.raises(ValueError, match=r"not an IP address or host name|not 1-65535"):
        rewrite_via_sent_by("SIP/2.0/UDP 10.0.0.1;branch=x", host, port)
    with pytest.raises(ValueError, match=r"not an IP address or host name|not 1-65535"):
        rewrite_contact("<sip:a@10.0.0.1>", host, port)


# --- received / rport (RFC 3261 §18.2.1, RFC 3581 §4) -----------------------------------------------------


@pytest.mark.parametrize(
    ("via", "source", "port", "expected"),
    [
        # RFC 3581 §4's example: rport filled, received added
        (
            "SIP/2.0/UDP 10.1.1.1:4540;rport;branch=z9hG4bKkjshdyff",
            "192.0.2.1",
            9988,
            "SIP/2.0/UDP 10.1.1.1:4540;rport=9988;branch=z9hG4bKkjshdyff;received=192.0.2.1",
        ),
        # rport is the last parameter: rport=PORT comes before received
        (
            "SIP/2.0/UDP 10.1.1.1:4540;branch=z9hG4bKkjshdyff;rport",
            "192.0.2.1",
            9988,
            "SIP/2.0/UDP 10.1.1.1:4540;branch=z9hG4bKkjshdyff;rport=9988;received=192.0.2.1",
        ),
        # with rport, received is added even when it equals the sent-by (RFC 3581 §4)
        (
            "SIP/2.0/UDP 192.0.2.1:4540;rport;branch=z9hG4bKx",
            "192.0.2.1",
            4540,
            "SIP/2.0/UDP 192.0.2.1:4540;rport=4540;branch=z9hG4bKx;received=192.0.2.1",
        ),
        # no rport, sent-by is the source: nothing to add
        (
            "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKx",
            "192.0.2.1",
            40000,
            "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKx",
        ),
        # no rport, sent-by differs: received only
        (
            "SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKx",
            "192.0.2.1",
            40000,
            "SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKx;received=192.0.2.1",
        ),
        # a name always differs from the source (RFC 3261 §18.2.1)
        (
            "SIP/2.0/TCP pc33.example.com;branch=z9hG4bKx",
            "192.0.2.1",
            1,
            "SIP/2.0/TCP pc33.example.com;branch=z9hG4bKx;received=192.0.2.1",
        ),
        # an rport that already has a value is kept
        (
            "SIP/2.0/UDP 10.0.0.1;rport=1234;branch=z9hG4bKx",
            "192.0.2.1",
            9,
            "SIP/2.0/UDP 10.0.0.1;rport=1234;branch=z9hG4bKx;received=192.0.2.1",
        ),
        # an existing received gets the new value
        (
            "SIP/2.0/UDP 10.0.0.1;received=1.1.1.1;branch=z9hG4bKx",
            "192.0.2.1",
            9,
            "SIP/2.0/UDP 10.0.0.1;received=192.0.2.1;branch=z9hG4bKx",
        ),
        (
            "SIP/2.0/UDP 10.0.0.1;received;branch=z9hG4bKx",
            "192.0.2.1",
            9,
            "SIP/2.0/UDP 10.0.0.1;received=192.0.2.1;branch=z9hG4bKx",
        ),
        # IPv6: received without brackets (RFC 5118 §4.5); the same address in another spelling is equal
        (
            "SIP/2.0/UDP [2001:db8::9:1];branch=z9hG4bKx",
            "2001:db8::9:255",
            5060,
            "SIP/2.0/UDP [2001:db8::9:1];branch=z9hG4bKx;received=2001:db8::9:255",
        ),
        (
            "SIP/2.0/UDP [2001:0db8::0009:0001]:5060;branch=z9hG4bKx",
            "2001:db8::9:1",
            5060,
            "SIP/2.0/UDP [2001:0db8::0009:0001]:5060;branch=z9hG4bKx",
        ),
        # an IPv4-mapped source from a dual-stack socket is the IPv4 address
        ("SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKx", "::ffff:192.0.2.1", 5060, "SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKx"),
        # LWS around ; and =, case-insensitive names, quoted values with ; and , inside, later entries kept
        (
            'SIP/2.0/UDP 10.0.0.1 ; RPORT ; x="a;b,c" ; branch = z9hG4bKx , SIP/2.0/UDP 10.0.0.2;rport',
            "192.0.2.1",
            7,
            'SIP/2.0/UDP 10.0.0.1 ; RPORT=7 ; x="a;b,c" ; branch = z9hG4bKx;received=192.0.2.1 '
            ", SIP/2.0/UDP 10.0.0.2;rport",
        ),
    ],
)
def test_add_received_rport(via: str, source: str, port: int, expected: str) -> None:
    assert add_received_rport(via, ip_address(source), port) == expected


@pytest.mark.parametrize(
    "via",
    [
        "SIP/2.0/UDP 10.0.0.1;",
        "SIP/2.0/UDP 10.0.0.1;=x",
        "SIP/2.0/UDP 10.0.0.1;branch=",
        'SIP/2.0/UDP 10.0.0.1;x="unterminated',
        "SIP/2.0/UDP 10.0.0.1;branch=x junk",
        "SIP/2.0/UDP 10.0.0.1" + ";a" * 65,
    ],
)
def test_malformed_via_parameters(via: str) -> None:
    with pytest.raises(DecodeError):
        add_received_rport(via, PUBLIC, 5060)


def test_received_rport_argument_checks() -> None:
    with pytest.raises(ValueError, match="source port"):
        add_received_rport("SIP/2.0/UDP 10.0.0.1", PUBLIC, 0)


# --- Contact ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("contact", "host", "port", "expected"),
    [
        (
            "<sip:alice@192.168.77.10:5060;transport=tcp>;expires=60",
            "203.0.113.1",
            5070,
            "<sip:alice@203.0.113.1:5070;transport=tcp>;expires=60",
        ),
        (
            '"Mr. Watson" <sip:watson@192.168.77.10:5060;transport=udp?subject=x>;q=0.7;expires=3600',
            "203.0.113.1",
            5060,
            '"Mr. Watson" <sip:watson@203.0.113.1:5060;transport=udp?subject=x>;q=0.7;expires=3600',
        ),
        ("Alice Smith <sip:alice@10.0.0.1>", "203.0.113.1", 5060, "Alice Smith <sip:alice@203.0.113.1:5060>"),
        ("sip:alice@192.168.77.10:5060;expires=60", "203.0.113.1", None, "sip:alice@203.0.113.1;expires=60"),
        ("sip:alice@192.168.77.10", "203.0.113.1", 5080, "sip:alice@203.0.113.1:5080"),
        ("<sip:192.168.77.10:5060;lr>", "203.0.113.1", 5060, "<sip:203.0.113.1:5060;lr>"),
        ("<sip:alice:secret@10.0.0.1:5060>", "203.0.113.1", 5060, "<sip:alice:secret@203.0.113.1:5060>"),
        (
            "<sip:+15551234;phone-context=example.com@10.0.0.1;user=phone>",
            "203.0.113.1",
            None,
            "<sip:+15551234;phone-context=example.com@203.0.113.1;user=phone>",
        ),
        ('"a <b@c>, d" <sip:x@10.0.0.1>', "203.0.113.1", None, '"a <b@c>, d" <sip:x@203.0.113.1>'),
        ('"esc \\" <x>" <sip:x@10.0.0.1>', "203.0.113.1", None, '"esc \\" <x>" <sip:x@203.0.113.1>'),
        ("<sip:alice@[::1]:5060>", "2001:db8::5", 5060, "<sip:alice@[2001:db8::5]:5060>"),
        ("<sip:alice@10.0.0.1:5060>", "2001:db8::5", None, "<sip:alice@[2001:db8::5]>"),
        ("<sips:alice@10.0.0.1:5061>", "sip.example.org", 5061, "<sips:alice@sip.example.org:5061>"),
        ("<SIP:alice@10.0.0.1>", "203.0.113.1", None, "<SIP:alice@203.0.113.1>"),
        (
            "<sip:a@10.0.0.1:5060>;expires=60, <sip:a@10.0.0.2:5060>",
            "203.0.113.1",
            5060,
            "<sip:a@203.0.113.1:5060>;expires=60, <sip:a@10.0.0.2:5060>",
        ),
        ("  <sip:a@10.0.0.1>  ", "203.0.113.1", None, "  <sip:a@203.0.113.1>  "),
        ("*", "203.0.113.1", 5060, "*"),
        (" * ", "203.0.113.1", 5060, " * "),
    ],
)
def test_rewrite_contact(contact: str, host: str, port: int | None, expected: str) -> None:
    assert rewrite_contact(contact, host, port) == expected


@pytest.mark.parametrize(
    ("contact", "reason"),
    [
        ("<tel:+15551234>", "sip: or sips:"),
        ("<sip:alice@10.0.0.1", "unclosed <"),
        ("<sip:alice@>", "without a host"),
        ("<sip:alice@::1>", "without a host"),
        ("", "sip: or sips:"),
        ('"unterminated <sip:a@b>', "unterminated"),
        ("<" + "a" * 9000 + ">", "larger than"),
    ],
)
def test_malformed_contact(contact: str, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        rewrite_contact(contact, "203.0.113.1", 5060)


header_text = st.text(
    alphabet=st.sampled_from(list('sip:SIP/2.0/UDP<>@;=,"\\ []:.0123456789abcrport*\t\r\n')), max_size=80
)


@settings(max_examples=1000)
@given(header_text)
def test_hostile_header_values_give_a_result_or_decode_error(value: str) -> None:
    calls: list[Callable[[], str]] = [
        lambda: rewrite_via_sent_by(value, "203.0.113.1", 5060),
        lambda: add_received_rport(value, PUBLIC, 5060),
        lambda: rewrite_contact(value, "2001:db8::1", None),
    ]
    for call in calls:
        with contextlib.suppress(DecodeError):
            assert isinstance(call(), str)
