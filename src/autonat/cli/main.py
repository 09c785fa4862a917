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
from autonat.proto import igd
from autonat.proto.exchange import DEFAULT_DEADLINE
from autonat.proto.types import Transport

T = TypeVar("T")
PROTOCOLS = ("auto", "pcp", "natpmp", "upnp")
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
        click.echo(f"autonat: internal error: {type(exc).__name__}: {exc} (AUTONAT_DEBUG=1 shows more)", err=True)
        sys.exit(70)


def router_options(function: F) -> F:
    """--gateway, --interface, --timeout and --json, shared by every command that talks to the router."""
    decorators = [
        click.option("--gateway", metavar="IP", help="Router address (default: gateway of the default route)."),
        click.option("--interface", metavar="NAME", help="Use the route and address of this interface."),
        click.option(
            "--timeout",
            type=click.FloatRange(0.05, 300),
            default=DEFAULT_DEADLINE,
            show_default=True,
            help="Seconds to wait for the router, retransmissions included.",
        ),
        click.option(
            "--root-url",
            metavar="URL",
            help="UPnP: the IGD's root description URL (skips SSDP discovery).",
        ),
        click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
    ]
    return functools.reduce(lambda f, decorate: decorate(f), reversed(decorators), function)


def protocol_option(function: F) -> F:
    return click.option(
        "--protocol",
        type=click.Choice(PROTOCOLS),
        default="auto",
        show_default=True,
        help="Port-mapping protocol; auto probes all at once and picks PCP > NAT-PMP > UPnP.",
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
        if "root_url" in status.details:
            details = status.details
            click.echo(
                f"          {details['friendly_name']} ({details['manufacturer']} {details['model_name']})"
                f" at {details['root_url']}"
            )
    click.echo(f"Probe time:     {result.elapsed_ms:.1f} ms")


@cli.command()
@router_options
@click.option(
    "--protocol",
    type=click.Choice(PROTOCOLS),
    default="auto",
    show_default=True,
    help="Probe only this protocol.",
)
def probe(
    gateway: str | None, interface: str | None, timeout: float, root_url: str | None, as_json: bool, protocol: str
) -> None:
    """Find the router, ask every protocol at once, report what works and the external address."""

    async def go() -> ProbeResult:
        async with await RouterSession.open(gateway, interface, timeout, root_url) as router:
            return await router.probe(_choice(protocol))

    result = run_async(go())
    if as_json:
        print_json(result.to_dict())
    else:
        _print_probe(result)
    if result.selected is None:
        reasons = "; ".join(f"{name}: {status.reason}" for name, status in result.protocols.items())
        click.echo(f"autonat: no port-mapping protocol works with {result.location.gateway} ({reasons})", err=True)
        sys.exit(7)


def _choice(text: str) -> ProtocolChoice:
    assert text in PROTOCOLS
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
    root_url: str | None,
    as_json: bool,
) -> None:
    """Map PORT (udp or tcp) of this host on the router and print the external address and port."""
    request = MappingRequest(Transport.parse(transport), port, external_port, lifetime)

    async def go() -> tuple[Mapping, bool]:
        async with await RouterSession.open(gateway, interface, timeout, root_url) as router:
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
    if mapping.lifetime == 0:
        click.echo(
            "autonat: warning: the router only grants permanent UPnP leases; delete this mapping"
            f" yourself (autonat map del {port} {transport}) when it is no longer needed",
            err=True,
        )
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
    root_url: str | None,
    as_json: bool,
) -> None:
    """Delete this host's mapping of PORT (udp or tcp). Deleting a mapping that is not there succeeds."""
    parsed = Transport.parse(transport)

    async def go() -> str:
        async with await RouterSession.open(gateway, interface, timeout, root_url) as router:
            return await router.delete(parsed, port, _choice(protocol))

    used = run_async(go())
    if as_json:
        print_json({"protocol": used, "transport": str(parsed), "internal_port": port, "deleted": True})
    else:
        click.echo(f"deleted {parsed} {port} via {used}")


@map_group.command(name="list")
@router_options
def map_list(gateway: str | None, interface: str | None, timeout: float, root_url: str | None, as_json: bool) -> None:
    """List the router's whole UPnP mapping table, ours or not (like `upnpc -l`)."""

    async def go() -> tuple[list[igd.PortMappingEntry], str]:
        async with await RouterSession.open(gateway, interface, timeout, root_url) as router:
            return await router.upnp.list_mappings(), router.upnp.tag

    entries, tag = run_async(go())
    rows = [
        {
            "transport": str(entry.transport),
            "external_port": entry.external_port,
            "internal_client": entry.internal_client,
            "internal_port": entry.internal_port,
            "description": entry.description,
            "lease": entry.lease_duration,
            "enabled": entry.enabled,
            "remote_host": entry.remote_host,
            "ours": f"autonat:{tag} " in entry.description,
        }
        for entry in entries
    ]
    if as_json:
        print_json(rows)
        return
    for row in rows:
        mark = "*" if row["ours"] else " "
        click.echo(
            f"{mark} {row['transport']:<3} {row['external_port']:>5} ->"
            f" {row['internal_client']}:{row['internal_port']:<5}"
            f" lease {row['lease']:>6} s  {row['description']!r}"
        )
    click.echo(f"{len(rows)} mapping{'s' if len(rows) != 1 else ''} (* = made by this host's autonat)")


def _register() -> None:
    from autonat.lab.cli import lab

    cli.add_command(lab)


_register()


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
