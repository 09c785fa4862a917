"""HTTP to the router (aio/http.py): caps that hold on partial input, one deadline for the whole exchange.

The parser side (`Progress.feed`) is fed directly, split every which way by hypothesis; the exchange
side runs against scripted servers on loopback.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autonat.aio import http
from autonat.aio.http import MAX_HEADER_SIZE, MAX_HEADERS, Progress, RouterHttpError
from autonat.errors import RouterTimeout

URL = "http://192.0.2.1:5000/rootDesc.xml"
BODY = b"<root>" + b"x" * 3000 + b"</root>"


def response(head_extra: bytes = b"", body: bytes = BODY) -> bytes:
    length = b"Content-Length: %d\r\n\r\n" % len(body)
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\n" + head_extra + length + body


def chunked(body: bytes, size: int) -> bytes:
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    framed = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces)
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + framed + b"0\r\n\r\n"


def feed_all(data: bytes, cuts: list[int], max_body: int = 256 * 1024) -> Progress:
    """Feed `data` split at `cuts`, as reads would deliver it."""
    progress = Progress(URL, max_body)
    parser = httptools.HttpResponseParser(progress)
    bounds = [0, *sorted(set(cuts)), len(data)]
    for start, end in itertools.pairwise(bounds):
        if end > start:
            progress.feed(parser, data[start:end])
    return progress


def splits(data: bytes) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, len(data)), max_size=12)


# --- the parser side: caps on partial input ----------------------------------------------------------


@given(st.data())
@settings(max_examples=200, deadline=None)
def test_a_reply_reads_the_same_however_it_is_split(data: st.DataObject) -> None:
    body = data.draw(st.binary(max_size=4000))
    wire = data.draw(st.sampled_from([response(body=body), chunked(body, data.draw(st.integers(1, 700)))]))
    progress = feed_all(wire, data.draw(splits(wire)))
    assert progress.complete and bytes(progress.body) == body


@given(st.integers(MAX_HEADER_SIZE - 200, MAX_HEADER_SIZE + 200), st.data())
@settings(max_examples=150, deadline=None)
def test_the_head_cap_holds_on_partial_input_at_the_exact_byte(head_size: int, data: st.DataObject) -> None:
    start = b"HTTP/1.1 200 OK\r\nX-Pad: "
    end = b"\r\nContent-Length: 2\r\n\r\n"
    head = start + b"a" * (head_size - len(start) - len(end)) + end
    assert len(head) == head_size
    wire = head + b"ok"
    cuts = data.draw(splits(wire))
    if head_size <= MAX_HEADER_SIZE:
        assert bytes(feed_all(wire, cuts).body) == b"ok"
    else:
        with pytest.raises(RouterHttpError, match=f"reply headers from {URL} exceed {MAX_HEADER_SIZE} bytes"):
            feed_all(wire, cuts)


@given(st.lists(st.integers(1, 70000), min_size=1, max_size=40))
@settings(max_examples=100, deadline=None)
def test_a_header_line_that_never_ends_is_cut_at_the_cap_whatever_the_reads(reads: list[int]) -> None:
    progress = Progress(URL, 1000)
    parser = httptools.HttpResponseParser(progress)
    progress.feed(parser, b"HTTP/1.1 200 OK\r\nX-Junk: ")
    with pytest.raises(RouterHttpError, match="exceed"):
        for size in [*reads, MAX_HEADER_SIZE]:  # the last read always crosses the cap
            progress.feed(parser, b"A" * size)
    assert progress.head_bytes == MAX_HEADER_SIZE  # the parser never saw a byte beyond the cap


def test_the_header_count_is_capped() -> None:
    assert feed_all(response(b"X-A: b\r\n" * (MAX_HEADERS - 2)), []).complete  # + Content-Type, Content-Length
    with pytest.raises(RouterHttpError, match=f"more than {MAX_HEADERS} header lines"):
        feed_all(response(b"X-A: b\r\n" * (MAX_HEADERS - 1)), [])


def test_trailers_count_as_headers() -> None:
    wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n" + b"X-T: 1\r\n" * 150 + b"\r\n"
    with pytest.raises(RouterHttpError, match="header lines"):
        feed_all(wire, [])


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        (response(body=b"x" * 1001), "is 1001 bytes, over the 1000 cap"),  # refused on the header alone
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"x" * 1001, "exceeds the 1000-byte cap"),
        (chunked(b"x" * 1001, 100), "exceeds the 1000-byte cap"),
    ],
)
def test_body_caps_hold_as_bytes_arrive(wire: bytes, match: str) -> None:
    for cuts in ([], list(range(0, len(wire), 7))):
        with pytest.raises(RouterHttpError, match=match):
            feed_all(wire, cuts, max_body=1000)


@pytest.mark.parametrize(
    "wire",
    [
        chunked(b"x" * 900, 1),  # 900 body bytes, under the cap, in 5,400 bytes of framing
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;" + b"e" * 5000,  # an endless chunk extension
    ],
)
def test_chunk_framing_is_capped_on_the_wire(wire: bytes) -> None:
    # Read by read (a drip): the wire cap counts every byte after the read that ended the head; that
    # read itself (at most MAX_HEADER_SIZE bytes) is counted against the head cap only.
    with pytest.raises(RouterHttpError, match="exceeds 2000 bytes on the wire"):
        feed_all(wire, list(range(0, len(wire), 7)), max_body=1000)


@given(st.binary(max_size=3000), st.data())
@settings(max_examples=300, deadline=None)
def test_any_bytes_end_in_a_reply_or_a_one_line_router_error(junk: bytes, data: st.DataObject) -> None:
    wire = data.draw(st.sampled_from([junk, b"HTTP/1.1 200 OK\r\n" + junk, response()[:100] + junk]))
    try:
        feed_all(wire, data.draw(splits(wire)), max_body=1000)
    except RouterHttpError as exc:
        assert "\n" not in str(exc)


# --- the exchange: one deadline over connect, send and every read --------------------------------------

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Script], Awaitable[str]]]:
    servers: list[asyncio.Server] = []

    async def start(script: Script) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.readuntil(b"\r\n\r\n")
                await script(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/rootDesc.xml"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def sends(data: bytes) -> Script:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()

    return script


def drips(start: bytes, byte: bytes = b"a", every: float = 0.02) -> Script:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(start)
        for _ in range(1000):
            await asyncio.sleep(every)
            writer.write(byte)
            await writer.drain()

    return script


async def hangs(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(30)


@pytest.mark.parametrize(
    "wire",
    [response(), chunked(BODY, 100), b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + BODY],
    ids=["content-length", "chunked", "until-close"],
)
async def test_a_reply_is_read_whole(serve: Callable[[Script], Awaitable[str]], wire: bytes) -> None:
    url = await serve(sends(wire))
    trace: list[Progress] = []
    reply = await http.request("GET", url, max_body=10_000, deadline=2, trace=trace)
    assert (reply.status, reply.body) == (200, BODY)
    assert [progress.phase for progress in trace] == [http.DONE]


async def test_a_chunked_reply_cut_short_is_an_error_not_a_short_body(
    serve: Callable[[Script], Awaitable[str]],
) -> None:
    url = await serve(sends(chunked(BODY, 100)[:500]))
    with pytest.raises(RouterHttpError, match=r"closed the connection .* before the reply was complete"):
        await http.request("GET", url, max_body=10_000, deadline=2)


async def test_an_endless_header_line_is_refused_at_the_cap(serve: Callable[[Script], Awaitable[str]]) -> None:
    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nX-Junk: ")
        for _ in range(1600):  # 100 MB if nobody stops it
            writer.write(b"A" * 65536)
            await writer.drain()

    url = await serve(flood)
    trace: list[Progress] = []
    with pytest.raises(RouterHttpError, match=f"exceed {MAX_HEADER_SIZE} bytes"):
        await http.request("GET", url, max_body=1000, deadline=5, trace=trace)
    assert trace[0].head_bytes == MAX_HEADER_SIZE and trace[0].phase == http.FAILED


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
        await http.request("GET", url, max_body=10_000, deadline=0.3)
    assert time.monotonic() - started < 1.0  # generous: the deadline is 0.3 s
    assert str(info.value).startswith(f"router did not answer {url} within 0.3 s ({stall}")


async def test_a_body_drip_says_how_far_it_got() -> None:
    progress = feed_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\nabc", [])
    assert progress.stalled() == "reply body incomplete (3 of 5000 bytes)"
    assert Progress(URL, 10).stalled() == "connection not accepted"


async def test_a_redirect_is_refused(serve: Callable[[Script], Awaitable[str]]) -> None:
    url = await serve(sends(b"HTTP/1.1 302 Found\r\nLocation: http://198.51.100.1/\r\nContent-Length: 0\r\n\r\n"))
    with pytest.raises(RouterHttpError, match="redirects are refused"):
        await http.request("GET", url, max_body=1000, deadline=2)


async def test_only_http_urls() -> None:
    with pytest.raises(RouterHttpError, match="only http URLs"):
        await http.request("GET", "https://192.0.2.1/", max_body=1000, deadline=1)
