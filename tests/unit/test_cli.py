"""The CLI's promise: a result and exit 0, or exactly one line on stderr and a non-zero code.

These run the real entry point as a subprocess and never leave the machine: argument errors stop
before any I/O, and the "dead router" is an address on loopback where nothing listens.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "autonat", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={"AUTONAT_STATE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["map", "add", "0", "udp"], 2, "Invalid value for 'PORT'"),
        (["map", "add", "5060", "sctp"], 2, "Invalid value for '{udp|tcp}'"),
        (["map", "add", "5060", "udp", "--lifetime", "0"], 2, "Invalid value for '--lifetime'"),
        (["map", "add", "5060", "udp", "--protocol", "smtp"], 2, "Invalid value for '--protocol'"),
        (["map", "del"], 2, "Missing argument 'PORT'"),
        (["frobnicate"], 2, "No such command 'frobnicate'"),
        (["probe", "--gateway", "router.local"], 3, "--gateway must be an IP address"),
        (["probe", "--interface", "nosuch0"], 3, "no network interface named 'nosuch0'"),
    ],
)
def test_mistakes_are_one_line(args: list[str], code: int, fragment: str, tmp_path: Path) -> None:
    result = run(*args, tmp_path=tmp_path)
    assert result.returncode == code
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("autonat: ") and fragment in lines[0]
    assert result.stdout == ""


def test_silent_gateway_fails_within_the_timeout(tmp_path: Path) -> None:
    # 127.0.0.3:5351 is held by a socket that never answers: silence, so the deadline decides.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.3", 5351))
        started = time.monotonic()
        result = run("map", "add", "5060", "udp", "--gateway", "127.0.0.3", "--timeout", "0.5", tmp_path=tmp_path)
        assert time.monotonic() - started < 5
    assert result.returncode == 7
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no port-mapping protocol works with 127.0.0.3" in lines[0]
    assert "no answer from PCP at 127.0.0.3:5351 within 0.5 s" in lines[0]


def test_a_gateway_without_the_service_fails_at_once(tmp_path: Path) -> None:
    # Nothing listens on 127.0.0.1:5351: ICMP port unreachable ends PCP and NAT-PMP at once, and
    # UPnP's unicast search is refused too, so no protocol waits out the 2 s deadline.
    started = time.monotonic()
    result = run("map", "add", "5060", "udp", "--gateway", "127.0.0.1", tmp_path=tmp_path)
    elapsed = time.monotonic() - started
    assert result.returncode == 7
    [line] = result.stderr.strip().splitlines()
    assert "PCP at 127.0.0.1:5351 is unreachable: the router answered ICMP port unreachable" in line
    assert "NAT-PMP at 127.0.0.1:5351 is unreachable" in line
    assert "upnp: UPnP: the gateway 127.0.0.1 answered SSDP with ICMP port unreachable" in line
    assert elapsed < 1.5, elapsed  # start-up, not the deadline


def test_help_and_version_exit_zero(tmp_path: Path) -> None:
    assert run("--version", tmp_path=tmp_path).stdout.startswith("autonat, version")
    result = run("map", "add", "--help", tmp_path=tmp_path)
    assert result.returncode == 0 and "--external-port" in result.stdout


def test_probe_json_lists_the_igd_candidates_even_when_none_answered(tmp_path: Path) -> None:
    # Nothing answers SSDP on 127.0.0.3 (a socket of ours takes the searches and stays silent): no
    # candidate, and the one line says so within the deadline.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.3", 1900))
        result = run(
            "probe", "--gateway", "127.0.0.3", "--protocol", "upnp", "--timeout", "0.5", "--json", tmp_path=tmp_path
        )
    assert result.returncode == 7
    [line] = result.stderr.strip().splitlines()
    assert line.endswith("(upnp: no usable IGD answered SSDP within 0.5 s)")
    upnp = json.loads(result.stdout)["protocols"]["upnp"]
    assert upnp["candidates"] == [] and upnp["available"] is False
