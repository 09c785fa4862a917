"""Running the daemon for real (issue "A service for a real network"): reload on SIGHUP without dropping a
call, log lines an admin and a machine can read, and systemd's notify protocol."""

from __future__ import annotations

import json
import re
import signal
import socket
import tempfile
import time
from pathlib import Path

import pytest

from autonat.lab import Lab
from tests.lab.cli_helpers import upnp_entries
from tests.lab.daemon_helpers import Daemon, eventually, request
from tests.lab.sipp import count_rtp, run_sipp, start_sipp

pytestmark = pytest.mark.lab

ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"
CALLER_MEDIA = 6100


def config_text(
    directory: Path,
    *,
    mappings: list[tuple[str, int]],
    acl_node: str,
    level: str = "info",
    users: tuple[tuple[str, str], ...] = (("105", "pw105"),),
    trace: tuple[str, ...] = (),
) -> str:
    rows = "".join(f'[[mapping]]\nport = {port}\ntransport = "{transport}"\n' for transport, port in mappings)
    accounts = "".join(f'[[user]]\nname = "{name}"\npassword = "{secret}"\n' for name, secret in users)
    return (
        f"{rows}{accounts}"
        "[[acl]]\n"
        'name = "office"\n'
        'default = "deny"\n'
        f'nodes = [["allow", "{acl_node}"]]\n'
        "[[profile]]\n"
        'name = "external"\n'
        'ext-sip-ip = "auto-nat"\n'
        'ext-rtp-ip = "auto-nat"\n'
        "[[profile]]\n"
        'name = "office"\n'
        "sip-port = 5070\n"
        'ext-sip-ip = "auto-nat"\n'
        'ext-rtp-ip = "auto-nat"\n'
        'local-network-acl = "office"\n'
        "[sip]\nrtp-timeout = 60\n"
        f'[control]\nsocket = "{directory / "control.sock"}"\n'
        f'[journal]\npath = "{directory / "journal.sqlite"}"\n'
        f'[log]\nlevel = "{level}"\ntrace = {json.dumps(list(trace))}\n'
    )


def ours(lab: Lab) -> set[tuple[str, int]]:
    return {(e[0], e[3]) for e in upnp_entries(lab) if e[2] == Lab.LAN_ADDRESS}


def start(lab: Lab, directory: Path, started: list[Daemon], text: str, *args: str, **env: str) -> Daemon:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "autonat.toml"
    path.write_text(text)
    daemon = Daemon(lab, directory, path, env=dict(env))
    daemon.start(*args)
    started.append(daemon)
    daemon.wait_socket()
    return daemon


def test_sighup_applies_exactly_the_edit_and_a_call_goes_on(
    healthy_lab: Lab, tmp_path: Path, started: list[Daemon]
) -> None:
    lab = healthy_lab
    directory = tmp_path / "daemon"
    before = [("tcp", 8080), ("udp", 8081)]
    daemon = start(lab, directory, started, config_text(directory, mappings=before, acl_node="10.0.0.0/8"))
    status = daemon.wait_ready(timeout=20)
    eventually(lambda: {("tcp", 8080), ("udp", 8081), ("udp", 5060), ("udp", 5070)} <= ours(lab), 15, "mapped")
    table_before = ours(lab)
    assert (
        request(daemon.socket_path, {"cmd": "advertise", "name": "office", "destination": "192.168.77.50"})["result"]
        == status["external_ip"]
    )  # not in the office ACL yet: gets the external address
    with (
        count_rtp(lab, "wan", CALLER_MEDIA, local_ip=Lab.WAN_HOST) as rtp,
        start_sipp(
            lab,
            "wan",
            "uac_call",
            f"{Lab.ROUTER_WAN}:5060",
            local_ip=Lab.WAN_HOST,
            media_port=CALLER_MEDIA,
            variables={"expect_ip": Lab.ROUTER_WAN, "hold_ms": "6000"},
            calls=1,
            service="9196",
            workdir=tmp_path,
        ) as sipp,
    ):
        eventually(lambda: request(daemon.socket_path, {"cmd": "calls"})["result"], 10, "the call is up")
        after = [("tcp", 8080), ("udp", 8082)]  # 8081 removed, 8082 added; the ACL changed; user 106 added
        edited = config_text(  # ... and the SIP wire trace switched on
            directory,
            mappings=after,
            acl_node="192.168.77.0/24",
            users=(("105", "pw105"), ("106", "pw106")),
            trace=("sip",),
        )
        (directory / "autonat.toml").write_text(edited)
        daemon.send(signal.SIGHUP)
        expected = (table_before - {("udp", 8081)}) | {("udp", 8082)}
        pool = {("udp", p) for p in range(16384, 32768)}
        eventually(lambda: ours(lab) - pool == expected - pool, 10, "the router's table changed by the edit")

        def echoed() -> int:
            calls = request(daemon.socket_path, {"cmd": "calls"})["result"]
            return int(calls[0]["rtp"]["sent"]) if calls else -1

        at_reload = echoed()
        eventually(lambda: echoed() > at_reload + 10, 5, "RTP still echoed after the reload")
        result = sipp.wait(timeout=30)
    assert result.ok, result.describe()  # the call went on through the reload and ended with its BYE
    assert rtp.count.sent > 50 and rtp.count.received > 50, rtp.count  # both ways, the whole call
    advertised = request(daemon.socket_path, {"cmd": "advertise", "name": "office", "destination": "192.168.77.50"})
    assert advertised["result"] == Lab.LAN_ADDRESS  # the ACL edit took effect: now a local peer
    log = daemon.log()
    assert re.search(
        r"config reloaded from .*: -mapping udp 8081, \+mapping udp 8082, ACL lists, trace sip, users", log
    ), log
    assert "restart needed" not in log
    registered = run_sipp(  # the user the edit added registers at once
        lab,
        "wan",
        "uac_register",
        f"{Lab.ROUTER_WAN}:5060",
        local_ip=Lab.WAN_HOST2,
        local_port=5073,
        media_port=CALLER_MEDIA,
        variables={"user": "106"},
        auth=("106", "pw106"),
        timeout=10,
        workdir=tmp_path / "register",
    )
    assert registered.ok, registered.describe()
    whole = (directory / "daemon.log").read_text()  # the trace the reload switched on shows the REGISTER
    assert re.search(r"DEBUG trace sip <- .*REGISTER sip:", whole), whole[-3000:]
    assert "response=<redacted>" in whole and "pw106" not in whole

    # A bad edit: one error line per mistake, nothing changes.
    table = ours(lab)
    bad = config_text(  # one mistake: the port
        directory,
        mappings=[("udp", 70000)],
        acl_node="192.168.77.0/24",
        users=(("105", "pw105"), ("106", "pw106")),
        trace=("sip",),
    )
    (directory / "autonat.toml").write_text(bad)
    daemon.send(signal.SIGHUP)
    eventually(lambda: "reload refused" in daemon.log(), 5, "the refusal logged")
    time.sleep(0.5)
    refused = [line for line in daemon.log().splitlines() if "reload refused" in line]
    assert len(refused) == 1 and " ERROR " in refused[0], refused
    assert ours(lab) == table
    reply = request(daemon.socket_path, {"cmd": "reload"})  # the same through the control channel
    assert not reply["ok"] and reply["error"].startswith("reload refused, nothing changed:")


OFFICE = """[[profile]]
name = "office"
sip-port = 5070
ext-sip-ip = "auto-nat"
ext-rtp-ip = "auto-nat"
local-network-acl = "office"
"""
BRANCH = """[[profile]]
name = "branch"
sip-port = 5080
ext-sip-ip = "auto-nat"
ext-rtp-ip = "auto-nat"
"""


def test_a_reload_adds_and_removes_profiles_live(healthy_lab: Lab, tmp_path: Path, started: list[Daemon]) -> None:
    """`sofia profile rescan`, live: the edit removes the office profile and adds a branch one on 5080. The
    router's table changes by exactly their SIP ports, the new profile answers a call through the NAT at once,
    the removed one is gone, and the profile that stayed keeps its mappings."""
    lab = healthy_lab
    directory = tmp_path / "daemon"
    text = config_text(directory, mappings=[], acl_node="10.0.0.0/8")
    assert OFFICE in text
    daemon = start(lab, directory, started, text)
    daemon.wait_ready(timeout=20)
    sip = {(t, port) for t in ("udp", "tcp") for port in (5060, 5070)}
    eventually(lambda: sip <= ours(lab), 15, "the SIP ports mapped")
    pool = {("udp", p) for p in range(16384, 32768)}
    before = ours(lab) - pool  # the SIP ports, and whatever an earlier test's client left on the router
    (directory / "autonat.toml").write_text(text.replace(OFFICE, BRANCH))
    daemon.send(signal.SIGHUP)
    office = {(t, 5070) for t in ("udp", "tcp")}
    branch = {(t, 5080) for t in ("udp", "tcp")}
    wanted = (before - office) | branch
    deadline = time.monotonic() + 10
    while (table := ours(lab) - pool) != wanted and time.monotonic() < deadline:
        time.sleep(0.1)
    assert table == wanted, f"the router's table did not change by the two profiles' ports: {sorted(table)}"
    assert re.search(r"config reloaded from .*: -profile office, \+profile branch", daemon.log()), daemon.log()
    assert "restart needed" not in daemon.log()
    assert request(daemon.socket_path, {"cmd": "profile", "name": "branch"})["ok"]
    assert not request(daemon.socket_path, {"cmd": "profile", "name": "office"})["ok"]
    called = run_sipp(  # the echo test of the profile the reload added, from the internet, through the NAT
        lab,
        "wan",
        "uac_call",
        f"{Lab.ROUTER_WAN}:5080",
        local_ip=Lab.WAN_HOST,
        media_port=CALLER_MEDIA,
        variables={"expect_ip": Lab.ROUTER_WAN, "hold_ms": "500"},
        service="9196",
        timeout=20,
        workdir=tmp_path / "call",
    )
    assert called.ok, called.describe()


def test_every_log_line_has_a_level_and_the_hole_lines_say_everything(
    healthy_lab: Lab, tmp_path: Path, started: list[Daemon]
) -> None:
    lab = healthy_lab
    text = config_text(tmp_path / "text", mappings=[("tcp", 8090)], acl_node="10.0.0.0/8", level="debug")
    daemon = start(lab, tmp_path / "text", started, text)
    daemon.wait_ready(timeout=20)
    request(daemon.socket_path, {"cmd": "del", "port": 8090, "proto": "tcp"})
    daemon.stop()
    lines = (tmp_path / "text" / "daemon.log").read_text().splitlines()
    assert lines
    pattern = re.compile(rf"{ISO} autonat\[\d+\]: (DEBUG|INFO|WARNING|ERROR) \S")
    assert all(pattern.match(line) for line in lines), [line for line in lines if not pattern.match(line)][:5]
    holes = [line for line in lines if " hole " in line]
    opened = [line for line in holes if "hole opened" in line and "internal=192.168.77.10:8090" in line]
    closed = [line for line in holes if "hole closed" in line and "internal=192.168.77.10:8090" in line]
    assert opened and closed, holes
    for line in opened + closed:
        for field in ("protocol=pcp", "transport=tcp", f"external={Lab.ROUTER_WAN}:", "lease=", "owner=config"):
            assert field in line, (field, line)

    json_dir = tmp_path / "json"
    text = config_text(json_dir, mappings=[("tcp", 8091)], acl_node="10.0.0.0/8")
    daemon = start(lab, json_dir, started, text, "--log-format", "json")
    daemon.wait_ready(timeout=20)
    daemon.stop()
    records = [json.loads(line) for line in (json_dir / "daemon.log").read_text().splitlines()]
    assert records and all({"time", "level", "logger", "pid", "message"} <= set(r) for r in records)
    hole = next(r for r in records if r.get("event") == "opened" and r.get("internal", "").endswith(":8091"))
    assert hole["protocol"] == "pcp" and hole["transport"] == "tcp" and hole["owner"] == "config"


def test_systemd_hears_ready_after_the_control_socket_answers_and_then_the_watchdog(
    healthy_lab: Lab, tmp_path: Path, started: list[Daemon]
) -> None:
    lab = healthy_lab
    notify_dir = Path(tempfile.mkdtemp())
    path = str(notify_dir / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(20)
    directory = tmp_path / "daemon"
    directory.mkdir()
    (directory / "autonat.toml").write_text(config_text(directory, mappings=[], acl_node="10.0.0.0/8"))
    daemon = Daemon(lab, directory, directory / "autonat.toml", env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
    try:
        daemon.start()
        started.append(daemon)
        first = sock.recv(4096).decode()
        assert first.startswith("READY=1\nSTATUS="), first
        # READY came after the socket answered: the very next request is served.
        assert request(daemon.socket_path, {"cmd": "status"}, timeout=2)["ok"]
        dogs, deadline = 0, time.monotonic() + 3
        statuses = []
        while time.monotonic() < deadline:
            message = sock.recv(4096).decode()
            dogs += message == "WATCHDOG=1"
            if message.startswith("STATUS="):
                statuses.append(message)
        assert dogs >= 4, dogs  # every 0.5 s (half of WATCHDOG_USEC)
        daemon.send(signal.SIGHUP)
        messages = [sock.recv(4096).decode() for _ in range(8)]
        assert any(m.startswith("RELOADING=1\nMONOTONIC_USEC=") for m in messages), messages
        assert any(m.startswith("READY=1") for m in messages), messages
    finally:
        sock.close()
