"""The daemon's control verbs: `autonat nat_map ...`, `events`, `profile status`, `calls`."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from autonat.cli.main import control_call, default_socket_path, family_option, print_json, run_async, transport_argument

F = TypeVar("F", bound=Callable[..., Any])


def socket_option(function: F) -> F:
    return click.option(
        "--socket",
        "socket_path",
        type=click.Path(path_type=Path),
        default=default_socket_path,
        envvar="AUTONAT_SOCKET",
        show_default="/run/autonat/control.sock for root",
        help="The daemon's control socket.",
    )(function)


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
    mappings = [row for row in status["mappings"] if row.get("family", 4) == 4]
    for row in mappings:
        proto_num = FREESWITCH_PROTO_NUM.get(row["proto"], -1)
        click.echo(f"{row['port']},{row['proto']},{proto_num},{int(row['sticky'])}")
    click.echo(f"\n{len(mappings)} total.")
    ipv6 = status.get("ipv6")
    if ipv6 is None:
        return
    # Below FreeSWITCH's layout (which has no IPv6): our own, so its scripts still read the lines above.
    pinholes = [row for row in status["mappings"] if row.get("family") == 6]
    where = f"{ipv6['local_address'] or '?'} via {ipv6['gateway'] or '?'}"
    click.echo(f"\nIPv6 pinholes ({ipv6['protocol'] or ipv6['state']}, {where}):")
    click.echo("port,proto,sticky,state,protocol,unique_id")
    for row in pinholes:
        unique_id = "" if row.get("unique_id") is None else row["unique_id"]
        click.echo(
            f"{row['port']},{row['proto']},{int(row['sticky'])},{row['state']},{row['protocol'] or ''},{unique_id}"
        )
    click.echo(f"\n{len(pinholes)} pinhole{'s' if len(pinholes) != 1 else ''}.")


@click.group(name="nat_map")
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
@family_option
@socket_option
@click.option("--json", "as_json", is_flag=True)
def nat_map_add(port: int, transport: str, sticky: str | None, family: str, socket_path: Path, as_json: bool) -> None:
    """Map PORT; `sticky` keeps it across daemon restarts. Prints the external address and port (with
    --family 6, the IPv6 pinhole's own address and port)."""
    request = {"cmd": "add", "port": port, "proto": transport.lower(), "sticky": sticky is not None}
    if family == "6":
        request["family"] = 6
    mapping = control_call(socket_path, request)
    if as_json:
        print_json(mapping)
    elif mapping["state"] == "active" and mapping.get("family") == 6:
        click.echo(f"[{mapping['external_ip']}]:{mapping['external_port']}")
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
@family_option
@socket_option
def nat_map_del(port: int, transport: str, family: str, socket_path: Path) -> None:
    """Remove a mapping (--family 6: a pinhole) from the router and from the daemon."""
    request: dict[str, Any] = {"cmd": "del", "port": port, "proto": transport.lower()}
    if family == "6":
        request["family"] = 6
    control_call(socket_path, request)
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


@click.command()
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


@click.group()
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


@click.command()
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
