"""`autonat doctor`'s measurements: what the router does, and whether the internet really gets in.

Bounded in time as a whole (`budget`), and careful: every mapping it makes is journalled before it is
asked for and removed (then forgotten by the journal) before it returns, as the engine does.

SSDP is looked at on its own (`_ssdp`), three searches from three sockets so that each answer is
attributed: one sent to the gateway, one to the multicast group, and `ssdp:all`. That names the routers
that answer only multicast (S1), from another port than 1900 (S2), or `ssdp:all` with another device's
description only (S6); autonat's discovery copes with each (docs/QUIRKS.md).

Reachability from outside uses a STUN server that can answer from a second address and port (RFC 5780
CHANGE-REQUEST, also RFC 3489's; Debian's stund does): a Binding request from the mapped port asks for
the answer to come from elsewhere. That answer is unsolicited for the NAT (no packet went to that
address), so it arrives only through a mapping that really forwards. The same request from a port with
no mapping shows the NAT's filtering: its answer must not arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

from autonat.addresses import classify
from autonat.aio import trace as wiretrace
from autonat.aio import watch
from autonat.aio.router import RouterSession
from autonat.aio.stun import parse_stun_target, resolve_server
from autonat.doctor.findings import Measurements, ProtocolAnswer, SsdpBehaviour, Trial
from autonat.engine.journal import Journal, JournalEntry
from autonat.errors import AutonatError
from autonat.mapper import MappingRequest
from autonat.portmapper import PortMapper
from autonat.proto import ssdp, stun
from autonat.proto.errors import DecodeError
from autonat.proto.types import Transport

REQUESTED_LEASE = 600  # long enough for the run, short enough that a crash leaves nothing for long
PERSISTENCE = 12.0  # the full run checks the mappings again after this long ("drops after a minute" class)
REPLY_WAIT = 1.0  # a STUN answer on the LAN/lab comes in milliseconds; a dropped one never does
CHANGE_IP_AND_PORT = (0x04 | 0x02).to_bytes(4, "big")  # RFC 5780 §7.2 CHANGE-REQUEST flags A and B
SSDP_WINDOW = 0.4  # how long the SSDP searches collect answers (a gateway answers a unicast one in ~1 ms)
SSDP_RESEND = 0.1  # each search is sent twice, this far apart (a lost datagram is not a quirk)
MAX_SSDP_REPLIES = 64  # answers kept per search socket: the LAN can answer too, and forge


def _send(transport: asyncio.DatagramTransport, data: bytes, peer: tuple[str, int], *, search: bool = False) -> None:
    """Send one datagram of doctor's own (STUN, SSDP, the hairpin token), traced like the shells' (--trace)."""
    if wiretrace.ON:
        (wiretrace.ssdp_sent if search else wiretrace.datagram_sent)(data, peer)
    transport.sendto(data, peer)


class _Socket(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.inbox: asyncio.Queue[tuple[bytes, tuple[Any, ...]]] = asyncio.Queue(64)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if wiretrace.ON:
            wiretrace.datagram_received(data, addr)
        with contextlib.suppress(asyncio.QueueFull):
            self.inbox.put_nowait((data, addr))


async def _udp(local: str) -> tuple[asyncio.DatagramTransport, _Socket, int]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(_Socket, local_addr=(local, 0))
    return transport, protocol, transport.get_extra_info("sockname")[1]


async def _receive(protocol: _Socket, accept: Any, wait: float) -> tuple[bytes, tuple[Any, ...]] | None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait):
            while True:
                data, addr = await protocol.inbox.get()
                if accept(data, addr):
                    return data, addr
    return None


async def _changed_reply(
    transport: asyncio.DatagramTransport, protocol: _Socket, server: tuple[str, int], tries: int = 4
) -> bool:
    """Ask `server` to answer from its other address and port; True if that answer came in. A "yes" can
    come early; a "no" costs every try, so the filtering check (where "no" is the good answer) tries less."""
    transaction = stun.new_transaction_id()
    request = stun.StunMessage(
        stun.MessageClass.REQUEST,
        stun.Method.BINDING,
        transaction,
        (stun.Attribute(stun.AttributeType.CHANGE_REQUEST, CHANGE_IP_AND_PORT),),
    ).encode()

    def accept(data: bytes, addr: tuple[Any, ...]) -> bool:
        try:
            answer = stun.parse_binding_response(data, transaction)
        except DecodeError:
            return False
        return not isinstance(answer, stun.ErrorCode) and (addr[0], addr[1]) != server

    for _ in range(tries):  # retransmissions: a lost packet (or a busy server) is not a closed door
        _send(transport, request, server)
        if await _receive(protocol, accept, REPLY_WAIT / 2) is not None:
            return True
    return False


class _SsdpSocket(asyncio.DatagramProtocol):
    """Collects the gateway's answers to one search: (source port, the answer)."""

    def __init__(self, gateway: str) -> None:
        self.gateway = gateway
        self.answers: list[tuple[int, ssdp.SearchResponse]] = []

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if wiretrace.ON:
            wiretrace.ssdp_received(data, addr)
        if addr[0] != self.gateway or len(self.answers) >= MAX_SSDP_REPLIES:
            return
        with contextlib.suppress(DecodeError, ValueError):
            message = ssdp.parse_datagram(data)
            if isinstance(message, ssdp.SearchResponse):
                self.answers.append((addr[1], message))

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error for a search is simply no answer


def _new_codes(before: Mapping[int, int], after: Mapping[int, int]) -> list[int]:
    """The codes counted between two snapshots of a client's `router_codes`, each as often as it came."""
    return sorted((Counter(after) - Counter(before)).elements())


class Doctor:
    def __init__(
        self,
        *,
        gateway: str | None,
        interface: str | None,
        timeout: float,
        root_url: str | None,
        stun_server: str | None,
        quick: bool,
        journal: Journal | None,
        persistence: float = PERSISTENCE,
    ) -> None:
        self.gateway, self.interface, self.timeout, self.root_url = gateway, interface, timeout, root_url
        self.stun_text = stun_server
        self.quick = quick
        self.journal = journal
        self.persistence = persistence
        self.m = Measurements(quick=quick)
        self._sockets: dict[str, tuple[asyncio.DatagramTransport, _Socket, int]] = {}

    async def run(self, budget: float) -> Measurements:
        started = time.monotonic()
        try:
            async with asyncio.timeout(budget):
                await self._run()
        except TimeoutError:
            self.m.error = f"doctor stopped at its {budget:g} s budget"
        finally:
            for transport, _, _ in self._sockets.values():
                transport.close()
            self.m.elapsed = time.monotonic() - started
        return self.m

    async def _run(self) -> None:
        m = self.m
        try:
            session = await RouterSession.open(self.gateway, self.interface, self.timeout, self.root_url)
        except AutonatError as exc:
            m.error = str(exc)
            return
        listeners: list[asyncio.BaseTransport] = []
        ssdp_task: asyncio.Future[SsdpBehaviour | None] | None = None
        try:
            location = session.location
            m.gateway, m.local_address, m.interface = (
                str(location.gateway),
                str(location.local_address),
                location.interface,
            )
            listeners = await self._listen(session)
            probe = await session.probe("auto")
            m.selected = probe.selected
            for name, status in probe.protocols.items():
                code = status.details.get("result")
                m.protocols[name] = ProtocolAnswer(
                    name,
                    status.available,
                    status.reason,
                    status.elapsed_ms,
                    status.epoch,
                    None if status.external_ip is None else str(status.external_ip),
                    code if isinstance(code, int) else None,
                )
            if probe.external_ip is not None:
                m.external_ip, m.external_kind = str(probe.external_ip), classify(probe.external_ip)
            if m.protocols.get("upnp") is not None and m.protocols["upnp"].available:
                with contextlib.suppress(AutonatError):
                    m.igd = (await session.upnp.discover()).details()
                if self.root_url is None and m.igd is not None:
                    # Its own sockets and SSDP_WINDOW: it runs beside the rest, not before it.
                    ssdp_task = asyncio.ensure_future(self._ssdp(session, str(m.igd["root_url"])))
            server = await self._stun(str(location.local_address))
            protocols = [p for p in ("pcp", "natpmp", "upnp") if p in m.protocols and m.protocols[p].available]
            if self.quick:
                protocols = protocols[:1]
            try:
                for name in protocols:
                    await self._trial(session, name, server)
                # Still there after a while? Through the mapping (with a STUN server) and, for UPnP, in
                # the router's own table: routers that "drop mappings after a minute" (docs/QUIRKS.md U14).
                later = [t for t in m.trials if t.made and (server is not None or t.protocol == "upnp")]
                if not self.quick and later:
                    await asyncio.sleep(self.persistence)
                    for trial in later:
                        if server is not None and trial.reachable:
                            transport, protocol, _ = self._sockets[trial.protocol]
                            again = await _changed_reply(transport, protocol, server)
                            trial.still_reachable_after = (self.persistence, again)
                        if trial.protocol == "upnp" and trial.listed:
                            with contextlib.suppress(AutonatError):
                                trial.still_listed_after = (self.persistence, await self._listed(session, trial))
                await self._hairpin()
                if ssdp_task is not None:
                    m.ssdp = await ssdp_task
            finally:
                for trial in m.trials:
                    if trial.made or trial.error is not None:
                        await self._delete(session, trial)
        finally:
            if ssdp_task is not None and not ssdp_task.done():
                ssdp_task.cancel()  # the budget ran out: its sockets close as it ends
            for listener in listeners:
                listener.close()
            await session.aclose()

    async def _listen(self, session: RouterSession) -> list[asyncio.BaseTransport]:
        local, gateway = session.location.local_address, session.location.gateway

        def announced(_: object) -> None:
            self.m.announcements += 1

        def notified(_: object) -> None:
            self.m.notifies += 1

        started = []
        for start, callback in ((watch.listen_announcements, announced), (watch.listen_notify, notified)):
            with contextlib.suppress(OSError):
                transport, _ = await start(local, gateway, callback)
                started.append(transport)
        return started

    async def _stun(self, local: str) -> tuple[str, int] | None:
        """The STUN server's address; the external address it sees (the cross-check); filtering without a
        mapping (the answer from elsewhere must not come in)."""
        m = self.m
        if not self.stun_text:
            return None
        m.stun_server = self.stun_text
        try:
            host, port = parse_stun_target(self.stun_text)
            resolved = await resolve_server(host, port, timeout=self.timeout)
        except AutonatError as exc:
            m.stun_error = str(exc)
            return None
        server = (str(resolved), port)
        transport, protocol, _ = await _udp(local)
        try:
            transaction = stun.new_transaction_id()
            _send(transport, stun.build_binding_request(transaction), server)

            def accept(data: bytes, addr: tuple[Any, ...]) -> bool:
                try:
                    return not isinstance(stun.parse_binding_response(data, transaction), stun.ErrorCode)
                except DecodeError:
                    return False

            answer = await _receive(protocol, accept, max(self.timeout, REPLY_WAIT))
            if answer is None:
                m.stun_error = "no answer"
                return None
            seen = stun.parse_binding_response(answer[0], transaction)
            assert not isinstance(seen, stun.ErrorCode)
            m.stun_address = str(seen[0])
            m.unsolicited_blocked = not await _changed_reply(transport, protocol, server, tries=2)
        finally:
            transport.close()
        return server

    async def _ssdp(self, session: RouterSession, igd_location: str) -> SsdpBehaviour | None:
        """Three searches, each from its own socket: the IGD type sent to the gateway, the same sent to
        the multicast group, and `ssdp:all` sent to both (UPnP DA 1.1 §1.3.2). Bounded: SSDP_WINDOW."""
        local, gateway = str(session.location.local_address), str(session.location.gateway)
        group = (str(ssdp.MULTICAST_ADDRESS), ssdp.PORT)
        loop = asyncio.get_running_loop()
        opened: list[tuple[asyncio.DatagramTransport, _SsdpSocket]] = []
        try:
            for _ in range(3):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(local))
                sock.bind((local, 0))
                transport, protocol = await loop.create_datagram_endpoint(lambda: _SsdpSocket(gateway), sock=sock)
                opened.append((transport, protocol))
        except OSError:
            for transport, _ in opened:
                transport.close()
            return None  # no IPv4 multicast here: nothing to tell about SSDP
        (unicast, unicast_answers), (multicast, multicast_answers), (everything, all_answers) = opened
        unicast_search = ssdp.build_msearch(ssdp.ST_IGD1, host=f"{gateway}:{ssdp.PORT}")
        group_search = ssdp.build_msearch(ssdp.ST_IGD1)
        all_unicast = ssdp.build_msearch(ssdp.ST_ALL, host=f"{gateway}:{ssdp.PORT}")
        all_group = ssdp.build_msearch(ssdp.ST_ALL)
        try:
            for _ in range(2):
                with contextlib.suppress(OSError):
                    _send(unicast, unicast_search, (gateway, ssdp.PORT), search=True)
                    _send(multicast, group_search, group, search=True)
                    _send(everything, all_unicast, (gateway, ssdp.PORT), search=True)
                    _send(everything, all_group, group, search=True)
                await asyncio.sleep(SSDP_RESEND)
            await asyncio.sleep(SSDP_WINDOW - 2 * SSDP_RESEND)
        finally:
            for transport, _ in opened:
                transport.close()
        answers = unicast_answers.answers + multicast_answers.answers + all_answers.answers
        return SsdpBehaviour(
            unicast_answered=bool(unicast_answers.answers),
            multicast_answered=bool(multicast_answers.answers),
            source_ports=sorted({port for port, _ in answers}),
            all_locations=list(dict.fromkeys(answer.location for _, answer in all_answers.answers)),
            igd_location=igd_location,
        )

    def _codes(self, session: RouterSession, name: str) -> Mapping[int, int]:
        """A snapshot of the error codes `name`'s client has counted so far."""
        if name == "pcp":
            return dict(session.pcp.router_codes)
        if name == "natpmp":
            return dict(session.natpmp.router_codes)
        return dict(session.upnp.router_codes)

    async def _listed(self, session: RouterSession, trial: Trial) -> bool:
        assert trial.external_port is not None
        entry = await session.upnp.entry(Transport.UDP, trial.external_port)
        if entry is not None and entry.internal_port == trial.internal_port:
            trial.router_lease = entry.lease_duration
            return True
        return False

    def _client(self, session: RouterSession, name: str) -> PortMapper:
        clients: dict[str, PortMapper] = {"pcp": session.pcp, "natpmp": session.natpmp, "upnp": session.upnp}
        return clients[name]

    def _journal_entry(self, session: RouterSession, trial: Trial, lease: int, external: int | None) -> JournalEntry:
        return JournalEntry(
            transport=Transport.UDP,
            internal_port=trial.internal_port,
            owner="doctor",
            sticky=False,
            desired=False,  # never to be re-made: a crash leaves a row the daemon's next start deletes
            protocol=trial.protocol,
            gateway=str(session.location.gateway),
            internal_address=str(session.location.local_address),
            requested_external_port=0,
            external_port=external,
            lease=lease,
            updated_at=time.time(),
        )

    async def _trial(self, session: RouterSession, name: str, server: tuple[str, int] | None) -> None:
        transport, protocol, port = await _udp(str(session.location.local_address))
        self._sockets[name] = (transport, protocol, port)
        trial = Trial(name, port, REQUESTED_LEASE)
        self.m.trials.append(trial)
        client = self._client(session, name)
        if self.journal is not None:
            self.journal.record(self._journal_entry(session, trial, REQUESTED_LEASE, None))
        codes = self._codes(session, name)
        try:
            granted = await client.add(MappingRequest(Transport.UDP, port, 0, REQUESTED_LEASE))
        except AutonatError as exc:
            trial.error = str(exc)
            return
        finally:
            trial.router_codes = _new_codes(codes, self._codes(session, name))
        trial.granted_lease, trial.external_port = granted.lifetime, granted.external_port
        if self.journal is not None:
            self.journal.record(self._journal_entry(session, trial, granted.lifetime, granted.external_port))
        if granted.external_ip is not None and self.m.external_ip is None:
            self.m.external_ip, self.m.external_kind = str(granted.external_ip), classify(granted.external_ip)
        with contextlib.suppress(AutonatError):
            again = await client.add(MappingRequest(Transport.UDP, port, granted.external_port, REQUESTED_LEASE))
            trial.renewal_keeps_port = again.external_port == granted.external_port
        if name == "upnp":
            with contextlib.suppress(AutonatError):
                trial.listed = await self._listed(session, trial)
        if name == "natpmp":
            # RFC 6886 §3.3's "anonymous" request, which autonat never sends (MikroTik refuses it, P5);
            # a grant is this port's own mapping again, removed by its delete below.
            with contextlib.suppress(AutonatError):
                trial.anonymous_port = await session.natpmp.anonymous_port(Transport.UDP, port, REQUESTED_LEASE)
        if server is not None:
            trial.reachable = await _changed_reply(transport, protocol, server)

    async def _delete(self, session: RouterSession, trial: Trial) -> None:
        try:
            if trial.protocol == "upnp" and trial.external_port is not None:
                await session.upnp.delete_external(Transport.UDP, trial.external_port)
            else:
                await self._client(session, trial.protocol).delete(Transport.UDP, trial.internal_port)
        except AutonatError:
            trial.deleted = False
            return
        trial.deleted = True
        if self.journal is not None:
            self.journal.remove(str(session.location.gateway), Transport.UDP, trial.internal_port)

    async def _hairpin(self) -> None:
        """From another LAN socket to our own external address and mapped port: does it come back in?"""
        m = self.m
        made = [t for t in m.trials if t.made]
        if not made or m.external_ip is None or m.local_address is None:
            return
        trial = made[0]
        _, protocol, _ = self._sockets[trial.protocol]
        sender, _, _ = await _udp(m.local_address)
        try:
            token = b"autonat-hairpin-" + str(time.monotonic_ns()).encode()
            assert trial.external_port is not None
            target = (m.external_ip, trial.external_port)
            with contextlib.suppress(OSError):
                _send(sender, token, target)
            m.hairpin = await _receive(protocol, lambda data, _: data == token, REPLY_WAIT / 2) is not None
        finally:
            sender.close()
