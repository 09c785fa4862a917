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
from pathlib import Path
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
        if not status.available:
            # Why each IGD candidate was discarded: the one-line reason names only the first few.
            for candidate in status.details.get("candidates", []):
                where = f"{candidate['location']} from {candidate['responder']}"
                click.echo(f"          {candidate['outcome']}: {where}: {candidate['reason']}")
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
) -> None:
    """Find the router, ask every protocol at once, report what works and the external address."""
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


# --- the daemon and its control verbs ---------------------------------------------------------------


def socket_option(function: F) -> F:
    from autonat.daemon.config import default_socket_path

    return click.option(
        "--socket",
        "socket_path",
        type=click.Path(path_type=Path),
        default=default_socket_path,
        envvar="AUTONAT_SOCKET",
        show_default="/run/autonat/control.sock for root",
        help="The daemon's control socket.",
    )(function)


def control_call(socket_path: Path, request: dict[str, Any]) -> Any:
    from autonat.daemon.control import ControlClient

    async def go() -> Any:
        async with ControlClient(socket_path) as client:
            return await client.call(request)

    return run_async(go())


NAT_TYPES = {"pcp": "PCP", "natpmp": "PMP", "upnp": "UPNP"}


FREESWITCH_PROTO_NUM = {"udp": 0, "tcp": 1}  # switch_nat.c numbers its protocols this way
# `sofia status profile`'s labels for the fields of autonat.advertise.ProfileStatus (--json uses the fields).
SOFIA_LABELS = {
    "name": "Name",
    "auto_nat": "Auto-NAT",
    "rtp_ip": "RTP-IP",
    "ext_rtp_ip": "Ext-RTP-IP",
    "sip_ip": "SIP-IP",
    "ext_sip_ip": "Ext-SIP-IP",
    "url": "URL",
    "bind_url": "BIND-URL",
    "tls_url": "TLS-URL",
    "tls_bind_url": "TLS-BIND-URL",
    "local_network_acl": "Local-Network-ACL",
    "ext_sip_ip_source": "Ext-SIP-IP-Source",
    "ext_rtp_ip_source": "Ext-RTP-IP-Source",
}


def _print_nat_status(status: dict[str, Any]) -> None:
    """FreeSWITCH's `nat_map status` layout, so its users' scripts keep working."""
    if status["nat"] == "disabled":
        click.echo("NAT is disabled.")
        return
    nat_type = NAT_TYPES.get(status["protocol"] or "", "NONE")
    if status["state"] != "ready":
        nat_type += f" ({status['state']})"
    click.echo(f"Nat Type: {nat_type}, ExtIP: {status['external_ip'] or ''}")
    click.echo(f"NAT port mapping {'enabled' if status['mapping_enabled'] else 'disabled'}.")
    click.echo("port,proto,proto_num,sticky")
    for row in status["mappings"]:
        proto_num = FREESWITCH_PROTO_NUM.get(row["proto"], -1)
        click.echo(f"{row['port']},{row['proto']},{proto_num},{int(row['sticky'])}")
    click.echo(f"\n{len(status['mappings'])} total.")


@cli.group(name="nat_map")
def nat_map() -> None:
    """FreeSWITCH's nat_map verbs, sent to the running daemon."""


@nat_map.command(name="status")
@socket_option
@click.option("--json", "as_json", is_flag=True, help="Everything, as JSON (external ports, leases, errors).")
def nat_map_status(socket_path: Path, as_json: bool) -> None:
    """Nat type, external IP and every mapping."""
    status = control_call(socket_path, {"cmd": "status"})
    if as_json:
        print_json(status)
    else:
        _print_nat_status(status)


@nat_map.command(name="add")
@click.argument("port", type=click.IntRange(1, 65535))
@transport_argument
@click.argument("sticky", required=False, type=click.Choice(["sticky"]))
@socket_option
@click.option("--json", "as_json", is_flag=True)
def nat_map_add(port: int, transport: str, sticky: str | None, socket_path: Path, as_json: bool) -> None:
    """Map PORT; `sticky` keeps it across daemon restarts. Prints the external address and port."""
    request = {"cmd": "add", "port": port, "proto": transport.lower(), "sticky": sticky is not None}
    mapping = control_call(socket_path, request)
    if as_json:
        print_json(mapping)
    elif mapping["state"] == "active":
        click.echo(f"{mapping['external_ip']}:{mapping['external_port']}")
    elif mapping["state"] == "pending":
        click.echo("pending: the router is not known yet; the mapping is made as soon as it is")
    else:
        click.echo(f"autonat: mapping failed: {mapping['last_error']} (the daemon keeps retrying)", err=True)
        sys.exit(5)


@nat_map.command(name="del")
@click.argument("port", type=click.IntRange(1, 65535))
@transport_argument
@socket_option
def nat_map_del(port: int, transport: str, socket_path: Path) -> None:
    """Remove a mapping from the router and from the daemon."""
    control_call(socket_path, {"cmd": "del", "port": port, "proto": transport.lower()})
    click.echo("deleted")


@nat_map.command(name="republish")
@socket_option
def nat_map_republish(socket_path: Path) -> None:
    """Send every mapping to the router again now."""
    status = control_call(socket_path, {"cmd": "republish"})
    click.echo(f"republished {len(status['mappings'])} mappings")


@nat_map.command(name="reinit")
@socket_option
def nat_map_reinit(socket_path: Path) -> None:
    """Rediscover the router and swap the result in, then re-make every mapping."""
    probe = control_call(socket_path, {"cmd": "reinit"})
    click.echo(f"Nat Type: {NAT_TYPES.get(probe['selected'] or '', 'NONE')}, ExtIP: {probe['external_ip'] or ''}")


@nat_map.command(name="mapping")
@click.argument("action", type=click.Choice(["enable", "disable"]))
@socket_option
def nat_map_mapping(action: str, socket_path: Path) -> None:
    """Enable or disable port mapping (disable removes our mappings from the router, keeps them wanted)."""
    control_call(socket_path, {"cmd": "mapping", "enable": action == "enable"})
    click.echo(f"NAT port mapping {action}d.")


@cli.command()
@socket_option
def events(socket_path: Path) -> None:
    """Stream the daemon's events as JSON lines (nat-add, nat-lost, external-address-change, ...)."""
    from autonat.daemon.control import ControlClient, ControlError

    async def go() -> None:
        async with ControlClient(socket_path) as client:
            await client.send({"cmd": "events"})
            first = await client.receive()
            if not first.get("ok"):
                raise ControlError(str(first.get("error")))
            while True:
                click.echo(json.dumps(await client.receive()))
                sys.stdout.flush()

    run_async(go())


@cli.group()
def profile() -> None:
    """SIP profiles of the running daemon (FreeSWITCH's sofia status profile)."""


PROFILE_RULE = "=" * 97


@profile.command(name="status")
@click.argument("name")
@socket_option
@click.option("--json", "as_json", is_flag=True)
def profile_status(name: str, socket_path: Path, as_json: bool) -> None:
    """Name, Auto-NAT, RTP-IP, Ext-RTP-IP, SIP-IP, Ext-SIP-IP, URL, BIND-URL ... of profile NAME."""
    status = control_call(socket_path, {"cmd": "profile", "name": name})
    if as_json:
        print_json(status)
        return
    click.echo(PROFILE_RULE)
    for key, value in status.items():
        if key in SOFIA_LABELS and key.startswith("tls_") and value is None:
            continue  # sofia shows the TLS lines only for a profile with TLS
        shown = value
        if isinstance(value, dict):
            shown = ", ".join(f"{k}={v['state'] if isinstance(v, dict) else v}" for k, v in value.items()) or "none"
        elif isinstance(value, bool):
            shown = "true" if value else "false"
        elif value is None:
            shown = "none" if key == "local_network_acl" else ""
        click.echo(f"{SOFIA_LABELS.get(key, key):<24}{shown}")
    click.echo(PROFILE_RULE)


@cli.command()
@socket_option
@click.option("--json", "as_json", is_flag=True)
def calls(socket_path: Path, as_json: bool) -> None:
    """Live calls of the daemon's SIP service, with their legs and RTP ports (local and mapped)."""
    result = control_call(socket_path, {"cmd": "calls"})
    if as_json:
        print_json(result)
        return
    click.echo("id,profile,kind,number,state,duration,peer,rtp_port,advertised,mapped")
    for call in result:
        for leg in call["legs"]:
            click.echo(
                f"{call['id']},{call['profile']},{call['kind']},{call['number']},{call['state']},{call['duration']},"
                f"{leg['peer']},{leg['rtp_port']},{leg['advertised']},{str(leg['mapped']).lower()}"
            )
    click.echo(f"\n{len(result)} total.")


@cli.command()
@click.argument("ip")
@click.argument("list_name", metavar="LIST")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), help="For its [[acl]] lists.")
@click.option("--explain", is_flag=True, help="Also say which node decided.")
def acl(ip: str, list_name: str, config_path: Path | None, explain: bool) -> None:
    """Is IP allowed by ACL list LIST? Prints true or false (FreeSWITCH's `acl` command)."""
    from autonat.acl import AclSet
    from autonat.aio.interfaces import host_networks
    from autonat.daemon.config import load_config

    try:
        lists = load_config(config_path).acls if config_path else ()
        acls = AclSet(lists, host_networks())
        verdict = acls.explain(ip, list_name) if explain else None
        allowed = acls.lookup(ip, list_name)
    except AutonatError as exc:
        for line in str(exc).splitlines():
            click.echo(f"autonat: {line}", err=True)
        sys.exit(exc.exit_code)
    click.echo("true" if allowed else "false")
    if verdict is not None:
        click.echo(verdict.describe())


def _register() -> None:
    from autonat.cli.daemon import COMMANDS
    from autonat.lab.cli import lab

    cli.add_command(lab)
    for command in COMMANDS:
        cli.add_command(command)


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
