"""A profile's IPv6 keys: `sip-ipv6` (listen on IPv6 too) and `sip-ip6` (on which address); each mistake one line."""

import os
from ipaddress import IPv6Address
from pathlib import Path

import pytest

from autonat.daemon.config import ConfigError, load_config


@pytest.fixture(autouse=True)
def _environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AUTONAT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "autonat.toml"
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    for line in caught.value.problems:
        assert line.startswith(f"{path}: ") and len(line.splitlines()) == 1, line
    return [line.removeprefix(f"{path}: ") for line in caught.value.problems]


def test_ipv6_is_off_by_default_so_ipv4_profiles_are_unchanged(tmp_path: Path) -> None:
    [profile] = load_config(write(tmp_path, '[[profile]]\nname = "p"\n')).profiles
    assert profile.sip.ipv6 is False and profile.sip.sip_ip6 is None


def test_sip_ipv6_listens_on_the_stable_address_and_sip_ip6_names_one(tmp_path: Path) -> None:
    text = (
        '[[profile]]\nname = "auto"\nsip-ipv6 = true\n'
        '[[profile]]\nname = "fixed"\nsip-port = 5080\nsip-ip6 = "2001:db8:0:77::10"\n'
        '[[profile]]\nname = "both"\nsip-port = 5090\nsip-ipv6 = true\nsip-ip6 = "[2001:db8::5]"\n'
    )
    auto, fixed, both = load_config(write(tmp_path, text)).profiles
    assert (auto.sip.ipv6, auto.sip.sip_ip6) == (True, None)
    assert (fixed.sip.ipv6, fixed.sip.sip_ip6) == (True, IPv6Address("2001:db8:0:77::10"))  # the address implies it
    assert (both.sip.ipv6, both.sip.sip_ip6) == (True, IPv6Address("2001:db8::5"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('sip-ip6 = "eth0"', 'profile[1].sip-ip6 must be an IPv6 address, not "eth0"'),
        ('sip-ip6 = "192.168.77.10"', 'profile[1].sip-ip6 must be an IPv6 address, not "192.168.77.10" (the IPv4 one'),
        ('sip-ip6 = "::ffff:192.168.77.10"', "profile[1].sip-ip6 must be an IPv6 address, not"),
        ('sip-ip6 = "::"', 'profile[1].sip-ip6 must be a unicast address beyond the link, not "::"'),
        ('sip-ip6 = "ff02::1"', "profile[1].sip-ip6 must be a unicast address beyond the link"),
        ('sip-ip6 = "fe80::1"', "profile[1].sip-ip6 must be a unicast address beyond the link"),
        ('sip-ip6 = "2001:db8::1%eth0"', "profile[1].sip-ip6 must be a unicast address beyond the link"),
        ('sip-ipv6 = false\nsip-ip6 = "2001:db8::1"', "profile[1].sip-ip6 is set while sip-ipv6 = false"),
        ('sip-ipv6 = "yes"', "profile[1].sip-ipv6 must be"),
        ("sip-ip6 = 6", "profile[1].sip-ip6 must be"),
        ("sip-ipv4 = true", "unknown key profile[1].sip-ipv4 (did you mean profile[1].sip-ipv6?)"),
    ],
)
def test_each_mistake_is_one_line(tmp_path: Path, value: str, expected: str) -> None:
    found = problems(tmp_path, f'[[profile]]\nname = "p"\n{value}\n')
    assert len(found) == 1 and found[0].startswith(expected), found


def test_two_profiles_on_the_same_ipv6_port_clash_once(tmp_path: Path) -> None:
    text = '[[profile]]\nname = "a"\nsip-ipv6 = true\n[[profile]]\nname = "b"\nsip-ipv6 = true\n'
    assert problems(tmp_path, text) == [
        'profile "b" listens on port 5060 like profile "a": give one of them another sip-port (or listen = false)'
    ]
    three = text + '[[profile]]\nname = "c"\nsip-ipv6 = true\n'
    assert [line.split(" listens")[0] for line in problems(tmp_path, three)] == ['profile "b"', 'profile "c"']
    distinct = (
        '[[profile]]\nname = "a"\nsip-ip = "10.0.0.1"\nsip-ip6 = "2001:db8::1"\n'
        '[[profile]]\nname = "b"\nsip-ip = "10.0.0.2"\nsip-ip6 = "2001:db8::2"\n'
    )
    assert [p.sip.sip_ip6 for p in load_config(write(tmp_path, distinct)).profiles] == [
        IPv6Address("2001:db8::1"),
        IPv6Address("2001:db8::2"),
    ]
