"""A scriptable fake UPnP IGD for the quirks the real router (miniupnpd) cannot show.

Run inside a test namespace as `python igd_server.py SCENARIO ADDRESS LOG`: answers SSDP on port 1900
(unicast and multicast) and HTTP on port 5000 (description, SCPD, SOAP control). Every HTTP request
line is appended to LOG so tests can assert what the client did (and did not) fetch, and so is every
AddPortMapping attempt (`ADD ...`) and grant (`MAPPED ...`).

Tests without root use `FakeIgd` in-process instead: its `http` handler on a loopback port (set `port`
to it, so the description's URLBase points there) and `external` for the address it reports.
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

ST_IGD1 = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
SERVICE = "urn:schemas-upnp-org:service:WANIPConnection:1"
PPP_SERVICE = "urn:schemas-upnp-org:service:WANPPPConnection:1"
HTTP_PORT = 5000
# The legacy DSL Forum (TR-064) types: Tailscale's `legacy_upnp.go` (docs/QUIRKS.md U13).
DSLFORUM_IGD = "urn:dslforum-org:device:InternetGatewayDevice:1"
DSLFORUM_SERVICE = "urn:dslforum-org:service:WANIPConnection:1"
# What Sagemcom F@st3890 V3 answers `ssdp:all` with, its first descriptor only (docs/QUIRKS.md S6).
WFA_DEVICE = "urn:schemas-wifialliance-org:device:WFADevice:1"
DROP_AFTER = 2.0  # `drop_after`: "drops mappings after a minute", a minute made 2 s (docs/QUIRKS.md U14)
FORCED_LEASE = 86400  # `lease_day`: Technicolor's lease, whatever was asked (docs/QUIRKS.md U15)


def description(
    address: str,
    port: int = HTTP_PORT,
    services: tuple[tuple[str, str], ...] = ((SERVICE, "/ctl/IPConn"),),
    igd_type: str = ST_IGD1,
) -> bytes:
    """The root description; `services` are (service type, control path) pairs, one WAN connection device
    each (several: docs/QUIRKS.md U12)."""
    urn = igd_type.split(":")[1]  # schemas-upnp-org, or dslforum-org for TR-064
    connections = "".join(
        f"""<device>
    <deviceType>urn:{urn}:device:WANConnectionDevice:1</deviceType><friendlyName>WANConn{index}</friendlyName>
    <manufacturer>t</manufacturer><modelName>t</modelName><UDN>uuid:fake-wanconn{index}</UDN>
    <serviceList><service>
     <serviceType>{kind}</serviceType><serviceId>urn:upnp-org:serviceId:Conn{index}</serviceId>
     <controlURL>{path}</controlURL><eventSubURL>/evt{path}</eventSubURL><SCPDURL>/WANIPCn.xml</SCPDURL>
    </service></serviceList>
   </device>"""
        for index, (kind, path) in enumerate(services)
    )
    return f"""<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0">
 <specVersion><major>1</major><minor>0</minor></specVersion>
 <device>
  <deviceType>{igd_type}</deviceType><friendlyName>Fake IGD</friendlyName>
  <manufacturer>autonat tests</manufacturer><modelName>quirk box</modelName><modelNumber>1</modelNumber>
  <UDN>uuid:fake-igd</UDN>
  <deviceList><device>
   <deviceType>urn:{urn}:device:WANDevice:1</deviceType><friendlyName>WAN</friendlyName>
   <manufacturer>t</manufacturer><modelName>t</modelName><UDN>uuid:fake-wan</UDN>
   <deviceList>{connections}</deviceList>
  </device></deviceList>
 </device>
 <URLBase>http://{address}:{port}/</URLBase>
</root>""".encode()


def wfa_description() -> bytes:
    """A Wi-Fi Alliance (WPS) device: no WAN connection service at all."""
    return f"""<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0">
 <specVersion><major>1</major><minor>0</minor></specVersion>
 <device><deviceType>{WFA_DEVICE}</deviceType><friendlyName>WFADevice</friendlyName>
  <manufacturer>t</manufacturer><modelName>t</modelName><UDN>uuid:fake-wfa</UDN>
  <serviceList><service><serviceType>urn:schemas-wifialliance-org:service:WFAWLANConfig:1</serviceType>
   <serviceId>urn:wifialliance-org:serviceId:WFAWLANConfig1</serviceId><controlURL>/wfa</controlURL>
   <eventSubURL>/wfa/evt</eventSubURL><SCPDURL>/wfa.xml</SCPDURL></service></serviceList>
 </device>
</root>""".encode()


SCPD = b"""<?xml version="1.0"?>
<scpd xmlns="urn:schemas-upnp-org:service-1-0"><actionList>
<action><name>GetExternalIPAddress</name></action><action><name>GetStatusInfo</name></action>
<action><name>AddPortMapping</name></action><action><name>DeletePortMapping</name></action>
<action><name>GetSpecificPortMappingEntry</name></action><action><name>GetGenericPortMappingEntry</name></action>
</actionList></scpd>"""

BOMB = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
<!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">]>
<root><device><friendlyName>&lol4;</friendlyName></device></root>"""


def soap_ok(action: str, outputs: dict[str, str], service: str = SERVICE) -> bytes:
    args = "".join(f"<{k}>{v}</{k}>" for k, v in outputs.items())
    return (
        '<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
        's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
        f'<u:{action}Response xmlns:u="{service}">{args}</u:{action}Response></s:Body></s:Envelope>'
    ).encode()


def soap_fault(code: int) -> bytes:
    return (
        '<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
        's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body><s:Fault>'
        "<faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>"
        '<UPnPError xmlns="urn:schemas-upnp-org:control-1-0">'
        f"<errorCode>{code}</errorCode><errorDescription>fake {code}</errorDescription>"
        "</UPnPError></detail></s:Fault></s:Body></s:Envelope>"
    ).encode()


def argument(body: bytes, name: str) -> str:
    match = re.search(rf"<{name}>([^<]*)</{name}>".encode(), body)
    return match.group(1).decode() if match else ""


@dataclass
class FakeIgd:
    scenario: str
    address: str
    log_path: str
    mappings: dict[tuple[str, int], dict[str, str]] = field(default_factory=dict)
    made_at: dict[tuple[str, int], float] = field(default_factory=dict)  # monotonic, for `drop_after`
    adds: int = 0
    port: int = HTTP_PORT
    external: str = "203.0.113.9"  # what GetExternalIPAddress answers (a router behind another NAT: private)

    def log(self, line: str) -> None:
        with open(self.log_path, "a", encoding="utf-8") as out:
            out.write(line + "\n")

    # --- SSDP ----------------------------------------------------------------------------------
    def location(self) -> str:
        if self.scenario == "location_loopback":
            return f"http://127.0.0.1:{HTTP_PORT}/rootDesc.xml"
        if self.scenario == "location_other_host":
            return f"http://10.77.0.66:{HTTP_PORT}/rootDesc.xml"
        return f"http://{self.address}:{self.port}/rootDesc.xml"

    def ssdp_reply(self, request: bytes, multicast: bool) -> bytes | None:
        if not request.startswith(b"M-SEARCH"):
            return None
        if self.scenario == "multicast_only" and not multicast:
            return None
        match = re.search(rb"(?im)^ST:\s*(\S+)", request)
        target = match.group(1).decode() if match else ""
        location, st = self.location(), ST_IGD1
        if self.scenario == "ssdp_all_first_only":
            # Sagemcom F@st3890 V3: `ssdp:all` draws its first descriptor only; IGD:1 is answered.
            if target == "ssdp:all":
                location, st = f"http://{self.address}:{self.port}/WFADevice.xml", WFA_DEVICE
            elif target != ST_IGD1:
                return None
        elif self.scenario == "dslforum":
            # TR-064 only: the schemas-upnp-org types are not its own, `ssdp:all` and its types are.
            if target not in ("ssdp:all", DSLFORUM_IGD, DSLFORUM_SERVICE):
                return None
            st = DSLFORUM_IGD
        return (
            "HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nEXT:\r\n"
            f"LOCATION: {location}\r\nSERVER: Fake/1 UPnP/1.1 FakeIGD/1\r\n"
            f"ST: {st}\r\nUSN: uuid:fake-igd::{st}\r\n\r\n"
        ).encode()

    def service_for(self, path: str) -> tuple[str, bool]:
        """The service type behind a control path, and whether that WAN connection is up."""
        if self.scenario == "dslforum":
            return DSLFORUM_SERVICE, True
        if self.scenario == "several_wan":
            # The better-ranked WANIPConnection is down; the PPP one carries the traffic (U12).
            return (SERVICE, False) if path == "/ctl/IPConn" else (PPP_SERVICE, True)
        return SERVICE, True

    def expire(self) -> None:
        """`drop_after`: the router forgets a mapping DROP_AFTER s after it made it, whatever its lease."""
        if self.scenario != "drop_after":
            return
        now = time.monotonic()
        for key, made in list(self.made_at.items()):
            if now - made > DROP_AFTER:
                del self.made_at[key]
                if self.mappings.pop(key, None) is not None:
                    self.log(f"DROPPED {key[0]} {key[1]}")

    # --- SOAP ----------------------------------------------------------------------------------
    def control(self, action: str, body: bytes, path: str = "/ctl/IPConn", service: str = SERVICE) -> tuple[int, bytes]:
        scenario = self.scenario
        expected, up = self.service_for(path)
        if service != expected:
            return 500, soap_fault(401)  # an action of a service type this control URL does not serve
        self.expire()
        if action == "GetExternalIPAddress":
            ip = "0.0.0.0" if scenario == "external_zero" else self.external if up else ""
            return 200, soap_ok(action, {"NewExternalIPAddress": ip}, service)
        if action == "GetStatusInfo":
            # TR-064 spells the uptime NewUpTime (docs/QUIRKS.md U13).
            uptime = "NewUpTime" if scenario == "dslforum" else "NewUptime"
            state = "Connected" if up else "Disconnected"
            return 200, soap_ok(
                action,
                {"NewConnectionStatus": state, "NewLastConnectionError": "ERROR_NONE", uptime: "42"},
                service,
            )
        if action == "AddPortMapping":
            self.adds += 1
            lease = int(argument(body, "NewLeaseDuration") or "0")
            external = int(argument(body, "NewExternalPort"))
            internal = int(argument(body, "NewInternalPort"))
            self.log(f"ADD {argument(body, 'NewProtocol')} {external} -> {internal} lease {lease}")
            if not up:
                return 500, soap_fault(501)  # a WAN connection that is down maps nothing
            if scenario == "only_permanent" and lease != 0:
                return 500, soap_fault(725)
            if scenario == "always_725":
                return 500, soap_fault(725)
            if scenario == "lease_402" and lease != 604800:
                return 500, soap_fault(402)
            if scenario == "lease_402_finite" and lease != 0:
                return 500, soap_fault(402)
            if scenario == "lease_day":
                lease = FORCED_LEASE
            if scenario == "conflict_501" and self.adds == 1:
                return 500, soap_fault(501)
            if scenario == "conflict_718_twice" and self.adds <= 2:
                return 500, soap_fault(718)
            if scenario == "same_port_724" and external != internal:
                return 500, soap_fault(724)
            if scenario == "wildcard_727":
                return 500, soap_fault(727)
            if scenario == "policy_606":
                return 500, soap_fault(606)
            if scenario == "table_full_728":
                return 500, soap_fault(728)
            protocol = argument(body, "NewProtocol")
            self.mappings[(protocol, external)] = {
                "NewInternalPort": str(internal),
                "NewInternalClient": argument(body, "NewInternalClient"),
                "NewEnabled": "1",
                "NewPortMappingDescription": argument(body, "NewPortMappingDescription"),
                "NewLeaseDuration": str(lease),
            }
            self.made_at.setdefault((protocol, external), time.monotonic())
            self.log(f"MAPPED {protocol} {external} -> {internal} lease {lease}")
            return 200, soap_ok(action, {}, service)
        if action == "DeletePortMapping":
            key = (argument(body, "NewProtocol"), int(argument(body, "NewExternalPort")))
            self.made_at.pop(key, None)
            if self.mappings.pop(key, None) is None:
                return 500, soap_fault(714)
            self.log(f"DELETED {key[0]} {key[1]}")
            return 200, soap_ok(action, {}, service)
        if action == "GetSpecificPortMappingEntry":
            key = (argument(body, "NewProtocol"), int(argument(body, "NewExternalPort")))
            if key not in self.mappings:
                return 500, soap_fault(714)
            return 200, soap_ok(action, self.mappings[key], service)
        if action == "GetGenericPortMappingEntry":
            index = int(argument(body, "NewPortMappingIndex") or "0")
            entries = sorted(self.mappings.items())
            if index >= len(entries):
                return 500, soap_fault(713)
            (protocol, external), entry = entries[index]
            return 200, soap_ok(
                action,
                {"NewRemoteHost": "", "NewExternalPort": str(external), "NewProtocol": protocol, **entry},
                service,
            )
        return 500, soap_fault(401)

    # --- HTTP ----------------------------------------------------------------------------------
    async def http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line = head.split(b"\r\n", 1)[0].decode()
                self.log(f"HTTP {request_line}")
                length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1)) if b"ength:" in head else 0  # type: ignore[union-attr]
                body = await reader.readexactly(length) if length else b""
                method, path, _ = request_line.split(" ", 2)
                await self.respond(writer, method, path, head, body)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def respond(self, writer: asyncio.StreamWriter, method: str, path: str, head: bytes, body: bytes) -> None:
        status, payload = 404, b"not found"
        if path == "/rootDesc.xml":
            if self.scenario == "entity_bomb":
                status, payload = 200, BOMB
            elif self.scenario == "huge_body":
                await self.send_huge(writer)
                return
            elif self.scenario == "drip":
                await self.drip(writer)
                return
            elif self.scenario in HOSTILE:
                await HOSTILE[self.scenario](writer)
                return
            elif self.scenario == "dslforum":
                status, payload = (
                    200,
                    description(self.address, self.port, ((DSLFORUM_SERVICE, "/ctl/IPConn"),), DSLFORUM_IGD),
                )
            elif self.scenario == "several_wan":
                services = ((SERVICE, "/ctl/IPConn"), (PPP_SERVICE, "/ctl/PPPConn"))
                status, payload = 200, description(self.address, self.port, services)
            else:
                status, payload = 200, description(self.address, self.port)
        elif path == "/WFADevice.xml" and self.scenario == "ssdp_all_first_only":
            status, payload = 200, wfa_description()
        elif path == "/WANIPCn.xml":
            status, payload = 200, SCPD
        elif path in ("/ctl/IPConn", "/ctl/PPPConn") and method == "POST":
            action = re.search(rb'(?i)soapaction:\s*"?([^#"]*)#(\w+)', head)
            if action is None:
                status, payload = 500, soap_fault(401)
            else:
                status, payload = self.control(action.group(2).decode(), body, path, action.group(1).decode())
        reason = {200: "OK", 404: "Not Found", 500: "Internal Server Error"}[status]
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/xml\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        await writer.drain()

    async def send_huge(self, writer: asyncio.StreamWriter) -> None:
        # No Content-Length: the client must cap the body while reading, not trust a header.
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nConnection: close\r\n\r\n<root>")
        chunk = b"<x>" + b"A" * 65536 + b"</x>"
        for _ in range(160):  # about 10 MB
            writer.write(chunk)
            await writer.drain()

    async def drip(self, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: 5000\r\n\r\n")
        for byte in description(self.address, self.port)[:60]:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(1.0)


async def huge_header_line(writer: asyncio.StreamWriter) -> None:
    """100 MB of one header line that never ends (measured on main: 46.7 s and 231 MB)."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nX-Junk: ")
    chunk = b"A" * 65536
    for _ in range(100 * 1024 * 1024 // len(chunk)):
        writer.write(chunk)
        await writer.drain()


async def header_drip(writer: asyncio.StreamWriter) -> None:
    """A valid start, then one header byte every 50 ms: each read is quick, the head never ends."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nX-Drip: ")
    for _ in range(1200):  # 60 s at most: the test kills us long before
        writer.write(b"A")
        await writer.drain()
        await asyncio.sleep(0.05)


async def chunked_drip(writer: asyncio.StreamWriter) -> None:
    """A chunked body of one-byte chunks, one every 50 ms."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(1200):
        writer.write(b"1\r\n<\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)


async def chunked_flood(writer: asyncio.StreamWriter) -> None:
    """10 MB of one-byte chunks: under the decoded-body cap for long, never under the wire cap."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"1\r\nA\r\n" * 10000
    for _ in range(10 * 1024 * 1024 // len(chunk)):
        writer.write(chunk)
        await writer.drain()


async def many_headers(writer: asyncio.StreamWriter) -> None:
    """200 short header lines: well under the byte cap, over the count cap."""
    writer.write(b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 200 + b"Content-Length: 0\r\n\r\n")
    await writer.drain()


async def hang(writer: asyncio.StreamWriter) -> None:
    """Accept, read the request, never answer."""
    await asyncio.sleep(60)


HOSTILE = {
    "huge_header_line": huge_header_line,
    "header_drip": header_drip,
    "chunked_drip": chunked_drip,
    "chunked_flood": chunked_flood,
    "many_headers": many_headers,
    "hang": hang,
}


class SsdpResponder(asyncio.DatagramProtocol):
    def __init__(self, igd: FakeIgd, multicast: bool, reply_socket: socket.socket) -> None:
        self.igd, self.multicast, self.reply_socket = igd, multicast, reply_socket
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        reply = self.igd.ssdp_reply(data, self.multicast)
        if reply is None:
            return
        if self.igd.scenario == "other_port":
            self.reply_socket.sendto(reply, addr)
        else:
            self.transport.sendto(reply, addr)


async def main(scenario: str, address: str, log_path: str) -> None:
    igd = FakeIgd(scenario, address, log_path)
    loop = asyncio.get_running_loop()
    unicast = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    unicast.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    unicast.bind((address, 1900))
    group = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    group.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    group.bind(("239.255.255.250", 1900))
    membership = struct.pack("4s4s", socket.inet_aton("239.255.255.250"), socket.inet_aton(address))
    group.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
    other_port = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other_port.bind((address, 1901))
    await loop.create_datagram_endpoint(lambda: SsdpResponder(igd, False, other_port), sock=unicast)
    await loop.create_datagram_endpoint(lambda: SsdpResponder(igd, True, other_port), sock=group)
    server = await asyncio.start_server(igd.http, address, HTTP_PORT)
    print("ready", flush=True)
    async with server:
        await asyncio.sleep(600)  # the test kills us long before; this bounds a forgotten server


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
