"""The web listener's settings: `[web]` in the config (validated by autonat.daemon.config, which sits above
this layer and hands the result down)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["WebConfig"]


@dataclass(frozen=True, slots=True)
class WebConfig:
    """The status page and /metrics (autonat.web): off unless `listen` is set ("IP:PORT").

    A set `token` is asked of every request (nothing on the page changes state yet, so it guards the
    reading); a listener that is not loopback must have one. The caps bound what a LAN peer can hold:
    `max_connections` at once, `max_request_size` bytes of request head, `idle_timeout` s without a
    complete request."""

    listen: tuple[str, int] | None = None
    token: str | None = field(default=None, repr=False)  # a secret: kept out of logged reprs
    max_connections: int = 32
    max_request_size: int = 8192
    idle_timeout: float = 10.0
