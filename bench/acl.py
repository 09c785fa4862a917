"""ACL lookups per second on one core, against the target of 1,000,000/s (a SIP server asks per request).

Realistic lists: `localnet.auto` of a host with three interfaces (LAN, VPN, IPv6 LAN), `nat.auto` of
the same host, and a user list of 20 nodes of both families. Each case is timed for at least a second:
address text (the parse cache warm, as for peers that keep talking to us) and parsed addresses, hits
and misses, IPv4 and IPv6. Two informational cases show the costs the target does not cover: text
never seen before (every lookup parses) and an `AclList.lookup` bypassing the registry. No root, no
network.

    .venv/bin/python bench/acl.py [--min-seconds 1.0] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface, ip_address
from typing import Any

from autonat.acl import AclList, AclSet

TARGET = 1_000_000
BATCH = 1000  # addresses per timed pass of the informational cases

INTERFACES: list[tuple[str, IPv4Interface | IPv6Interface]] = [
    ("eth0", IPv4Interface("192.168.1.10/24")),
    ("wg0", IPv4Interface("10.8.0.2/24")),
    ("eth0", IPv6Interface("2001:db8:1::10/64")),
]

USER_LIST = AclList.from_config(
    "sip-trunks",
    "deny",
    [
        ("allow", "203.0.113.0/24"),
        ("deny", "203.0.113.128/25"),
        ("allow", "203.0.113.200/32,203.0.113.201/32"),
        ("allow", "198.51.100.0/24"),
        ("deny", "198.51.100.7"),
        ("allow", "192.0.2.0/255.255.255.128"),
        ("allow", "185.40.0.0/16"),
        ("deny", "185.40.1.0/24"),
        ("allow", "185.40.1.16/28"),
        ("allow", "91.121.0.0/16"),
        ("allow", "62.210.0.0/16"),
        ("deny", "62.210.16.0/20"),
        ("allow", "2001:db8:100::/48"),
        ("deny", "2001:db8:100:bad::/64"),
        ("allow", "2001:db8:200::/40"),
        ("allow", "2a01:4f8::/32"),
        ("deny", "2a01:4f8:0:1::/64"),
        ("allow", "2a00:1450::/32"),
    ],
)


def spread(prefix: str, count: int) -> list[str]:
    """`count` distinct addresses under an IPv4 /16-ish or IPv6 prefix text, cycling the last bits."""
    base = int(ip_address(prefix))
    return [str(ip_address(base + index)) for index in range(count)]


def measure(lookup: Callable[..., object], items: Sequence[Any], list_name: str | None, min_seconds: float) -> float:
    """Lookups per second over at least `min_seconds`, in passes over `items`, called as a server would:
    `acls.lookup(ip, list_name)`, or `lookup(ip)` when `list_name` is None."""
    done = 0
    elapsed = 0.0
    for warm_up in (True, False):  # the first pass fills the parse cache, as talking peers do
        started = time.perf_counter()
        while elapsed < min_seconds or warm_up:
            if list_name is None:
                for item in items:
                    lookup(item)
            else:
                for item in items:
                    lookup(item, list_name)
            if warm_up:
                break
            done += len(items)
            elapsed = time.perf_counter() - started
    return done / elapsed


Case = tuple[str, Callable[..., object], list[Any], str | None]


def cases(acls: AclSet) -> list[Case]:
    lookup = acls.lookup
    v4_hit = spread("192.168.1.20", 200)
    v4_miss = spread("8.8.0.1", 200)
    v6_hit = spread("2001:db8:1::100", 200)
    v6_miss = spread("2a03:2880::1", 200)
    user_mix = [*spread("203.0.113.1", 250), *spread("185.40.1.1", 250), *spread("2a01:4f8::1", 250)]
    user_mix += spread("9.9.9.1", 250)

    def parsed(texts: list[str]) -> list[Any]:
        return [ip_address(text) for text in texts]

    mapped = [f"::ffff:{text}" for text in v4_hit]
    return [
        ("localnet.auto  IPv4 hit   text", lookup, list(v4_hit), "localnet.auto"),
        ("localnet.auto  IPv4 miss  text", lookup, list(v4_miss), "localnet.auto"),
        ("localnet.auto  IPv6 hit   text", lookup, list(v6_hit), "localnet.auto"),
        ("localnet.auto  IPv6 miss  text", lookup, list(v6_miss), "localnet.auto"),
        ("localnet.auto  IPv4 hit   parsed", lookup, parsed(v4_hit), "localnet.auto"),
        ("localnet.auto  IPv4 miss  parsed", lookup, parsed(v4_miss), "localnet.auto"),
        ("localnet.auto  IPv6 hit   parsed", lookup, parsed(v6_hit), "localnet.auto"),
        ("localnet.auto  IPv6 miss  parsed", lookup, parsed(v6_miss), "localnet.auto"),
        ("localnet.auto  v4-mapped  parsed", lookup, parsed(mapped), "localnet.auto"),
        ("nat.auto       IPv4 mix   text", lookup, [*v4_hit, *spread("10.1.2.3", 200), *v4_miss], "nat.auto"),
        ("sip-trunks(20) mix        text", lookup, list(user_mix), "sip-trunks"),
        ("sip-trunks(20) mix        parsed", lookup, parsed(user_mix), "sip-trunks"),
    ]


def informational(acls: AclSet) -> list[Case]:
    # 100,000 distinct texts: far more than the parse cache holds, so every lookup parses.
    unseen_v4 = [str(IPv4Address(0x0B000000 + index * 7)) for index in range(100_000)]
    unseen_v6 = [str(IPv6Address((0x2A01 << 112) + index * 7)) for index in range(100_000)]
    direct = acls.get("localnet.auto").lookup
    return [
        ("[info] localnet.auto  unseen IPv4 text", acls.lookup, unseen_v4, "localnet.auto"),
        ("[info] localnet.auto  unseen IPv6 text", acls.lookup, unseen_v6, "localnet.auto"),
        ("[info] AclList.lookup IPv4 parsed", direct, [IPv4Address("192.168.1.20")] * BATCH, None),
        ("[info] AclList.lookup IPv6 parsed", direct, [IPv6Address("2001:db8:1::20")] * BATCH, None),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    acls = AclSet([USER_LIST], INTERFACES)
    figures: dict[str, dict[str, float]] = {}
    for name, lookup, items, list_name in [*cases(acls), *informational(acls)]:
        rate = measure(lookup, items, list_name, args.min_seconds)
        figures[name] = {"lookups_per_s": round(rate), "ratio_to_target": round(rate / TARGET, 2)}
    if args.json:
        print(json.dumps({"target_per_s": TARGET, "figures": figures}, indent=2))
        return
    width = max(len(name) for name in figures) + 2
    print(f"{'case':<{width}} {'lookups/s':>12} {'x target':>9}")
    for name, figure in figures.items():
        print(f"{name:<{width}} {figure['lookups_per_s']:>12,.0f} {figure['ratio_to_target']:>9.2f}")
    required = [figure["ratio_to_target"] for name, figure in figures.items() if not name.startswith("[info]")]
    python = sys.version.split()[0]
    print(f"\nslowest required case: {min(required):.2f} x the {TARGET:,}/s target (one core, Python {python})")


if __name__ == "__main__":
    main()
