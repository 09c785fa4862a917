"""SDP offer/answer for the SIP service, sans-IO (RFC 3264 §5-§6, RFC 8866).

Two jobs, both on the first audio stream only (the echo test and the relay carry one voice stream):

- `echo_answer`: the answer of an endpoint that echoes what it receives. It accepts every format the
  offer lists on its first usable audio stream (whatever comes in goes back out, so any codec works),
  and rejects every other stream with port 0, keeping the stream count (§6: the answer has as many
  `m=` lines as the offer).
- `anchor_sdp`: an SDP forwarded to the other leg of a bridged call, with the media anchored on us:
  the address and the first audio stream's ports become ours, other streams are disabled (port 0),
  and ICE candidates are removed (they would route media around the relay, RFC 8445 §5.1.1.1).

Offers come from the network: `DecodeError` for a body over the caps of `autonat.proto.sdp` or one
with no usable audio stream is reported as None, never an exception.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from autonat.addresses import IPAddress
from autonat.proto.errors import DecodeError
from autonat.proto.sdp import Connection, parse_sdp_addresses

__all__ = ["AudioOffer", "anchor_sdp", "echo_answer", "first_audio"]

_RTP_PROTOS = ("RTP/AVP", "RTP/AVPF", "RTP/SAVP", "RTP/SAVPF")
_SDES = re.compile(r"^a=crypto:", re.I)
# Attributes of the accepted stream copied into the echo answer: codec descriptions and rtcp-mux
# (RFC 5761 §5.1.1: the answerer may accept mux, then RTCP shares the RTP port).
_KEPT = ("a=rtpmap:", "a=fmtp:", "a=ptime:", "a=maxptime:", "a=rtcp-mux")


@dataclass(frozen=True, slots=True)
class AudioOffer:
    """The first usable audio stream of an SDP body: where its sender says it receives RTP."""

    index: int  # position among the m= lines
    connection: Connection | None
    port: int
    rtcp_port: int | None  # from a=rtcp (RFC 3605), else None (RTP port + 1)
    formats: tuple[str, ...]
    proto: str

    @property
    def address(self) -> IPAddress | None:
        return None if self.connection is None else self.connection.ip


def first_audio(sdp: str) -> AudioOffer | None:
    """The first audio stream with a non-zero port and an RTP profile, or None (also for bad SDP)."""
    try:
        summary = parse_sdp_addresses(sdp)
    except DecodeError:
        return None
    for index, media in enumerate(summary.media):
        if media.media.lower() == "audio" and media.port and media.proto.upper() in _RTP_PROTOS and media.formats:
            rtcp = media.rtcp.port if media.rtcp is not None else None
            return AudioOffer(index, summary.connection_for(index), media.port, rtcp, media.formats, media.proto)
    return None


def _lines(sdp: str) -> list[str]:
    return [line.rstrip("\r") for line in sdp.split("\n") if line.strip()]


def _family(address: IPAddress) -> str:
    return "IP6" if address.version == 6 else "IP4"


def echo_answer(offer: str, *, address: IPAddress, port: int, rtcp_port: int, session_id: int) -> str | None:
    """The answer of an echo endpoint at `address`:`port` (RTCP on `rtcp_port`); None when the offer has
    no usable audio stream (the caller answers 488, RFC 3261 §13.3.1.3)."""
    audio = first_audio(offer)
    if audio is None:
        return None
    family = _family(address)
    out = [
        "v=0",
        f"o=autonat {session_id} {session_id} IN {family} {address}",
        "s=autonat",
        f"c=IN {family} {address}",
        "t=0 0",
    ]
    media_index = -1
    accepted = False
    mux = False
    audio_line = 0
    for line in _lines(offer):
        if line.startswith("m="):
            media_index += 1
            accepted = media_index == audio.index
            if accepted:
                audio_line = len(out)
                out.append(f"m=audio {port} {audio.proto} {' '.join(audio.formats)}")
            else:
                name, _, rest = line[2:].partition(" ")
                fields = rest.split(" ", 2)
                proto_fmts = " ".join(fields[1:]) if len(fields) > 1 else "RTP/AVP 0"
                out.append(f"m={name} 0 {proto_fmts}")
        elif accepted and line.startswith(_KEPT):
            out.append(line)
            mux = mux or line.startswith("a=rtcp-mux")
    if not mux and rtcp_port != port + 1:
        # RFC 3605 §2.1: say where RTCP goes when it is not RTP port + 1 (the router may map it elsewhere).
        out.insert(audio_line + 1, f"a=rtcp:{rtcp_port}")
    out.append("a=sendrecv")
    return "\r\n".join(out) + "\r\n"


def anchor_sdp(sdp: str, *, address: IPAddress, port: int, rtcp_port: int) -> str | None:
    """`sdp` with its first audio stream moved to `address`:`port` (RTCP `rtcp_port`): the copy sent to
    the other leg of a relayed call. None when there is no usable audio stream."""
    audio = first_audio(sdp)
    if audio is None:
        return None
    family = _family(address)
    out: list[str] = []
    media_index = -1
    for line in _lines(sdp):
        if line.startswith("m="):
            media_index += 1
            name, _, rest = line[2:].partition(" ")
            fields = rest.split(" ", 1)
            tail = fields[1] if len(fields) > 1 else "RTP/AVP 0"
            out.append(f"m={name} {port if media_index == audio.index else 0} {tail}")
            if media_index == audio.index and rtcp_port != port + 1:
                out.append(f"a=rtcp:{rtcp_port}")
        elif line.startswith("o="):
            head = line.split(" ")
            out.append(" ".join([*head[:4], family, str(address)]) if len(head) >= 6 else line)
        elif line.startswith("c="):
            out.append(f"c=IN {family} {address}")
        elif line.startswith(("a=candidate:", "a=ice-", "a=end-of-candidates", "a=rtcp:")) or _SDES.match(line):
            continue  # ICE would route around the relay; the relay does not terminate SRTP keys either
        else:
            out.append(line)
    return "\r\n".join(out) + "\r\n"
