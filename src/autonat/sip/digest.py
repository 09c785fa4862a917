"""HTTP Digest authentication for SIP, sans-IO (RFC 3261 §22.4, RFC 2617, RFC 7616, RFC 8760).

Client side: `parse_challenge` reads a WWW-Authenticate / Proxy-Authenticate value and
`client_authorization` answers it (qop=auth when offered, RFC 2069 style otherwise). Server side:
`DigestServer` issues stateless nonces (optionally bound to the client's address) and checks
`Credentials` read by `parse_credentials`; `check` also says why a check failed (`Failure`, for the
server's log: the peer must see the same answer for every failure).

Supported: algorithms MD5 and SHA-256 (RFC 7616 §3.4.2, RFC 8760 §2.3), qop "auth". Not supported, and
refused by the parsers with DecodeError: the "-sess" variants, SHA-512-256, a challenge that offers only
qop="auth-int" (we could not answer it). `userhash`, `charset`, `domain` and unknown parameters are
ignored (RFC 7616 §3.3: unknown directives MUST be ignored). Strings are hashed as UTF-8.

Parsing (RFC 7235 §2.1 auth-param syntax, RFC 3261 §25.1 digest-response): the scheme "Digest" and
parameter names are case-insensitive; values are tokens or quoted strings (RFC 7230 §3.2.6, backslash
quoted-pairs undone); empty list elements are skipped; a repeated parameter is refused (its meaning would
be ambiguous). Caps, checked before the work they bound: `MAX_VALUE` characters per header value,
`MAX_PARAMS` parameters, `MAX_PARAM_VALUE` characters per parameter value. Hostile input raises only
DecodeError.
"""

from __future__ import annotations

import base64
import collections
import enum
import hashlib
import hmac
import math
import re
from dataclasses import dataclass

from autonat.proto.errors import DecodeError

__all__ = [
    "MAX_PARAMS",
    "MAX_PARAM_VALUE",
    "MAX_VALUE",
    "REPLAY_CACHE_SIZE",
    "Algorithm",
    "Challenge",
    "Check",
    "Credentials",
    "DigestServer",
    "Failure",
    "Verdict",
    "client_authorization",
    "compute_response",
    "parse_challenge",
    "parse_credentials",
]

MAX_VALUE = 4096
"""Longest WWW-Authenticate / Authorization value parsed."""
MAX_PARAMS = 32
MAX_PARAM_VALUE = 1024
REPLAY_CACHE_SIZE = 10_000
"""Entries in `DigestServer`'s nonce-count memory (see `DigestServer.verify`)."""
FUTURE_SKEW_MS = 5_000
"""A nonce stamped further than this ahead of the caller's clock is treated as stale."""


class Algorithm(enum.StrEnum):
    """The digest algorithms we speak (RFC 7616 §3.4.2; RFC 8760 §2.3 for SIP)."""

    MD5 = "MD5"
    SHA256 = "SHA-256"


_ALGORITHMS = {"md5": Algorithm.MD5, "sha-256": Algorithm.SHA256}
_HASH_NAMES = {Algorithm.MD5: "md5", Algorithm.SHA256: "sha256"}
_RESPONSE = {Algorithm.MD5: re.compile(r"[0-9a-fA-F]{32}"), Algorithm.SHA256: re.compile(r"[0-9a-fA-F]{64}")}
_NC = re.compile(r"[0-9a-fA-F]{8}")
_NONCE = re.compile(r"[A-Za-z0-9_\-]{32}")  # urlsafe base64 of exactly 24 bytes: no padding, no slack bits
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# Unquoted values: RFC 7235 allows a token; real senders also leave URIs and base64 nonces bare, so any
# visible ASCII but the delimiters is taken.
_BARE = frozenset(chr(c) for c in range(0x21, 0x7F)) - frozenset('",\\')
_WS = " \t"


# --------------------------------------------------------------------------------------------- syntax


def _quoted(text: str, start: int) -> tuple[str, int]:
    """The unescaped content of the quoted-string opening at `start` and the index after it (RFC 7230
    §3.2.6: qdtext and quoted-pair; UTF-8 / obs-text allowed, other control characters not)."""
    out: list[str] = []
    index = start + 1
    while index < len(text):
        char = text[index]
        if char == '"':
            return "".join(out), index + 1
        if char == "\\":
            index += 1
            if index >= len(text):
                break
            char = text[index]
        if char != "\t" and (char < " " or char == "\x7f"):
            raise DecodeError("control character in a quoted string")
        out.append(char)
        index += 1
    raise DecodeError("unterminated quoted string")


def _skip_ws(text: str, index: int) -> int:
    while index < len(text) and text[index] in _WS:
        index += 1
    return index


def _parse_params(value: str, what: str) -> dict[str, str]:
    """`Digest` followed by a comma list of `name=value`: the parameters, names lower-cased."""
    if not isinstance(value, str):
        raise DecodeError(f"{what} is not text")
    if len(value) > MAX_VALUE:
        raise DecodeError(f"{what} longer than {MAX_VALUE} characters")
    text = value.strip(_WS)
    scheme_end = 0
    while scheme_end < len(text) and text[scheme_end] in _TCHAR:
        scheme_end += 1
    if text[:scheme_end].lower() != "digest":
        raise DecodeError(f"{what} scheme is not Digest")
    if scheme_end < len(text) and text[scheme_end] not in _WS:
        raise DecodeError(f"{what}: no space after the scheme")
    params: dict[str, str] = {}
    count = 0
    index = _skip_ws(text, scheme_end)
    while index < len(text):
        if text[index] == ",":  # RFC 7230 §7: empty list elements are legal and skipped
            index = _skip_ws(text, index + 1)
            continue
        name_start = index
        while index < len(text) and text[index] in _TCHAR:
            index += 1
        if index == name_start:
            raise DecodeError(f"{what}: malformed parameter name")
        name = text[name_start:index].lower()
        index = _skip_ws(text, index)
        if index >= len(text) or text[index] != "=":
            raise DecodeError(f"{what}: parameter without '='")
        index = _skip_ws(text, index + 1)
        if index < len(text) and text[index] == '"':
            param, index = _quoted(text, index)
        else:
            value_start = index
            while index < len(text) and text[index] in _BARE:
                index += 1
            if index == value_start:
                raise DecodeError(f"{what}: empty or malformed parameter value")
            param = text[value_start:index]
        if len(param) > MAX_PARAM_VALUE:
            raise DecodeError(f"{what}: parameter value longer than {MAX_PARAM_VALUE} characters")
        count += 1
        if count > MAX_PARAMS:
            raise DecodeError(f"{what}: more than {MAX_PARAMS} parameters")
        if name in params:
            raise DecodeError(f"{what}: repeated parameter")
        params[name] = param
        index = _skip_ws(text, index)
        if index < len(text) and text[index] != ",":
            raise DecodeError(f"{what}: junk after a parameter")
    return params


def _algorithm(params: dict[str, str], what: str) -> Algorithm:
    name = params.get("algorithm")
    if name is None:
        return Algorithm.MD5  # RFC 2617 §3.2.1: absent means MD5
    algorithm = _ALGORITHMS.get(name.lower())
    if algorithm is None:
        raise DecodeError(f"{what}: unsupported digest algorithm")
    return algorithm


def _required(params: dict[str, str], name: str, what: str) -> str:
    value = params.get(name)
    if value is None:
        raise DecodeError(f"{what}: missing {name}")
    return value


def _quote(value: str) -> str:
    """A quoted-string for `value`: `"` and `\\` escaped (RFC 7230 §3.2.6). Control characters are a
    caller's error: they could split the header."""
    if any((c < " " and c != "\t") or c == "\x7f" for c in value):
        raise ValueError("control character in a Digest parameter")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --------------------------------------------------------------------------------------------- challenge


@dataclass(frozen=True, slots=True)
class Challenge:
    """A WWW-Authenticate / Proxy-Authenticate value (RFC 2617 §3.2.1, RFC 7616 §3.3).

    `qop` is empty for an RFC 2069 challenge; parsed challenges that offer qop always include "auth".
    """

    realm: str
    nonce: str
    algorithm: Algorithm = Algorithm.MD5
    qop: tuple[str, ...] = ("auth",)
    opaque: str | None = None
    stale: bool = False

    def header_value(self) -> str:
        parts = [f"realm={_quote(self.realm)}", f"nonce={_quote(self.nonce)}", f"algorithm={self.algorithm}"]
        if self.qop:
            parts.append(f"qop={_quote(','.join(self.qop))}")
        if self.opaque is not None:
            parts.append(f"opaque={_quote(self.opaque)}")
        if self.stale:
            parts.append("stale=true")
        return "Digest " + ", ".join(parts)


def parse_challenge(value: str) -> Challenge:
    """A Digest challenge, or DecodeError (malformed, another scheme, unsupported algorithm or qop)."""
    what = "Digest challenge"
    params = _parse_params(value, what)
    realm = _required(params, "realm", what)
    nonce = _required(params, "nonce", what)
    if not nonce:
        raise DecodeError(f"{what}: empty nonce")
    qop: tuple[str, ...] = ()
    if "qop" in params:
        qop = tuple(option.strip(_WS).lower() for option in params["qop"].split(",") if option.strip(_WS))
        if not qop or not all(_TCHAR.issuperset(option) for option in qop):
            raise DecodeError(f"{what}: malformed qop")
        if "auth" not in qop:
            raise DecodeError(f"{what}: no supported qop (auth)")
    return Challenge(
        realm=realm,
        nonce=nonce,
        algorithm=_algorithm(params, what),
        qop=qop,
        opaque=params.get("opaque"),
        stale=params.get("stale", "").lower() == "true",  # RFC 2617 §3.2.1: anything else means false
    )


# --------------------------------------------------------------------------------------------- credentials


@dataclass(frozen=True, slots=True)
class Credentials:
    """An Authorization / Proxy-Authorization value (RFC 2617 §3.2.2, RFC 3261 §25.1 digest-response).

    Parsed credentials have a hex `response` of the algorithm's length (lower-cased), and with a `qop`
    also an 8-hex-digit `nc` (lower-cased) and a `cnonce`.
    """

    username: str
    realm: str
    nonce: str
    uri: str
    response: str
    algorithm: Algorithm = Algorithm.MD5
    qop: str | None = None
    nc: str | None = None
    cnonce: str | None = None
    opaque: str | None = None


def parse_credentials(value: str) -> Credentials:
    """Digest credentials, or DecodeError."""
    what = "Digest credentials"
    params = _parse_params(value, what)
    algorithm = _algorithm(params, what)
    response = _required(params, "response", what)
    if not _RESPONSE[algorithm].fullmatch(response):
        raise DecodeError(f"{what}: response is not a {algorithm} hex digest")
    qop = params.get("qop")
    nc = params.get("nc")
    cnonce = params.get("cnonce")
    if qop is not None:
        qop = qop.lower()
        if not qop or not _TCHAR.issuperset(qop):
            raise DecodeError(f"{what}: malformed qop")
        # RFC 2617 §3.2.2: with a qop, cnonce and nc MUST be present.
        if nc is None or not _NC.fullmatch(nc):
            raise DecodeError(f"{what}: qop without an 8-hex-digit nc")
        if not cnonce:
            raise DecodeError(f"{what}: qop without a cnonce")
    return Credentials(
        username=_required(params, "username", what),
        realm=_required(params, "realm", what),
        nonce=_required(params, "nonce", what),
        uri=_required(params, "uri", what),
        response=response.lower(),
        algorithm=algorithm,
        qop=qop,
        nc=nc.lower() if nc is not None else None,
        cnonce=cnonce,
        opaque=params.get("opaque"),
    )


def _hash(algorithm: Algorithm, text: str) -> str:
    data = text.encode("utf-8", "surrogatepass")
    return hashlib.new(_HASH_NAMES[algorithm], data, usedforsecurity=False).hexdigest()


def compute_response(
    algorithm: Algorithm,
    *,
    username: str,
    realm: str,
    password: str,
    method: str,
    uri: str,
    nonce: str,
    qop: str | None = None,
    nc: str | None = None,
    cnonce: str | None = None,
) -> str:
    """The request-digest, lower-case hex (RFC 2617 §3.2.2.1, RFC 7616 §3.4.1).

    A1 = username:realm:password; A2 = method:uri (qop "auth" or none); with qop the digest is
    H(H(A1):nonce:nc:cnonce:qop:H(A2)), without it (RFC 2069) H(H(A1):nonce:H(A2)).
    """
    ha1 = _hash(algorithm, f"{username}:{realm}:{password}")
    ha2 = _hash(algorithm, f"{method}:{uri}")
    if qop is None:
        return _hash(algorithm, f"{ha1}:{nonce}:{ha2}")
    return _hash(algorithm, f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")


def client_authorization(
    challenge: Challenge,
    *,
    method: str,
    uri: str,
    username: str,
    password: str,
    cnonce: str,
    nc: int = 1,
) -> str:
    """The Authorization (or Proxy-Authorization) value answering `challenge` (RFC 2617 §3.2.2).

    qop=auth when the challenge offers it (then `cnonce` and `nc` are used), RFC 2069 style when it
    offers no qop. ValueError for a challenge offering only qops we cannot do, an `nc` outside
    1..2**32-1, or control characters in any argument.
    """
    if not 1 <= nc <= 0xFFFFFFFF:
        raise ValueError(f"nc {nc} is not 1..2**32-1")
    if any(c in text for text in (method, uri) for c in '\r\n\0 "'):
        raise ValueError("method or uri contains whitespace, a quote or a control character")
    use_qop = "auth" in challenge.qop
    if challenge.qop and not use_qop:
        raise ValueError("the challenge offers no qop we support (auth)")
    if use_qop and not cnonce:
        raise ValueError("qop=auth needs a cnonce")
    nc_text = f"{nc:08x}"
    response = compute_response(
        challenge.algorithm,
        username=username,
        realm=challenge.realm,
        password=password,
        method=method,
        uri=uri,
        nonce=challenge.nonce,
        qop="auth" if use_qop else None,
        nc=nc_text,
        cnonce=cnonce,
    )
    parts = [
        f"username={_quote(username)}",
        f"realm={_quote(challenge.realm)}",
        f"nonce={_quote(challenge.nonce)}",
        f"uri={_quote(uri)}",
        f'response="{response}"',
        f"algorithm={challenge.algorithm}",
    ]
    if use_qop:
        parts += [f"cnonce={_quote(cnonce)}", "qop=auth", f"nc={nc_text}"]
    if challenge.opaque is not None:
        parts.append(f"opaque={_quote(challenge.opaque)}")  # RFC 2617 §3.2.2: returned unchanged
    return "Digest " + ", ".join(parts)


# --------------------------------------------------------------------------------------------- server


class Verdict(enum.Enum):
    OK = "ok"
    STALE = "stale"
    """The response was right for a nonce we issued, but the nonce is too old: re-challenge with
    stale=true (RFC 2617 §3.2.1), and the client retries without asking its user."""
    FAILED = "failed"


class Failure(enum.StrEnum):
    """Why `DigestServer.check` said FAILED. For the server's own log only: on the wire every failure
    must get the same answer, or the difference tells an attacker which user names exist."""

    WRONG_PASSWORD = "wrong-password"  # noqa: S105 (a reason, not a password)
    """A nonce we issued, but the response does not match the user's password."""
    UNKNOWN_USER = "unknown-user"
    """No such user (the response was computed all the same, so this takes as long as a wrong password)."""
    REPLAY = "replay"
    """A right response whose nonce count is not above the last one accepted (RFC 2617 §3.2.2)."""
    UNUSABLE = "unusable-credentials"
    """Another realm or algorithm, a nonce we did not issue (for this client), or no qop=auth."""


@dataclass(frozen=True, slots=True)
class Check:
    """`DigestServer.check`'s answer: the verdict, and with FAILED the reason."""

    verdict: Verdict
    failure: Failure | None = None


_MAX_MS = 2**64 - 1


def _to_ms(now: float) -> int:
    """The caller's clock as milliseconds in 0..2**64-1 (any epoch; negative clamps to 0)."""
    if math.isnan(now):
        raise ValueError("now is NaN")
    if now <= 0:
        return 0
    if now >= _MAX_MS / 1000:
        return _MAX_MS
    return int(now * 1000)


def _client_bytes(client: str) -> bytes:
    return client.encode("utf-8", "surrogatepass")


class DigestServer:
    """Digest verification with stateless nonces (RFC 2617 §3.2.1 "nonce" suggests exactly this).

    nonce = urlsafe-base64(issue time in ms, 8 bytes big-endian || HMAC-SHA256(secret, time ||
    client)[:16]), 32 characters. Nothing is stored per challenge, so challenging floods cost no memory;
    a nonce from another `secret` (e.g. before a restart with a new secret) fails the HMAC.

    `client` (every method takes it; "" by default) binds a nonce to the address it was sent to: the
    server passes the peer's IP address, and a nonce presented from another address is not ours. With
    UDP anybody can forge a source address, and nonces are stateless: without the binding, an attacker
    could fetch a nonce from its own address and then send wrong passwords "from" a victim's address
    until the victim is banned; with it, the forged requests carry a nonce that is not the victim's and
    are only challenged again (a 401 the attacker never sees). A phone whose address changes between the
    challenge and its answer is challenged again too, which costs it one round trip.

    Every challenge offers qop="auth" and `verify` requires it: RFC 2069-style answers carry no nonce
    count, so a captured one could be replayed for the nonce's whole lifetime (RFC 7616 §3.3 makes qop
    mandatory for servers anyway).
    """

    __slots__ = ("_lifetime_ms", "_secret", "_seen", "algorithm", "realm")

    def __init__(
        self, realm: str, secret: bytes, *, nonce_lifetime: float = 300.0, algorithm: Algorithm = Algorithm.MD5
    ) -> None:
        if len(secret) < 16:
            raise ValueError("the nonce secret must be at least 16 bytes")
        if not nonce_lifetime > 0:
            raise ValueError("nonce_lifetime must be positive")
        _quote(realm)  # refuse a realm that could not go into a header
        self.realm = realm
        self.algorithm = algorithm
        self._secret = bytes(secret)
        self._lifetime_ms = nonce_lifetime * 1000
        # (nonce, username, cnonce) -> (highest nc accepted, nonce issue time in ms); insertion order is
        # least recently used first, so eviction and pruning take from the front (an OrderedDict: finding
        # a plain dict's first entry after many deletions at the front scans the deleted slots).
        self._seen: collections.OrderedDict[tuple[str, str, str], tuple[int, int]] = collections.OrderedDict()

    def _mac(self, stamp: bytes) -> bytes:
        return hmac.new(self._secret, stamp, hashlib.sha256).digest()[:16]

    def challenge(self, now: float, *, stale: bool = False, client: str = "") -> Challenge:
        """A challenge with a fresh nonce stamped `now`, bound to `client` (RFC 2617 §3.2.1)."""
        stamp = _to_ms(now).to_bytes(8, "big")
        nonce = base64.urlsafe_b64encode(stamp + self._mac(stamp + _client_bytes(client))).decode("ascii")
        return Challenge(realm=self.realm, nonce=nonce, algorithm=self.algorithm, qop=("auth",), stale=stale)

    def nonce_issued_at(self, nonce: str, *, client: str = "") -> int | None:
        """The issue time (ms) of a nonce this server made for `client`, or None when it is not ours
        (constant-time MAC check). A registrar answers credentials with a foreign nonce with a fresh
        challenge."""
        if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
            return None  # strict shape: b64decode would skip junk, and two spellings would share one nonce
        raw = base64.urlsafe_b64decode(nonce)
        if not hmac.compare_digest(raw[8:], self._mac(raw[:8] + _client_bytes(client))):
            return None
        return int.from_bytes(raw[:8], "big")

    def verify(
        self, credentials: Credentials, *, method: str, password: str | None, now: float, client: str = ""
    ) -> Verdict:
        """`check(...).verdict`."""
        return self.check(credentials, method=method, password=password, now=now, client=client).verdict

    def check(
        self, credentials: Credentials, *, method: str, password: str | None, now: float, client: str = ""
    ) -> Check:
        """Check `credentials` for a request with `method` from `client`; `password` None means an
        unknown user.

        FAILED (with the `Failure`): another realm or algorithm, a nonce we did not issue for `client`,
        no qop=auth, an unknown user, a wrong response, or a replay. STALE: everything right but the
        nonce is older than `nonce_lifetime` or stamped more than 5 s ahead of `now`. OK otherwise.

        Same timing class for unknown users and wrong passwords: both compute the full response (an
        unknown user against the empty password) and compare it in constant time; the early returns
        before that depend only on the realm, algorithm, nonce and qop, never on the user name.

        Replay defence (RFC 2617 §3.2.2 nonce-count): for each (nonce, username, cnonce) the highest
        accepted nc is remembered and a request whose nc is not higher is FAILED. A verbatim replay
        repeats all three, and none can be changed without breaking the response, so keying on the
        triple is as strict as keying on the nonce alone, while two clients that got the same nonce
        (challenged in the same millisecond) or a client that picks a new cnonce and restarts at nc=1
        are not mistaken for replays. The memory holds `REPLAY_CACHE_SIZE` entries, least recently used
        evicted first, and entries of expired nonces are dropped; only verified responses are recorded,
        so unauthenticated traffic cannot flush it. An evicted entry's nonce could be replayed until it
        expires: that needs more than REPLAY_CACHE_SIZE authenticated requests within `nonce_lifetime`.
        """
        now_ms = _to_ms(now)
        unusable = Check(Verdict.FAILED, Failure.UNUSABLE)
        if credentials.realm != self.realm or credentials.algorithm != self.algorithm:
            return unusable
        issued = self.nonce_issued_at(credentials.nonce, client=client)
        if issued is None:
            return unusable
        qop, nc, cnonce = credentials.qop, credentials.nc, credentials.cnonce
        if qop != "auth" or nc is None or not _NC.fullmatch(nc) or not cnonce:
            return unusable
        expected = compute_response(
            self.algorithm,
            username=credentials.username,
            realm=self.realm,
            # An unknown user still costs a digest, so timing does not tell which names exist.
            password="" if password is None else password,
            method=method,
            uri=credentials.uri,
            nonce=credentials.nonce,
            qop=qop,
            nc=nc.lower(),
            cnonce=cnonce,
        )
        given = credentials.response.lower().encode("utf-8", "surrogatepass")
        matches = hmac.compare_digest(expected.encode("ascii"), given)
        if password is None:
            return Check(Verdict.FAILED, Failure.UNKNOWN_USER)
        if not matches:
            return Check(Verdict.FAILED, Failure.WRONG_PASSWORD)
        if now_ms - issued > self._lifetime_ms or issued - now_ms > FUTURE_SKEW_MS:
            return Check(Verdict.STALE)
        return self._count(credentials.nonce, credentials.username, cnonce, int(nc, 16), issued, now_ms)

    def _count(self, nonce: str, username: str, cnonce: str, nc: int, issued: int, now_ms: int) -> Check:
        key = (nonce, username, cnonce)
        previous = self._seen.pop(key, None)
        if previous is not None and nc <= previous[0]:
            self._seen[key] = previous
            return Check(Verdict.FAILED, Failure.REPLAY)
        self._seen[key] = (nc, issued)
        # Front entries belong to the least recently used nonces: drop those past their lifetime (a
        # replay of them is answered STALE before the memory is consulted), then enforce the cap.
        while self._seen:
            front = next(iter(self._seen))
            if now_ms - self._seen[front][1] <= self._lifetime_ms and len(self._seen) <= REPLAY_CACHE_SIZE:
                break
            del self._seen[front]
        return Check(Verdict.OK)
