"""SDP offer/answer for the SIP service, sans-IO (RFC 3264 §5-§8, RFC 6337, RFC 8866).

The call core (autonat.sip.core) keeps the offer/answer state of each dialog; this module reads remote
descriptions and writes ours. Everything works on the first usable audio stream only (the echo test and the
relay carry one voice stream):

- `describe`: what the core needs of a remote description: the audio stream, its direction (RFC 3264 §6.1;
  the old `c=0.0.0.0` hold of RFC 2543 counts as `sendonly`, §8.4), whether it offers ICE (RFC 8839),
  rtcp-mux (RFC 5761) and SRTP (RFC 4568: an `RTP/SAVP` stream needs `a=crypto`, which we never answer).
- `echo_answer`: the answer of an endpoint that echoes what it receives. It accepts every format of the
  offered stream (whatever comes in goes back out), answers the direction RFC 3264 §6.1 asks
  (`answer_direction`), accepts rtcp-mux when offered, and when the offer has ICE answers as an ICE-lite
  agent (RFC 8445 §2.5: `a=ice-lite`, our credentials, host candidates). Other streams are rejected with
  port 0, keeping the stream count (§6).
- `echo_offer`: our offer when the caller sent none (a late offer, RFC 3261 §13.2.1: the answer comes in
  the ACK).
- `anchor_sdp`: a description forwarded to the other leg of a bridged call, with the media anchored on us:
  the address and the audio ports become ours, other streams are disabled, ICE and SDES keys are removed
  (they would route around the relay, RFC 8445 §5.1.1.1; the relay does not terminate SRTP), direction
  attributes pass through (hold reaches the other phone), and with `ice` the copy carries our ICE-lite
  attributes (the leg that offered ICE gets an answer it can use).

Descriptions come from the network: a body over the caps of `autonat.proto.sdp`, or one with no usable
audio stream, is reported as None, never an exception.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from autonat.addresses import IPAddress
from autonat.proto.errors import DecodeError
from autonat.proto.sdp import Connection, parse_sdp_addresses

__all__ = [
    "AudioOffer",
    "Candidate",
    "Description",
    "Direction",
    "IceLocal",
    "anchor_sdp",
    "answer_direction",
    "describe",
    "echo_answer",
    "echo_offer",
    "first_audio",
]

Direction = Literal["sendrecv", "sendonly", "recvonly", "inactive"]
_DIRECTIONS: tuple[Direction, ...] = ("sendrecv", "sendonly", "recvonly", "inactive")
_ANSWER: dict[Direction, Direction] = {  # RFC 3264 §6.1
    "sendrecv": "sendrecv",
    "sendonly": "recvonly",
    "recvonly": "sendonly",
    "inactive": "inactive",
}
_PLAIN_PROTOS = ("RTP/AVP", "RTP/AVPF")
_SECURE_PROTOS = ("RTP/SAVP", "RTP/SAVPF")
_SDES = re.compile(r"^a=crypto:", re.I)
# Attributes of the accepted stream copied into the echo answer: codec descriptions and rtcp-mux
# (RFC 5761 §5.1.1: the answerer may accept mux, then RTCP shares the RTP port).
_KEPT = ("a=rtpmap:", "a=fmtp:", "a=ptime:", "a=maxptime:", "a=rtcp-mux")
# What a late offer proposes: the echo takes any codec, so the common narrowband and wideband ones.
_OFFERED = (
    ("0", "PCMU/8000"),
    ("8", "PCMA/8000"),
    ("9", "G722/8000"),
    ("101", "telephone-event/8000"),
)


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


@dataclass(frozen=True, slots=True)
class Description:
    """What the call core reads of a remote session description (the audio stream `describe` chose)."""

    audio: AudioOffer
    direction: Direction
    ice: bool  # ICE credentials for the stream (RFC 8839 §5.4): answer as an ICE-lite agent
    rtcp_mux: bool
    srtp: bool  # RTP/SAVP(F): keys we cannot answer
    text: str

    @property
    def held(self) -> bool:
        """The sender does not want to receive (on hold, RFC 3264 §8.4)."""
        return self.direction in ("sendonly", "inactive")


@dataclass(frozen=True, slots=True)
class Candidate:
    """One ICE host candidate (RFC 8839 §5.1): `component` 1 is RTP, 2 RTCP."""

    foundation: str
    component: int
    priority: int
    address: IPAddress
    port: int

    def line(self) -> str:
        return f"a=candidate:{self.foundation} {self.component} UDP {self.priority} {self.address} {self.port} typ host"


@dataclass(frozen=True, slots=True)
class IceLocal:
    """Our ICE-lite parameters for one stream: credentials (RFC 8445 §5.3) and host candidates."""

    ufrag: str
    pwd: str
    candidates: tuple[Candidate, ...]

    def lines(self) -> list[str]:
        return [f"a=ice-ufrag:{self.ufrag}", f"a=ice-pwd:{self.pwd}"] + [c.line() for c in self.candidates]


def candidate_priority(component: int, local_preference: int) -> int:
    """RFC 8445 §5.1.2.1: (2^24) * type preference (126 for host) + (2^8) * local preference + (256 - component)."""
    return (126 << 24) + (local_preference << 8) + (256 - component)


def answer_direction(offered: Direction) -> Direction:
    """RFC 3264 §6.1: sendonly is answered recvonly, recvonly sendonly, the others as they are."""
    return _ANSWER[offered]


def _lines(sdp: str) -> list[str]:
    return [line.rstrip("\r") for line in sdp.split("\n") if line.strip()]


def _choose(sdp: str) -> AudioOffer | None:
    """The first plain RTP audio stream with a non-zero port, else the first SRTP one (to refuse it)."""
    try:
        summary = parse_sdp_addresses(sdp)
    except DecodeError:
        return None
    secure: AudioOffer | None = None
    for index, media in enumerate(summary.media):
        proto = media.proto.upper()
        if media.media.lower() != "audio" or not media.port or not media.formats:
            continue
        if proto not in _PLAIN_PROTOS and proto not in _SECURE_PROTOS:
            continue
        rtcp = media.rtcp.port if media.rtcp is not None else None
        found = AudioOffer(index, summary.connection_for(index), media.port, rtcp, media.formats, media.proto)
        if proto in _PLAIN_PROTOS:
            return found
        secure = secure or found
    return secure


def first_audio(sdp: str) -> AudioOffer | None:
    """The audio stream `describe` would choose (a plain RTP one first), or None (also for bad SDP)."""
    return _choose(sdp)


def describe(sdp: str | bytes) -> Description | None:
    """A remote description, or None when it is not SDP we can use (no usable audio stream, over the caps)."""
    text = sdp.decode("utf-8", "replace") if isinstance(sdp, bytes) else sdp
    audio = _choose(text)
    if audio is None:
        return None
    session: Direction = "sendrecv"
    media: Direction | None = None
    ice_session = ice_media = mux = False
    index = -1
    for line in _lines(text):
        if line.startswith("m="):
            index += 1
            continue
        if not line.startswith("a="):
            continue
        name = line[2:].split(":", 1)[0].strip().lower()
        if index < 0:
            if name in _DIRECTIONS:
                session = name
            elif name == "ice-ufrag":
                ice_session = True
        elif index == audio.index:
            if name in _DIRECTIONS:
                media = name
            elif name == "ice-ufrag":
                ice_media = True
            elif name == "rtcp-mux":
                mux = True
    direction = media or session
    address = audio.address
    if address is not None and address.is_unspecified and direction == "sendrecv":
        direction = "sendonly"  # RFC 3264 §8.4: c=0.0.0.0, the RFC 2543 way of putting a call on hold
    srtp = audio.proto.upper() in _SECURE_PROTOS
    return Description(audio, direction, ice_session or ice_media, mux, srtp, text)


def _family(address: IPAddress) -> str:
    return "IP6" if address.version == 6 else "IP4"


def echo_answer(
    offer: str | Description,
    *,
    address: IPAddress,
    port: int,
    rtcp_port: int,
    session_id: int,
    version: int | None = None,
    direction: Direction | None = None,
    ice: IceLocal | None = None,
) -> str | None:
    """The answer of an echo endpoint at `address`:`port` (RTCP on `rtcp_port` unless rtcp-mux is accepted);
    None when the offer has no usable audio stream (the caller answers 488, RFC 3261 §13.3.1.3).

    `direction` defaults to what §6.1 answers the offer's; `version` (the o= session version, RFC 3264 §8)
    defaults to `session_id`; with `ice` the answer is an ICE-lite agent's."""
    described = offer if isinstance(offer, Description) else describe(offer)
    if described is None:
        return None
    audio = described.audio
    family = _family(address)
    version = session_id if version is None else version
    out = [
        "v=0",
        f"o=autonat {session_id} {version} IN {family} {address}",
        "s=autonat",
        f"c=IN {family} {address}",
        "t=0 0",
    ]
    if ice is not None:
        out.append("a=ice-lite")  # RFC 8839 §5.3: session level
    media_index = -1
    accepted = False
    mux = False
    audio_line = 0
    for line in _lines(described.text):
        if line.startswith("m="):
            media_index += 1
            accepted = media_index == audio.index
            if accepted:
                audio_line = len(out)
                proto = "RTP/AVPF" if audio.proto.upper().endswith("F") else "RTP/AVP"
                out.append(f"m=audio {port} {proto} {' '.join(audio.formats)}")
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
    if ice is not None:
        out += ice.lines()
    out.append(f"a={direction or answer_direction(described.direction)}")
    return "\r\n".join(out) + "\r\n"


def echo_offer(
    *,
    address: IPAddress,
    port: int,
    rtcp_port: int,
    session_id: int,
    version: int,
    formats: Sequence[tuple[str, str]] = _OFFERED,
) -> str:
    """Our offer when an INVITE came without one (RFC 3261 §13.2.1, RFC 3264 §5): one audio stream with
    `formats` ((payload type, rtpmap) pairs; by default the echo's, which takes any codec). The test call
    (autonat.sip.probecall) offers the G.711 pair it can send."""
    family = _family(address)
    out = [
        "v=0",
        f"o=autonat {session_id} {version} IN {family} {address}",
        "s=autonat",
        f"c=IN {family} {address}",
        "t=0 0",
        f"m=audio {port} RTP/AVP {' '.join(number for number, _ in formats)}",
    ]
    if rtcp_port != port + 1:
        out.append(f"a=rtcp:{rtcp_port}")
    out += [f"a=rtpmap:{number} {name}" for number, name in formats]
    out += [f"a=fmtp:{number} 0-16" for number, name in formats if name.lower().startswith("telephone-event/")]
    out += ["a=ptime:20", "a=sendrecv"]
    return "\r\n".join(out) + "\r\n"


def anchor_sdp(sdp: str, *, address: IPAddress, port: int, rtcp_port: int, ice: IceLocal | None = None) -> str | None:
    """`sdp` with its audio stream moved to `address`:`port` (RTCP `rtcp_port`): the copy sent to the other
    leg of a relayed call. None when there is no usable audio stream."""
    described = describe(sdp)
    if described is None:
        return None
    audio = described.audio
    family = _family(address)
    out: list[str] = []
    media_index = -1
    explicit = False  # a direction attribute on the audio stream or the session
    for line in _lines(sdp):
        if line.startswith("m="):
            if media_index < 0 and ice is not None:
                out.append("a=ice-lite")
            media_index += 1
            name, _, rest = line[2:].partition(" ")
            fields = rest.split(" ", 1)
            tail = fields[1] if len(fields) > 1 else "RTP/AVP 0"
            out.append(f"m={name} {port if media_index == audio.index else 0} {tail}")
            if media_index == audio.index:
                if rtcp_port != port + 1:
                    out.append(f"a=rtcp:{rtcp_port}")
                if ice is not None:
                    out += ice.lines()
        elif line.startswith("o="):
            head = line.split(" ")
            out.append(" ".join([*head[:4], family, str(address)]) if len(head) >= 6 else line)
        elif line.startswith("c="):
            out.append(f"c=IN {family} {address}")
        elif line.startswith(("a=candidate:", "a=ice-", "a=end-of-candidates", "a=rtcp:")) or _SDES.match(line):
            continue  # ICE would route around the relay; the relay does not terminate SRTP keys either
        else:
            explicit = explicit or line[2:] in _DIRECTIONS
            out.append(line)
    if described.direction == "sendonly" and not explicit:
        out.append("a=sendonly")  # the old c=0.0.0.0 hold, said the RFC 3264 way once c= is ours
    return "\r\n".join(out) + "\r\n"
