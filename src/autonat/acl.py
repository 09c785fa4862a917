"""FreeSWITCH-style ACL lists: "is this peer on our LAN?", asked for every SIP request.

A SIP profile advertises its local address to peers in `local-network-acl` and the external one to
everybody else. The lists and their answers are FreeSWITCH's (`switch_network_list_*` in switch_utils.c,
the `.auto` lists of `switch_load_network_lists` in switch_core.c), made exact:

- A list has a default (allow | deny) and ordered nodes, each `allow` or `deny` with a CIDR.
- Among the nodes whose network holds the address, the longest prefix decides; on equal prefix length
  the node defined first wins; no node holds it: the default. FreeSWITCH gets this by prepending each
  node (`switch_network_list_perform_add_cidr_token`) and keeping, while walking the list, every match
  whose prefix is at least as long as the best so far (`node->bits >= bits` in
  `switch_network_list_validate_ip6_port_token`): the node defined first is visited last.
- IPv4-mapped IPv6 addresses (::ffff:a.b.c.d) are looked up as IPv4, as `switch_check_network_list_ip`
  does; an IPv4 address never matches an IPv6 node, nor the reverse (`node->family` checks).

Speed: each list is compiled once into, per family, the sorted starts of the address intervals on
which its answer is constant, so a lookup is one C `bisect` over a few ints whatever the number of
nodes or prefix lengths (CIDR blocks nest or are disjoint, so the intervals are exact).
`bench/acl.py` measures it.

Nothing here does I/O: the host's interfaces come from autonat.aio.interfaces.host_networks; every
list builder is a pure function of them, so the
daemon recomputes the `.auto` lists with `AclSet.refresh` when the interfaces change.
"""

from __future__ import annotations

import difflib
import functools
import json
import socket
from bisect import bisect_right
from collections.abc import Iterable, Sequence, Set
from dataclasses import dataclass, field
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
    ip_address,
    ip_network,
)
from typing import Final
from xml.etree.ElementTree import Element, ParseError

import defusedxml.ElementTree
from defusedxml import DefusedXmlException

from autonat.addresses import NOT_PUBLIC_V4, NOT_PUBLIC_V6
from autonat.errors import AutonatError

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network
IPInterface = IPv4Interface | IPv6Interface

AUTO_SUFFIX: Final = ".auto"
MAX_ACL_CONF_SIZE: Final = 256 * 1024
_PARSE_CACHE_SIZE: Final = 16384  # bounded: peers' addresses come from the internet, one entry each
_QUOTE_LIMIT: Final = 64
_V4_MAPPED: Final = 0xFFFF  # the bits above the low 32 of ::ffff:a.b.c.d
_V4_MASK: Final = 0xFFFFFFFF
_FAMILY_V4: Final = 0
_FAMILY_V6: Final = 1

# One family's compiled answer: answers[i] holds from starts[i] up to starts[i + 1].
_Table = tuple[list[int], list[bool]]


class AclError(AutonatError):
    """A bad ACL list, node, acl.conf.xml or address, or an unknown list name; one line."""

    exit_code = 2


def _quote(text: str) -> str:
    """A user's text in double quotes, on one line and of bounded length, for error messages."""
    shown = text if len(text) <= _QUOTE_LIMIT else text[:_QUOTE_LIMIT] + "..."
    return json.dumps(shown)


@dataclass(frozen=True, slots=True)
class AclNode:
    """One `allow`/`deny` rule. An IPv6 network inside ::ffff:0:0/96 is stored as the IPv4 network it
    covers: addresses there are looked up as IPv4, so the IPv6 form could never match."""

    allow: bool
    network: IPNetwork

    def __post_init__(self) -> None:
        network = self.network
        if (
            isinstance(network, IPv6Network)
            and network.prefixlen >= 96
            and network.network_address.ipv4_mapped is not None
        ):
            mapped = IPv4Network((int(network.network_address) & _V4_MASK, network.prefixlen - 96))
            object.__setattr__(self, "network", mapped)
        elif not isinstance(network, IPv4Network | IPv6Network):
            raise TypeError(f"AclNode.network must be an IPv4Network or IPv6Network, not {type(network).__name__}")

    def __str__(self) -> str:
        return f"{'allow' if self.allow else 'deny'} {self.network}"


@dataclass(frozen=True, slots=True)
class AclVerdict:
    """Why a list answers what it does for one address: the deciding node, or None for the default."""

    address: IPAddress
    list_name: str
    allowed: bool
    node: AclNode | None
    node_number: int | None  # 1-based position of `node` in the list

    def describe(self) -> str:
        answer = "allow" if self.allowed else "deny"
        if self.node is None:
            return f"{self.address}: {answer} by {self.list_name} (no node matches: the list's default)"
        return f"{self.address}: {answer} by {self.list_name} (node {self.node_number}: {self.node})"


@dataclass(frozen=True, slots=True)
class AclList:
    """A named list: a default and ordered nodes, compiled at construction for fast lookups."""

    name: str
    default: bool  # True: allow
    nodes: tuple[AclNode, ...] = ()
    _tables: tuple[_Table, _Table] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_name(self.name)
        object.__setattr__(self, "nodes", tuple(self.nodes))
        if not isinstance(self.default, bool) or not all(isinstance(node, AclNode) for node in self.nodes):
            raise TypeError("AclList takes a bool default and AclNode nodes (AclList.from_config parses text)")
        tables = (_compile(self.nodes, 4, self.default), _compile(self.nodes, 6, self.default))
        object.__setattr__(self, "_tables", tables)

    @classmethod
    def from_config(cls, name: str, default: str, nodes: Sequence[tuple[str, str]]) -> AclList:
        """Build a list from config text: `default` is allow|deny, each node (allow|deny, "cidr[,cidr...]").

        A CIDR is `address/prefix`, a bare address (/32 or /128), or FreeSWITCH's host+mask form
        `192.168.1.0/255.255.255.0`; host bits are masked off as `switch_parse_cidr` does. The CIDRs of a
        comma list are defined left to right (`switch_network_list_add_cidr_token`).
        """
        return _build_list(name, default, [(f"node {number}", *node) for number, node in enumerate(nodes, 1)])

    def lookup(self, ip: str | IPAddress) -> bool:
        """True when the list allows `ip`. Raises AclError for a string that is not an IP address."""
        return _lookup(self._tables, ip)

    def explain(self, ip: str | IPAddress) -> AclVerdict:
        """The answer with the node that decides it, found by FreeSWITCH's own walk (slow; for humans)."""
        address = _parse_ip(ip)
        best: tuple[int, AclNode] | None = None
        for number, node in enumerate(self.nodes, 1):
            # Longest prefix wins; `>` keeps the first defined on a tie.
            if address in node.network and (best is None or node.network.prefixlen > best[1].network.prefixlen):
                best = (number, node)
        if best is None:
            return AclVerdict(address, self.name, self.default, None, None)
        return AclVerdict(address, self.name, best[1].allow, best[1], best[0])


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or not name.isprintable() or name != name.strip() or " " in name:
        raise AclError(f"bad ACL list name {_quote(str(name))}: it must be non-empty, without spaces")


def _parse_action(text: str, what: str) -> bool:
    word = text.strip().lower()
    if word == "allow":
        return True
    if word == "deny":
        return False
    raise ValueError(f'{what} must be "allow" or "deny", not {_quote(text)}')


def parse_cidr(text: str) -> IPNetwork:
    """One CIDR: `address/prefix`, a bare address, or `a.b.c.d/m.m.m.m`. Host bits are masked off."""
    address_text, slash, prefix_text = (part.strip() for part in text.strip().partition("/"))
    if not address_text:
        raise ValueError("empty CIDR")
    if "%" in address_text:
        raise ValueError(f"{_quote(address_text)} has a scope (%...), which a network cannot have")
    try:
        address = ip_address(address_text)
    except ValueError:
        raise ValueError(f"{_quote(address_text)} is not an IP address") from None
    prefix: int
    if not slash:
        prefix = address.max_prefixlen
    elif prefix_text.isascii() and prefix_text.isdigit():
        prefix = int(prefix_text)
        if prefix > address.max_prefixlen:
            raise ValueError(f"prefix length /{prefix_text} is over {address.max_prefixlen}")
    elif address.version == 4 and "." in prefix_text:
        try:
            mask = int(IPv4Address(prefix_text))
        except ValueError:
            raise ValueError(f"{_quote(prefix_text)} is not a netmask") from None
        prefix = mask.bit_count()
        if mask != (_V4_MASK << (32 - prefix)) & _V4_MASK:
            raise ValueError(f"netmask {prefix_text} is not contiguous")
    else:
        raise ValueError(f"{_quote(prefix_text)} is not a prefix length")
    return ip_network((address, prefix), strict=False)


def _build_list(name: str, default: str, nodes: Sequence[tuple[str, str, str]]) -> AclList:
    """Build from (label, action, cidrs) triples; every error is one line naming the list and the node."""
    _check_name(name)
    try:
        default_allow = _parse_action(default, "the default")
    except ValueError as exc:
        raise AclError(f"ACL list {_quote(name)}: {exc}") from None
    built: list[AclNode] = []
    for label, action, cidrs in nodes:
        try:
            allow = _parse_action(action, "the action")
            built.extend(AclNode(allow, parse_cidr(cidr)) for cidr in cidrs.split(","))
        except ValueError as exc:
            raise AclError(f"ACL list {_quote(name)} {label} ({action} {_quote(cidrs)}): {exc}") from None
    return AclList(name, default_allow, tuple(built))


def _compile(nodes: Sequence[AclNode], version: int, default: bool) -> _Table:
    """The interval table of one family: starts ascending from 0, with the answer from each start on."""
    bits = 32 if version == 4 else 128
    first: dict[tuple[int, int], bool] = {}
    for node in nodes:
        if node.network.version == version:
            # The same network again can never decide: the one defined first wins every tie.
            first.setdefault((int(node.network.network_address), node.network.prefixlen), node.allow)
    starts: list[int] = []
    answers: list[bool] = []

    def mark(position: int, answer: bool) -> None:
        if starts and starts[-1] == position:
            answers[-1] = answer  # events come in order: the last at a position holds from there
        else:
            starts.append(position)
            answers.append(answer)

    mark(0, default)
    # Outer networks before the ones they contain (same start, shorter prefix first); since CIDR blocks
    # nest or are disjoint, a stack of open blocks gives the answer at every boundary.
    open_blocks: list[tuple[int, bool]] = []  # (end, answer), innermost last
    for (start, prefix), allow in sorted(first.items()):
        while open_blocks and open_blocks[-1][0] <= start:
            end, _ = open_blocks.pop()
            mark(end, open_blocks[-1][1] if open_blocks else default)
        mark(start, allow)
        open_blocks.append((start + (1 << (bits - prefix)), allow))
    while open_blocks:
        end, _ = open_blocks.pop()
        mark(end, open_blocks[-1][1] if open_blocks else default)
    merged_starts: list[int] = []
    merged_answers: list[bool] = []
    for position, answer in zip(starts, answers, strict=True):
        if position >> bits:
            break  # the end of the address space
        if not merged_answers or merged_answers[-1] != answer:
            merged_starts.append(position)
            merged_answers.append(answer)
    return merged_starts, merged_answers


def _lookup(tables: tuple[_Table, _Table], ip: str | IPAddress) -> bool:
    if isinstance(ip, str):
        family, value = _parse_key(ip)
    elif isinstance(ip, IPv4Address):
        family, value = _FAMILY_V4, ip._ip  # type: ignore[attr-defined]  # int(ip) is a Python call
    elif isinstance(ip, IPv6Address):
        family, value = _FAMILY_V6, ip._ip  # type: ignore[attr-defined]
        if value >> 32 == _V4_MAPPED:
            family, value = _FAMILY_V4, value & _V4_MASK
    else:
        raise _not_an_address(ip)
    starts, answers = tables[family]
    return answers[bisect_right(starts, value) - 1]


@functools.lru_cache(maxsize=_PARSE_CACHE_SIZE)
def _parse_key(text: str) -> tuple[int, int]:
    """(family, integer) of an address literal, IPv4-mapped IPv6 as IPv4.

    Cached, and parsed with the C library's strict inet_pton first: `ipaddress` takes 5-8 us, which a
    flood of requests from addresses never seen before would otherwise pay on every one. Whatever
    inet_pton refuses (an IPv6 scope, a typo) goes to `ipaddress`, which decides.
    """
    try:
        if ":" not in text:
            return _FAMILY_V4, int.from_bytes(socket.inet_pton(socket.AF_INET, text))
        value = int.from_bytes(socket.inet_pton(socket.AF_INET6, text))
    except (OSError, ValueError):  # ValueError: a NUL or a lone surrogate in the text
        try:
            return _address_key(ip_address(text))
        except ValueError:
            raise AclError(f"{_quote(text)} is not an IP address") from None
    if value >> 32 == _V4_MAPPED:
        return _FAMILY_V4, value & _V4_MASK
    return _FAMILY_V6, value


def _address_key(address: object) -> tuple[int, int]:
    if isinstance(address, IPv4Address):
        return _FAMILY_V4, int(address)
    if isinstance(address, IPv6Address):
        value = int(address)
        if value >> 32 == _V4_MAPPED:
            return _FAMILY_V4, value & _V4_MASK
        return _FAMILY_V6, value
    raise _not_an_address(address)


def _not_an_address(value: object) -> TypeError:
    return TypeError(f"an ACL lookup needs an IP address or its text, not {type(value).__name__}")


def _parse_ip(ip: str | IPAddress) -> IPAddress:
    family, value = _parse_key(ip) if isinstance(ip, str) else _address_key(ip)
    return IPv4Address(value) if family == _FAMILY_V4 else IPv6Address(value)


# --- Built-in lists ---------------------------------------------------------------------------------

_RFC1918: Final = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
_RFC6598: Final = ("100.64.0.0/10",)
BUILTIN_NAMES: Final = (
    "rfc1918.auto",
    "rfc6598.auto",
    "loopback.auto",
    "localnet.auto",
    "nat.auto",
    "wan.auto",
    "wan_v4.auto",
    "wan_v6.auto",
    "any_v4.auto",
    "any_v6.auto",
)


def _static(name: str, default: bool, allow: bool, cidrs: Iterable[str], *, then: Iterable[AclNode] = ()) -> AclList:
    return AclList(name, default, (*(AclNode(allow, ip_network(cidr)) for cidr in cidrs), *then))


def _local_networks(interfaces: Iterable[tuple[str, IPInterface]]) -> list[IPNetwork]:
    """The networks of the host's interfaces, loopback excluded, each once, in the order given."""
    networks = (interface.network for _, interface in interfaces if not interface.ip.is_loopback)
    return list(dict.fromkeys(networks))


def localnet_auto(interfaces: Iterable[tuple[str, IPInterface]]) -> AclList:
    """Default deny, allow every interface's network. FreeSWITCH allows only the one network of the
    address it guessed (`switch_find_local_ip`); a host with a LAN and a VPN has two local networks."""
    return AclList("localnet.auto", False, tuple(AclNode(True, network) for network in _local_networks(interfaces)))


def nat_auto(interfaces: Iterable[tuple[str, IPInterface]]) -> AclList:
    """Default deny; allow private (RFC 1918) and shared (RFC 6598) space but deny our own networks: a
    peer in private space elsewhere is behind a NAT, one on our LAN is not. The denials come first, as in
    `switch_load_network_lists`, so that a LAN of exactly 10.0.0.0/8 still wins the tie."""
    denials = [AclNode(False, network) for network in _local_networks(interfaces)]
    return AclList("nat.auto", False, (*denials, *(AclNode(True, ip_network(c)) for c in (*_RFC1918, *_RFC6598))))


def builtin_lists(interfaces: Iterable[tuple[str, IPInterface]]) -> tuple[AclList, ...]:
    """Every `.auto` list, for a host with these interfaces (as `host_networks` returns them)."""
    interfaces = list(interfaces)
    # The ranges `autonat.addresses.is_public` refuses, so wan.auto agrees with it (FreeSWITCH's
    # wan.auto forgets loopback, multicast and reserved space).
    deny_v4 = [AclNode(False, network) for network in NOT_PUBLIC_V4]
    deny_v6 = [AclNode(False, network) for network in NOT_PUBLIC_V6]
    return (
        # FreeSWITCH 1.10 also allows fe80::/10 here; link-local is not RFC 1918 space (see localnet.auto).
        _static("rfc1918.auto", False, True, _RFC1918),
        _static("rfc6598.auto", False, True, _RFC6598),
        _static("loopback.auto", False, True, ("127.0.0.0/8", "::1/128")),
        localnet_auto(interfaces),
        nat_auto(interfaces),
        AclList("wan.auto", True, (*deny_v4, *deny_v6)),
        _static("wan_v4.auto", True, False, ("::/0",), then=deny_v4),
        _static("wan_v6.auto", True, False, ("0.0.0.0/0",), then=deny_v6),
        # FreeSWITCH writes these as "default allow, deny the other family": the same answers.
        _static("any_v4.auto", False, True, ("0.0.0.0/0",)),
        _static("any_v6.auto", False, True, ("::/0",)),
    )


# --- The registry -----------------------------------------------------------------------------------


class AclSet:
    """The built-in `.auto` lists and the user's lists, by name.

    `refresh` swaps in new tables with one assignment, so a lookup running on another thread sees the
    old lists or the new ones, never a mix.
    """

    __slots__ = ("_lists", "_tables", "_user")

    def __init__(self, lists: Iterable[AclList] = (), interfaces: Iterable[tuple[str, IPInterface]] = ()) -> None:
        user: dict[str, AclList] = {}
        for acl in lists:
            if acl.name.endswith(AUTO_SUFFIX):
                raise AclError(f"ACL list {_quote(acl.name)}: names ending in .auto are the built-in lists'")
            if acl.name in user:
                raise AclError(f"ACL list {_quote(acl.name)} is defined twice")
            user[acl.name] = acl
        self._user = user
        self._lists: dict[str, AclList] = {}
        self._tables: dict[str, tuple[_Table, _Table]] = {}
        self.refresh(interfaces)

    def refresh(self, interfaces: Iterable[tuple[str, IPInterface]]) -> None:
        """Recompute the `.auto` lists for these interfaces (the daemon calls it when they change)."""
        lists = {acl.name: acl for acl in builtin_lists(interfaces)}
        lists.update(self._user)
        self._lists = lists
        self._tables = {name: acl._tables for name, acl in lists.items()}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._lists)

    def __contains__(self, list_name: object) -> bool:
        return list_name in self._lists

    def get(self, list_name: str) -> AclList:
        acl = self._lists.get(list_name)
        if acl is None:
            raise self._unknown(list_name)
        return acl

    def lookup(self, ip: str | IPAddress, list_name: str) -> bool:
        """True when list `list_name` allows `ip`; AclError for an unknown list or a bad address.

        The body repeats `_lookup` rather than calling it: the call would add some 15 % (measured).
        """
        tables = self._tables.get(list_name)
        if tables is None:
            raise self._unknown(list_name)
        if isinstance(ip, str):
            family, value = _parse_key(ip)
        elif isinstance(ip, IPv4Address):
            family, value = _FAMILY_V4, ip._ip  # type: ignore[attr-defined]  # int(ip) is a Python call
        elif isinstance(ip, IPv6Address):
            family, value = _FAMILY_V6, ip._ip  # type: ignore[attr-defined]
            if value >> 32 == _V4_MAPPED:
                family, value = _FAMILY_V4, value & _V4_MASK
        else:
            raise _not_an_address(ip)
        starts, answers = tables[family]
        return answers[bisect_right(starts, value) - 1]

    def explain(self, ip: str | IPAddress, list_name: str) -> AclVerdict:
        return self.get(list_name).explain(ip)

    def _unknown(self, list_name: str) -> AclError:
        known = sorted(self._lists)
        close = difflib.get_close_matches(str(list_name), known, n=1, cutoff=0.6)
        hint = f"did you mean {_quote(close[0])}?" if close else "known lists: " + ", ".join(known)
        return AclError(f"unknown ACL list {_quote(str(list_name))} ({hint})")


def check_ip(text: str, list_name: str, acls: AclSet) -> AclVerdict:
    """For `autonat acl IP LIST`: the verdict of one list for one address, with the deciding node."""
    address = _parse_ip(text.strip())
    return acls.explain(address, list_name)


# --- FreeSWITCH's acl.conf.xml ------------------------------------------------------------------------

_NODE_ATTRIBUTES: Final = frozenset({"type", "cidr", "host", "mask", "domain"})
_PORT_ATTRIBUTES: Final = frozenset({"port", "ports", "port-min", "port-max"})


def parse_acl_conf_xml(data: bytes, warnings: list[str] | None = None) -> list[AclList]:
    """Import FreeSWITCH's acl.conf.xml (`<configuration name="acl.conf"><network-lists><list ...>`).

    Follows `switch_load_network_lists`: a list without `default` allows, a node without `type` takes
    the list's default, a node is `cidr=` or `host=` + `mask=`. Nodes that need what only FreeSWITCH
    has (`domain=` users from the directory, a host name, `$${variables}`, port ranges) are skipped
    and reported in `warnings`. Anything else unexpected is an AclError of one line.
    """
    notes = warnings if warnings is not None else []
    if len(data) > MAX_ACL_CONF_SIZE:
        raise AclError(f"acl.conf.xml: {len(data)} bytes, over the {MAX_ACL_CONF_SIZE // 1024} KiB limit")
    try:
        root = defusedxml.ElementTree.fromstring(data, forbid_dtd=True)
    except DefusedXmlException as exc:
        raise AclError(f"acl.conf.xml: refused ({type(exc).__name__}: DTDs and entities are not allowed)") from None
    except ParseError as exc:
        raise AclError(f"acl.conf.xml: not well-formed XML ({' '.join(str(exc).split())})") from None
    configuration = _find_configuration(root)
    lists_element = configuration.find("network-lists")
    if lists_element is None:
        raise AclError('acl.conf.xml: no <network-lists> in <configuration name="acl.conf">')
    lists: list[AclList] = []
    seen: set[str] = set()
    for number, element in enumerate(lists_element, 1):
        if _skip_preprocess(element, f"<network-lists> child {number}", notes):
            continue
        if element.tag != "list":
            raise AclError(f"acl.conf.xml: unexpected <{element.tag}> in <network-lists> (child {number})")
        name = (element.get("name") or "").strip()
        if not name:
            raise AclError(f"acl.conf.xml: <list> {number} has no name")
        if name in seen:
            raise AclError(f"acl.conf.xml: list {_quote(name)} is defined twice")
        seen.add(name)
        lists.append(_list_from_xml(name, element, notes))
    return lists


def _find_configuration(root: Element) -> Element:
    if root.tag == "document":  # the whole freeswitch.xml: <document><section name="configuration">
        for section in root.iterfind("section"):
            for configuration in section.iterfind("configuration"):
                if configuration.get("name") == "acl.conf":
                    return configuration
        raise AclError('acl.conf.xml: no <configuration name="acl.conf"> in the <document>')
    if root.tag == "configuration" and root.get("name") == "acl.conf":
        return root
    raise AclError(f'acl.conf.xml: the root is <{root.tag}>, not <configuration name="acl.conf">')


def _skip_preprocess(element: Element, where: str, notes: list[str]) -> bool:
    if element.tag == "X-PRE-PROCESS":
        notes.append(f"acl.conf.xml: {where}: <X-PRE-PROCESS> is FreeSWITCH's preprocessor; skipped")
        return True
    return False


def _list_from_xml(name: str, element: Element, notes: list[str]) -> AclList:
    default = element.get("default", "allow")
    nodes: list[tuple[str, str, str]] = []
    for number, node in enumerate(element, 1):
        where = f"list {_quote(name)} node {number}"
        if _skip_preprocess(node, where, notes):
            continue
        if node.tag != "node":
            raise AclError(f"acl.conf.xml: unexpected <{node.tag}> in list {_quote(name)} (child {number})")
        action = node.get("type", default)
        cidr, host, mask, domain = (node.get(key) for key in ("cidr", "host", "mask", "domain"))
        unknown = sorted(set(node.keys()) - _NODE_ATTRIBUTES - _PORT_ATTRIBUTES)
        if unknown:
            notes.append(f"acl.conf.xml: {where}: attributes {', '.join(unknown)} ignored")
        skip = _why_skip(cidr, host, mask, domain, ports=_PORT_ATTRIBUTES & set(node.keys()))
        if skip:
            notes.append(f"acl.conf.xml: {where}: {skip}; skipped")
            continue
        if cidr is not None:
            nodes.append((f"node {number}", action, cidr))
        elif host is not None and mask is not None:
            nodes.append((f"node {number}", action, f"{host}/{mask}"))
        else:
            raise AclError(f"acl.conf.xml: {where} has neither cidr= nor host= with mask=")
    return _build_list(name, default, nodes)


def _why_skip(cidr: str | None, host: str | None, mask: str | None, domain: str | None, ports: Set[str]) -> str:
    """Why a node can't be imported faithfully, or "" when it can."""
    if domain is not None:
        return f"domain={_quote(domain)} takes its users' cidr= from FreeSWITCH's directory"
    if ports:
        return f"{', '.join(sorted(ports))} restrict(s) the node to ports, which autonat's lookups don't have"
    text = cidr if cidr is not None else f"{host}/{mask}" if host is not None else ""
    if "${" in text:
        return f"{_quote(text)} uses a FreeSWITCH variable"
    if cidr is None and host is not None:
        if mask is None:
            return f"host={_quote(host)} without mask= (FreeSWITCH ignores it too)"
        try:
            ip_address(host.strip())
        except ValueError:
            return f"host={_quote(host)} is a name, which needs a resolver"
    return ""
