"""Run the real `autonat` command and the traffic helper inside the lab's namespaces."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from autonat.lab import Lab

AUTONAT = str(Path(sys.executable).with_name("autonat"))
TRAFFIC = str(Path(__file__).with_name("traffic.py"))


def autonat(
    lab: Lab, state_dir: Path, *args: str, host: str = "lan", timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return lab.run(host, ["env", f"AUTONAT_STATE_DIR={state_dir}", AUTONAT, *args], timeout=timeout)


def autonat_json(lab: Lab, state_dir: Path, *args: str, host: str = "lan", timeout: float = 60) -> dict[str, Any]:
    result = autonat(lab, state_dir, *args, "--json", host=host, timeout=timeout)
    assert result.returncode == 0, f"autonat {' '.join(args)} failed: {result.stderr}"
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def reaches_lan(lab: Lab, transport: str, external_port: int, internal_port: int, seconds: float = 1.5) -> bool:
    """Send a payload from the wan host to the router's public address; did the lan host get it?"""
    payload = f"hello-{transport}-{external_port}"
    listener = lab.popen(
        "lan",
        [sys.executable, TRAFFIC, "listen", transport, str(internal_port), str(seconds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert listener.stdout is not None
        deadline = time.monotonic() + 5
        while listener.stdout.readline().strip() != "ready":
            assert time.monotonic() < deadline, "listener did not start"
        lab.run(
            "wan",
            [sys.executable, TRAFFIC, "send", transport, Lab.ROUTER_WAN, str(external_port), payload],
            timeout=10,
        )
        output, _ = listener.communicate(timeout=seconds + 5)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait(timeout=5)
    return listener.returncode == 0 and payload in output


ENTRY = re.compile(r"^\s*\d+\s+(UDP|TCP)\s+(\d+)->([\d.]+):(\d+)\s")


def upnp_entries(lab: Lab) -> set[tuple[str, int, str, int]]:
    """The router's table as the independent reference client `upnpc -l` lists it:
    (transport, external port, internal address, internal port)."""
    result = lab.run("lan", ["upnpc", "-u", lab.root_url, "-l"], timeout=20)
    entries = set()
    for line in result.stdout.splitlines():
        match = ENTRY.match(line)
        if match:
            entries.add((match[1].lower(), int(match[2]), match[3], int(match[4])))
    return entries


def listed(lab: Lab, transport: str, external_port: int) -> bool:
    return any(e[0] == transport and e[1] == external_port and e[2] == Lab.LAN_ADDRESS for e in upnp_entries(lab))
