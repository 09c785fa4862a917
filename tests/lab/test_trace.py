"""The wire trace against the real router and a real SIP phone (issue 13, "Logs an admin can use"; issue
14, `doctor --share` "with the wire trace of the run attached"): `probe --trace all` shows the M-SEARCH,
the SOAP GetExternalIPAddress and its answer, a PCP and a NAT-PMP exchange and a STUN Binding; the daemon's
`--trace sip` logs a SIPp digest REGISTER, its 401 and its 200, and never the digest response; `doctor
--share` attaches the trace."""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from autonat.lab import Lab
from tests.lab.cli_helpers import AUTONAT, autonat
from tests.lab.daemon_helpers import Daemon
from tests.lab.sipp import run_sipp

pytestmark = pytest.mark.lab

ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"
LINE = re.compile(rf"^{ISO} autonat\[\d+\]: DEBUG trace (\w+) (->|<-) (\S+) (.*)$")
GATEWAY = re.escape(Lab.GATEWAY)
MS = r"\(\d+\.\d\d ms\)"


def traced(stderr: str) -> list[tuple[str, str, str, str]]:
    """(protocol, direction, peer, the rest) of every trace line; every stderr line is one."""
    lines = stderr.splitlines()
    matches = [LINE.match(line) for line in lines]
    assert all(matches), [line for line, m in zip(lines, matches, strict=True) if not m]
    return [m.groups() for m in matches if m]  # type: ignore[misc]


def find(lines: list[tuple[str, str, str, str]], protocol: str, direction: str, pattern: str) -> str:
    for p, d, peer, rest in lines:
        if p == protocol and d == direction and re.search(pattern, f"{peer} {rest}"):
            return rest
    raise AssertionError(f"no {protocol} {direction} line matching {pattern!r} in:\n" + "\n".join(map(str, lines)))


def test_probe_trace_all_shows_every_exchange_decoded(healthy_lab: Lab, state_dir: Path) -> None:
    lab = healthy_lab
    result = autonat(lab, state_dir, "probe", "--trace", "all", "--stun", f"stun:{Lab.WAN_HOST}", timeout=30)
    assert result.returncode == 0, result.stderr
    assert "Selected:       pcp" in result.stdout  # the result itself is untouched, on stdout
    lines = traced(result.stderr)
    find(lines, "upnp", "->", rf"^{GATEWAY}:1900 M-SEARCH \* HTTP/1\.1 ST=urn:schemas-upnp-org:device:Internet")
    find(lines, "upnp", "<-", rf"^{GATEWAY}:1900 {MS} HTTP/1\.1 200 OK ST=.* LOCATION=http://{GATEWAY}:\d+/.*SERVER=")
    find(
        lines, "upnp", "->", r"POST http://\S+ SOAPAction=urn:schemas-upnp-org:service:WANIPConnection:\d#GetExternalIP"
    )
    answer = rf"{MS} HTTP 200 GetExternalIPAddressResponse NewExternalIPAddress={re.escape(Lab.ROUTER_WAN)}$"
    find(lines, "upnp", "<-", answer)
    find(lines, "pcp", "->", rf"^{GATEWAY}:5351 (ANNOUNCE|MAP) request")
    find(lines, "pcp", "<-", rf"^{GATEWAY}:5351 {MS} (ANNOUNCE|MAP) SUCCESS lifetime=\d+ epoch=\d+")
    find(lines, "natpmp", "->", rf"^{GATEWAY}:5351 EXTERNAL_ADDRESS request$")
    find(lines, "natpmp", "<-", rf"{MS} EXTERNAL_ADDRESS SUCCESS epoch=\d+ address={re.escape(Lab.ROUTER_WAN)}$")
    find(lines, "stun", "->", rf"^{re.escape(Lab.WAN_HOST)}:3478 Binding request tid=[0-9a-f]{{8}}…")
    find(lines, "stun", "<-", rf"{MS} Binding success tid=[0-9a-f]{{8}}… .*MAPPED-ADDRESS={re.escape(Lab.ROUTER_WAN)}:")

    quiet = autonat(lab, state_dir, "probe", timeout=30)  # and without --trace: not one trace line
    assert quiet.returncode == 0 and " trace " not in quiet.stderr, quiet.stderr


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.stop(signal.SIGTERM, timeout=20)


def test_the_daemon_traces_a_digest_register_and_never_its_response(
    healthy_lab: Lab, tmp_path: Path, daemons: list[Daemon]
) -> None:
    lab = healthy_lab
    directory = tmp_path / "daemon"
    directory.mkdir()
    config = directory / "autonat.toml"
    config.write_text(
        '[[user]]\nname = "105"\npassword = "pw105"\n'
        '[[profile]]\nname = "external"\next-sip-ip = "auto-nat"\next-rtp-ip = "auto-nat"\n'
        f'[control]\nsocket = "{directory / "control.sock"}"\n'
        f'[journal]\npath = "{directory / "journal.sqlite"}"\n'
        '[log]\nlevel = "warning"\n'  # the trace shows whatever the level
    )
    daemon = Daemon(lab, directory, config)
    daemon.start("--trace", "sip")
    daemons.append(daemon)
    daemon.wait_ready(timeout=20)
    registered = run_sipp(
        lab,
        "wan",
        "uac_register",
        f"{Lab.ROUTER_WAN}:5060",
        local_ip=Lab.WAN_HOST,
        local_port=5073,
        media_port=6100,
        variables={"user": "105"},
        auth=("105", "pw105"),
        timeout=10,
        workdir=tmp_path / "sipp",
    )
    assert registered.ok, registered.describe()
    digests = set(re.findall(r'response="?([0-9a-fA-F]{32,64})', registered.messages))
    cnonces = set(re.findall(r'cnonce="?([^",\s]+)', registered.messages))
    assert digests, registered.messages  # SIPp did send one: the check below has something to look for
    daemon.stop(signal.SIGTERM, timeout=20)
    log = (directory / "daemon.log").read_text()  # all of it (Daemon.log() is the tail)
    trace = [line for line in log.splitlines() if " DEBUG trace sip " in line]
    peer = re.escape(f"{Lab.WAN_HOST}:5073")
    assert re.search(rf"^{ISO} autonat\[\d+\]: DEBUG trace sip <- {peer} udp REGISTER sip:\S+ SIP/2\.0 \| ", trace[0])
    replies = [line for line in trace if re.search(rf"trace sip -> {peer} udp {MS} SIP/2\.0 ", line)]
    assert [re.search(r"SIP/2\.0 (\d+)", line)[1] for line in replies] == ["401", "200"], trace  # type: ignore[index]
    assert 'WWW-Authenticate: Digest realm="' in replies[0]
    second = next(line for line in trace if "CSeq: 2 REGISTER" in line and "<-" in line)
    assert "response=<redacted>" in second and "cnonce=<redacted>" in second and 'username="105"' in second
    for secret in digests | cnonces:
        assert secret not in log


def test_doctor_share_attaches_the_wire_trace(healthy_lab: Lab, state_dir: Path, tmp_path: Path) -> None:
    lab = healthy_lab
    report = tmp_path / "report.md"
    result = lab.run(
        "lan",
        [
            "env",
            f"AUTONAT_STATE_DIR={state_dir}",
            AUTONAT,
            "doctor",
            "--quick",
            "--stun",
            f"stun:{Lab.WAN_HOST}",
            "--share",
            str(report),
        ],
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " trace " not in result.stderr  # --share alone keeps the trace for the report, off stderr
    shared = report.read_text()
    section = shared[shared.index("\n## Wire trace\n") :]
    fence = re.search(r"\n(`{3,})text\n(.*)\n\1\n$", section, re.S)
    assert fence, section[-500:]
    records = fence[2].splitlines()
    assert all(re.match(r"\+\d+\.\d{3}s trace ", line) for line in records), records
    for protocol in ("pcp", "natpmp", "upnp", "stun"):  # stun: doctor's own reachability probes
        assert any(f" trace {protocol} " in line for line in records), protocol
    assert any(" trace stun -> " in line and "CHANGE-REQUEST=ip+port" in line for line in records), records
    assert any("NewExternalIPAddress=x.x.x.x" in line or "address=x.x.x.x" in line for line in records)
    assert not re.search(rf"(?<![\d.]){re.escape(Lab.ROUTER_WAN)}(?![\d])", shared)  # masked everywhere
