"""HTTP/1.1 to the router: h11 (the sans-IO HTTP library) over asyncio streams, with hard caps.

h11 does the protocol (framing, chunked bodies, header parsing); this module adds what a router must
never be able to do to us: make us wait past a total deadline (a server that drips one byte a second
defeats per-read timeouts), make us read an unbounded header or body, or redirect us elsewhere. It
reads no proxy settings from the environment: router traffic goes to the router.

Why not a full client library (httpx was tried first): one connection per request is all a router
needs (miniupnpd closes after every reply), and a request cost 2.0 ms through httpx's pooling layers
against 0.5 ms here and 0.2 ms for a raw socket (measured in the lab), which would double a SOAP
add+delete for nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11

from autonat.errors import RouterRefused, RouterTimeout

MAX_HEADER_SIZE = 16 * 1024
READ_SIZE = 65536
USER_AGENT = "autonat UPnP/1.1"


class RouterHttpError(RouterRefused):
    """The router's HTTP side misbehaved: refused connection, redirect, malformed, oversized reply."""

    def __init__(self, message: str) -> None:
        super().__init__(message, protocol="upnp", code=0)


@dataclass(frozen=True, slots=True)
class HttpReply:
    status: int
    body: bytes


async def request(
    method: str,
    url: str,
    *,
    max_body: int,
    deadline: float,
    headers: dict[str, str] | None = None,
    content: bytes = b"",
) -> HttpReply:
    """One request on a fresh connection, within `deadline` seconds in all; errors are one line."""
    try:
        async with asyncio.timeout(deadline):
            return await _exchange(method, url, max_body, headers or {}, content)
    except TimeoutError:
        raise RouterTimeout(f"router did not answer {url} within {deadline:g} s") from None
    except h11.ProtocolError as exc:
        raise RouterHttpError(f"router sent malformed HTTP for {url}: {exc}") from None
    except OSError as exc:
        raise RouterHttpError(f"HTTP to {url} failed: {exc.strerror or exc}") from None


async def _exchange(method: str, url: str, max_body: int, headers: dict[str, str], content: bytes) -> HttpReply:
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise RouterHttpError(f"refusing to fetch {url}: only http URLs to the router")
    port = parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connection = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_SIZE)
    reader, writer = await asyncio.open_connection(parts.hostname, port)
    try:
        all_headers = [
            ("Host", parts.netloc),
            ("User-Agent", USER_AGENT),
            ("Connection", "close"),
            ("Content-Length", str(len(content))),
            *headers.items(),
        ]
        writer.write(connection.send(h11.Request(method=method, target=target, headers=all_headers)))
        if content:
            writer.write(connection.send(h11.Data(data=content)))
        writer.write(connection.send(h11.EndOfMessage()))
        await writer.drain()
        return await _read_reply(connection, reader, url, max_body)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _read_reply(connection: h11.Connection, reader: asyncio.StreamReader, url: str, max_body: int) -> HttpReply:
    status = 0
    body = bytearray()
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await reader.read(READ_SIZE))
        elif isinstance(event, h11.Response):
            status = event.status_code
            if 300 <= status < 400:
                raise RouterHttpError(f"router redirected {url} elsewhere; redirects are refused")
            declared = dict(event.headers).get(b"content-length")
            if declared is not None and int(declared) > max_body:
                raise RouterHttpError(f"router's reply from {url} is {int(declared)} bytes, over the {max_body} cap")
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > max_body:
                raise RouterHttpError(f"router's reply from {url} exceeds the {max_body}-byte cap")
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            if status == 0:
                raise RouterHttpError(f"router closed the connection for {url} without a reply")
            return HttpReply(status, bytes(body))
