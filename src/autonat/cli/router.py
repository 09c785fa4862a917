"""`autonat probe` and `autonat map add|del|list`: one-shot talks with the router (like upnpc / natpmpc)."""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from autonat.addresses import is_public
from autonat.aio.router import ProbeResult, ProtocolChoice, RouterSession
from autonat.cli.doctor import start_trace, trace_option
from autonat.cli.main import family_option, print_json, run_async, transport_argument
from autonat.errors import AutonatError
from autonat.mapper import DEFAULT_LIFETIME, MAX_LIFETIME, Mapping, MappingRequest
from autonat.proto.exchange import DEFAULT_DEADLINE
from autonat.proto.types import Transport

TYPE_CHECKING = False
if TYPE_CHECKING:
    from autonat.aio.pinhole import PinholeChoice, PinholeProbe, PinholeSession
    from autonat.proto import igd

PROTOCOLS = ("auto", "pcp", "natpmp", "upnp")
PINHOLE_PROTOCOLS = ("auto", "pcp", "upnp")  # NAT-PMP is IPv4 only (RFC 6886 §1)
F = TypeVar("F", bound=Callable[..., Any])


def ipv6_options(function: F) -> F:
    """--ipv6-gateway and --ipv6-address, for the commands that talk to the IPv6 router."""
    decorators = [
        click.option(
            "--ipv6-gateway", metavar="IP6", help="IPv6 router (default: the IPv6 default route's; fe80::1%eth0)."
        ),
        click.option(
            "--ipv6-address",
            metavar="IP6",
            help="Which of this host's IPv6 addresses pinholes are for (default: its stable one).",
        ),
    ]
    return functools.reduce(lambda f, decorate: decorate(f), reversed(decorators), function)


def _pinhole_choice(text: str) -> PinholeChoice:
    if text not in PINHOLE_PROTOCOLS:
        raise click.BadParameter(f"IPv6 pinholes are made with pcp or upnp (NAT-PMP is IPv4 only), not {text}")
    return text  # type: ignore[return-value]


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
    if result.ipv6 is not None:
        _print_pinhole_probe(result.ipv6)
    elif result.ipv6_error is not None:
        click.echo(f"IPv6:           none ({result.ipv6_error})")


def _print_pinhole_probe(probe: PinholeProbe) -> None:
    data = probe.to_dict()
    click.echo(f"IPv6 gateway:   {data['gateway']} (via {data['interface'] or '?'})")
    kernel = data["kernel_source"]
    note = f" (the kernel would send from {kernel})" if kernel and kernel != data["local_address"] else ""
    click.echo(f"IPv6 address:   {data['local_address']}{note}")
    click.echo(f"IPv6 pinholes:  {data['selected'] or 'none'}")
    for name, status in probe.protocols.items():
        mark = "yes" if status.available else "no "
        timing = f" [{status.elapsed_ms:.1f} ms]" if status.elapsed_ms is not None else ""
        click.echo(f"  {name:<7} {mark} {status.reason}{timing}")
        if "root_url" in status.details:
            click.echo(f"          {status.details['friendly_name']} at {status.details['root_url']}")


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
@click.option(
    "--no-ipv6",
    is_flag=True,
    help="Leave the IPv6 router (pinholes) out of the probe (it is, too, when --gateway names the router"
    " and --ipv6-gateway does not).",
)
@ipv6_options
def probe(
    gateway: str | None,
    interface: str | None,
    timeout: float,
    root_url: str | None,
    as_json: bool,
    protocol: str,
    stun: str | None,
    no_ipv6: bool,
    ipv6_gateway: str | None,
    ipv6_address: str | None,
    trace_list: str | None,
) -> None:
    """Find the router, ask every protocol at once, report what works and the external address; the
    IPv6 router's pinhole protocols (PCP, UPnP IGD:2) are asked in the same burst."""
    start_trace(trace_list)
    from autonat.aio.stun import parse_stun_target, stun_binding

    target = None
    if stun is not None:
        try:
            target = parse_stun_target(stun)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--stun") from None

    async def go() -> tuple[ProbeResult, dict[str, Any] | None]:
        async with await RouterSession.open(
            gateway,
            interface,
            timeout,
            root_url,
            # A router named with --gateway pins the probe to it: the IPv6 router is then asked only when
            # named too (--ipv6-gateway), never found behind the user's back on another route.
            ipv6=not no_ipv6 and (gateway is None or ipv6_gateway is not None),
            ipv6_gateway=ipv6_gateway,
            ipv6_local_address=ipv6_address,
        ) as router:
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
@family_option
@ipv6_options
@router_options
def map_add(
    port: int,
    transport: str,
    external_port: int,
    lifetime: int,
    protocol: str,
    family: str,
    ipv6_gateway: str | None,
    ipv6_address: str | None,
    gateway: str | None,
    interface: str | None,
    timeout: float,
    root_url: str | None,
    as_json: bool,
    trace_list: str | None,
) -> None:
    """Map PORT (udp or tcp) of this host on the router and print the external address and port; with
    --family 6, open an IPv6 firewall pinhole to PORT of this host's stable address instead."""
    start_trace(trace_list)
    request = MappingRequest(Transport.parse(transport), port, external_port, lifetime)
    if family == "6":
        choice = _pinhole_choice(protocol)

        async def add_pinhole() -> Mapping:
            async with await _open_pinholes(ipv6_gateway, interface, timeout, root_url, ipv6_address) as router:
                return await router.add(request, choice)

        pinhole = run_async(add_pinhole())
        if as_json:
            print_json(pinhole.to_dict())
        else:
            click.echo(f"[{pinhole.external_ip}]:{pinhole.external_port}")
            click.echo(f"opened {pinhole.describe()}")
        return

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
@family_option
@ipv6_options
@click.option(
    "--unique-id", type=click.IntRange(0, 65535), help="UPnP: the pinhole's UniqueID (as `map add --family 6` printed)."
)
@router_options
def map_del(
    port: int,
    transport: str,
    protocol: str,
    family: str,
    ipv6_gateway: str | None,
    ipv6_address: str | None,
    unique_id: int | None,
    gateway: str | None,
    interface: str | None,
    timeout: float,
    root_url: str | None,
    as_json: bool,
    trace_list: str | None,
) -> None:
    """Delete this host's mapping of PORT (udp or tcp); --family 6, its IPv6 pinhole. Deleting a mapping
    that is not there succeeds."""
    start_trace(trace_list)
    parsed = Transport.parse(transport)

    async def go() -> str:
        async with await RouterSession.open(gateway, interface, timeout, root_url) as router:
            return await router.delete(parsed, port, _choice(protocol))

    async def delete_pinhole() -> str:
        choice = _pinhole_choice(protocol)
        async with await _open_pinholes(ipv6_gateway, interface, timeout, root_url, ipv6_address) as router:
            return await router.delete(parsed, port, choice, unique_id)

    used = run_async(delete_pinhole() if family == "6" else go())
    if as_json:
        print_json(
            {"protocol": used, "transport": str(parsed), "internal_port": port, "deleted": True, "family": int(family)}
        )
    else:
        click.echo(f"deleted {parsed} {port}{' pinhole' if family == '6' else ''} via {used}")


async def _open_pinholes(
    ipv6_gateway: str | None, interface: str | None, timeout: float, root_url: str | None, ipv6_address: str | None
) -> PinholeSession:
    """A PinholeSession (`root_url` is then the IGD's IPv6 root description URL), imported on use."""
    from autonat.aio.pinhole import PinholeSession

    return await PinholeSession.open(ipv6_gateway, interface, timeout, root_url, local_address=ipv6_address)


@map_group.command(name="list")
@family_option
@click.option(
    "--journal",
    "journal_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="--family 6: the daemon's journal (default: the state directory's journal.sqlite).",
)
@ipv6_options
@router_options
def map_list(
    family: str,
    journal_path: Path | None,
    ipv6_gateway: str | None,
    ipv6_address: str | None,
    gateway: str | None,
    interface: str | None,
    timeout: float,
    root_url: str | None,
    as_json: bool,
    trace_list: str | None,
) -> None:
    """List the router's whole UPnP mapping table, ours or not (like `upnpc -l`); --family 6, our IPv6
    pinholes."""
    start_trace(trace_list)
    if family == "6":
        _list_pinholes(journal_path, ipv6_gateway, interface, timeout, root_url, ipv6_address, as_json)
        return

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


def _list_pinholes(
    journal_path: Path | None,
    ipv6_gateway: str | None,
    interface: str | None,
    timeout: float,
    root_url: str | None,
    ipv6_address: str | None,
    as_json: bool,
) -> None:
    """IGD:2 has no action that lists pinholes (WANIPv6FirewallControl:1 §2.4), and PCP none at all: the
    pinholes listed are the ones the daemon's journal holds, each UPnP one checked on the router by its
    UniqueID (CheckPinholeWorking: "present" or "gone"); a PCP pinhole cannot be checked without
    renewing it ("unchecked")."""
    from autonat.daemon.config import default_journal_path
    from autonat.engine.journal import Journal

    path = journal_path or default_journal_path()
    entries = []
    if path.exists():
        with Journal(path) as journal:
            entries = [entry for entry in journal.entries() if entry.family == 6]

    async def go() -> list[str]:
        states = ["unchecked"] * len(entries)
        if not any(entry.protocol == "upnp" and entry.unique_id is not None for entry in entries):
            return states
        async with await _open_pinholes(ipv6_gateway, interface, timeout, root_url, ipv6_address) as router:
            for index, entry in enumerate(entries):
                if entry.protocol == "upnp" and entry.unique_id is not None:
                    try:
                        states[index] = "present" if await router.upnp.check(entry.unique_id) else "gone"
                    except AutonatError as exc:
                        states[index] = f"unknown ({exc})"
        return states

    states = run_async(go())
    rows = [
        {
            "family": 6,
            "transport": str(entry.transport),
            "internal_address": entry.internal_address,
            "internal_port": entry.internal_port,
            "protocol": entry.protocol,
            "unique_id": entry.unique_id,
            "owner": entry.owner,
            "sticky": entry.sticky,
            "desired": entry.desired,
            "lease": entry.lease,
            "gateway": entry.gateway,
            "on_router": state,
        }
        for entry, state in zip(entries, states, strict=True)
    ]
    if as_json:
        print_json(rows)
        return
    for row in rows:
        unique_id = "" if row["unique_id"] is None else f" UniqueID {row['unique_id']}"
        click.echo(
            f"  {row['transport']:<3} [{row['internal_address']}]:{row['internal_port']:<5} via {row['protocol']}"
            f"{unique_id}  {row['on_router']}  owner {row['owner']}{'' if row['desired'] else ' (being removed)'}"
        )
    click.echo(f"{len(rows)} pinhole{'s' if len(rows) != 1 else ''} in {path}")
