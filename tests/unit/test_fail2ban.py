"""The shipped fail2ban filter and jail (deploy/fail2ban/), checked with Debian's own fail2ban tools.

The log is made by the real code: `autonat.sip.guard.failure_line` for each failure, written through
the daemon's real logging setup (`autonat.daemon.run.configure_logging`). `fail2ban-regex` must match
every failure line, with the right address and the line's own time, whatever the user name, and
nothing else; user names crafted to forge a line or another address must never produce a match for
the forged address. Both ways fail2ban reads the lines are covered: a log file (the date from the
line's time= field) and the systemd journal (the journal's prefix, fail2ban's own date).

These tests never skip: without fail2ban installed they fail and say what to install.
"""

from __future__ import annotations

import ast
import ipaddress
import logging
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from autonat.daemon.run import configure_logging
from autonat.sip.digest import Failure
from autonat.sip.guard import failure_line

REPO = Path(__file__).resolve().parents[2]
FILTER = REPO / "deploy" / "fail2ban" / "filter.d" / "autonat.conf"
JAIL = REPO / "deploy" / "fail2ban" / "jail.d" / "autonat.conf"
FORGED = {"6.6.6.6", "2001:db8::666", "192.0.2.66"}
WALL = 1_740_832_496.0  # 2025-03-01T12:34:56Z


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").is_file() else None)
    if path is None:
        pytest.fail(
            f"{name} is missing: install Debian's fail2ban package (apt-get install fail2ban). "
            "This test checks the shipped filter with the real tool and is never skipped."
        )
    return path


@dataclass(frozen=True)
class Logged:
    line: str  # what failure_line returned
    host: str  # the address fail2ban must report
    wall: float
    user: str  # the user field as logged (escaped)


@pytest.fixture
def daemon_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The daemon's logging (configure_logging as `autonat run` calls it), its stderr into a file."""
    root = logging.getLogger("autonat")
    holes = logging.getLogger("autonat.holes")
    saved = (root.handlers[:], root.level, root.propagate, holes.level)
    path = tmp_path / "autonat.log"
    with path.open("w", encoding="utf-8") as stream:
        monkeypatch.setattr(sys, "stderr", stream)
        configure_logging("info")
        try:
            yield path
        finally:
            for handler in root.handlers:
                handler.flush()
            root.handlers[:], root.propagate = saved[0], saved[2]
            root.setLevel(saved[1])
            holes.setLevel(saved[3])


INJECTIONS = [
    'x" source=6.6.6.6:5060',
    '105" method=REGISTER reason=wrong-password user="',
    "x\n12:34:56.789 autonat: WARNING autonat-auth-failure time=2025-03-01T12:34:56.789+00:00 "
    'source=6.6.6.6:5060 method=REGISTER reason=wrong-password user="105"',
    # ... and one whose forged line our own closing quote would complete
    "x\n12:34:56.789 autonat: WARNING autonat-auth-failure time=2025-03-01T12:34:56.789+00:00 "
    'source=6.6.6.6:5060 method=REGISTER reason=wrong-password user="105',
    "x\r\nhost autonat[1]: 12:34:56.789 autonat: WARNING autonat-auth-failure source=6.6.6.6:5060 "
    'method=REGISTER reason=wrong-password user="y"',
    "autonat-auth-failure time=2025-03-01T12:34:56.789+00:00 source=6.6.6.6:5060 method=REGISTER "
    'reason=wrong-password user="',
    ' source=[2001:db8::666]:5060 method=REGISTER reason=wrong-password user="',
    '\u2028autonat: WARNING autonat-auth-failure source=6.6.6.6:5060 method=X reason=Y user=""',
    '\x85autonat: WARNING autonat-auth-failure source=192.0.2.66:5060 method=X reason=Y user=""',
    "time=2020-01-01T00:00:00+00:00 source=6.6.6.6:1",
    "6.6.6.6",
    "[2001:db8::666]:5060",
    "\x00\x1b[2J\x7f",
    "\ud800\udfff",
    "a" * 5000 + '"\nautonat: WARNING autonat-auth-failure source=6.6.6.6:5060 method=X reason=Y user=""',
    "",
    "105",
    "%0A%22",
]


def _random_names(count: int) -> list[str]:
    rng = random.Random(20250301)
    pools = [
        [chr(code) for code in range(0x20, 0x7F)],
        ['"', "\\", "%", " ", "\n", "\r", "\t", ":", "=", "[", "]", "6", "."],
        [chr(rng.randrange(0x80, 0x110000)) for _ in range(200)],
    ]
    return ["".join(rng.choice(rng.choice(pools)) for _ in range(rng.randrange(0, 90))) for _ in range(count)]


# A failure line quoted inside another message (a parse error echoing a header, say): no match.
QUOTED = (
    "bad header: autonat-auth-failure time=2025-03-01T12:34:56.789+00:00 source=6.6.6.6:5060 "
    'method=REGISTER reason=wrong-password user="x"'
)
SOURCES = [
    ("203.0.113.7", "203.0.113.7"),
    ("2001:db8:1:2::7", "2001:db8:1:2::7"),
    ("::ffff:198.51.100.9", "198.51.100.9"),
    ("2001:DB8::1", "2001:db8::1"),
]


def write_log(path: Path) -> list[Logged]:
    """A daemon log: a failure line for every (source, user name) pair, through the SIP service's logger,
    between ordinary lines (some quoting network text) that must not match."""
    log = logging.getLogger("autonat.service.sip")
    written: list[Logged] = []
    reasons = list(Failure)
    names = INJECTIONS + _random_names(300)
    for index, user in enumerate(names):
        ip, host = SOURCES[index % len(SOURCES)]
        wall = WALL + index
        line = failure_line(
            wall=wall,
            ip=ip,
            port=5060 + index % 2,
            method="INVITE" if index % 3 else "REGISTER",
            reason=reasons[index % len(reasons)],
            user=user,
        )
        log.warning("%s", line)
        written.append(Logged(line, host, wall, line.rpartition(' user="')[2][:-1]))
        if index % 25 == 0:
            log.info("REGISTER %s from %s: 200", "105", "udp:203.0.113.7:5060")
            # Another line quoting network text that holds a whole failure line: no match.
            log.info("dropping a request from %s: %s", "udp:198.51.100.20:5060", QUOTED)
            log.warning(
                "%s", f"dropping: {failure_line(wall=wall, ip='6.6.6.6', port=1, method='X', reason='Y', user='')}"
            )
    for handler in logging.getLogger("autonat").handlers:
        handler.flush()
    return written


def fail2ban_regex(log: Path, *options: str) -> list[tuple[str, str, str, str]]:
    """(ip, time, user, line) of every match."""
    command = [tool("fail2ban-regex"), *options, "-o", "<ip>\t<time>\t<F-USER>\t<msg>", str(log), str(FILTER)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    matches = []
    for row in result.stdout.splitlines():
        ip, time, user, line = row.split("\t", 3)
        matches.append((ip, time, user, line))
    return matches


def _check(matches: list[tuple[str, str, str, str]], written: list[Logged], *, check_time: bool) -> None:
    assert len(matches) == len(written), "every failure line and nothing else"
    by_line = {entry.line: entry for entry in written}
    for ip, time, user, line in matches:
        assert ip not in FORGED, line
        [entry] = [by_line[text] for text in by_line if line.endswith(text)]
        assert ipaddress.ip_address(ip) == ipaddress.ip_address(entry.host), line
        assert user == entry.user
        if check_time:
            assert int(time) == int(entry.wall)


def test_every_failure_line_matches_with_its_own_address(daemon_log: Path) -> None:
    written = write_log(daemon_log)
    text = daemon_log.read_text(encoding="utf-8")
    others = 3 * len(range(0, len(written), 25))
    assert len(text.splitlines()) == len(written) + others  # no user name split a line
    _check(fail2ban_regex(daemon_log), written, check_time=True)


def test_journal_lines_match_too(daemon_log: Path, tmp_path: Path) -> None:
    """backend = systemd: fail2ban reads "HOST IDENT[PID]: MESSAGE" and takes the date from the journal
    (simulated by -d {NONE}: no date is looked for in the line, time= stays in it)."""
    written = write_log(daemon_log)
    journal = tmp_path / "journal.txt"
    lines = daemon_log.read_text(encoding="utf-8").splitlines()
    # What the journal keeps of each line: the message after the formatter's time and "autonat[PID]: "
    # (under journald the daemon writes "<N>LEVEL message"; journald stores the priority and the rest).
    messages = [line.split(": ", 1)[1] for line in lines]
    journal.write_text("".join(f"pbx autonat[4242]: {message}\n" for message in messages), encoding="utf-8")
    _check(fail2ban_regex(journal, "-d", "{NONE}"), written, check_time=False)


def _dump(config: Path) -> list[list[Any]]:
    command = [tool("fail2ban-client"), "-c", str(config), "-d"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [ast.literal_eval(row) for row in result.stdout.splitlines() if row.startswith("[")]
    return [row for row in rows if len(row) > 1 and row[1] == "autonat"]


def _config(tmp_path: Path, jail: str) -> Path:
    """Debian's /etc/fail2ban with our filter and `jail` added, in a directory of our own."""
    system = Path("/etc/fail2ban")
    if not (system / "jail.conf").is_file():
        pytest.fail("/etc/fail2ban/jail.conf is missing: install Debian's fail2ban package (apt-get install fail2ban)")
    config = tmp_path / "fail2ban"
    shutil.copytree(system, config)
    shutil.copy(FILTER, config / "filter.d" / "autonat.conf")
    (config / "jail.d" / "autonat.conf").write_text(jail, encoding="utf-8")
    return config


def test_the_example_jail_reads_the_journal_and_bans_both_protocols(tmp_path: Path) -> None:
    rows = _dump(_config(tmp_path, JAIL.read_text(encoding="utf-8")))
    assert ["add", "autonat", "systemd"] in rows
    assert ["set", "autonat", "addjournalmatch", "_SYSTEMD_UNIT=autonat.service"] in rows
    assert ["set", "autonat", "datepattern", r"\btime=%Y-%m-%dT%H:%M:%S(?:\.%f)?%z"] in rows
    actions = {}
    for row in rows:
        if row[0] == "multi-set" and row[2] == "action":
            settings = dict(row[4])
            actions[settings["protocol"]] = settings["port"]
    assert actions == {"tcp": "5060,5061", "udp": "5060,5061"}


def test_the_example_jail_can_read_a_log_file_instead(tmp_path: Path) -> None:
    logfile = tmp_path / "autonat.log"
    logfile.touch()
    jail = JAIL.read_text(encoding="utf-8")
    variant = (
        jail.replace("\nbackend  = systemd", "\n#backend  = systemd")
        .replace("\n#backend  = auto", "\nbackend  = auto")
        .replace("\n#logpath  = /var/log/autonat.log", f"\nlogpath  = {logfile}")
    )
    assert variant.count("\nbackend  =") == 1 and f"logpath  = {logfile}" in variant
    rows = _dump(_config(tmp_path, variant))
    assert ["add", "autonat", "auto"] in rows
    assert ["set", "autonat", "addlogpath", str(logfile), "head"] in rows
