"""Entry point of the `autonat` command.

Every command prints a result (or `--json`) on stdout and exits 0, or prints one line on stderr and
exits non-zero: library errors carry their own exit code, and nothing else ever shows a traceback
unless AUTONAT_DEBUG=1 asks for one.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import click

from autonat import __version__
from autonat.addresses import is_public
from autonat.aio.router import ProbeResult, ProtocolChoice, RouterSession
from autonat.errors import AutonatError
from autonat.mapper import DEFAULT_LIFETIME, MAX_LIFETIME, Mapping, MappingRequest
from autonat.proto.exchange import DEFAULT_DEADLINE
from autonat.proto.types import Transport

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine, turning every failure into one line on stderr and an exit code."""
    try:
        return asyncio.run(coroutine)
    except AutonatError as exc:
        click.echo(f"autonat: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        if os.environ.get("AUTONAT_DEBUG"):
            raise
        click.echo(
            f"autonat: internal error: {type(exc).__name__}: {exc} (AUTONAT_DEBUG=1 shows more)", err=True
        )
        sys.exit(70)


def router_options(function: F) -> F:
    """--gateway, --interface, --timeout and --json, shared by every command that talks to the router."""
    decorators = [
        click.option(
            "--gateway", metavar="IP", help="Router address (default: gateway of the default route)."
        ),
        click.option("--interface", metavar="NAME", help="Use the route and address of this interface."),
        click.option(
            "--timeout",
            type=click.FloatRange(0.05, 300),
            default=DEFAULT_DEADLINE,
            show_default=True,
            help="Seconds to wait for the router, retransmissions included.",
        ),
        click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
    ]
    return functools.reduce(lambda f, decorate: decorate(f), reversed(decorators), function)


def protocol_option(function: F) -> F:
    return click.option(
        "--protocol",
        type=click.Choice(["auto", "pcp", "natpmp"]),
        default="auto",
        show_default=True,
        help="Port-mapping protocol; auto probes and picks PCP > NAT-PMP.",
    )(function)


def transport_argument(function: F) -> F:
    return click.argument("transport", type=click.Choice(["udp", "tcp"], case_sensitive=False))(function)


def print_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="autonat")
@click.option("-q", "--quiet", is_flag=True, help="Do not log the holes opened and closed on stderr.")
def cli(quiet: bool) -> None:
    """Port mapping through the home router (PCP, NAT-PMP, UPnP IGD), FreeSWITCH auto-nat style."""
    # Every hole opened or closed in the user's firewall is logged, on stderr so --json stays clean.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("autonat: %(message)s"))
    holes = logging.getLogger("autonat.holes")
    holes.handlers[:] = [handler]
    holes.setLevel(logging.WARNING if quiet else logging.INFO)
    holes.propagate = False


def _print_probe(result: ProbeResult) -> None:
    data = result.to_dict()
    click.echo(f"Gateway:        {data['gateway']} (via {data['interface'] or '?'})")
    click.echo(f"Local address:  {data['local_address']}")
    external = data["external_ip"] or "unknown"
    if result.double_nat:
        external += f" ({data['external_ip_kind']}: DOUBLE NAT, not reachable from the internet)"
    click.echo(f"External IP:    {external}")
    click.echo(f"Selected:       {data['selected'] or 'none'}")
    for name, status in result.protocols.items():
        mark = "yes" if status.available else "no "
        timing = f" [{status.elapsed_ms:.1f} ms]" if status.elapsed_ms is not None else ""
        click.echo(f"  {name:<7} {mark} {status.reason}{timing}")
    click.echo(f"Probe time:     {result.elapsed_ms:.1f} ms")


@cli.command()
@router_options
@click.option(
    "--protocol",
    type=click.Choice(["auto", "pcp", "natpmp"]),
    default="auto",
    show_default=True,
    help="Probe only this protocol.",
)
def probe(gateway: str | None, interface: str | None, timeout: float, as_json: bool, protocol: str) -> None:
    """Find the router, ask every protocol at once, report what works and the external address."""

    async def go() -> ProbeResult:
        async with await RouterSession.open(gateway, interface, timeout) as router:
            return await router.probe(_choice(protocol))

    result = run_async(go())
    if as_json:
        print_json(result.to_dict())
    else:
        _print_probe(result)
    if result.selected is None:
        sys.exit(7)


def _choice(text: str) -> ProtocolChoice:
    assert text in ("auto", "pcp", "natpmp")
    return text  # type: ignore[return-value]


@cli.group(name="map")
def map_group() -> None:
    """Add or delete one port mapping on the router (one-shot, like natpmpc/upnpc)."""


@map_group.command(name="add")
@click.argument("port", type=click.IntRange(1, 65535))
@transport_argument
@click.option("--external-port", type=click.IntRange(0, 65535), default=0, help="Suggested external port.")
@click.option(
    "--lifetime",
    type=click.IntRange(1, MAX_LIFETIME),
    default=DEFAULT_LIFETIME,
    show_default=True,
    help="Lease in seconds (finite; the router may shorten it).",
)
@protocol_option
@router_options
def map_add(
    port: int,
    transport: str,
    external_port: int,
    lifetime: int,
    protocol: str,
    gateway: str | None,
    interface: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Map PORT (udp or tcp) of this host on the router and print the external address and port."""
    request = MappingRequest(Transport.parse(transport), port, external_port, lifetime)

    async def go() -> tuple[Mapping, bool]:
        async with await RouterSession.open(gateway, interface, timeout) as router:
            mapping = await router.add(request, _choice(protocol))
            probe = router.last_probe
            return mapping, probe is not None and probe.double_nat

    mapping, double_nat = run_async(go())
    double_nat = double_nat or (mapping.external_ip is not None and not is_public(mapping.external_ip))
    if as_json:
        print_json({**mapping.to_dict(), "double_nat": double_nat})
    else:
        click.echo(f"{mapping.external_ip or 'unknown'}:{mapping.external_port}")
        click.echo(f"mapped {mapping.describe()}")
    if double_nat:
        click.echo(
            f"autonat: warning: external address {mapping.external_ip} is not public (double NAT):"
            " this mapping is not reachable from the internet",
            err=True,
        )


@map_group.command(name="del")
@click.argument("port", type=click.IntRange(1, 65535))
@transport_argument
@protocol_option
@router_options
def map_del(
    port: int,
    transport: str,
    protocol: str,
    gateway: str | None,
    interface: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Delete this host's mapping of PORT (udp or tcp). Deleting a mapping that is not there succeeds."""
    parsed = Transport.parse(transport)

    async def go() -> str:
        async with await RouterSession.open(gateway, interface, timeout) as router:
            return await router.delete(parsed, port, _choice(protocol))

    used = run_async(go())
    if as_json:
        print_json({"protocol": used, "transport": str(parsed), "internal_port": port, "deleted": True})
    else:
        click.echo(f"deleted {parsed} {port} via {used}")


def _register() -> None:
    from autonat.lab.cli import lab

    cli.add_command(lab)


try:  # TEMP until the lab lands
    _register()
except ImportError:
    pass


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; usage mistakes become one line (click's default prints the whole usage)."""
    try:
        code = cli.main(args=argv, prog_name="autonat", standalone_mode=False)
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
