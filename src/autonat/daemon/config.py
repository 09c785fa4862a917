"""The daemon's configuration: one TOML file, checked in full before anything starts.

A config file is untrusted input (edited by hand, copied from a forum, or simply the wrong file). It is
size-capped before parsing, every key is checked against the schema (a misspelling gets a suggestion),
and every mistake becomes one line `FILE: what is wrong`. All the mistakes of a file are reported at
once, so fixing a config takes one edit rather than one restart per typo. Nothing is silently ignored:
a value that can have no effect (a token without a TCP listener, mappings with NAT disabled) is kept in
`Config.warnings` for the daemon to log.

`load_config(None)` gives the defaults: NAT discovery on, no static mappings, control on a Unix socket.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time
from pathlib import Path
from typing import Final, Literal, TypeVar
from urllib.parse import urlsplit

from autonat.acl import AclError, AclList, AclSet, parse_acl_conf_xml
from autonat.addresses import IPAddress, parse_address
from autonat.advertise import Addressing, ExtKind, ExtValue, parse_ext_value
from autonat.engine.settings import (
    DEFAULT_MAX_LEASE,
    DEFAULT_UPNP_LEASE,
    NatSettings,
    PinholeProtocolName,
    ProtocolName,
)
from autonat.errors import AutonatError
from autonat.mapper import DEFAULT_LIFETIME, MAX_LIFETIME
from autonat.proto.exchange import DEFAULT_DEADLINE
from autonat.proto.types import Transport
from autonat.service.settings import (
    Action,
    Extension,
    GatewaySettings,
    ProfileSettings,
    ProfileSip,
    SipSettings,
    compile_pattern,
)
from autonat.state import state_dir
from autonat.web.settings import WebConfig

LogLevel = Literal["debug", "info", "warning", "error"]

MAX_CONFIG_SIZE: Final = 64 * 1024
BUILTIN_ACL_NAMES: Final = frozenset(AclSet().names)
MIN_LEASE: Final = 120  # below this the refresh traffic is a load on the router, not a safety margin
MAX_INTERVAL: Final = 3600
MAX_MAPPINGS: Final = 256  # each one is a request to a home router; more is a generated file gone wrong
MAX_PROBLEMS: Final = 100  # a binary fed as config would otherwise print thousands of lines
MIN_TOKEN_LENGTH: Final = 16
MAX_TEXT_LENGTH: Final = 1024
MAX_OWNER_LENGTH: Final = 64
MAX_SOCKET_PATH: Final = 107  # sun_path is 108 bytes on Linux, one of them the terminating NUL
MAX_INTERFACE_NAME: Final = 15  # IFNAMSIZ - 1
MAX_WEB_CONNECTIONS: Final = 1024  # each is a descriptor: far below the usual 1024 soft limit with the rest

_PROTOCOLS: Final[dict[str, ProtocolName]] = {"auto": "auto", "pcp": "pcp", "natpmp": "natpmp", "upnp": "upnp"}
# IPv6 pinholes: NAT-PMP is IPv4 only (RFC 6886 §1).
_PINHOLE_PROTOCOLS: Final[dict[str, PinholeProtocolName]] = {"auto": "auto", "pcp": "pcp", "upnp": "upnp"}
_LOG_LEVELS: Final[dict[str, LogLevel]] = {"debug": "debug", "info": "info", "warning": "warning", "error": "error"}
LogFormat = Literal["text", "json"]
_LOG_FORMATS: Final[dict[str, LogFormat]] = {"text": "text", "json": "json"}
DEFAULT_CONFIG = Path("/etc/autonat/autonat.toml")
_TRANSPORTS: Final[dict[str, tuple[Transport, ...]]] = {
    "udp": (Transport.UDP,),
    "tcp": (Transport.TCP,),
    "both": (Transport.UDP, Transport.TCP),
}
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TOML_POSITION = re.compile(r"(?P<message>.*) \(at line (?P<line>\d+), column (?P<column>\d+)\)", re.DOTALL)

T = TypeVar("T")


class ConfigError(AutonatError):
    """A config file that cannot be used: one line per mistake, all of a file's mistakes together."""

    exit_code = 2

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# The [nat] table is the engine's own settings: one dataclass, validated here, used there.
NatConfig = NatSettings


@dataclass(frozen=True, slots=True)
class StaticMapping:
    """A mapping the daemon makes at start and keeps; `external_port` 0 asks for the same port (or any)."""

    port: int
    transport: Transport
    external_port: int = 0
    sticky: bool = False
    owner: str = "config"


@dataclass(frozen=True, slots=True)
class ControlConfig:
    """Where the control interface listens. `tcp` is (IP literal, port) and always comes with a token."""

    socket: Path
    tcp: tuple[str, int] | None = None
    token: str | None = field(default=None, repr=False)  # a secret: kept out of logged reprs


@dataclass(frozen=True, slots=True)
class DoctorConfig:
    """`[doctor]`: what `autonat doctor` does besides looking at the router. With `call` (an echo such as
    `sip:9196@IP`, e.g. a second autonat or FreeSWITCH's echo), doctor asks the running daemon for a
    test call there (`autonat call`) and reports whether audio came back through the NAT."""

    call: str | None = None
    call_profile: str | None = None  # None: the daemon's first SIP profile
    call_seconds: float = 3.0


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the daemon needs to start; `source` is the file it came from (None: defaults)."""

    nat: NatConfig
    mappings: tuple[StaticMapping, ...]
    control: ControlConfig
    journal_path: Path
    log_level: LogLevel
    source: Path | None
    warnings: tuple[str, ...] = ()
    acls: tuple[AclList, ...] = ()
    profiles: tuple[ProfileSettings, ...] = ()
    sip: SipSettings = field(default_factory=SipSettings)
    log_format: LogFormat = "text"
    log_trace: tuple[str, ...] = ()  # [log] trace: protocols whose exchanges are logged (autonat.aio.trace)
    web: WebConfig = field(default_factory=WebConfig)
    doctor: DoctorConfig = field(default_factory=DoctorConfig)

    def with_overrides(
        self,
        nonat: bool = False,
        nonatmap: bool = False,
        log_level: LogLevel | None = None,
        log_format: LogFormat | None = None,
    ) -> Config:
        """Apply the command line: --nonat / --nonatmap (which only ever switch things off), --log-level and
        --log-format (which win over the file's [log])."""
        nat = replace(self.nat, enabled=self.nat.enabled and not nonat, mapping=self.nat.mapping and not nonatmap)
        return replace(self, nat=nat, log_level=log_level or self.log_level, log_format=log_format or self.log_format)


def default_socket_path() -> Path:
    """/run/autonat/control.sock for root, else $XDG_RUNTIME_DIR/autonat/control.sock, else in state_dir()."""
    if os.geteuid() == 0:
        return Path("/run/autonat/control.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    # The XDG spec says a relative $XDG_RUNTIME_DIR is invalid and must be ignored.
    if runtime and Path(runtime).is_absolute():
        return Path(runtime) / "autonat" / "control.sock"
    return state_dir() / "control.sock"


def default_journal_path() -> Path:
    """state_dir()/journal.sqlite."""
    return state_dir() / "journal.sqlite"


def default_config_path() -> Path | None:
    """/etc/autonat/autonat.toml when it exists (what `autonat run` reads without --config), else None."""
    return DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None


def load_config(path: Path | None) -> Config:
    """Read and check a config file (None: the defaults); raise ConfigError listing every mistake."""
    if path is None:
        return _build({}, _Report("defaults"), None, file_mode=None)
    where = _clean(str(path))
    data, file_mode = _read(path, where)
    return _build(_parse(data, where), _Report(where), path, file_mode=file_mode)


# --- reading and parsing ---------------------------------------------------------------------------


def _read(path: Path, where: str) -> tuple[bytes, int]:
    """The file's bytes (at most one past the cap) and its mode bits."""
    try:
        # O_NONBLOCK: opening a FIFO named as the config must fail below, not hang the daemon's start.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError) as exc:
        raise ConfigError([f"{where}: cannot open: {_os_reason(exc)}"]) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError([f"{where}: not a regular file"])
        chunks: list[bytes] = []
        size = 0
        # Read up to one byte past the cap whatever fstat said: the file may grow while we read it.
        while size <= MAX_CONFIG_SIZE:
            chunk = os.read(fd, MAX_CONFIG_SIZE + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise ConfigError([f"{where}: cannot read: {_os_reason(exc)}"]) from None
    finally:
        os.close(fd)
    return b"".join(chunks), info.st_mode


def _parse(data: bytes, where: str) -> dict[str, object]:
    if len(data) > MAX_CONFIG_SIZE:
        raise ConfigError([f"{where}: larger than {MAX_CONFIG_SIZE // 1024} KiB, which no autonat config needs"])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError([f"{where}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x})"]) from None
    # Editors on Windows add a byte order mark that TOML does not allow; it carries no meaning.
    text = text.removeprefix("\ufeff")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_syntax_problem(where, exc)]) from None
    except ValueError as exc:
        # tomllib lets int() refuse a decimal literal of more than 4300 digits with a bare ValueError.
        raise ConfigError([f"{where}: invalid TOML: {_clean(str(exc), 200)}"]) from None
    except RecursionError:
        raise ConfigError([f"{where}: invalid TOML: arrays or inline tables nested too deeply"]) from None


def _syntax_problem(where: str, exc: tomllib.TOMLDecodeError) -> str:
    line = getattr(exc, "lineno", None)  # Python 3.14+ carries the position as attributes
    if isinstance(line, int):
        return f"{where}:{line}:{getattr(exc, 'colno', 0)}: invalid TOML: {_clean(str(getattr(exc, 'msg', exc)))}"
    text = str(exc)
    match = _TOML_POSITION.fullmatch(text)
    if match is None:
        return f"{where}: invalid TOML: {_clean(text.replace(' (at end of document)', ' at the end of the file'))}"
    return f"{where}:{match['line']}:{match['column']}: invalid TOML: {_clean(match['message'])}"


def _os_reason(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return _clean(str(exc))


# --- collecting problems ---------------------------------------------------------------------------


class _Missing:
    """The value of a key absent from its table: a type of its own, so mypy narrows it away."""


_MISSING: Final = _Missing()


class _Report:
    """Every mistake and warning of one file, each one line prefixed with the file's name."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.tables: list[_Table] = []
        self.unknown: list[tuple[_Table, str]] = []

    def error(self, text: str) -> None:
        self.errors.append(f"{self.where}: {text}")

    def warn(self, text: str) -> None:
        self.warnings.append(f"{self.where}: {text}")

    def raise_if_any(self) -> None:
        for table, key in self.unknown:
            self.error(f"unknown key {table.name(_show_key(key))}{self._suggestion(table, key)}")
        if not self.errors:
            return
        problems = self.errors
        if len(problems) > MAX_PROBLEMS:
            more = len(problems) - MAX_PROBLEMS + 1
            problems = [*problems[: MAX_PROBLEMS - 1], f"{self.where}: ... and {more} more mistakes"]
        raise ConfigError(problems)

    def _suggestion(self, table: _Table, key: str) -> str:
        close = table.closest(key)
        if close:
            return f" (did you mean {table.name(close)}?)"
        if not (table.is_section or table.prefix == ""):
            return ""
        # The right key in the wrong section: `[nat] socket = ...` meant `[control] socket`.
        for other in self.tables:
            if other is not table and other.is_section and key in other.known:
                return f" (did you mean {other.name(key)}?)"
        return ""


class _Table:
    """One TOML table being checked: typed getters that report mistakes and fall back to defaults.

    Every getter registers its key as known, so the keys left over at `finish()` are the unknown ones.
    """

    def __init__(self, report: _Report, data: Mapping[str, object], prefix: str, *, is_section: bool) -> None:
        self.report = report
        self.data = data
        self.prefix = prefix
        self.is_section = is_section
        self.known: list[str] = []
        report.tables.append(self)

    def name(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def has(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str) -> object:
        self.known.append(key)
        return self.data.get(key, _MISSING)

    def unknown(self) -> list[str]:
        return [key for key in self.data if key not in self.known]

    def misspelled(self) -> set[str]:
        """The known keys that this table's unknown keys are close to (what was meant instead)."""
        return {close for key in self.unknown() if (close := self.closest(key))}

    def closest(self, key: str) -> str | None:
        if len(key) > 64:
            return None
        close = difflib.get_close_matches(key.lower(), self.known, n=1, cutoff=0.6)
        return close[0] if close else None

    def finish(self) -> None:
        self.report.unknown.extend((self, key) for key in self.unknown())

    def error(self, key: str, text: str) -> None:
        self.report.error(f"{self.name(key)} {text}")

    def wrong_type(self, key: str, expected: str, value: object) -> None:
        self.error(key, f"must be {expected}, not {_describe(value)}")

    def flag(self, key: str, default: bool) -> bool:
        value = self.get(key)
        if isinstance(value, _Missing):
            return default
        if not isinstance(value, bool):
            self.wrong_type(key, "true or false", value)
            return default
        return value

    def integer(self, key: str, default: int, low: int, high: int, unit: str = "") -> int:
        value = self.get(key)
        if isinstance(value, _Missing):
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.wrong_type(key, "an integer", value)
            return default
        if not low <= value <= high:
            self.error(key, f"must be {low}..{high}{unit}, not {_show_int(value)}{_zero_hint(key, value)}")
            return default
        return value

    def number(self, key: str, default: float, low: float, high: float, unit: str = "") -> float:
        value = self.get(key)
        if isinstance(value, _Missing):
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.wrong_type(key, "a number", value)
            return default
        # Compared before float(): a huge TOML integer would overflow the conversion. `not` so NaN fails.
        if not low <= value <= high:
            shown = _show_int(value) if isinstance(value, int) else repr(value)
            self.error(key, f"must be {low:g}..{high:g}{unit}, not {shown}")
            return default
        return float(value)

    def text(self, key: str, default: str, *, max_length: int = MAX_TEXT_LENGTH) -> str:
        value = self.get(key)
        if isinstance(value, _Missing):
            return default
        if not isinstance(value, str):
            self.wrong_type(key, "a string", value)
            return default
        if len(value) > max_length:
            self.error(key, f"must be at most {max_length} characters, not {len(value)}")
            return default
        if not value.isprintable():
            self.error(key, f"must be printable text, not {_quote(value)}")
            return default
        return value

    def choice(self, key: str, options: Mapping[str, T], default: T) -> T:
        """One of `options`' keys, any case (routers and people write UDP and udp alike)."""
        mistakes = len(self.report.errors)
        text = self.text(key, "")
        if not self.has(key) or len(self.report.errors) != mistakes:
            return default
        wanted = text.strip().lower()
        if wanted in options:
            return options[wanted]
        close = difflib.get_close_matches(wanted, list(options), n=1, cutoff=0.6) if len(wanted) < 64 else []
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        self.error(key, f"must be one of {', '.join(options)}, not {_quote(text)}{hint}")
        return default


# --- building the config ---------------------------------------------------------------------------


def _build(document: Mapping[str, object], report: _Report, source: Path | None, *, file_mode: int | None) -> Config:
    top = _Table(report, document, "", is_section=False)
    nat = _nat(_section(top, "nat"))
    mappings = _mappings(top, report)
    control = _control(_section(top, "control"), report, file_mode)
    journal = _journal(_section(top, "journal"))
    log = _section(top, "log")
    level = log.choice("level", _LOG_LEVELS, "info")
    log_format = log.choice("format", _LOG_FORMATS, "text")
    log_trace = _trace_protocols(log)
    log.finish()
    acls = _acls(top, report)
    profiles = _profiles(top, report, {*BUILTIN_ACL_NAMES, *(acl.name for acl in acls)})
    sip = _sip(_section(top, "sip"), top, report)
    web = _web(_section(top, "web"), report, file_mode, control)
    doctor = _doctor(_section(top, "doctor"))
    top.finish()
    report.raise_if_any()

    if mappings and not nat.enabled:
        report.warn(f"nat.enabled = false: the {len(mappings)} [[mapping]] entries are not made")
    elif mappings and not nat.mapping:
        report.warn(f"nat.mapping = false: the {len(mappings)} [[mapping]] entries are not made")
    return Config(
        nat,
        mappings,
        control,
        journal,
        level,
        source,
        tuple(report.warnings),
        acls,
        profiles,
        sip,
        log_format,
        log_trace,
        web,
        doctor,
    )


def _trace_protocols(section: _Table) -> tuple[str, ...]:
    """`[log] trace = ["sip", "pcp"]` (or "all"): the wire trace's protocols, checked by the trace itself."""
    value = section.get("trace")
    if isinstance(value, _Missing):
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or len(value) > 16 or not all(isinstance(item, str) for item in value):
        section.wrong_type("trace", 'a list of protocol names (e.g. ["sip", "pcp"])', value)
        return ()
    from autonat.aio.trace import parse  # here, not at the top: `autonat reload` and `--check` stay light

    try:
        return tuple(sorted(parse(value)))
    except ValueError as exc:
        section.error("trace", f"is not usable: {exc}")
        return ()


def _section(top: _Table, key: str) -> _Table:
    """The table `[key]`, or an empty one (with the mistake reported) when it is something else."""
    value = top.get(key)
    if isinstance(value, dict):
        return _Table(top.report, value, key, is_section=True)
    if not isinstance(value, _Missing):
        if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            top.error(key, f"must be a table ([{key}]), not an array of tables ([[{key}]])")
        else:
            top.wrong_type(key, f"a table ([{key}])", value)
    return _Table(top.report, {}, key, is_section=True)


def _nat(table: _Table) -> NatConfig:
    seconds = " seconds"
    lease = table.integer("lease", DEFAULT_LIFETIME, MIN_LEASE, MAX_LIFETIME, seconds)
    config = NatConfig(
        enabled=table.flag("enabled", True),
        mapping=table.flag("mapping", True),
        protocol=table.choice("protocol", _PROTOCOLS, "auto"),
        gateway=_gateway(table),
        interface=_interface(table),
        root_url=_root_url(table),
        lease=lease,
        upnp_lease=table.integer("upnp_lease", DEFAULT_UPNP_LEASE, MIN_LEASE, MAX_LIFETIME, seconds),
        verify_interval=table.integer("verify_interval", 60, 1, MAX_INTERVAL, seconds),
        external_ip_interval=table.integer("external_ip_interval", 60, 1, MAX_INTERVAL, seconds),
        timeout=table.number("timeout", DEFAULT_DEADLINE, 0.05, 60, seconds),
        shutdown_timeout=table.number("shutdown_timeout", 2.0, 0.1, 60, seconds),
        stun=_stun(table),
        map_rate=table.number("map_rate", 10.0, 0, 1000, " new mappings a second (0: no limit)"),
        max_lease=table.integer("max_lease", max(DEFAULT_MAX_LEASE, lease), MIN_LEASE, MAX_LIFETIME, seconds),
        ipv6=table.flag("ipv6", False),
        ipv6_protocol=table.choice("ipv6-protocol", _PINHOLE_PROTOCOLS, "auto"),
        ipv6_gateway=_ipv6_gateway(table),
        ipv6_address=_ipv6_address(table),
    )
    if config.max_lease < config.lease:
        table.error("max_lease", f"must be at least lease ({config.lease}): a lease we ask for is never too long")
    table.finish()
    return config


def _stun(table: _Table) -> str | None:
    text = table.text("stun", "").strip()
    if not text:
        return None
    try:
        value = parse_ext_value(text)
    except ValueError:
        value = None
    if value is None or value.kind is not ExtKind.STUN:
        table.error("stun", f"must be stun:host[:port], not {_quote(text)}")
        return None
    return str(value)


def _gateway(table: _Table) -> str | None:
    text = table.text("gateway", "")
    if not text:
        return None
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        # An IP literal only: resolving a name for the router would trust whatever DNS says.
        table.error("gateway", f"must be an IP address (or empty for the default route), not {_quote(text)}")
        return None


def _ipv6_literal(table: _Table, key: str, what: str) -> ipaddress.IPv6Address | None:
    text = table.text(key, "").strip()
    if not text:
        return None
    try:
        return ipaddress.IPv6Address(text)
    except ValueError:
        # IP literals only, as `gateway`: a name would trust whatever DNS says.
        table.error(key, f"must be {what}, not {_quote(text)}")
        return None


def _ipv6_gateway(table: _Table) -> str | None:
    """The IPv6 router for pinholes; a link-local one (the usual IPv6 default router) names its
    interface as its zone, fe80::1%eth0, since fe80::1 exists on every link."""
    address = _ipv6_literal(table, "ipv6-gateway", "an IPv6 address (or empty for the IPv6 default route)")
    if address is None:
        return None
    if address.is_multicast or address.is_unspecified or address.ipv4_mapped is not None:
        table.error("ipv6-gateway", f"must be a unicast IPv6 router address, not {_quote(str(address))}")
        return None
    if address.is_link_local and not address.scope_id:
        table.error("ipv6-gateway", f"is link-local: name its interface, e.g. {address}%eth0")
        return None
    return str(address)


def _ipv6_address(table: _Table) -> str | None:
    """Which of the host's IPv6 addresses the pinholes are for (and asked from); empty: the stable one."""
    address = _ipv6_literal(table, "ipv6-address", "one of this host's global IPv6 addresses (or empty)")
    if address is None:
        return None
    if address.is_link_local or address.is_multicast or address.is_unspecified or address.is_loopback:
        table.error("ipv6-address", f"must be a global IPv6 address of this host, not {_quote(str(address))}")
        return None
    return str(address)


def _interface(table: _Table) -> str | None:
    text = table.text("interface", "")
    if not text:
        return None
    # What the Linux kernel accepts as a device name (dev_valid_name).
    if len(text) > MAX_INTERFACE_NAME or text in {".", ".."} or any(c in text for c in "/: \t"):
        table.error("interface", f"must be a network interface name such as eth0, not {_quote(text)}")
        return None
    return text


def _root_url(table: _Table) -> str | None:
    text = table.text("root_url", "")
    if not text:
        return None
    problem = _url_problem(text)
    if problem:
        table.error("root_url", f"{problem}, not {_quote(text)}")
        return None
    return text


def _url_problem(text: str) -> str | None:
    """Why `text` cannot be an IGD root description URL (the same rules the UPnP client applies)."""
    if not text.isascii() or " " in text or "\\" in text:
        return "must be a URL without spaces, backslashes or non-ASCII characters"
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 (parsing the port is the check)
    except ValueError:
        return "must be a valid URL"
    if parts.scheme.lower() != "http":
        return "must be an http:// URL (UPnP descriptions are served over plain HTTP)"
    if not parts.hostname:
        return "must name the router's host"
    if "@" in parts.netloc:
        return "must not carry a user name or password"
    return None


def _mappings(top: _Table, report: _Report) -> tuple[StaticMapping, ...]:
    value = top.get("mapping")
    if isinstance(value, _Missing):
        return ()
    if isinstance(value, dict):
        top.error("mapping", "must be an array of tables ([[mapping]], one per mapping), not a single [mapping] table")
        return ()
    if not isinstance(value, list):
        top.wrong_type("mapping", "an array of tables ([[mapping]])", value)
        return ()
    if len(value) > MAX_MAPPINGS:
        top.error("mapping", f"has {len(value)} entries; at most {MAX_MAPPINGS} are allowed")
        return ()
    result: list[StaticMapping] = []
    by_port: dict[tuple[Transport, int], int] = {}
    by_external: dict[tuple[Transport, int], int] = {}
    # Numbered from 1 like the [[mapping]] blocks a person counts in the file.
    for number, item in enumerate(value, start=1):
        name = f"mapping[{number}]"
        if not isinstance(item, dict):
            top.report.error(f"{name} must be a table, not {_describe(item)}")
            continue
        for mapping in _mapping(_Table(report, item, name, is_section=False)):
            key = (mapping.transport, mapping.port)
            if key in by_port:
                report.error(f"{name} ({mapping.transport} port {mapping.port}) duplicates mapping[{by_port[key]}]")
                continue
            by_port[key] = number
            if mapping.external_port:
                outside = (mapping.transport, mapping.external_port)
                if outside in by_external:
                    report.error(
                        f"{name} ({mapping.transport} external_port {mapping.external_port})"
                        f" collides with mapping[{by_external[outside]}]"
                    )
                    continue
                by_external[outside] = number
            result.append(mapping)
    return tuple(result)


def _mapping(table: _Table) -> list[StaticMapping]:
    """One [[mapping]] block: two StaticMapping for transport "both", none if the block has mistakes."""
    mistakes = len(table.report.errors)
    port = table.integer("port", 0, 1, 65535)
    transports = table.choice("transport", _TRANSPORTS, ())
    external_port = table.integer("external_port", 0, 0, 65535, " (0: same as port)")
    sticky = table.flag("sticky", False)
    owner = table.text("owner", "config", max_length=MAX_OWNER_LENGTH)
    if table.has("owner") and not owner:
        table.error("owner", f"must be 1..{MAX_OWNER_LENGTH} printable characters, not empty")
    for required in ("port", "transport"):
        # A misspelled `prot = 5060` is one mistake, reported once as an unknown key with its suggestion.
        if not table.has(required) and required not in table.misspelled():
            table.error(required, "is required")
    table.finish()
    if len(table.report.errors) != mistakes:
        return []
    return [StaticMapping(port, transport, external_port, sticky, owner) for transport in transports]


def _control(table: _Table, report: _Report, file_mode: int | None) -> ControlConfig:
    socket = _socket(table, report)
    tcp = _tcp(table, report)
    # Asked for, even if its value has a mistake of its own: the missing token is a second one.
    tcp_wanted = table.data.get("tcp", "") != ""
    token = table.text("token", "") or None
    table.finish()
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        table.error("token", f"must be at least {MIN_TOKEN_LENGTH} characters, not {len(token)}")
        return ControlConfig(socket, None, None)
    if tcp_wanted and table.data.get("token", "") == "":
        table.error("tcp", f"needs control.token (at least {MIN_TOKEN_LENGTH} characters) to guard it")
        return ControlConfig(socket, None, None)
    if token is not None and not tcp_wanted:
        report.warn("control.token is set but control.tcp is not: the token is not used")
    if token is not None and file_mode is not None and file_mode & stat.S_IROTH:
        report.warn("the file holds control.token but any user can read it (chmod o-r)")
    return ControlConfig(socket, tcp, token)


def _socket(table: _Table, report: _Report) -> Path:
    text = table.text("socket", "")
    if not text:
        path = default_socket_path()
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            report.warn(f"the default control socket {_clean(str(path))} is too long to bind; set control.socket")
        return path
    path = Path(text)
    if not path.is_absolute():
        table.error("socket", f"must be an absolute path, not {_quote(text)}")
    elif len(os.fsencode(path)) > MAX_SOCKET_PATH:
        table.error("socket", f"must be at most {MAX_SOCKET_PATH} bytes long (a Unix socket path limit)")
    return path


def _tcp(table: _Table, report: _Report) -> tuple[str, int] | None:
    text = table.text("tcp", "")
    if not text:
        return None
    parsed = _host_port(text)
    if isinstance(parsed, str):
        table.error("tcp", f"{parsed}, not {_quote(text)}")
        return None
    host, port = parsed
    if not parse_address(host).is_loopback:
        report.warn(
            f"control.tcp listens on {text.strip()}, which is not loopback: anyone who can reach it may try the token"
        )
    return host, port


def _doctor(table: _Table) -> DoctorConfig:
    """`[doctor] call = "sip:9196@IP"`, `call-profile`, `call-seconds`: the test call doctor places."""
    call = table.text("call", "").strip() or None
    profile = table.text("call-profile", "").strip() or None
    seconds = table.number("call-seconds", 3.0, 1.0, 60.0, " s")
    table.finish()
    if call is not None:
        from autonat.sip.probecall import parse_target  # here: `autonat reload` and `--check` stay light

        try:
            parse_target(call)
        except ValueError as exc:
            table.error("call", f"is not usable: {exc}")
            call = None
    return DoctorConfig(call, profile, seconds)


def _web(table: _Table, report: _Report, file_mode: int | None, control: ControlConfig) -> WebConfig:
    """The [web] table: where the status page listens, its token and its caps."""
    defaults = WebConfig()
    listen_text = table.text("listen", "").strip()
    token = table.text("token", "") or None
    max_connections = table.integer("max_connections", defaults.max_connections, 1, MAX_WEB_CONNECTIONS)
    max_request = table.integer("max_request_size", defaults.max_request_size, 1024, 65536, " bytes")
    idle_timeout = table.number("idle_timeout", defaults.idle_timeout, 1, 300, " seconds")
    table.finish()
    listen: tuple[str, int] | None = None
    if listen_text:
        parsed = _host_port(listen_text)
        if isinstance(parsed, str):
            table.error("listen", f"{parsed}, not {_quote(listen_text)}")
        else:
            listen = parsed
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        table.error("token", f"must be at least {MIN_TOKEN_LENGTH} characters, not {len(token)}")
        token = None
    elif listen is not None and not parse_address(listen[0]).is_loopback:
        if token is None:
            # What the page shows (addresses, callers, registrations) is not for everyone on the LAN.
            table.error(
                "listen",
                f"is not loopback ({listen_text}): set web.token (at least {MIN_TOKEN_LENGTH} characters),"
                " which every request must then carry",
            )
        else:
            report.warn(f"web.listen {listen_text} is not loopback: anyone who can reach it may try the token")
    if listen is not None and listen == control.tcp:
        table.error("listen", f"is control.tcp's address too ({listen_text}): give one of them another port")
    if token is not None and not listen_text:
        report.warn("web.token is set but web.listen is not: the token is not used")
    if token is not None and file_mode is not None and file_mode & stat.S_IROTH:
        report.warn("the file holds web.token but any user can read it (chmod o-r)")
    return WebConfig(listen, token, max_connections, max_request, idle_timeout)


def _host_port(text: str) -> tuple[str, int] | str:
    """("IP", port) from "IP:PORT" or "[IPv6]:PORT", or why not."""
    text = text.strip()
    if text.startswith("["):
        host, bracket, port_text = text[1:].partition("]:")
        if not bracket:
            return "must be HOST:PORT with the IPv6 address in brackets, as [::1]:7070"
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            return "must be HOST:PORT, as 127.0.0.1:7070"
        if ":" in host:
            return "must put an IPv6 address in brackets, as [::1]:7070"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return "must have an IP address as its host (no host names)"
    if not (port_text.isascii() and port_text.isdigit() and 1 <= int(port_text) <= 65535):
        return "must have a port 1..65535"
    return str(address), int(port_text)


def _journal(table: _Table) -> Path:
    text = table.text("path", "")
    table.finish()
    if not text:
        return default_journal_path()
    path = Path(text)
    if not path.is_absolute():
        table.error("path", f"must be an absolute path, not {_quote(text)}")
    return path


# --- showing untrusted text on one line -------------------------------------------------------------


def _describe(value: object) -> str:
    """A TOML value as a user wrote it, for "must be X, not <this>"."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"the integer {_show_int(value)}"
    if isinstance(value, float):
        return f"the float {value!r}"
    if isinstance(value, str):
        return f"the string {_quote(value)}"
    if isinstance(value, datetime | date | time):
        return f"the date-time {value.isoformat()}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def _show_int(value: int) -> str:
    # A hexadecimal literal filling the file is an int too big for str() (the 4300-digit limit).
    return str(value) if value.bit_length() < 64 else f"an integer of {value.bit_length()} bits"


def _zero_hint(key: str, value: int) -> str:
    if value == 0 and key in {"lease", "upnp_lease"}:
        return " (0 would ask for a permanent mapping; autonat only makes leases that expire)"
    return ""


def _show_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _quote(key)


def _quote(text: str, limit: int = 60) -> str:
    """`text` in double quotes, clipped, with anything that could break or fake a line escaped."""
    body = "".join(_escape(c) for c in text[:limit])
    return f'"{body}"' + ("..." if len(text) > limit else "")


def _clean(text: str, limit: int = 300) -> str:
    """Text from outside (a path, a parser message) made safe to print as part of one line."""
    body = "".join(c if c.isprintable() else _escape(c) for c in text[:limit])
    return body + ("..." if len(text) > limit else "")


def _escape(char: str) -> str:
    if char in '"\\':
        return "\\" + char
    if char.isprintable():
        return char
    return char.encode("unicode_escape").decode("ascii")


# --- ACL lists and SIP profiles ------------------------------------------------------------------------


def _array_of_tables(top: _Table, key: str) -> list[tuple[str, _Table]]:
    value = top.get(key)
    if isinstance(value, _Missing):
        return []
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        top.wrong_type(key, f"an array of tables ([[{key}]])", value)
        return []
    return [
        (top.name(f"{key}[{n}]"), _Table(top.report, item, top.name(f"{key}[{n}]"), is_section=False))
        for n, item in enumerate(value, 1)
    ]


def _acls(top: _Table, report: _Report) -> tuple[AclList, ...]:
    """[[acl]] lists, plus the lists of a FreeSWITCH acl.conf.xml named by [freeswitch] acl_conf."""
    lists: list[AclList] = []
    for name, table in _array_of_tables(top, "acl"):
        list_name = table.text("name", "")
        default = table.text("default", "deny")
        raw_nodes = table.get("nodes")
        table.finish()
        nodes: list[tuple[str, str]] = []
        if isinstance(raw_nodes, list):
            for item in raw_nodes:
                if isinstance(item, list) and len(item) == 2 and all(isinstance(part, str) for part in item):
                    nodes.append((item[0], item[1]))
                elif isinstance(item, dict) and isinstance(item.get("type"), str) and isinstance(item.get("cidr"), str):
                    nodes.append((item["type"], item["cidr"]))
                else:
                    report.error(f'{name}.nodes entries are ["allow"|"deny", "CIDR"] or {{type, cidr}}')
                    break
        elif not isinstance(raw_nodes, _Missing):
            table.wrong_type("nodes", "an array", raw_nodes)
        if not list_name:
            table.error("name", "is required")
            continue
        try:
            lists.append(AclList.from_config(list_name, default, nodes))
        except AclError as exc:
            report.error(f"{name}: {exc}")
    freeswitch = _section(top, "freeswitch")
    acl_conf = freeswitch.text("acl_conf", "")
    freeswitch.finish()
    if acl_conf:
        try:
            data = Path(acl_conf).read_bytes()[: MAX_CONFIG_SIZE * 4 + 1]
            notes: list[str] = []
            lists.extend(parse_acl_conf_xml(data, notes))
            for note in notes:
                report.warn(f"freeswitch.acl_conf: {note}")
        except OSError as exc:
            freeswitch.error("acl_conf", f"cannot be read: {_os_reason(exc)}")
        except AclError as exc:
            freeswitch.error("acl_conf", str(exc))
    seen: set[str] = set()
    for acl in lists:
        if acl.name.endswith(".auto"):
            report.error(f"ACL list {_quote(acl.name)}: names ending in .auto belong to the built-in lists")
        elif acl.name in seen:
            report.error(f"ACL list {_quote(acl.name)} is defined twice")
        seen.add(acl.name)
    return tuple(lists)


def _profiles(top: _Table, report: _Report, acl_names: set[str]) -> tuple[ProfileSettings, ...]:
    profiles: list[ProfileSettings] = []
    names: set[str] = set()
    for _, table in _array_of_tables(top, "profile"):
        mistakes = len(report.errors)
        name = table.text("name", "")
        sip_ip = _optional_ip(table, "sip-ip")
        rtp_ip = _optional_ip(table, "rtp-ip")
        sip_port = table.integer("sip-port", 5060, 1, 65535)
        tls_port = table.integer("tls-sip-port", 0, 0, 65535, " (0: no TLS)")
        ext_sip = _ext(table, "ext-sip-ip")
        ext_rtp = _ext(table, "ext-rtp-ip")
        acl = table.text("local-network-acl", "localnet.auto").strip()
        service = _sip_profile(table, report)
        table.finish()
        if not name:
            table.error("name", "is required")
        elif name in names:
            table.error("name", f"{_quote(name)} is used by another profile")
        names.add(name)
        if acl.lower() != "none" and acl not in acl_names:
            close = difflib.get_close_matches(acl, sorted(acl_names), n=1, cutoff=0.6)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            table.error("local-network-acl", f"names an unknown ACL list {_quote(acl)}{hint}")
        if len(report.errors) == mistakes:
            addressing = Addressing(
                sip_ip=sip_ip,
                rtp_ip=rtp_ip,
                sip_port=sip_port,
                tls_sip_port=tls_port or None,
                ext_sip_ip=ext_sip,
                ext_rtp_ip=ext_rtp,
                local_network_acl=None if acl.lower() == "none" else acl,
            )
            profiles.append(ProfileSettings(name, addressing, service))
    listeners: dict[tuple[str, int], str] = {}
    reported: set[tuple[str, str, int]] = set()
    for profile in profiles:
        where_ip, service = profile.addressing.sip_ip, profile.sip
        tls = profile.addressing.tls_sip_port
        ports = [profile.addressing.sip_port] + ([tls] if tls and service.tls_cert else [])
        hosts = [str(where_ip or "default")] + ([str(service.sip_ip6 or "default6")] if service.ipv6 else [])
        for where in [(host, port) for host in hosts for port in ports] if service.listen else []:
            other = listeners.get(where)
            if other is not None and (profile.name, other, where[1]) not in reported:  # once, not once per family
                reported.add((profile.name, other, where[1]))
                report.error(
                    f"profile {_quote(profile.name)} listens on port {where[1]} like profile"
                    f" {_quote(listeners[where])}: give one of them another sip-port (or listen = false)"
                )
            listeners[where] = profile.name
    return tuple(profiles)


_ACTIONS: Final = {"echo": Action.ECHO, "user": Action.USER, "gateway": Action.GATEWAY}
_SIP_TRANSPORTS: Final = {"udp": "udp", "tcp": "tcp"}
_USER_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
MAX_PATTERN_LENGTH: Final = 200


def _sip_profile(table: _Table, report: _Report) -> ProfileSip:
    """A profile's SIP service: listeners, TLS files, dialplan ([[profile.extension]]) and gateways."""
    listen = table.flag("listen", True)
    tcp = table.flag("tcp", True)
    max_media = table.integer("max-media-calls", 0, 0, 10_000, " (0: only the [sip] cap)")
    auth_calls = table.flag("auth-calls", True)
    auth_echo = table.flag("auth-echo", False)
    ipv6, sip_ip6 = _profile_ipv6(table)
    cert = table.text("tls-cert", "").strip()
    key = table.text("tls-key", "").strip()
    for label, path_text in (("tls-cert", cert), ("tls-key", key)):
        if path_text and not Path(path_text).is_file():
            table.error(label, f"names no readable file: {_quote(path_text)}")
    gateways: list[GatewaySettings] = []
    for _, gw in _array_of_tables(table, "gateway"):
        name = gw.text("name", "").strip()
        proxy = gw.text("proxy", "").strip()
        transport = gw.choice("transport", _SIP_TRANSPORTS, "udp")
        username = gw.text("username", "").strip()
        password = gw.text("password", "")
        domain = gw.text("domain", "").strip() or None
        register = gw.flag("register", True)
        expires = gw.integer("expires", 600, 60, 86400, " s")
        retry = gw.number("retry", 30.0, 1.0, 3600.0, " s")
        gw.finish()
        if not name:
            gw.error("name", "is required")
        elif any(g.name == name for g in gateways):
            gw.error("name", f"{_quote(name)} is used by another gateway of this profile")
        parsed = _host_port(proxy if ":" in proxy.strip("[]") and not _is_ip(proxy) else f"{proxy}:5060")
        if not proxy or isinstance(parsed, str):
            gw.error("proxy", "is required (IP or IP:PORT)" if not proxy else str(parsed))
            continue
        if register and not username:
            gw.error("username", "is required to register")
        host, port = parsed
        gateways.append(
            GatewaySettings(name, host, port or 5060, transport, username, password, domain, register, expires, retry)
        )
    dialplan: list[Extension] = []
    for _, ext in _array_of_tables(table, "extension"):
        pattern_text = ext.text("match", "", max_length=MAX_PATTERN_LENGTH)
        action = ext.choice("action", _ACTIONS, Action.ECHO)
        gateway = ext.text("gateway", "").strip() or None
        ext.finish()
        if not pattern_text:
            ext.error("match", 'is required (a regular expression for the number, e.g. "9196" or "^0(\\d+)$")')
            continue
        try:
            pattern = compile_pattern(pattern_text.removeprefix("^").removesuffix("$"))
        except ValueError as exc:
            ext.error("match", f"is not a usable regular expression: {exc}")
            continue
        if action is Action.GATEWAY and not any(g.name == gateway for g in gateways):
            ext.error("gateway", f"must name a [[profile.gateway]] of this profile, not {_quote(gateway or '')}")
            continue
        dialplan.append(Extension(pattern, action, gateway))
    extra = ProfileSip(listen, tcp, Path(cert) if cert else None, Path(key) if key else None)
    return replace(
        extra,
        dialplan=tuple(dialplan) or extra.dialplan,
        gateways=tuple(gateways),
        max_media_calls=max_media or None,
        auth_calls=auth_calls,
        auth_echo=auth_echo,
        ipv6=ipv6,
        sip_ip6=sip_ip6,
    )


def _profile_ipv6(table: _Table) -> tuple[bool, ipaddress.IPv6Address | None]:
    """`sip-ipv6` (listen on IPv6 too) and `sip-ip6` (on which address: one that peers on the internet can
    reach, so global unicast; by default the host's stable global address). `sip-ip6` alone turns IPv6 on."""
    text = table.text("sip-ip6", "").strip()
    ipv6 = table.flag("sip-ipv6", bool(text))
    if not text:
        return ipv6, None
    try:
        address = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        table.error("sip-ip6", f"must be an IPv6 address, not {_quote(text)}")
        return ipv6, None
    if not isinstance(address, ipaddress.IPv6Address) or address.ipv4_mapped is not None:
        table.error("sip-ip6", f"must be an IPv6 address, not {_quote(text)} (the IPv4 one is sip-ip)")
    elif address.is_unspecified or address.is_multicast or address.is_link_local or address.scope_id:
        # A wildcard would answer from whichever address the kernel picks (RFC 5118 §4 wants our Via/Contact
        # address); a link-local one is unreachable beyond the link and has no pinhole to give.
        table.error("sip-ip6", f"must be a unicast address beyond the link, not {_quote(text)}")
    elif not ipv6:
        table.error("sip-ip6", "is set while sip-ipv6 = false: remove one of them")
    else:
        return True, address
    return ipv6, None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True


def _sip(table: _Table, top: _Table, report: _Report) -> SipSettings:
    """The [sip] table and the [[user]]s of the registrar."""
    defaults = SipSettings()
    realm = table.text("realm", defaults.realm).strip() or defaults.realm
    start = table.integer("rtp-start-port", defaults.rtp_start_port, 1024, 65534)
    end = table.integer("rtp-end-port", defaults.rtp_end_port, 1025, 65535)
    if end <= start:
        table.error("rtp-end-port", f"must be above rtp-start-port ({start})")
    pool = table.integer("rtp-pool", defaults.pool_size, 0, 64, " pairs (0: map each call's ports on demand)")
    t1 = table.number("t1", defaults.t1, 0.05, 5.0, " s")
    inactivity = table.number("rtp-timeout", defaults.inactivity, 1.0, 3600.0, " s")
    max_duration = table.number("max-call-duration", defaults.max_duration, 10.0, 86400.0, " s")
    max_calls = table.integer("max-calls", defaults.max_calls, 1, 100_000)
    max_media = table.integer("max-media-calls", defaults.max_media_calls, 1, 10_000)
    source_rate = table.number(
        "source-call-rate", defaults.source_call_rate, 0, 10_000, " new calls a second (0: no limit)"
    )
    source_burst = table.number("source-call-burst", defaults.source_call_burst, 1, 10_000, " calls")
    source_calls = table.integer("source-max-calls", defaults.source_max_calls, 1, 100_000)
    refill = table.number("rtp-pool-refill-rate", defaults.pool_refill_rate, 0, 1000, " pairs a second (0: no limit)")
    auth_failures = table.integer("auth-failures", defaults.auth_failures, 1, 1000, " failures")
    auth_window = table.number("auth-window", defaults.auth_window, 1, 86400, " s")
    auth_ban = table.number("auth-ban", defaults.auth_ban, 1, 86400, " s")
    auth_max_ban = table.number("auth-max-ban", max(defaults.auth_max_ban, auth_ban), 1, 7 * 86400, " s")
    if auth_max_ban < auth_ban:
        table.error("auth-max-ban", f"must be at least auth-ban ({auth_ban:g})")
    reply = table.flag("reply-to-source", defaults.reply_to_source)
    session_expires = table.integer("session-expires", defaults.session_expires, 90, 86400, " s (RFC 4028)")
    min_se = table.integer("min-se", defaults.min_se, 90, 86400, " s (RFC 4028: at least 90)")
    if session_expires < min_se:
        table.error("session-expires", f"must be at least min-se ({min_se})")
    register_wait = table.number("register-wait", defaults.register_wait, 0, 300, " s")
    table.finish()
    users: list[tuple[str, str]] = []
    for _, user in _array_of_tables(top, "user"):
        name = user.text("name", "").strip()
        password = user.text("password", "")
        user.finish()
        if not _USER_NAME.fullmatch(name):
            user.error("name", "is required: 1-64 letters, digits, '_', '.', '-'")
        elif any(n == name for n, _ in users):
            user.error("name", f"{_quote(name)} is defined twice")
        elif not password:
            user.error("password", "is required")
        else:
            users.append((name, password))
    return SipSettings(
        realm=realm,
        users=tuple(users),
        rtp_start_port=start,
        rtp_end_port=end,
        pool_size=pool,
        t1=t1,
        t2=max(t1, defaults.t2),
        inactivity=inactivity,
        max_duration=max_duration,
        max_calls=max_calls,
        max_media_calls=max_media,
        source_call_rate=source_rate,
        source_call_burst=source_burst,
        source_max_calls=source_calls,
        pool_refill_rate=refill,
        auth_failures=auth_failures,
        auth_window=auth_window,
        auth_ban=auth_ban,
        auth_max_ban=auth_max_ban,
        reply_to_source=reply,
        session_expires=session_expires,
        min_se=min_se,
        register_wait=register_wait,
    )


def _optional_ip(table: _Table, key: str) -> IPAddress | None:
    text = table.text(key, "").strip()
    if not text:
        return None
    try:
        return parse_address(text)
    except ValueError:
        table.error(key, f"must be an IP address, not {_quote(text)}")
        return None


def _ext(table: _Table, key: str) -> ExtValue | None:
    text = table.text(key, "").strip()
    if not text:
        return None
    try:
        return parse_ext_value(text)
    except ValueError as exc:
        table.error(key, str(exc))
        return None
