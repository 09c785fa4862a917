"""ACLs and the `.auto` lists against the lab's IPv6 prefixes (issue 15, item 5): the LAN host's stable and
temporary addresses on 2001:db8:0:77::/64, its link-local address, and the wan host on 2001:db8:0:1::/64."""

from __future__ import annotations

from ipaddress import IPv4Interface, IPv6Interface, IPv6Network

import pytest

from autonat.acl import AclList, AclSet, builtin_lists
from autonat.addresses import is_public
from autonat.lab import Lab

# The LAN host's interfaces as `aio.interfaces.host_networks` reports them in the lab.
LAN_HOST = [
    ("lo", IPv4Interface("127.0.0.1/8")),
    ("lo", IPv6Interface("::1/128")),
    ("eth0", IPv4Interface(f"{Lab.LAN_ADDRESS}/24")),
    ("eth0", IPv6Interface(f"{Lab.LAN6_ADDRESS}/64")),
    ("eth0", IPv6Interface(f"{Lab.LAN6_TEMPORARY}/64")),
    ("eth0", IPv6Interface("fe80::5eed:ff:fe00:10/64")),
]
LAN6_PEER = "2001:db8:0:77::20"  # another host on our IPv6 LAN


def test_lab_prefixes_are_what_the_tests_assume() -> None:
    lan = IPv6Network(Lab.LAN6_NET)
    for address in (Lab.LAN6_ADDRESS, Lab.LAN6_TEMPORARY, Lab.GATEWAY6, LAN6_PEER):
        assert IPv6Network(f"{address}/128").subnet_of(lan), address
    assert not IPv6Network(Lab.WAN6_NET).overlaps(lan)


@pytest.mark.parametrize(
    ("list_name", "address", "allowed"),
    [
        # localnet.auto: our IPv6 LAN (stable and temporary addresses share one /64, listed once) and link.
        ("localnet.auto", LAN6_PEER, True),
        ("localnet.auto", Lab.LAN6_TEMPORARY, True),
        ("localnet.auto", Lab.GATEWAY6, True),
        ("localnet.auto", "fe80::1", True),
        ("localnet.auto", Lab.WAN6_HOST, False),
        ("localnet.auto", Lab.ROUTER_WAN6, False),
        # nat.auto: IPv6 has no NAT; a peer in our own prefix or on the internet is not "behind a NAT".
        ("nat.auto", LAN6_PEER, False),
        ("nat.auto", Lab.WAN6_HOST, False),
        ("nat.auto", "fd00::5", False),
        # wan.auto / wan_v6.auto: the documentation prefix counts as public (autonat.addresses), so the
        # lab's wan host is a WAN peer, and so is our own global address; link-local and ULA are not.
        ("wan.auto", Lab.WAN6_HOST, True),
        ("wan_v6.auto", Lab.WAN6_HOST, True),
        ("wan_v4.auto", Lab.WAN6_HOST, False),
        ("wan_v6.auto", Lab.LAN6_ADDRESS, True),
        ("wan_v6.auto", "fe80::1", False),
        ("wan_v6.auto", "fd00::5", False),
        ("any_v6.auto", Lab.WAN6_HOST, True),
        ("any_v4.auto", Lab.WAN6_HOST, False),
        ("rfc1918.auto", LAN6_PEER, False),
        ("loopback.auto", "::1", True),
    ],
)
def test_auto_lists_on_the_lab_lan_host(list_name: str, address: str, allowed: bool) -> None:
    acls = AclSet(interfaces=LAN_HOST)
    assert acls.lookup(address, list_name) is allowed
    assert acls.explain(address, list_name).allowed is allowed


def test_localnet_auto_lists_the_lab_ipv6_prefix_once() -> None:
    (localnet,) = (acl for acl in builtin_lists(LAN_HOST) if acl.name == "localnet.auto")
    assert [str(node) for node in localnet.nodes] == [
        f"allow {Lab.LAN_ADDRESS.rsplit('.', 1)[0]}.0/24",
        f"allow {Lab.LAN6_NET}",
        "allow fe80::/64",
    ]


def test_wan_auto_agrees_with_is_public_on_lab_addresses() -> None:
    acls = AclSet(interfaces=LAN_HOST)
    for address in (Lab.WAN6_HOST, Lab.ROUTER_WAN6, Lab.GATEWAY6, Lab.LAN6_ADDRESS, "fe80::1", "fd00::1"):
        assert acls.lookup(address, "wan.auto") is is_public(address), address


def test_user_lists_with_the_lab_prefixes() -> None:
    """A FreeSWITCH-style list a user would write for this network: the LAN's /64 but not the temporary
    address range of one host, and the wan host by name of its /64."""
    acls = AclSet(
        [
            AclList.from_config(
                "lan6",
                "deny",
                [("allow", Lab.LAN6_NET), ("deny", f"{Lab.LAN6_TEMPORARY}/128")],
            ),
            AclList.from_config("wan6", "deny", [("allow", Lab.WAN6_NET)]),
        ],
        interfaces=LAN_HOST,
    )
    assert acls.lookup(Lab.LAN6_ADDRESS, "lan6") is True
    assert acls.lookup(Lab.LAN6_TEMPORARY, "lan6") is False  # the longest prefix decides
    assert acls.lookup(Lab.WAN6_HOST, "lan6") is False
    assert acls.lookup(Lab.WAN6_HOST, "wan6") is True
    assert acls.lookup(f"{Lab.WAN6_HOST.upper()}", "wan6") is True
    assert acls.lookup(Lab.LAN_ADDRESS, "lan6") is False  # the other family never matches
    assert f"{Lab.LAN6_TEMPORARY}/128" in acls.explain(Lab.LAN6_TEMPORARY, "lan6").describe()
