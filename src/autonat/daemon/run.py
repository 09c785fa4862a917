"""`autonat run`: the daemon in the foreground, clean on SIGTERM/SIGINT.

Start-up order matters: the control socket first (so `nat_map status` answers at once, and a second
daemon is refused before it touches the router), then the engine, whose discovery runs in the
background and never delays start-up.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from autonat.acl import AclSet
from autonat.aio.interfaces import host_networks
from autonat.daemon.config import Config
from autonat.daemon.control import ControlServer
from autonat.engine.engine import NatEngine, Wanted
from autonat.engine.journal import Journal
from autonat.service.profiles import ProfileManager
from autonat.service.sip import SipService
from autonat.state import host_secret

log = logging.getLogger("autonat")


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d autonat: %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("autonat")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # Every hole opened or closed is logged whatever the level (it is the security record), and so is
    # every failed authentication (fail2ban's input: deploy/fail2ban).
    for record in ("autonat.holes", "autonat.auth"):
        logging.getLogger(record).setLevel(logging.INFO)


async def run_daemon(config: Config) -> int:
    configure_logging(config.log_level)
    for warning in config.warnings:
        log.warning("%s", warning)
    journal = Journal(config.journal_path) if config.nat.enabled else None
    engine = NatEngine(config.nat, journal)
    profiles = ProfileManager(config.profiles, AclSet(config.acls, host_networks()), engine)
    sip = (
        SipService(config.sip, profiles, engine, dict(config.sip_profiles), host_secret()) if config.profiles else None
    )
    control = ControlServer(engine, config.control.socket, config.control.tcp, config.control.token, profiles, sip)
    try:
        await control.start()
        static = [Wanted(m.transport, m.port, m.external_port, m.sticky, m.owner) for m in config.mappings]
        await engine.start(static)
        await profiles.start()
        if sip is not None:
            await sip.start()
        log.info(
            "running: NAT %s, mapping %s, control socket %s",
            "enabled" if config.nat.enabled else "disabled (--nonat)",
            "enabled" if config.nat.mapping else "disabled (--nonatmap)",
            config.control.socket,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("stopping: removing non-sticky mappings (at most %g s)", config.nat.shutdown_timeout)
    finally:
        await control.stop()
        log.debug("control channel closed")
        if sip is not None:
            await sip.stop()  # BYE to live calls, un-REGISTER, SIP and RTP mappings removed
        await profiles.stop()
        await engine.stop()
        log.debug("engine stopped")
        if journal is not None:
            journal.close()
    return 0
