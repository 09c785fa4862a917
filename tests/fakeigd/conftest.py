"""A two-host network of our own (gateway + client namespaces) where a fake IGD plays the router.

The fake is for quirks miniupnpd cannot show; it needs real addresses because the client refuses
loopback LOCATIONs by design. Nothing here touches the host's network: the veth pair is created
directly inside the two namespaces.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.quirks import Profile

GATEWAY = "10.77.0.1"
CLIENT = "10.77.0.2"
SERVER = str(Path(__file__).parents[1] / "fakes" / "igd_server.py")
PMP_SERVER = str(Path(__file__).parents[1] / "fakes" / "pcp_natpmp_router.py")
ENGINE_DRIVER = str(Path(__file__).parent / "engine_driver.py")
# The peak RSS of the command itself: VmHWM of its own memory (getrusage's ru_maxrss would include the
# peak of the process it was forked from, the test runner, which Linux carries across exec).
MEASURED = (
    "import atexit, os, sys\n"
    "def peak():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            return line.split()[1]\n"
    "    return '0'\n"
    "atexit.register(lambda: open(os.environ['RSS_FILE'], 'w').write(peak()))\n"
    "from autonat.cli.main import main\n"
    "main(sys.argv[1:])\n"
)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    seconds: float
    max_rss_kb: int

    def json(self) -> Any:
        return json.loads(self.stdout)

    @property
    def error_lines(self) -> list[str]:
        return self.stderr.strip().splitlines()


@dataclass
class FakeNet:
    gateway_ns: str
    client_ns: str
    tmp: Path

    def autonat(self, *args: str, timeout: float = 30) -> Result:
        rss_file = self.tmp / "rss"
        env = {**os.environ, "AUTONAT_STATE_DIR": str(self.tmp / "state"), "RSS_FILE": str(rss_file)}
        started = time.monotonic()
        done = subprocess.run(
            ["ip", "netns", "exec", self.client_ns, sys.executable, "-c", MEASURED, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
        seconds = time.monotonic() - started
        rss = int(rss_file.read_text() or 0) if rss_file.exists() else 0
        return Result(done.returncode, done.stdout, done.stderr, seconds, rss)

    def engine(self, timeout: float = 20, **config: Any) -> dict[str, Any]:
        """Run a NatEngine in the client namespace (tests/fakeigd/engine_driver.py) and return what it saw."""
        env = {**os.environ, "AUTONAT_STATE_DIR": str(self.tmp / "state")}
        done = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                self.client_ns,
                sys.executable,
                ENGINE_DRIVER,
                json.dumps({"gateway": GATEWAY, **config}),
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        result: dict[str, Any] = json.loads(done.stdout)
        return result


@pytest.fixture(scope="session")
def fakenet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeNet]:
    if os.geteuid() != 0:
        pytest.fail("the fake-IGD tests need root (network namespaces)")
    prefix = f"fk{os.getpid() % 100000}"
    gateway_ns, client_ns = f"{prefix}-gw", f"{prefix}-cl"
    created: list[str] = []
    try:
        for ns in (gateway_ns, client_ns):
            ip("netns", "add", ns)
            created.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", gateway_ns, "link", "add", "name", "eth0", "type", "veth", "peer", "name", "eth0", "netns", client_ns)
        ip("-n", gateway_ns, "addr", "add", f"{GATEWAY}/24", "dev", "eth0")
        ip("-n", client_ns, "addr", "add", f"{CLIENT}/24", "dev", "eth0")
        ip("-n", gateway_ns, "link", "set", "eth0", "up")
        ip("-n", client_ns, "link", "set", "eth0", "up")
        ip("-n", client_ns, "route", "add", "default", "via", GATEWAY)
        yield FakeNet(gateway_ns, client_ns, tmp_path_factory.mktemp("fakenet"))
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10, check=False)


@dataclass(frozen=True)
class Baseline:
    """The fixed cost of one CLI process here: interpreter start, imports, one refused connection."""

    seconds: float
    max_rss_kb: int


@pytest.fixture(scope="session")
def baseline(fakenet: FakeNet) -> Baseline:
    """Measured with nothing listening (the gateway answers the connection with a reset), best of
    three, so a hostile scenario's time and memory can be judged beyond what any run costs."""
    runs = [
        fakenet.autonat("probe", "--protocol", "upnp", "--root-url", f"http://{GATEWAY}:5999/rootDesc.xml", "--json")
        for _ in range(3)
    ]
    for run in runs:
        assert run.code == 7 and "refused the connection" in run.stderr, run.stderr
    return Baseline(min(run.seconds for run in runs), max(run.max_rss_kb for run in runs))


@dataclass
class RunningIgd:
    log: Path

    def requests(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


@pytest.fixture
def fake_igd(fakenet: FakeNet, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningIgd]:
    """Start the fake IGD with the scenario named by the test's `scenario` parameter."""
    scenario: str = request.param
    log = tmp_path / "igd.log"
    server = subprocess.Popen(
        ["ip", "netns", "exec", fakenet.gateway_ns, sys.executable, SERVER, scenario, GATEWAY, str(log)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready", server.stderr.read() if server.stderr else ""
        yield RunningIgd(log)
    finally:
        server.kill()
        server.wait(timeout=10)


@dataclass
class RunningQuirk:
    """A quirk profile's fakes, running on the gateway (tests/fakes/quirks.py)."""

    profile: Profile
    log: Path

    def requests(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


def _start(command: list[str]) -> subprocess.Popen[str]:
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert server.stdout is not None
    if server.stdout.readline().strip() != "ready":
        server.kill()
        raise AssertionError(server.stderr.read() if server.stderr else "fake did not start")
    return server


@pytest.fixture
def quirk_router(fakenet: FakeNet, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningQuirk]:
    """Start the fakes of the quirk profile given as the test's `quirk_router` parameter."""
    profile: Profile = request.param
    log = tmp_path / "igd.log"
    started: list[subprocess.Popen[str]] = []
    try:
        if profile.igd is not None:
            started.append(
                _start(
                    ["ip", "netns", "exec", fakenet.gateway_ns, sys.executable, SERVER, profile.igd, GATEWAY, str(log)]
                )
            )
        if profile.pmp is not None:
            config = json.dumps(dict(profile.pmp))
            started.append(
                _start(["ip", "netns", "exec", fakenet.gateway_ns, sys.executable, PMP_SERVER, GATEWAY, config])
            )
        yield RunningQuirk(profile, log)
    finally:
        for server in started:
            server.kill()
            server.wait(timeout=10)
