"""ACL lists: FreeSWITCH's answers, the `.auto` lists, config and acl.conf.xml import, the compiled lookup
against FreeSWITCH's own walk, and the netlink address dump codec."""

from __future__ import annotations

import functools
import itertools
import socket
import struct
import sys
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
    ip_address,
    ip_network,
)

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from autonat import acl
from autonat.acl import (
    BUILTIN_NAMES,
    MAX_ACL_CONF_SIZE,
    AclError,
    AclList,
    AclNode,
    AclSet,
    IPAddress,
    IPInterface,
    builtin_lists,
    check_ip,
    parse_acl_conf_xml,
    parse_cidr,
)
from autonat.addresses import is_public
from autonat.aio.interfaces import host_networks
from autonat.errors import AutonatError
from autonat.proto import netlink
from autonat.proto.errors import DecodeError

# --- FreeSWITCH's answers, table-driven -------------------------------------------------------------

LAN = ("allow", [("deny", "192.168.42.0/24"), ("allow", "192.168.42.42/32")])  # acl.conf.xml's example
TIE = ("deny", [("allow", "10.0.0.0/8"), ("deny", "10.0.0.0/8")])
TIE_REVERSED = ("allow", [("deny", "10.0.0.0/8"), ("allow", "10.0.0.0/8")])
V6 = ("allow", [("deny", "2001:db8::/32"), ("allow", "2001:db8:1::/48"), ("deny", "2001:db8:1:2::/64")])
ONLY_V6 = ("deny", [("allow", "::/0")])
ONLY_V4 = ("deny", [("allow", "0.0.0.0/0")])
HOST_MASK = ("deny", [("allow", "192.168.1.0/255.255.255.0"), ("deny", "192.168.1.128/255.255.255.128")])
COMMAS = ("deny", [("allow", "10.0.0.0/8, 172.16.0.0/12,192.168.0.0/16"), ("deny", "10.9.9.9,fd00::1")])
BARE = ("deny", [("allow", "198.51.100.7"), ("allow", "2001:db8::7")])
HOST_BITS = ("deny", [("allow", "192.168.1.10/24")])  # switch_parse_cidr masks the host bits off
MAPPED_NODE = ("deny", [("allow", "::ffff:10.0.0.0/104")])  # stored as 10.0.0.0/8
LONGEST_FIRST = ("deny", [("allow", "203.0.113.9/32"), ("deny", "203.0.113.0/24"), ("allow", "203.0.0.0/16")])
SLASH_ZERO = ("deny", [("deny", "203.0.113.0/24"), ("allow", "0.0.0.0/0")])

CASES = [
    (LAN, "192.168.42.42", True),
    (LAN, "192.168.42.1", False),
    (LAN, "192.168.42.255", False),
    (LAN, "192.168.43.1", True),
    (LAN, "8.8.8.8", True),
    (TIE, "10.1.2.3", True),  # equal prefix: the node defined first wins
    (TIE, "11.1.2.3", False),
    (TIE_REVERSED, "10.1.2.3", False),
    (V6, "2001:db8::1", False),
    (V6, "2001:db8:1::1", True),
    (V6, "2001:db8:1:2::1", False),
    (V6, "2001:db8:1:3::1", True),
    (V6, "2001:db9::1", True),
    (V6, "192.168.1.1", True),  # no IPv4 node: the default
    (LAN, "::ffff:192.168.42.42", True),  # IPv4-mapped is looked up as IPv4
    (LAN, "::ffff:192.168.42.1", False),
    (LAN, "::ffff:c0a8:2a01", False),
    (ONLY_V6, "2001:db8::1", True),
    (ONLY_V6, "::1", True),
    (ONLY_V6, "1.2.3.4", False),  # an IPv4 address never matches an IPv6 node
    (ONLY_V6, "::ffff:1.2.3.4", False),  # nor does an IPv4-mapped one
    (ONLY_V4, "1.2.3.4", True),
    (ONLY_V4, "::ffff:1.2.3.4", True),
    (ONLY_V4, "::1", False),  # an IPv6 address never matches an IPv4 node
    (ONLY_V4, "::", False),
    (HOST_MASK, "192.168.1.9", True),
    (HOST_MASK, "192.168.1.200", False),
    (HOST_MASK, "192.168.2.1", False),
    (COMMAS, "10.1.1.1", True),
    (COMMAS, "172.31.0.1", True),
    (COMMAS, "192.168.7.7", True),
    (COMMAS, "10.9.9.9", False),
    (COMMAS, "fd00::1", False),
    (COMMAS, "172.32.0.1", False),
    (BARE, "198.51.100.7", True),
    (BARE, "198.51.100.8", False),
    (BARE, "2001:db8::7", True),
    (BARE, "2001:db8::8", False),
    (HOST_BITS, "192.168.1.99", True),
    (HOST_BITS, "192.168.2.99", False),
    (MAPPED_NODE, "10.20.30.40", True),
    (MAPPED_NODE, "::ffff:10.20.30.40", True),
    (MAPPED_NODE, "11.0.0.1", False),
    (LONGEST_FIRST, "203.0.113.9", True),
    (LONGEST_FIRST, "203.0.113.10", False),
    (LONGEST_FIRST, "203.0.5.5", True),
    (LONGEST_FIRST, "203.1.0.1", False),
    (SLASH_ZERO, "203.0.113.1", False),
    (SLASH_ZERO, "0.0.0.0", True),
    (SLASH_ZERO, "255.255.255.255", True),
    (SLASH_ZERO, "2001:db8::1", False),
]


@pytest.mark.parametrize(("spec", "address", "expected"), CASES)
def test_freeswitch_answers(spec: tuple[str, list[tuple[str, str]]], address: str, expected: bool) -> None:
    default, nodes = spec
    lan = AclList.from_config("lan", default, nodes)
    acls = AclSet([lan])
    parsed = ip_address(address)
    assert lan.lookup(address) is expected
    assert lan.lookup(parsed) is expected
    assert acls.lookup(address, "lan") is expected
    assert acls.lookup(parsed, "lan") is expected
    assert lan.explain(address).allowed is expected


def test_explain_names_the_deciding_node() -> None:
    lan = AclList.from_config("lan", *LAN)
    verdict = lan.explain("192.168.42.42")
    assert (verdict.allowed, verdict.node_number, str(verdict.node)) == (True, 2, "allow 192.168.42.42/32")
    assert verdict.describe() == "192.168.42.42: allow by lan (node 2: allow 192.168.42.42/32)"
    default = lan.explain("::ffff:8.8.8.8")
    assert (default.address, default.node, default.node_number) == (IPv4Address("8.8.8.8"), None, None)
    assert default.describe() == "8.8.8.8: allow by lan (no node matches: the list's default)"
    tie = AclList.from_config("tie", *TIE).explain("10.1.2.3")
    assert (tie.node_number, tie.allowed) == (1, True)


def test_nodes_keep_their_order_and_comma_lists_expand_left_to_right() -> None:
    built = AclList.from_config("c", "deny", [("allow", "10.0.0.0/8,172.16.0.0/12"), ("DENY", " 10.1.0.0 / 16 ")])
    assert [str(node) for node in built.nodes] == ["allow 10.0.0.0/8", "allow 172.16.0.0/12", "deny 10.1.0.0/16"]
    assert built.default is False


def test_mapped_nodes_become_ipv4_and_others_stay() -> None:
    assert AclNode(True, IPv6Network("::ffff:0:0/96")).network == IPv4Network("0.0.0.0/0")
    assert AclNode(True, IPv6Network("::ffff:192.168.1.0/120")).network == IPv4Network("192.168.1.0/24")
    assert AclNode(True, IPv6Network("::/80")).network == IPv6Network("::/80")
    with pytest.raises(TypeError):
        AclNode(True, "10.0.0.0/8")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "network"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("10.1.2.3", "10.1.2.3/32"),
        ("10.1.2.3/0", "0.0.0.0/0"),
        ("192.168.1.77/255.255.255.0", "192.168.1.0/24"),
        ("192.168.1.77/0.0.0.0", "0.0.0.0/0"),
        ("192.168.1.77/255.255.255.255", "192.168.1.77/32"),
        ("2001:db8::1", "2001:db8::1/128"),
        ("2001:db8::1/32", "2001:db8::/32"),
        (" fe80::/10 ", "fe80::/10"),
        ("10.0.0.0/08", "10.0.0.0/8"),
    ],
)
def test_parse_cidr(text: str, network: str) -> None:
    assert parse_cidr(text) == ip_network(network)


def test_ipv4address_keeps_its_integer_in_ip() -> None:
    # The fast path reads the private `_ip` slot instead of calling int(); pin the assumption.
    assert IPv4Address("1.2.3.4")._ip == 0x01020304  # type: ignore[attr-defined]
    assert IPv6Address("::ffff:1.2.3.4")._ip == 0xFFFF01020304  # type: ignore[attr-defined]


# --- Built-in lists -----------------------------------------------------------------------------------

HOST: list[tuple[str, IPInterface]] = [
    ("lo", IPv4Interface("127.0.0.1/8")),
    ("lo", IPv6Interface("::1/128")),
    ("eth0", IPv4Interface("192.168.1.10/24")),
    ("wg0", IPv4Interface("10.8.0.2/24")),
    ("eth0", IPv6Interface("2001:db8:1::10/64")),
    ("eth0", IPv6Interface("fe80::1/64")),
    ("eth0:1", IPv4Interface("192.168.1.11/24")),  # a second address on the same LAN
]

BUILTIN_CASES = [
    ("localnet.auto", "192.168.1.50", True),
    ("localnet.auto", "10.8.0.9", True),  # FreeSWITCH would only know one of the two LANs
    ("localnet.auto", "2001:db8:1::99", True),
    ("localnet.auto", "fe80::5", True),
    ("localnet.auto", "::ffff:192.168.1.50", True),
    ("localnet.auto", "127.0.0.1", False),  # loopback excluded
    ("localnet.auto", "::1", False),
    ("localnet.auto", "10.9.0.1", False),
    ("localnet.auto", "8.8.8.8", False),
    ("localnet.auto", "2001:db8:2::1", False),
    ("nat.auto", "192.168.1.50", False),  # our LAN is not "behind a NAT"
    ("nat.auto", "10.8.0.9", False),
    ("nat.auto", "10.1.2.3", True),
    ("nat.auto", "172.20.0.1", True),
    ("nat.auto", "192.168.2.1", True),
    ("nat.auto", "100.64.1.1", True),
    ("nat.auto", "8.8.8.8", False),
    ("nat.auto", "fd00::1", False),
    ("rfc1918.auto", "10.0.0.1", True),
    ("rfc1918.auto", "172.16.0.1", True),
    ("rfc1918.auto", "172.32.0.1", False),
    ("rfc1918.auto", "192.168.255.255", True),
    ("rfc1918.auto", "100.64.0.1", False),
    ("rfc1918.auto", "fd00::1", False),
    ("rfc6598.auto", "100.64.0.1", True),
    ("rfc6598.auto", "100.127.255.255", True),
    ("rfc6598.auto", "100.128.0.1", False),
    ("loopback.auto", "127.0.0.1", True),
    ("loopback.auto", "127.255.255.254", True),
    ("loopback.auto", "::1", True),
    ("loopback.auto", "::2", False),
    ("loopback.auto", "192.168.1.10", False),
    ("wan.auto", "8.8.8.8", True),
    ("wan.auto", "2606:4700::1111", True),
    ("wan.auto", "203.0.113.5", True),  # documentation ranges count as public (autonat.addresses)
    ("wan.auto", "192.168.1.50", False),
    ("wan.auto", "100.64.0.1", False),
    ("wan.auto", "127.0.0.1", False),
    ("wan.auto", "169.254.1.1", False),
    ("wan.auto", "224.0.0.1", False),
    ("wan.auto", "255.255.255.255", False),
    ("wan.auto", "0.1.2.3", False),
    ("wan.auto", "fe80::1", False),
    ("wan.auto", "fd12::1", False),
    ("wan.auto", "ff02::1", False),
    ("wan.auto", "::1", False),
    ("wan.auto", "::", False),
    ("wan.auto", "::ffff:8.8.8.8", True),
    ("wan.auto", "::ffff:10.0.0.1", False),
    ("wan_v4.auto", "8.8.8.8", True),
    ("wan_v4.auto", "10.0.0.1", False),
    ("wan_v4.auto", "2606:4700::1111", False),
    ("wan_v6.auto", "2606:4700::1111", True),
    ("wan_v6.auto", "fe80::1", False),
    ("wan_v6.auto", "8.8.8.8", False),
    ("wan_v6.auto", "::ffff:8.8.8.8", False),
    ("any_v4.auto", "8.8.8.8", True),
    ("any_v4.auto", "10.0.0.1", True),
    ("any_v4.auto", "::ffff:10.0.0.1", True),
    ("any_v4.auto", "::1", False),
    ("any_v6.auto", "::1", True),
    ("any_v6.auto", "2001:db8::1", True),
    ("any_v6.auto", "8.8.8.8", False),
]


@pytest.mark.parametrize(("name", "address", "expected"), BUILTIN_CASES)
def test_builtin_lists(name: str, address: str, expected: bool) -> None:
    acls = AclSet(interfaces=HOST)
    assert acls.lookup(address, name) is expected
    assert acls.explain(address, name).allowed is expected


def test_nat_auto_freeswitch_example() -> None:
    acls = AclSet(interfaces=[("eth0", IPv4Interface("192.168.1.10/24"))])
    answers = {ip: acls.lookup(ip, "nat.auto") for ip in ("192.168.1.50", "10.1.2.3", "8.8.8.8")}
    assert answers == {"192.168.1.50": False, "10.1.2.3": True, "8.8.8.8": False}


def test_nat_auto_lan_of_exactly_10_8_wins_the_tie() -> None:
    acls = AclSet(interfaces=[("eth0", IPv4Interface("10.0.0.5/8"))])
    assert acls.lookup("10.1.2.3", "nat.auto") is False
    assert acls.lookup("172.16.0.1", "nat.auto") is True


def test_builtin_names_and_no_interfaces() -> None:
    lists = builtin_lists([])
    assert tuple(acl_list.name for acl_list in lists) == BUILTIN_NAMES
    acls = AclSet()
    assert set(BUILTIN_NAMES) <= set(acls.names)
    assert acls.lookup("192.168.1.1", "localnet.auto") is False
    assert acls.lookup("192.168.1.1", "nat.auto") is True
    assert acls.get("localnet.auto").nodes == ()


def test_localnet_lists_each_network_once_in_order() -> None:
    (localnet,) = (item for item in builtin_lists(HOST) if item.name == "localnet.auto")
    assert [str(node) for node in localnet.nodes] == [
        "allow 192.168.1.0/24",
        "allow 10.8.0.0/24",
        "allow 2001:db8:1::/64",
        "allow fe80::/64",
    ]


def test_refresh_recomputes_the_auto_lists_and_keeps_user_lists() -> None:
    user = AclList.from_config("lan", *LAN)
    acls = AclSet([user], [("eth0", IPv4Interface("192.168.1.10/24"))])
    assert acls.lookup("192.168.1.50", "localnet.auto") is True
    acls.refresh([("eth0", IPv4Interface("172.16.5.10/16"))])
    assert acls.lookup("192.168.1.50", "localnet.auto") is False
    assert acls.lookup("172.16.200.1", "localnet.auto") is True
    assert acls.lookup("172.16.200.1", "nat.auto") is False
    assert acls.lookup("192.168.42.42", "lan") is True
    assert acls.get("lan") is user


# --- The registry -------------------------------------------------------------------------------------


def test_unknown_list_suggests_the_closest_name() -> None:
    acls = AclSet()
    with pytest.raises(AclError) as caught:
        acls.lookup("1.2.3.4", "localnet.atuo")
    assert str(caught.value) == 'unknown ACL list "localnet.atuo" (did you mean "localnet.auto"?)'
    assert caught.value.exit_code == 2
    assert isinstance(caught.value, AutonatError)


def test_unknown_list_without_a_close_name_lists_the_known_ones() -> None:
    acls = AclSet([AclList.from_config("trunks", "deny", [])])
    with pytest.raises(AclError, match=r'^unknown ACL list "zzz" \(known lists: any_v4\.auto, .*trunks.*\)$'):
        acls.lookup("1.2.3.4", "zzz")
    with pytest.raises(AclError, match="did you mean"):
        acls.get("trunk")
    with pytest.raises(AclError):
        acls.explain("1.2.3.4", "nope")
    assert "trunks" in acls
    assert "trunk" not in acls


def test_user_lists_may_not_take_auto_names_or_repeat() -> None:
    with pytest.raises(AclError, match=r'"localnet\.auto": names ending in \.auto'):
        AclSet([AclList.from_config("localnet.auto", "allow", [])])
    with pytest.raises(AclError, match=r'"mine\.auto"'):
        AclSet([AclList.from_config("mine.auto", "allow", [])])
    with pytest.raises(AclError, match="defined twice"):
        AclSet([AclList.from_config("a", "allow", []), AclList.from_config("a", "deny", [])])


@pytest.mark.parametrize("bad", ["not-an-ip", "", "1.2.3", "01.2.3.4", "1.2.3.4\n", "::ffff:1.2.3.04", "x" * 500])
def test_bad_address_text_is_one_line_acl_error(bad: str) -> None:
    acls = AclSet()
    for lookup in (acls.get("wan.auto").lookup, functools.partial(acls.lookup, list_name="wan.auto")):
        with pytest.raises(AclError, match="is not an IP address") as caught:
            lookup(bad)
        assert "\n" not in str(caught.value)
        assert len(str(caught.value)) < 120


def test_wrong_type_is_a_type_error() -> None:
    acls = AclSet()
    with pytest.raises(TypeError, match="not int"):
        acls.lookup(42, "wan.auto")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        acls.get("wan.auto").lookup(b"1.2.3.4")  # type: ignore[arg-type]


def test_scoped_ipv6_text_is_looked_up_without_its_scope() -> None:
    acls = AclSet(interfaces=HOST)
    assert acls.lookup("fe80::5%eth0", "localnet.auto") is True


def test_check_ip() -> None:
    acls = AclSet([AclList.from_config("lan", *LAN)], HOST)
    verdict = check_ip(" 192.168.42.1 ", "lan", acls)
    assert (verdict.allowed, verdict.list_name, verdict.node_number) == (False, "lan", 1)
    assert check_ip("::ffff:192.168.1.7", "localnet.auto", acls).address == IPv4Address("192.168.1.7")
    with pytest.raises(AclError, match="is not an IP address"):
        check_ip("192.168.1.300", "lan", acls)
    with pytest.raises(AclError, match='did you mean "lan"'):
        check_ip("192.168.1.3", "lna", acls)


@pytest.mark.skipif(sys.platform != "linux", reason="reads the host's interfaces over rtnetlink")
def test_check_ip_on_this_host() -> None:
    acls = AclSet((), host_networks())
    assert check_ip("127.0.0.1", "loopback.auto", acls).allowed is True
    assert check_ip("8.8.8.8", "wan.auto", acls).allowed is True


# --- Bad config -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "default", "nodes", "message"),
    [
        ("lan", "maybe", [], 'ACL list "lan": the default must be "allow" or "deny", not "maybe"'),
        ("lan", "allow", [("permit", "10.0.0.0/8")], 'node 1 (permit "10.0.0.0/8"): the action must be "allow"'),
        ("lan", "allow", [("allow", "10.0.0.0/8"), ("deny", "10.0.0.300/8")], 'node 2 (deny "10.0.0.300/8")'),
        ("lan", "allow", [("deny", "10.0.0.0/33")], "prefix length /33 is over 32"),
        ("lan", "allow", [("deny", "2001:db8::/129")], "prefix length /129 is over 128"),
        ("lan", "allow", [("deny", "10.0.0.0/-8")], "is not a prefix length"),
        ("lan", "allow", [("deny", "10.0.0.0/8x")], "is not a prefix length"),
        ("lan", "allow", [("deny", "10.0.0.0/")], "is not a prefix length"),
        ("lan", "allow", [("deny", "2001:db8::/ffff::")], "is not a prefix length"),
        ("lan", "allow", [("deny", "192.168.1.0/255.0.255.0")], "netmask 255.0.255.0 is not contiguous"),
        ("lan", "allow", [("deny", "192.168.1.0/0.0.0.255")], "netmask 0.0.0.255 is not contiguous"),
        ("lan", "allow", [("deny", "192.168.1.0/255.255.256.0")], "is not a netmask"),
        ("lan", "allow", [("deny", "10.0.0.0/8,")], "empty CIDR"),
        ("lan", "allow", [("deny", "")], "empty CIDR"),
        ("lan", "allow", [("deny", "fe80::1%eth0/64")], "has a scope"),
        ("lan", "allow", [("deny", "lan.example.com/24")], '"lan.example.com" is not an IP address'),
        ("lan", "allow", [("deny", "10.0.0.0/8\n<evil>")], r"\n"),
        ("", "allow", [], "bad ACL list name"),
        ("two words", "allow", [], "bad ACL list name"),
        ("bad\nname", "allow", [], "bad ACL list name"),
    ],
)
def test_bad_config_is_one_line_naming_list_and_node(
    name: str, default: str, nodes: list[tuple[str, str]], message: str
) -> None:
    with pytest.raises(AclError) as caught:
        AclList.from_config(name, default, nodes)
    text = str(caught.value)
    assert message in text
    assert "\n" not in text
    if name == "lan" and nodes:
        assert text.startswith('ACL list "lan" node ')


# --- acl.conf.xml -----------------------------------------------------------------------------------------

ACL_CONF = b"""<?xml version="1.0" encoding="utf-8"?>
<configuration name="acl.conf" description="Network Lists">
  <network-lists>
    <!--
         These ACL's are automatically created on startup.

         rfc1918.auto  - RFC1918 Space
         nat.auto      - RFC1918 Excluding your local lan.
         localnet.auto - ACL for your local lan.
         loopback.auto - ACL for your local lan.
    -->
    <list name="lan" default="allow">
      <node type="deny" cidr="192.168.42.0/24"/>
      <node type="allow" cidr="192.168.42.42/32"/>
    </list>

    <!--
        This will traverse the directory adding all users
        with the cidr= tag to this ACL, when this ACL matches
        the users variables and params apply as if they
        digest authenticated.
    -->
    <list name="domains" default="deny">
      <!-- domain= is special it scans the domain from the directory to build the ACL -->
      <node type="allow" domain="$${domain}"/>
      <!-- use cidr= if you wish to allow ip ranges to this domains acl. -->
      <!-- <node type="allow" cidr="192.168.0.0/24"/> -->
    </list>

    <list name="trunks" default="deny">
      <node type="allow" cidr="203.0.113.0/24,198.51.100.7/32"/>
      <node type="allow" host="192.0.2.0" mask="255.255.255.128"/>
      <node type="allow" host="sip.example.com" mask="255.255.255.255"/>
      <node type="allow" cidr="100.64.0.0/10" port="5060"/>
      <node type="allow" cidr="2001:db8:5::/48" description="carrier B"/>
      <node cidr="203.0.113.66"/>
    </list>

    <list name="open">
      <node type="deny" cidr="$${local_ip_v4}/32"/>
      <X-PRE-PROCESS cmd="include" data="more-nodes/*.xml"/>
    </list>
  </network-lists>
</configuration>
"""


def test_acl_conf_xml_import() -> None:
    warnings: list[str] = []
    lists = parse_acl_conf_xml(ACL_CONF, warnings)
    by_name = {item.name: item for item in lists}
    assert list(by_name) == ["lan", "domains", "trunks", "open"]
    lan, domains, trunks, open_list = by_name.values()
    assert lan == AclList.from_config("lan", *LAN)
    assert (domains.default, domains.nodes) == (False, ())
    assert [str(node) for node in trunks.nodes] == [
        "allow 203.0.113.0/24",
        "allow 198.51.100.7/32",
        "allow 192.0.2.0/25",
        "allow 2001:db8:5::/48",
        "deny 203.0.113.66/32",  # no type=: the list's default (switch_load_network_lists)
    ]
    assert (open_list.default, open_list.nodes) == (True, ())  # no default=: allow
    assert len(warnings) == 6
    joined = "\n".join(warnings)
    for expected in (
        'list "domains" node 1: domain="$${domain}" takes its users\' cidr= from FreeSWITCH\'s directory; skipped',
        'list "trunks" node 3: host="sip.example.com" is a name, which needs a resolver; skipped',
        'list "trunks" node 4: port restrict(s) the node to ports',
        'list "trunks" node 5: attributes description ignored',
        'list "open" node 1: "$${local_ip_v4}/32" uses a FreeSWITCH variable; skipped',
        'list "open" node 2: <X-PRE-PROCESS> is FreeSWITCH\'s preprocessor; skipped',
    ):
        assert expected in joined
    acls = AclSet(lists, HOST)
    assert acls.lookup("192.168.42.42", "lan") is True
    assert acls.lookup("203.0.113.66", "trunks") is False
    assert acls.lookup("192.0.2.100", "trunks") is True
    assert acls.lookup("192.0.2.200", "trunks") is False


def test_acl_conf_xml_inside_a_freeswitch_document() -> None:
    document = (
        b'<document type="freeswitch/xml"><section name="languages"/><section name="configuration">'
        b'<configuration name="switch.conf"/><configuration name="acl.conf"><network-lists>'
        b'<list name="lan" default="deny"><node type="allow" cidr="10.0.0.0/8"/></list>'
        b"</network-lists></configuration></section></document>"
    )
    (lan,) = parse_acl_conf_xml(document)
    assert lan == AclList.from_config("lan", "deny", [("allow", "10.0.0.0/8")])
    assert parse_acl_conf_xml(b'<configuration name="acl.conf"><network-lists/></configuration>') == []


BOMB = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<configuration name="acl.conf"><network-lists><list name="&lol9;"/></network-lists></configuration>
"""

EXTERNAL = b"""<?xml version="1.0"?>
<!DOCTYPE configuration [<!ENTITY passwd SYSTEM "file:///etc/passwd">]>
<configuration name="acl.conf"><network-lists><list name="&passwd;"/></network-lists></configuration>
"""


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (BOMB, "refused (DTDForbidden"),
        (EXTERNAL, "refused (DTDForbidden"),
        (b"<configuration name='acl.conf'><network-lists>", "not well-formed XML"),
        (b"\xff\xfe garbage", "not well-formed XML"),
        (b"", "not well-formed XML"),
        (b"<include/>", 'the root is <include>, not <configuration name="acl.conf">'),
        (b'<configuration name="switch.conf"/>', "the root is <configuration>"),
        (b"<document><section name='configuration'/></document>", 'no <configuration name="acl.conf"> in'),
        (b'<configuration name="acl.conf"/>', "no <network-lists>"),
        (b'<configuration name="acl.conf"><network-lists><lists/></network-lists></configuration>', "<lists>"),
        (b'<configuration name="acl.conf"><network-lists><list/></network-lists></configuration>', "no name"),
        (
            b'<configuration name="acl.conf"><network-lists><list name="a"/><list name="a"/></network-lists>'
            b"</configuration>",
            'list "a" is defined twice',
        ),
        (
            b'<configuration name="acl.conf"><network-lists><list name="a"><nodes/></list></network-lists>'
            b"</configuration>",
            'unexpected <nodes> in list "a"',
        ),
        (
            b'<configuration name="acl.conf"><network-lists><list name="a"><node type="allow"/></list>'
            b"</network-lists></configuration>",
            'list "a" node 1 has neither cidr= nor host= with mask=',
        ),
        (
            b'<configuration name="acl.conf"><network-lists><list name="a"><node type="allow" cidr="10.0.0.0/8"/>'
            b'<node type="allow" cidr="10.0.0.0/40"/></list></network-lists></configuration>',
            'ACL list "a" node 2 (allow "10.0.0.0/40"): prefix length /40 is over 32',
        ),
        (
            b'<configuration name="acl.conf"><network-lists><list name="a"><node type="yes" cidr="10.0.0.0/8"/>'
            b"</list></network-lists></configuration>",
            'node 1 (yes "10.0.0.0/8"): the action must be',
        ),
        (
            b'<configuration name="acl.conf"><network-lists><list name="a" default="true"/></network-lists>'
            b"</configuration>",
            'ACL list "a": the default must be',
        ),
    ],
)
def test_bad_acl_conf_xml_is_one_line(data: bytes, message: str) -> None:
    with pytest.raises(AclError) as caught:
        parse_acl_conf_xml(data)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_oversize_acl_conf_xml_is_refused_before_parsing() -> None:
    padding = b"<!--" + b"x" * MAX_ACL_CONF_SIZE + b"-->"
    data = b'<configuration name="acl.conf"><network-lists/>' + padding + b"</configuration>"
    with pytest.raises(AclError, match=r"bytes, over the 256 KiB limit"):
        parse_acl_conf_xml(data)


# --- The compiled lookup against FreeSWITCH's walk (hypothesis) ----------------------------------------

V4_ANCHORS = (0x00000000, 0x0A000000, 0xC0A82A00, 0x7F000000, 0xFFFFF000)
V6_ANCHORS = (0, 0x20010DB8 << 96, (0x20010DB8 << 96) | (1 << 80), 0xFFFF << 32, 0xFE80 << 112, (1 << 128) - (1 << 20))


@st.composite
def addresses(draw: st.DrawFn, version: int | None = None) -> IPAddress:
    version = version or draw(st.sampled_from((4, 6)))
    bits = 32 if version == 4 else 128
    anchor = draw(st.sampled_from(V4_ANCHORS if version == 4 else V6_ANCHORS))
    value = (anchor + draw(st.integers(0, (1 << 20) - 1))) % (1 << bits)
    if draw(st.integers(0, 9)) == 0:
        value = draw(st.integers(0, (1 << bits) - 1))
    return IPv4Address(value) if version == 4 else IPv6Address(value)


@st.composite
def nodes(draw: st.DrawFn) -> AclNode:
    address = draw(addresses())
    bits = address.max_prefixlen
    prefix = draw(st.one_of(st.integers(0, bits), st.integers(max(0, bits - 24), bits)))
    network = ip_network((address, prefix), strict=False)
    return AclNode(draw(st.booleans()), network)


def freeswitch_walk(acl_list: AclList, ip: IPAddress) -> bool:
    """switch_network_list_validate_ip6_port_token, literally: nodes were prepended, so the walk goes
    from the last defined to the first, keeping every match at least as long as the best so far."""
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    ok, bits = acl_list.default, 0
    for node in reversed(acl_list.nodes):
        if node.network.version != ip.version:
            continue
        if node.network.prefixlen >= bits and ip in node.network:
            ok, bits = node.allow, node.network.prefixlen
    return ok


def probes(acl_list: AclList, extra: list[IPAddress]) -> list[IPAddress]:
    """The extra addresses, every node's edges and their neighbours, and their IPv4-mapped forms."""
    found: list[IPAddress] = list(extra)
    for node in acl_list.nodes:
        network = node.network
        top = (1 << network.max_prefixlen) - 1
        first, last = int(network.network_address), int(network.broadcast_address)
        for value in (first - 1, first, last, last + 1):
            if 0 <= value <= top:
                found.append(IPv4Address(value) if network.version == 4 else IPv6Address(value))
    found += [IPv6Address(0xFFFF00000000 | int(ip)) for ip in list(found) if ip.version == 4]
    return found


@settings(max_examples=400)
@given(
    default=st.booleans(),
    node_list=st.lists(nodes(), max_size=14),
    extra=st.lists(addresses(), max_size=20),
)
@example(
    default=True,
    node_list=[AclNode(True, IPv4Network("10.0.0.0/8")), AclNode(False, IPv4Network("10.0.0.0/8"))],
    extra=[],
)
@example(
    default=False, node_list=[AclNode(True, IPv6Network("::/0")), AclNode(False, IPv4Network("0.0.0.0/0"))], extra=[]
)
def test_compiled_lookup_matches_freeswitch_walk(
    default: bool, node_list: list[AclNode], extra: list[IPAddress]
) -> None:
    acl_list = AclList("random", default, tuple(node_list))
    acls = AclSet([acl_list])
    for ip in probes(acl_list, extra):
        expected = freeswitch_walk(acl_list, ip)
        assert acl_list.lookup(ip) is expected, (ip, acl_list)
        assert acls.lookup(str(ip), "random") is expected, (ip, acl_list)
        assert acl_list.explain(ip).allowed is expected
    for starts, answers in acl_list._tables:
        assert starts[0] == 0
        assert all(a < b for a, b in itertools.pairwise(starts))
        assert all(a != b for a, b in itertools.pairwise(answers))  # minimal: neighbours differ


@settings(max_examples=300)
@given(ip=st.one_of(st.ip_addresses(), addresses()))
def test_wan_auto_agrees_with_is_public(ip: IPAddress) -> None:
    acls = AclSet(interfaces=HOST)
    public = is_public(ip)
    mapped = ip.version == 4 or (isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None)
    assert acls.lookup(ip, "wan.auto") is public
    assert acls.lookup(ip, "wan_v4.auto") is (public and mapped)
    assert acls.lookup(ip, "wan_v6.auto") is (public and not mapped)
    assert acls.lookup(ip, "any_v4.auto") is mapped
    assert acls.lookup(ip, "any_v6.auto") is (not mapped)


ADDRESSISH = st.text(alphabet="0123456789abcdefABCDEF:.%x/ ", max_size=45)


@settings(max_examples=400)
@given(
    text=st.one_of(
        ADDRESSISH,
        st.ip_addresses().map(str),
        st.ip_addresses(v=6).map(lambda ip: ip.exploded),
        st.ip_addresses(v=4).map(lambda ip: f"::ffff:{ip}"),
        st.ip_addresses(v=4).map(lambda ip: f"1:2:3:4:5:6:{ip}"),
    )
)
@example(text="1:2:3:4:5:6:7::")
@example(text="::1.2.3.4")
@example(text="1.2.3.4%eth0")
@example(text="fe80::1%1")
@example(text="\x00")
@example(text="\ud800")
@example(text="\u0661.\u0662.\u0663.\u0664")  # Arabic-Indic digits: str.isdigit() but not an address
def test_fast_text_parser_agrees_with_ipaddress(text: str) -> None:
    try:
        expected = acl._address_key(ip_address(text))
    except ValueError:
        with pytest.raises(AclError, match="is not an IP address"):
            acl._parse_key(text)
    else:
        assert acl._parse_key(text) == expected


# --- The host's interfaces (netlink codec) -------------------------------------------------------------


def rtattr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * ((-length) % 4)


def newaddr(seq: int, family: int, prefix: int, index: int, attrs: bytes, kind: int = 20) -> bytes:
    body = struct.pack("=BBBBI", family, prefix, 0, 0, index) + attrs
    return struct.pack("=IHHII", 16 + len(body), kind, 2, seq, 0) + body


def done(seq: int) -> bytes:
    return struct.pack("=IHHII", 20, 3, 2, seq, 0) + b"\0" * 4


def test_getaddr_request_layout() -> None:
    request = netlink.build_getaddr_dump(9)
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", request)
    assert (length, kind, flags, seq) == (len(request), 22, 0x301, 9)
    assert request[16] == socket.AF_UNSPEC


def test_getaddr_reply_parsing() -> None:
    ptp = newaddr(  # a point-to-point link: IFA_ADDRESS is the peer, IFA_LOCAL is ours
        5,
        socket.AF_INET,
        32,
        3,
        rtattr(1, bytes([10, 9, 0, 1])) + rtattr(2, bytes([10, 9, 0, 2])) + rtattr(3, b"tun0\0"),
    )
    lan = newaddr(5, socket.AF_INET, 24, 2, rtattr(2, bytes([192, 168, 1, 10])) + rtattr(3, b"eth0:1\0"))
    v6 = newaddr(5, socket.AF_INET6, 64, 2, rtattr(1, IPv6Address("2001:db8::10").packed))
    other_seq = newaddr(4, socket.AF_INET, 24, 2, rtattr(2, bytes([1, 1, 1, 1])))
    other_family = newaddr(5, 17, 0, 2, rtattr(1, b"\0" * 6))
    entries, finished = netlink.parse_getaddr_reply(ptp + lan + other_seq + v6 + other_family, 5)
    assert finished is False
    assert entries == [
        (3, "tun0", IPv4Interface("10.9.0.2/32")),
        (2, "eth0:1", IPv4Interface("192.168.1.10/24")),
        (2, None, IPv6Interface("2001:db8::10/64")),
    ]
    assert netlink.parse_getaddr_reply(done(5), 5) == ([], True)
    assert netlink.parse_getaddr_reply(lan + done(5), 5)[1] is True


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (struct.pack("=IHHII", 20, 2, 0, 5, 0) + struct.pack("=i", -1), r"refused \(errno 1\)"),
        (struct.pack("=IHHII", 400, 20, 0, 5, 0), "message length out of bounds"),
        (newaddr(5, socket.AF_INET, 24, 2, struct.pack("=HH", 40, 2) + b"\0" * 4), "attribute length out of bounds"),
    ],
    ids=["kernel error", "message overruns", "attribute overruns"],
)
def test_getaddr_reply_errors(data: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        netlink.parse_getaddr_reply(data, 5)


@pytest.mark.skipif(sys.platform != "linux", reason="reads the host's interfaces over rtnetlink")
def test_host_networks_on_this_host() -> None:
    found = host_networks()
    assert found, "a Linux host has at least one address"
    for name, interface in found:
        assert isinstance(name, str)
        assert name
        assert isinstance(interface, IPv4Interface | IPv6Interface)
    acls = AclSet((), found)
    for _, interface in found:
        expected = not interface.ip.is_loopback
        assert acls.lookup(interface.ip, "localnet.auto") is expected
