"""SDP and SIP header rewriting speed: operations per second on a realistic audio+video offer.

Standalone: no root, no network, no lab. Each operation runs in batches for `--seconds`, five times; the
median of the five rates is printed (the spread shows how noisy the machine is).

    .venv/bin/python bench/sdp.py [--seconds 1.0] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from ipaddress import IPv4Address

from autonat.proto.sdp import (
    add_received_rport,
    parse_sdp_addresses,
    rewrite_contact,
    rewrite_sdp,
    rewrite_via_sent_by,
)

PUBLIC = IPv4Address("203.0.113.1")

# A baresip-style offer: audio (4 codecs) + video (2 codecs), RTCP on its own ports (RFC 3605), ICE
# candidates, CRLF endings. 36 lines, about 1.1 KB: the size of a typical desk-phone or softphone offer.
OFFER = "".join(
    f"{line}\r\n"
    for line in (
        "v=0",
        "o=- 1376373298 3217456287 IN IP4 192.168.77.10",
        "s=-",
        "c=IN IP4 192.168.77.10",
        "t=0 0",
        "a=tool:baresip 3.10.1",
        "a=ice-ufrag:d1Ew",
        "a=ice-pwd:MWu5b8yDpQ3cnRuPyaUtu9",
        "m=audio 10310 RTP/AVP 9 0 8 101",
        "b=AS:64",
        "a=rtpmap:9 G722/8000",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:8 PCMA/8000",
        "a=rtpmap:101 telephone-event/8000",
        "a=fmtp:101 0-15",
        "a=rtcp:10311 IN IP4 192.168.77.10",
        "a=sendrecv",
        "a=label:1",
        "a=rtcp-rsize",
        "a=ptime:20",
        "a=candidate:1 1 UDP 2113932031 192.168.77.10 10310 typ host",
        "a=candidate:1 2 UDP 2113932030 192.168.77.10 10311 typ host",
        "m=video 10312 RTP/AVP 96 97",
        "b=AS:1000",
        "a=rtpmap:96 H264/90000",
        "a=fmtp:96 packetization-mode=0;profile-level-id=42002a",
        "a=rtpmap:97 VP8/90000",
        "a=rtcp-fb:96 nack",
        "a=rtcp-fb:97 nack pli",
        "a=rtcp:10313 IN IP4 192.168.77.10",
        "a=sendrecv",
        "a=content:main",
        "a=label:2",
        "a=candidate:1 1 UDP 2113932031 192.168.77.10 10312 typ host",
        "a=candidate:1 2 UDP 2113932030 192.168.77.10 10313 typ host",
        "a=end-of-candidates",
    )
)
PORTS = {10310: 40310, 10312: 40312}
RTCP_PORTS = {10311: 40311, 10313: 40313}
VIA = "SIP/2.0/UDP 192.168.77.10:5060;branch=z9hG4bK776asdhds;rport"
CONTACT = '"Alice" <sip:alice@192.168.77.10:5060;transport=udp>;expires=3600;+sip.instance="<urn:uuid:00000000>"'

OPERATIONS: dict[str, Callable[[], object]] = {
    "rewrite_sdp (address + ports + rtcp)": lambda: rewrite_sdp(
        OFFER, address=PUBLIC, ports=PORTS, rtcp_ports=RTCP_PORTS
    ),
    "rewrite_sdp (address only)": lambda: rewrite_sdp(OFFER, address=PUBLIC),
    "parse_sdp_addresses": lambda: parse_sdp_addresses(OFFER),
    "rewrite_via_sent_by": lambda: rewrite_via_sent_by(VIA, "203.0.113.1", 5060),
    "add_received_rport": lambda: add_received_rport(VIA, PUBLIC, 40000),
    "rewrite_contact": lambda: rewrite_contact(CONTACT, "203.0.113.1", 5060),
}


def rate(action: Callable[[], object], seconds: float) -> float:
    """Operations per second over at least `seconds`, in batches so the clock is read rarely."""
    batch, done = 64, 0
    started = time.perf_counter()
    while True:
        for _ in range(batch):
            action()
        done += batch
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return done / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per run (5 runs per operation)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    # The output is checked once, so a fast wrong answer cannot pass for a result.
    rewritten = rewrite_sdp(OFFER, address=PUBLIC, ports=PORTS, rtcp_ports=RTCP_PORTS)
    assert rewritten.count("203.0.113.1") == 4 and "m=video 40312 " in rewritten and "a=rtcp:40313 " in rewritten
    assert len(OFFER.splitlines()) == len(rewritten.splitlines())

    figures: dict[str, dict[str, float]] = {}
    for name, action in OPERATIONS.items():
        action()  # warm-up: regex compilation, caches
        rates = [rate(action, args.seconds) for _ in range(5)]
        median = statistics.median(rates)
        figures[name] = {
            "ops_per_s": round(median),
            "us_per_op": round(1e6 / median, 2),
            "min_ops_per_s": round(min(rates)),
            "max_ops_per_s": round(max(rates)),
        }
    if args.json:
        print(json.dumps({"offer_bytes": len(OFFER), "offer_lines": len(OFFER.splitlines()), "figures": figures}))
        return
    print(f"offer: {len(OFFER)} bytes, {len(OFFER.splitlines())} lines (audio + video, rtcp, ICE)")
    width = max(len(name) for name in figures) + 2
    print(f"{'operation':<{width}} {'ops/s':>10} {'us/op':>8} {'min ops/s':>10} {'max ops/s':>10}")
    for name, figure in figures.items():
        print(
            f"{name:<{width}} {figure['ops_per_s']:>10,.0f} {figure['us_per_op']:>8.2f}"
            f" {figure['min_ops_per_s']:>10,.0f} {figure['max_ops_per_s']:>10,.0f}"
        )


if __name__ == "__main__":
    main()
