"""Dual-stack SIP through the real router's IPv6 firewall (issue 15, "Dual-stack SIP profiles").

The lab's IPv6 is routed, no NAT, and the router's ip6 filter drops unsolicited inbound packets, so a call
from the internet host to the LAN host's global address works only through pinholes: the profile's SIP
ports (opened at start) and each call's RTP pair (from the pool of pinholes, closed at hang-up). SIPp calls
the echo test at the profile's global IPv6 address: the 200's SDP is `IN IP6` with that address (no
external-address rewriting), RTP flows both ways, the pinholes are gone within 2 s of the BYE, and a
datagram to the call's RTP port is dropped again once they are.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from ipaddress import IPv6Address
from pathlib import Path
from typing import Any, Literal

import pytest

from autonat.lab import Lab
from tests.lab.cli_helpers import AUTONAT
from tests.lab.daemon_helpers import Daemon, control, eventually, request, write_config
from tests.lab.sipp import count_rtp, start_sipp

pytestmark = pytest.mark.lab

PROFILE = """
[sip]
t1 = 0.1
rtp-timeout = 120
rtp-pool = 2

[[profile]]
name = "external"
ext-sip-ip = "auto-nat"
ext-rtp-ip = "auto-nat"
sip-ipv6 = true
"""
CALLER_MEDIA = 6000
OWNER = "sip:external"

LISTEN = r"""
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(float(sys.argv[3]))
print("ready", flush=True)
try:
    data, source = s.recvfrom(100)
    print(data.decode(), source[0])
except TimeoutError:
    print("nothing")
"""
SEND = r"""
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.sendto(b"knock", (sys.argv[1], int(sys.argv[2])))
"""


def pinholes(daemon: Daemon) -> dict[tuple[str, int], dict[str, Any]]:
    """The engine's IPv6 pinholes, by (transport, port)."""
    return {(m["proto"], m["port"]): m for m in daemon.status()["mappings"] if m["family"] == 6}


def router_rules(lab: Lab) -> str:
    """The router's firewall: miniupnpd puts each pinhole in its nft chain, as one accept rule."""
    return lab.run("router", ["nft", "list", "ruleset"], timeout=10, check=True).stdout


def opened(lab: Lab, port: int, protocol: int = 17) -> bool:
    """Does the router's ruleset let `protocol` (UDP) to our global address and `port` in? miniupnpd 2.3.1's
    nftables backend writes a pinhole as raw matches: `th dport PORT @nh,192,128 0x<IPv6 destination>
    @nh,48,8 0x<next header> accept`."""
    address = IPv6Address(Lab.LAN6_ADDRESS).packed.hex()
    pattern = rf"th dport {port} @nh,192,128 0x{address} @nh,48,8 {protocol:#x} accept"
    return re.search(pattern, router_rules(lab)) is not None


def arrives(lab: Lab, port: int) -> bool:
    """A datagram from the internet host to our global address and `port`: does it get through the router?"""
    listener = lab.popen(
        "lan", [sys.executable, "-c", LISTEN, Lab.LAN6_ADDRESS, str(port), "1.5"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        lab.run("wan", [sys.executable, "-c", SEND, Lab.LAN6_ADDRESS, str(port)], timeout=10, check=True)
        out, _ = listener.communicate(timeout=10)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait(timeout=5)
    return out.startswith("knock")


def start_service(lab: Lab, tmp_path: Path, started: list[Daemon], protocol: str = "auto") -> Daemon:
    config = write_config(tmp_path / "lan", nat=f'ipv6 = true\nipv6-protocol = "{protocol}"', extra=PROFILE)
    daemon = Daemon(lab, tmp_path / "lan", config).start()
    started.append(daemon)
    daemon.wait_socket()
    return daemon


def wait_pinholes(daemon: Daemon) -> None:
    """IPv6 discovery done, the SIP ports' pinholes open and the RTP pool of pinholes filled (two pairs)."""

    def ready() -> bool:
        status = daemon.status()
        holes = [m for m in status["mappings"] if m["family"] == 6]
        sip = {(m["proto"], m["port"]) for m in holes if m["owner"] == OWNER and m["state"] == "active"}
        pool = [m for m in holes if m["owner"] == "rtp-pool" and m["state"] == "active"]
        return status["ipv6"]["state"] == "ready" and sip == {("udp", 5060), ("tcp", 5060)} and len(pool) >= 4

    try:
        eventually(ready, 20, "IPv6 pinholes for SIP and the RTP pool")
    except AssertionError:
        raise AssertionError(f"{daemon.status()}\n{daemon.log()}") from None
    assert daemon.status()["ipv6"]["local_address"] == Lab.LAN6_ADDRESS


@pytest.mark.parametrize(
    ("transport", "protocol"), [("udp", "pcp"), ("tcp", "pcp"), ("udp", "upnp")], ids=["udp-pcp", "tcp-pcp", "udp-upnp"]
)
def test_an_ipv6_call_from_the_internet_goes_through_pinholes(
    healthy_lab: Lab, tmp_path: Path, started: list[Daemon], transport: Literal["udp", "tcp"], protocol: str
) -> None:
    """PCP MAP on IPv6 and UPnP IGD:2 AddPinhole alike (`[nat] ipv6-protocol`): the engine's choice, not ours."""
    lab = healthy_lab
    daemon = start_service(lab, tmp_path, started, protocol=protocol)
    wait_pinholes(daemon)
    assert daemon.status()["ipv6"]["protocol"] == protocol
    profile = request(daemon.socket_path, {"cmd": "profile", "name": "external"})["result"]
    assert profile["SIP-IP6"] == Lab.LAN6_ADDRESS and profile["ext_sip_ip"] == Lab.ROUTER_WAN  # IPv4 as before
    assert opened(lab, 5060) and opened(lab, 5060, protocol=6), router_rules(lab)
    target = f"[{Lab.LAN6_ADDRESS}]:5060"
    with (
        count_rtp(lab, "wan", CALLER_MEDIA, local_ip=Lab.WAN6_HOST, workdir=tmp_path) as rtp,
        start_sipp(
            lab,
            "wan",
            "uac_call",
            target,
            transport=transport,
            local_ip=Lab.WAN6_HOST,
            media_port=CALLER_MEDIA,
            variables={"expect_ip": Lab.LAN6_ADDRESS, "hold_ms": "3000"},
            calls=1,
            service="9196",
            workdir=tmp_path,
        ) as sipp,
    ):
        live = eventually(lambda: control(daemon, "calls"), 10, "the call is up")
        leg = live[0]["legs"][0]
        assert leg["peer"].startswith(f"{transport}:[{Lab.WAN6_HOST}]:"), leg
        assert leg["mapped"] is True and leg["advertised"].startswith(f"[{Lab.LAN6_ADDRESS}]:"), leg
        port = int(leg["advertised"].rsplit(":", 1)[1])
        assert port == leg["rtp_port"]  # no NAT on IPv6: the port we bind is the port we advertise
        during = pinholes(daemon)
        for hole in (port, port + 1):
            assert during[("udp", hole)]["state"] == "active", during
            assert during[("udp", hole)]["owner"].startswith("call:"), during
            assert during[("udp", hole)]["protocol"] == protocol, during
        assert opened(lab, port) and opened(lab, port + 1), "the RTP pinholes are not in the router's ruleset"
        result = sipp.wait(timeout=30)
    assert result.ok, result.describe()
    answer = re.search(r"SIP/2\.0 200 OK.*?\r?\n\r?\n(.*?)(?:\Z|message received)", result.messages, re.S)
    assert answer, result.describe()
    sdp = answer.group(1)
    assert f"c=IN IP6 {Lab.LAN6_ADDRESS}" in sdp and f"IN IP6 {Lab.LAN6_ADDRESS}" in sdp.split("o=", 1)[1], sdp
    assert f"m=audio {port} " in sdp, sdp
    ended = time.monotonic()
    # The caller's RTP reached us only through the pinholes (the router drops unsolicited inbound IPv6), and
    # the echo came back from our global address.
    count = rtp.count
    assert count.sent >= 50 and count.received >= 50, count
    assert {address for address, _ in count.received_from} == {Lab.LAN6_ADDRESS}
    assert {address for address, _ in count.sent_to} == {Lab.LAN6_ADDRESS}
    eventually(
        lambda: not ({("udp", port), ("udp", port + 1)} & set(pinholes(daemon))),
        2.0,
        "RTP pinholes closed",
        interval=0.05,
    )
    eventually(
        lambda: not opened(lab, port) and not opened(lab, port + 1),
        2.0,
        "RTP pinholes gone from the router",
        interval=0.05,
    )
    assert time.monotonic() - ended <= 2.0
    assert control(daemon, "calls") == []
    assert not arrives(lab, port), "the call's RTP port is still open from the internet after the BYE"
    # The profile's SIP pinholes: opened at start, closed when the daemon stops.
    daemon.stop()
    assert not opened(lab, 5060) and not opened(lab, 5060, protocol=6)


def test_an_ipv6_caller_on_the_lan_gets_our_address_and_no_pinhole(
    healthy_lab: Lab, tmp_path: Path, started: list[Daemon]
) -> None:
    """The ACL decision sees the IPv6 source: a caller in localnet.auto (the LAN's /64) is on our side of the
    router's firewall, so its call opens no pinhole; it is told the same global address (no NAT on IPv6)."""
    lab = healthy_lab
    daemon = start_service(lab, tmp_path, started)
    wait_pinholes(daemon)
    before = set(pinholes(daemon))
    acl = lab.run("lan", [AUTONAT, "acl", Lab.LAN6_TEMPORARY, "localnet.auto"], timeout=20)
    assert acl.stdout.strip() == "true", acl.stdout + acl.stderr
    with (
        count_rtp(lab, "lan", CALLER_MEDIA, local_ip=Lab.LAN6_TEMPORARY, workdir=tmp_path) as rtp,
        start_sipp(
            lab,
            "lan",
            "uac_call",
            f"[{Lab.LAN6_ADDRESS}]:5060",
            local_ip=Lab.LAN6_TEMPORARY,
            local_port=5070,
            media_port=CALLER_MEDIA,
            variables={"expect_ip": Lab.LAN6_ADDRESS, "hold_ms": "2000"},
            calls=1,
            service="9196",
            workdir=tmp_path,
        ) as sipp,
    ):
        live = eventually(lambda: control(daemon, "calls"), 10, "the call is up")
        leg = live[0]["legs"][0]
        assert leg["mapped"] is False and leg["advertised"].startswith(f"[{Lab.LAN6_ADDRESS}]:"), leg
        during = set(pinholes(daemon))
        result = sipp.wait(timeout=30)
    assert result.ok, result.describe()
    assert during == before, "a LAN call opened a pinhole"
    assert rtp.count.sent > 0 and rtp.count.received > 0, rtp.count


def test_the_test_call_to_an_ipv6_echo_on_the_internet(healthy_lab: Lab, tmp_path: Path, started: list[Daemon]) -> None:
    """`autonat call` to an IPv6 URI: the daemon calls from the profile's IPv6 socket with `IN IP6` and a pair of
    the pool of pinholes, and the pinholes are closed when the command returns."""
    lab = healthy_lab
    daemon = start_service(lab, tmp_path, started)
    wait_pinholes(daemon)
    uri = f"sip:9196@[{Lab.WAN6_HOST}]:5060"
    # The router resolves the internet host's IPv6 neighbour first: the first resolution takes ~1 s in the lab,
    # and the INVITE's retransmissions queued meanwhile would arrive together (SIPp's UAS aborts the call).
    lab.run("lan", [sys.executable, "-c", SEND, Lab.WAN6_HOST, "9"], timeout=10, check=True)
    eventually(lambda: "lladdr" in lab.run("router", ["ip", "-6", "neigh", "show", Lab.WAN6_HOST], timeout=10).stdout,
               5, "the router knows the internet host's IPv6 neighbour")  # fmt: skip
    with start_sipp(
        lab, "wan", "uas_echo", None, local_ip=Lab.WAN6_HOST, local_port=5060, media_port=CALLER_MEDIA, calls=1,
        workdir=tmp_path,
    ):  # fmt: skip
        argv = [AUTONAT, "call", uri, "--socket", str(daemon.socket_path), "--seconds", "2", "--json"]
        done = lab.run("lan", argv, timeout=60)
        holes = pinholes(daemon)
    result = json.loads(done.stdout or "{}")
    assert done.returncode == 0 and result.get("ok") is True, done.stdout + done.stderr + daemon.log()
    media = result["media"]
    port = int(media["advertised"].rsplit(":", 1)[1])
    assert media["advertised"] == media["mapping"] == f"[{Lab.LAN6_ADDRESS}]:{port}" and media["through_mapping"]
    assert media["remote"] == f"[{Lab.WAN6_HOST}]:{CALLER_MEDIA}"
    assert result["rtp"]["sent"] == 100 and result["rtp"]["received"] >= 97, result["rtp"]
    assert result["verdict"] == "ok: audio both ways through the router's IPv6 firewall (pinholes)", result
    assert ("udp", port) not in holes and not opened(lab, port)  # closed when the command returned
