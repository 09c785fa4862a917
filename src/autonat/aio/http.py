"""HTTP/1.1 to the router: one request per connection, parsed by httptools, with hard caps.

httptools (the llhttp parser from Node.js, as used by uvicorn) parses the router's reply: framing,
chunked bodies, malformed input. This module adds what a router must never be able to do to us: make
us wait past a total deadline (a server that drips one byte a second defeats per-read timeouts), make
us read an unbounded header or body, or redirect us elsewhere. It reads no proxy settings from the
environment: router traffic goes to the router.

Why not a full client library: one connection per request is all a router needs (miniupnpd closes
after every reply), and the layers cost more than the router does. Measured in the lab for one SOAP
POST: raw blocking socket 0.12 ms, this module 0.23 ms, h11 over asyncio streams 0.55 ms, httpx
2.0 ms; a SOAP add+delete through httpx was 3.2x the raw exchange.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools

from autonat.errors import RouterRefused, RouterTimeout

MAX_HEADER_SIZE = 16 * 1024
CONNECT_TIMEOUT = 1.0  # a router on the LAN accepts in a millisecond; the total deadline still applies
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


@dataclass
class _Reply:
    """httptools' callback target: collects one response, enforcing the caps as bytes arrive."""

    url: str
    max_body: int
    header_bytes: int = 0
    content_length: int | None = None
    headers_done: bool = False
    complete: bool = False
    body: bytearray = field(default_factory=bytearray)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value) + 4
        if self.header_bytes > MAX_HEADER_SIZE:
            raise RouterHttpError(f"router's reply headers from {self.url} exceed {MAX_HEADER_SIZE} bytes")
        if name.lower() == b"content-length" and value.strip().isdigit():
            self.content_length = int(value)
            if self.content_length > self.max_body:
                raise RouterHttpError(
                    f"router's reply from {self.url} is {self.content_length} bytes, over the {self.max_body} cap"
                )

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, chunk: bytes) -> None:
        self.body += chunk
        if len(self.body) > self.max_body:
            raise RouterHttpError(f"router's reply from {self.url} exceeds the {self.max_body}-byte cap")

    def on_message_complete(self) -> None:
        self.complete = True


def _serialize(method: str, target: str, host: str, headers: dict[str, str], content: bytes) -> bytes:
    lines = [
        f"{method} {target} HTTP/1.1",
        f"Host: {host}",
        f"User-Agent: {USER_AGENT}",
        "Connection: close",
        f"Content-Length: {len(content)}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    if any(bad in line for line in lines for bad in "\r\n\0"):
        raise ValueError("HTTP header text must be single lines")  # a caller bug, never router input
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + content


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
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise RouterHttpError(f"refusing to fetch {url}: only http URLs to the router")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    payload = _serialize(method, target, parts.netloc, headers or {}, content)
    try:
        async with asyncio.timeout(deadline):
            return await _exchange((parts.hostname, parts.port or 80), payload, url, max_body)
    except TimeoutError:
        raise RouterTimeout(f"router did not answer {url} within {deadline:g} s") from None
    except OSError as exc:
        raise RouterHttpError(f"HTTP to {url} failed: {exc.strerror or exc}") from None


async def _exchange(address: tuple[str, int], payload: bytes, url: str, max_body: int) -> HttpReply:
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    reply = _Reply(url, max_body)
    parser = httptools.HttpResponseParser(reply)
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await loop.sock_connect(sock, address)
        except TimeoutError:
            raise RouterHttpError(
                f"router did not accept a connection for {url} within {CONNECT_TIMEOUT:g} s"
            ) from None
        await loop.sock_sendall(sock, payload)
        while not reply.complete:
            data = await loop.sock_recv(sock, READ_SIZE)
            if not data:
                # A reply without Content-Length or chunking ends when the router closes.
                if reply.headers_done and reply.content_length is None:
                    break
                raise RouterHttpError(f"router closed the connection for {url} before the reply was complete")
            try:
                parser.feed_data(data)
            except httptools.HttpParserCallbackError as exc:
                cause = exc.__context__
                raise cause if isinstance(cause, RouterHttpError) else RouterHttpError(str(exc)) from None
            except httptools.HttpParserUpgrade:
                raise RouterHttpError(f"router tried to upgrade the connection for {url}") from None
            except httptools.HttpParserError as exc:
                raise RouterHttpError(f"router sent malformed HTTP for {url}: {exc}") from None
    status = parser.get_status_code()
    if 300 <= status < 400:
        raise RouterHttpError(f"router redirected {url} elsewhere; redirects are refused")
    return HttpReply(status, bytes(reply.body))
