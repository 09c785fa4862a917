"""HTTP Digest for SIP: RFC test vectors byte for byte, the client/server round trip, stateless nonces
(expiry, tampering, another secret), nonce-count replay defence, parser caps and quoting, and fuzzing:
a value or DecodeError, nothing else."""

# ruff: noqa: S106, S107  (the passwords here are test vectors, not secrets)

from __future__ import annotations

import base64
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autonat.proto.errors import DecodeError
from autonat.sip import digest
from autonat.sip.digest import (
    Algorithm,
    Challenge,
    Check,
    Credentials,
    DigestServer,
    Failure,
    Verdict,
    client_authorization,
    compute_response,
    parse_challenge,
    parse_credentials,
)

SECRET = b"0123456789abcdef0123456789abcdef"
T0 = 1_700_000_000.0

# RFC 2617 §3.5 (the Authorization header, folded onto one line as a SIP/HTTP parser sees it).
RFC2617_CHALLENGE = (
    'Digest realm="testrealm@host.com", qop="auth,auth-int", '
    'nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", opaque="5ccc069c403ebaf9f0171e9517f40e41"'
)
RFC2617_AUTHORIZATION = (
    'Digest username="Mufasa", realm="testrealm@host.com", nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", '
    'uri="/dir/index.html", qop=auth, nc=00000001, cnonce="0a4f113b", '
    'response="6629fae49393a05397450978507c4ef1", opaque="5ccc069c403ebaf9f0171e9517f40e41"'
)
# RFC 7616 §3.9.1 (note: that RFC's password is "Circle of Life", lower-case "of", unlike RFC 2617's).
RFC7616_CHALLENGE = (
    'Digest realm="http-auth@example.org", qop="auth, auth-int", algorithm=SHA-256, '
    'nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"'
)
RFC7616_AUTHORIZATION = (
    'Digest username="Mufasa", realm="http-auth@example.org", uri="/dir/index.html", algorithm=SHA-256, '
    'nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", nc=00000001, '
    'cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ", qop=auth, '
    'response="753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1", '
    'opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"'
)


# --------------------------------------------------------------------------------------------- vectors


def test_rfc2617_vector() -> None:
    challenge = parse_challenge(RFC2617_CHALLENGE)
    assert challenge == Challenge(
        realm="testrealm@host.com",
        nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093",
        algorithm=Algorithm.MD5,
        qop=("auth", "auth-int"),
        opaque="5ccc069c403ebaf9f0171e9517f40e41",
    )
    value = client_authorization(
        challenge, method="GET", uri="/dir/index.html", username="Mufasa", password="Circle Of Life", cnonce="0a4f113b"
    )
    ours = parse_credentials(value)
    theirs = parse_credentials(RFC2617_AUTHORIZATION)
    assert theirs.response == ours.response == "6629fae49393a05397450978507c4ef1"
    assert ours == Credentials(
        username="Mufasa",
        realm="testrealm@host.com",
        nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093",
        uri="/dir/index.html",
        response="6629fae49393a05397450978507c4ef1",
        algorithm=Algorithm.MD5,
        qop="auth",
        nc="00000001",
        cnonce="0a4f113b",
        opaque="5ccc069c403ebaf9f0171e9517f40e41",
    )
    assert ours == theirs
    assert 'response="6629fae49393a05397450978507c4ef1"' in value


def test_rfc7616_sha256_vector() -> None:
    challenge = parse_challenge(RFC7616_CHALLENGE)
    assert challenge.algorithm is Algorithm.SHA256
    assert challenge.qop == ("auth", "auth-int")
    assert challenge.opaque == "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"
    value = client_authorization(
        challenge,
        method="GET",
        uri="/dir/index.html",
        username="Mufasa",
        password="Circle of Life",
        cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
    )
    expected = "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"
    assert parse_credentials(value) == parse_credentials(RFC7616_AUTHORIZATION)
    assert parse_credentials(value).response == expected
    assert f'response="{expected}"' in value
    assert "algorithm=SHA-256" in value


def test_rfc2069_style_without_qop() -> None:
    """No qop offered: response = H(HA1:nonce:HA2), no cnonce/nc sent (RFC 2617 §3.2.2.1)."""
    challenge = Challenge(realm="testrealm@host.com", nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", qop=())
    value = client_authorization(
        challenge, method="GET", uri="/dir/index.html", username="Mufasa", password="Circle Of Life", cnonce="x"
    )
    credentials = parse_credentials(value)
    assert credentials.qop is None and credentials.nc is None and credentials.cnonce is None
    assert "cnonce" not in value and "qop" not in value
    assert credentials.response == compute_response(
        Algorithm.MD5,
        username="Mufasa",
        realm="testrealm@host.com",
        password="Circle Of Life",
        method="GET",
        uri="/dir/index.html",
        nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093",
    )
    # The RFC 2069 form is a different digest from the qop=auth one.
    assert credentials.response != "6629fae49393a05397450978507c4ef1"


def test_client_authorization_refuses_bad_arguments() -> None:
    challenge = Challenge(realm="r", nonce="n")
    ok = {"method": "REGISTER", "uri": "sip:x", "username": "u", "password": "p", "cnonce": "c"}
    for change in ({"nc": 0}, {"nc": 2**32}, {"uri": "sip:x\r\nVia: evil"}, {"username": "a\nb"}, {"cnonce": ""}):
        with pytest.raises(ValueError, match=r"."):
            client_authorization(challenge, **{**ok, **change})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="qop"):
        client_authorization(Challenge(realm="r", nonce="n", qop=("auth-int",)), **ok)  # type: ignore[arg-type]
    assert "nc=0000002a" in client_authorization(challenge, **ok, nc=42)


# --------------------------------------------------------------------------------------------- parsing


def test_header_value_format_and_round_trip() -> None:
    challenge = Challenge(realm="sip.example", nonce="abc", opaque='o"p\\q', stale=True)
    value = challenge.header_value()
    assert (
        value == 'Digest realm="sip.example", nonce="abc", algorithm=MD5, qop="auth", opaque="o\\"p\\\\q", stale=true'
    )
    assert parse_challenge(value) == challenge
    plain = Challenge(realm="r", nonce="n", algorithm=Algorithm.SHA256, qop=())
    assert plain.header_value() == 'Digest realm="r", nonce="n", algorithm=SHA-256'
    assert parse_challenge(plain.header_value()) == plain


def test_parsing_is_case_insensitive_and_tolerant() -> None:
    value = ' digest  REALM = "r" ,, Nonce=abc==  ,ALGORITHM="sha-256",qop=AUTH, Stale=TRUE, domain="sip:a sip:b", x=y,'
    assert parse_challenge(value) == Challenge(realm="r", nonce="abc==", algorithm=Algorithm.SHA256, stale=True)
    assert parse_challenge('Digest realm="r", nonce="n", stale=no').stale is False
    assert parse_challenge('Digest realm="r", nonce="n"').qop == ()


def test_quoted_pairs_are_undone() -> None:
    credentials = parse_credentials(
        r'Digest username="a\"b\\c\d", realm="r, with comma", nonce="n", uri="sip:x", '
        f'response="{"A" * 32}", qop="auth", nc=0000000A, cnonce="c"'
    )
    assert credentials.username == 'a"b\\cd'
    assert credentials.realm == "r, with comma"
    assert credentials.response == "a" * 32  # lower-cased
    assert credentials.nc == "0000000a"
    assert credentials.qop == "auth"


@pytest.mark.parametrize(
    "value",
    [
        "",
        "Digest",
        "Basic realm=x",
        "Digestrealm=x, nonce=y",
        'Digest realm="r"',  # no nonce
        'Digest nonce="n"',  # no realm
        'Digest realm="r", nonce=""',
        'Digest realm="r", nonce="n", algorithm=MD5-sess',
        'Digest realm="r", nonce="n", algorithm=SHA-512-256',
        'Digest realm="r", nonce="n", qop="auth-int"',
        'Digest realm="r", nonce="n", qop=""',
        'Digest realm="r", nonce="n", realm="s"',  # repeated
        'Digest realm="r, nonce="n"',  # unterminated
        'Digest realm="r\x01", nonce="n"',
        'Digest realm="r" nonce="n"',  # missing comma
        'Digest realm=, nonce="n"',
        'Digest =x, realm="r", nonce="n"',
        'Digest realm="r", nonce="n", stale',
        'Digest realm="r", nonce="n\\',
    ],
)
def test_bad_challenges(value: str) -> None:
    with pytest.raises(DecodeError):
        parse_challenge(value)


GOOD_CREDENTIALS = (
    'Digest username="u", realm="r", nonce="n", uri="sip:x", response="'
    + "0" * 32
    + '", qop=auth, nc=00000001, cnonce="c"'
)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ('username="u", ', ""),
        ('uri="sip:x", ', ""),
        ('response="' + "0" * 32 + '"', 'response="' + "0" * 31 + '"'),
        ('response="' + "0" * 32 + '"', 'response="' + "g" * 32 + '"'),
        ("qop=auth,", "algorithm=SHA-256, qop=auth,"),  # an MD5-length response for SHA-256
        ("nc=00000001", "nc=1"),
        ("nc=00000001, ", ""),
        (', cnonce="c"', ""),
        (', cnonce="c"', ', cnonce=""'),
        ("qop=auth", 'qop=""'),
    ],
)
def test_bad_credentials(old: str, new: str) -> None:
    assert parse_credentials(GOOD_CREDENTIALS).username == "u"
    value = GOOD_CREDENTIALS.replace(old, new)
    assert value != GOOD_CREDENTIALS
    with pytest.raises(DecodeError):
        parse_credentials(value)


def test_caps() -> None:
    base = 'Digest realm="r", nonce="n"'
    assert parse_challenge(base + ", x=" + "a" * digest.MAX_PARAM_VALUE).realm == "r"
    with pytest.raises(DecodeError, match="parameter value longer"):
        parse_challenge(base + ", x=" + "a" * (digest.MAX_PARAM_VALUE + 1))
    with pytest.raises(DecodeError, match="parameter value longer"):
        parse_challenge(base + ', x="' + "a" * (digest.MAX_PARAM_VALUE + 1) + '"')
    many = base + "".join(f", p{i}=1" for i in range(digest.MAX_PARAMS - 2))
    assert parse_challenge(many).nonce == "n"
    with pytest.raises(DecodeError, match="more than 32"):
        parse_challenge(many + ", extra=1")
    with pytest.raises(DecodeError, match="longer than 4096"):
        parse_challenge(base + " " * (digest.MAX_VALUE - len(base) + 1))
    assert parse_challenge(base + " " * (digest.MAX_VALUE - len(base))).realm == "r"


# --------------------------------------------------------------------------------------------- server


def _answer(
    server: DigestServer, now: float, *, password: str = "secret", nc: int = 1, cnonce: str = "c1"
) -> Credentials:
    challenge = parse_challenge(server.challenge(now).header_value())
    value = client_authorization(
        challenge, method="REGISTER", uri="sip:example.org", username="105", password=password, cnonce=cnonce, nc=nc
    )
    return parse_credentials(value)


@pytest.mark.parametrize("algorithm", list(Algorithm))
def test_round_trip_ok(algorithm: Algorithm) -> None:
    server = DigestServer("example.org", SECRET, algorithm=algorithm)
    credentials = _answer(server, T0)
    assert credentials.algorithm is algorithm
    assert server.verify(credentials, method="REGISTER", password="secret", now=T0 + 1) is Verdict.OK


def test_nonce_format() -> None:
    server = DigestServer("example.org", SECRET)
    nonce = server.challenge(T0).nonce
    raw = base64.urlsafe_b64decode(nonce)
    assert len(nonce) == 32 and len(raw) == 24
    assert int.from_bytes(raw[:8], "big") == int(T0 * 1000)
    assert server.nonce_issued_at(nonce) == int(T0 * 1000)
    assert server.challenge(-5.0).nonce == server.challenge(0.0).nonce  # clamped to 0
    assert server.challenge(T0, stale=True).stale is True
    assert server.challenge(T0).qop == ("auth",)
    with pytest.raises(ValueError, match="NaN"):
        server.challenge(float("nan"))


def test_wrong_password_method_realm_algorithm_fail() -> None:
    server = DigestServer("example.org", SECRET)
    good = _answer(server, T0)
    assert server.verify(good, method="REGISTER", password="other", now=T0) is Verdict.FAILED
    assert server.verify(good, method="INVITE", password="secret", now=T0) is Verdict.FAILED
    assert server.verify(good, method="REGISTER", password=None, now=T0) is Verdict.FAILED
    from dataclasses import replace

    assert server.verify(replace(good, realm="evil"), method="REGISTER", password="secret", now=T0) is Verdict.FAILED
    assert server.verify(replace(good, uri="sip:x"), method="REGISTER", password="secret", now=T0) is Verdict.FAILED
    sha = replace(good, algorithm=Algorithm.SHA256)
    assert server.verify(sha, method="REGISTER", password="secret", now=T0) is Verdict.FAILED
    for no_qop in (
        replace(good, qop=None),
        replace(good, qop="auth-int"),
        replace(good, nc="zz"),
        replace(good, cnonce=None),
    ):
        assert server.verify(no_qop, method="REGISTER", password="secret", now=T0) is Verdict.FAILED
    assert server.verify(good, method="REGISTER", password="secret", now=T0) is Verdict.OK


def test_expired_and_future_nonces_are_stale_only_when_correct() -> None:
    server = DigestServer("example.org", SECRET, nonce_lifetime=300)
    credentials = _answer(server, T0)
    assert server.verify(credentials, method="REGISTER", password="secret", now=T0 + 301) is Verdict.STALE
    assert server.verify(credentials, method="REGISTER", password="wrong", now=T0 + 301) is Verdict.FAILED
    assert server.verify(credentials, method="REGISTER", password=None, now=T0 + 301) is Verdict.FAILED
    assert server.verify(credentials, method="REGISTER", password="secret", now=T0 - 6) is Verdict.STALE
    assert server.verify(credentials, method="REGISTER", password="secret", now=T0 - 4) is Verdict.OK
    # Same nonce and cnonce as above would be a replay; a new cnonce at the edge of the lifetime is fine.
    edge = _answer(server, T0, cnonce="c2")
    assert server.verify(edge, method="REGISTER", password="secret", now=T0 + 300) is Verdict.OK


def test_tampered_or_foreign_nonce_fails() -> None:
    server = DigestServer("example.org", SECRET)
    nonce = server.challenge(T0).nonce
    raw = bytearray(base64.urlsafe_b64decode(nonce))
    raw[7] ^= 1  # another issue time, same MAC
    tampered = base64.urlsafe_b64encode(bytes(raw)).decode()
    other = DigestServer("example.org", b"another secret of 32 bytes......").challenge(T0).nonce
    # b64decode would skip a junk character: the strict shape check must not let "ab!cd" alias "abcd".
    junk = nonce[:10] + "!" + nonce[10:]
    for bad in (tampered, other, junk, nonce[:-1], nonce + "A", "", "n" * 32):
        challenge = Challenge(realm="example.org", nonce=bad)
        value = client_authorization(
            challenge, method="REGISTER", uri="sip:e", username="105", password="s", cnonce="c"
        )
        credentials = parse_credentials(value)
        assert server.nonce_issued_at(bad) is None
        assert server.verify(credentials, method="REGISTER", password="s", now=T0) is Verdict.FAILED


def test_replayed_nonce_count_fails() -> None:
    server = DigestServer("example.org", SECRET)
    first = _answer(server, T0, nc=1)
    assert server.verify(first, method="REGISTER", password="secret", now=T0) is Verdict.OK
    assert server.verify(first, method="REGISTER", password="secret", now=T0 + 1) is Verdict.FAILED  # verbatim replay
    challenge = Challenge(realm="example.org", nonce=first.nonce)

    def with_nc(nc: int, cnonce: str = "c1") -> Credentials:
        value = client_authorization(
            challenge, method="REGISTER", uri="sip:example.org", username="105", password="secret", cnonce=cnonce, nc=nc
        )
        return parse_credentials(value)

    assert server.verify(with_nc(3), method="REGISTER", password="secret", now=T0) is Verdict.OK
    assert server.verify(with_nc(2), method="REGISTER", password="secret", now=T0) is Verdict.FAILED
    assert server.verify(with_nc(3), method="REGISTER", password="secret", now=T0) is Verdict.FAILED
    assert server.verify(with_nc(4), method="REGISTER", password="secret", now=T0) is Verdict.OK
    # A new cnonce is a new count sequence (cannot be forged without the password).
    assert server.verify(with_nc(1, "c2"), method="REGISTER", password="secret", now=T0) is Verdict.OK
    # A failed attempt does not advance the count.
    assert server.verify(with_nc(9), method="REGISTER", password="nope", now=T0) is Verdict.FAILED
    assert server.verify(with_nc(5), method="REGISTER", password="secret", now=T0) is Verdict.OK


def test_replay_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(digest, "REPLAY_CACHE_SIZE", 5)
    server = DigestServer("example.org", SECRET)
    first = _answer(server, T0)
    assert server.verify(first, method="REGISTER", password="secret", now=T0) is Verdict.OK
    for index in range(10):
        credentials = _answer(server, T0, cnonce=f"other{index}")
        assert server.verify(credentials, method="REGISTER", password="secret", now=T0) is Verdict.OK
        assert len(server._seen) <= 5
    # Evicted: the documented limit of the defence (the nonce still expires).
    assert server.verify(first, method="REGISTER", password="secret", now=T0) is Verdict.OK
    assert server.verify(first, method="REGISTER", password="secret", now=T0 + 400) is Verdict.STALE


def test_replay_memory_drops_expired_nonces() -> None:
    server = DigestServer("example.org", SECRET, nonce_lifetime=10)
    for index in range(20):
        credentials = _answer(server, T0, cnonce=f"c{index}")
        assert server.verify(credentials, method="REGISTER", password="secret", now=T0) is Verdict.OK
    later = _answer(server, T0 + 100)
    assert server.verify(later, method="REGISTER", password="secret", now=T0 + 100) is Verdict.OK
    assert len(server._seen) == 1


def test_check_says_why() -> None:
    """The reason is for the server's log; the verdict (what the wire sees) is FAILED for all of them."""
    from dataclasses import replace

    server = DigestServer("example.org", SECRET)
    good = _answer(server, T0)
    cases = [
        (good, "other", Check(Verdict.FAILED, Failure.WRONG_PASSWORD)),
        (good, None, Check(Verdict.FAILED, Failure.UNKNOWN_USER)),
        (replace(good, realm="evil"), "secret", Check(Verdict.FAILED, Failure.UNUSABLE)),
        (replace(good, algorithm=Algorithm.SHA256), "secret", Check(Verdict.FAILED, Failure.UNUSABLE)),
        (replace(good, nonce="n" * 32), "secret", Check(Verdict.FAILED, Failure.UNUSABLE)),
        (replace(good, qop=None), "secret", Check(Verdict.FAILED, Failure.UNUSABLE)),
        (good, "secret", Check(Verdict.OK)),
        (good, "secret", Check(Verdict.FAILED, Failure.REPLAY)),
    ]
    for credentials, password, expected in cases:
        assert server.check(credentials, method="REGISTER", password=password, now=T0) == expected
    assert server.check(_answer(server, T0), method="REGISTER", password="secret", now=T0 + 301) == Check(Verdict.STALE)
    # An unknown user with an expired nonce is still an unknown user, not "stale".
    stale = _answer(server, T0, cnonce="c9")
    assert server.check(stale, method="REGISTER", password=None, now=T0 + 301).failure is Failure.UNKNOWN_USER


def test_unknown_user_and_wrong_password_cost_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same timing class: both compute exactly one response and compare it; nothing returns early on
    the user name."""
    server = DigestServer("example.org", SECRET)
    calls: list[str] = []
    real = digest.compute_response

    def counting(algorithm: Algorithm, **kwargs: str | None) -> str:
        calls.append(str(kwargs["password"]))
        return real(algorithm, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(digest, "compute_response", counting)
    credentials = _answer(server, T0)
    calls.clear()
    assert server.verify(credentials, method="REGISTER", password="wrong", now=T0) is Verdict.FAILED
    assert server.verify(credentials, method="REGISTER", password=None, now=T0) is Verdict.FAILED
    assert calls == ["wrong", ""]


def test_nonces_are_bound_to_the_client() -> None:
    server = DigestServer("example.org", SECRET)
    nonce = server.challenge(T0, client="203.0.113.7").nonce
    assert server.nonce_issued_at(nonce, client="203.0.113.7") == int(T0 * 1000)
    assert server.nonce_issued_at(nonce, client="203.0.113.8") is None
    assert server.nonce_issued_at(nonce) is None
    # Without a client the nonce is the one of before (same MAC input): nothing changes for old callers.
    assert server.challenge(T0).nonce == server.challenge(T0, client="").nonce
    assert server.challenge(T0).nonce != nonce
    challenge = parse_challenge(server.challenge(T0, client="2001:db8::1").header_value())
    value = client_authorization(
        challenge, method="INVITE", uri="sip:105@example.org", username="105", password="pw", cnonce="c"
    )
    credentials = parse_credentials(value)
    moved = server.check(credentials, method="INVITE", password="pw", now=T0, client="2001:db8::2")
    assert moved == Check(Verdict.FAILED, Failure.UNUSABLE)
    assert server.verify(credentials, method="INVITE", password="pw", now=T0, client="2001:db8::1") is Verdict.OK


def test_failures_leave_no_trace() -> None:
    """A flood of fresh nonces with wrong passwords (or unknown users) stores nothing: only verified
    responses enter the nonce-count memory."""
    server = DigestServer("example.org", SECRET)
    for index in range(2000):
        credentials = _answer(server, T0 + index * 0.001, password="guess", cnonce=f"c{index}")
        password = "secret" if index % 2 else None
        assert server.verify(credentials, method="REGISTER", password=password, now=T0 + 2) is Verdict.FAILED
    assert len(server._seen) == 0


def test_server_arguments() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        DigestServer("r", b"short")
    with pytest.raises(ValueError, match="positive"):
        DigestServer("r", SECRET, nonce_lifetime=0)
    with pytest.raises(ValueError, match="control"):
        DigestServer("r\r\n", SECRET)


# --------------------------------------------------------------------------------------------- fuzzing


def _check(parser: object, value: str) -> None:
    assert callable(parser)
    try:
        result = parser(value)
    except DecodeError as error:
        assert "\n" not in error.reason
        return
    assert isinstance(result, Challenge | Credentials)


_HEADER_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=300)


@settings(max_examples=1_500, database=None)
@given(_HEADER_TEXT)
def test_fuzz_random_text(value: str) -> None:
    _check(parse_challenge, value)
    _check(parse_credentials, value)
    _check(parse_challenge, "Digest " + value)
    _check(parse_credentials, "Digest " + value)


_SEEDS = [RFC2617_CHALLENGE, RFC2617_AUTHORIZATION, RFC7616_CHALLENGE, RFC7616_AUTHORIZATION, GOOD_CREDENTIALS]
_PIECES = ['"', "\\", ",", "=", " ", "\t", "\x00", "é", "Digest", "qop=auth", "nc=", 'realm="', "\r\n", ";", "a" * 2000]


@settings(max_examples=2_000, database=None)
@given(st.integers(min_value=0, max_value=2**63))
def test_fuzz_mutations(seed: int) -> None:
    """Valid values mutated (cut, dropped, inserted, duplicated spans): a value or DecodeError."""
    rng = random.Random(seed)
    value = rng.choice(_SEEDS)
    for _ in range(rng.randint(1, 4)):
        position = rng.randint(0, len(value))
        action = rng.randrange(4)
        if action == 0:
            value = value[:position]
        elif action == 1:
            value = value[:position] + value[position + rng.randint(1, 8) :]
        elif action == 2:
            value = value[:position] + rng.choice(_PIECES) + value[position:]
        else:
            value = value[:position] + value[rng.randint(0, len(value)) :][:50] + value[position:]
    _check(parse_challenge, value)
    _check(parse_credentials, value)


@settings(max_examples=300, database=None)
@given(
    realm=st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), max_size=40),
    nonce=st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), min_size=1, max_size=40),
    algorithm=st.sampled_from(list(Algorithm)),
    qop=st.sampled_from([(), ("auth",), ("auth", "auth-int"), ("auth-int", "auth")]),
    opaque=st.none() | st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), max_size=40),
    stale=st.booleans(),
)
def test_header_value_round_trips(
    realm: str, nonce: str, algorithm: Algorithm, qop: tuple[str, ...], opaque: str | None, stale: bool
) -> None:
    challenge = Challenge(realm=realm, nonce=nonce, algorithm=algorithm, qop=qop, opaque=opaque, stale=stale)
    assert parse_challenge(challenge.header_value()) == challenge


@settings(max_examples=200, database=None)
@given(
    username=st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), max_size=30),
    password=st.text(max_size=30),
    nc=st.integers(min_value=1, max_value=2**32 - 1),
    algorithm=st.sampled_from(list(Algorithm)),
)
def test_client_server_round_trip(username: str, password: str, nc: int, algorithm: Algorithm) -> None:
    server = DigestServer("example.org", SECRET, algorithm=algorithm)
    challenge = parse_challenge(server.challenge(T0).header_value())
    value = client_authorization(
        challenge, method="REGISTER", uri="sip:example.org", username=username, password=password, cnonce="cn", nc=nc
    )
    credentials = parse_credentials(value)
    assert credentials.username == username
    assert server.verify(credentials, method="REGISTER", password=password, now=T0) is Verdict.OK
    assert server.verify(credentials, method="REGISTER", password=password + "x", now=T0) is Verdict.FAILED
