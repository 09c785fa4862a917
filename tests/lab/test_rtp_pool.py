"""The RTP mapping pool on the real router: pairs mapped ahead, handed out at once, gone at hang-up,
refilled in the background (issue "The test call", item 3)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from autonat.lab import Lab

pytestmark = pytest.mark.lab
SCRIPT = str(Path(__file__).with_name("scripts") / "rtp_pool.py")


def test_pool_maps_ahead_hands_out_at_once_and_refills(lab: Lab, state_dir: Path) -> None:
    result = lab.run("lan", ["env", f"AUTONAT_STATE_DIR={state_dir}", sys.executable, SCRIPT, lab.root_url], timeout=60)
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["filled"] is True
    assert facts["after_fill"] == [30000, 30001, 30002, 30003]  # two RTP/RTCP pairs, before any call
    assert facts["take_ms"] < 1.0  # no router round trip at call set-up
    assert facts["taken"] == [30000, 30001, Lab.ROUTER_WAN, 30000, 30001]
    assert facts["release_ms"] < 2000
    assert 30000 not in facts["after_release"] and 30001 not in facts["after_release"]
    assert facts["refilled"] is True
    assert facts["after_refill"] == [30002, 30003, 30004, 30005]
    assert facts["after_stop"] == []
