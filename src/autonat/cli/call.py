"""`autonat call URI`: the test call from our side, placed by the running daemon (control verb `call`).

The daemon's SIP service calls URI as a phone behind the NAT would, plays a known signal, measures the echo
and hangs up (autonat.sip.probecall); this module asks for it and shows the answer. `test_call` is the same
for other commands (the doctor): a blocking request, its result as a dict, a one-line `ControlCallError` when the
daemon cannot be asked or refuses.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from autonat.cli.control import socket_option
from autonat.cli.main import ControlCallError, ask_daemon, print_json
from autonat.sip.probecall import ANSWER_TIMEOUT, DEFAULT_SECONDS, DRAIN, MAX_SECONDS, MIN_SECONDS

# What the daemon may take beyond the call's own bound (answer timeout + seconds + drain): its BYE, the ports
# going back to the router, and the service's own bound for a stuck call (service.sip.PROBE_GRACE, 10 s).
REPLY_MARGIN = 20.0


def test_call(
    socket_path: Path, uri: str, profile: str | None = None, seconds: float = DEFAULT_SECONDS
) -> dict[str, Any]:
    """Ask the daemon at `socket_path` for a test call from `profile` (None: its first SIP profile) to `uri`
    with `seconds` of signal, and return the result (autonat.sip.probecall.report: "ok", "verdict", the
    figures). A call that fails is a result ("ok": false), not an error. ControlCallError, one line, when the daemon
    cannot be asked or refuses (none running, no SIP profile, a malformed URI, a test call already running).
    Blocking, and bounded: the call's own limit plus REPLY_MARGIN."""
    request: dict[str, Any] = {"cmd": "call", "uri": uri, "seconds": seconds}
    if profile is not None:
        request["profile"] = profile
    result = ask_daemon(socket_path, request, ANSWER_TIMEOUT + seconds + DRAIN + REPLY_MARGIN, "the call")
    if not isinstance(result, dict):
        raise ControlCallError("the daemon's answer to the call is not an object")
    return result


test_call.__test__ = False  # type: ignore[attr-defined]  # a function named test_*, not a test for pytest


def _ms(value: object) -> str:
    return f"{value:.2f} ms" if isinstance(value, int | float) else "-"


def render(result: dict[str, Any]) -> list[str]:
    """The result for a person: the verdict, then one line each for the call, the packets, the round trip,
    the jitter and the media addresses."""
    lines = [str(result.get("verdict"))]
    answered = f"answered {result.get('status')} {result.get('phrase')}".rstrip()
    if result.get("answered"):
        duration = result.get("duration_s")
        up = f"{duration:.1f} s" if isinstance(duration, int | float) else "-"
        answered += f" in {_ms(result.get('setup_ms'))}, {result.get('codec')}, up {up}"
    elif result.get("status") is not None:
        answered = f"refused {result.get('status')} {result.get('phrase')}".rstrip()
    else:
        answered = "no final answer"
    lines.append(
        f"call:    {result.get('uri')} from profile {result.get('profile')}, {answered} ({result.get('reason')})"
    )
    rtp = result.get("rtp")
    if isinstance(rtp, dict):
        loss = rtp.get("loss_percent")
        lines.append(
            f"rtp:     sent {rtp.get('sent')}, received back {rtp.get('received')}, lost {rtp.get('lost')}"
            + ("" if loss is None else f" ({loss:g} %)")
            + f"; {rtp.get('duplicates')} duplicated, {rtp.get('reordered')} reordered, {rtp.get('foreign')} foreign"
        )
    rtt = result.get("rtt_ms")
    if isinstance(rtt, dict):
        lines.append(f"rtt:     min {_ms(rtt.get('min'))}, avg {_ms(rtt.get('avg'))}, max {_ms(rtt.get('max'))}")
        lines.append(f"jitter:  {_ms(result.get('jitter_ms'))} (RFC 3550 interarrival jitter of the echo)")
    media = result.get("media")
    if isinstance(media, dict) and media.get("local"):
        mapping = media.get("mapping")
        where = "the router mapping" if media.get("through_mapping") else f"router mapping {mapping or 'none'}"
        echo = ", ".join(media.get("echo_from") or []) or "nowhere"
        lines.append(
            f"media:   our RTP {media.get('local')}, our SDP gave {media.get('advertised')} ({where}); "
            f"sent to {media.get('remote') or '-'}, echo from {echo}"
        )
    return lines


@click.command()
@click.argument("uri")
@click.option("--profile", help="The SIP profile to call from (default: the daemon's first).")
@click.option(
    "--seconds",
    type=click.IntRange(MIN_SECONDS, MAX_SECONDS),
    default=DEFAULT_SECONDS,
    show_default=True,
    help="How long the signal plays once answered.",
)
@socket_option
@click.option("--json", "as_json", is_flag=True, help="The verdict and the figures as one JSON object.")
def call(uri: str, profile: str | None, seconds: int, socket_path: Path, as_json: bool) -> None:
    """Test call from the daemon to URI (an echo): does audio get through the NAT both ways? Exit 0 when it
    does, 1 when not.

    The daemon calls URI (e.g. sip:9196@203.0.113.50:5060) as a phone behind the NAT would, with the address
    and mapped RTP ports its profile advertises, plays a known signal for --seconds and measures what comes
    back: packets each way, round-trip time, loss, jitter, and whether the echo came in through the router
    mapping it advertised.
    """
    try:
        result = test_call(socket_path, uri, profile, seconds)
    except ControlCallError as exc:
        click.echo(f"autonat: {exc}", err=True)
        sys.exit(exc.exit_code)
    if as_json:
        print_json(result)
    else:
        click.echo("\n".join(render(result)))
    if not result.get("ok"):
        click.echo(f"autonat: test call failed: {str(result.get('verdict')).removeprefix('fail: ')}", err=True)
        sys.exit(1)
