"""`autonat doctor`: does my router work, and does the internet really get in?"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from autonat.daemon.config import Config
    from autonat.doctor.findings import Finding, Measurements

DEFAULT_BUDGET = 30.0
QUICK_BUDGET = 5.0
TRACE_HELP = "Log each exchange on stderr, decoded: a list of pcp, natpmp, upnp, stun, sip, or all."
F = TypeVar("F", bound=Callable[..., Any])


def _check_trace(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    from autonat.aio import trace

    try:
        trace.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def trace_option(function: F) -> F:
    """`--trace LIST`, for every command that talks to the router or runs the SIP service (the wire
    trace is imported only when the option is given)."""
    return click.option("--trace", "trace_list", metavar="LIST", callback=_check_trace, help=TRACE_HELP)(function)


def start_trace(protocols: str | None, *, keep: str = "", daemon: bool = False) -> None:
    """Turn the wire trace on for this process: `protocols` logged, `keep` kept for the report only.

    One-shot commands log the trace alone on stderr, in the daemon's line format (their results stay
    on stdout). For the daemon (`run`) the protocols are pinned: its own log carries them, and a reload's
    `[log] trace` adds to them but cannot switch them off."""
    if protocols is None and not keep:
        return
    from autonat.aio import trace

    if daemon:
        trace.pin(protocols or ())
        return
    trace.configure(protocols or (), keep=keep)
    if protocols:
        from autonat.daemon import logs

        logs.trace_output()


@click.command()
@click.option("--quick", is_flag=True, help="Only the seconds-long part: one protocol, no waiting.")
@click.option("--json", "as_json", is_flag=True, help="Everything as JSON (findings, measurements, reachability).")
@click.option(
    "--share",
    "share_path",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Also write a Markdown report for a bug report (external address masked, the run's wire trace attached).",
)
@click.option("--show-address", is_flag=True, help="With --share: keep the external address in the report.")
@click.option("--stun", "stun_server", help="stun:HOST[:PORT] answering from a second address (RFC 5780).")
@click.option("--gateway", help="Router IP address (default: the gateway of the default route).")
@click.option("--interface", help="Use this interface's route and address.")
@click.option("--root-url", help="UPnP root description URL (UPnP without SSDP).")
@click.option("--timeout", type=float, default=2.0, show_default=True, help="Per router request.")
@click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), help="For [nat] stun and [doctor]."
)
@click.option("--call", "call_uri", help="Also a test call from the running daemon to this echo (sip:9196@IP).")
@click.option("--call-profile", help="The daemon's profile that calls (default: [doctor] call-profile, or its first).")
@trace_option
def doctor(
    quick: bool,
    as_json: bool,
    share_path: Path | None,
    show_address: bool,
    stun_server: str | None,
    gateway: str | None,
    interface: str | None,
    root_url: str | None,
    timeout: float,
    config_path: Path | None,
    call_uri: str | None,
    call_profile: str | None,
    trace_list: str | None,
) -> None:
    """Check the router and the path to the internet; exit 0 when autonat can work with it, 1 if not."""
    import json

    from autonat.cli.main import run_async
    from autonat.daemon.config import default_config_path, default_journal_path, load_config
    from autonat.doctor import report
    from autonat.doctor.findings import exit_status, judge
    from autonat.doctor.measure import Doctor
    from autonat.engine.journal import Journal, JournalError
    from autonat.errors import AutonatError

    # --share attaches the wire trace of the run: every protocol goes to the ring, --trace's to stderr too.
    start_trace(trace_list, keep="all" if share_path is not None else "")
    config = None
    with contextlib.suppress(AutonatError):
        path = config_path or default_config_path()
        config = load_config(path) if path else None
    if stun_server is None and config is not None:
        stun_server = config.nat.stun
    call_uri = call_uri or (config.doctor.call if config is not None else None)
    journal = None
    with contextlib.suppress(JournalError):
        journal = Journal(default_journal_path())
    try:
        runner = Doctor(
            gateway=gateway,
            interface=interface,
            timeout=timeout,
            root_url=root_url,
            stun_server=stun_server,
            quick=quick,
            journal=journal,
        )
        measurements = run_async(runner.run(QUICK_BUDGET if quick else DEFAULT_BUDGET))
    finally:
        if journal is not None:
            journal.close()
    if call_uri is not None:
        _test_call(measurements, call_uri, call_profile, config)
    findings = judge(measurements)
    if as_json:
        click.echo(json.dumps(report.to_dict(measurements, findings), indent=2))
    else:
        click.echo(report.text(measurements, findings))
    _hand_to_daemon(measurements, findings, config)
    if share_path is not None:
        from autonat.aio import trace

        shared = report.share(measurements, findings, show_address=show_address, trace=trace.records())
        share_path.write_text(shared)
    sys.exit(exit_status(findings))


def _hand_to_daemon(measurements: Measurements, findings: list[Finding], config: Config | None) -> None:
    """Give the running daemon this run's summary for its status page (control verb `doctor-report`). Best
    effort and quiet: with no daemon (or an older one) doctor's own output is the whole report."""
    from autonat.cli.main import ControlCallError, ask_daemon, default_socket_path
    from autonat.doctor import report

    socket_path = config.control.socket if config is not None else default_socket_path()
    with contextlib.suppress(ControlCallError):
        ask_daemon(socket_path, {"cmd": "doctor-report", "report": report.summary(measurements, findings)}, 5.0)


def _test_call(measurements: Measurements, uri: str, profile: str | None, config: Config | None) -> None:
    """The test call (issue 14 item 2) through the running daemon: its result, or why it was not made."""
    from autonat.cli.call import test_call
    from autonat.cli.main import ControlCallError, default_socket_path

    socket_path = config.control.socket if config is not None else default_socket_path()
    settings = config.doctor if config is not None else None
    profile = profile or (settings.call_profile if settings is not None else None)
    seconds = settings.call_seconds if settings is not None else 3.0
    try:
        measurements.call = test_call(socket_path, uri, profile, seconds)
    except ControlCallError as exc:
        measurements.call_error = str(exc)
