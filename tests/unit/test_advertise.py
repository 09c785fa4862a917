"""ext-sip-ip / ext-rtp-ip values, their resolution, and the one decision used for signalling and media."""

from __future__ import annotations

from ipaddress import IPv4Address, ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autonat.advertise import (
    Addressing,
    ExtKind,
    ExtValue,
    Resolved,
    choose,
    parse_ext_value,
    profile_status,
    resolve,
)

ROUTER = IPv4Address("203.0.113.1")
LOCAL = IPv4Address("192.168.77.10")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("auto-nat", ExtValue(ExtKind.AUTO_NAT)),
        ("AUTO-NAT", ExtValue(ExtKind.AUTO_NAT)),
        ("auto", ExtValue(ExtKind.AUTO)),
        ("autonat:198.51.100.7", ExtValue(ExtKind.AUTONAT_OR, address=ip_address("198.51.100.7"))),
        ("198.51.100.7", ExtValue(ExtKind.IP, address=ip_address("198.51.100.7"))),
        ("2001:db8::5", ExtValue(ExtKind.IP, address=ip_address("2001:db8::5"))),
        ("stun:stun.example.org", ExtValue(ExtKind.STUN, host="stun.example.org", port=3478)),
        ("stun:203.0.113.100:3479", ExtValue(ExtKind.STUN, host="203.0.113.100", port=3479)),
        ("stun:[2001:db8::1]:5000", ExtValue(ExtKind.STUN, host="2001:db8::1", port=5000)),
        ("host:pbx.example.org", ExtValue(ExtKind.HOST, host="pbx.example.org")),
        ("  auto-nat  ", ExtValue(ExtKind.AUTO_NAT)),
    ],
)
def test_every_value_parses(text: str, expected: ExtValue) -> None:
    assert parse_ext_value(text) == expected
    assert parse_ext_value(str(expected)) == expected  # and prints back to something that parses the same


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("autonat:", "autonat: must be followed by an IP address"),
        ("autonat:pbx", "autonat: must be followed by an IP address"),
        ("stun:host:0", "the port must be 1-65535"),
        ("stun:host:99999", "the port must be 1-65535"),
        ("stun:[::1", "unclosed ["),
        ("host:bad host", "is not a host name"),
        ("host:", "is not a host name"),
        ("example.org", "is not auto-nat, autonat:IP, auto, an IP address"),
        ("", "is not auto-nat"),
    ],
)
def test_bad_values_are_one_line(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=r".*") as info:
        parse_ext_value(text)
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("router", [ROUTER, None])
@pytest.mark.parametrize(
    ("text", "with_router", "without_router"),
    [
        ("auto-nat", ROUTER, None),
        ("autonat:198.51.100.7", ROUTER, IPv4Address("198.51.100.7")),
        ("auto", LOCAL, LOCAL),
        ("198.51.100.9", IPv4Address("198.51.100.9"), IPv4Address("198.51.100.9")),
    ],
)
def test_resolution_with_and_without_a_router(
    router: IPv4Address | None, text: str, with_router: object, without_router: object
) -> None:
    resolved = resolve(parse_ext_value(text), router_external=router, local=LOCAL)
    assert resolved.address == (with_router if router else without_router)


def test_lookups_resolve_to_their_last_result() -> None:
    value = parse_ext_value("stun:203.0.113.100")
    assert resolve(value, router_external=ROUTER, local=LOCAL) == Resolved(None, "stun lookup pending or failed")
    found = IPv4Address("203.0.113.1")
    assert resolve(value, router_external=None, local=LOCAL, looked_up=found) == Resolved(found, "stun")


def test_order_of_parameters_does_not_matter() -> None:
    # FreeSWITCH sets AUTO_NAT only when ext-rtp-ip is parsed after ext-sip-ip; here each value stands alone.
    sip, rtp = parse_ext_value("auto-nat"), parse_ext_value("198.51.100.9")
    one = Addressing(ext_sip_ip=sip, ext_rtp_ip=rtp)
    two = Addressing(ext_rtp_ip=rtp, ext_sip_ip=sip)
    assert one == two
    resolved_sip = resolve(one.ext_sip_ip, router_external=ROUTER, local=LOCAL)
    resolved_rtp = resolve(one.ext_rtp_ip, router_external=ROUTER, local=LOCAL)
    assert (resolved_sip.address, resolved_rtp.address) == (ROUTER, IPv4Address("198.51.100.9"))


def lan(peer: object) -> bool:
    return ip_address(str(peer)) in __import__("ipaddress").ip_network("192.168.77.0/24")


@pytest.mark.parametrize(
    ("destination", "expected"),
    [
        ("8.8.8.8", ROUTER),
        ("192.168.77.50", LOCAL),  # in local-network-acl
        ("127.0.0.1", LOCAL),  # loopback is never sent the external address
        ("::1", LOCAL),
        ("::ffff:192.168.77.50", LOCAL),  # IPv4-mapped is judged as IPv4
        ("10.1.2.3", ROUTER),  # private but not our LAN: a peer behind another NAT
    ],
)
def test_the_decision(destination: str, expected: IPv4Address) -> None:
    assert choose(destination, local=LOCAL, external=ROUTER, is_local_network=lan) == expected


def test_no_external_address_means_local_and_no_acl_means_everyone_gets_external() -> None:
    assert choose("8.8.8.8", local=LOCAL, external=None, is_local_network=lan) == LOCAL
    assert choose("192.168.77.50", local=LOCAL, external=ROUTER, is_local_network=None) == ROUTER


def test_profile_status_fields() -> None:
    settings = Addressing(sip_port=5080, tls_sip_port=5081, ext_sip_ip=parse_ext_value("auto-nat"))
    sip = Resolved(ROUTER, "router")
    status = profile_status("external", settings, local=LOCAL, sip=sip, rtp=Resolved(None, "not set"), auto_nat=True)
    assert status.ext_sip_ip == ROUTER and status.ext_rtp_ip is None
    assert status.sip_ip == status.rtp_ip == LOCAL
    assert status.url == "sip:mod_sofia@203.0.113.1:5080"
    assert status.bind_url.startswith("sip:mod_sofia@192.168.77.10:5080")
    assert status.tls_url == "sips:mod_sofia@203.0.113.1:5081"
    assert status.auto_nat is True
    shown = status.to_dict()
    assert shown["ext_sip_ip"] == "203.0.113.1" and shown["ext_rtp_ip"] is None and shown["auto_nat"] is True


@given(st.text(max_size=80))
def test_any_text_parses_or_is_a_value_error(text: str) -> None:
    try:
        value = parse_ext_value(text)
    except ValueError as exc:
        assert "\n" not in str(exc).replace(repr(text), "")
        return
    assert isinstance(value, ExtValue)
