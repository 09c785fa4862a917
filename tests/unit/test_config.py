"""The daemon's config loader: defaults, a full file, and every way a file can be wrong (one line each)."""

import errno
import math
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import autonat.daemon.config as config_module
from autonat.daemon.config import (
    MAX_CONFIG_SIZE,
    MAX_PROBLEMS,
    Config,
    ConfigError,
    ControlConfig,
    NatConfig,
    StaticMapping,
    default_socket_path,
    load_config,
)
from autonat.errors import AutonatError
from autonat.proto.types import Transport

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
TOKEN = "0123456789abcdef"  # noqa: S105 (a test value)


@pytest.fixture(autouse=True)
def _environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Defaults that depend on who runs the tests and where, pinned: an unprivileged user with XDG dirs."""
    monkeypatch.setenv("AUTONAT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)


def write(tmp_path: Path, text: str, name: str = "autonat.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    error = caught.value
    assert str(error) == "\n".join(error.problems)
    for line in error.problems:
        assert line.startswith(f"{path}:"), line
        assert len(line.splitlines()) == 1, line
    return error.problems


def one_problem(path: Path) -> str:
    problems = problems_of(path)
    assert len(problems) == 1, problems
    return problems[0]


# --- defaults and a valid file ----------------------------------------------------------------------


def test_defaults_without_a_file(tmp_path: Path) -> None:
    config = load_config(None)
    assert config.nat == NatConfig()
    assert config.nat.enabled and config.nat.mapping and config.nat.protocol == "auto"
    assert (config.nat.lease, config.nat.upnp_lease) == (7200, 3600)
    assert config.mappings == ()
    assert config.control == ControlConfig(Path("/run/user/1000/autonat/control.sock"), None, None)
    assert config.journal_path == tmp_path / "state" / "journal.sqlite"
    assert config.log_level == "info"
    assert config.source is None
    assert config.warnings == ()


def test_an_empty_file_means_the_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "# nothing set\n")
    config = load_config(path)
    assert config == Config(
        load_config(None).nat,
        (),
        load_config(None).control,
        load_config(None).journal_path,
        "info",
        path,
    )


def test_default_socket_path_follows_the_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert default_socket_path() == Path("/run/user/1000/autonat/control.sock")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "relative/dir")  # invalid per the XDG spec: ignored
    assert default_socket_path() == tmp_path / "state" / "control.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_socket_path() == tmp_path / "state" / "control.sock"
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_socket_path() == Path("/run/autonat/control.sock")


FULL = f"""
[nat]
enabled = true
mapping = false
protocol = "UPnP"
gateway = "192.168.1.1"
interface = "eth0"
root_url = "http://192.168.1.1:5000/rootDesc.xml"
lease = 3600
upnp_lease = 1800
verify_interval = 30
external_ip_interval = 120
timeout = 1.5
shutdown_timeout = 5

[[mapping]]
port = 5060
transport = "UDP"
external_port = 15060
sticky = true
owner = "sip"

[[mapping]]
port = 5061
transport = "tcp"

[control]
socket = "/tmp/autonat-test/control.sock"
tcp = "127.0.0.1:7070"
token = "{TOKEN}"

[journal]
path = "/tmp/autonat-test/journal.sqlite"

[log]
level = "DEBUG"
"""


def test_a_full_valid_file(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    config = load_config(path)
    assert config.nat == NatConfig(
        enabled=True,
        mapping=False,
        protocol="upnp",
        gateway="192.168.1.1",
        interface="eth0",
        root_url="http://192.168.1.1:5000/rootDesc.xml",
        lease=3600,
        upnp_lease=1800,
        verify_interval=30,
        external_ip_interval=120,
        timeout=1.5,
        shutdown_timeout=5.0,
    )
    assert config.mappings == (
        StaticMapping(5060, Transport.UDP, 15060, True, "sip"),
        StaticMapping(5061, Transport.TCP, 0, False, "config"),
    )
    assert config.control == ControlConfig(Path("/tmp/autonat-test/control.sock"), ("127.0.0.1", 7070), TOKEN)
    assert config.journal_path == Path("/tmp/autonat-test/journal.sqlite")
    assert config.log_level == "debug"
    assert config.source == path
    # mapping = false with [[mapping]] entries: they are not made, and the user is told so.
    assert len(config.warnings) == 1 and "nat.mapping = false" in config.warnings[0]


def test_the_token_stays_out_of_reprs(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL))
    assert TOKEN not in repr(config)


def test_the_deploy_example_loads_cleanly() -> None:
    config = load_config(DEPLOY / "autonat.toml")
    assert config.warnings == ()
    assert config.mappings == ()  # the SIP profile maps its own ports
    assert [profile.name for profile in config.profiles if profile.sip.listen] == ["external"]


def test_the_deploy_unit_runs_the_daemon_with_that_config() -> None:
    unit = (DEPLOY / "autonat.service").read_text()
    assert "ExecStart=/usr/local/bin/autonat run --config /etc/autonat/autonat.toml" in unit
    for setting in (
        "Type=notify",
        "Restart=on-failure",
        "RuntimeDirectory=autonat",
        "StateDirectory=autonat",
        "KillSignal=SIGTERM",
        "TimeoutStopSec=10",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "CapabilityBoundingSet=\n",
    ):
        assert setting in unit, setting


# --- one mistake, one line naming its key -----------------------------------------------------------

MAPPING = '[[mapping]]\nport = 5060\ntransport = "udp"\n'

MISTAKES = [
    # [nat]
    ("[nat]\nenabled = 1", "nat.enabled must be true or false, not the integer 1"),
    ('[nat]\nmapping = "no"', "nat.mapping must be true or false"),
    ("[nat]\nprotocol = 5", "nat.protocol must be a string"),
    (
        '[nat]\nprotocol = "upnpp"',
        'nat.protocol must be one of auto, pcp, natpmp, upnp, not "upnpp" (did you mean "upnp"?)',
    ),
    ('[nat]\ngateway = "router.lan"', "nat.gateway must be an IP address"),
    ("[nat]\ngateway = 192", "nat.gateway must be a string"),
    ('[nat]\ninterface = "eth0/1"', "nat.interface must be a network interface name"),
    ('[nat]\ninterface = "averyveryverylongname"', "nat.interface must be a network interface name"),
    ('[nat]\nroot_url = "https://192.168.1.1/rootDesc.xml"', "nat.root_url must be an http:// URL"),
    ('[nat]\nroot_url = "http://admin:pw@192.168.1.1/"', "nat.root_url must not carry a user name"),
    ('[nat]\nroot_url = "http://192.168.1.1:99999/"', "nat.root_url must be a valid URL"),
    ('[nat]\nroot_url = "http:///x"', "nat.root_url must name the router's host"),
    ('[nat]\nroot_url = "http://a b/"', "nat.root_url must be a URL without spaces"),
    ("[nat]\nlease = 119", "nat.lease must be 120..604800 seconds, not 119"),
    ("[nat]\nlease = 604801", "nat.lease must be 120..604800 seconds, not 604801"),
    ("[nat]\nlease = 0", "nat.lease must be 120..604800 seconds, not 0 (0 would ask for a permanent mapping"),
    ('[nat]\nlease = "7200"', 'nat.lease must be an integer, not the string "7200"'),
    ("[nat]\nlease = 7200.0", "nat.lease must be an integer, not the float 7200.0"),
    ("[nat]\nlease = true", "nat.lease must be an integer, not the boolean true"),
    ("[nat]\nupnp_lease = 0", "nat.upnp_lease must be 120..604800 seconds, not 0 (0 would ask for a permanent"),
    ("[nat]\nupnp_lease = 700000", "nat.upnp_lease must be 120..604800 seconds"),
    ("[nat]\nverify_interval = 0", "nat.verify_interval must be 1..3600 seconds, not 0"),
    ("[nat]\nverify_interval = 3601", "nat.verify_interval must be 1..3600 seconds"),
    ("[nat]\nverify_interval = 1.5", "nat.verify_interval must be an integer"),
    ("[nat]\nexternal_ip_interval = 0", "nat.external_ip_interval must be 1..3600 seconds"),
    ("[nat]\nexternal_ip_interval = -5", "nat.external_ip_interval must be 1..3600 seconds, not -5"),
    ("[nat]\ntimeout = 0.01", "nat.timeout must be 0.05..60 seconds, not 0.01"),
    ("[nat]\ntimeout = 61", "nat.timeout must be 0.05..60 seconds, not 61"),
    ("[nat]\ntimeout = nan", "nat.timeout must be 0.05..60 seconds, not nan"),
    ("[nat]\ntimeout = inf", "nat.timeout must be 0.05..60 seconds, not inf"),
    ('[nat]\ntimeout = "2"', "nat.timeout must be a number"),
    ("[nat]\ntimeout = false", "nat.timeout must be a number, not the boolean false"),
    ("[nat]\nshutdown_timeout = 0.05", "nat.shutdown_timeout must be 0.1..60 seconds"),
    ("[nat]\nshutdown_timeout = 60.5", "nat.shutdown_timeout must be 0.1..60 seconds"),
    ("[nat]\nshutdown_timeout = [1]", "nat.shutdown_timeout must be a number, not an array"),
    # [[mapping]]
    ('[[mapping]]\nport = 0\ntransport = "udp"', "mapping[1].port must be 1..65535, not 0"),
    ('[[mapping]]\nport = 65536\ntransport = "udp"', "mapping[1].port must be 1..65535"),
    ('[[mapping]]\nport = "5060"\ntransport = "udp"', "mapping[1].port must be an integer"),
    ('[[mapping]]\ntransport = "udp"', "mapping[1].port is required"),
    ("[[mapping]]\nport = 5060", "mapping[1].transport is required"),
    ('[[mapping]]\nport = 5060\ntransport = "sctp"', "mapping[1].transport must be one of udp, tcp, both"),
    ("[[mapping]]\nport = 5060\ntransport = 17", "mapping[1].transport must be a string"),
    (MAPPING + "external_port = -1", "mapping[1].external_port must be 0..65535"),
    (MAPPING + "external_port = 65536", "mapping[1].external_port must be 0..65535"),
    (MAPPING + 'sticky = "yes"', "mapping[1].sticky must be true or false"),
    (MAPPING + 'owner = ""', "mapping[1].owner must be 1..64 printable characters"),
    (MAPPING + f'owner = "{"x" * 65}"', "mapping[1].owner must be at most 64 characters"),
    (MAPPING + 'owner = "a\\tb"', 'mapping[1].owner must be printable text, not "a\\tb"'),
    (MAPPING + "owner = 5", "mapping[1].owner must be a string"),
    (MAPPING + MAPPING.replace("5060", "5070") + "sticky = 1", "mapping[2].sticky must be true or false"),
    # [control]
    ('[control]\nsocket = "run/control.sock"', "control.socket must be an absolute path"),
    (f'[control]\nsocket = "/{"a" * 200}"', "control.socket must be at most 107 bytes long"),
    ("[control]\nsocket = 5", "control.socket must be a string"),
    (f'[control]\ntcp = "localhost:7070"\ntoken = "{TOKEN}"', "control.tcp must have an IP address as its host"),
    (f'[control]\ntcp = "127.0.0.1"\ntoken = "{TOKEN}"', "control.tcp must be HOST:PORT"),
    (f'[control]\ntcp = "127.0.0.1:0"\ntoken = "{TOKEN}"', "control.tcp must have a port 1..65535"),
    (f'[control]\ntcp = "127.0.0.1:http"\ntoken = "{TOKEN}"', "control.tcp must have a port 1..65535"),
    (f'[control]\ntcp = "::1:7070"\ntoken = "{TOKEN}"', "control.tcp must put an IPv6 address in brackets"),
    (f'[control]\ntcp = "[::1]"\ntoken = "{TOKEN}"', "control.tcp must be HOST:PORT with the IPv6 address in brackets"),
    (f'[control]\ntcp = 7070\ntoken = "{TOKEN}"', "control.tcp must be a string"),
    ('[control]\ntcp = "127.0.0.1:7070"', "control.tcp needs control.token"),
    ('[control]\ntcp = "127.0.0.1:7070"\ntoken = ""', "control.tcp needs control.token"),
    ('[control]\ntcp = "127.0.0.1:7070"\ntoken = "short"', "control.token must be at least 16 characters, not 5"),
    ("[control]\ntoken = 1234567890123456", "control.token must be a string"),
    # [journal], [log]
    ('[journal]\npath = "journal.sqlite"', "journal.path must be an absolute path"),
    ("[journal]\npath = false", "journal.path must be a string"),
    ('[log]\nlevel = "verbose"', "log.level must be one of debug, info, warning, error"),
    (
        '[log]\nlevel = "warn"',
        'log.level must be one of debug, info, warning, error, not "warn" (did you mean "warning"?)',
    ),
    ("[log]\nlevel = 3", "log.level must be a string"),
    ('[log]\ntrace = ["sip", "rtp"]', "log.trace is not usable: unknown trace protocol 'rtp'"),
    ("[log]\ntrace = 1", "log.trace must be a list of protocol names"),
    ("[log]\ntrace = [1]", "log.trace must be a list of protocol names"),
    # sections of the wrong shape
    ("nat = 5", "nat must be a table ([nat]), not the integer 5"),
    ("[[nat]]\nlease = 600", "nat must be a table ([nat]), not an array of tables ([[nat]])"),
    ('control = "x"', "control must be a table"),
    ("log = []", "log must be a table ([log]), not an array"),
    ("journal = 2024-01-01", "journal must be a table ([journal]), not the date-time 2024-01-01"),
    ("mapping = 5", "mapping must be an array of tables ([[mapping]]), not the integer 5"),
    ('[mapping]\nport = 5060\ntransport = "udp"', "mapping must be an array of tables ([[mapping]], one per mapping)"),
    ("mapping = [1]", "mapping[1] must be a table, not the integer 1"),
]


@pytest.mark.parametrize(("text", "expected"), MISTAKES, ids=[expected for _, expected in MISTAKES])
def test_each_mistake_is_one_line_naming_its_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text + "\n")
    line = one_problem(path)
    assert line.startswith(f"{path}: {expected}"), line


MISSPELLINGS = [
    ("[nat]\nleese = 600", "unknown key nat.leese (did you mean nat.lease?)"),
    ("[nat]\nLease = 600", "unknown key nat.Lease (did you mean nat.lease?)"),
    ("[nat]\nupnp_leese = 600", "unknown key nat.upnp_leese (did you mean nat.upnp_lease?)"),
    ("[nat]\ngatway = '10.0.0.1'", "unknown key nat.gatway (did you mean nat.gateway?)"),
    ("[natt]\nlease = 600", "unknown key natt (did you mean nat?)"),
    ("[[mappings]]\nport = 5060", "unknown key mappings (did you mean mapping?)"),
    (
        '[[mapping]]\nport = 5060\ntransport = "udp"\nownr = "x"',
        "unknown key mapping[1].ownr (did you mean mapping[1].owner?)",
    ),
    ("[[mapping]]\nprot = 5060\ntransport = 'udp'", "unknown key mapping[1].prot (did you mean mapping[1].port?)"),
    ("[control]\ntokn = 'x'", "unknown key control.tokn (did you mean control.token?)"),
    ("[journal]\npth = '/x'", "unknown key journal.pth (did you mean journal.path?)"),
    ("[log]\nlevle = 'info'", "unknown key log.levle (did you mean log.level?)"),
    # the right key in the wrong section
    ("[nat]\nsocket = '/run/x.sock'", "unknown key nat.socket (did you mean control.socket?)"),
    ("lease = 600", "unknown key lease (did you mean nat.lease?)"),
    # nothing close: no guess
    ("[nat]\nfrobnicate = 1", "unknown key nat.frobnicate"),
    ("[nat.extra]\nx = 1", "unknown key nat.extra"),
]


@pytest.mark.parametrize(("text", "expected"), MISSPELLINGS, ids=[expected for _, expected in MISSPELLINGS])
def test_unknown_keys_get_the_closest_known_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text + "\n")
    assert one_problem(path) == f"{path}: {expected}"


def test_all_mistakes_of_a_file_are_reported_together(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[nat]
leese = 600
timeout = 0
protocol = "stun"

[[mapping]]
port = 70000
transport = "udp"

[[mapping]]
port = 5060

[log]
level = "loud"
""",
    )
    problems = problems_of(path)
    assert len(problems) == 6, problems
    assert problems == [
        f'{path}: nat.protocol must be one of auto, pcp, natpmp, upnp, not "stun"',
        f"{path}: nat.timeout must be 0.05..60 seconds, not 0",
        f"{path}: mapping[1].port must be 1..65535, not 70000",
        f"{path}: mapping[2].transport is required",
        f'{path}: log.level must be one of debug, info, warning, error, not "loud"',
        f"{path}: unknown key nat.leese (did you mean nat.lease?)",
    ]


def test_a_flood_of_mistakes_is_capped(tmp_path: Path) -> None:
    path = write(tmp_path, "[nat]\n" + "".join(f"bogus{i} = 1\n" for i in range(300)))
    problems = problems_of(path)
    assert len(problems) == MAX_PROBLEMS
    assert problems[-1] == f"{path}: ... and {300 - MAX_PROBLEMS + 1} more mistakes"


# --- mappings ---------------------------------------------------------------------------------------


def test_both_makes_a_udp_and_a_tcp_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, '[[mapping]]\nport = 5060\ntransport = "Both"\nexternal_port = 5080\nowner = "sip"\n')
    assert load_config(path).mappings == (
        StaticMapping(5060, Transport.UDP, 5080, False, "sip"),
        StaticMapping(5060, Transport.TCP, 5080, False, "sip"),
    )


def test_same_port_on_different_transports_is_fine(tmp_path: Path) -> None:
    path = write(tmp_path, MAPPING + MAPPING.replace("udp", "tcp"))
    assert [m.transport for m in load_config(path).mappings] == [Transport.UDP, Transport.TCP]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MAPPING + MAPPING, "mapping[2] (udp port 5060) duplicates mapping[1]"),
        (
            MAPPING + MAPPING.replace("udp", "tcp") + MAPPING.replace("udp", "UDP"),
            "mapping[3] (udp port 5060) duplicates mapping[1]",
        ),
        (
            MAPPING.replace("udp", "tcp") + MAPPING.replace("udp", "both"),
            "mapping[2] (tcp port 5060) duplicates mapping[1]",
        ),
        (
            MAPPING + "external_port = 7000\n" + MAPPING.replace("5060", "5070") + "external_port = 7000\n",
            "mapping[2] (udp external_port 7000) collides with mapping[1]",
        ),
    ],
)
def test_duplicate_mappings_name_both(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    assert one_problem(path) == f"{path}: {expected}"


def test_mappings_with_nat_disabled_are_a_warning(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[nat]\nenabled = false\n" + MAPPING))
    assert config.warnings == (
        f"{tmp_path / 'autonat.toml'}: nat.enabled = false: the 1 [[mapping]] entries are not made",
    )


def test_too_many_mappings(tmp_path: Path) -> None:
    path = write(tmp_path, "".join(MAPPING.replace("5060", str(10000 + i)) for i in range(300)))
    assert "mapping has 300 entries; at most 256" in one_problem(path)


# --- control ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tcp", "expected"),
    [
        ("127.0.0.1:7070", ("127.0.0.1", 7070)),
        ("[::1]:7070", ("::1", 7070)),
        (" 127.0.0.2:65535 ", ("127.0.0.2", 65535)),
        ("[::ffff:127.0.0.1]:1", ("::ffff:7f00:1", 1)),
    ],
)
def test_tcp_on_loopback_with_a_token(tmp_path: Path, tcp: str, expected: tuple[str, int]) -> None:
    config = load_config(write(tmp_path, f'[control]\ntcp = "{tcp}"\ntoken = "{TOKEN}"\n'))
    assert config.control.tcp == expected and config.control.token == TOKEN
    assert config.warnings == ()


@pytest.mark.parametrize("tcp", ["0.0.0.0:7070", "192.168.1.10:7070", "[::]:7070"])
def test_tcp_beyond_loopback_is_a_warning(tmp_path: Path, tcp: str) -> None:
    config = load_config(write(tmp_path, f'[control]\ntcp = "{tcp}"\ntoken = "{TOKEN}"\n'))
    assert config.control.tcp is not None
    assert len(config.warnings) == 1 and "not loopback" in config.warnings[0]
    assert config.warnings[0].startswith(f"{tmp_path / 'autonat.toml'}: control.tcp listens on {tcp}")


def test_an_invalid_tcp_without_a_token_is_two_mistakes(tmp_path: Path) -> None:
    problems = problems_of(write(tmp_path, '[control]\ntcp = "localhost:7070"\n'))
    assert len(problems) == 2 and "host names" in problems[0] and "needs control.token" in problems[1]


def test_a_token_without_tcp_is_a_warning(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, f'[control]\ntoken = "{TOKEN}"\n'))
    assert config.control.tcp is None
    assert config.warnings == (
        f"{tmp_path / 'autonat.toml'}: control.token is set but control.tcp is not: the token is not used",
    )


def test_a_token_in_a_world_readable_file_is_a_warning(tmp_path: Path) -> None:
    path = write(tmp_path, f'[control]\ntcp = "127.0.0.1:7070"\ntoken = "{TOKEN}"\n')
    assert load_config(path).warnings == ()
    path.chmod(0o644)
    assert load_config(path).warnings == (f"{path}: the file holds control.token but any user can read it (chmod o-r)",)


def test_a_configured_socket_and_journal(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[control]\nsocket = "/run/x/c.sock"\n[journal]\npath = "/var/x/j.db"\n'))
    assert config.control.socket == Path("/run/x/c.sock") and config.journal_path == Path("/var/x/j.db")


# --- overrides --------------------------------------------------------------------------------------


def test_with_overrides_only_switches_things_off(tmp_path: Path) -> None:
    config = load_config(None)
    assert config.with_overrides(False, False) == config
    nonat = config.with_overrides(nonat=True, nonatmap=False)
    assert (nonat.nat.enabled, nonat.nat.mapping) == (False, True)
    nonatmap = config.with_overrides(nonat=False, nonatmap=True)
    assert (nonatmap.nat.enabled, nonatmap.nat.mapping) == (True, False)
    assert nonatmap.nat.lease == config.nat.lease and nonatmap.control == config.control
    disabled = load_config(write(tmp_path, "[nat]\nenabled = false\nmapping = false\n"))
    assert disabled.with_overrides(nonat=False, nonatmap=False).nat == disabled.nat


# --- files that are not configs ---------------------------------------------------------------------


def test_a_toml_syntax_error_gives_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[nat]\nlease = 600\ntimeout = \n")
    line = one_problem(path)
    assert line.startswith(f"{path}:3:"), line
    assert "invalid TOML" in line


def test_a_key_declared_twice_is_a_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[nat]\nlease = 600\n\n[nat]\nlease = 700\n")
    assert one_problem(path).startswith(f"{path}:4:")


def test_an_error_at_the_end_of_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[nat]\nlease =")
    assert "invalid TOML" in one_problem(path)


def test_a_file_too_large(tmp_path: Path) -> None:
    path = tmp_path / "big.toml"
    path.write_bytes(b"#" * MAX_CONFIG_SIZE + b"\n")
    assert one_problem(path) == f"{path}: larger than 64 KiB, which no autonat config needs"


def test_a_file_just_under_the_cap_loads(tmp_path: Path) -> None:
    path = tmp_path / "full.toml"
    path.write_bytes(b"#" * (MAX_CONFIG_SIZE - 1) + b"\n")
    assert load_config(path).mappings == ()


def test_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert one_problem(path) == f"{path}: cannot open: No such file or directory"


def test_a_directory(tmp_path: Path) -> None:
    assert one_problem(tmp_path) == f"{tmp_path}: not a regular file"


def test_a_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    assert one_problem(path) == f"{path}: not a regular file"


def test_an_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "")
    if os.getuid() == 0:
        # Root reads any file whatever its mode, so the kernel's answer for everyone else is played back.
        def refuse(*_: object) -> int:
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(config_module.os, "open", refuse)
    else:
        path.chmod(0)
    assert one_problem(path) == f"{path}: cannot open: Permission denied"


def test_not_utf8_gives_its_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[[mapping]]\nport = 5060\nowner = "caf\xe9"\n')
    assert one_problem(path) == f"{path}:3: not UTF-8 text (byte 0xe9)"


def test_a_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf[log]\nlevel = 'debug'\n")
    assert load_config(path).log_level == "debug"


def test_deep_nesting_is_an_error_not_a_crash(tmp_path: Path) -> None:
    path = write(tmp_path, "x = " + "[" * 5000)
    assert "invalid TOML" in one_problem(path)


def test_a_decimal_integer_past_the_digit_limit(tmp_path: Path) -> None:
    path = write(tmp_path, "[nat]\nlease = " + "9" * 5000 + "\n")
    line = one_problem(path)
    assert "invalid TOML" in line and len(line) < 400


def test_a_huge_hex_integer_is_shown_briefly(tmp_path: Path) -> None:
    path = write(tmp_path, "[nat]\nlease = 0x" + "f" * 60000 + "\n")
    assert one_problem(path) == f"{path}: nat.lease must be 120..604800 seconds, not an integer of 240000 bits"
    path = write(tmp_path, "[nat]\ntimeout = 0x" + "f" * 60000 + "\n")
    assert one_problem(path) == f"{path}: nat.timeout must be 0.05..60 seconds, not an integer of 240000 bits"


def test_hostile_keys_and_values_stay_on_one_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '"a\\nb\\u2028c" = 1\n[log]\nlevel = "x\\u0085y\\rz"\n[nat]\ngateway = "' + "1" * 500 + '"\n',
    )
    problems = problems_of(path)
    assert len(problems) == 3
    assert f'{path}: unknown key "a\\nb\\u2028c"' in problems
    assert max(len(line) for line in problems) < 300


def test_config_error_is_an_autonat_error_with_exit_code_2() -> None:
    error = ConfigError(["f: a", "f: b"])
    assert isinstance(error, AutonatError) and error.exit_code == 2
    assert error.problems == ["f: a", "f: b"] and str(error) == "f: a\nf: b"


# --- anything at all as a config file ---------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as directory:
        yield Path(directory) / "fuzz.toml"


def check_outcome(path: Path) -> Config | ConfigError:
    try:
        config = load_config(path)
    except ConfigError as error:
        assert error.problems and str(error) == "\n".join(error.problems)
        for line in error.problems:
            assert line.startswith(f"{path}:") and len(line.splitlines()) == 1, line
        return error
    for mapping in config.mappings:
        assert 1 <= mapping.port <= 65535 and 0 <= mapping.external_port <= 65535
    assert 0.05 <= config.nat.timeout <= 60 and 120 <= config.nat.lease <= 604800
    assert config.control.tcp is None or config.control.token is not None
    return config


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=400))
def test_any_text_gives_a_config_or_a_config_error(scratch: Path, text: str) -> None:
    scratch.write_text(text, encoding="utf-8")
    check_outcome(scratch)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400))
def test_any_bytes_give_a_config_or_a_config_error(scratch: Path, data: bytes) -> None:
    scratch.write_bytes(data)
    check_outcome(scratch)


SCHEMA = {
    "nat": [
        "enabled",
        "mapping",
        "protocol",
        "gateway",
        "interface",
        "root_url",
        "lease",
        "upnp_lease",
        "verify_interval",
        "external_ip_interval",
        "timeout",
        "shutdown_timeout",
    ],
    "control": ["socket", "tcp", "token"],
    "journal": ["path"],
    "log": ["level"],
}
MAPPING_KEYS = ["port", "transport", "external_port", "sticky", "owner"]

values = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-5, max_value=70000),
    st.floats(),
    st.text(max_size=30),
    st.sampled_from(["", "udp", "tcp", "both", "auto", "upnp", "127.0.0.1:7070", "0.0.0.0:1", "/run/x.sock", TOKEN]),
)


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    assert isinstance(value, str)
    escaped = "".join(f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F or c in '"\\' else c for c in value)
    return f'"{escaped}"'


def toml_table(entries: dict[str, object]) -> str:
    return "".join(f"{toml_value(key)} = {toml_value(value)}\n" for key, value in entries.items())


def table_of(keys: list[str]) -> st.SearchStrategy[dict[str, object]]:
    return st.dictionaries(st.one_of(st.sampled_from(keys), st.text(max_size=12)), values, max_size=6)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sections=st.fixed_dictionaries({name: table_of(keys) for name, keys in SCHEMA.items()}),
    mappings=st.lists(table_of(MAPPING_KEYS), max_size=4),
)
def test_any_values_give_a_config_or_a_config_error(
    scratch: Path, sections: dict[str, dict[str, object]], mappings: list[dict[str, object]]
) -> None:
    text = "".join(f"[{name}]\n{toml_table(entries)}" for name, entries in sections.items())
    text += "".join(f"[[mapping]]\n{toml_table(entries)}" for entries in mappings)
    scratch.write_text(text, encoding="utf-8")
    scratch.chmod(stat.S_IRUSR | stat.S_IWUSR)
    outcome = check_outcome(scratch)
    if isinstance(outcome, ConfigError):
        assert not any("invalid TOML" in line for line in outcome.problems), outcome.problems


def any_case(words: list[str]) -> st.SearchStrategy[str]:
    return st.sampled_from(words).flatmap(
        lambda word: st.sampled_from([word, word.upper(), word.capitalize(), f" {word} "])
    )


printable = st.text(st.characters(blacklist_categories=("C", "Zl", "Zp", "Zs")), min_size=1, max_size=64)
valid_nat = st.fixed_dictionaries(
    {},
    optional={
        "enabled": st.booleans(),
        "mapping": st.booleans(),
        "protocol": any_case(["auto", "pcp", "natpmp", "upnp"]),
        "gateway": st.one_of(st.just(""), st.ip_addresses().map(str)),
        "interface": st.one_of(st.just(""), st.from_regex(r"[a-z][a-z0-9._-]{0,14}", fullmatch=True)),
        "root_url": st.sampled_from(["", "http://192.168.1.1:5000/rootDesc.xml", "http://[fe80::1]/d.xml"]),
        "lease": st.integers(120, 604800),
        "upnp_lease": st.integers(120, 604800),
        "verify_interval": st.integers(1, 3600),
        "external_ip_interval": st.integers(1, 3600),
        "timeout": st.one_of(st.floats(0.05, 60), st.integers(1, 60)),
        "shutdown_timeout": st.one_of(st.floats(0.1, 60), st.integers(1, 60)),
    },
)
valid_mapping = st.fixed_dictionaries(
    {"port": st.integers(1, 65535), "transport": any_case(["udp", "tcp", "both"])},
    optional={"sticky": st.booleans(), "owner": printable},
)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    nat=valid_nat,
    mappings=st.lists(valid_mapping, max_size=6, unique_by=lambda m: m["port"]),
    tcp=st.sampled_from(["", "127.0.0.1:7070", "[::1]:1"]),
    level=any_case(["debug", "info", "warning", "error"]),
)
def test_any_valid_file_loads_with_its_values(
    scratch: Path, nat: dict[str, object], mappings: list[dict[str, object]], tcp: str, level: str
) -> None:
    control = {"tcp": tcp, "token": TOKEN} if tcp else {}
    text = f"[nat]\n{toml_table(nat)}[control]\n{toml_table(control)}[log]\nlevel = {toml_value(level)}\n"
    text += "".join(f"[[mapping]]\n{toml_table(entries)}" for entries in mappings)
    scratch.write_text(text, encoding="utf-8")
    scratch.chmod(stat.S_IRUSR | stat.S_IWUSR)
    config = load_config(scratch)
    for key, value in nat.items():
        loaded = getattr(config.nat, key)
        if isinstance(value, str):
            assert loaded == (value.strip().lower() if key == "protocol" else value or None), key
        else:
            assert loaded == value, key
    expected = [
        (transport, entries["port"], entries.get("sticky", False), entries.get("owner", "config"))
        for entries in mappings
        for transport in (
            [Transport.UDP, Transport.TCP]
            if str(entries["transport"]).strip().lower() == "both"
            else [Transport(str(entries["transport"]).strip().lower())]
        )
    ]
    assert [(m.transport, m.port, m.sticky, m.owner) for m in config.mappings] == expected
    assert (config.control.tcp is not None) == bool(tcp)
    assert config.log_level == level.strip().lower()


# --- ACL lists, SIP profiles, STUN cross-check -------------------------------------------------------

PROFILE_FILE = """
[nat]
stun = "stun:203.0.113.100"

[[acl]]
name = "lan"
default = "allow"
nodes = [["deny", "192.168.42.0/24"], {type = "allow", cidr = "192.168.42.42/32"}]

[[profile]]
name = "external"
ext-rtp-ip = "auto-nat"
ext-sip-ip = "autonat:198.51.100.7"
sip-port = 5080
tls-sip-port = 5081
local-network-acl = "lan"

[[profile]]
name = "internal"
sip-ip = "192.168.77.10"
ext-sip-ip = "stun:stun.example.org:3479"
local-network-acl = "none"
"""


def test_profiles_acls_and_stun_load(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, PROFILE_FILE))
    assert config.nat.stun == "stun:203.0.113.100:3478"
    [lan] = config.acls
    assert lan.lookup("192.168.42.42") and not lan.lookup("192.168.42.1") and lan.lookup("8.8.8.8")
    external, internal = config.profiles
    assert external.name == "external"
    external, internal = external.addressing, internal.addressing
    assert (external.sip_port, external.tls_sip_port) == (5080, 5081)
    assert str(external.ext_sip_ip) == "autonat:198.51.100.7" and str(external.ext_rtp_ip) == "auto-nat"
    assert external.local_network_acl == "lan" and internal.local_network_acl is None
    assert str(internal.sip_ip) == "192.168.77.10" and str(internal.ext_sip_ip) == "stun:stun.example.org:3479"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[[profile]]\nname = "p"\nlocal-network-acl = "localnet.atuo"\n',
            'profile[1].local-network-acl names an unknown ACL list "localnet.atuo" (did you mean "localnet.auto"?)',
        ),
        ('[[profile]]\nname = "p"\next-sip-ip = "pbx.example.org"\n', "profile[1].ext-sip-ip 'pbx.example.org' is not"),
        ('[[profile]]\nname = "p"\nsip-ip = "eth0"\n', "profile[1].sip-ip must be an IP address"),
        ('[[profile]]\next-sip-ip = "auto-nat"\n', "profile[1].name is required"),
        ('[nat]\nstun = "203.0.113.100"\n', "nat.stun must be stun:host[:port]"),
        ('[[acl]]\nname = "x"\nnodes = [["maybe", "10.0.0.0/8"]]\n', "acl[1]:"),
        ('[[acl]]\nname = "x.auto"\n', "names ending in .auto belong to the built-in lists"),
        ('[[acl]]\nname = "x"\n[[acl]]\nname = "x"\n', 'ACL list "x" is defined twice'),
    ],
)
def test_profile_and_acl_mistakes_are_one_line(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in one_problem(write(tmp_path, text))


def test_a_freeswitch_acl_conf_is_imported(tmp_path: Path) -> None:
    (tmp_path / "acl.conf.xml").write_text(
        '<configuration name="acl.conf" description="Network Lists"><network-lists>'
        '<list name="domains" default="deny"><node type="allow" cidr="198.51.100.0/24"/></list>'
        "</network-lists></configuration>"
    )
    text = f'[freeswitch]\nacl_conf = "{tmp_path / "acl.conf.xml"}"\n'
    text += '[[profile]]\nname = "p"\nlocal-network-acl = "domains"\n'
    config = load_config(write(tmp_path, text))
    assert [acl.name for acl in config.acls] == ["domains"]
    assert config.profiles[0].addressing.local_network_acl == "domains"


# --- the SIP service: [sip], [[user]], listeners, dialplan, gateways ----------------------------------

SIP_CONFIG = """
[sip]
realm = "lab"
rtp-start-port = 20000
rtp-end-port = 20099
rtp-pool = 2
t1 = 0.1
rtp-timeout = 10

[[user]]
name = "105"
password = "pw"

[[profile]]
name = "inner"
sip-port = 5080

[[profile.gateway]]
name = "outer"
proxy = "192.168.77.10"
username = "200"
password = "pw200"

[[profile.extension]]
match = "^\\\\*(\\\\d+)$"
action = "gateway"
gateway = "outer"

[[profile.extension]]
match = "9196"
action = "echo"
"""


def test_sip_settings_users_gateways_and_dialplan_load(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, SIP_CONFIG))
    assert config.sip.realm == "lab" and config.sip.users == (("105", "pw"),)
    assert (config.sip.rtp_start_port, config.sip.rtp_end_port, config.sip.pool_size) == (20000, 20099, 2)
    assert config.sip.t1 == 0.1 and config.sip.inactivity == 10
    name, service = config.profiles[0].name, config.profiles[0].sip
    assert name == "inner" and service.listen and service.tcp
    gateway = service.gateways[0]
    assert (gateway.name, gateway.host, gateway.port, gateway.username) == ("outer", "192.168.77.10", 5060, "200")
    assert "pw200" not in repr(gateway)
    first, second = service.dialplan
    assert first.target("*9196") == "9196" and first.gateway == "outer"
    assert first.target("9196") is None and second.target("9196") == "9196"


def test_without_extensions_the_default_dialplan_echoes_9196_and_rings_users(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[[profile]]\nname = "p"\n'))
    (profile,) = config.profiles
    service = profile.sip
    actions = {str(ext.action) for ext in service.dialplan}
    assert actions == {"echo", "user"}
    assert next(ext for ext in service.dialplan if str(ext.action) == "echo").target("9196") == "9196"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[sip]\nrtp-start-port = 30000\nrtp-end-port = 20000\n", "sip.rtp-end-port must be above rtp-start-port"),
        ("[sip]\nt1 = 0\n", "sip.t1 must be 0.05..5 s"),
        ('[[user]]\nname = "a b"\npassword = "x"\n', "user[1].name is required: 1-64 letters"),
        ('[[user]]\nname = "105"\n', "user[1].password is required"),
        ('[[profile]]\nname = "p"\n[[profile.extension]]\nmatch = "(("\n', "profile[1].extension[1].match is not a"),
        (
            '[[profile]]\nname = "p"\n[[profile.extension]]\nmatch = "1"\naction = "gateway"\ngateway = "nope"\n',
            'must name a [[profile.gateway]] of this profile, not "nope"',
        ),
        (
            '[[profile]]\nname = "p"\n[[profile.gateway]]\nname = "g"\nproxy = "pbx.example.org"\n',
            "proxy must have an IP",
        ),
        ('[[profile]]\nname = "p"\n[[profile.gateway]]\nname = "g"\nproxy = "10.0.0.1"\n', "username is required"),
        ('[[profile]]\nname = "p"\ntls-cert = "/no/such.pem"\n', "profile[1].tls-cert names no readable file"),
        ('[[profile]]\nname = "p"\n[[profile.extension]]\nmatch = "1"\naction = "fax"\n', "must be one of echo"),
        (
            '[[profile]]\nname = "p"\n[[profile.extension]]\nmatch = "(1)\\\\1"\n',
            "match is not a usable regular expression: invalid escape sequence: \\1 (patterns run on RE2",
        ),
        (
            '[[profile]]\nname = "p"\n[[profile.extension]]\nmatch = "(?=1)1"\n',
            "no backreferences, no lookaround",
        ),
        ("[sip]\nmax-media-calls = 0\n", "sip.max-media-calls must be 1..10000"),
        ("[sip]\nsource-call-rate = -1\n", "sip.source-call-rate must be 0..10000 new calls a second (0: no limit)"),
        ("[sip]\nsource-max-calls = 0\n", "sip.source-max-calls must be 1..100000"),
        ("[sip]\nrtp-pool-refill-rate = 5000\n", "sip.rtp-pool-refill-rate must be 0..1000 pairs a second"),
        ('[[profile]]\nname = "p"\nmax-media-calls = -3\n', "profile[1].max-media-calls must be 0..10000"),
        ("[nat]\nmap_rate = 1e9\n", "nat.map_rate must be 0..1000 new mappings a second"),
        ("[nat]\nmax_lease = 60\n", "nat.max_lease must be 120..604800 seconds"),
        ("[nat]\nlease = 7200\nmax_lease = 3600\n", "nat.max_lease must be at least lease (7200)"),
    ],
)
def test_sip_mistakes_are_one_line(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in one_problem(write(tmp_path, text))


def test_a_pattern_that_backtracks_in_a_backtracking_engine_runs_in_linear_time(tmp_path: Path) -> None:
    """`(a+)+$` takes Python's re seconds on 30 characters; RE2 answers at once, for any number."""
    import time

    config = load_config(write(tmp_path, '[[profile]]\nname = "p"\n[[profile.extension]]\nmatch = "(a+)+$"\n'))
    service = config.profiles[0].sip
    extension = service.dialplan[0]
    started = time.perf_counter()
    assert extension.target("a" * 5000 + "b") is None
    assert extension.target("aaaa") == "aaaa"
    assert time.perf_counter() - started < 0.5  # Python's re: 2**5000 steps


def test_caps_load_with_their_values_and_defaults(tmp_path: Path) -> None:
    text = (
        "[nat]\nmap_rate = 0\nmax_lease = 3600\nlease = 600\n"
        "[sip]\nmax-media-calls = 8\nsource-call-rate = 0.5\nsource-call-burst = 2\nsource-max-calls = 3\n"
        "rtp-pool-refill-rate = 1\n"
        '[[profile]]\nname = "p"\nmax-media-calls = 2\n[[profile]]\nname = "q"\nsip-port = 5070\n'
    )
    config = load_config(write(tmp_path, text))
    assert (config.nat.map_rate, config.nat.max_lease) == (0, 3600)
    sip = config.sip
    assert (sip.max_media_calls, sip.source_call_rate, sip.source_call_burst, sip.source_max_calls) == (8, 0.5, 2, 3)
    assert sip.pool_refill_rate == 1
    assert {p.name: p.sip for p in config.profiles}["p"].max_media_calls == 2
    assert {p.name: p.sip for p in config.profiles}["q"].max_media_calls is None  # 0 / absent: only the [sip] cap
    defaults = load_config(write(tmp_path, "[nat]\nlease = 172800\n", "big.toml")).nat
    assert defaults.max_lease == 172800  # never below the lease asked for


def test_the_defaults_the_deploy_example_shows_are_the_real_ones(tmp_path: Path) -> None:
    """Every `# key = value` of [nat] and [sip] in deploy/autonat.toml, uncommented, changes nothing."""
    import re as regex

    from autonat.engine.settings import NatSettings
    from autonat.service.settings import SipSettings

    lines: list[str] = []
    section = None
    for line in (DEPLOY / "autonat.toml").read_text().splitlines():
        header = regex.fullmatch(r"#?\s*(\[\[?)([\w.]+)\]\]?\s*", line)
        if header:
            section = header[2] if header[1] == "[" else None  # [[array]]s are not [nat] / [sip]
            if section in ("nat", "sip"):
                lines.append(f"[{section}]")
            continue
        setting = regex.match(r"# ([a-z_-]+) = (\S+)", line)
        if section in ("nat", "sip") and setting and setting[1] != "stun":
            lines.append(f"{setting[1]} = {setting[2]}")
    assert len(lines) > 25, lines
    config = load_config(write(tmp_path, "\n".join(lines) + "\n"))
    assert config.nat == NatSettings()
    assert config.sip == SipSettings()


# --- [web] -------------------------------------------------------------------------------------------


def test_the_web_listener_is_off_by_default(tmp_path: Path) -> None:
    from autonat.web.settings import WebConfig

    assert load_config(None).web == WebConfig() and WebConfig().listen is None
    assert load_config(write(tmp_path, '[web]\nlisten = ""\n')).web.listen is None
    assert load_config(write(tmp_path, '[web]\nlisten = ""\n')).warnings == ()


def test_a_web_table_loads_with_its_caps(tmp_path: Path) -> None:
    from autonat.web.settings import WebConfig

    text = (
        f'[web]\nlisten = "127.0.0.1:8080"\ntoken = "{TOKEN}"\nmax_connections = 8\nmax_request_size = 4096\n'
        "idle_timeout = 2.5\n"
    )
    config = load_config(write(tmp_path, text))
    assert config.web == WebConfig(("127.0.0.1", 8080), TOKEN, 8, 4096, 2.5)
    assert config.warnings == ()
    assert TOKEN not in repr(config)
    assert load_config(write(tmp_path, '[web]\nlisten = "[::1]:8080"\n')).web.listen == ("::1", 8080)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[web]\nlisten = "localhost:8080"', "web.listen must have an IP address as its host (no host names)"),
        ('[web]\nlisten = "127.0.0.1"', 'web.listen must be HOST:PORT, as 127.0.0.1:7070, not "127.0.0.1"'),
        ('[web]\nlisten = "127.0.0.1:0"', "web.listen must have a port 1..65535"),
        ('[web]\nlisten = "::1:8080"', "web.listen must put an IPv6 address in brackets"),
        ("[web]\nlisten = 8080", "web.listen must be a string, not the integer 8080"),
        (
            '[web]\nlisten = "0.0.0.0:8080"',
            "web.listen is not loopback (0.0.0.0:8080): set web.token (at least 16 characters), which every"
            " request must then carry",
        ),
        ('[web]\nlisten = "[::]:8080"', "web.listen is not loopback ([::]:8080): set web.token"),
        ('[web]\nlisten = "127.0.0.1:8080"\ntoken = "short"', "web.token must be at least 16 characters, not 5"),
        ("[web]\nmax_connections = 0", "web.max_connections must be 1..1024, not 0"),
        ('[web]\nmax_connections = "32"', 'web.max_connections must be an integer, not the string "32"'),
        ("[web]\nmax_request_size = 100", "web.max_request_size must be 1024..65536 bytes, not 100"),
        ("[web]\nidle_timeout = 0", "web.idle_timeout must be 1..300 seconds, not 0"),
        ("[web]\nidle_timeout = nan", "web.idle_timeout must be 1..300 seconds, not nan"),
        ('[web]\nlisen = "127.0.0.1:8080"', "unknown key web.lisen (did you mean web.listen?)"),
        ("[web]\nmax_conections = 4", "unknown key web.max_conections (did you mean web.max_connections?)"),
        ("[control]\nidle_timeout = 5", "unknown key control.idle_timeout (did you mean web.idle_timeout?)"),
        ("web = 5", "web must be a table ([web]), not the integer 5"),
        ('[[web]]\nlisten = "127.0.0.1:8080"', "web must be a table ([web]), not an array of tables ([[web]])"),
        (
            f'[control]\ntcp = "127.0.0.1:7070"\ntoken = "{TOKEN}"\n[web]\nlisten = "127.0.0.1:7070"',
            "web.listen is control.tcp's address too (127.0.0.1:7070): give one of them another port",
        ),
    ],
)
def test_web_mistakes_are_one_line(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in one_problem(write(tmp_path, text + "\n"))


def test_every_web_mistake_is_reported_at_once(tmp_path: Path) -> None:
    text = '[web]\nlisten = "0.0.0.0:80"\nmax_connections = -1\nidle_timeout = 1000\nlisen = 1\n'
    problems = problems_of(write(tmp_path, text))
    assert len(problems) == 4, problems
    assert [p.split(": ", 1)[1].split(" ")[0] for p in problems] == [
        "web.max_connections",
        "web.idle_timeout",
        "web.listen",
        "unknown",
    ]


@pytest.mark.parametrize("listen", ["0.0.0.0:8080", "192.168.1.10:8080", "[::]:8080"])
def test_web_beyond_loopback_with_a_token_is_a_warning(tmp_path: Path, listen: str) -> None:
    config = load_config(write(tmp_path, f'[web]\nlisten = "{listen}"\ntoken = "{TOKEN}"\n'))
    assert config.web.listen is not None and config.web.token == TOKEN
    assert config.warnings == (
        f"{tmp_path / 'autonat.toml'}: web.listen {listen} is not loopback: anyone who can reach it may try the token",
    )


def test_a_web_token_without_a_listener_or_readable_by_all_is_a_warning(tmp_path: Path) -> None:
    path = write(tmp_path, f'[web]\ntoken = "{TOKEN}"\n')
    assert load_config(path).warnings == (f"{path}: web.token is set but web.listen is not: the token is not used",)
    path = write(tmp_path, f'[web]\nlisten = "127.0.0.1:8080"\ntoken = "{TOKEN}"\n', "readable.toml")
    path.chmod(0o644)
    assert load_config(path).warnings == (f"{path}: the file holds web.token but any user can read it (chmod o-r)",)


def test_log_trace_names_the_wire_trace_s_protocols(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, '[log]\ntrace = ["SIP", " pcp"]\n')).log_trace == ("pcp", "sip")
    assert load_config(write(tmp_path, '[log]\ntrace = "all"\n')).log_trace == ("natpmp", "pcp", "sip", "stun", "upnp")
    assert load_config(write(tmp_path, "[log]\ntrace = []\n")).log_trace == ()
    assert load_config(None).log_trace == ()


def test_doctor_s_test_call_is_configured_and_checked(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[doctor]\ncall = "sip:9196@203.0.113.100"\ncall-seconds = 5\n'))
    assert (config.doctor.call, config.doctor.call_profile, config.doctor.call_seconds) == (
        "sip:9196@203.0.113.100",
        None,
        5.0,
    )
    assert load_config(None).doctor.call is None
    with pytest.raises(ConfigError) as raised:
        load_config(write(tmp_path, '[doctor]\ncall = "sip:9196@echo.example.org"\n'))
    assert "doctor.call is not usable: the URI's host must be an IP address" in str(raised.value)
