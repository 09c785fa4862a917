"""STUN through the real NAT: from the lan host, via the router's masquerade, to Debian's stund 0.97 on
the wan host. The reflexive address must be the router's public address, and failures must be one line
within the deadline."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import pytest

from autonat.lab import Lab

pytestmark = pytest.mark.lab

# Runs inside the lan namespace: `stun_binding(host, port)` -> one JSON line.
BINDING = """
import asyncio, json, sys, time
from autonat.aio.stun import StunError, stun_binding

host, port, deadline = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
software = None if sys.argv[4] == "-" else sys.argv[4]
started = time.monotonic()
try:
    address, mapped_port = asyncio.run(stun_binding((host, port), deadline=deadline, software=software))
except StunError as exc:
    print(json.dumps({"error": type(exc).__name__, "message": str(exc), "elapsed": time.monotonic() - started}))
else:
    print(json.dumps({"address": str(address), "port": mapped_port, "elapsed": time.monotonic() - started}))
"""

# Runs inside the lan namespace: one raw request, the decoded answer's attributes (or null on silence).
RAW = """
import json, socket, sys
from autonat.proto import stun

request = bytes.fromhex(sys.argv[2])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.settimeout(1.0)
sock.sendto(request, (sys.argv[1], 3478))
try:
    data, source = sock.recvfrom(2048)
except TimeoutError:
    print("null")
else:
    message = stun.parse_message(data)
    print(json.dumps({
        "source": list(source),
        "types": [a.type for a in message.attributes],
        "software": message.software,
        "address": [str(x) for x in stun.binding_success_address(message)],
        "mapped": [str(x) for x in stun.decode_address(message.get(stun.AttributeType.MAPPED_ADDRESS).value)],
    }))
"""


def binding(lab: Lab, host: str, port: int = 3478, deadline: float = 2.0, software: str = "autonat") -> dict[str, Any]:
    result = lab.run("lan", [sys.executable, "-c", BINDING, host, str(port), str(deadline), software], timeout=30)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    answer: dict[str, Any] = json.loads(lines[0])
    return answer


def raw(lab: Lab, request: bytes, server: str = Lab.WAN_HOST) -> dict[str, Any] | None:
    result = lab.run("lan", [sys.executable, "-c", RAW, server, request.hex()], timeout=30)
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] | None = json.loads(result.stdout)
    return answer


@pytest.mark.parametrize("server", [Lab.WAN_HOST, Lab.WAN_HOST2])
def test_stun_through_the_nat_sees_the_router_public_address(lab: Lab, server: str) -> None:
    answer = binding(lab, server)
    assert answer.get("address") == Lab.ROUTER_WAN, answer
    assert 0 < answer["port"] < 65536
    assert answer["elapsed"] < 1.0  # answered on the first transmission, on a healthy link


def test_stun_without_software_attribute(lab: Lab) -> None:
    assert binding(lab, Lab.WAN_HOST, software="-")["address"] == Lab.ROUTER_WAN


def test_what_stund_actually_sends(lab: Lab) -> None:
    """The facts proto/stun.py's docstring relies on: RFC 3489 attributes plus an RFC 8489
    XOR-MAPPED-ADDRESS (0x0020) that agrees with MAPPED-ADDRESS, from the address we asked."""
    from autonat.proto.stun import build_binding_request, new_transaction_id

    answer = raw(lab, build_binding_request(new_transaction_id()))
    assert answer is not None
    assert answer["types"] == [0x0001, 0x0004, 0x0005, 0x0020, 0x8022]
    assert answer["software"] == "Vovida.org 0.97"
    assert answer["source"] == [Lab.WAN_HOST, 3478]
    assert answer["address"][0] == answer["mapped"][0] == Lab.ROUTER_WAN
    assert answer["address"] == answer["mapped"]


def test_stund_drops_a_software_attribute_not_padded_to_four(lab: Lab) -> None:
    """Why build_binding_request pads SOFTWARE with spaces: stund logs "Bad length string 7" and stays silent."""
    from autonat.proto.stun import Attribute, AttributeType, MessageClass, Method, StunMessage, new_transaction_id

    odd = StunMessage(
        MessageClass.REQUEST, Method.BINDING, new_transaction_id(), (Attribute(AttributeType.SOFTWARE, b"autonat"),)
    )
    assert raw(lab, odd.encode()) is None
    padded = StunMessage(
        MessageClass.REQUEST, Method.BINDING, new_transaction_id(), (Attribute(AttributeType.SOFTWARE, b"autonat "),)
    )
    assert raw(lab, padded.encode()) is not None


@pytest.mark.parametrize(
    ("host", "port"),
    [
        ("203.0.113.77", 3478),  # no such host on the wan
        (Lab.WAN_HOST, 9),  # the right host, nothing listening
    ],
)
def test_bad_server_gives_one_line_within_the_deadline(lab: Lab, host: str, port: int) -> None:
    started = time.monotonic()
    answer = binding(lab, host, port, deadline=1.0)
    assert time.monotonic() - started < 4.0  # the whole process, interpreter start included
    assert answer["error"] == "StunTimeout"
    assert answer["message"] == f"no answer from STUN server {host}:{port} within 1 s (2 tries)"
    assert 1.0 <= answer["elapsed"] < 1.3


def test_unresolvable_name_gives_one_line_and_the_process_exits(lab: Lab) -> None:
    # The lan namespace has no working resolver: depending on the host's resolv.conf the lookup fails
    # at once or hangs; either way the answer is one line by the deadline and the process does not
    # wait for the resolver thread afterwards.
    started = time.monotonic()
    answer = binding(lab, "stun.autonat-lab.invalid", deadline=1.0)
    assert time.monotonic() - started < 4.0
    assert answer["error"] in ("StunError", "StunTimeout")
    assert "stun.autonat-lab.invalid" in answer["message"]
    assert answer["elapsed"] < 1.3
