"""The authentication guard (autonat.sip.guard) on a fake clock: the threshold in a sliding window, the
growing back-off and when strikes are forgotten, IPv6 /64 sources, the per-user rule against a
distributed dictionary, bounded tables under an address-rotating flood of a million failures, the
brief's acceptance (300 wrong passwords from one source, the right one from another registers at
once) through the real registrar, and the failure log line under arbitrary user names."""

from __future__ import annotations

import datetime
import re
import urllib.parse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autonat.sip.digest import Challenge, DigestServer, Failure, client_authorization, parse_challenge
from autonat.sip.guard import (
    LOG_TAG,
    MAX_LOGGED_USER,
    MAX_USER_KEY,
    AuthGuard,
    Ban,
    failure_line,
    source_key,
)
from autonat.sip.message import Request, parse_message
from autonat.sip.registrar import Registrar

T0 = 10_000.0
A = "203.0.113.7"
B = "198.51.100.9"


def fail(
    guard: AuthGuard, ip: str, count: int, *, user: str = "105", start: float = T0, step: float = 0.01
) -> list[Ban]:
    """`count` failures from `ip` at `start`, `start + step`, ...: the bans they started."""
    bans = [guard.failed(ip, user, start + index * step) for index in range(count)]
    return [ban for ban in bans if ban is not None]


# --------------------------------------------------------------------------------------------- per source


def test_the_threshold_th_failure_bans() -> None:
    guard = AuthGuard()
    assert fail(guard, A, 4) == []
    assert guard.refused(A, T0 + 0.04) is None
    ban = guard.failed(A, "105", T0 + 0.04)
    assert ban == Ban(A, T0 + 0.04 + 60, 60.0, 1, targeted=False)
    assert guard.refused(A, T0 + 0.05) == pytest.approx(59.99)
    assert guard.refused(A, T0 + 30.04) == pytest.approx(30.0)
    assert guard.refused(B, T0 + 1) is None  # another source is not concerned
    assert guard.refused(A, T0 + 60.04) is None  # the ban is over
    assert guard.stats.as_dict() == {
        "failures": 5,
        "successes": 0,
        "refused": 2,
        "bans": 1,
        "targeted_bans": 0,
        "attacks": 0,
        "evicted_sources": 0,
        "evicted_bans": 0,
        "evicted_users": 0,
    }


def test_the_window_slides() -> None:
    """Five failures within 60 s ban; four in any 60 s never do, however long it goes on."""
    guard = AuthGuard(user_threshold=1000)  # the per-user rule would see 40 failures for 105 in 600 s
    assert fail(guard, A, 40, start=T0, step=15.0) == []  # one every 15 s: 4 in any 60 s window
    assert guard.refused(A, T0 + 1000) is None
    other = AuthGuard()
    assert fail(other, A, 4, start=T0, step=14.9) == []
    ban = other.failed(A, "105", T0 + 4 * 14.9)  # the 5th, 59.6 s after the 1st
    assert ban is not None and ban.strike == 1


def test_back_off_doubles_and_is_capped() -> None:
    guard = AuthGuard(ban=60, max_ban=600)
    now, lengths = T0, []
    for _ in range(7):
        [ban] = fail(guard, A, 5, start=now)
        lengths.append(ban.seconds)
        assert ban.until == pytest.approx(now + 0.04 + ban.seconds)
        assert guard.refused(A, ban.until - 0.001) is not None
        now = ban.until  # the next round of guesses as soon as the ban ends
        assert guard.refused(A, now) is None
    assert lengths == [60, 120, 240, 480, 600, 600, 600]
    assert [guard.failed(A, "105", now + 1) for _ in range(2)] == [None, None]  # starts again at 0


def test_strikes_are_forgotten_after_a_quiet_period() -> None:
    guard = AuthGuard(ban=60, max_ban=3600, forget=1800)
    [first] = fail(guard, A, 5)
    [second] = fail(guard, A, 5, start=first.until + 1)
    assert second.strike == 2 and second.seconds == 120
    [third] = fail(guard, A, 5, start=second.until + 1799)  # remembered: 1799 s after the ban ended
    assert third.strike == 3 and third.seconds == 240
    [fourth] = fail(guard, A, 5, start=third.until + 1800.5)  # forgotten
    assert fourth.strike == 1 and fourth.seconds == 60


def test_refusals_never_extend_a_ban() -> None:
    guard = AuthGuard()
    [ban] = fail(guard, A, 5)
    for index in range(1000):
        assert guard.refused(A, T0 + index * 0.05) is not None
    assert guard.refused(A, ban.until) is None
    # A failure reported for a banned source (a request already in flight) starts no new ban.
    [ban] = fail(guard, A, 5, start=ban.until)
    assert guard.failed(A, "105", ban.until - 1) is None
    assert guard.refused(A, ban.until) is None
    assert guard.stats.refused == 1000


def test_success_forgives_nothing() -> None:
    """An attacker who knows one password cannot launder its guesses with good logins."""
    guard = AuthGuard()
    fail(guard, A, 4)
    guard.succeeded(A, "own-account", T0 + 1)
    assert guard.failed(A, "105", T0 + 2) is not None
    assert guard.stats.successes == 1
    with pytest.raises(ValueError, match="not an IP"):
        guard.succeeded("not-an-ip", "105", T0)


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("0.0.0.0", "0.0.0.0"),
        ("255.255.255.255", "255.255.255.255"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:DB8:1:2::", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("::1", "::/64"),
    ],
)
def test_source_key(ip: str, key: str) -> None:
    assert source_key(ip) == key


@pytest.mark.parametrize("ip", ["", "203.0.113", "203.0.113.256", "010.0.0.1", " 1.2.3.4", "1.2.3.4\n", "example.org"])
def test_source_key_refuses_non_addresses(ip: str) -> None:
    with pytest.raises(ValueError, match="not an IP address"):
        source_key(ip)


def test_ipv6_is_banned_by_its_64() -> None:
    """Rotating through the 2**64 addresses of one's own /64 gains nothing."""
    guard = AuthGuard()
    bans = [guard.failed(f"2001:db8:1:2::{index + 1:x}", "105", T0 + index) for index in range(5)]
    assert bans[:4] == [None] * 4
    assert bans[4] is not None and bans[4].source == "2001:db8:1:2::/64"
    assert guard.refused("2001:db8:1:2:ffff:ffff:ffff:ffff", T0 + 5) is not None
    assert guard.refused("2001:db8:1:3::1", T0 + 5) is None
    # IPv4-mapped IPv6 is the IPv4 address (a dual-stack socket's view of an IPv4 peer).
    fail(guard, "::ffff:192.0.2.1", 5)
    assert guard.refused("192.0.2.1", T0 + 1) is not None


# --------------------------------------------------------------------------------------------- per user


def test_a_distributed_dictionary_is_slowed_but_the_user_keeps_working() -> None:
    guard = AuthGuard(user_threshold=20, user_window=600, attack_threshold=1)
    # 19 sources, one guess each: below every threshold.
    assert [guard.failed(f"10.0.0.{index}", "105", T0 + index) for index in range(19)] == [None] * 19
    assert not guard.under_attack("105", T0 + 19)
    # The 20th failure for 105 within 600 s: 105 is under attack, its failing sources are banned at once.
    ban = guard.failed("10.0.0.19", "105", T0 + 19)
    assert ban is not None and ban.targeted and ban.strike == 1
    assert guard.under_attack("105", T0 + 19)
    bans = [guard.failed(f"10.0.1.{index}", "105", T0 + 20 + index) for index in range(200)]
    assert all(ban is not None and ban.targeted for ban in bans)
    assert guard.stats.attacks == 1 and guard.stats.targeted_bans == 201
    # A source failing for another user is judged by the ordinary threshold.
    assert fail(guard, "10.0.2.1", 4, user="106", start=T0 + 300) == []
    # Nothing is refused to a source that did not fail: the right password still works at once.
    assert guard.refused(B, T0 + 300) is None
    # The attack ends when the failures leave the user's window.
    assert not guard.under_attack("105", T0 + 219 + 600)
    assert guard.failed("10.0.3.1", "105", T0 + 219 + 600) is None


def test_user_names_are_counted_by_their_first_characters() -> None:
    guard = AuthGuard(user_threshold=3)
    long_name = "x" * MAX_USER_KEY
    for index in range(3):
        guard.failed(f"10.0.0.{index}", long_name + str(index), T0)
    assert guard.under_attack(long_name + "anything", T0)
    assert guard.sizes["users"] == 1


# --------------------------------------------------------------------------------------------- bounds


def test_source_counters_forget_the_least_recently_failing() -> None:
    guard = AuthGuard(max_sources=2)
    guard.failed(A, "u", T0)
    guard.failed(B, "u", T0 + 1)
    guard.failed(A, "u", T0 + 2)  # A is now the most recent
    guard.failed("192.0.2.3", "u", T0 + 3)  # B goes
    assert guard.stats.evicted_sources == 1
    assert guard.sizes["sources"] == 2
    assert fail(guard, A, 2, start=T0 + 4) == []
    assert guard.failed(A, "u", T0 + 5) is not None  # A kept its two earlier failures
    assert fail(guard, B, 4, start=T0 + 6) == []  # B starts from nothing


def test_bans_evict_the_one_ending_soonest() -> None:
    guard = AuthGuard(max_bans=2, ban=60, max_ban=3600)
    fail(guard, A, 5, start=0)  # banned until 60.04
    fail(guard, B, 5, start=10)  # until 70.04
    fail(guard, "192.0.2.3", 5, start=20)  # the table is full: A's ban ends soonest and goes
    assert guard.stats.evicted_bans == 1
    assert guard.refused(A, 21) is None
    assert guard.refused(B, 21) is not None and guard.refused("192.0.2.3", 21) is not None
    # An offender whose ban is over (kept only for its strikes) goes before any active ban.
    fail(guard, "192.0.2.4", 5, start=75)  # B's ban ended at 70.04, 192.0.2.3's runs to 80.04
    assert guard.stats.evicted_bans == 2
    assert guard.refused("192.0.2.3", 76) is not None
    [again] = fail(guard, B, 5, start=100)
    assert again.strike == 1  # B's history was what had to go


def test_a_repeat_offender_outlasts_first_offenders() -> None:
    guard = AuthGuard(max_bans=2, ban=60, max_ban=3600)
    fail(guard, A, 5, start=0)
    [repeat] = fail(guard, A, 5, start=61)  # strike 2: until 181.04
    assert repeat.seconds == 120
    fail(guard, B, 5, start=62)  # until 122.04
    fail(guard, "192.0.2.3", 5, start=63)  # full: B goes, A's longer ban stays
    assert guard.refused(A, 64) is not None
    assert guard.refused(B, 64) is None


def test_a_million_failures_from_rotating_addresses_stay_bounded() -> None:
    """Address rotation (each address guesses 5 times, so 200,000 bans) and user-name rotation
    (50,000 names): every table stays at its cap, each entry at its threshold, and once the flood is
    over `expire` gives everything back."""
    guard = AuthGuard(max_sources=1000, max_bans=1000, max_users=1000)
    total = 1_000_000
    now = T0
    for index in range(total):
        address = index // 5
        now = T0 + index * 1e-4
        guard.failed(f"10.{address >> 16 & 255}.{address >> 8 & 255}.{address & 255}", f"u{index % 50_000}", now)
        if index % 100_000 == 0:
            assert guard.sizes["sources"] <= 1000 and guard.sizes["offenders"] <= 1000
            assert guard.sizes["users"] <= 1000
            assert len(guard._ends) <= 2 * 1000 + 64
    stats = guard.stats
    assert stats.failures == total
    assert stats.bans == total // 5
    assert stats.evicted_bans == total // 5 - 1000
    assert guard.sizes == {"sources": 0, "offenders": 1000, "users": 1000}
    assert len(guard._ends) <= 2 * 1000 + 64
    assert max(len(times) for times in guard._users.values()) <= guard.user_threshold
    timer = guard.timer()
    assert timer is not None and timer > now
    guard.expire(now + guard.max_ban + guard.forget + 1)
    assert guard.sizes == {"sources": 0, "offenders": 0, "users": 0}
    assert guard._ends == []
    assert guard.timer() is None


def test_timer_and_expire() -> None:
    guard = AuthGuard(window=60, user_window=600, forget=100)
    assert guard.timer() is None
    guard.failed(A, "105", T0)
    assert guard.timer() == T0 + 60  # A's failure leaves its window
    guard.expire(T0 + 59)
    assert guard.sizes == {"sources": 1, "offenders": 0, "users": 1}
    guard.expire(T0 + 60)
    assert guard.sizes == {"sources": 0, "offenders": 0, "users": 1}
    assert guard.timer() == T0 + 600
    [ban] = fail(guard, B, 5, start=T0 + 100)
    assert guard.banned(T0 + 105) == 1
    guard.expire(T0 + 200)
    assert guard.sizes == {"sources": 0, "offenders": 1, "users": 1}  # B's strike is remembered
    assert guard.timer() == ban.until + 100
    guard.expire(ban.until + 100)
    assert guard.sizes == {"sources": 0, "offenders": 0, "users": 1}
    assert guard.banned(T0 + 105) == 0


@pytest.mark.parametrize(
    "options",
    [
        {"threshold": 0},
        {"threshold": 1001},
        {"user_threshold": 0},
        {"attack_threshold": 0},
        {"attack_threshold": 6},
        {"window": 0},
        {"user_window": -1},
        {"ban": 0},
        {"ban": 60, "max_ban": 30},
        {"forget": -1},
        {"max_sources": 0},
        {"max_bans": 0},
        {"max_users": 0},
        {"window": float("nan")},
    ],
)
def test_constructor_checks(options: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"."):
        AuthGuard(**options)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- acceptance

REALM = "example.org"
USERS = {"105": "right-password"}


def _register(server: DigestServer, password: str, client: str, now: float, cseq: int) -> Request:
    challenge = server.challenge(now, client=client)
    value = client_authorization(
        challenge, method="REGISTER", uri="sip:example.org", username="105", password=password, cnonce=f"c{cseq}"
    )
    text = (
        f"REGISTER sip:example.org SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.5:5062;branch=z9hG4bK-{cseq}\r\n"
        f"From: <sip:105@example.org>;tag=a\r\nTo: <sip:105@example.org>\r\nCall-ID: c-{cseq}\r\n"
        f"CSeq: {cseq} REGISTER\r\nMax-Forwards: 70\r\nContact: <sip:105@10.0.0.5>\r\nAuthorization: {value}\r\n\r\n"
    )
    message = parse_message(text.encode())
    assert isinstance(message, Request)
    return message


def test_300_wrong_passwords_then_the_right_one_from_elsewhere() -> None:
    """The brief's acceptance, in the core: svcrack's 300 guesses in 3 s from one source reach the
    registrar 5 times, the rest is refused; the right password from another source registers at once,
    and every failure made one log line."""
    server = DigestServer(REALM, b"guard acceptance secret 32 bytes")
    registrar = Registrar(USERS, server)
    guard = AuthGuard()
    answers: dict[int | str, int] = {}
    lines: list[str] = []
    for index in range(300):
        now = T0 + index * 0.01
        if guard.refused(A, now) is not None:
            answers["refused"] = answers.get("refused", 0) + 1
            continue
        outcome = registrar.handle(
            _register(server, f"guess{index}", A, now, index + 1), now, ("udp", A), to_tag="t", client=A
        )
        answers[outcome.response.status] = answers.get(outcome.response.status, 0) + 1
        assert outcome.failure is not None and outcome.failure.reason is Failure.WRONG_PASSWORD
        lines.append(
            failure_line(
                wall=1.7e9 + now, ip=A, port=5060, method="REGISTER", reason=outcome.failure.reason, user="105"
            )
        )
        guard.failed(A, outcome.failure.user, now)
    assert answers == {403: 5, "refused": 295}
    assert len(lines) == 5 and all(f"source={A}:5060 " in line for line in lines)
    now = T0 + 3.0
    assert guard.refused(B, now) is None
    outcome = registrar.handle(_register(server, "right-password", B, now, 1000), now, ("udp", B), to_tag="t", client=B)
    assert outcome.response.status == 200 and outcome.user == "105" and outcome.failure is None
    guard.succeeded(B, "105", now)
    assert registrar.lookup("105", now)[0].source == ("udp", B)


def test_a_forged_source_cannot_get_its_victim_banned() -> None:
    """Nonces are bound to the address they were sent to: an attacker fetching a nonce from its own
    address and sending guesses "from" the victim's only gets challenged again, and nothing is counted."""
    server = DigestServer(REALM, b"guard acceptance secret 32 bytes")
    registrar = Registrar(USERS, server)
    for index in range(10):
        forged = _register(server, f"guess{index}", A, T0, index + 1)  # nonce issued to A
        outcome = registrar.handle(forged, T0, ("udp", B), to_tag="t", client=B)  # arrives "from" B
        assert outcome.response.status == 401 and outcome.failure is None
        header = outcome.response.headers.get("WWW-Authenticate")
        assert header is not None and server.nonce_issued_at(parse_challenge(header).nonce, client=B) is not None


# --------------------------------------------------------------------------------------------- log line

# The format as a contract: fixed fields in a fixed order, the user last and quoted.
_LINE = re.compile(
    rf"{LOG_TAG} time=(?P<time>\S+) source=(?P<source>\S+):(?P<port>\d+) method=(?P<method>\S+) "
    r'reason=(?P<reason>\S+) user="(?P<user>[^"]*)"'
)
WALL = datetime.datetime(2025, 3, 1, 12, 34, 56, 789000, tzinfo=datetime.UTC).timestamp()


def test_failure_line_format() -> None:
    line = failure_line(wall=WALL, ip=A, port=5060, method="REGISTER", reason=Failure.WRONG_PASSWORD, user="105")
    assert line == (
        "autonat-auth-failure time=2025-03-01T12:34:56.789+00:00 source=203.0.113.7:5060 method=REGISTER "
        'reason=wrong-password user="105"'
    )
    six = failure_line(wall=WALL, ip="2001:DB8::7", port=5061, method="INVITE", reason="unknown-user", user="")
    assert 'source=[2001:db8::7]:5061 method=INVITE reason=unknown-user user=""' in six
    mapped = failure_line(wall=WALL, ip="::ffff:192.0.2.1", port=1, method="INVITE", reason="replay", user="x")
    assert " source=192.0.2.1:1 " in mapped
    zoned = failure_line(wall=WALL, ip="fe80::1%eth0", port=5060, method="INVITE", reason="replay", user="x")
    assert " source=[fe80::1]:5060 " in zoned
    odd = failure_line(wall=WALL, ip=A, port=0, method='IN"VITE\n', reason="", user="x")
    assert " method=IN%22VITE%0A reason=- " in odd
    with pytest.raises(ValueError, match="65535"):
        failure_line(wall=WALL, ip=A, port=65536, method="INVITE", reason="replay", user="x")
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        failure_line(wall=WALL, ip="evil", port=1, method="INVITE", reason="replay", user="x")


@pytest.mark.parametrize(
    ("user", "logged"),
    [
        ('a"b', "a%22b"),
        ("a b", "a%20b"),
        ("100%", "100%25"),
        ("back\\slash", "back%5Cslash"),
        ("new\nline\r", "new%0Aline%0D"),
        ("é", "%C3%A9"),
        ("\u2028\x85\x0b", "%E2%80%A8%C2%85%0B"),  # line breaks to str.splitlines()
        ("\ud800", "%ED%A0%80"),  # a lone surrogate from surrogateescape'd input
        ("x" * MAX_LOGGED_USER, "x" * MAX_LOGGED_USER),
        ("x" * (MAX_LOGGED_USER + 1), "x" * MAX_LOGGED_USER + "..."),
    ],
)
def test_user_names_are_escaped(user: str, logged: str) -> None:
    line = failure_line(wall=WALL, ip=A, port=5060, method="REGISTER", reason="wrong-password", user=user)
    assert line.endswith(f' user="{logged}"')


@settings(max_examples=500, database=None)
@given(
    user=st.text(max_size=200) | st.sampled_from(['" source=6.6.6.6:1', f'\n{LOG_TAG} source=6.6.6.6:1 user="']),
    method=st.text(max_size=40),
    ip=st.ip_addresses().map(str),
    port=st.integers(min_value=0, max_value=65535),
)
def test_no_user_name_can_forge_a_line_or_a_field(user: str, method: str, ip: str, port: int) -> None:
    line = failure_line(wall=WALL, ip=ip, port=port, method=method, reason="wrong-password", user=user)
    assert all(" " <= char <= "~" for char in line)  # printable ASCII: no line break of any kind
    assert line.splitlines() == [line]
    assert line.count('"') == 2 and line.endswith('"')
    assert line.startswith(f"{LOG_TAG} time=")
    match = _LINE.fullmatch(line)
    assert match is not None
    expected_host = source_key(ip) if ":" not in source_key(ip) else None
    if expected_host is not None:  # IPv4 (or IPv4-mapped): logged as is
        assert match["source"] == expected_host
    assert int(match["port"]) == port
    assert match["reason"] == "wrong-password"
    logged = match["user"]
    if len(user) > MAX_LOGGED_USER:
        assert logged.endswith("...")
        logged = logged[:-3]
    assert urllib.parse.unquote(logged, errors="surrogatepass") == user[:MAX_LOGGED_USER]
    assert datetime.datetime.fromisoformat(match["time"]).timestamp() == pytest.approx(WALL)


def test_challenge_is_still_what_phones_expect() -> None:
    """The client binding changes nothing a phone sees: a 32-character nonce, qop=auth."""
    challenge: Challenge = DigestServer(REALM, b"guard acceptance secret 32 bytes").challenge(T0, client=A)
    assert len(challenge.nonce) == 32 and challenge.qop == ("auth",)
