"""The echo test as an RTP endpoint, sans-IO (RFC 3550): what goes back out is our own stream.

Reflecting the caller's packets unchanged (same SSRC, same sequence numbers, its RTCP BYE included) makes the
caller receive "its own" stream: a strict stack sees an SSRC collision (RFC 3550 §8.2) and may change SSRC or
drop the media. FreeSWITCH's echo re-originates, and so does `EchoStream`:

- each RTP packet is rewritten with our SSRC and with sequence numbers and timestamps on our own random bases
  (RFC 3550 §5.1: both SHOULD start random), kept in step with the caller's: a gap or a reordering in what
  arrives stays a gap or a reordering in what leaves (jitter buffers depend on it), and a new source from the
  caller (another SSRC) continues our numbering where it was;
- RTCP is never echoed (its SR/RR/BYE speak for the caller's SSRC); we send our own compound RTCP instead
  (`report`: a Sender Report and an SDES CNAME, §6.1) and a BYE of our own when the call ends (`bye`);
- with rtcp-mux (RFC 5761) RTCP arrives on the RTP port: `is_rtcp` tells the two apart (§4: payload types
  64-95 in the second byte, marker bit aside, are RTCP).

`rtp_payload` finds the payload of any RTP packet (after CSRCs and a header extension, before padding): the
test call (autonat.sip.probecall) recognises its signal there, whatever the echo did to the header.

Pure functions of the bytes in and the clock passed in (`ntp` seconds since 1900 for the Sender Report);
the asyncio media in autonat.service.media calls them per packet, so the hot path is one struct unpack and
one pack_into on a copy of the packet.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Callable

__all__ = ["EchoStream", "NTP_EPOCH_OFFSET", "is_rtcp", "rtp_payload"]

NTP_EPOCH_OFFSET = 2_208_988_800  # seconds from 1900-01-01 (NTP) to 1970-01-01 (Unix)
_HEADER = struct.Struct("!HII")  # sequence number, timestamp, SSRC at offset 2
_MIN_RTP = 12
_CNAME = b"autonat@echo"


def is_rtcp(data: bytes) -> bool:
    """RFC 5761 §4: with RTP and RTCP on one port, a second byte of 192-223 is an RTCP packet type (200 SR,
    201 RR, 202 SDES, 203 BYE, 204 APP ...); RTP payload types there would be 64-95, which §4 rules out."""
    return len(data) >= 2 and 192 <= data[1] <= 223


def rtp_payload(packet: bytes) -> memoryview | None:
    """The payload of an RTP `packet` (RFC 3550 §5.1: after the 12-byte header and CC CSRCs, §5.3.1: after a
    header extension when X is set, and without the padding P announces in the last byte); None when the
    packet is not RTP version 2 or its header and padding do not fit in it."""
    if len(packet) < _MIN_RTP or packet[0] >> 6 != 2:
        return None
    start = _MIN_RTP + 4 * (packet[0] & 0x0F)
    if packet[0] & 0x10:
        if len(packet) < start + 4:
            return None
        start += 4 + 4 * int.from_bytes(packet[start + 2 : start + 4], "big")
    end = len(packet) - (packet[-1] if packet[0] & 0x20 else 0)
    if end < start:
        return None
    return memoryview(packet)[start:end]


class EchoStream:
    """Our outgoing stream: the caller's RTP rewritten as ours, and the RTCP that speaks for it."""

    __slots__ = ("_last_seq", "_last_ts", "_seq_offset", "_source", "_ts_offset", "octets", "packets", "ssrc")

    def __init__(self, rand: Callable[[int], bytes] = secrets.token_bytes) -> None:
        seed = rand(10)
        self.ssrc = int.from_bytes(seed[:4], "big") or 1
        self._seq_offset = int.from_bytes(seed[4:6], "big")  # our first sequence number, until the first packet
        self._ts_offset = int.from_bytes(seed[6:10], "big")
        self._source: int | None = None  # the caller's SSRC we are following
        self._last_seq = self._seq_offset - 1
        self._last_ts = self._ts_offset
        self.packets = 0
        self.octets = 0

    def rewrite(self, packet: bytes) -> bytes | None:
        """The RTP `packet` as ours, or None for something too short to be RTP."""
        if len(packet) < _MIN_RTP:
            return None
        seq, timestamp, source = _HEADER.unpack_from(packet, 2)
        if source != self._source:
            # A new source (the first, or the caller restarted): continue our numbering after what we sent.
            first = self._source is None
            self._source = source
            next_seq = self._seq_offset if first else self._last_seq + 1
            next_ts = self._ts_offset if first else self._last_ts + 160  # one 20 ms packet at 8 kHz on
            self._seq_offset = (next_seq - seq) & 0xFFFF
            self._ts_offset = (next_ts - timestamp) & 0xFFFFFFFF
        out_seq = (seq + self._seq_offset) & 0xFFFF
        out_ts = (timestamp + self._ts_offset) & 0xFFFFFFFF
        self._last_seq, self._last_ts = out_seq, out_ts
        self.packets += 1
        self.octets += len(packet) - _MIN_RTP
        copy = bytearray(packet)
        _HEADER.pack_into(copy, 2, out_seq, out_ts, self.ssrc)
        return bytes(copy)

    def report(self, ntp: float) -> bytes:
        """A compound RTCP packet (§6.1): a Sender Report (§6.4.1, no report blocks) and SDES with our CNAME."""
        seconds = int(ntp)
        fraction = int((ntp - seconds) * (1 << 32)) & 0xFFFFFFFF
        sender = struct.pack(
            "!BBHIIIIII",
            0x80,
            200,
            6,  # length in 32-bit words minus one: 28 bytes
            self.ssrc,
            seconds & 0xFFFFFFFF,
            fraction,
            self._last_ts,
            self.packets & 0xFFFFFFFF,
            self.octets & 0xFFFFFFFF,
        )
        return sender + self._sdes()

    def _sdes(self) -> bytes:
        # One chunk: SSRC, CNAME item (type 1), then a zero byte ending the item list, padded to 32 bits.
        items = bytes([1, len(_CNAME)]) + _CNAME + b"\x00"
        items += b"\x00" * (-(4 + len(items)) % 4)
        return struct.pack("!BBHI", 0x81, 202, (4 + len(items)) // 4, self.ssrc) + items

    def bye(self) -> bytes:
        """Our RTCP BYE (§6.6) in a compound packet: an empty Receiver Report first, as §6.1 requires."""
        receiver = struct.pack("!BBHI", 0x80, 201, 1, self.ssrc)
        return receiver + self._sdes() + struct.pack("!BBHI", 0x81, 203, 1, self.ssrc)
