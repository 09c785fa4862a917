"""The status page and `/metrics` of the real daemon against the lab router, seen by headless Chromium.

The daemon runs on the lab's lan host with `[web]` on loopback there; Chromium (Debian's package) runs in
the same namespace, so the only server it can reach is the daemon's listener (and host names resolve to
nothing). It loads the page with `?stream=N` (one event stream of N seconds, then the page stops), and
`--virtual-time-budget` holds the DOM dump until that stream has ended: a mapping added while the page is
open must be in the dump, written there by the page's own script from the event. The screenshots stay in
the test's tmp dir (`status-page-phone.png`, `status-page-desktop.png`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from autonat.lab import Lab
from tests.lab.cli_helpers import upnp_entries
from tests.lab.daemon_helpers import Daemon, request, write_config

pytestmark = [pytest.mark.lab, pytest.mark.slow]

PORT = 18087  # inside the lan namespace, where nothing else listens
BASE = f"http://127.0.0.1:{PORT}"
STREAM_SECONDS = 6
CONFIG = f"""
[[mapping]]
port = 5060
transport = "both"

[[mapping]]
port = 80
transport = "tcp"

[sip]
rtp-pool = 0

[[profile]]
name = "external"
sip-port = 5070
ext-sip-ip = "auto-nat"
ext-rtp-ip = "auto-nat"

[web]
listen = "127.0.0.1:{PORT}"
"""
# A client in the lan namespace: the body on stdout, the seconds the request took on stderr.
FETCH = (
    "import sys, time, urllib.request\n"
    "started = time.perf_counter()\n"
    "body = urllib.request.urlopen(sys.argv[1], timeout=10).read()\n"
    "sys.stderr.write(str(time.perf_counter() - started))\n"
    "sys.stdout.buffer.write(body)\n"
)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # no name resolves; the listener is an IP literal
    "--hide-scrollbars",
]


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is missing: install Debian's chromium package (./scripts/install.sh)")
    return path


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: install Debian's prometheus package (./scripts/install.sh)")
    return path


def fetch(lab: Lab, path: str) -> tuple[bytes, float]:
    result = subprocess.run(
        lab.argv_in("lan", [sys.executable, "-c", FETCH, BASE + path]), capture_output=True, timeout=20, check=False
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout, float(result.stderr)


def web_status(lab: Lab) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(fetch(lab, "/api/status")[0])
    return data


def browser(lab: Lab, tmp_path: Path, name: str, *args: str) -> subprocess.Popen[bytes]:
    """Chromium in the lan namespace, a profile of its own; stdout to tmp_path/name.out."""
    home = tmp_path / f"chromium-{name}"
    home.mkdir()
    argv = ["env", f"HOME={home}", chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={home / 'profile'}", *args]
    with (tmp_path / f"{name}.out").open("wb") as out, (tmp_path / f"{name}.err").open("wb") as err:
        return lab.popen("lan", argv, stdout=out, stderr=err, start_new_session=True)


def finish(process: subprocess.Popen[bytes], timeout: float) -> None:
    try:
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: Chromium and its helpers, nothing else
            process.wait(timeout=5)
    assert process.returncode == 0, f"chromium exited with {process.returncode}"


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Dom(HTMLParser):
    """The elements of a dumped page that carry data-* attributes (but cells), with their text."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.elements: list[tuple[dict[str, str], list[str]]] = []
        self._stack: list[tuple[str, list[str] | None]] = []
        self.body: dict[str, str] = {}
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        if tag == "body":
            self.body = attributes
        if tag in VOID:
            return
        texts: list[str] | None = None
        if tag not in ("td", "body") and any(name.startswith("data-") for name in attributes):
            texts = []
            self.elements.append((attributes, texts))
        self._stack.append((tag, texts))

    def handle_endtag(self, tag: str) -> None:
        while self._stack:
            if self._stack.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        for _, texts in self._stack:
            if texts is not None:
                texts.append(data)

    def find(self, **attributes: str) -> list[str]:
        """The text of each element whose data-* attributes match (`data_key="udp/5060"`)."""
        wanted = {name.replace("_", "-"): value for name, value in attributes.items()}
        return [
            " ".join("".join(texts).split())
            for attrs, texts in self.elements
            if all(attrs.get(name) == value for name, value in wanted.items())
        ]


@pytest.fixture
def daemon(lab: Lab, tmp_path: Path) -> Iterator[Daemon]:
    running = Daemon(lab, tmp_path, write_config(tmp_path, nat='protocol = "upnp"', extra=CONFIG, log_level="info"))
    running.start()
    try:
        yield running
    finally:
        running.stop(signal.SIGTERM)
        for transport, external, client, _ in upnp_entries(lab):
            if client == Lab.LAN_ADDRESS:
                lab.run("lan", ["upnpc", "-u", lab.root_url, "-d", str(external), transport.upper()], timeout=20)


def settled(daemon: Daemon, timeout: float = 10) -> dict[str, Any]:
    """The status once 5060 (both), the profile's 5070 (both) are on the router and 80 was refused."""
    daemon.wait_socket(timeout)
    deadline = time.monotonic() + timeout
    while True:
        status = daemon.status()
        states = {(m["proto"], m["port"]): m["state"] for m in status["mappings"]}
        wanted = {("udp", 5060), ("tcp", 5060), ("udp", 5070), ("tcp", 5070)}
        if all(states.get(key) == "active" for key in wanted) and states.get(("tcp", 80)) == "failed":
            return status
        assert time.monotonic() < deadline, f"not settled: {states}\n{daemon.log()}"
        time.sleep(0.05)


def metric(text: str, name: str, **labels: str) -> float | None:
    wanted = {f'{key}="{value}"' for key, value in labels.items()}
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        base, _, label_text = series.partition("{")
        if base == name and set(filter(None, label_text.rstrip("}").split(","))) == wanted:
            return float(value)
    return None


def test_the_status_page_shows_the_routers_mappings_and_follows_them_live(
    lab: Lab, tmp_path: Path, daemon: Daemon
) -> None:
    started = time.monotonic()
    status = settled(daemon)
    router = upnp_entries(lab)
    page = web_status(lab)
    assert page["engine"]["external_ip"] == Lab.ROUTER_WAN and page["router"]["selected"] == "upnp"
    for mapping in page["engine"]["mappings"]:
        if mapping["state"] == "active":  # what the page says is what the router's own table says
            assert (mapping["proto"], mapping["external_port"], Lab.LAN_ADDRESS, mapping["port"]) in router
    (profile,) = page["profiles"]
    assert (profile["name"], profile["ext_sip_ip"], profile["ext_rtp_ip"]) == (
        "external",
        Lab.ROUTER_WAN,
        Lab.ROUTER_WAN,
    )

    # /metrics: a real scrape, clean for promtool, the router's UPnP refusal under its own code.
    scraped, scrape_seconds = fetch(lab, "/metrics")
    text = scraped.decode()
    checked = subprocess.run(
        [promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=30, check=False
    )
    assert checked.returncode == 0 and not (checked.stdout + checked.stderr).strip(), checked
    assert (metric(text, "autonat_mapping_failures_total", protocol="upnp", code="606") or 0) >= 1, text
    assert metric(text, "autonat_mappings", protocol="upnp", state="active") == 4
    assert metric(text, "autonat_mappings", protocol="upnp", state="failed") == 1
    assert metric(text, "autonat_discovery_duration_seconds_count") == 1
    assert metric(text, "autonat_calls_total", profile="external", direction="in") == 0
    (tmp_path / "metrics.txt").write_text(text)

    # The page in Chromium, open while a mapping is added: the page's script writes the event into the DOM.
    live = browser(
        lab, tmp_path, "live", "--virtual-time-budget=3000", "--dump-dom", f"{BASE}/?stream={STREAM_SECONDS}"
    )
    try:
        deadline = time.monotonic() + 10
        while web_status(lab)["web"]["event_streams"] < 1:
            assert live.poll() is None and time.monotonic() < deadline, (tmp_path / "live.err").read_text()[-2000:]
            time.sleep(0.05)
        added = request(daemon.socket_path, {"cmd": "add", "port": 5099, "proto": "udp"})
        assert added["ok"] and added["result"]["state"] == "active", added
    finally:
        finish(live, timeout=STREAM_SECONDS + 15)
    dom = Dom((tmp_path / "live.out").read_text())
    assert dom.body.get("data-stream") == "ended"  # dumped after the stream ran its course, not at load
    for proto, port in (("udp", 5060), ("tcp", 5060), ("udp", 5070), ("tcp", 5070), ("udp", 5099)):
        (row,) = dom.find(data_key=f"{proto}/{port}", data_state="active")
        external = next(e for t, e, c, i in upnp_entries(lab) if (t, i, c) == (proto, port, Lab.LAN_ADDRESS))
        assert f"{Lab.ROUTER_WAN}:{external}" in row and "upnp" in row, row
        assert re.search(r"\d+ min \d\d s", row), row  # the lease counting down
    assert "sip:external" in dom.find(data_key="udp/5070")[0]
    (refused,) = dom.find(data_key="tcp/80", data_state="failed")
    assert "UPnP error 606" in refused, refused
    live_adds = [text for text in dom.find(data_event="nat-add", data_live="1") if "udp 5099" in text]
    assert live_adds, dom.find(data_event="nat-add")
    (shown_profile,) = dom.find(data_profile="external")
    assert f"Ext-SIP-IP{Lab.ROUTER_WAN}" in shown_profile.replace(" ", "")
    assert dom.find(data_protocol="upnp")

    # Screenshots, a phone's width and a desktop's: kept as the test's artefacts.
    for name, size in (("phone", "412,3400"), ("desktop", "1280,2000")):
        shot = tmp_path / f"status-page-{name}.png"
        args = [f"--window-size={size}", "--virtual-time-budget=2000", f"--screenshot={shot}", f"{BASE}/?stream=1"]
        finish(browser(lab, tmp_path, name, *args), timeout=20)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    page_weight = sum(len(fetch(lab, path)[0]) for path in ("/", "/static/style.css", "/static/app.js"))
    print(  # the figures the report quotes (pytest -s)
        f"\nscrape {scrape_seconds * 1000:.1f} ms for {len(scraped)} bytes; page {page_weight} bytes;"
        f" test {time.monotonic() - started:.1f} s; artefacts in {tmp_path}"
    )
    assert status["protocol"] == "upnp"
