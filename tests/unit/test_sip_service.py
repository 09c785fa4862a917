# ruff: noqa: S106  (test credentials)
"""The SIP service end to end on loopback (NAT disabled): echo test, ACK timeout, registrar + bridging.

The real-router versions of these calls (mapped ports, SIPp from the internet host) are in
tests/lab/test_sip_calls.py; here the service runs in-process so every path is fast and exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path

import pytest

from autonat.acl import AclSet
from autonat.advertise import Addressing
from autonat.engine.engine import NatEngine
from autonat.engine.events import EventKind
from autonat.engine.settings import NatSettings
from autonat.proto.errors import DecodeError
from autonat.service.profiles import ProfileManager
from autonat.service.settings import ProfileSettings, ProfileSip, SipSettings
from autonat.service.sip import SipService
from autonat.sip import client as sipclient
from autonat.sip.digest import client_authorization, parse_challenge
from autonat.sip.message import Request, Response, StreamParser, make_response, parse_message
from autonat.sip.session import first_audio

LOOPBACK = "127.0.0.1"
OFFER = (
    "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio {port} RTP/AVP 8 0 101\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
    "m=video {port2} RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n"
)
RTP = bytes([0x80, 8]) + b"\x00\x01" + b"\x00" * 8 + b"payload" * 20


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    """A port free for UDP and TCP alike (a profile binds both), as far as a probe can tell."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, kind) as sock:
            sock.bind((LOOPBACK, 0))
            port = int(sock.getsockname()[1])
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket(socket.AF_INET) as tcp:
                udp.bind((LOOPBACK, port))
                tcp.bind((LOOPBACK, port))
        except OSError:
            continue
        return port
    raise AssertionError("no free port")


class Phone(asyncio.DatagramProtocol):
    """A minimal UDP user agent: sends requests, collects what arrives, answers BYE/INVITE on request."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[Request | Response] = asyncio.Queue()
        self.raw: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.port = transport.get_extra_info("sockname")[1]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.raw.append(data)
        try:
            message = parse_message(data)
        except DecodeError:
            return  # e.g. the answer to a request without Call-ID has none either (§8.2.6.2): see `raw`
        if isinstance(message, Request | Response):
            self.inbox.put_nowait(message)

    def send(self, message: Request | Response, port: int) -> None:
        assert self.transport is not None
        self.transport.sendto(message.serialize(), (LOOPBACK, port))

    async def expect(self, what: str, timeout: float = 3.0) -> Request | Response:
        """The next message whose method (requests) or status (responses) is `what`; others are skipped."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self.inbox.get()
                if isinstance(message, Request) and message.method == what:
                    return message
                if isinstance(message, Response) and str(message.status) == what:
                    return message


@dataclass
class Rig:
    service: SipService
    engine: NatEngine
    port: int
    phones: list[Phone] = field(default_factory=list)

    async def phone(self) -> Phone:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_datagram_endpoint(Phone, local_addr=(LOOPBACK, 0))
        self.phones.append(protocol)
        return protocol

    def invite(self, phone: Phone, number: str, *, media_port: int, call_id: str | None = None) -> Request:
        return sipclient.make_request(
            "INVITE",
            f"sip:{number}@{LOOPBACK}:{self.port}",
            from_uri=f"sip:caller@{LOOPBACK}",
            from_tag=sipclient.new_tag(),
            to_uri=f"sip:{number}@{LOOPBACK}",
            call_id=call_id or sipclient.new_call_id(LOOPBACK),
            cseq=1,
            via_host=LOOPBACK,
            via_port=phone.port,
            transport="udp",
            contact=f"sip:caller@{LOOPBACK}:{phone.port}",
            body=OFFER.format(port=media_port, port2=media_port + 2).encode(),
            content_type="application/sdp",
        )


@contextlib.asynccontextmanager
async def running(
    t1: float = 0.05,
    users: tuple[tuple[str, str], ...] = (("105", "pw105"),),
    *,
    tls: tuple[Path, Path] | None = None,
    max_calls: int = 1000,
    auth_calls: bool = False,
    source_call_rate: float = 0.0,
    auth_failures: int = 5,
) -> AsyncIterator[Rig]:
    port = free_port()
    start = free_port() & ~1
    settings = SipSettings(
        users=users,
        rtp_start_port=start,
        rtp_end_port=start + 11,
        t1=t1,
        t2=max(t1, 4 * t1),
        inactivity=2.0,
        max_calls=max_calls,
        source_call_rate=source_call_rate,
        auth_failures=auth_failures,
    )
    tls_port = free_port(socket.SOCK_STREAM) if tls else None
    certificate, key = tls or (None, None)
    profile = ProfileSettings(
        "test",
        Addressing(sip_ip=ip_address(LOOPBACK), sip_port=port, tls_sip_port=tls_port),
        ProfileSip(tls_cert=certificate, tls_key=key, auth_calls=auth_calls),
    )
    engine = NatEngine(NatSettings(enabled=False), None)
    await engine.start()
    profiles = ProfileManager((profile,), AclSet(), engine)
    service = SipService(settings, profiles, engine, b"k" * 32)
    await service.start()
    rig = Rig(service, engine, port)
    try:
        yield rig
    finally:
        for phone in rig.phones:
            if phone.transport is not None:
                phone.transport.close()
        await service.stop()
        await engine.stop()


def ack_for(invite: Request, ok: Response, phone: Phone) -> Request:
    return sipclient.ack_for_2xx(invite, ok, branch=sipclient.new_branch())


def caller_bye(invite: Request, ok: Response, *, port: int, via_port: int, transport: str = "udp") -> Request:
    """The caller's BYE in the dialog its INVITE and our 200 made (§15.1.1)."""
    number = (invite.uri.split(":", 1)[1]).split("@", 1)[0]
    return sipclient.make_request(
        "BYE",
        f"sip:{number}@{LOOPBACK}:{port}",
        from_uri=f"sip:caller@{LOOPBACK}",
        from_tag=invite.from_tag() or "",
        to_uri=f"sip:{number}@{LOOPBACK}",
        to_tag=ok.to_tag(),
        call_id=invite.call_id(),
        cseq=2,
        via_host=LOOPBACK,
        via_port=via_port,
        transport=transport,
    )


async def media_socket() -> tuple[asyncio.DatagramTransport, asyncio.Queue[tuple[bytes, tuple[str, int]]], int]:
    got: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    class Media(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            got.put_nowait((data, addr))

    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(Media, local_addr=(LOOPBACK, 0))
    return transport, got, transport.get_extra_info("sockname")[1]


async def test_echo_call_answers_with_sdp_echoes_rtp_and_ends_on_bye() -> None:
    async with running() as rig:
        phone = await rig.phone()
        media, got, media_port = await media_socket()
        invite = rig.invite(phone, "9196", media_port=media_port)
        phone.send(invite, rig.port)
        ok = await phone.expect("200")
        assert isinstance(ok, Response) and ok.to_tag()
        answer = first_audio(ok.body.decode())
        assert answer is not None and str(answer.address) == LOOPBACK
        assert answer.formats == ("8", "0", "101")
        assert "m=video 0 " in ok.body.decode()  # the second stream is declined, the stream count kept
        assert ok.headers.get("Contact") == f"<sip:9196@{LOOPBACK}:{rig.port}>"
        phone.send(ack_for(invite, ok, phone), rig.port)
        sent = [RTP[:2] + seq.to_bytes(2, "big") + RTP[4:] for seq in (7, 8, 9, 11, 12)]  # a gap at 10
        for packet in sent:
            media.sendto(packet, (LOOPBACK, answer.port))
        echoed = [data for data, _ in [await asyncio.wait_for(got.get(), 2) for _ in sent]]
        # Re-originated (RFC 3550 §8.2): the caller's payload under our own SSRC and sequence numbers, the
        # gap kept.
        assert all(data[12:] == RTP[12:] for data in echoed)
        assert len({data[8:12] for data in echoed}) == 1 and echoed[0][8:12] != RTP[8:12]
        sequence = [int.from_bytes(data[2:4], "big") for data in echoed]
        assert [(n - sequence[0]) % 65536 for n in sequence] == [0, 1, 2, 4, 5]
        assert [c.describe()["state"] for c in rig.service.calls] == ["answered"]
        bye = caller_bye(invite, ok, port=rig.port, via_port=phone.port, transport="udp")
        phone.send(bye, rig.port)
        assert isinstance(await phone.expect("200"), Response)
        await asyncio.sleep(0.1)
        assert rig.service.calls == [] and rig.service.active_calls == 0
        assert len(rig.service.pairs) == rig.service.pairs.total  # the RTP pair is back
        media.close()


async def test_a_caller_that_never_acks_gets_bye_after_64_t1_and_the_ports_come_back() -> None:
    async with running(t1=0.05) as rig:
        phone = await rig.phone()
        invite = rig.invite(phone, "9196", media_port=free_port())
        phone.send(invite, rig.port)
        first = await phone.expect("200")
        retransmitted = await phone.expect("200", timeout=1.0)
        assert retransmitted.serialize() == first.serialize()
        bye = await phone.expect("BYE", timeout=64 * 0.05 + 2)
        assert isinstance(bye, Request)
        assert bye.call_id() == invite.call_id() and bye.to_tag() == invite.from_tag()
        assert bye.uri == f"sip:caller@{LOOPBACK}:{phone.port}"
        phone.send(make_response(bye, 200), rig.port)
        await asyncio.sleep(0.1)
        assert rig.service.calls == [] and rig.service.active_calls == 0
        assert len(rig.service.pairs) == rig.service.pairs.total


async def test_unknown_number_404_srtp_only_488_and_options_200() -> None:
    async with running() as rig:
        phone = await rig.phone()
        invite = rig.invite(phone, "no/such", media_port=free_port())
        phone.send(invite, rig.port)
        assert isinstance(await phone.expect("404"), Response)
        savp = rig.invite(phone, "9196", media_port=free_port())
        savp = savp.replace(body=savp.body.replace(b"RTP/AVP", b"RTP/SAVP"))
        phone.send(savp, rig.port)
        assert isinstance(await phone.expect("488"), Response)
        options = sipclient.make_request(
            "OPTIONS",
            f"sip:{LOOPBACK}:{rig.port}",
            from_uri="sip:x@127.0.0.1",
            from_tag="t",
            to_uri=f"sip:{LOOPBACK}",
            call_id="o1",
            cseq=1,
            via_host=LOOPBACK,
            via_port=phone.port,
            transport="udp",
        )
        phone.send(options, rig.port)
        ok = await phone.expect("200")
        assert "INVITE" in (ok.headers.get("Allow") or "")


async def register(rig: Rig, phone: Phone, user: str, password: str) -> Response:
    call_id = sipclient.new_call_id(LOOPBACK)
    tag = sipclient.new_tag()

    def build(cseq: int, auth: str | None) -> Request:
        return sipclient.make_request(
            "REGISTER",
            f"sip:{LOOPBACK}:{rig.port}",
            from_uri=f"sip:{user}@{LOOPBACK}",
            from_tag=tag,
            to_uri=f"sip:{user}@{LOOPBACK}",
            call_id=call_id,
            cseq=cseq,
            via_host="10.9.9.9",  # a private Contact/Via, as behind a NAT: we must answer the source
            via_port=5062,
            transport="udp",
            contact=f"sip:{user}@10.9.9.9:5062",
            extra_headers=[("Expires", "300")] + ([("Authorization", auth)] if auth else []),
        )

    phone.send(build(1, None), rig.port)
    challenge = await phone.expect("401")
    header = challenge.headers.get("WWW-Authenticate")
    assert header is not None
    auth = client_authorization(
        parse_challenge(header),
        method="REGISTER",
        uri=f"sip:{LOOPBACK}:{rig.port}",
        username=user,
        password=password,
        cnonce="abc",
    )
    phone.send(build(2, auth), rig.port)
    async with asyncio.timeout(3):
        while True:
            reply = await phone.inbox.get()
            if isinstance(reply, Response) and reply.status >= 200:
                return reply


async def test_registration_needs_the_right_password() -> None:
    async with running() as rig:
        phone = await rig.phone()
        wrong = await register(rig, phone, "105", "nope")
        assert wrong.status == 403
        right = await register(rig, phone, "105", "pw105")
        assert right.status == 200
        assert rig.service.registrations()[0]["user"] == "105"


async def test_a_call_to_a_registered_user_is_bridged_with_media_relayed_both_ways() -> None:
    async with running() as rig:
        callee = await rig.phone()
        assert (await register(rig, callee, "105", "pw105")).status == 200
        caller = await rig.phone()
        caller_media, caller_got, caller_media_port = await media_socket()
        callee_media, callee_got, callee_media_port = await media_socket()
        events = rig.engine.events.subscribe()
        first_event = asyncio.ensure_future(anext(events))
        invite = rig.invite(caller, "105", media_port=caller_media_port)
        caller.send(invite, rig.port)
        # The callee is rung at the source of its REGISTER (not its private Contact).
        incoming = await callee.expect("INVITE")
        assert isinstance(incoming, Request)
        assert incoming.uri == "sip:105@10.9.9.9:5062"
        offer = first_audio(incoming.body.decode())
        assert offer is not None and offer.port != caller_media_port  # anchored on the relay
        callee.send(make_response(incoming, 180, to_tag="callee"), rig.port)
        assert isinstance(await caller.expect("180"), Response)
        answer_sdp = OFFER.format(port=callee_media_port, port2=callee_media_port + 2).encode()
        ok_b = make_response(
            incoming,
            200,
            to_tag="callee",
            extra_headers=[("Contact", f"<sip:105@{LOOPBACK}:{callee.port}>"), ("Content-Type", "application/sdp")],
            body=answer_sdp,
        )
        callee.send(ok_b, rig.port)
        ack_b = await callee.expect("ACK")
        assert isinstance(ack_b, Request) and ack_b.to_tag() == "callee"
        ok_a = await caller.expect("200")
        assert isinstance(ok_a, Response)
        answer = first_audio(ok_a.body.decode())
        assert answer is not None and answer.port != callee_media_port
        caller.send(ack_for(invite, ok_a, caller), rig.port)
        # Media both ways through the relay.
        caller_media.sendto(RTP, (LOOPBACK, answer.port))
        data, _ = await asyncio.wait_for(callee_got.get(), 2)
        assert data == RTP
        callee_media.sendto(RTP[:12] + b"back", (LOOPBACK, offer.port))
        data, _ = await asyncio.wait_for(caller_got.get(), 2)
        assert data == RTP[:12] + b"back"
        assert (await asyncio.wait_for(first_event, 2)).kind is EventKind.CALL_START
        # The caller hangs up: the callee gets a BYE, the relay and ports are released.
        bye = caller_bye(invite, ok_a, port=rig.port, via_port=caller.port, transport="udp")
        caller.send(bye, rig.port)
        assert isinstance(await caller.expect("200"), Response)
        bye_b = await callee.expect("BYE")
        assert isinstance(bye_b, Request) and bye_b.call_id() == incoming.call_id()
        callee.send(make_response(bye_b, 200), rig.port)
        await asyncio.sleep(0.1)
        assert rig.service.calls == [] and rig.service.active_calls == 0
        assert len(rig.service.pairs) == rig.service.pairs.total
        caller_media.close()
        callee_media.close()
        await events.aclose()


async def test_an_unregistered_user_and_an_unknown_one_get_the_same_answer() -> None:
    """Anything else (480 vs 404 before) tells a caller which user names exist."""
    async with running() as rig:
        phone = await rig.phone()
        phone.send(rig.invite(phone, "105", media_port=free_port()), rig.port)
        offline = await phone.expect("404")
        phone.send(rig.invite(phone, "106", media_port=free_port()), rig.port)
        unknown = await phone.expect("404")
        assert offline.reason == unknown.reason and offline.headers.get("Retry-After") is None


async def authenticated(phone: Phone, invite: Request, port: int, user: str, password: str) -> Request:
    """Send `invite`, take its 407 challenge (ACKed, §17.1.1.3) and send it again with Proxy-Authorization."""
    phone.send(invite, port)
    challenge = await phone.expect("407")
    assert isinstance(challenge, Response)
    phone.send(sipclient.ack_for_non2xx(invite, challenge), port)
    header = challenge.headers.get("Proxy-Authenticate")
    assert header is not None
    credentials = client_authorization(
        parse_challenge(header), method="INVITE", uri=invite.uri, username=user, password=password, cnonce="c1"
    )
    cseq = invite.cseq()[0] + 1
    via = (invite.headers.get("Via") or "").replace("branch=", "branch=z9hG4bKa")  # a new transaction
    again = invite.replace(
        headers=invite.headers.replace("CSeq", f"{cseq} INVITE")
        .replace("Via", via)
        .with_header("Proxy-Authorization", credentials)
    )
    phone.send(again, port)
    return again


async def test_calls_to_users_need_digest_auth_and_the_answer_tells_nothing_about_names() -> None:
    async with running(auth_calls=True, users=(("105", "pw105"), ("106", "pw106"))) as rig:
        callee = await rig.phone()
        assert (await register(rig, callee, "105", "pw105")).status == 200
        caller = await rig.phone()
        for number in ("105", "106", "no-such-user"):  # registered, offline, unknown: all challenged alike
            caller.send(rig.invite(caller, number, media_port=free_port()), rig.port)
            challenge = await caller.expect("407")
            assert (challenge.headers.get("Proxy-Authenticate") or "").startswith("Digest ")
        assert callee.inbox.empty()  # nobody was rung without credentials
        wrong = await authenticated(caller, rig.invite(caller, "105", media_port=free_port()), rig.port, "106", "no")
        assert isinstance(await caller.expect("403"), Response) and wrong.method == "INVITE"
        right = await authenticated(caller, rig.invite(caller, "105", media_port=free_port()), rig.port, "106", "pw106")
        incoming = await callee.expect("INVITE")  # authenticated: the callee rings
        assert isinstance(incoming, Request) and right.headers.get("Proxy-Authorization")
        # An authenticated caller still cannot tell an offline user from an unknown one.
        for number in ("106", "no-such-user"):
            await authenticated(caller, rig.invite(caller, number, media_port=free_port()), rig.port, "106", "pw106")
            assert isinstance(await caller.expect("404"), Response)


async def test_failed_logins_are_logged_for_fail2ban_and_the_source_is_banned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running(auth_failures=3) as rig:
        phone = await rig.phone()
        caplog.set_level("INFO", logger="autonat")
        for _ in range(3):
            assert (await register(rig, phone, "105", "guess")).status == 403
        lines = [r.getMessage() for r in caplog.records if r.name == "autonat.auth"]
        assert len(lines) == 3
        assert all(
            re.fullmatch(
                r"autonat-auth-failure time=\S+ source=127\.0\.0\.1:\d+ method=REGISTER"
                r' reason=wrong-password user="105"',
                line,
            )
            for line in lines
        ), lines
        assert any("banned 127.0.0.1" in r.getMessage() for r in caplog.records)
        # Banned: the right password from the same source now gets no answer at all ...
        with pytest.raises(TimeoutError):
            await register(rig, phone, "105", "pw105")
        assert rig.service.dropped_banned >= 1
        # ... while the echo test, and everybody else, go on (the ban is on new requests of that source).
        assert rig.service.guard.stats.bans == 1


async def test_one_source_over_its_call_rate_gets_503_with_retry_after() -> None:
    async with running(source_call_rate=1.0) as rig:  # burst 10 (the default)
        phone = await rig.phone()
        answers = []
        for _ in range(14):
            phone.send(rig.invite(phone, "no-such", media_port=free_port()), rig.port)
        async with asyncio.timeout(5):
            while len(answers) < 14:
                message = await phone.inbox.get()
                if isinstance(message, Response) and message.status >= 200:
                    answers.append(message)
        statuses = sorted(m.status for m in answers)
        assert statuses.count(404) == 10 and statuses.count(503) == 4, statuses
        assert all(m.headers.get("Retry-After") == "2" for m in answers if m.status == 503)
        assert rig.service.admission.refused


@pytest.mark.parametrize("garbage", [b"\x00" * 100, b"INVITE nonsense\r\n\r\n", b"SIP/2.0 200 OK\r\n\r\n"])
async def test_garbage_is_counted_and_the_service_keeps_answering(garbage: bytes) -> None:
    async with running() as rig:
        phone = await rig.phone()
        assert phone.transport is not None
        phone.transport.sendto(garbage, (LOOPBACK, rig.port))
        invite = rig.invite(phone, "no-such", media_port=free_port())
        phone.send(invite, rig.port)
        assert isinstance(await phone.expect("404"), Response)


class StreamPhone:
    """A SIP phone over one TCP (or TLS) connection, framing with the codec's StreamParser."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.parser = StreamParser()
        self.pending: list[Request | Response] = []
        self.port = writer.get_extra_info("sockname")[1]

    def send(self, message: Request | Response) -> None:
        self.writer.write(message.serialize())

    async def expect(self, what: str, timeout: float = 3.0) -> Request | Response:
        async with asyncio.timeout(timeout):
            while True:
                while self.pending:
                    message = self.pending.pop(0)
                    if (isinstance(message, Request) and message.method == what) or (
                        isinstance(message, Response) and str(message.status) == what
                    ):
                        return message
                data = await self.reader.read(65536)
                assert data, "connection closed"
                self.pending += [m for m in self.parser.feed(data) if isinstance(m, Request | Response)]


def stream_invite(rig: Rig, phone: StreamPhone, transport: str, port: int) -> Request:
    return sipclient.make_request(
        "INVITE",
        f"sip:9196@{LOOPBACK}:{port};transport={transport}",
        from_uri=f"sip:caller@{LOOPBACK}",
        from_tag=sipclient.new_tag(),
        to_uri=f"sip:9196@{LOOPBACK}",
        call_id=sipclient.new_call_id(LOOPBACK),
        cseq=1,
        via_host=LOOPBACK,
        via_port=phone.port,
        transport=transport,
        contact=f"sip:caller@{LOOPBACK}:{phone.port};transport={transport}",
        body=OFFER.format(port=free_port(), port2=free_port()).encode(),
        content_type="application/sdp",
    )


async def echo_over_stream(rig: Rig, phone: StreamPhone, transport: str, port: int) -> None:
    invite = stream_invite(rig, phone, transport, port)
    phone.send(invite)
    ok = await phone.expect("200")
    assert isinstance(ok, Response)
    assert (ok.headers.get("Contact") or "").endswith(f":{port};transport={transport}>")
    phone.send(sipclient.ack_for_2xx(invite, ok, branch=sipclient.new_branch()))
    await asyncio.sleep(0.3)  # over a reliable transport the 200 is not retransmitted
    assert not [m for m in phone.pending if isinstance(m, Response) and m.status == 200]
    bye = caller_bye(invite, ok, port=port, via_port=phone.port, transport=transport)
    phone.send(bye)
    assert isinstance(await phone.expect("200"), Response)


async def test_echo_call_over_tcp_is_answered_on_the_same_connection() -> None:
    async with running() as rig:
        reader, writer = await asyncio.open_connection(LOOPBACK, rig.port)
        phone = StreamPhone(reader, writer)
        await echo_over_stream(rig, phone, "tcp", rig.port)
        writer.close()
        await asyncio.sleep(0.05)
        assert rig.service.calls == [] and rig.service.active_calls == 0


async def test_a_crlf_ping_over_tcp_is_answered_with_a_pong_and_nothing_else() -> None:
    # RFC 5626 §3.5.1: a double CRLF from the client is a ping; the server answers one CRLF (the pong).
    async with running() as rig:
        reader, writer = await asyncio.open_connection(LOOPBACK, rig.port)
        writer.write(b"\r\n\r\n")
        assert await asyncio.wait_for(reader.readexactly(2), timeout=2) == b"\r\n"
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), timeout=0.2)  # no second pong, no SIP message
        writer.write(b"\r\n\r\n")  # the connection stays usable: a second ping, a second pong
        assert await asyncio.wait_for(reader.readexactly(2), timeout=2) == b"\r\n"
        writer.close()
        assert rig.service.transports["test"].stats.malformed == 0


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


async def test_echo_call_over_tls(certificate: tuple[Path, Path]) -> None:
    async with running(tls=certificate) as rig:
        assert rig.service.transports["test"].transports == ("udp", "tcp", "tls")
        port = rig.service.transports["test"].tls_port
        assert port is not None
        context = ssl.create_default_context(cafile=str(certificate[0]))
        context.check_hostname = False
        reader, writer = await asyncio.open_connection(LOOPBACK, port, ssl=context)
        await echo_over_stream(rig, StreamPhone(reader, writer), "tls", port)
        writer.close()


async def test_cancel_before_the_answer_gets_487() -> None:
    async with running(auth_calls=False) as rig:
        callee = await rig.phone()
        assert (await register(rig, callee, "105", "pw105")).status == 200
        caller = await rig.phone()
        invite = rig.invite(caller, "105", media_port=free_port())
        caller.send(invite, rig.port)
        incoming = await callee.expect("INVITE")
        assert isinstance(incoming, Request)
        callee.send(make_response(incoming, 180, to_tag="ringing"), rig.port)
        await caller.expect("180")
        cancel = invite.replace(
            method="CANCEL",
            headers=invite.headers.replace("CSeq", "1 CANCEL").without("Content-Type").without("Contact"),
            body=b"",
        )
        caller.send(cancel, rig.port)
        assert isinstance(await caller.expect("487"), Response)
        forwarded = await callee.expect("CANCEL")  # the callee stops ringing too
        assert isinstance(forwarded, Request) and forwarded.call_id() == incoming.call_id()
        await asyncio.sleep(0.1)
        assert rig.service.calls == [] and rig.service.active_calls == 0
        assert len(rig.service.pairs) == rig.service.pairs.total


async def test_beyond_max_calls_new_calls_get_503() -> None:
    async with running(max_calls=1) as rig:
        phone = await rig.phone()
        phone.send(rig.invite(phone, "9196", media_port=free_port()), rig.port)
        await phone.expect("200")
        phone.send(rig.invite(phone, "9196", media_port=free_port()), rig.port)
        busy = await phone.expect("503")
        assert busy.headers.get("Retry-After") == "5"


async def test_rtp_silence_ends_the_call_with_a_bye() -> None:
    async with running() as rig:  # inactivity 2 s
        phone = await rig.phone()
        invite = rig.invite(phone, "9196", media_port=free_port())
        phone.send(invite, rig.port)
        ok = await phone.expect("200")
        assert isinstance(ok, Response)
        phone.send(ack_for(invite, ok, phone), rig.port)
        bye = await phone.expect("BYE", timeout=5)
        assert isinstance(bye, Request) and bye.call_id() == invite.call_id()
        phone.send(make_response(bye, 200), rig.port)
        await asyncio.sleep(0.1)
        assert rig.service.calls == [] and rig.service.active_calls == 0


async def test_gateway_registration_and_an_outbound_call_with_digest_on_both() -> None:
    """A provider on loopback challenges our REGISTER (401) and our INVITE (407); the call dialled as
    0<number> goes out through it with the credentials, and its answer reaches the caller."""
    from autonat.service.settings import Action, Extension, GatewaySettings, compile_pattern
    from autonat.sip.digest import DigestServer, Verdict, parse_credentials

    loop = asyncio.get_running_loop()
    _, provider = await loop.create_datagram_endpoint(Phone, local_addr=(LOOPBACK, 0))
    provider_media, _, provider_media_port = await media_socket()
    digest = DigestServer("provider", b"p" * 32)
    gateway = GatewaySettings("prov", LOOPBACK, provider.port, username="200", password="pw200", expires=300)
    extra = ProfileSip(dialplan=(Extension(compile_pattern(r"0(\d+)"), Action.GATEWAY, "prov"),), gateways=(gateway,))

    def authorized(request: Request, header: str) -> bool:
        value = request.headers.get(header)
        if value is None:
            return False
        verdict = digest.verify(parse_credentials(value), method=request.method, password="pw200", now=loop.time())
        return verdict is Verdict.OK

    port = free_port()
    start = free_port() & ~1
    settings = SipSettings(
        users=(("105", "pw105"),), rtp_start_port=start, rtp_end_port=start + 11, t1=0.05, t2=0.2, inactivity=5.0
    )
    profile = ProfileSettings("test", Addressing(sip_ip=ip_address(LOOPBACK), sip_port=port), extra)
    engine = NatEngine(NatSettings(enabled=False), None)
    await engine.start()
    service = SipService(settings, ProfileManager((profile,), AclSet(), engine), engine, b"k" * 32)
    await service.start()
    stopped = False
    try:
        register = await provider.expect("REGISTER")
        assert isinstance(register, Request) and register.headers.get("Authorization") is None
        challenge = digest.challenge(loop.time()).header_value()
        provider.send(make_response(register, 401, extra_headers=[("WWW-Authenticate", challenge)]), port)
        register = await provider.expect("REGISTER")
        assert isinstance(register, Request) and authorized(register, "Authorization")
        provider.send(make_response(register, 200, to_tag="reg"), port)
        await asyncio.sleep(0.05)
        status = service.status("test")
        assert status["Gateways"] == {"prov": {"state": "REGED", "status": 200}}

        caller = Phone()
        transport, _ = await loop.create_datagram_endpoint(lambda: caller, local_addr=(LOOPBACK, 0))
        rig = Rig(service, engine, port)
        # auth-calls (the default): nobody calls out through the provider on our account without credentials.
        await authenticated(caller, rig.invite(caller, "0123", media_port=free_port()), port, "105", "pw105")
        outgoing = await provider.expect("INVITE")
        assert isinstance(outgoing, Request) and outgoing.uri == f"sip:123@{LOOPBACK}:{provider.port}"
        challenge = digest.challenge(loop.time()).header_value()
        provider.send(
            make_response(outgoing, 407, to_tag="p1", extra_headers=[("Proxy-Authenticate", challenge)]), port
        )
        ack = await provider.expect("ACK")  # §17.1.1.3: the 407 is acknowledged by the transaction
        assert isinstance(ack, Request) and ack.cseq() == (outgoing.cseq()[0], "ACK")
        retried = await provider.expect("INVITE")
        assert isinstance(retried, Request) and authorized(retried, "Proxy-Authorization")
        assert retried.call_id() == outgoing.call_id() and retried.cseq()[0] == outgoing.cseq()[0] + 1
        answer = OFFER.format(port=provider_media_port, port2=provider_media_port + 2).encode()
        provider.send(
            make_response(
                retried,
                200,
                to_tag="p2",
                extra_headers=[
                    ("Contact", f"<sip:123@{LOOPBACK}:{provider.port}>"),
                    ("Content-Type", "application/sdp"),
                ],
                body=answer,
            ),
            port,
        )
        assert isinstance(await provider.expect("ACK"), Request)
        ok = await caller.expect("200")
        assert isinstance(ok, Response) and first_audio(ok.body.decode()) is not None
        assert service.status("test")["CALLS-OUT"] == 1
        transport.close()
        await service.stop()
        stopped = True
        bye = await provider.expect("BYE")  # the live call is hung up at shutdown ...
        assert isinstance(bye, Request) and bye.call_id() == outgoing.call_id()
        unregister = await provider.expect("REGISTER")  # ... and the registration removed (§10.2.2)
        assert isinstance(unregister, Request) and unregister.headers.get("Expires") == "0"
    finally:
        if provider.transport is not None:
            provider.transport.close()
        provider_media.close()
        if not stopped:
            await service.stop()
        await engine.stop()


async def test_a_re_invite_is_answered_with_the_same_media_and_its_200_resent_until_the_ack() -> None:
    async with running(t1=0.05) as rig:
        phone = await rig.phone()
        invite = rig.invite(phone, "9196", media_port=free_port())
        phone.send(invite, rig.port)
        ok = await phone.expect("200")
        assert isinstance(ok, Response)
        phone.send(ack_for(invite, ok, phone), rig.port)
        reinvite = sipclient.make_request(
            "INVITE",
            f"sip:9196@{LOOPBACK}:{rig.port}",
            from_uri=f"sip:caller@{LOOPBACK}",
            from_tag=invite.from_tag() or "",
            to_uri=f"sip:9196@{LOOPBACK}",
            to_tag=ok.to_tag(),
            call_id=invite.call_id(),
            cseq=2,
            via_host=LOOPBACK,
            via_port=phone.port,
            transport="udp",
            body=invite.body,
            content_type="application/sdp",
        )
        phone.send(reinvite, rig.port)
        first = await phone.expect("200")
        assert first.cseq() == (2, "INVITE") and first.body == ok.body  # the media stays where it is
        again = await phone.expect("200", timeout=1.0)  # no ACK yet: resent (§13.3.1.4)
        assert again.cseq() == (2, "INVITE")
        phone.send(ack_for(reinvite, first, phone), rig.port)
        await asyncio.sleep(0.5)
        while not phone.inbox.empty():  # what was already on its way before the ACK arrived
            phone.inbox.get_nowait()
        await asyncio.sleep(0.5)
        assert phone.inbox.empty(), "the 200 was still resent after the ACK"
        assert [call.describe()["state"] for call in rig.service.calls] == ["answered"]


async def test_a_late_offer_call_is_answered_with_our_offer_and_echoes_after_the_ack() -> None:
    """RFC 3261 §13.2.1: an INVITE without SDP gets our offer in the 200; the answer comes in the ACK."""
    async with running() as rig:
        phone = await rig.phone()
        media, got, media_port = await media_socket()
        invite = rig.invite(phone, "9196", media_port=media_port).replace(body=b"")
        invite = invite.replace(headers=invite.headers.without("Content-Type"))
        phone.send(invite, rig.port)
        ok = await phone.expect("200")
        ours = first_audio(ok.body.decode())
        assert isinstance(ok, Response) and ours is not None and ours.formats == ("0", "8", "9", "101")
        answer = OFFER.format(port=media_port, port2=media_port + 2).replace("8 0 101", "8").encode()
        ack = sipclient.ack_for_2xx(
            invite, ok, branch=sipclient.new_branch(), body=answer, content_type="application/sdp"
        )
        phone.send(ack, rig.port)
        media.sendto(RTP, (LOOPBACK, ours.port))
        data, _ = await asyncio.wait_for(got.get(), 2)
        assert data[12:] == RTP[12:]
        assert [c.describe()["legs"][0]["direction"] for c in rig.service.calls] == ["sendrecv"]
        media.close()


async def test_a_request_that_does_not_parse_is_answered_400_naming_the_defect() -> None:
    async with running() as rig:
        phone = await rig.phone()
        assert phone.transport is not None
        invite = rig.invite(phone, "9196", media_port=free_port())
        phone.transport.sendto(
            invite.replace(headers=invite.headers.without("Call-ID")).serialize(), (LOOPBACK, rig.port)
        )
        async with asyncio.timeout(3):
            while not phone.raw:
                await asyncio.sleep(0.01)
        assert phone.raw[0].startswith(b"SIP/2.0 400 Bad Request: missing Call-ID header\r\n")
        assert b"\r\nCSeq: 1 INVITE\r\n" in phone.raw[0] and b"\r\nCall-ID:" not in phone.raw[0]
        assert rig.service.status("test")["SIP-Messages"]["malformed"] == 1
        # Over TCP the stream reads on after the answer (its framing held).
        reader, writer = await asyncio.open_connection(LOOPBACK, rig.port)
        stream = StreamPhone(reader, writer)
        options = stream_invite(rig, stream, "tcp", rig.port).replace(method="OPTIONS", body=b"")
        options = options.replace(headers=options.headers.replace("CSeq", "2 OPTIONS").without("Content-Type"))
        stream.send(options.replace(headers=options.headers.replace("CSeq", "2 INVITE")))  # §8.1.1.5 mismatch
        mismatch = await stream.expect("400")
        assert mismatch.reason == "Bad Request: CSeq method INVITE does not match request method OPTIONS"
        stream.send(options)
        assert isinstance(await stream.expect("200"), Response)
        writer.close()
