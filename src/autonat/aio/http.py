"""HTTP to the router, with the caps that make a hostile or broken router harmless.

httpx does the protocol; this module adds what a router must never be able to do to us: make us wait
past a total deadline (a server that drips one byte a second defeats per-read timeouts), make us read
an unbounded body, redirect us elsewhere, or route our request through a proxy from the environment.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httpx

from autonat.errors import RouterRefused, RouterTimeout

CONNECT_TIMEOUT = 1.0


class RouterHttpError(RouterRefused):
    """The router's HTTP side misbehaved: refused connection, redirect, oversized or truncated body."""

    def __init__(self, message: str) -> None:
        super().__init__(message, protocol="upnp", code=0)


@dataclass(frozen=True, slots=True)
class HttpReply:
    status: int
    body: bytes


def new_client() -> httpx.AsyncClient:
    """One client per router session: keep-alive saves a TCP handshake per SOAP call."""
    return httpx.AsyncClient(
        trust_env=False,  # never send router traffic through a proxy from the environment
        follow_redirects=False,
        timeout=httpx.Timeout(CONNECT_TIMEOUT),
        limits=httpx.Limits(max_connections=4, max_keepalive_connections=2),
        # identity only: a compressed body could expand past the cap after we counted it
        headers={"User-Agent": "autonat UPnP/1.1", "Accept-Encoding": "identity"},
    )


async def request(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    max_body: int,
    deadline: float,
    headers: dict[str, str] | None = None,
    content: bytes | None = None,
) -> HttpReply:
    """One request with a total deadline and a body cap; errors are one-line `RouterRefused`/`RouterTimeout`."""
    try:
        async with asyncio.timeout(deadline):
            async with client.stream(method, url, headers=headers, content=content) as response:
                if response.is_redirect:
                    raise RouterHttpError(f"router redirected {url} elsewhere; redirects are refused")
                declared = response.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > max_body:
                    raise RouterHttpError(f"router's reply from {url} is {declared} bytes, over the {max_body} cap")
                body = bytearray()
                async for chunk in response.aiter_raw():
                    body += chunk
                    if len(body) > max_body:
                        raise RouterHttpError(f"router's reply from {url} exceeds the {max_body}-byte cap")
                return HttpReply(response.status_code, bytes(body))
    except TimeoutError:
        raise RouterTimeout(f"router did not answer {url} within {deadline:g} s") from None
    except httpx.TimeoutException:
        raise RouterTimeout(f"router did not answer {url} in time") from None
    except httpx.HTTPError as exc:
        raise RouterHttpError(f"HTTP to {url} failed: {type(exc).__name__}: {exc}".rstrip(": ")) from None
