"""ICE-lite on a call's media ports, sans-IO (RFC 8445 §2.5 and §7.3; RFC 5245 lite implementations).

A phone that offers ICE (baresip with `medianat=ice`, linphone) and gets an answer without it sends no media
at all (measured with baresip 1.0). So when an offer has ICE the answer is an ICE-lite agent's: `a=ice-lite`,
our credentials and host candidates (autonat.sip.session), and the media sockets answer the phone's
connectivity checks with `IceResponder`. A lite agent never sends checks of its own and always takes the
controlled role (§6.1.1); the full agent on the other side checks the pairs and nominates one.

What is answered: a Binding request (RFC 8489) whose USERNAME starts with our ufrag and a colon (§7.2.2: it is
"ours:theirs") and whose MESSAGE-INTEGRITY checks out under our ice-pwd (short-term credentials, §7.2.2). The
answer is a Binding success with XOR-MAPPED-ADDRESS (the check's source: the peer learns a peer-reflexive
candidate when a NAT is in between, §7.3.1.3), MESSAGE-INTEGRITY and FINGERPRINT (§7.3: both are required).
Everything else is dropped without an answer: an error response would tell a scanner the port is alive, and
answering nothing unauthenticated keeps the media port from being a reflector.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv6Address, ip_address

from autonat.proto.errors import DecodeError
from autonat.proto.stun import (
    AttributeType,
    MessageClass,
    Method,
    StunMessage,
    check_integrity,
    encode_xor_mapped_address,
    parse_message,
)

__all__ = ["IceResponder", "is_stun", "new_credentials"]

UFRAG_LENGTH = 8  # §5.3 / RFC 8839 §5.4: at least 4 ice-chars (24 bits of randomness), here 48 bits
PWD_LENGTH = 24  # at least 22 ice-chars (128 bits), here 144 bits


def new_credentials(rand: Callable[[int], bytes] = secrets.token_bytes) -> tuple[str, str]:
    """A fresh (ice-ufrag, ice-pwd): base64 characters, which are exactly the ice-chars (ALPHA / DIGIT / + / /)."""
    ufrag = base64.b64encode(rand(6)).decode()
    pwd = base64.b64encode(rand(18)).decode()
    return ufrag[:UFRAG_LENGTH], pwd[:PWD_LENGTH]


def is_stun(data: bytes) -> bool:
    """RFC 7983 §7: a datagram whose first byte is 0-3 is STUN (RTP and RTCP start with 128-191)."""
    return len(data) >= 20 and data[0] < 4


@dataclass(frozen=True, slots=True)
class IceResponder:
    """Answers the connectivity checks made with our credentials (the ones in our answer's SDP)."""

    ufrag: str
    pwd: str

    def answer(self, data: bytes, source: tuple[str, int]) -> tuple[bytes, bool] | None:
        """(the response to send back to `source`, whether the check nominated this pair), or None."""
        try:
            message = parse_message(data)
        except DecodeError:
            return None
        if message.message_class is not MessageClass.REQUEST or message.method != Method.BINDING:
            return None
        username = message.get(AttributeType.USERNAME)
        if username is None or not username.value.startswith(f"{self.ufrag}:".encode()):
            return None
        key = self.pwd.encode()
        if not check_integrity(data, key):
            return None
        try:
            address = ip_address(source[0])
        except ValueError:
            return None
        if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        tid = message.transaction_id
        attributes = (encode_xor_mapped_address(address, source[1], tid),)
        response = StunMessage(MessageClass.SUCCESS, Method.BINDING, tid, attributes)
        nominated = message.get(AttributeType.USE_CANDIDATE) is not None
        return response.encode(integrity=key, fingerprint=True), nominated
