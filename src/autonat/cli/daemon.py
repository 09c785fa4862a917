"""The daemon's commands: `autonat run` (and `run --check`), `autonat reload`, `autonat example`."""

from __future__ import annotations

import sys
from collections.abc import Coroutine
from importlib import resources
from pathlib import Path
from typing import Any

import click

from autonat.cli.doctor import start_trace, trace_option
from autonat.errors import AutonatError

EXAMPLES = {
    "config": "autonat.toml",
    "unit": "autonat.service",
    "fail2ban-filter": "fail2ban/filter.conf",
    "fail2ban-jail": "fail2ban/jail.conf",
}


def _fail(exc: AutonatError) -> None:
    for line in str(exc).splitlines():
        click.echo(f"autonat: {line}", err=True)
    sys.exit(exc.exit_code)


@click.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML config file (default: /etc/autonat/autonat.toml when it exists, else built-in defaults).",
)
@click.option("--nonat", is_flag=True, help="No NAT discovery at all (nat_map says NAT is disabled).")
@click.option("--nonatmap", is_flag=True, help="Discover and learn the external IP, but map no ports.")
@click.option("--check", is_flag=True, help="Only check the config: exit 0 if it is good, 2 with its mistakes.")
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), help="Over the config's [log] level."
)
@click.option("--log-format", type=click.Choice(["text", "json"]), help="Over the config's [log] format.")
@trace_option
def run(
    config_path: Path | None,
    nonat: bool,
    nonatmap: bool,
    check: bool,
    log_level: str | None,
    log_format: str | None,
    trace_list: str | None,
) -> None:
    """Run the daemon in the foreground: keep the configured mappings, answer nat_map, stop on SIGTERM,
    re-read the config on SIGHUP."""
    from autonat.cli.main import run_async
    from autonat.daemon.config import default_config_path, load_config

    path = config_path if config_path is not None else default_config_path()
    if check:
        from autonat.daemon.run import check_config

        problems = check_config(path)
        for problem in problems:
            click.echo(f"autonat: {problem}", err=True)
        if problems:
            sys.exit(2)
        click.echo(f"{path or 'the built-in defaults'}: good")
        return
    overrides: dict[str, Any] = {"nonat": nonat, "nonatmap": nonatmap, "log_level": log_level, "log_format": log_format}
    start_trace(trace_list, daemon=True)  # on top of [log] trace, through reloads (aio/trace.py pin)

    def go() -> Coroutine[Any, Any, int]:
        from autonat.daemon.run import run_daemon

        config = load_config(path).with_overrides(**overrides)
        return run_daemon(config, overrides=overrides)

    try:
        coroutine = go()
    except AutonatError as exc:
        _fail(exc)
        return
    sys.exit(run_async(coroutine))


@click.command()
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The daemon's control socket (default: /run/autonat/control.sock as root).",
)
def reload(socket_path: Path | None) -> None:
    """Make the running daemon re-read its config and apply the difference (what SIGHUP does)."""
    from autonat.cli.main import control_call
    from autonat.daemon.config import default_socket_path

    try:
        result = control_call(socket_path or default_socket_path(), {"cmd": "reload"})
    except AutonatError as exc:
        _fail(exc)
        return
    click.echo("changed: " + (", ".join(result["changes"]) or "nothing"))
    if result["restart_needed"]:
        click.echo("needs a restart: " + ", ".join(result["restart_needed"]))


@click.command()
@click.argument("what", type=click.Choice(sorted(EXAMPLES)))
def example(what: str) -> None:
    """Print a file shipped with autonat: the example config, the systemd unit, the fail2ban filter or jail."""
    text = resources.files("autonat").joinpath("data", EXAMPLES[what]).read_text(encoding="utf-8")
    click.echo(text, nl=False)


def _doctor() -> click.Command:
    from autonat.cli.doctor import doctor

    return doctor


COMMANDS = (run, reload, example, _doctor())
