"""`autonat run`: the daemon in the foreground, clean on SIGTERM/SIGINT, re-reading its config on SIGHUP.

Start-up order matters: the control socket first (so `nat_map status` answers at once, and a second
daemon is refused before it touches the router), then the engine, whose discovery runs in the
background and never delays start-up. systemd hears READY=1 once the control socket answers
(daemon/notify.py), then STATUS= lines as the external address and the mappings change, and WATCHDOG=1
from the event loop itself (a stuck loop stops them, and systemd restarts the daemon).

A reload (SIGHUP, `autonat reload`) reads the file again; a file with mistakes is refused with its usual
one-line errors and nothing changes. A good one is applied as a difference: static mappings added and
removed (unchanged ones untouched), ACL lists recomputed, the log level and format; what can only change
with a restart (the control socket, the journal, the [nat] table) is named in one warning line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autonat.acl import AclSet
from autonat.aio import trace
from autonat.aio.interfaces import host_networks
from autonat.daemon import logs
from autonat.daemon.config import Config, ConfigError, StaticMapping, load_config
from autonat.daemon.control import ControlServer
from autonat.daemon.notify import Notifier
from autonat.engine.engine import NatEngine, Wanted
from autonat.engine.events import EventKind
from autonat.engine.journal import Journal
from autonat.errors import AutonatError
from autonat.service.profiles import ProfileManager
from autonat.service.sip import SipService
from autonat.state import host_secret

if TYPE_CHECKING:
    from autonat.web.server import WebServer

log = logging.getLogger("autonat")
reload_log = logging.getLogger("autonat.reload")  # every reload, whatever the level
STATUS_EVENTS = frozenset(
    {
        EventKind.DISCOVERED,
        EventKind.EXTERNAL_ADDRESS_CHANGE,
        EventKind.NAT_ADD,
        EventKind.NAT_DEL,
        EventKind.NAT_LOST,
        EventKind.ROUTER_REBOOT,
    }
)


def configure_logging(level: str, fmt: str = "text") -> None:
    """The daemon's logging (autonat.daemon.logs): text with an ISO time, journald priorities, or JSON."""
    logs.configure(level, fmt)


def _static(mapping: StaticMapping) -> Wanted:
    return Wanted(mapping.transport, mapping.port, mapping.external_port, mapping.sticky, mapping.owner)


@dataclass
class ReloadResult:
    changes: list[str]
    restart_needed: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"changes": self.changes, "restart_needed": self.restart_needed}


class Daemon:
    """The running daemon's parts, and what to do with them at start, reload and stop."""

    def __init__(self, config: Config, *, overrides: dict[str, Any] | None = None) -> None:
        self.config = config
        self.overrides = overrides or {}
        self.notifier = Notifier()
        self.journal = Journal(config.journal_path) if config.nat.enabled else None
        self.engine = NatEngine(config.nat, self.journal)
        self.profiles = ProfileManager(config.profiles, AclSet(config.acls, host_networks()), self.engine)
        self.sip = SipService(config.sip, self.profiles, self.engine, host_secret()) if config.profiles else None
        self.control = ControlServer(
            self.engine,
            config.control.socket,
            config.control.tcp,
            config.control.token,
            self.profiles,
            self.sip,
            reload=self.reload,
        )
        self.web: WebServer | None = None
        if config.web.listen is not None:
            from autonat.web.server import WebServer  # the page and prometheus-client load only when [web] is on
            from autonat.web.status import Sources

            sources = Sources(
                self.engine,
                self.profiles,
                self.sip,
                doctor_report=lambda: self.control.last_doctor_report,  # `autonat doctor` hands it over
                control_refusals=lambda: self.control.refusals,
            )
            self.web = WebServer(config.web, sources)
        self._stop = asyncio.Event()
        self._reloading = asyncio.Lock()
        self._tasks: list[asyncio.Task[Any]] = []

    async def run(self) -> int:
        config = self.config
        try:
            await self.control.start()
            if self.web is not None:
                await self.web.start()
            await self.engine.start([_static(m) for m in config.mappings])
            await self.profiles.start()
            if self.sip is not None:
                await self.sip.start()
            log.info(
                "running: NAT %s, mapping %s, control socket %s",
                "enabled" if config.nat.enabled else "disabled (--nonat)",
                "enabled" if config.nat.mapping else "disabled (--nonatmap)",
                config.control.socket,
            )
            self.notifier.ready(self._status_line())
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._stop.set)
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
            self._tasks.append(loop.create_task(self._follow_status()))
            if self.notifier.watchdog_interval is not None:
                self._tasks.append(loop.create_task(self._watchdog(self.notifier.watchdog_interval)))
            await self._stop.wait()
            self.notifier.stopping()
            log.info("stopping: removing non-sticky mappings (at most %g s)", config.nat.shutdown_timeout)
        finally:
            for task in self._tasks:
                task.cancel()
            if self.web is not None:
                await self.web.stop()
            await self.control.stop()
            log.debug("control channel closed")
            if self.sip is not None:
                await self.sip.stop()  # BYE to live calls, un-REGISTER, SIP and RTP mappings removed
            await self.profiles.stop()
            await self.engine.stop()
            log.debug("engine stopped")
            if self.journal is not None:
                self.journal.close()
        return 0

    # --- systemd -------------------------------------------------------------------------------------

    def _status_line(self) -> str:
        status = self.engine.status()
        active = sum(m["state"] == "active" for m in status["mappings"])
        address = status["external_ip"] or "unknown"
        return f"{status['state']}: external address {address}, {active} of {len(status['mappings'])} mappings active"

    async def _follow_status(self) -> None:
        events = self.engine.events.subscribe()
        try:
            async for event in events:
                if event.kind in STATUS_EVENTS:
                    self.notifier.status(self._status_line())
        finally:
            await events.aclose()

    async def _watchdog(self, interval: float) -> None:
        """WATCHDOG=1 from the event loop itself: if the loop stalls, they stop and systemd steps in."""
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    # --- reload ---------------------------------------------------------------------------------------

    def _on_sighup(self) -> None:
        task = asyncio.get_running_loop().create_task(self._reload_logged())
        self._tasks.append(task)

    async def _reload_logged(self) -> None:
        with contextlib.suppress(AutonatError):  # already logged, one line per mistake
            await self.reload()

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file and apply what changed; a bad file changes nothing (ConfigError)."""
        async with self._reloading:
            self.notifier.reloading()
            try:
                return (await self._reload()).to_dict()
            finally:
                self.notifier.ready(self._status_line())

    async def _reload(self) -> ReloadResult:
        source = self.config.source
        try:
            new = load_config(source).with_overrides(**self.overrides)
        except ConfigError as exc:
            for problem in exc.problems:
                reload_log.error("reload refused, nothing changed: %s", problem)
            raise
        old, result = self.config, ReloadResult([], [])
        await self._apply_mappings(old, new, result)
        if new.acls != old.acls:
            self.profiles.acls = AclSet(new.acls, host_networks())
            result.changes.append("ACL lists")
        if (new.log_level, new.log_format) != (old.log_level, old.log_format):
            logs.configure(new.log_level, new.log_format)
            result.changes.append(f"log {new.log_level}/{new.log_format}")
        if new.log_trace != old.log_trace:
            trace.configure(new.log_trace)
            result.changes.append(f"trace {','.join(new.log_trace) or 'off'}")
        for name, changed in (
            ("[nat]", new.nat != old.nat),
            ("[control]", new.control != old.control),
            ("[journal]", new.journal_path != old.journal_path),
            ("[web]", new.web != old.web),
        ):
            if changed:
                result.restart_needed.append(name)
        if self.sip is not None:
            applied, needed = await self.sip.reload(new.sip, new.profiles)
            result.changes += applied
            result.restart_needed += needed
        elif any(p.sip.listen for p in new.profiles):
            result.restart_needed.append("SIP service (the daemon started without a [[profile]])")
        else:
            result.changes += [f"addressing of {name}" for name in self.profiles.update(new.profiles)]
        # What was not applied stays as it runs: the config in effect is the old one with the applied parts.
        self.config = new if not result.restart_needed else _applied(old, new)
        reload_log.info(
            "config reloaded from %s: %s%s",
            source or "defaults",
            ", ".join(result.changes) or "no change",
            f"; restart needed for {', '.join(result.restart_needed)}" if result.restart_needed else "",
            extra={"fields": {"event": "reload", **result.to_dict()}},
        )
        return result

    async def _apply_mappings(self, old: Config, new: Config, result: ReloadResult) -> None:
        before = {(m.transport, m.port): m for m in old.mappings}
        after = {(m.transport, m.port): m for m in new.mappings}
        for key in before:
            if key not in after:
                await self.engine.delete(*key)
                result.changes.append(f"-mapping {key[0]} {key[1]}")
        for key, mapping in after.items():
            if before.get(key) != mapping:
                await self.engine.add(_static(mapping), wait=0)
                result.changes.append(f"+mapping {key[0]} {key[1]}")


def _applied(old: Config, new: Config) -> Config:
    """The config now in effect when some of `new` waits for a restart: what a reload applies, from `new`."""
    from dataclasses import replace

    return replace(
        old,
        mappings=new.mappings,
        acls=new.acls,
        log_level=new.log_level,
        log_format=new.log_format,
        log_trace=new.log_trace,
    )


async def run_daemon(config: Config, *, overrides: dict[str, Any] | None = None) -> int:
    configure_logging(config.log_level, config.log_format)
    if config.log_trace:
        trace.configure(config.log_trace)
    for warning in config.warnings:
        log.warning("%s", warning)
    return await Daemon(config, overrides=overrides).run()


def check_config(path: Path | None) -> list[str]:
    """`autonat run --check`: the mistakes of the config `run` would read (empty: it is good)."""
    try:
        load_config(path)
    except ConfigError as exc:
        return exc.problems
    return []
