"""`autonat lab ...`: build, inspect and break the lab network from the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import click

from autonat.lab.errors import LabError
from autonat.lab.procs import log_tail
from autonat.lab.topology import HOSTS, LINKS, ROUTERS, Lab, LabStatus


class _LabGroup(click.Group):
    """Turns lab errors into one line on stderr and a non-zero exit (no traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LabError as exc:
            raise click.ClickException(str(exc)) from None
        except subprocess.TimeoutExpired as exc:
            raise click.ClickException(f"timed out after {exc.timeout:g} s: {exc.cmd}") from None
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise click.ClickException(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")) from None


def _lab(ctx: click.Context) -> Lab:
    obj = ctx.find_object(Lab)
    assert obj is not None
    return obj


def _print_status(st: LabStatus) -> None:
    if not st.exists:
        click.echo(f"lab {st.prefix}: not created")
        return
    state = "up" if st.up else "DEGRADED: " + "; ".join(st.problems)
    click.echo(f"lab {st.prefix}: {state} (double NAT: {'on' if st.double_nat else 'off'})")
    for host, ns in st.namespaces.items():
        here = "present" if st.present.get(host) else "MISSING"
        addrs = "  ".join(f"{ifn} {' '.join(a)}" for ifn, a in st.addresses.get(host, {}).items())
        click.echo(f"  {host:<8} {ns:<20} {here:<8} {addrs}")
    for d in st.daemons.values():
        pid = f"PID {d.pid}" if d.pid else "-"
        click.echo(f"  {d.name:<10} {pid:<10} {d.state:<8} in {d.namespace}  log {d.log}")
    click.echo(f"  root URL  {st.root_url}" + (f"  (router2: {st.root_url2})" if st.root_url2 else ""))
    click.echo(f"  WAN IP    {st.wan_ip}")
    faults = [f"loss {link} {pct}%" for link, pct in st.loss.items()]
    faults += [f"rules wiped on {r}" for r in st.rules_wiped]
    if faults:
        click.echo("  faults    " + ", ".join(faults))


@click.group(cls=_LabGroup)
@click.option(
    "--prefix",
    "-p",
    default="anl",
    show_default=True,
    envvar="AUTONAT_LAB_PREFIX",
    help="Name prefix of the lab's namespaces ({prefix}-lan, ...); labs with different prefixes coexist.",
)
@click.pass_context
def lab(ctx: click.Context, prefix: str) -> None:
    """A home network with a real router (miniupnpd: UPnP IGD, NAT-PMP, PCP) in network namespaces.

    Hosts: wan (203.0.113.100, STUN server), router (WAN 203.0.113.1, LAN 192.168.77.1), lan
    (192.168.77.10); with double NAT also router2 (192.168.77.2 / 192.168.88.1) and lan2 (192.168.88.10).
    Needs root. Try: autonat lab up && autonat lab exec lan -- natpmpc -g 192.168.77.1
    """
    ctx.obj = Lab(prefix)


@lab.command()
@click.option("--double-nat", is_flag=True, help="Also add router2 + lan2 behind the router.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.pass_context
def up(ctx: click.Context, double_nat: bool, as_json: bool) -> None:
    """Build the lab, or repair it; a healthy lab is left as it is."""
    st = _lab(ctx).up(double_nat=double_nat)
    if as_json:
        click.echo(json.dumps(st.to_dict(), indent=2))
    else:
        _print_status(st)


@lab.command()
@click.pass_context
def down(ctx: click.Context) -> None:
    """Remove the lab: stop its daemons, delete its namespaces and state. Fine if there is none."""
    lab_ = _lab(ctx)
    removed = lab_.down()
    click.echo(f"lab {lab_.prefix}: {'removed' if removed else 'nothing to remove'}")


@lab.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show namespaces, daemons, addresses and faults. Exit status 0 if the lab is up, 1 if not."""
    st = _lab(ctx).status()
    if as_json:
        click.echo(json.dumps(st.to_dict(), indent=2))
    else:
        _print_status(st)
    ctx.exit(0 if st.up else 1)


@lab.command("exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("host", type=click.Choice(HOSTS))
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def exec_(ctx: click.Context, host: str, command: tuple[str, ...]) -> None:
    """Run COMMAND in HOST's namespace; its exit status is passed through.

    Example: autonat lab exec lan -- upnpc -u http://192.168.77.1:5000/rootDesc.xml -s
    """
    argv = list(command[1:] if command[:1] == ("--",) else command)
    if not argv:
        raise click.UsageError("no command given (autonat lab exec HOST -- COMMAND...)")
    full = _lab(ctx).argv_in(host, argv)
    # Become the command (no wrapper process): signals sent to us reach it, and its exit status is ours.
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(full[0], full)  # noqa: S606 (an argv list, no shell: nothing is interpreted)
    except OSError as exc:
        raise LabError(f"cannot run {full[0]}: {exc.strerror}") from None


@lab.command()
@click.argument("daemon", type=click.Choice(["miniupnpd", "miniupnpd2", "stund"]), default="miniupnpd")
@click.option("-n", "--lines", default=20, show_default=True, help="How many lines.")
@click.pass_context
def logs(ctx: click.Context, daemon: str, lines: int) -> None:
    """Show the end of a lab daemon's log."""
    path = _lab(ctx).log_file(daemon)
    if not path.exists():
        raise LabError(f"no log {path} (is the lab up?)")
    for line in log_tail(str(path), lines).split(" | "):
        click.echo(line)


@lab.group(cls=_LabGroup)
def fault() -> None:
    """Break the lab on purpose (each switch returns within seconds)."""


_router_option = click.option(
    "--router", type=click.Choice(ROUTERS), default="router", show_default=True, help="Which router."
)


@fault.command("restart-router")
@_router_option
@click.pass_context
def restart_router(ctx: click.Context, router: str) -> None:
    """Kill miniupnpd and start it again (epoch resets; mappings come back from the lease file)."""
    click.echo(f"{router}: miniupnpd restarted, PID {_lab(ctx).restart_router(router)}")


@fault.command("stop-router")
@_router_option
@click.pass_context
def stop_router(ctx: click.Context, router: str) -> None:
    """Stop miniupnpd (existing mappings keep forwarding; nobody answers UPnP/NAT-PMP/PCP)."""
    _lab(ctx).stop_router(router)
    click.echo(f"{router}: miniupnpd stopped")


@fault.command("start-router")
@_router_option
@click.pass_context
def start_router(ctx: click.Context, router: str) -> None:
    """Start miniupnpd again (if it is not running)."""
    click.echo(f"{router}: miniupnpd running, PID {_lab(ctx).start_router(router)}")


@fault.command("wipe-rules")
@_router_option
@click.pass_context
def wipe_rules(ctx: click.Context, router: str) -> None:
    """Flush miniupnpd's nft chains silently: mappings still listed, no longer forwarded."""
    _lab(ctx).wipe_rules(router)
    click.echo(f"{router}: miniupnpd chains flushed (mappings still listed, not forwarded)")


@fault.command("reset-router")
@_router_option
@click.pass_context
def reset_router(ctx: click.Context, router: str) -> None:
    """Reload the whole firewall and restart miniupnpd without its lease file: all mappings gone."""
    click.echo(f"{router}: firewall reloaded, leases dropped, PID {_lab(ctx).reset_router(router)}")


@fault.command("set-wan-ip")
@click.argument("ip")
@click.pass_context
def set_wan_ip(ctx: click.Context, ip: str) -> None:
    """Change the router's WAN address (within 203.0.113.0/24), e.g. 203.0.113.2."""
    how = _lab(ctx).set_wan_ip(ip)
    click.echo(f"router: WAN address now {ip} (miniupnpd noticed by: {how})")


@fault.command()
@click.argument("percent", type=click.IntRange(0, 100))
@click.option("--link", type=click.Choice(LINKS), default="lan", show_default=True, help="Which link.")
@click.pass_context
def loss(ctx: click.Context, percent: int, link: str) -> None:
    """Random loss of PERCENT % each way on a link (0 clears)."""
    _lab(ctx).set_loss(percent, link)
    click.echo(f"link {link}: {percent}% loss each way" if percent else f"link {link}: no loss")


@fault.command("double-nat")
@click.argument("state", type=click.Choice(["on", "off"]))
@click.option("--stun", is_flag=True, help="Let router2 learn 203.0.113.1 by STUN (still cannot map).")
@click.pass_context
def double_nat(ctx: click.Context, state: str, stun: bool) -> None:
    """Add (on) or remove (off) router2 + lan2 behind the router."""
    _lab(ctx).set_double_nat(state == "on", stun=stun)
    click.echo(f"double NAT {state}")


@fault.command()
@click.pass_context
def clear(ctx: click.Context) -> None:
    """Undo all faults except double NAT (loss, WAN address, stopped or wiped routers)."""
    done = _lab(ctx).reset_faults()
    click.echo("; ".join(done) if done else "no faults")
