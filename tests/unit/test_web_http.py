"""The web listener's request parsing and framing (autonat.web.http): caps that hold on partial input,
one-line refusals, and server-sent event framing."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autonat.web.http import (
    MAX_HEADERS,
    MAX_QUERY_FIELDS,
    MAX_TARGET,
    HttpError,
    Request,
    RequestReader,
    error_response,
    response,
    sse_event,
)

GET = b"GET /api/status?x=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAccept: */*\r\n\r\n"
STATUSES = {400, 413, 414, 431}


def refusal(data: bytes, *, max_size: int = 8192, step: int | None = None) -> HttpError:
    reader = RequestReader(max_size)
    with pytest.raises(HttpError) as caught:
        for start in range(0, len(data), step or len(data)):
            reader.feed(data[start : start + (step or len(data))])
    error = caught.value
    assert len(error.message.splitlines()) == 1 and error.message.isprintable(), error.message
    return error


def test_a_request_is_parsed_into_its_parts() -> None:
    (request,) = RequestReader().feed(GET)
    assert request == Request(
        "GET", "/api/status?x=1", "/api/status", {"x": "1"}, {"host": "127.0.0.1:8080", "accept": "*/*"}, True
    )
    (old,) = RequestReader().feed(b"HEAD / HTTP/1.0\r\n\r\n")
    assert (old.method, old.path, old.keep_alive) == ("HEAD", "/", False)


def test_pipelined_requests_come_out_in_order_and_pieces_wait_for_their_end() -> None:
    reader = RequestReader()
    requests = reader.feed(GET + b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\nGET /a")
    assert [r.path for r in requests] == ["/api/status", "/metrics"]
    assert not reader.idle  # the third has begun
    assert reader.feed(b"b HTTP/1.1\r\n") == []
    (last,) = reader.feed(b"\r\n")
    assert last.path == "/ab" and reader.idle
    byte_by_byte = RequestReader()
    got = [r for i in range(len(GET)) for r in byte_by_byte.feed(GET[i : i + 1])]
    assert got == RequestReader().feed(GET)


def test_repeated_headers_are_joined_and_cookies_with_semicolons() -> None:
    (request,) = RequestReader().feed(b"GET / HTTP/1.1\r\nCookie: a=1\r\nCookie: b=2\r\nX: 1\r\nx: 2\r\n\r\n")
    assert request.header("cookie") == "a=1; b=2"
    assert request.header("x") == "1, 2"


@pytest.mark.parametrize("step", [1, 100, 1024, None])
def test_a_header_that_never_ends_is_refused_at_the_cap_as_it_arrives(step: int | None) -> None:
    reader = RequestReader(4096)
    endless = b"GET / HTTP/1.1\r\nX-Long: " + b"a" * 100_000
    fed = 0
    with pytest.raises(HttpError) as caught:
        while True:
            piece = endless[fed : fed + (step or len(endless))]
            fed += len(piece)
            reader.feed(piece)
    assert caught.value.status == 431
    assert caught.value.message == "request head larger than 4096 bytes"
    # Refused within the piece that crossed the cap: the parser never held more than the cap.
    assert fed - (step or len(endless)) < 4096


def test_a_pipelined_request_after_a_complete_one_is_counted_from_its_read() -> None:
    """The over-count: a read that ends one request and starts the next counts whole against the next."""
    reader = RequestReader(1024)
    assert len(reader.feed(GET + b"GET / HTTP/1.1\r\nX: " + b"a" * 500)) == 1
    with pytest.raises(HttpError) as caught:
        reader.feed(b"a" * 600)
    assert caught.value.status == 431


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * (MAX_HEADERS + 1) + b"\r\n", 431, f"more than {MAX_HEADERS} header"),
        (b"GET /" + b"a" * MAX_TARGET + b" HTTP/1.1\r\n\r\n", 414, f"longer than {MAX_TARGET} bytes"),
        (b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", 413, "requests here carry no body"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 413, "carry no body"),
        (b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n", 400, "upgrades"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400, "malformed request"),  # a TLS ClientHello
        (b"GARBAGE\r\n\r\n", 400, "malformed request"),
        (b"GET /\xc3\xa9 HTTP/1.1\r\n\r\n", 400, "malformed request: Invalid char in url path"),
        (b"GET http://example.com/ HTTP/1.1\r\n\r\n", 400, "must be a path"),
        (b"GET /?" + b"&".join(b"k%d=v" % n for n in range(MAX_QUERY_FIELDS + 1)) + b" HTTP/1.1\r\n\r\n", 400, "query"),
    ],
)
def test_bad_requests_get_one_line_refusals(data: bytes, status: int, message: str) -> None:
    for step in (1, None):
        error = refusal(data, step=step)
        assert error.status == status and message in error.message


@given(st.lists(st.binary(max_size=300), max_size=12))
def test_arbitrary_bytes_give_requests_or_one_line_refusals(pieces: list[bytes]) -> None:
    reader = RequestReader(1024)
    try:
        for piece in pieces:
            for request in reader.feed(piece):
                assert request.method and request.path.startswith("/")
    except HttpError as error:
        assert error.status in STATUSES
        assert len(error.message.splitlines()) == 1 and error.message.isprintable()


_TOKEN = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)


@given(
    st.lists(
        st.tuples(_TOKEN, st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)), max_size=8
    ),
    _TOKEN,
    st.data(),
)
def test_a_valid_request_parses_the_same_however_it_is_split(
    headers: list[tuple[str, str]], path: str, data: st.DataObject
) -> None:
    head = f"GET /{path} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers) + "\r\n"
    wire = head.encode() * 2  # two pipelined
    whole = RequestReader().feed(wire)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    reader = RequestReader()
    split = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        split += reader.feed(wire[start:end])
    assert split == whole and len(whole) == 2
    assert whole[0].headers == {n: ", ".join(v.strip() for k, v in headers if k == n) for n, _ in headers}


def test_a_response_carries_its_length_and_head_leaves_the_body_out() -> None:
    full = response(200, b"hello", content_type="text/plain")
    head, _, body = full.partition(b"\r\n\r\n")
    assert body == b"hello" and b"Content-Length: 5" in head and b"Connection: close" not in head
    assert b"Content-Security-Policy: default-src 'self'" in head and b"X-Content-Type-Options: nosniff" in head
    assert response(200, b"hello", head_only=True) == response(200, b"hello").partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
    error = error_response(HttpError(431, "request head larger than 8192 bytes"))
    assert error.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert error.endswith(b"\r\n\r\nerror: request head larger than 8192 bytes\n") and b"Connection: close" in error


def test_an_event_is_framed_as_html_says() -> None:
    assert sse_event('{"a": 1}', event_id="ab.7") == b'id: ab.7\ndata: {"a": 1}\n\n'
    assert sse_event("{}", event="live") == b"event: live\ndata: {}\n\n"
    with pytest.raises(ValueError, match="one line"):
        sse_event("a\nb")


@given(st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=5))
def test_any_event_data_stays_one_data_line(data: dict[str, str]) -> None:
    """json.dumps escapes every line break (U+2028 too is escaped by ensure_ascii): one frame, one line."""
    frame = sse_event(json.dumps(data), event_id="x.1")
    assert frame.endswith(b"\n\n") and frame.count(b"\n") == 3
    line = frame.split(b"\n")[1]
    assert line.startswith(b"data: ") and json.loads(line[6:]) == data
