"""The [nat] table's IPv6 pinhole keys (issue 15): ipv6, ipv6-protocol, ipv6-gateway, ipv6-address."""

from __future__ import annotations

from pathlib import Path

import pytest

from autonat.daemon.config import load_config
from tests.unit.test_config import _environment, one_problem, write

__all__ = ["_environment"]  # the autouse fixture: defaults pinned as in test_config


def test_defaults_are_ipv4_only(tmp_path: Path) -> None:
    nat = load_config(write(tmp_path, "[nat]\n")).nat
    assert (nat.ipv6, nat.ipv6_protocol, nat.ipv6_gateway, nat.ipv6_address) == (False, "auto", None, None)


def test_every_key_is_read(tmp_path: Path) -> None:
    text = (
        '[nat]\nipv6 = true\nipv6-protocol = "UPnP"\nipv6-gateway = "fe80::1%eth0"\n'
        'ipv6-address = "2001:DB8:0:77::10"\n'
    )
    nat = load_config(write(tmp_path, text)).nat
    assert nat.ipv6 is True and nat.ipv6_protocol == "upnp"
    assert nat.ipv6_gateway == "fe80::1%eth0" and nat.ipv6_address == "2001:db8:0:77::10"
    nat = load_config(write(tmp_path, '[nat]\nipv6 = true\nipv6-gateway = " 2001:db8:0:77::1 "\n')).nat
    assert nat.ipv6_gateway == "2001:db8:0:77::1"


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ('ipv6 = "yes"', "nat.ipv6 must be true or false"),
        ('ipv6-protocol = "natpmp"', "nat.ipv6-protocol must be one of auto, pcp, upnp"),
        ('ipv6-gateway = "192.168.77.1"', "nat.ipv6-gateway must be an IPv6 address"),
        ('ipv6-gateway = "router.lan"', "nat.ipv6-gateway must be an IPv6 address"),
        ('ipv6-gateway = "fe80::1"', "nat.ipv6-gateway is link-local: name its interface, e.g. fe80::1%eth0"),
        ('ipv6-gateway = "ff02::1"', "must be a unicast IPv6 router address"),
        ('ipv6-address = "fe80::10"', "nat.ipv6-address must be a global IPv6 address of this host"),
        ('ipv6-address = "10.0.0.1"', "nat.ipv6-address must be one of this host's global IPv6 addresses"),
        ("ipv6_protocol = 'pcp'", "ipv6-protocol"),  # the underscore spelling: unknown, the right one suggested
    ],
)
def test_mistakes_are_one_line_each(tmp_path: Path, line: str, fragment: str) -> None:
    assert fragment in one_problem(write(tmp_path, f"[nat]\n{line}\n"))
