"""The control channel without a router: permissions, stale sockets, a second daemon, TCP tokens,
hostile requests. (The engine runs with NAT disabled, so nothing leaves the machine.)"""

from __future__ import annotations

import asyncio
import json
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from autonat.daemon.control import ControlClient, ControlError, ControlServer
from autonat.engine.engine import NatEngine
from autonat.engine.settings import NatSettings

TOKEN = "s3cret-token-of-16+"  # noqa: S105 (a test token)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ControlServer]:
    engine = NatEngine(NatSettings(enabled=False))
    await engine.start()
    control = ControlServer(engine, tmp_path / "run" / "control.sock", ("127.0.0.1", 0), TOKEN)
    await control.start()
    yield control
    await control.stop()
    await engine.stop()


async def ask_tcp(control: ControlServer, line: bytes) -> dict[str, object]:
    port = control._servers[1].sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(line)
    reply: dict[str, object] = json.loads(await reader.readline())
    writer.close()
    return reply


async def test_socket_is_owner_only_and_answers(server: ControlServer) -> None:
    assert stat.S_IMODE(server.socket_path.stat().st_mode) == 0o600
    async with ControlClient(server.socket_path) as client:
        status = await client.call({"cmd": "status"})
    assert status["nat"] == "disabled" and status["mappings"] == []


async def test_commands_that_need_nat_say_it_is_disabled(server: ControlServer) -> None:
    async with ControlClient(server.socket_path) as client:
        with pytest.raises(ControlError, match=r"NAT is disabled \(--nonat\)"):
            await client.call({"cmd": "add", "port": 5060, "proto": "udp"})


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"not json\n", "request is not JSON"),
        (b"[1, 2]\n", "a request is a JSON object"),
        (b'{"cmd": "frobnicate"}\n', "unknown command 'frobnicate'"),
        (b"x" * 70000 + b"\n", "request too slow or too long"),
    ],
)
async def test_hostile_requests_get_one_line_errors(server: ControlServer, line: bytes, error: str) -> None:
    reader, writer = await asyncio.open_unix_connection(str(server.socket_path))
    writer.write(line)
    reply = json.loads(await reader.readline())
    writer.close()
    assert reply == {"ok": False, "error": error}


async def test_tcp_needs_the_token(server: ControlServer) -> None:
    assert await ask_tcp(server, b'{"cmd": "status"}\n') == {"ok": False, "error": "bad or missing token"}
    wrong = await ask_tcp(server, b'{"cmd": "status", "token": "nope"}\n')
    assert wrong["ok"] is False
    right = await ask_tcp(server, json.dumps({"cmd": "status", "token": TOKEN}).encode() + b"\n")
    assert right["ok"] is True


async def test_a_second_daemon_is_refused_and_a_stale_socket_replaced(server: ControlServer, tmp_path: Path) -> None:
    second = ControlServer(server.engine, server.socket_path, None, None)
    with pytest.raises(ControlError, match="another autonat daemon is running"):
        await second.start()
    stale = tmp_path / "stale.sock"
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(stale))
    leftover.close()  # the file stays, nobody listens: what a killed daemon leaves
    third = ControlServer(server.engine, stale, None, None)
    await third.start()
    await third.stop()
    assert not stale.exists()


async def test_a_regular_file_in_the_way_is_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    path.write_text("precious")
    engine = NatEngine(NatSettings(enabled=False))
    with pytest.raises(ControlError, match="is not a socket"):
        await ControlServer(engine, path, None, None).start()
    assert path.read_text() == "precious"


async def test_no_daemon_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="no autonat daemon is running"):
        async with ControlClient(tmp_path / "none.sock"):
            pass
