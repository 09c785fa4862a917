"""Slowing down password guessing against our digest authentication, sans-IO, and the one log line per
failure that fail2ban reads (RFC 3261 §22 and §26.3.2; NIST SP 800-63B §5.2.2 "Rate Limiting").

`svcrack` guessed a user's password at guess 201 in 2.4 s against a server that answered every guess
at once. `AuthGuard` answers guessing with time. It is driven by three calls and one timer, each with
the caller's clock `now` (seconds, monotonic, any epoch), and reads no clock itself:

- `refused(ip, now)`: before a request from `ip` is authenticated; seconds of ban left, or None.
- `failed(ip, user, now)`: after a failed digest attempt; the new `Ban` when this one started one.
- `succeeded(ip, user, now)`: after a good one (counted, forgives nothing: see below).
- `expire(now)` at `timer()`: drops what no longer matters, so memory goes back down after a flood.

The rules:

1. **Per source.** The failure that makes `threshold` failures from one source within the last
   `window` seconds bans the source (a sliding window, fail2ban's maxretry/findtime). A ban lasts `ban`
   seconds for a first offence and doubles with each ban after it (`ban * 2**(strike - 1)`), capped at
   `max_ban`; a source's strikes are forgotten `forget` seconds (default `max_ban`) after its last ban
   ended. A banned source starts again with no failures counted. Requests refused during a ban do not
   extend it: with UDP a refused "source" may be a forged one, and a ban that fed on refused packets
   would let anyone keep a victim out for ever.
2. **Per user.** A dictionary spread over many sources makes few guesses from each. While a user name
   has `user_threshold` failures or more within the last `user_window` seconds, from any sources, the
   user is *under attack*, and a source that fails for that user is banned at `attack_threshold`
   failures in its window instead of `threshold` (`Ban.targeted`). The account itself is never locked:
   a correct password from a source that is not banned always works at once, so nobody can lock a user
   out by guessing wrong on purpose. Unknown names are counted exactly like real ones: treating them
   differently would tell, by who gets banned sooner, which names exist.
3. **Successes forgive nothing.** A success does not clear the source's failures: an attacker who knows
   one account's password could otherwise slip in a good login every few guesses and never be banned.
   A phone that mistyped a password waits for its failures to leave the window.
4. **What a source is.** An IPv4 address, or the /64 of an IPv6 address (IPv4-mapped IPv6 counts as its
   IPv4 address). Unicast interface identifiers are 64 bits (RFC 4291 §2.5.1), so a /64 is the least
   any IPv6 host is given, usually as part of a /56 or /48: one subscriber picks any of 2**64 addresses
   at will, and a ban on one address would stop nothing. The price is that hosts sharing a /64 (or an
   IPv4 NAT) share a ban; their correct passwords work again as soon as it ends.

Bounds, so an attacker rotating through addresses and user names cannot grow memory without limit
(each table is an insertion-ordered map or a heap, so every eviction below is O(1) amortized or
O(log n); an entry holds at most `threshold` or `user_threshold` timestamps):

- at most `max_sources` source counters (sources that failed recently and are not banned). When full,
  the least recently failing one is forgotten first: it holds less than `threshold` failures, so
  forgetting it costs at most `threshold - 1` extra guesses from it, and under a rotating flood the
  entries forgotten are the flood's own oldest addresses.
- at most `max_bans` offenders (banned sources, and sources whose strikes are still remembered). When
  full, the one whose ban ends soonest goes first: it has the least punishment left (offenders whose ban
  already ended, kept only for their strikes, come before any active ban), while repeat offenders with
  long bans stay.
- at most `max_users` user counters, least recently failing forgotten first (a name is counted by its
  first `MAX_USER_KEY` characters). Flushing a real user's counter this way takes `max_users` failures
  for other names, each of which counts against its source.

`failure_line` formats the log line for one failure; `source_key` is the ban unit of an address.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import heapq
import ipaddress
import re
from array import array

__all__ = [
    "LOG_TAG",
    "MAX_LOGGED_USER",
    "MAX_USER_KEY",
    "AuthGuard",
    "Ban",
    "GuardStats",
    "failure_line",
    "source_key",
]

LOG_TAG = "autonat-auth-failure"
"""The fixed word that starts every failure line (the fail2ban filter looks for it)."""
MAX_LOGGED_USER = 64
"""User-name characters written to the log; a longer name is cut there and marked with `...`."""
MAX_USER_KEY = 128
"""User-name characters a per-user counter is keyed by (the digest parser allows 1024)."""
MAX_THRESHOLD = 1000
"""Largest `threshold` / `user_threshold` (each failure counted is a timestamp kept)."""
# Dotted-quad IPv4 as sockets print it (no leading zeros): checked without building an IPv4Address,
# which is most of a failure's cost under a flood.
_IPV4 = re.compile(r"(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)", re.ASCII)


# --------------------------------------------------------------------------------------------- sources


def source_key(ip: str) -> str:
    """The unit a ban applies to: `ip` itself for IPv4, "prefix::/64" for IPv6, IPv4 for IPv4-mapped
    IPv6. ValueError for anything that is not an IP address (the caller passes a socket's peer)."""
    if _IPV4.fullmatch(ip):
        return ip
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        raise ValueError(f"not an IP address: {ip[:64]!r}") from None
    if isinstance(address, ipaddress.IPv4Address):
        return str(address)
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return f"{ipaddress.IPv6Address(int(address) >> 64 << 64)}/64"


@dataclasses.dataclass(frozen=True, slots=True)
class Ban:
    """A ban `failed` just started: `source` (a `source_key`) is refused until `until` (the caller's
    clock). `strike` is 1 for a first ban, 2 for the next while the first is remembered, and so on;
    `targeted` is True when the source was banned below `threshold` because a user it failed for is
    under attack (rule 2)."""

    source: str
    until: float
    seconds: float
    strike: int
    targeted: bool


@dataclasses.dataclass(slots=True)
class GuardStats:
    """Counts since start: failures and successes reported, requests refused by a ban, bans started
    (`targeted_bans` of them under rule 2), users that came under attack, and entries forgotten
    because a table was full (`evicted_sources`, `evicted_bans`, `evicted_users`)."""

    failures: int = 0
    successes: int = 0
    refused: int = 0
    bans: int = 0
    targeted_bans: int = 0
    attacks: int = 0
    evicted_sources: int = 0
    evicted_bans: int = 0
    evicted_users: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def _trim(times: array[float], cutoff: float) -> None:
    """Drop the failure times at or before `cutoff` (times are in the order they came)."""
    if not times or times[0] > cutoff:
        return
    drop = 1
    while drop < len(times) and times[drop] <= cutoff:
        drop += 1
    if drop:
        del times[:drop]


@dataclasses.dataclass(slots=True)
class _Offender:
    until: float
    strikes: int


class AuthGuard:
    """Failed digest attempts counted per source and per user; sources that guess get banned, for
    longer each time (see the module docstring for the rules and the bounds)."""

    def __init__(
        self,
        *,
        threshold: int = 5,
        window: float = 60.0,
        ban: float = 60.0,
        max_ban: float = 3600.0,
        forget: float | None = None,
        user_threshold: int = 20,
        user_window: float = 600.0,
        attack_threshold: int = 1,
        max_sources: int = 10_000,
        max_bans: int = 10_000,
        max_users: int = 10_000,
    ) -> None:
        if not (1 <= threshold <= MAX_THRESHOLD and 1 <= user_threshold <= MAX_THRESHOLD):
            raise ValueError(f"threshold and user_threshold must be 1..{MAX_THRESHOLD}")
        if not 1 <= attack_threshold <= threshold:
            raise ValueError("attack_threshold must be 1..threshold")
        if not (window > 0 and user_window > 0 and ban > 0):
            raise ValueError("window, user_window and ban must be positive")
        if not max_ban >= ban:
            raise ValueError("max_ban must be at least ban")
        if forget is not None and not forget >= 0:
            raise ValueError("forget must be 0 or more")
        if min(max_sources, max_bans, max_users) < 1:
            raise ValueError("max_sources, max_bans and max_users must be at least 1")
        self.threshold = threshold
        self.window = window
        self.ban = ban
        self.max_ban = max_ban
        self.forget = max_ban if forget is None else forget
        self.user_threshold = user_threshold
        self.user_window = user_window
        self.attack_threshold = attack_threshold
        self.max_sources = max_sources
        self.max_bans = max_bans
        self.max_users = max_users
        self.stats = GuardStats()
        # key -> times of its failures within the window, oldest first. The tables are ordered least
        # recently failing first: a failure moves its entry to the end.
        self._sources: collections.OrderedDict[str, array[float]] = collections.OrderedDict()
        self._users: collections.OrderedDict[str, array[float]] = collections.OrderedDict()
        self._offenders: dict[str, _Offender] = {}
        # (until, key) of every offender, soonest first; entries whose offender was since banned again
        # (another `until`) or dropped are stale and skipped, and the heap is rebuilt when they pile up.
        self._ends: list[tuple[float, str]] = []

    # ----------------------------------------------------------------------------------------- calls

    def refused(self, ip: str, now: float) -> float | None:
        """Seconds of ban left for the source of `ip`, or None when it may try."""
        offender = self._offenders.get(source_key(ip))
        if offender is None or offender.until <= now:
            return None
        self.stats.refused += 1
        return offender.until - now

    def failed(self, ip: str, user: str, now: float) -> Ban | None:
        """Count a failed attempt by `ip` for `user` (as the credentials named it); the ban it started,
        if it started one. A source already banned starts no new ban (the caller should have refused
        it) but its failure still counts against the user."""
        key = source_key(ip)
        self.stats.failures += 1
        attacked = self._user_failed(user[:MAX_USER_KEY], now)
        offender = self._offenders.get(key)
        if offender is not None and offender.until > now:
            return None
        times = self._sources.pop(key, None)
        if times is None:
            while len(self._sources) >= self.max_sources:
                self._sources.popitem(last=False)
                self.stats.evicted_sources += 1
            times = array("d")
        else:
            _trim(times, now - self.window)
        times.append(now)
        if len(times) >= (self.attack_threshold if attacked else self.threshold):
            return self._ban(key, offender, now, targeted=len(times) < self.threshold)
        self._sources[key] = times
        return None

    def succeeded(self, ip: str, user: str, now: float) -> None:
        """Count a good attempt. It forgives nothing (rule 3); `ip` is checked like the others', so that
        a caller's mistake shows at once."""
        source_key(ip)
        self.stats.successes += 1

    def under_attack(self, user: str, now: float) -> bool:
        """Whether `user` has `user_threshold` failures within `user_window` (rule 2)."""
        times = self._users.get(user[:MAX_USER_KEY], ())
        cutoff = now - self.user_window
        return sum(time > cutoff for time in times) >= self.user_threshold

    def banned(self, now: float) -> int:
        """Sources under a ban now (O(bans): for a status line, not per packet)."""
        return sum(offender.until > now for offender in self._offenders.values())

    @property
    def sizes(self) -> dict[str, int]:
        """Entries held per table (each bounded: see the module docstring)."""
        return {"sources": len(self._sources), "offenders": len(self._offenders), "users": len(self._users)}

    def timer(self) -> float | None:
        """When `expire` next has something to drop; None when every table is empty."""
        times: list[float] = []
        if self._sources:
            times.append(next(iter(self._sources.values()))[-1] + self.window)
        if self._users:
            times.append(next(iter(self._users.values()))[-1] + self.user_window)
        if self._ends:
            times.append(self._ends[0][0] + self.forget)
        return min(times, default=None)

    def expire(self, now: float) -> None:
        """Drop counters whose failures all left their window, and offenders whose strikes are forgotten."""
        self._prune(now)

    # ----------------------------------------------------------------------------------------- inside

    def _user_failed(self, name: str, now: float) -> bool:
        """Count a failure for user `name`; whether the user is now under attack."""
        times = self._users.pop(name, None)
        if times is None:
            while len(self._users) >= self.max_users:
                self._users.popitem(last=False)
                self.stats.evicted_users += 1
            times = array("d")
        else:
            _trim(times, now - self.user_window)
        before = len(times)
        times.append(now)
        if len(times) > self.user_threshold:  # only the last `user_threshold` matter
            del times[0]
        self._users[name] = times
        attacked = len(times) >= self.user_threshold
        if attacked and before < self.user_threshold:
            self.stats.attacks += 1
        return attacked

    def _ban(self, key: str, offender: _Offender | None, now: float, *, targeted: bool) -> Ban:
        remembered = offender is not None and offender.until + self.forget > now
        strike = offender.strikes + 1 if offender is not None and remembered else 1
        seconds = min(self.ban * 2.0 ** min(strike - 1, 64), self.max_ban)
        until = now + seconds
        if offender is None:
            while len(self._offenders) >= self.max_bans:
                self._evict_offender()
            offender = self._offenders[key] = _Offender(until, strike)
        else:
            offender.until, offender.strikes = until, strike
        heapq.heappush(self._ends, (until, key))
        if len(self._ends) > 2 * len(self._offenders) + 64:
            self._ends = [(o.until, k) for k, o in self._offenders.items()]
            heapq.heapify(self._ends)
        self.stats.bans += 1
        self.stats.targeted_bans += targeted
        return Ban(key, until, seconds, strike, targeted)

    def _pop_end(self) -> str | None:
        """The key of the offender whose ban ends soonest, removed from the heap (stale entries skipped)."""
        while self._ends:
            until, key = heapq.heappop(self._ends)
            offender = self._offenders.get(key)
            if offender is not None and offender.until == until:
                return key
        return None

    def _evict_offender(self) -> None:
        key = self._pop_end()
        if key is None:  # cannot happen: every offender has a heap entry
            raise AssertionError("offender heap out of step with the offender table")
        del self._offenders[key]
        self.stats.evicted_bans += 1

    def _prune(self, now: float) -> None:
        # Front entries failed least recently: once the newest failure of the front one left its window,
        # the entry counts nothing.
        while self._sources and next(iter(self._sources.values()))[-1] + self.window <= now:
            self._sources.popitem(last=False)
        while self._users and next(iter(self._users.values()))[-1] + self.user_window <= now:
            self._users.popitem(last=False)
        while self._ends and self._ends[0][0] + self.forget <= now:
            until, key = heapq.heappop(self._ends)
            offender = self._offenders.get(key)
            if offender is not None and offender.until == until:
                del self._offenders[key]


# --------------------------------------------------------------------------------------------- log line

# Printable ASCII but the three characters the line's syntax needs: `"` closes the user field, `%`
# starts an escape, `\` is an escape in many log readers. Space is escaped too, so every field value
# is one word for any tool.
_SAFE = frozenset(chr(code) for code in range(0x21, 0x7F)) - frozenset('"%\\')
_TOKEN = re.compile(r"[A-Za-z0-9!*_+`'~.\-]{1,32}")  # an RFC 3261 §25.1 token without "%"


def _escape(text: str) -> str:
    """`text` with every character outside `_SAFE` percent-encoded as its UTF-8 bytes (RFC 3986
    §2.1 style; lone surrogates pass as their surrogatepass bytes): pure printable ASCII, no `"`."""
    return "".join(
        char if char in _SAFE else "".join(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))
        for char in text
    )


def failure_line(*, wall: float, ip: str, port: int, method: str, reason: str, user: str) -> str:
    """The log line for one failed authentication, e.g.

        autonat-auth-failure time=2025-03-01T12:34:56.789+00:00 source=[2001:db8::7]:5060
        method=REGISTER reason=wrong-password user="105"

    (one line; wrapped here). `wall` is the wall-clock time (seconds since the epoch), written in
    ISO 8601 UTC so the line carries its own date whatever the log formatter adds. `ip`/`port` is the
    packet's source: IPv6 in brackets, IPv4-mapped IPv6 as IPv4 (a firewall bans the IPv4 address),
    any zone dropped. `reason` says which failure it was: the log is the administrator's, so it tells
    "unknown-user" from "wrong-password"; only the wire answer must not.

    Network values cannot forge anything (log injection): `user` is the last field, in double quotes,
    with every character but printable ASCII and every `"`, `%`, `\\` and space percent-encoded, so it
    can contain no line break, no quote and no second field; names longer than `MAX_LOGGED_USER`
    characters are cut and end in `...`. `method` and `reason` are written as-is when they are SIP
    tokens of at most 32 characters, percent-encoded otherwise. Nothing before the user field contains
    a `"`, which is what the fail2ban filter anchors on. ValueError for a bad `ip` or `port` (caller's
    values, not the network's).
    """
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        address = mapped if mapped is not None else ipaddress.IPv6Address(int(address))  # drops a zone
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} is not 0..65535")
    host = f"[{address}]" if address.version == 6 else str(address)
    when = datetime.datetime.fromtimestamp(wall, tz=datetime.UTC).isoformat(timespec="milliseconds")
    name = _escape(user[:MAX_LOGGED_USER]) + ("..." if len(user) > MAX_LOGGED_USER else "")

    def word(text: str) -> str:
        return text if _TOKEN.fullmatch(text) else _escape(text[:32]) or "-"

    return f'{LOG_TAG} time={when} source={host}:{port} method={word(method)} reason={word(reason)} user="{name}"'
