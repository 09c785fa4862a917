"""`autonat doctor` against the lab's real router: every check, reachability through each protocol's
mapping proven with a STUN server answering from its second address, and nothing left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autonat.lab import Lab
from tests.lab.cli_helpers import AUTONAT, upnp_entries

pytestmark = pytest.mark.lab
STUN = f"stun:{Lab.WAN_HOST}"


def doctor(lab: Lab, state: Path, *args: str, timeout: float = 60) -> tuple[int, dict, float]:  # type: ignore[type-arg]
    import time

    started = time.monotonic()
    result = lab.run(
        "lan",
        ["env", f"AUTONAT_STATE_DIR={state}", AUTONAT, "doctor", "--json", "--stun", STUN, *args],
        timeout=timeout,
    )
    took = time.monotonic() - started
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout), took


def test_doctor_finds_everything_working_and_proves_the_way_in(healthy_lab: Lab, tmp_path: Path) -> None:
    lab = healthy_lab
    code, data, took = doctor(lab, tmp_path / "state")
    assert code == 0 and took < 30, (code, took)
    verdicts = {f["check"]: f["verdict"] for f in data["findings"]}
    not_ok = {check: v for check, v in verdicts.items() if v != "ok"}
    assert not_ok == {"hairpin": "warning"}, data["findings"]  # the lab's router has no NAT loopback
    assert data["reachability"] == {"pcp": True, "natpmp": True, "upnp": True}
    assert data["measurements"]["unsolicited_blocked"] is True  # and refused without a mapping
    assert data["external_address"] == Lab.ROUTER_WAN
    assert all(t["still_reachable_after"] == [12.0, True] for t in data["measurements"]["trials"])
    assert not [e for e in upnp_entries(lab) if e[2] == Lab.LAN_ADDRESS], "doctor left a mapping behind"

    code, data, took = doctor(lab, tmp_path / "state", "--quick", "--share", str(tmp_path / "report.md"))
    assert code == 0 and took < 3 + 0.5, took  # + the process start of `ip netns exec` and Python
    assert len(data["measurements"]["trials"]) == 1
    shared = (tmp_path / "report.md").read_text()
    assert Lab.ROUTER_WAN + " " not in shared and "x.x.x.x" in shared


def test_doctor_says_what_is_wrong_behind_a_double_nat(double_nat_lab: Lab, tmp_path: Path) -> None:
    lab = double_nat_lab
    result = lab.run(
        "lan2", ["env", f"AUTONAT_STATE_DIR={tmp_path}", AUTONAT, "doctor", "--quick", "--json"], timeout=30
    )
    data = json.loads(result.stdout)
    assert result.returncode == 1
    failed = {f["check"]: f for f in data["findings"] if f["verdict"] == "fail"}
    assert failed, data["findings"]
    assert any("double NAT" in f["summary"] or "refused" in f["summary"] for f in failed.values()), failed
