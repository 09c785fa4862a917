"""The test call (`autonat call`) end to end on loopback, NAT disabled: the service calls another autonat's echo,
a peer that answers and stays silent, one that is busy, one that only rings; the control verb and the command.

The real-router versions (the pool's mapped ports, SIPp's RTP echo on the internet host, a second autonat behind
the double NAT) are in tests/lab/test_call.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import autonat
from autonat.cli import call as cli_call
from autonat.daemon.control import ControlClient, ControlError, ControlServer
from autonat.service.sip import SipError
from autonat.sip.message import Request, Response, make_response
from tests.unit.test_sip_service import LOOPBACK, Phone, Rig, media_socket, running

SRC = Path(autonat.__file__).parents[1]


def answer_sdp(port: int) -> bytes:
    return (
        f"v=0\r\no=peer 1 1 IN IP4 {LOOPBACK}\r\ns=-\r\nc=IN IP4 {LOOPBACK}\r\nt=0 0\r\n"
        f"m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n"
    ).encode()


def reply(phone: Phone, request: Request, status: int, to: int, *, tag: str, body: bytes = b"") -> Response:
    extra = [("Contact", f"<sip:peer@{LOOPBACK}:{phone.port}>")]
    if body:
        extra.append(("Content-Type", "application/sdp"))
    response = make_response(request, status, to_tag=tag, extra_headers=extra, body=body)
    phone.send(response, to)
    return response


@contextlib.asynccontextmanager
async def silent_peer(rig: Rig) -> AsyncIterator[tuple[Phone, asyncio.Task[list[str]]]]:
    """A UAS that answers 200 with SDP (a media socket that never sends) and takes the BYE: what it saw."""
    phone = await rig.phone()
    media, got, media_port = await media_socket()

    async def serve() -> list[str]:
        seen: list[str] = []
        invite = await phone.expect("INVITE", timeout=60)
        assert isinstance(invite, Request)
        seen.append("INVITE")
        reply(phone, invite, 200, rig.port, tag="silent", body=answer_sdp(media_port))
        ack = await phone.expect("ACK", timeout=5)
        seen.append(ack.method if isinstance(ack, Request) else "?")
        bye = await phone.expect("BYE", timeout=10)
        assert isinstance(bye, Request)
        seen.append("BYE")
        reply(phone, bye, 200, rig.port, tag="silent")
        seen.append(f"rtp={got.qsize()}")
        return seen

    task = asyncio.get_running_loop().create_task(serve())
    try:
        yield phone, task
    finally:
        task.cancel()
        media.close()


def ports_back(rig: Rig) -> bool:
    return len(rig.service.pairs) == rig.service.pairs.total


async def test_a_test_call_to_another_autonat_s_echo_gets_every_packet_back() -> None:
    async with running() as caller, running() as echo:
        result = await caller.service.test_call(None, f"sip:9196@{LOOPBACK}:{echo.port}", 1)
        assert ports_back(caller) and caller.service.calls == []
        await asyncio.sleep(0.05)
        assert echo.service.calls == []  # our BYE ended it there too
    assert result["ok"] is True, result
    local = result["media"]["local"]
    assert result["verdict"] == f"ok: audio both ways, not through a router mapping (our SDP gave {local})"
    assert result["answered"] is True and result["status"] == 200 and result["reason"] == "test call done"
    assert result["codec"] == "PCMU" and result["media"]["advertised"] == local and result["media"]["mapping"] is None
    rtp = result["rtp"]
    # 1 s of 20 ms packets, each echoed once; the echo re-originates them (its own SSRC and numbers) and only
    # the payload identifies them. Its RTCP goes to our RTCP port, never into the count of the echo.
    assert rtp["sent"] == 50 and rtp["received"] == 50 and rtp["lost"] == 0 and rtp["loss_percent"] == 0
    assert rtp["duplicates"] == 0 and rtp["foreign"] == 0 and rtp["skipped"] == 0
    rtt = result["rtt_ms"]
    assert 0 < rtt["min"] <= rtt["avg"] <= rtt["max"] < 1000  # generous: a loaded machine is slow, not lossy
    assert result["jitter_ms"] is not None and result["jitter_ms"] >= 0
    assert result["media"]["echo_from"] == [result["media"]["remote"]]  # symmetric: back from where we sent
    assert 0 < result["setup_ms"] < 5000 and 1.0 <= result["duration_s"] < 5


async def test_a_peer_that_answers_and_sends_nothing_back_is_no_audio_back_within_the_call_time() -> None:
    async with running() as caller, silent_peer(caller) as (phone, seen):
        started = asyncio.get_running_loop().time()
        result = await caller.service.test_call(None, f"sip:9196@{LOOPBACK}:{phone.port}", 1)
        took = asyncio.get_running_loop().time() - started
        assert await asyncio.wait_for(seen, 5) == ["INVITE", "ACK", "BYE", "rtp=50"]  # it heard the signal
        assert ports_back(caller)
    assert result["ok"] is False and result["verdict"] == "fail: no audio back"
    assert result["rtp"]["sent"] == 50 and result["rtp"]["received"] == 0 and result["rtt_ms"] is None
    assert took < 1 + 1 + 3  # the signal, the drain, a generous second or three for the BYE


async def test_a_busy_peer_is_call_refused_with_its_status() -> None:
    async with running() as caller:
        phone = await caller.phone()

        async def busy() -> None:
            invite = await phone.expect("INVITE")
            assert isinstance(invite, Request)
            reply(phone, invite, 486, caller.port, tag="busy")

        task = asyncio.get_running_loop().create_task(busy())
        result = await caller.service.test_call(None, f"sip:9196@{LOOPBACK}:{phone.port}", 1)
        await task
        ack = await phone.expect("ACK")  # the client transaction ACKs the 486 (§17.1.1.3)
        assert isinstance(ack, Request)
        assert ports_back(caller)
    assert result["ok"] is False and result["verdict"] == "fail: call refused 486 Busy Here"
    assert result["answered"] is False and result["rtp"] is not None and result["rtp"]["sent"] == 0


async def test_a_peer_that_only_rings_is_cancelled_at_the_answer_timeout_no_answer() -> None:
    async with running() as caller:
        phone = await caller.phone()
        target = f"sip:9196@{LOOPBACK}:{phone.port}"
        call = asyncio.get_running_loop().create_task(caller.service.test_call(None, target, 1, answer_timeout=0.5))
        invite = await phone.expect("INVITE")
        assert isinstance(invite, Request)
        reply(phone, invite, 180, caller.port, tag="ringing")
        cancel = await phone.expect("CANCEL", timeout=3)
        assert isinstance(cancel, Request)
        phone.send(make_response(cancel, 200), caller.port)
        reply(phone, invite, 487, caller.port, tag="ringing")
        result = await asyncio.wait_for(call, 5)
        assert ports_back(caller)
    assert result["ok"] is False and result["verdict"] == "fail: no answer" and result["reason"] == "no answer"


async def test_one_test_call_at_a_time_and_bad_requests_are_one_line() -> None:
    async with running() as caller, silent_peer(caller) as (phone, _):
        target = f"sip:9196@{LOOPBACK}:{phone.port}"
        first = asyncio.get_running_loop().create_task(caller.service.test_call(None, target, 1))
        await asyncio.sleep(0.05)
        with pytest.raises(SipError, match=r"^call: a test call is already running"):
            await caller.service.test_call(None, target, 1)
        assert (await first)["verdict"] == "fail: no audio back"
        for profile, uri, seconds, error in [
            ("nosuch", target, 1, "call: no SIP profile 'nosuch' (this daemon has: test)"),
            (None, "sip:9196@pbx.example.org", 1, "call: the URI's host must be an IP address"),
            (None, "tel:+15551234", 1, "call: not a SIP URI"),
            (None, target, 0, "call: seconds must be 1-60, not 0"),
            (None, target, 61, "call: seconds must be 1-60, not 61"),
        ]:
            with pytest.raises(SipError) as raised:
                await caller.service.test_call(profile, uri, seconds)
            assert str(raised.value).startswith(error) and "\n" not in str(raised.value)
        assert caller.service.calls == [] and ports_back(caller)


@pytest.mark.slow  # 6.7 s: three test calls of 1 s (+1 s of drain) each, and four interpreters
async def test_the_control_verb_the_command_and_the_doctor_s_function(tmp_path: Path) -> None:
    async with running() as caller, running() as echo, silent_peer(caller) as (phone, _):
        control = ControlServer(caller.engine, tmp_path / "control.sock", None, None, sip=caller.service)
        await control.start()
        try:
            argv = [sys.executable, "-m", "autonat", "call", f"sip:9196@{LOOPBACK}:{echo.port}"]
            argv += ["--seconds", "1", "--socket", str(tmp_path / "control.sock")]
            env = {**os.environ, "PYTHONPATH": str(SRC), "AUTONAT_STATE_DIR": str(tmp_path)}
            shown = await run(argv, env)
            # What the doctor will call: the same request, blocking (so in a thread here), the result as a dict.
            result = await asyncio.to_thread(cli_call.test_call, tmp_path / "control.sock", argv[4], None, 1)
            bad = await run([*argv[:4], "sip:9196@example.org", *argv[5:]], env)
            silent = await run([*argv[:4], f"sip:9196@{LOOPBACK}:{phone.port}", *argv[5:]], env)
            no_daemon = await run([*argv[:7], "--socket", str(tmp_path / "none.sock")], env)
        finally:
            await control.stop()
    code, out, err = shown
    assert code == 0 and err == "", err
    lines = out.splitlines()
    assert lines[0].startswith("ok: audio both ways") and lines[1].startswith("call:    sip:9196@127.0.0.1:")
    assert lines[2].startswith("rtp:     sent 50, received back 50, lost 0 (0 %)")
    assert [line[:8] for line in lines[3:]] == ["rtt:    ", "jitter: ", "media:  "]
    assert result["ok"] is True and result["rtp"]["received"] == 50
    assert cli_call.render(result)[0] == result["verdict"] and lines[0].startswith(result["verdict"][:40])
    code, out, err = bad
    assert (code, out) == (8, "")
    assert err == "autonat: call: the URI's host must be an IP address, not 'example.org' (no DNS lookups)\n"
    code, out, err = silent
    assert code == 1 and out.startswith("fail: no audio back\n")
    assert err == "autonat: test call failed: no audio back\n"
    code, out, err = no_daemon
    assert (code, out) == (8, "") and err.startswith("autonat: no autonat daemon is running")


async def run(argv: list[str], env: dict[str, str], timeout: float = 20) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_control_verb_refuses_bad_requests_in_one_line(tmp_path: Path) -> None:
    async with running() as caller:
        control = ControlServer(caller.engine, tmp_path / "control.sock", None, None, sip=caller.service)
        bare = ControlServer(caller.engine, tmp_path / "bare.sock", None, None)  # a daemon without profiles
        await control.start()
        await bare.start()
        try:
            refusals = [
                ({"cmd": "call"}, "call needs uri, a SIP URI (e.g. sip:9196@203.0.113.50)"),
                ({"cmd": "call", "uri": 5}, "call needs uri, a SIP URI (e.g. sip:9196@203.0.113.50)"),
                (
                    {"cmd": "call", "uri": "sip:9196@127.0.0.1", "profile": ["x"]},
                    "call: profile must be a profile name",
                ),
                ({"cmd": "call", "uri": "sip:9196@127.0.0.1", "seconds": "5"}, "call: seconds must be a number, 1-60"),
                ({"cmd": "call", "uri": "sip:9196@127.0.0.1", "seconds": 600}, "call: seconds must be 1-60, not 600"),
                ({"cmd": "call", "uri": "sip:x@" + "1" * 300}, "call: the URI is longer than 256 characters"),
            ]
            for request, error in refusals:
                async with ControlClient(tmp_path / "control.sock") as client:
                    with pytest.raises(ControlError) as raised:
                        await client.call(request)
                assert str(raised.value) == error
            async with ControlClient(tmp_path / "bare.sock") as client:
                with pytest.raises(ControlError, match=r"^call: this daemon has no SIP profile to call from"):
                    await client.call({"cmd": "call", "uri": "sip:9196@127.0.0.1"})
        finally:
            await control.stop()
            await bare.stop()
        assert caller.service.calls == [] and ports_back(caller)
