"""HTTP to the router without an event loop (aio/blocking_http.py): the guarantees of aio/http.py.

The same hostile servers as tests/unit/test_http.py, on loopback: a 100 MB header line, drips of the
head and of the body, a hang, a refused connection, a reset. The blocking exchange runs in a thread
while the scripted server runs in the test's event loop.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from autonat.aio import blocking_http
from autonat.errors import RouterTimeout
from autonat.proto.httpwire import DONE, FAILED, MAX_HEADER_SIZE, Progress, RouterHttpError
from tests.unit.test_http import BODY, chunked, drips, hangs, response, sends

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Script], Awaitable[str]]]:
    servers: list[asyncio.Server] = []
    requests: list[bytes] = []

    async def start(script: Script) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                requests.append(await reader.readuntil(b"\r\n\r\n"))
                await script(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/rootDesc.xml"

    start.requests = requests  # type: ignore[attr-defined]
    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def fetch(url: str, deadline: float = 2.0, max_body: int = 10_000, **kwargs: object) -> Awaitable[object]:
    return asyncio.to_thread(lambda: blocking_http.request("GET", url, max_body=max_body, deadline=deadline, **kwargs))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "wire",
    [response(), chunked(BODY, 100), b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + BODY],
    ids=["content-length", "chunked", "until-close"],
)
async def test_a_reply_is_read_whole(serve: Callable[[Script], Awaitable[str]], wire: bytes) -> None:
    url = await serve(sends(wire))
    trace: list[Progress] = []
    reply = await fetch(url, trace=trace)
    assert isinstance(reply, blocking_http.HttpReply)
    assert (reply.status, reply.body) == (200, BODY)
    assert [progress.phase for progress in trace] == [DONE]


async def test_the_request_bytes_are_the_asyncio_shell_s(serve: Callable[[Script], Awaitable[str]]) -> None:
    url = await serve(sends(response()))
    await fetch(url)
    head = serve.requests[0]  # type: ignore[attr-defined]
    assert head.startswith(b"GET /rootDesc.xml HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"Connection: close\r\n" in head and b"User-Agent: autonat UPnP/1.1\r\n" in head


async def test_a_chunked_reply_cut_short_is_an_error_not_a_short_body(
    serve: Callable[[Script], Awaitable[str]],
) -> None:
    url = await serve(sends(chunked(BODY, 100)[:500]))
    with pytest.raises(RouterHttpError, match=r"closed the connection .* before the reply was complete"):
        await fetch(url)


async def test_an_endless_header_line_is_refused_at_the_cap(serve: Callable[[Script], Awaitable[str]]) -> None:
    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nX-Junk: ")
        for _ in range(1600):  # 100 MB if nobody stops it
            writer.write(b"A" * 65536)
            await writer.drain()

    url = await serve(flood)
    trace: list[Progress] = []
    with pytest.raises(RouterHttpError, match=f"exceed {MAX_HEADER_SIZE} bytes"):
        await fetch(url, deadline=5, max_body=1000, trace=trace)
    assert trace[0].head_bytes == MAX_HEADER_SIZE and trace[0].phase == FAILED


@pytest.mark.parametrize(
    ("script", "stall"),
    [
        (drips(b"HTTP/1.1 200 OK\r\nX-Drip: "), "reply headers incomplete ("),
        (drips(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n"), "reply body incomplete ("),
        (drips(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"1\r\na\r\n"), "reply body incomplete ("),
        (hangs, "connected, request sent, no reply"),
    ],
    ids=["header-drip", "body-drip", "chunked-drip", "hang"],
)
async def test_the_deadline_holds_over_drips_and_hangs_and_says_where(
    serve: Callable[[Script], Awaitable[str]], script: Script, stall: str
) -> None:
    url = await serve(script)
    started = time.monotonic()
    with pytest.raises(RouterTimeout) as info:
        await fetch(url, deadline=0.3)
    assert 0.25 < time.monotonic() - started < 1.0  # generous: the deadline is 0.3 s, and it is waited for
    assert str(info.value).startswith(f"router did not answer {url} within 0.3 s ({stall}")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_a_refused_connection_is_one_line_at_once() -> None:
    url = f"http://127.0.0.1:{_closed_port()}/ctl"
    started = time.monotonic()
    with pytest.raises(RouterHttpError) as info:
        await fetch(url, deadline=5)
    assert time.monotonic() - started < 1.0  # not the 5 s deadline
    assert str(info.value) == f"UPnP: the router refused the connection to {url} (nothing listens there)"


async def test_a_reset_is_one_line_at_once() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/ctl"

    def reset_the_first() -> None:
        conn, _ = listener.accept()
        conn.recv(1000)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        conn.close()

    server = asyncio.create_task(asyncio.to_thread(reset_the_first))
    started = time.monotonic()
    try:
        with pytest.raises(RouterHttpError, match=f"^HTTP to {url} failed: Connection reset by peer$"):
            await fetch(url, deadline=5)
        assert time.monotonic() - started < 1.0
    finally:
        await server
        listener.close()


async def test_a_redirect_is_refused(serve: Callable[[Script], Awaitable[str]]) -> None:
    url = await serve(sends(b"HTTP/1.1 302 Found\r\nLocation: http://198.51.100.1/\r\nContent-Length: 0\r\n\r\n"))
    with pytest.raises(RouterHttpError, match="redirects are refused"):
        await fetch(url)


def test_only_http_urls() -> None:
    with pytest.raises(RouterHttpError, match="only http URLs"):
        blocking_http.request("GET", "https://192.0.2.1/", max_body=1000, deadline=1)


async def test_a_kept_connection_is_used_again_and_a_stale_one_replaced(
    serve: Callable[[Script], Awaitable[str]],
) -> None:
    accepted: list[int] = []

    async def keeps(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        writer.write(response(body=b"one"))
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")  # the second request on the same connection
        writer.write(response(body=b"two"))
        await writer.drain()
        # then the connection closes (the fixture): a third request finds it stale

    url = await serve(keeps)
    connections = blocking_http.Connections()
    try:
        bodies = []
        for _ in range(3):
            reply = await fetch(url, connections=connections)
            assert isinstance(reply, blocking_http.HttpReply)
            bodies.append(reply.body)
        await asyncio.sleep(0.05)
        assert bodies == [b"one", b"two", b"one"]
        assert len(accepted) == 2  # the first connection served two requests
    finally:
        connections.close()


def test_importing_it_loads_neither_asyncio_nor_logging() -> None:
    code = "import sys, autonat.aio.blocking_http\nprint(sorted(m for m in ('asyncio', 'logging') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.strip() == "[]"
