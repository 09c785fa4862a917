"""SIP registrar (RFC 3261 §10.3): the 401 -> REGISTER exchange, refresh, query, unregister (one and *),
423 / clamping / defaults, expiry, CSeq ordering, authorization failures in a safe order, the NAT
source, binding limits, and fuzzed Contact/Expires/Authorization values (a response, never an exception)."""

# ruff: noqa: S106  (test passwords)

from __future__ import annotations

import itertools
from collections.abc import Hashable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autonat.proto.errors import DecodeError
from autonat.sip.digest import Challenge, DigestServer, Failure, client_authorization, parse_challenge
from autonat.sip.message import Request, Response, parse_message
from autonat.sip.registrar import MAX_CONTACTS, AuthFailure, AuthOutcome, Binding, RegisterOutcome, Registrar

SECRET = b"registrar test secret, 32 bytes!"
REALM = "example.org"
USERS = {"105": "pw105", "106": "pw106"}
T0 = 1_000.0
SOURCE = ("udp", ("203.0.113.7", 40000))
CONTACT = "sip:105@10.0.0.5:5062;transport=tcp"
_cnonces = itertools.count()


def make_registrar(**options: int) -> tuple[Registrar, DigestServer]:
    server = DigestServer(REALM, SECRET)
    return Registrar(USERS, server, **options), server


def request(*extra: str, to_user: str = "105", call_id: str = "call-1", cseq: int = 1) -> Request:
    lines = [
        "REGISTER sip:example.org SIP/2.0",
        "Via: SIP/2.0/UDP 10.0.0.5:5062;branch=z9hG4bK-1;rport",
        "From: <sip:105@example.org>;tag=abc",
        f"To: <sip:{to_user}@example.org>",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} REGISTER",
        "Max-Forwards: 70",
        *extra,
    ]
    message = parse_message(("\r\n".join(lines) + "\r\n\r\n").encode())
    assert isinstance(message, Request)
    return message


def authorization(
    challenge: Challenge, *, user: str = "105", password: str | None = None, nc: int = 1, cnonce: str | None = None
) -> str:
    value = client_authorization(
        challenge,
        method="REGISTER",
        uri="sip:example.org",
        username=user,
        password=USERS.get(user, "") if password is None else password,
        cnonce=cnonce or f"cn{next(_cnonces)}",
        nc=nc,
    )
    return f"Authorization: {value}"


def authed(server: DigestServer, now: float, *extra: str, user: str = "105", **kwargs: object) -> Request:
    """A REGISTER carrying valid credentials for a nonce issued at `now`."""
    return request(*extra, authorization(server.challenge(now), user=user), **kwargs)  # type: ignore[arg-type]


def handle(
    registrar: Registrar, req: Request, now: float, source: Hashable, *, to_tag: str, client: str = ""
) -> Response:
    """`Registrar.handle`'s response, after checking the outcome is consistent with it: a failure only
    with 403 and no user; a user whenever the answer is not a challenge, 403 or a parse error."""
    outcome = registrar.handle(req, now, source, to_tag=to_tag, client=client)
    status = outcome.response.status
    if outcome.failure is not None:
        assert status == 403 and outcome.user is None
    if status in (200, 404, 420, 423, 500):
        assert outcome.user is not None and outcome.failure is None
    if status == 401:
        assert outcome.user is None and outcome.failure is None
    return outcome.response


def contacts(response: Response) -> list[str]:
    return response.headers.get_all("Contact")


# --------------------------------------------------------------------------------------------- flows


def test_challenge_then_register() -> None:
    registrar, _ = make_registrar()
    first = request(f"Contact: <{CONTACT}>")
    response = handle(registrar, first, T0, SOURCE, to_tag="t1")
    assert response.status == 401
    assert registrar.count(T0) == 0
    header = response.headers.get("WWW-Authenticate")
    assert header is not None
    challenge = parse_challenge(header)
    assert challenge.realm == REALM and challenge.qop == ("auth",) and not challenge.stale
    assert response.to_tag() == "t1"

    second = request(f"Contact: <{CONTACT}>", authorization(challenge), cseq=2)
    response = handle(registrar, second, T0 + 0.1, SOURCE, to_tag="t2")
    assert (response.status, response.reason) == (200, "OK")
    assert contacts(response) == [f"<{CONTACT}>;expires=3600"]
    assert response.headers.get("Call-ID") == "call-1"
    [binding] = registrar.lookup("105", T0 + 1)
    assert binding == Binding("105", CONTACT, T0 + 0.1 + 3600, "call-1", 2, SOURCE)
    assert registrar.bindings(T0 + 1) == [binding]
    assert registrar.count(T0 + 1) == 1
    assert registrar.lookup("106", T0 + 1) == []


def test_refresh_updates_expiry_and_source() -> None:
    registrar, server = make_registrar()
    assert handle(registrar, authed(server, T0, f"Contact: <{CONTACT}>", cseq=1), T0, SOURCE, to_tag="t").status == 200
    moved = ("udp", ("203.0.113.7", 41234))  # the NAT gave the phone a new port
    response = handle(registrar, authed(server, T0 + 600, f"Contact: <{CONTACT}>", cseq=2), T0 + 600, moved, to_tag="t")
    assert response.status == 200
    [binding] = registrar.lookup("105", T0 + 600)
    assert binding.source == moved
    assert binding.expires_at == T0 + 600 + 3600
    assert binding.cseq == 2
    assert contacts(response) == [f"<{CONTACT}>;expires=3600"]


def test_query_lists_remaining_time() -> None:
    registrar, server = make_registrar()
    handle(registrar, authed(server, T0, f"Contact: <{CONTACT}>", "Expires: 600"), T0, SOURCE, to_tag="t")
    response = handle(registrar, authed(server, T0 + 100.5, cseq=2), T0 + 100.5, SOURCE, to_tag="t")
    assert response.status == 200
    assert contacts(response) == [f"<{CONTACT}>;expires=500"]  # 499.5 rounded up
    assert registrar.lookup("105", T0 + 100.5)[0].cseq == 1  # a query changes nothing


def test_multiple_contacts_unregister_one() -> None:
    registrar, server = make_registrar()
    other = "sip:105@10.0.0.5:5070"
    req = authed(server, T0, f'Contact: <{CONTACT}>, "Desk" <{other}>;q=0.5', "Contact: sip:105@10.0.0.9")
    response = handle(registrar, req, T0, SOURCE, to_tag="t")
    assert response.status == 200
    assert [b.contact for b in registrar.lookup("105", T0)] == ["sip:105@10.0.0.9", other, CONTACT]  # newest first
    response = handle(
        registrar, authed(server, T0 + 1, f"Contact: <{other}>;expires=0", cseq=2), T0 + 1, SOURCE, to_tag="t"
    )
    assert response.status == 200
    assert sorted(contacts(response)) == [f"<{CONTACT}>;expires=3599", "<sip:105@10.0.0.9>;expires=3599"]


def test_unregister_all() -> None:
    registrar, server = make_registrar()
    handle(
        registrar, authed(server, T0, f"Contact: <{CONTACT}>", "Contact: <sip:105@10.0.0.6>"), T0, SOURCE, to_tag="t"
    )
    handle(
        registrar, authed(server, T0, "Contact: <sip:106@10.0.0.7>", user="106", to_user="106"), T0, SOURCE, to_tag="t"
    )
    assert registrar.count(T0) == 3
    for bad in (["Contact: *", "Expires: 60"], ["Contact: *"], ["Contact: *", "Contact: <sip:105@x>", "Expires: 0"]):
        response = handle(registrar, authed(server, T0, *bad, cseq=2), T0, SOURCE, to_tag="t")
        assert response.status == 400, bad
        assert registrar.count(T0) == 3
    response = handle(registrar, authed(server, T0, "Contact: *", "Expires: 0", cseq=2), T0, SOURCE, to_tag="t")
    assert response.status == 200
    assert contacts(response) == []
    assert registrar.lookup("105", T0) == []
    assert [b.user for b in registrar.bindings(T0)] == ["106"]


def test_unregister_all_respects_cseq() -> None:
    registrar, server = make_registrar()
    handle(registrar, authed(server, T0, f"Contact: <{CONTACT}>", cseq=5), T0, SOURCE, to_tag="t")
    response = handle(registrar, authed(server, T0, "Contact: *", "Expires: 0", cseq=5), T0, SOURCE, to_tag="t")
    assert response.status == 500
    assert registrar.count(T0) == 1
    response = handle(
        registrar, authed(server, T0, "Contact: *", "Expires: 0", cseq=3, call_id="other"), T0, SOURCE, to_tag="t"
    )
    assert response.status == 200
    assert registrar.count(T0) == 0


# --------------------------------------------------------------------------------------------- expires


def test_interval_too_brief() -> None:
    registrar, server = make_registrar(min_expires=60)
    response = handle(registrar, authed(server, T0, f"Contact: <{CONTACT}>", "Expires: 30"), T0, SOURCE, to_tag="t")
    assert response.status == 423
    assert response.headers.get("Min-Expires") == "60"
    assert registrar.count(T0) == 0
    # The contact's parameter wins over the header, both ways.
    response = handle(
        registrar,
        authed(server, T0, f"Contact: <{CONTACT}>;expires=30", "Expires: 3600", cseq=2),
        T0,
        SOURCE,
        to_tag="t",
    )
    assert response.status == 423
    # One brief contact refuses the whole request.
    response = handle(
        registrar, authed(server, T0, "Contact: <sip:105@a>, <sip:105@b>;expires=59", cseq=3), T0, SOURCE, to_tag="t"
    )
    assert response.status == 423
    assert registrar.count(T0) == 0
    response = handle(
        registrar, authed(server, T0, f"Contact: <{CONTACT}>;expires=60", "Expires: 30", cseq=4), T0, SOURCE, to_tag="t"
    )
    assert response.status == 200
    assert contacts(response) == [f"<{CONTACT}>;expires=60"]


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (["Expires: 999999"], 3000),
        (["Expires: 99999999999999999999999999"], 3000),
        (["Expires: 0000120"], 120),
        ([], 1800),  # default
    ],
)
def test_expires_clamp_and_default(headers: list[str], expected: int) -> None:
    registrar, server = make_registrar(max_expires=3000, default_expires=1800)
    response = handle(registrar, authed(server, T0, f"Contact: <{CONTACT}>", *headers), T0, SOURCE, to_tag="t")
    assert response.status == 200
    assert contacts(response) == [f"<{CONTACT}>;expires={expected}"]
    assert registrar.lookup("105", T0)[0].expires_at == T0 + expected


def test_expiry_timer_and_expire() -> None:
    registrar, server = make_registrar()
    assert registrar.timer() is None
    handle(registrar, authed(server, T0, f"Contact: <{CONTACT}>", "Expires: 120"), T0, SOURCE, to_tag="t")
    handle(
        registrar, authed(server, T0 + 10, "Contact: <sip:105@b>", "Expires: 60", cseq=2), T0 + 10, SOURCE, to_tag="t"
    )
    assert registrar.timer() == T0 + 70
    assert registrar.expire(T0 + 69) == []
    [gone] = registrar.expire(T0 + 70)
    assert gone.contact == "sip:105@b"
    assert registrar.timer() == T0 + 120
    assert registrar.count(T0 + 119) == 1
    assert registrar.lookup("105", T0 + 120) == []  # expired, though not yet dropped
    assert registrar.count(T0 + 120) == 0
    [gone] = registrar.expire(T0 + 121)
    assert gone.contact == CONTACT
    assert registrar.timer() is None
    assert registrar.expire(T0 + 500) == []


def test_handle_drops_expired_bindings_and_reports_them() -> None:
    registrar, server = make_registrar()
    handle(registrar, authed(server, T0, f"Contact: <{CONTACT}>", "Expires: 60"), T0, SOURCE, to_tag="t")
    # The same Call-ID and CSeq after expiry: the old binding is gone, so this is no out-of-order request.
    response = handle(registrar, authed(server, T0 + 61, "Contact: <sip:105@b>"), T0 + 61, SOURCE, to_tag="t")
    assert response.status == 200
    assert contacts(response) == ["<sip:105@b>;expires=3600"]
    assert [b.contact for b in registrar.expire(T0 + 62)] == [CONTACT]


# --------------------------------------------------------------------------------------------- ordering


def test_cseq_ordering() -> None:
    registrar, server = make_registrar()
    assert handle(registrar, authed(server, T0, f"Contact: <{CONTACT}>", cseq=5), T0, SOURCE, to_tag="t").status == 200
    for cseq in (5, 4):
        response = handle(
            registrar,
            authed(server, T0 + 1, f"Contact: <{CONTACT}>", "Expires: 0", cseq=cseq),
            T0 + 1,
            SOURCE,
            to_tag="t",
        )
        assert response.status == 500
        assert response.headers.get("Retry-After") is not None
        assert registrar.lookup("105", T0 + 1)[0].cseq == 5
    # All or nothing: a new contact in an out-of-order request is not added either.
    req = authed(server, T0 + 1, "Contact: <sip:105@new>", f"Contact: <{CONTACT}>", cseq=3)
    assert handle(registrar, req, T0 + 1, SOURCE, to_tag="t").status == 500
    assert [b.contact for b in registrar.lookup("105", T0 + 1)] == [CONTACT]
    # Another Call-ID (the phone rebooted) may use any CSeq.
    req = authed(server, T0 + 2, f"Contact: <{CONTACT}>", cseq=1, call_id="call-2")
    assert handle(registrar, req, T0 + 2, SOURCE, to_tag="t").status == 200
    [binding] = registrar.lookup("105", T0 + 2)
    assert (binding.call_id, binding.cseq) == ("call-2", 1)


def test_addr_spec_parameters_belong_to_the_header() -> None:
    """§20.10: without <>, every ";" after the URI starts a header parameter."""
    registrar, server = make_registrar()
    response = handle(registrar, authed(server, T0, f"Contact: {CONTACT};expires=90"), T0, SOURCE, to_tag="t")
    assert contacts(response) == ["<sip:105@10.0.0.5:5062>;expires=90"]


def test_same_contact_twice_and_uri_equivalence() -> None:
    registrar, server = make_registrar()
    req = authed(server, T0, f"Contact: <{CONTACT}>;expires=100, <{CONTACT}>;expires=200")
    response = handle(registrar, req, T0, SOURCE, to_tag="t")
    assert response.status == 200
    assert contacts(response) == [f"<{CONTACT}>;expires=200"]  # the last one wins
    # §19.1.4: host and parameters compare case-insensitively, parameter order does not matter.
    same = "sip:105@10.0.0.5:5062;TRANSPORT=TCP"
    response = handle(registrar, authed(server, T0, f"Contact: <{same}>", cseq=2), T0, SOURCE, to_tag="t")
    assert [b.contact for b in registrar.lookup("105", T0)] == [same]


def test_max_bindings_replaces_oldest() -> None:
    registrar, server = make_registrar(max_bindings_per_user=2)
    for index in range(3):
        req = authed(server, T0 + index, f"Contact: <sip:105@10.0.0.{index}>", cseq=index + 1)
        assert handle(registrar, req, T0 + index, SOURCE, to_tag="t").status == 200
    assert [b.contact for b in registrar.lookup("105", T0 + 3)] == ["sip:105@10.0.0.2", "sip:105@10.0.0.1"]
    # A refresh makes a binding the newest, so the other one goes next.
    req = authed(server, T0 + 4, "Contact: <sip:105@10.0.0.1>", cseq=10)
    handle(registrar, req, T0 + 4, SOURCE, to_tag="t")
    req = authed(server, T0 + 5, "Contact: <sip:105@10.0.0.9>", cseq=11)
    handle(registrar, req, T0 + 5, SOURCE, to_tag="t")
    assert [b.contact for b in registrar.lookup("105", T0 + 5)] == ["sip:105@10.0.0.9", "sip:105@10.0.0.1"]


def test_source_is_kept_per_binding() -> None:
    registrar, server = make_registrar()
    tcp_a = ("tcp", 17)  # e.g. a connection id
    handle(registrar, authed(server, T0, f"Contact: <{CONTACT}>"), T0, tcp_a, to_tag="t")
    handle(registrar, authed(server, T0, "Contact: <sip:106@x>", user="106", to_user="106"), T0, SOURCE, to_tag="t")
    assert registrar.lookup("105", T0)[0].source == tcp_a
    assert registrar.lookup("106", T0)[0].source == SOURCE


# --------------------------------------------------------------------------------------------- authorization


def test_no_or_unusable_authorization_gets_401() -> None:
    registrar, server = make_registrar()
    foreign = DigestServer(REALM, b"another secret, also 32 bytes!!!").challenge(T0)
    other_realm = Challenge(realm="elsewhere", nonce=server.challenge(T0).nonce)
    for extra in (
        [],
        ["Authorization: Basic dXNlcjpwYXNz"],
        ['Authorization: Digest username="105", realm="example.org"'],
        [authorization(foreign)],  # a nonce from before a restart: re-challenge, do not forbid
        [authorization(other_realm)],
    ):
        response = handle(registrar, request(f"Contact: <{CONTACT}>", *extra), T0, SOURCE, to_tag="t")
        assert response.status == 401, extra
        header = response.headers.get("WWW-Authenticate")
        assert header is not None and not parse_challenge(header).stale
    # Unauthenticated: 401 whatever the To user, so user names cannot be probed.
    for to_user in ("105", "nobody"):
        assert handle(registrar, request(to_user=to_user), T0, SOURCE, to_tag="t").status == 401
    assert registrar.count(T0) == 0


def test_bad_password_and_unknown_user_get_403() -> None:
    registrar, server = make_registrar()
    for auth in (
        authorization(server.challenge(T0), password="wrong"),
        authorization(server.challenge(T0), user="nobody"),
    ):
        response = handle(registrar, request(f"Contact: <{CONTACT}>", auth), T0, SOURCE, to_tag="t")
        assert response.status == 403
    assert registrar.count(T0) == 0


def test_failures_say_who_and_why_but_answer_alike() -> None:
    """Wrong password, unknown user and replay: the log and the guard learn which (`failure`), the peer
    gets the very same bytes."""
    registrar, server = make_registrar()
    challenge = server.challenge(T0)
    wrong = request(f"Contact: <{CONTACT}>", authorization(challenge, password="wrong", cnonce="x"))
    unknown = request(f"Contact: <{CONTACT}>", authorization(challenge, user="nobody", cnonce="x"))
    first = registrar.handle(wrong, T0, SOURCE, to_tag="t")
    second = registrar.handle(unknown, T0, SOURCE, to_tag="t")
    assert first.failure == AuthFailure("105", Failure.WRONG_PASSWORD, "REGISTER")
    assert second.failure == AuthFailure("nobody", Failure.UNKNOWN_USER, "REGISTER")
    assert first.response.serialize() == second.response.serialize()
    assert first.response.status == 403 and first.user is None
    good = authed(server, T0, f"Contact: <{CONTACT}>")
    outcome = registrar.handle(good, T0, SOURCE, to_tag="t")
    assert isinstance(outcome, RegisterOutcome) and outcome.user == "105" and outcome.failure is None
    replayed = registrar.handle(good, T0 + 1, SOURCE, to_tag="t")
    assert replayed.failure == AuthFailure("105", Failure.REPLAY, "REGISTER")
    assert replayed.response.serialize() == first.response.serialize()


def test_outcome_of_a_good_register_and_of_a_challenge() -> None:
    registrar, server = make_registrar()
    challenge = registrar.handle(request(f"Contact: <{CONTACT}>"), T0, SOURCE, to_tag="t")
    assert (challenge.response.status, challenge.user, challenge.failure) == (401, None, None)
    ok = registrar.handle(authed(server, T0, f"Contact: <{CONTACT}>"), T0, SOURCE, to_tag="t")
    assert (ok.response.status, ok.user, ok.failure) == (200, "105", None)
    # Authenticated but refused afterwards: the user is known, nothing failed authentication.
    other = registrar.handle(authed(server, T0, f"Contact: <{CONTACT}>", to_user="106"), T0, SOURCE, to_tag="t")
    assert (other.response.status, other.user, other.failure) == (403, "105", None)
    # Malformed whoever sends it (RFC 4475 §3.3.4): refused before the credentials are even looked at.
    bad = registrar.handle(authed(server, T0, "Contact: <mailto:x@y>"), T0, SOURCE, to_tag="t")
    assert (bad.response.status, bad.user, bad.failure) == (400, None, None)
    unchallenged = registrar.handle(request("Contact: sip:105@x?Route=%3Csip:p%3E"), T0, SOURCE, to_tag="t")
    assert unchallenged.response.status == 400  # RFC 4475 §3.1.2.13: URI headers outside <>


def test_nonces_are_bound_to_the_client_address() -> None:
    registrar, _ = make_registrar()
    first = registrar.handle(request(f"Contact: <{CONTACT}>"), T0, SOURCE, to_tag="t", client="203.0.113.7")
    header = first.response.headers.get("WWW-Authenticate")
    assert header is not None
    challenge = parse_challenge(header)
    wrong = request(f"Contact: <{CONTACT}>", authorization(challenge, password="guess"), cseq=2)
    # Sent "from" another address (forged, or the phone moved): challenged again, nothing counted.
    moved = registrar.handle(wrong, T0, SOURCE, to_tag="t", client="198.51.100.9")
    assert (moved.response.status, moved.failure) == (401, None)
    same = registrar.handle(wrong, T0, SOURCE, to_tag="t", client="203.0.113.7")
    assert same.failure is not None and same.failure.reason is Failure.WRONG_PASSWORD
    right = request(f"Contact: <{CONTACT}>", authorization(challenge), cseq=3)
    assert registrar.handle(right, T0, SOURCE, to_tag="t", client="203.0.113.7").user == "105"


def test_replayed_register_gets_403() -> None:
    registrar, server = make_registrar()
    req = authed(server, T0, f"Contact: <{CONTACT}>")
    assert handle(registrar, req, T0, SOURCE, to_tag="t").status == 200
    assert handle(registrar, req, T0 + 1, SOURCE, to_tag="t").status == 403


def test_stale_nonce_gets_401_stale() -> None:
    registrar, server = make_registrar()
    req = request(f"Contact: <{CONTACT}>", authorization(server.challenge(T0)))
    response = handle(registrar, req, T0 + 301, SOURCE, to_tag="t")
    assert response.status == 401
    header = response.headers.get("WWW-Authenticate")
    assert header is not None
    challenge = parse_challenge(header)
    assert challenge.stale is True
    assert server.nonce_issued_at(challenge.nonce) == int((T0 + 301) * 1000)
    # A wrong password on an expired nonce is not "stale": the client must not retry silently.
    req = request(f"Contact: <{CONTACT}>", authorization(server.challenge(T0), password="x"))
    assert handle(registrar, req, T0 + 301, SOURCE, to_tag="t").status == 403


def test_wrong_aor() -> None:
    registrar, server = make_registrar()
    response = handle(registrar, authed(server, T0, f"Contact: <{CONTACT}>", to_user="106"), T0, SOURCE, to_tag="t")
    assert response.status == 403  # 106 exists, but we are 105
    response = handle(registrar, authed(server, T0, f"Contact: <{CONTACT}>", to_user="999"), T0, SOURCE, to_tag="t")
    assert response.status == 404
    req = authed(server, T0, "Contact: <sip:105@x>").replace(
        headers=authed(server, T0).headers.replace("To", "<tel:+15551234>")
    )
    assert handle(registrar, req, T0, SOURCE, to_tag="t").status == 400  # RFC 4475 §3.3.4: not a SIP AOR
    assert registrar.count(T0) == 0


def test_require_gets_420() -> None:
    registrar, server = make_registrar()
    response = handle(
        registrar, authed(server, T0, f"Contact: <{CONTACT}>", "Require: path, gruu"), T0, SOURCE, to_tag="t"
    )
    assert response.status == 420
    assert response.headers.get("Unsupported") == "path, gruu"
    assert registrar.count(T0) == 0


# --------------------------------------------------------------------------------------------- INVITE


def invite(*extra: str, to_user: str = "105", method: str = "INVITE") -> Request:
    lines = [
        f"{method} sip:{to_user}@example.org SIP/2.0",
        "Via: SIP/2.0/UDP 10.0.0.6:5060;branch=z9hG4bK-inv;rport",
        "From: <sip:106@example.org>;tag=caller",
        f"To: <sip:{to_user}@example.org>",
        "Call-ID: inv-1",
        f"CSeq: 1 {method}",
        "Max-Forwards: 70",
        "Contact: <sip:106@10.0.0.6>",
        *extra,
    ]
    message = parse_message(("\r\n".join(lines) + "\r\n\r\n").encode())
    assert isinstance(message, Request)
    return message


def credentials_for(
    challenge: Challenge,
    *,
    header: str = "Proxy-Authorization",
    user: str = "106",
    password: str | None = None,
    method: str = "INVITE",
    cnonce: str | None = None,
) -> str:
    value = client_authorization(
        challenge,
        method=method,
        uri="sip:105@example.org",
        username=user,
        password=USERS.get(user, "") if password is None else password,
        cnonce=cnonce or f"cn{next(_cnonces)}",
    )
    return f"{header}: {value}"


def test_invite_is_challenged_with_407_whoever_it_calls() -> None:
    registrar, _ = make_registrar()
    answers = [registrar.authenticate(invite(to_user=user), T0, to_tag="t") for user in ("105", "nobody")]
    for outcome in answers:
        assert isinstance(outcome, AuthOutcome) and not outcome.ok
        assert outcome.user is None and outcome.failure is None
        assert outcome.response is not None and outcome.response.status == 407
        header = outcome.response.headers.get("Proxy-Authenticate")
        assert header is not None and parse_challenge(header).realm == REALM
        assert outcome.response.headers.get("WWW-Authenticate") is None
    # The same answer for a callee that exists and one that does not: nothing to enumerate.
    names = [[name for name, _ in outcome.response.headers.items] for outcome in answers if outcome.response]
    assert len(names) == 2 and names[0] == names[1]
    plain = registrar.authenticate(invite(), T0, to_tag="t", proxy=False)
    assert plain.response is not None and plain.response.status == 401
    assert plain.response.headers.get("WWW-Authenticate") is not None


def test_invite_with_good_credentials_goes_on() -> None:
    registrar, server = make_registrar()
    challenge = server.challenge(T0, client="192.0.2.6")
    for header in ("Proxy-Authorization", "Authorization"):
        req = invite(credentials_for(challenge, header=header))
        outcome = registrar.authenticate(req, T0, to_tag="t", client="192.0.2.6")
        assert outcome == AuthOutcome("106", None, None) and outcome.ok
    # A Proxy-Authorization for somebody else's realm is not ours: challenged, not failed.
    foreign = Challenge(realm="upstream.example", nonce=challenge.nonce)
    outcome = registrar.authenticate(invite(credentials_for(foreign)), T0, to_tag="t", client="192.0.2.6")
    assert outcome.response is not None and outcome.response.status == 407 and outcome.failure is None


def test_invite_failures_answer_alike() -> None:
    registrar, server = make_registrar()
    challenge = server.challenge(T0)
    cases = {
        Failure.WRONG_PASSWORD: credentials_for(challenge, password="guess", cnonce="x"),
        Failure.UNKNOWN_USER: credentials_for(challenge, user="nobody", cnonce="x"),
        # REGISTER credentials replayed on an INVITE: the method is in the digest (A2).
        Failure.UNUSABLE: credentials_for(challenge, cnonce="x").replace("qop=auth", "qop=auth-int"),
    }
    answers = []
    for reason, header in cases.items():
        outcome = registrar.authenticate(invite(header), T0, to_tag="t")
        assert outcome.failure is not None and outcome.failure.reason is reason
        assert outcome.failure.method == "INVITE"
        assert outcome.response is not None and outcome.response.status == 403
        answers.append(outcome.response.serialize())
    assert answers[0] == answers[1] == answers[2]
    as_register = credentials_for(challenge, method="REGISTER")
    outcome = registrar.authenticate(invite(as_register), T0, to_tag="t")
    assert outcome.failure == AuthFailure("106", Failure.WRONG_PASSWORD, "INVITE")


def test_invite_replay_and_stale_nonce() -> None:
    registrar, server = make_registrar()
    req = invite(credentials_for(server.challenge(T0)))
    assert registrar.authenticate(req, T0, to_tag="t").ok
    replayed = registrar.authenticate(req, T0 + 1, to_tag="t")
    assert replayed.failure is not None and replayed.failure.reason is Failure.REPLAY
    old = invite(credentials_for(server.challenge(T0)))
    stale = registrar.authenticate(old, T0 + 301, to_tag="t")
    assert stale.response is not None and stale.response.status == 407 and stale.failure is None
    header = stale.response.headers.get("Proxy-Authenticate")
    assert header is not None and parse_challenge(header).stale


@pytest.mark.parametrize("method", ["ACK", "CANCEL", "REGISTER"])
def test_authenticate_refuses_what_cannot_be_challenged(method: str) -> None:
    registrar, _ = make_registrar()
    with pytest.raises(ValueError, match=method):
        registrar.authenticate(invite(method=method), T0, to_tag="t")


# --------------------------------------------------------------------------------------------- malformed


@pytest.mark.parametrize(
    "extra",
    [
        ["Contact: <sip:105@x", "Expires: 60"],
        ["Contact: <mailto:a@b>"],
        ["Contact: <sip:105@x>;expires"],
        ["Contact: <sip:105@x>;expires=soon"],
        ["Contact: <sip:105@x>;expires=-1"],
        ["Contact: <sip:105@x> junk"],
        ["Contact: Alice sip:105@x"],
        ["Contact: <sip:105@x>", "Expires: ten"],
        ["Contact: <sip:105@x>", "Expires: 60", "Expires: 60"],
        ["Contact: <sip:105@x>", "Expires: ²"],  # a Unicode digit is no delta-seconds
        [f"Contact: <sip:105@{'a' * 2000}>"],
        [", ".join(f"<sip:105@10.0.0.{i}>" for i in range(MAX_CONTACTS + 1)).join(("Contact: ", ""))],
    ],
)
def test_malformed_requests_get_400(extra: list[str]) -> None:
    registrar, server = make_registrar()
    response = handle(registrar, authed(server, T0, *extra), T0, SOURCE, to_tag="t")
    assert response.status == 400
    assert response.reason.startswith("Bad Request")
    assert all(" " <= c <= "~" for c in response.reason)
    assert registrar.count(T0) == 0


def test_ten_contacts_are_fine() -> None:
    registrar, server = make_registrar(max_bindings_per_user=10)
    value = ", ".join(f"<sip:105@10.0.0.{i}>" for i in range(MAX_CONTACTS))
    assert handle(registrar, authed(server, T0, f"Contact: {value}"), T0, SOURCE, to_tag="t").status == 200
    assert registrar.count(T0) == MAX_CONTACTS


def test_hand_built_comma_list_and_non_register() -> None:
    registrar, server = make_registrar()
    base = authed(server, T0)
    req = base.replace(headers=base.headers.with_header("Contact", "<sip:105@a>, sip:105@b;expires=100"))
    response = handle(registrar, req, T0, SOURCE, to_tag="t")
    assert response.status == 200
    assert sorted(contacts(response)) == ["<sip:105@a>;expires=3600", "<sip:105@b>;expires=100"]
    with pytest.raises(ValueError, match="INVITE"):
        handle(registrar, base.replace(method="INVITE"), T0, SOURCE, to_tag="t")


def test_constructor_checks() -> None:
    server = DigestServer(REALM, SECRET)
    for options in (
        {"min_expires": 100, "default_expires": 50},
        {"max_expires": 0, "default_expires": 0, "min_expires": 0},
    ):
        with pytest.raises(ValueError, match="expires"):
            Registrar(USERS, server, **options)
    with pytest.raises(ValueError, match="max_bindings"):
        Registrar(USERS, server, max_bindings_per_user=0)


# --------------------------------------------------------------------------------------------- fuzzing

_STATUSES = {200, 400, 401, 403, 404, 423, 500}
_RANDOM_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n\x00"), max_size=120)
_SECONDS = st.integers(min_value=0, max_value=10**12).map(str)
# Well-formed contacts with random intervals reach 200/423/500 and the binding logic, random text the parser.
_CONTACT = st.builds(
    lambda host, expires: f"<sip:105@{host}>" + ("" if expires is None else f";expires={expires}"),
    st.sampled_from(["a", "b", "10.0.0.1:5060", "A"]),
    st.none() | _SECONDS | _RANDOM_TEXT,
)
_HEADER_TEXT = (
    _RANDOM_TEXT
    | _CONTACT
    | st.sampled_from(["*", "<sip:105@a>, *", '"x" <sip:105@b>;q=1', "<sip:105@a>,,<sip:105@b>"])
)


@settings(max_examples=400, database=None, deadline=None)
@given(
    contact_values=st.lists(_HEADER_TEXT, max_size=3),
    expires=st.none() | _SECONDS | _RANDOM_TEXT,
    wire=st.booleans(),
    cseq=st.integers(min_value=1, max_value=3),
)
def test_fuzz_contact_and_expires(contact_values: list[str], expires: str | None, wire: bool, cseq: int) -> None:
    registrar, server = make_registrar()
    handle(registrar, authed(server, T0, "Contact: <sip:105@a>", cseq=2), T0, SOURCE, to_tag="t")
    base = authed(server, T0, cseq=cseq)
    headers = base.headers
    for value in contact_values:
        headers = headers.with_header("Contact", value)
    if expires is not None:
        headers = headers.with_header("Expires", expires)
    req = base.replace(headers=headers)
    if wire:  # through the codec, as a peer would send it; the codec may refuse it first
        try:
            parsed = parse_message(req.serialize())
        except DecodeError:
            return
        assert isinstance(parsed, Request)
        req = parsed
    response = handle(registrar, req, T0, SOURCE, to_tag="t")
    assert response.status in _STATUSES
    assert isinstance(response.serialize(), bytes)
    assert registrar.count(T0) <= 5


@settings(max_examples=300, database=None, deadline=None)
@given(st.integers(min_value=0, max_value=2**32), st.text(max_size=20))
def test_fuzz_authorization(position: int, insert: str) -> None:
    registrar, server = make_registrar()
    value = authorization(server.challenge(T0)).partition(": ")[2]
    position %= len(value) + 1
    mutated = (value[:position] + insert + value[position + len(insert) :]).replace("\r", "").replace("\n", "")
    req = request(f"Contact: <{CONTACT}>").with_header("Authorization", mutated.replace("\x00", ""))
    response = handle(registrar, req, T0, SOURCE, to_tag="t")
    assert response.status in _STATUSES
    if response.status == 200:
        assert registrar.count(T0) == 1
