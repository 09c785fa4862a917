"""`autonat probe` and `autonat map add|del|list`: one-shot talks with the router (like upnpc / natpmpc)."""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from autonat.addresses import is_public
from autonat.aio.router import ProbeResult, ProtocolChoice, RouterSession
from autonat.cli.doctor import start_trace, trace_option
from autonat.cli.main import print_json, run_async, transport_argument
from autonat.errors import AutonatError
from autonat.mapper import DEFAULT_LIFETIME, MAX_LIFETIME, Mapping, MappingRequest
from autonat.proto.exchange import DEFAULT_DEADLINE
from autonat.proto.types import Transport

TYPE_CHECKING = False
if TYPE_CHECKING:
    from autonat.proto import igd

PROTOCOLS = ("auto", "pcp", "natpmp", "upnp")
F = TypeVar("F", bound=Callable[..., Any])


def router_options(function: F) -> F:
    """--gateway, --interface, --timeout, --root-url, --json and --trace, shared by every command that talks
    to the router."""
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
        trace_option,
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
        if not status.available:
            # Why each IGD candidate was discarded: the one-line reason names only the first few.
            for candidate in status.details.get("candidates", []):
                where = f"{candidate['location']} from {candidate['responder']}"
                click.echo(f"          {candidate['outcome']}: {where}: {candidate['reason']}")
    click.echo(f"Probe time:     {result.elapsed_ms:.1f} ms")


@click.command()
@router_options
@click.option(
    "--protocol",
    type=click.Choice(PROTOCOLS),
    default="auto",
    show_default=True,
    help="Probe only this protocol.",
)
@click.option(
    "--stun",
    metavar="stun:HOST[:PORT]",
    help="Also ask this STUN server what it sees; a different address than the router's means double NAT.",
)
def probe(
    gateway: str | None,
    interface: str | None,
    timeout: float,
    root_url: str | None,
    as_json: bool,
    protocol: str,
    stun: str | None,
    trace_list: str | None,
) -> None:
    """Find the router, ask every protocol at once, report what works and the external address."""
    start_trace(trace_list)
    from autonat.aio.stun import parse_stun_target, stun_binding

    target = None
    if stun is not None:
        try:
            target = parse_stun_target(stun)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--stun") from None

    async def go() -> tuple[ProbeResult, dict[str, Any] | None]:
        async with await RouterSession.open(gateway, interface, timeout, root_url) as router:
            probe_task = asyncio.ensure_future(router.probe(_choice(protocol)))
            seen: dict[str, Any] | None = None
            if target is not None:
                local = router.location.local_address
                try:
                    address, _ = await stun_binding(target, local_address=local, deadline=timeout)
                    seen = {"server": stun, "address": str(address)}
                except AutonatError as exc:
                    seen = {"server": stun, "error": str(exc)}
            return await probe_task, seen

    result, seen = run_async(go())
    data = result.to_dict()
    if seen is not None:
        if "address" in seen:
            seen["matches_router"] = seen["address"] == data["external_ip"]
            data["double_nat"] = data["double_nat"] or not seen["matches_router"]
        data["stun"] = seen
    if as_json:
        print_json(data)
    else:
        _print_probe(result)
        if seen is not None:
            verdict = seen.get("error") or (
                "agrees with the router" if seen["matches_router"] else "DIFFERS from the router: double NAT"
            )
            click.echo(f"STUN:           {seen.get('address', '-')} ({verdict})")
    if result.selected is None:
        reasons = "; ".join(f"{name}: {status.reason}" for name, status in result.protocols.items())
        click.echo(f"autonat: no port-mapping protocol works with {result.location.gateway} ({reasons})", err=True)
        sys.exit(7)


def _choice(text: str) -> ProtocolChoice:
    assert text in PROTOCOLS
    return text  # type: ignore[return-value]


@click.group(name="map")
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
    trace_list: str | None,
) -> None:
    """Map PORT (udp or tcp) of this host on the router and print the external address and port."""
    start_trace(trace_list)
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
    trace_list: str | None,
) -> None:
    """Delete this host's mapping of PORT (udp or tcp). Deleting a mapping that is not there succeeds."""
    start_trace(trace_list)
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
def map_list(
    gateway: str | None,
    interface: str | None,
    timeout: float,
    root_url: str | None,
    as_json: bool,
    trace_list: str | None,
) -> None:
    """List the router's whole UPnP mapping table, ours or not (like `upnpc -l`)."""
    start_trace(trace_list)

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
