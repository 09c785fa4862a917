"""Entry point of the `autonat` command.

Every command prints a result (or `--json`) on stdout and exits 0, or prints one line on stderr and
exits non-zero: library errors carry their own exit code, and nothing else ever shows a traceback
unless AUTONAT_DEBUG=1 asks for one.

Start-up is part of every command's time, so this module imports almost nothing. The commands live in
modules of their own, listed in `COMMANDS` (name -> "module:attribute" and the one-line help shown by
`autonat --help`); a command's module, and what it needs (click, asyncio, the UPnP chain...), is
imported only when that command runs. `autonat --help` and `--version` are answered from the table
without importing click at all (tests/unit/test_cli_lazy.py holds the text to click's own rendering).
A new command module plugs in by adding its rows to `COMMANDS`.
"""

from __future__ import annotations

import sys

from autonat.version import __version__

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine
    from pathlib import Path
    from typing import Any, TypeVar

    import click

    T = TypeVar("T")
    F = TypeVar("F", bound=Callable[..., Any])

DESCRIPTION = "Port mapping through the home router (PCP, NAT-PMP, UPnP IGD), FreeSWITCH auto-nat style."

COMMANDS: dict[str, tuple[str, str]] = {
    "acl": ("autonat.cli.acl:acl", "Is IP allowed by ACL list LIST? Prints true or false..."),
    "call": ("autonat.cli.call:call", "Test call from the daemon to URI (an echo): does audio get..."),
    "calls": ("autonat.cli.control:calls", "Live calls of the daemon's SIP service, with their legs and..."),
    "doctor": ("autonat.cli.doctor:doctor", "Check the router and the path to the internet; exit 0 when..."),
    "events": ("autonat.cli.control:events", "Stream the daemon's events as JSON lines (nat-add, nat-lost,..."),
    "example": ("autonat.cli.daemon:example", "Print a file shipped with autonat: the example config, the..."),
    "lab": ("autonat.lab.cli:lab", "A home network with a real router (miniupnpd: UPnP IGD,..."),
    "map": ("autonat.cli.router:map_group", "Add or delete one port mapping on the router (one-shot, like..."),
    "nat_map": ("autonat.cli.control:nat_map", "FreeSWITCH's nat_map verbs, sent to the running daemon."),
    "probe": ("autonat.cli.router:probe", "Find the router, ask every protocol at once, report what works..."),
    "profile": ("autonat.cli.control:profile", "SIP profiles of the running daemon (FreeSWITCH's sofia status..."),
    "reload": ("autonat.cli.daemon:reload", "Make the running daemon re-read its config and apply the..."),
    "run": ("autonat.cli.daemon:run", "Run the daemon in the foreground: keep the configured..."),
}
"""Every command: name -> ("module:attribute" of its click command, the short help `autonat --help`
shows: click's own cut of the command's docstring, which a test checks)."""

QUIET_HELP = "Do not log the holes opened and closed on stderr."


def help_text() -> str:
    """`autonat --help`, as click renders it for the group below (a test keeps the two equal)."""
    width = max(len(name) for name in COMMANDS)
    commands = "\n".join(f"  {name:<{width}}  {short}" for name, (_, short) in sorted(COMMANDS.items()))
    return (
        "Usage: autonat [OPTIONS] COMMAND [ARGS]...\n\n"
        "  Port mapping through the home router (PCP, NAT-PMP, UPnP IGD), FreeSWITCH\n"
        "  auto-nat style.\n\n"  # DESCRIPTION, wrapped at click's 78 columns
        "Options:\n"
        "  --version    Show the version and exit.\n"
        f"  -q, --quiet  {QUIET_HELP}\n"
        "  -h, --help   Show this message and exit.\n\n"
        f"Commands:\n{commands}\n"
    )


def print_json(data: object) -> None:
    import json

    import click

    click.echo(json.dumps(data, indent=2, sort_keys=False))


def run_async(coroutine: Coroutine[Any, Any, T], *, fast_loop: bool = False) -> T:
    """Run a coroutine, turning every failure into one line on stderr and an exit code.

    `fast_loop` (for the daemon): run on uvloop where it is installed (an optional extra, never a
    dependency: bench/peers.py measures what it buys), else on asyncio's own loop."""
    import asyncio

    import click

    from autonat.errors import AutonatError

    factory = None
    if fast_loop:
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            factory = None
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(coroutine)
    except AutonatError as exc:
        click.echo(f"autonat: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        import os

        if os.environ.get("AUTONAT_DEBUG"):
            raise
        click.echo(f"autonat: internal error: {type(exc).__name__}: {exc} (AUTONAT_DEBUG=1 shows more)", err=True)
        sys.exit(70)


CONTROL_REPLY_LIMIT = 1 << 22  # the most a reply line may hold, as daemon.control.ControlClient reads it
CONTROL_TIMEOUT = 30.0  # a daemon that takes longer to answer one request is stuck
CONTROL_ERROR_EXIT = 8  # daemon.control.ControlError.exit_code


def default_socket_path() -> Path:
    """The daemon's control socket: daemon.config.default_socket_path, without importing the daemon's
    config (and through it the SIP service: 140 ms). A test keeps the two equal."""
    import os
    from pathlib import Path

    if os.geteuid() == 0:
        return Path("/run/autonat/control.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime and Path(runtime).is_absolute():
        return Path(runtime) / "autonat" / "control.sock"
    from autonat.state import state_dir

    return state_dir() / "control.sock"


class ControlCallError(Exception):
    """The daemon could not be asked, or refused: one line for the user (exit status CONTROL_ERROR_EXIT)."""

    exit_code = CONTROL_ERROR_EXIT


def ask_daemon(
    socket_path: Path, request: dict[str, Any], limit: float = CONTROL_TIMEOUT, what: str | None = None
) -> Any:
    """One request to the daemon's control socket (a JSON line each way, the protocol of daemon.control) and
    its result; ControlCallError, one line, when the daemon cannot be asked or refuses (`what`, to name it).
    Blocking, bounded by `limit` seconds and CONTROL_REPLY_LIMIT bytes, and without the daemon's modules or
    asyncio: a verb like `nat_map status` costs the interpreter, click and a round trip (bench/cli.py)."""
    import json
    import socket

    chunks: list[bytes] = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(limit)
            try:
                sock.connect(str(socket_path))
            except (FileNotFoundError, ConnectionRefusedError):
                raise ControlCallError(f"no autonat daemon is running (no control socket at {socket_path})") from None
            except PermissionError:
                raise ControlCallError(
                    f"no permission to use the control socket {socket_path} (run as its owner)"
                ) from None
            sock.sendall(json.dumps(request).encode() + b"\n")
            size = 0
            while not chunks or not chunks[-1].endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise ControlCallError("the daemon closed the control connection")
                size += len(chunk)
                if size > CONTROL_REPLY_LIMIT:
                    raise ControlCallError(f"the daemon's reply exceeds {CONTROL_REPLY_LIMIT} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise ControlCallError(f"the daemon did not answer within {limit:g} s") from None
    except OSError as exc:
        raise ControlCallError(f"control socket {socket_path}: {exc.strerror or exc}") from None
    try:
        answer = json.loads(b"".join(chunks).split(b"\n", 1)[0])
    except ValueError:
        raise ControlCallError("the daemon's reply is not JSON") from None
    if not isinstance(answer, dict) or not answer.get("ok"):
        error = answer.get("error") if isinstance(answer, dict) else None
        raise ControlCallError(str(error or ("the daemon refused" if what is None else f"the daemon refused {what}")))
    return answer.get("result")


def control_call(socket_path: Path, request: dict[str, Any]) -> Any:
    """`ask_daemon` for a command: its result, or the one line on stderr and exit status 8."""
    try:
        return ask_daemon(socket_path, request)
    except ControlCallError as exc:
        sys.stderr.write(f"autonat: {exc}\n")
        sys.exit(CONTROL_ERROR_EXIT)


def transport_argument(function: F) -> F:
    import click

    return click.argument("transport", type=click.Choice(["udp", "tcp"], case_sensitive=False))(function)


def family_option(function: F) -> F:
    """--family for the commands that map (`map`, and `nat_map` through the daemon)."""
    import click

    return click.option(
        "--family",
        type=click.Choice(["4", "6"]),
        default="4",
        show_default=True,
        help="4: a port mapping on the NAT; 6: an IPv6 firewall pinhole for this host's stable address"
        " (PCP or UPnP IGD:2, asked from that address).",
    )(function)


def _group() -> click.Group:
    """The click group, its commands imported on demand from COMMANDS."""
    import importlib

    import click

    class LazyGroup(click.Group):
        def list_commands(self, ctx: click.Context) -> list[str]:
            return sorted(COMMANDS)

        def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
            entry = COMMANDS.get(cmd_name)
            if entry is None:
                return None
            module, _, attribute = entry[0].partition(":")
            command: click.Command = getattr(importlib.import_module(module), attribute)
            return command

        def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
            # The short help comes from the table: listing the commands imports none of them.
            rows = [(name, short) for name, (_, short) in sorted(COMMANDS.items())]
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    @click.group(cls=LazyGroup, help=DESCRIPTION, context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(__version__, prog_name="autonat")
    @click.option("-q", "--quiet", is_flag=True, help=QUIET_HELP)
    def cli(quiet: bool) -> None:
        # Every hole opened or closed in the user's firewall is logged, on stderr so --json stays clean.
        # click has imported the command's module before this runs: a command that can open holes has
        # logging loaded by then (asyncio imports it); one that cannot (the control verbs) is spared it.
        if "logging" not in sys.modules:
            return
        import logging

        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("autonat: %(message)s"))
        holes = logging.getLogger("autonat.holes")
        holes.handlers[:] = [handler]
        holes.setLevel(logging.WARNING if quiet else logging.INFO)
        holes.propagate = False

    return cli


def __getattr__(name: str) -> object:
    """`cli`, the click group, built on first use (tests and tools that drive click directly)."""
    if name == "cli":
        group = _group()
        globals()["cli"] = group
        return group
    raise AttributeError(f"module 'autonat.cli.main' has no attribute {name!r}")


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; usage mistakes become one line (click's default prints the whole usage)."""
    args = sys.argv[1:] if argv is None else argv
    if args in ([], ["--help"], ["-h"]):
        sys.stdout.write(help_text())
        sys.exit(0)
    if args == ["--version"]:
        sys.stdout.write(f"autonat, version {__version__}\n")
        sys.exit(0)
    import click

    group = _group()
    try:
        code = group.main(args=args, prog_name="autonat", standalone_mode=False)
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "autonat"
        click.echo(f"autonat: {exc.format_message()} (see '{where} --help')", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"autonat: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("autonat: aborted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
