"""Text of the files the lab feeds to nft and miniupnpd."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

# Names miniupnpd 2.3.1 (nftables backend) uses by default; also written explicitly into its config.
NFT_TABLE = "filter"
CHAIN_FORWARD = "miniupnpd"
CHAIN_PREROUTING = "prerouting_miniupnpd"
CHAIN_POSTROUTING = "postrouting_miniupnpd"
MINIUPNPD_CHAINS = (CHAIN_FORWARD, CHAIN_PREROUTING, CHAIN_POSTROUTING)

LOSS_TABLE = "autonat_loss"


def router_ruleset(*, wan_if: str, lan_if: str) -> str:
    """The router's whole firewall: `table inet filter`, replaced atomically when loaded with `nft -f`.

    The upstream miniupnpd layout (Debian's nft_init.sh is broken in 2.3.1): base chains forward /
    prerouting / postrouting jumping to the chains miniupnpd fills, forward policy drop, masquerade out
    of the WAN. `lan_if -> lan_if` is accepted because br_netfilter (loaded on these hosts) sends bridged
    frames through the forward hook too.

    IPv6 is routed, not NATed: the forward chain's policy drop + established/related keeps unsolicited
    inbound IPv6 out (a home router's firewall), miniupnpd's pinholes are accept rules in the same
    `miniupnpd` chain, and the masquerade is for IPv4 only (in a `table inet`, a plain `masquerade`
    would NAT IPv6 too: LAB-NOTES).
    """
    return f"""\
table inet {NFT_TABLE} {{
}}
delete table inet {NFT_TABLE}
table inet {NFT_TABLE} {{
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "{lan_if}" oifname "{wan_if}" accept
        iifname "{lan_if}" oifname "{lan_if}" accept
        jump {CHAIN_FORWARD}
    }}
    chain {CHAIN_FORWARD} {{
    }}
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        jump {CHAIN_PREROUTING}
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        jump {CHAIN_POSTROUTING}
        oifname "{wan_if}" meta nfproto ipv4 masquerade
    }}
    chain {CHAIN_PREROUTING} {{
    }}
    chain {CHAIN_POSTROUTING} {{
    }}
}}
"""


def flush_miniupnpd_chains() -> str:
    return "".join(f"flush chain inet {NFT_TABLE} {chain}\n" for chain in MINIUPNPD_CHAINS)


def _loss_chain(device: str) -> str:
    return "in_" + "".join(c if c.isalnum() else "_" for c in device)


def loss_rules(device: str, percent: int) -> str:
    """nft script setting random loss on packets received by `device` (0 removes the rule).

    A netdev ingress hook on the receiving side drops like a lossy wire would (dropping in the sender's
    output path would make sendto() fail with EPERM instead). There is no sch_netem in this kernel.
    """
    chain = _loss_chain(device)
    declare = (
        f"table netdev {LOSS_TABLE} {{\n"
        f"    chain {chain} {{\n"
        f'        type filter hook ingress device "{device}" priority -500; policy accept;\n'
        f"    }}\n"
        f"}}\n"
    )
    if percent <= 0:
        return declare + f"delete chain netdev {LOSS_TABLE} {chain}\n"
    return (
        declare
        + f"flush chain netdev {LOSS_TABLE} {chain}\n"
        + f"add rule netdev {LOSS_TABLE} {chain} numgen random mod 100 < {percent} counter drop\n"
    )


PCP_ONLY_CHAIN = "pcp_only"


def pcp_only_rules(device: str, enabled: bool) -> str:
    """nft script that makes the router answer PCP only: NAT-PMP requests (UDP to port 5351 whose first
    payload byte, the version, is 0; RFC 6886 §3.2 / RFC 6887 §9) arriving on `device` are dropped before
    miniupnpd sees them, while PCP (version 2) passes. miniupnpd 2.3.1 cannot switch NAT-PMP off alone
    (LAB-NOTES: one switch turns on both), and a PCP-only router is what exposes a client that only asks
    NAT-PMP for the external address."""
    declare = (
        f"table netdev {LOSS_TABLE} {{\n"
        f"    chain {PCP_ONLY_CHAIN} {{\n"
        f'        type filter hook ingress device "{device}" priority -400; policy accept;\n'
        f"    }}\n"
        f"}}\n"
    )
    if not enabled:
        return declare + f"delete chain netdev {LOSS_TABLE} {PCP_ONLY_CHAIN}\n"
    return (
        declare
        + f"flush chain netdev {LOSS_TABLE} {PCP_ONLY_CHAIN}\n"
        + f"add rule netdev {LOSS_TABLE} {PCP_ONLY_CHAIN} meta protocol ip udp dport 5351 @th,64,8 0 counter drop\n"
    )


@dataclass(frozen=True)
class MiniupnpdSettings:
    prefix: str
    router: str
    wan_if: str
    lan_if: str
    lan_net: str
    http_port: int
    lease_file: str
    stun_host: str | None
    stun_port: int
    notify_interval: int = 10
    ipv6: bool = False

    @property
    def uuid(self) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"autonat-lab:{self.prefix}:{self.router}"))


def miniupnpd_conf(s: MiniupnpdSettings) -> str:
    lines = [
        f"# autonat lab {s.prefix}: {s.router}. Written by autonat; removed by `autonat lab down`.",
        f"ext_ifname={s.wan_if}",
        f"listening_ip={s.lan_if}",
        f"http_port={s.http_port}",
        "enable_upnp=yes",
        # In 2.3.1 this one switch turns on NAT-PMP and PCP (enable_pcp_pmp is a fatal unknown option).
        "enable_natpmp=yes",
        "secure_mode=yes",
        "system_uptime=no",
        "min_lifetime=120",
        "max_lifetime=86400",
        f"notify_interval={s.notify_interval}",
        f"lease_file={s.lease_file}",
        f"uuid={s.uuid}",
        f"friendly_name=autonat lab {s.router} ({s.prefix})",
        # IPv6 (LAB-NOTES): ipv6_listening_ip left out, or the one dual-stack HTTP socket binds to it and
        # IPv4 UPnP is cut off; ext_ifname6 is the WAN side the pinholes open on.
        *(("ipv6_disable=no", f"ext_ifname6={s.wan_if}") if s.ipv6 else ("ipv6_disable=yes",)),
        f"upnp_table_name={NFT_TABLE}",
        f"upnp_nat_table_name={NFT_TABLE}",
        f"upnp_forward_chain={CHAIN_FORWARD}",
        f"upnp_nat_chain={CHAIN_PREROUTING}",
        f"upnp_nat_postrouting_chain={CHAIN_POSTROUTING}",
    ]
    if s.stun_host:
        # miniupnpd refuses to forward with a reserved WAN address (203.0.113.x counts) unless STUN
        # confirms it is reachable; ext_ip= with such an address is fatal.
        lines += ["ext_perform_stun=yes", f"ext_stun_host={s.stun_host}", f"ext_stun_port={s.stun_port}"]
    lines += [f"allow 1024-65535 {s.lan_net} 1024-65535", "deny 0-65535 0.0.0.0/0 0-65535"]
    return "\n".join(lines) + "\n"
