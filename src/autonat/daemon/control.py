"""The daemon's control channel: JSON lines over a Unix socket (owner-only), optionally TCP with a token.

One request per line, one reply per line:
    {"cmd": "status"}                                  -> {"ok": true, "result": {...}}
    {"cmd": "add", "port": 5060, "proto": "udp", "sticky": false, "external_port": 0}
    {"cmd": "del", "port": 5060, "proto": "udp"}
    {"cmd": "republish"} | {"cmd": "reinit"} | {"cmd": "mapping", "enable": true}
    {"cmd": "events"}                                  -> {"ok": true}, then one event per line
Errors are {"ok": false, "error": "one line"}. Over TCP every request carries "token".
Requests are untrusted input: one line of at most 64 KiB, read within 10 s, at most 64 clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import socket
import stat
from pathlib import Path
from typing import Any

from autonat.daemon.profiles import ProfileManager
from autonat.engine.engine import NatEngine, Wanted
from autonat.errors import AutonatError
from autonat.proto.types import Transport
from autonat.service.sip import SipService

log = logging.getLogger("autonat.control")

MAX_REQUEST = 64 * 1024
REQUEST_TIMEOUT = 10.0
MAX_CLIENTS = 64


class ControlError(AutonatError):
    exit_code = 8


def _port(value: object, name: str = "port") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
        raise ControlError(f"{name} must be a port number 1-65535")
    return value


def _transport(value: object) -> Transport:
    if not isinstance(value, str):
        raise ControlError("proto must be udp or tcp")
    try:
        return Transport.parse(value)
    except ValueError as exc:
        raise ControlError(str(exc)) from None


class ControlServer:
    def __init__(
        self,
        engine: NatEngine,
        socket_path: Path,
        tcp: tuple[str, int] | None,
        token: str | None,
        profiles: ProfileManager | None = None,
        sip: SipService | None = None,
    ) -> None:
        self.engine = engine
        self.profiles = profiles
        self.sip = sip
        self.socket_path = socket_path
        self.tcp = tcp
        self.token = token
        self._servers: list[asyncio.Server] = []
        self._clients = asyncio.Semaphore(MAX_CLIENTS)
        self._handlers: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self._claim_socket_path()
        self.socket_path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        old_umask = os.umask(0o177)  # the socket is born owner-only: no window where others could connect
        try:
            server = await asyncio.start_unix_server(
                lambda r, w: self._client(r, w, needs_token=False), path=str(self.socket_path), limit=MAX_REQUEST
            )
        finally:
            os.umask(old_umask)
        os.chmod(self.socket_path, 0o600)
        self._servers.append(server)
        if self.tcp is not None:
            host, port = self.tcp
            tcp_server = await asyncio.start_server(
                lambda r, w: self._client(r, w, needs_token=True), host, port, limit=MAX_REQUEST
            )
            self._servers.append(tcp_server)
            log.warning("control channel also listening on TCP %s:%d (token required)", host, port)

    def _claim_socket_path(self) -> None:
        """Refuse to start beside a live daemon; remove a socket a dead one left behind."""
        path = self.socket_path
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise ControlError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink(missing_ok=True)  # stale
        else:
            raise ControlError(f"another autonat daemon is running (control socket {path})")
        finally:
            probe.close()

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        # Event streams never end on their own; a stopping daemon ends them.
        for handler in list(self._handlers):
            handler.cancel()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()
        with contextlib.suppress(OSError):
            self.socket_path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, needs_token: bool) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        if self._clients.locked():
            await self._send(writer, {"ok": False, "error": "too many control clients"})
            writer.close()
            return
        async with self._clients:
            try:
                while True:
                    try:
                        async with asyncio.timeout(REQUEST_TIMEOUT):
                            line = await reader.readline()
                    except (TimeoutError, ValueError):  # ValueError: a line over the limit
                        await self._send(writer, {"ok": False, "error": "request too slow or too long"})
                        return
                    if not line:
                        return
                    if not await self._handle(line, writer, needs_token):
                        return
            except (ConnectionError, asyncio.IncompleteReadError):
                return
            finally:
                writer.close()

    async def _handle(self, line: bytes, writer: asyncio.StreamWriter, needs_token: bool) -> bool:
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ControlError("a request is a JSON object")
            if needs_token and not (
                isinstance(request.get("token"), str)
                and self.token is not None
                and hmac.compare_digest(request["token"], self.token)
            ):
                raise ControlError("bad or missing token")
            if request.get("cmd") == "events":
                await self._send(writer, {"ok": True})
                async for event in self.engine.events.subscribe():
                    await self._send(writer, event.to_dict())
                return False
            result = await self._command(request)
        except json.JSONDecodeError:
            await self._send(writer, {"ok": False, "error": "request is not JSON"})
            return True
        except AutonatError as exc:
            await self._send(writer, {"ok": False, "error": str(exc)})
            return True
        await self._send(writer, {"ok": True, "result": result})
        return True

    async def _command(self, request: dict[str, Any]) -> Any:
        engine = self.engine
        command = request.get("cmd")
        if command == "status":
            return engine.status()
        if command in ("profile", "profiles", "advertise"):
            return self._profile_command(command, request)
        if command == "calls":
            return [] if self.sip is None else [call.describe() for call in {id(c): c for c in self.sip.calls}.values()]
        if command == "registrations":
            return [] if self.sip is None else self.sip.registrations()
        if not engine.settings.enabled and command in ("add", "del", "republish", "reinit", "mapping"):
            raise ControlError("NAT is disabled (--nonat)")
        if command == "add":
            if not engine.mapping_enabled:
                raise ControlError("NAT port mapping is disabled")
            sticky = request.get("sticky", False)
            if not isinstance(sticky, bool):
                raise ControlError("sticky must be true or false")
            external = request.get("external_port", 0)
            wanted = Wanted(
                _transport(request.get("proto")),
                _port(request.get("port")),
                0 if external == 0 else _port(external, "external_port"),
                sticky,
                "manual",
            )
            return (await engine.add(wanted)).to_dict()
        if command == "del":
            found = await engine.delete(_transport(request.get("proto")), _port(request.get("port")))
            if not found:
                raise ControlError("no such mapping")
            return {"deleted": True}
        if command == "republish":
            await engine.republish()
            return engine.status()
        if command == "reinit":
            probe = await engine.reinit()
            return probe.to_dict()
        if command == "mapping":
            enable = request.get("enable")
            if not isinstance(enable, bool):
                raise ControlError("mapping needs enable: true or false")
            await engine.set_mapping_enabled(enable)
            return {"mapping_enabled": engine.mapping_enabled}
        raise ControlError(f"unknown command {command!r}")

    def _profile_command(self, command: str, request: dict[str, Any]) -> Any:
        if self.profiles is None:
            raise ControlError("no profiles are configured")
        if command == "profiles":
            return sorted(self.profiles.profiles)
        name = request.get("name")
        if not isinstance(name, str):
            raise ControlError("name must be a profile name")
        if command == "profile":
            status = self.profiles.status(name)
            if self.sip is not None:
                status.update(self.sip.status(name))
            return status
        destination, media = request.get("destination"), request.get("media", False)
        if not isinstance(destination, str) or not isinstance(media, bool):
            raise ControlError("advertise needs destination (an IP) and media (true/false)")
        try:
            return str(self.profiles.advertise(name, destination, media))
        except ValueError as exc:
            raise ControlError(f"destination: {exc}") from None

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
        writer.write(json.dumps(message).encode() + b"\n")
        await writer.drain()


class ControlClient:
    """The CLI's side: one connection, JSON lines."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> ControlClient:
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(str(self.socket_path), limit=1 << 22)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(f"no autonat daemon is running (no control socket at {self.socket_path})") from None
        except PermissionError:
            raise ControlError(
                f"no permission to use the control socket {self.socket_path} (run as its owner)"
            ) from None
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._writer is not None:
            self._writer.close()

    async def send(self, request: dict[str, Any]) -> None:
        assert self._writer is not None
        self._writer.write(json.dumps(request).encode() + b"\n")
        await self._writer.drain()

    async def receive(self) -> dict[str, Any]:
        assert self._reader is not None
        line = await self._reader.readline()
        if not line:
            raise ControlError("the daemon closed the control connection")
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def call(self, request: dict[str, Any]) -> Any:
        await self.send(request)
        reply = await self.receive()
        if not reply.get("ok"):
            raise ControlError(str(reply.get("error", "the daemon refused")))
        return reply.get("result")
