"""A SIP registrar, sans-IO (RFC 3261 §10.3).

`Registrar.handle` takes a parsed REGISTER and returns a `RegisterOutcome`: the response to send, the
authenticated user, and for a failed digest attempt an `AuthFailure` (who and why: for the log line and
the guard, `autonat.sip.guard`; the peer sees 403 whatever the reason). Bindings live in memory and
expire by the caller's clock (`expire`, `timer`). Authentication is HTTP Digest (`autonat.sip.digest`)
against a fixed user table; `Registrar.authenticate` applies the same check to other requests (an
INVITE, with FreeSWITCH's `auth-calls`), answering 407 or 401 challenges.

Order of checks, chosen so nothing about the user table leaks before authentication:
1. Authorization (§10.3 step 3, §22.4): credentials for our realm are required; none, unparsable ones,
   or a nonce we did not issue -> 401 with a fresh challenge (a phone holding a nonce from before a
   restart simply re-authenticates); a correct response on an expired nonce -> 401 with stale=true;
   anything else wrong (bad password, unknown user, replayed nonce count) -> 403, the same 403 with
   the same headers for every reason, after the same work (see `DigestServer.check`), so nothing
   outside tells a wrong password from an unknown user.
2. Require (§10.3 step 2): we support no extensions -> 420 with Unsupported.
3. The AOR (To, §10.3 steps 4-5): a user we do not know -> 404; a user other than the authenticated
   one -> 403.
4. Contacts (§10.3 steps 6-7), all validated before any binding changes, so a request either applies
   completely or not at all: malformed -> 400, more than `MAX_CONTACTS` -> 400, `*` only alone and
   with `Expires: 0`, an interval in 0 < e < min_expires -> 423 with Min-Expires, an older CSeq on the
   same Call-ID -> 500 with Retry-After.
5. 200 listing every live binding of the user with its remaining time (§10.3 step 8).

Not done: the Request-URI domain check (§10.3 step 1; one realm serves any domain name), the Path
extension, GRUU, and outbound (RFC 5626) flows: the NAT rule here is simpler - a binding keeps the
`source` the REGISTER came from, and the phone is reached there, not at its Contact.

Retransmissions are the transaction layer's business: a retransmitted REGISTER reaching `handle` again
repeats its nonce count and is refused (403) as a replay.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote

from autonat.proto.errors import DecodeError
from autonat.sip.digest import Credentials, DigestServer, Failure, Verdict, parse_credentials
from autonat.sip.message import Request, Response, make_response, parse_name_addr, split_list

__all__ = ["MAX_CONTACTS", "MAX_URI", "AuthFailure", "AuthOutcome", "Binding", "RegisterOutcome", "Registrar"]

MAX_CONTACTS = 10
"""Contact entries per REGISTER; more is refused with 400."""
MAX_URI = 1024
"""Longest Contact URI stored."""
MAX_AUTHORIZATION = 8
"""Authorization headers looked at per request (§22.4 allows one per realm)."""
_MAX_DELTA = 2**32 - 1  # §20.19, §10.2.1.1: larger values are taken as 2**32-1
_DIGITS = re.compile(r"[0-9]+")
# scheme ":" then visible ASCII without the characters that delimit a name-addr (§19.1, §20.10)
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:[!#-;=?-~]+")
_TOKEN = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")


@dataclass(frozen=True, slots=True)
class Binding:
    """One registered contact of `user` (§10.3 step 7).

    `contact` is the Contact URI as sent, without `<>`; `source` is where the REGISTER came from
    (transport and address or connection, opaque here). Behind a NAT the Contact usually names a
    private address, so calls go to `source`.
    """

    user: str
    contact: str
    expires_at: float
    call_id: str
    cseq: int
    source: Hashable

    def remaining(self, now: float) -> int:
        """Whole seconds left, rounded up (a live binding never shows 0), 0 once expired."""
        left = round(self.expires_at - now, 3)  # to the ms, so float noise cannot round 3600 up to 3601
        return math.ceil(left) if left > 0 else 0

    def live(self, now: float) -> bool:
        return self.expires_at > now


@dataclass(frozen=True, slots=True)
class AuthFailure:
    """A failed digest attempt: `user` as the credentials named it (untrusted text from the network:
    escape it before logging, `autonat.sip.guard.failure_line` does), `reason` why, `method` of the
    request. For the log and the guard only; the peer got the same 403 whatever the reason."""

    user: str
    reason: Failure
    method: str


@dataclass(frozen=True, slots=True)
class RegisterOutcome:
    """What `Registrar.handle` did: the `response` to send; `user`, the authenticated user whenever the
    credentials checked out (even when the REGISTER was then refused: another user's AOR, 400, 423 ...);
    `failure` when the request carried credentials for us that failed. Both None for a challenge."""

    response: Response
    user: str | None = None
    failure: AuthFailure | None = None


@dataclass(frozen=True, slots=True)
class AuthOutcome:
    """What `Registrar.authenticate` decided: `ok` (then `user` is who, `response` None: go on with the
    request), or a `response` to send instead: a challenge (401/407, `failure` None) or 403 (`failure`
    says who and why)."""

    user: str | None
    response: Response | None
    failure: AuthFailure | None = None

    @property
    def ok(self) -> bool:
        return self.response is None


def _reason(text: str) -> str:
    """A one-line, printable reason phrase of bounded length."""
    cleaned = "".join(c if " " <= c <= "~" else "?" for c in text)
    return f"Bad Request: {cleaned[:120]}"


def _delta_seconds(text: str, what: str) -> int:
    """delta-seconds (§25.1), capped at 2**32-1 (§10.2.1.1)."""
    text = text.strip(" \t")
    if not _DIGITS.fullmatch(text):
        raise DecodeError(f"{what} is not a number of seconds")
    significant = text.lstrip("0") or "0"
    return _MAX_DELTA if len(significant) > 10 else min(int(significant), _MAX_DELTA)


def _name_addr(value: str, what: str) -> tuple[str, dict[str, str | None]]:
    """The codec's name-addr parse, plus the registrar's limits: a URI of at most MAX_URI characters and
    no repeated parameter (a binding's expires must be unambiguous)."""
    uri, params = parse_name_addr(value, what)
    if len(uri) > MAX_URI:
        raise DecodeError(f"{what} URI longer than {MAX_URI} characters")
    result = dict(params)
    if len(result) != len(params):
        raise DecodeError(f"{what} repeats a parameter")
    return uri, result


def _sip_parts(uri: str) -> tuple[str, str, str] | None:
    """(scheme lower-cased, user part percent-decoded, the rest) of a sip:/sips: URI, else None."""
    scheme, _, rest = uri.partition(":")
    if scheme.lower() not in ("sip", "sips"):
        return None
    head, _, _ = rest.partition(";")
    head, _, _ = head.partition("?")
    userinfo, at, _ = head.rpartition("@")
    user = unquote(userinfo.partition(":")[0]) if at else ""
    return scheme.lower(), user, rest[len(userinfo) + len(at) :]


def _uri_key(uri: str) -> str:
    """A comparison key approximating §19.1.4: scheme, host and parameters compare case-insensitively,
    parameter order does not matter, the user part compares after percent-decoding. Two spellings
    this treats as different only cost an extra binding, bounded by max_bindings_per_user."""
    scheme, _, rest = uri.partition(":")
    main, question, headers = rest.partition("?")
    address, *params = main.split(";")
    userinfo, at, hostport = address.rpartition("@")
    normalized_params = ";".join(sorted(param.lower() for param in params))
    return f"{scheme.lower()}:{unquote(userinfo)}{at}{hostport.lower()};{normalized_params}{question}{headers}"


class Registrar:
    """Bindings of the users in `users` (name -> password; the mapping is read on each request, so a
    caller may update it in place).

    At most `max_bindings_per_user` bindings per user: a REGISTER that would add more replaces the
    user's oldest bindings (least recently registered or refreshed), so a phone that re-installs with a
    new Contact is never locked out by its own stale bindings.
    """

    def __init__(
        self,
        users: Mapping[str, str],
        server: DigestServer,
        *,
        min_expires: int = 60,
        max_expires: int = 3600,
        default_expires: int = 3600,
        max_bindings_per_user: int = 5,
    ) -> None:
        if not 0 <= min_expires <= default_expires <= max_expires or max_expires < 1:
            raise ValueError("need 0 <= min_expires <= default_expires <= max_expires and max_expires >= 1")
        if max_bindings_per_user < 1:
            raise ValueError("max_bindings_per_user must be at least 1")
        self._users = users
        self._server = server
        self._min_expires = min_expires
        self._max_expires = max_expires
        self._default_expires = default_expires
        self._max_bindings = max_bindings_per_user
        # user -> (contact key -> binding), oldest registration first
        self._bindings: dict[str, dict[str, Binding]] = {}
        self._expired: list[Binding] = []  # dropped by `handle`, still to be reported by `expire`

    def set_users(self, users: Mapping[str, str]) -> list[str]:
        """New users and passwords (a reload): the bindings of users no longer there are dropped (their phones
        can no longer be rung); the others stay. Returns the names dropped."""
        gone = [user for user in self._bindings if user not in users]
        for user in gone:
            self._expired += list(self._bindings.pop(user).values())
        self._users = users
        return gone

    # ----------------------------------------------------------------------------------------- queries

    def lookup(self, user: str, now: float) -> list[Binding]:
        """The user's unexpired bindings, newest first."""
        return [binding for binding in reversed(self._bindings.get(user, {}).values()) if binding.live(now)]

    def bindings(self, now: float) -> list[Binding]:
        """Every unexpired binding, user by user, newest first within a user."""
        return [binding for user in self._bindings for binding in self.lookup(user, now)]

    def count(self, now: float) -> int:
        return sum(binding.live(now) for per_user in self._bindings.values() for binding in per_user.values())

    def timer(self) -> float | None:
        """The earliest expiry time of any binding, None when there is none."""
        return min(
            (binding.expires_at for per_user in self._bindings.values() for binding in per_user.values()),
            default=None,
        )

    def expire(self, now: float) -> list[Binding]:
        """Drop expired bindings and return them (also those `handle` dropped since the last call)."""
        dropped, self._expired = self._expired, []
        for user in list(self._bindings):
            dropped += self._purge(user, now)
        return dropped

    def _purge(self, user: str, now: float) -> list[Binding]:
        per_user = self._bindings.get(user)
        if per_user is None:
            return []
        dropped = [binding for binding in per_user.values() if not binding.live(now)]
        if dropped:
            live = {key: binding for key, binding in per_user.items() if binding.live(now)}
            if live:
                self._bindings[user] = live
            else:
                del self._bindings[user]
        return dropped

    # ----------------------------------------------------------------------------------------- REGISTER

    def handle(
        self, request: Request, now: float, source: Hashable, *, to_tag: str, client: str = ""
    ) -> RegisterOutcome:
        """The outcome of a REGISTER (§10.3), after applying it. Never raises for anything a peer can
        send: malformed headers give 400. A request that is not REGISTER is a caller's error
        (ValueError); the request must come from the codec (it guarantees To, From, Call-ID, CSeq).
        `client` is the peer's IP address: nonces are bound to it (see `DigestServer`)."""
        if request.method != "REGISTER":
            raise ValueError(f"Registrar.handle got a {request.method[:32]} request")
        try:
            self._check_syntax(request)
        except DecodeError as error:
            return RegisterOutcome(make_response(request, 400, _reason(error.reason), to_tag=to_tag))
        auth = self._authenticate(request, now, to_tag, client, proxy=False)
        if auth.response is not None:
            return RegisterOutcome(auth.response, None, auth.failure)
        assert auth.user is not None
        try:
            response = self._register(request, now, source, to_tag, auth.user)
        except DecodeError as error:
            response = make_response(request, 400, _reason(error.reason), to_tag=to_tag)
        return RegisterOutcome(response, auth.user)

    @staticmethod
    def _check_syntax(request: Request) -> None:
        """What makes a REGISTER malformed whoever sends it, checked before authentication (it says nothing
        about the user table): an AOR that is not a sip:/sips: URI (§10.2; RFC 4475 §3.3.4 unksm2) and a
        Contact that does not parse, or has URI headers outside <> (§20.10; RFC 4475 §3.1.2.13 regbadct)."""
        to_value = request.headers.get("To")
        if to_value is None or _sip_parts(_name_addr(to_value, "To")[0]) is None:
            raise DecodeError("To is not a sip: or sips: URI")
        for value in request.headers.get_all("Contact"):
            for entry in split_list(value):
                if entry.strip() == "*":
                    continue
                uri, _ = _name_addr(entry, "Contact")
                if "<" not in entry and "?" in uri:
                    raise DecodeError("a Contact URI with headers must be in <>")
                if _sip_parts(uri) is None:
                    raise DecodeError("Contact URI is not sip: or sips:")

    def authenticate(
        self, request: Request, now: float, *, to_tag: str, client: str = "", proxy: bool = True
    ) -> AuthOutcome:
        """Digest authentication of a request other than REGISTER (an INVITE: FreeSWITCH's `auth-calls`)
        against the same users, nonces and replay memory as REGISTER.

        `proxy` True (the default) challenges the way a PBX does, as FreeSWITCH (sofia `auth-calls`) and
        Asterisk's chan_sip do for INVITE: 407 with Proxy-Authenticate, answered with
        Proxy-Authorization (§22.3: the server acts for the caller towards the callee, a proxy's role,
        and phones expect it). False: 401 with WWW-Authenticate (§22.2). Either way credentials for our
        realm are taken from both Proxy-Authorization and Authorization, the one the challenge asked for
        first, so a phone that answers in the other header is served too. Failures answer 403, exactly
        as for REGISTER. The decision never looks at the Request-URI or To: whether the callee exists is
        the caller's business, after this (challenge every INVITE that needs it, known callee or not, or
        the 407 itself tells which names exist). ACK and CANCEL cannot be challenged (§22.1) and
        REGISTER goes through `handle`: passing one is a caller's error (ValueError).
        """
        if request.method in ("ACK", "CANCEL", "REGISTER"):
            raise ValueError(f"Registrar.authenticate got a {request.method[:32]} request")
        return self._authenticate(request, now, to_tag, client, proxy=proxy)

    def _authenticate(self, request: Request, now: float, to_tag: str, client: str, *, proxy: bool) -> AuthOutcome:
        headers = ("Proxy-Authorization", "Authorization") if proxy else ("Authorization", "Proxy-Authorization")
        credentials = self._credentials(request, headers, client)
        if credentials is None:
            return AuthOutcome(None, self._challenge(request, now, to_tag, client, proxy=proxy))
        user = credentials.username
        check = self._server.check(
            credentials, method=request.method, password=self._users.get(user), now=now, client=client
        )
        if check.verdict is Verdict.STALE:
            return AuthOutcome(None, self._challenge(request, now, to_tag, client, proxy=proxy, stale=True))
        if check.verdict is not Verdict.OK:
            assert check.failure is not None
            failure = AuthFailure(user, check.failure, request.method)
            return AuthOutcome(None, make_response(request, 403, to_tag=to_tag), failure)
        return AuthOutcome(user, None)

    def _challenge(
        self, request: Request, now: float, to_tag: str, client: str, *, proxy: bool, stale: bool = False
    ) -> Response:
        value = self._server.challenge(now, stale=stale, client=client).header_value()
        status, header = (407, "Proxy-Authenticate") if proxy else (401, "WWW-Authenticate")
        return make_response(request, status, to_tag=to_tag, extra_headers=[(header, value)])

    def _credentials(self, request: Request, headers: tuple[str, ...], client: str) -> Credentials | None:
        """The first parsable credentials for our realm with a nonce we issued to `client` (§22.4: a
        request may carry one Authorization per realm; others are not for us)."""
        for name in headers:
            for value in request.headers.get_all(name)[:MAX_AUTHORIZATION]:
                try:
                    credentials = parse_credentials(value)
                except DecodeError:
                    continue
                if (
                    credentials.realm == self._server.realm
                    and self._server.nonce_issued_at(credentials.nonce, client=client) is not None
                ):
                    return credentials
        return None

    def _register(self, request: Request, now: float, source: Hashable, to_tag: str, user: str) -> Response:
        required = [token.strip(" \t") for value in request.headers.get_all("Require") for token in value.split(",")]
        required = [token for token in required if token]
        if required:
            if not all(_TOKEN.fullmatch(token) for token in required):
                raise DecodeError("malformed Require header")
            return make_response(request, 420, to_tag=to_tag, extra_headers=[("Unsupported", ", ".join(required))])

        to_value = request.headers.get("To")
        if to_value is None:
            raise DecodeError("missing To header")
        parts = _sip_parts(_name_addr(to_value, "To")[0])
        if parts is None or parts[1] not in self._users:
            return make_response(request, 404, to_tag=to_tag)
        if parts[1] != user:
            return make_response(request, 403, to_tag=to_tag)

        call_id = request.call_id()
        cseq, _ = request.cseq()
        expires_values = request.headers.get_all("Expires")
        if len(expires_values) > 1:
            raise DecodeError("more than one Expires header")
        header_expires = _delta_seconds(expires_values[0], "Expires") if expires_values else None

        entries = [entry for value in request.headers.get_all("Contact") for entry in split_list(value)]
        if len(entries) > MAX_CONTACTS:
            raise DecodeError(f"more than {MAX_CONTACTS} contacts")
        self._expired += self._purge(user, now)
        if not entries:
            return self._ok(request, user, now, to_tag)  # a query (§10.3 step 8)
        current = self._bindings.get(user, {})
        if "*" in entries:
            # §10.3 step 6: "*" alone with Expires: 0 removes every binding, unless one of them came with
            # the same Call-ID and a CSeq at least as high.
            if len(entries) != 1 or header_expires != 0:
                raise DecodeError("Contact * needs Expires: 0 and no other contact")
            if any(b.call_id == call_id and cseq <= b.cseq for b in current.values()):
                return self._out_of_order(request, to_tag)
            self._bindings.pop(user, None)
            return self._ok(request, user, now, to_tag)

        changes: list[tuple[str, str, int]] = []  # (key, uri, expires)
        too_brief = False
        for entry in entries:
            uri, params = _name_addr(entry, "Contact")
            if _sip_parts(uri) is None:
                raise DecodeError("Contact URI is not sip: or sips:")
            if "expires" in params:
                param = params["expires"]
                if param is None:
                    raise DecodeError("Contact expires parameter without a value")
                expires = _delta_seconds(param, "Contact expires")
            elif header_expires is not None:
                expires = header_expires
            else:
                expires = self._default_expires
            if 0 < expires < self._min_expires:
                too_brief = True
            changes.append((_uri_key(uri), uri, min(expires, self._max_expires)))
        if too_brief:
            extra = [("Min-Expires", str(self._min_expires))]
            return make_response(request, 423, to_tag=to_tag, extra_headers=extra)
        # §10.3 step 7: the same Call-ID with a CSeq not higher than the stored one aborts the whole
        # request. Checked against the committed bindings, so a contact listed twice is not its own rival.
        for key, _, _ in changes:
            existing = current.get(key)
            if existing is not None and existing.call_id == call_id and cseq <= existing.cseq:
                return self._out_of_order(request, to_tag)
        updated = dict(current)
        for key, uri, expires in changes:
            updated.pop(key, None)  # re-inserted at the end: the newest binding
            if expires > 0:
                updated[key] = Binding(user, uri, now + expires, call_id, cseq, source)
        while len(updated) > self._max_bindings:
            del updated[next(iter(updated))]
        if updated:
            self._bindings[user] = updated
        else:
            self._bindings.pop(user, None)
        return self._ok(request, user, now, to_tag)

    def _out_of_order(self, request: Request, to_tag: str) -> Response:
        extra = [("Retry-After", "1")]
        return make_response(request, 500, "Out-of-Order REGISTER", to_tag=to_tag, extra_headers=extra)

    def _ok(self, request: Request, user: str, now: float, to_tag: str) -> Response:
        contacts = [("Contact", f"<{b.contact}>;expires={b.remaining(now)}") for b in self.lookup(user, now)]
        return make_response(request, 200, to_tag=to_tag, extra_headers=contacts)
