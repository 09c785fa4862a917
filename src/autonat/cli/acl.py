"""`autonat acl IP LIST`: FreeSWITCH's acl command against the config's lists and the host's own."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from autonat.errors import AutonatError


@click.command()
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
