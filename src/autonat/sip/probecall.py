"""The test call from our side (`autonat call URI`), sans-IO: the target, the signal, what comes back of it,
the figures and the verdict. No sockets and no clock: `now` is passed in.

A phone behind the NAT calls an echo service (FreeSWITCH's 9196, SIPp's `-rtp_echo`, another autonat): the
call core (autonat.sip.core) places the call with the address and the router-mapped RTP ports the profile
advertises to that peer, hangs up after the signal, and sums up the signalling in an `Outcome`. Between the
answer and the BYE the shell (autonat.service.media.ProbeMedia) drives a `Signal` by three things only:
`start(now, ...)` at the answer, `due(now)` when `timer()` is reached (the packets to send now), and
`receive(data, source, now)` for each datagram on the RTP socket. `figures()` sums it up and
`report(outcome, figures)` gives the verdict and every figure as one object (what `--json` prints).

The signal is what a phone sends: 20 ms PCMU packets (PCMA when the answer takes only that) with RFC 3550
§5.1 headers, our SSRC, random sequence and timestamp bases, the marker on the first packet. The payload is the
G.711 digital milliwatt (ITU-T G.711 Tables 5 and 6: a 1 kHz tone at 0 dBm0, a tone to a person listening) whose
first 12 octets carry a random per-call token and the packet's index. Echo services differ in what they keep:
SIPp sends the packet back as it came, autonat's and FreeSWITCH's echoes re-originate it under their own SSRC,
sequence numbers and timestamps (autonat.sip.rtp.EchoStream); all keep the payload. So an echo is recognised
by its payload alone, and what is not ours (the peer's own stream, RTCP on a muxed port, anything stray or
forged) is counted as `foreign`, never as an echo.

The figures:
- `sent`, `received`: packets of the signal sent, and distinct ones that came back (duplicates apart). Loss is
  1 - received / sent, the way out and back together: an echo sends no report of what reached it.
- round-trip time of each echoed packet: its arrival minus the moment it was sent (min / avg / max).
- jitter: RFC 3550 §A.8's interarrival jitter of the echoed stream, J += (|D| - J) / 16 in 8 kHz units, where
  D(i,j) = (Rj - Ri) - (Sj - Si) takes for S the moment we sent each packet (known by the index in its
  payload; an echo that re-originates renumbers the RTP timestamps). So D is the change in transit time, the
  round trip's jitter: what the path through the NAT and the echo adds, not our own timer's lateness (the
  event loop wakes up to a millisecond late, more than a LAN's whole jitter).
- `reordered`: echoes that arrived after a later one.

Bounds: the signal lasts at most MAX_SECONDS (60 s: 3,000 packets, whose send times are one preallocated list);
a loop that fell behind sends at most MAX_BURST packets at once and skips older ones (counted in `skipped`);
at most MAX_SOURCES echo sources are remembered. Nothing grows with what the network sends.

A URI (`parse_target`) is untrusted input too: at most MAX_URI characters, `sip:` or `sips:` with an IP
literal host (no DNS: the RFC 3263 NAPTR/SRV/A lookups are not done), an optional port and `;transport=`;
anything else is a one-line ValueError.
"""

from __future__ import annotations

import math
import re
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any

from autonat.sip.peer import Peer
from autonat.sip.rtp import is_rtcp, rtp_payload
from autonat.sip.session import Description

__all__ = [
    "ANSWER_TIMEOUT",
    "DEFAULT_SECONDS",
    "DRAIN",
    "MAX_SECONDS",
    "MIN_SECONDS",
    "OFFERED",
    "REPORT_SCHEMA",
    "Figures",
    "Outcome",
    "ProbeTarget",
    "Signal",
    "check_seconds",
    "choose_answer",
    "parse_target",
    "report",
    "verdict",
]

MIN_SECONDS, MAX_SECONDS, DEFAULT_SECONDS = 1, 60, 5
ANSWER_TIMEOUT = 15.0  # from placing the call to its 2xx (ports, ringing and all): then CANCEL, "no answer"
DRAIN = 1.0  # after the last packet, echoes still count this long before the BYE (a slow path's last echoes)
PTIME = 0.020  # seconds of audio per packet (RFC 3551 §4.5.14: G.711's default packetisation)
CLOCK_RATE = 8000  # RTP clock of PCMU and PCMA (RFC 3551 §4.5.14)
SAMPLES = int(PTIME * CLOCK_RATE)  # 160: the timestamp step per packet, and the payload octets
MAX_BURST = 10  # packets sent at once when the loop fell behind; older ones are skipped, as a phone would
MAX_SOURCES = 4  # distinct echo sources remembered
MAX_URI = 256
REPORT_SCHEMA = 1  # `report`'s shape (docs/JSON.md's rule: removing or renaming a key raises it)
POOR_LOSS = 0.20  # at or above this, "audio both ways" gets a "but ... lost" (20 %: speech is hard to follow)
_TOLERANCE = 0.001  # a timer that fires a hair early still sends the packet it was armed for
OFFERED = (("0", "PCMU/8000"), ("8", "PCMA/8000"))  # what our offer proposes: the signal is G.711
_CODECS = {"0": "PCMU", "8": "PCMA"}
# ITU-T G.711 Table 5 (mu-law) and Table 6 (A-law): the digital milliwatt, 8 samples of a 1 kHz tone at 0 dBm0.
_MILLIWATT = {0: bytes.fromhex("1e0b0b1e9e8b8b9e"), 8: bytes.fromhex("34212134b4a1a1b4")}
_HEADER = struct.Struct("!BBHII")
_MARK = 12  # token (8 octets) and index (4) at the start of the payload

# sip:user@host:port;transport=x (RFC 3261 §19.1.1, §25.1): the user part without ';' or '?', an IPv4
# literal or a bracketed IPv6 literal, parameters but no headers.
_URI = re.compile(
    r"(?P<scheme>sips?):(?:(?P<user>[A-Za-z0-9\-_.!~*'()&=+$,/%]+)@)?"
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^\[\]:;?@/]+)(?::(?P<port>[0-9]{1,5}))?(?P<params>(?:;[^;?]*)*)",
    re.IGNORECASE,
)


# --------------------------------------------------------------------------------------------- the target


@dataclass(frozen=True, slots=True)
class ProbeTarget:
    """Where the test call goes: the Request-URI and To (`uri`, normalised), the peer it is sent to."""

    uri: str
    peer: Peer
    user: str | None


def parse_target(text: str) -> ProbeTarget:
    """A `sip:` / `sips:` URI with an IP literal host (RFC 3261 §19.1.1); ValueError, one line, otherwise.
    The port defaults to 5060 (5061 for sips, §19.1.2), the transport to UDP (TLS for sips)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the URI is empty (e.g. sip:9196@203.0.113.50)")
    text = text.strip()
    if len(text) > MAX_URI:
        raise ValueError(f"the URI is longer than {MAX_URI} characters")
    if not text.isascii() or not text.isprintable():
        raise ValueError("the URI has characters a SIP URI cannot have")
    match = _URI.fullmatch(text)
    if match is None:
        if "?" in text:
            raise ValueError("the URI has headers (?...): not for a test call")
        raise ValueError(f"not a SIP URI: {text!r} (e.g. sip:9196@203.0.113.50:5060)")
    scheme = match["scheme"].lower()
    host = match["host"]
    try:
        address = ip_address(host.strip("[]"))
    except ValueError:
        raise ValueError(f"the URI's host must be an IP address, not {host!r} (no DNS lookups)") from None
    if host.startswith("[") != (address.version == 6):
        raise ValueError(f"only an IPv6 host goes in brackets ({host})")
    if address.is_unspecified or address.is_multicast:
        raise ValueError(f"{address} is not an address a call can go to")
    port = int(match["port"]) if match["port"] else (5061 if scheme == "sips" else 5060)
    if not 0 < port < 65536:
        raise ValueError(f"the URI's port must be 1-65535, not {port}")
    transport = "tls" if scheme == "sips" else "udp"
    for param in filter(None, match["params"].split(";")):
        name, _, value = param.partition("=")
        if name.lower() != "transport" or value.lower() not in ("udp", "tcp", "tls"):
            raise ValueError(f"unsupported URI parameter {param!r} (only transport=udp|tcp|tls)")
        if scheme == "sips" and value.lower() != "tls":
            raise ValueError("a sips: URI is called over TLS only (RFC 3261 §26.2.2)")
        transport = value.lower()
    user = match["user"]
    host_text = f"[{address}]" if address.version == 6 else str(address)
    suffix = "" if scheme == "sips" or transport == "udp" else f";transport={transport}"
    uri = f"{scheme}:{user + '@' if user else ''}{host_text}:{port}{suffix}"
    return ProbeTarget(uri, Peer(transport, str(address), port), user)


def check_seconds(value: object) -> float:
    """How long the signal plays: a number of seconds, MIN_SECONDS to MAX_SECONDS; ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"seconds must be a number, {MIN_SECONDS}-{MAX_SECONDS}")
    if not MIN_SECONDS <= value <= MAX_SECONDS:
        raise ValueError(f"seconds must be {MIN_SECONDS}-{MAX_SECONDS}, not {value:g}")
    return float(value)


@dataclass(frozen=True, slots=True)
class Answer:
    """Where the answer says to send the signal, and in which of our two codecs."""

    remote: tuple[str, int]
    payload_type: int
    codec: str


def choose_answer(described: Description | None) -> Answer | str:
    """The answer's audio stream as the signal needs it (RFC 3264 §6.1: the answerer's formats, in its order of
    preference, are a subset of our offer), or why there is none, as a phrase for the verdict."""
    if described is None:
        return "the answer has no audio stream we can use"
    if described.srtp:
        return "the answer wants SRTP"
    audio = described.audio
    if audio.address is None or audio.address.is_unspecified or audio.address.is_multicast:
        return "the answer gives no address to send audio to"
    if described.direction in ("sendonly", "inactive"):
        return f"the answer does not take audio (a={described.direction})"
    for number in audio.formats:
        if number in _CODECS:
            return Answer((str(audio.address), audio.port), int(number), _CODECS[number])
    return "the answer accepts neither PCMU nor PCMA"


# --------------------------------------------------------------------------------------------- the signal


@dataclass(frozen=True, slots=True)
class Figures:
    """What the signal measured (times in seconds; None where nothing came back to measure)."""

    sent: int
    received: int
    duplicates: int = 0
    reordered: int = 0
    foreign: int = 0
    skipped: int = 0
    rtcp: int = 0  # RTCP packets that reached our RTCP port (the peer's reports; not part of the echo)
    rtt_min: float | None = None
    rtt_avg: float | None = None
    rtt_max: float | None = None
    jitter: float | None = None
    sources: tuple[tuple[str, int], ...] = ()  # where echoes came from (the first MAX_SOURCES)

    @property
    def loss(self) -> float | None:
        return None if self.sent == 0 else 1 - self.received / self.sent


class Signal:
    """The known signal of one test call and the echo of it: see the module docstring."""

    def __init__(self, seconds: float, *, rand: Callable[[int], bytes] = secrets.token_bytes) -> None:
        seconds = check_seconds(seconds)
        seed = rand(18)
        self.token = bytes(seed[:8])
        self.ssrc = int.from_bytes(seed[8:12], "big") or 1
        self._seq_base = int.from_bytes(seed[12:14], "big")
        self._ts_base = int.from_bytes(seed[14:18], "big")
        self.total = round(seconds / PTIME)
        self.payload_type = 0
        self._tone = b""
        self._started: float | None = None
        self._next = 0  # the index of the next packet to send or skip
        self._stopped = False
        self._sent_at: list[float] = []  # by index; NaN for a skipped packet
        self._got = bytearray(self.total)
        self.sent = self.received = self.duplicates = self.reordered = self.foreign = self.skipped = self.rtcp = 0
        self._rtt_sum = 0.0
        self._rtt_min = math.inf
        self._rtt_max = -math.inf
        self._jitter = 0.0  # RFC 3550 §A.8, in timestamp units
        self._transit: float | None = None
        self._highest = -1
        self._sources: list[tuple[str, int]] = []

    # ----------------------------------------------------------------------------------- sending
    def start(self, now: float, payload_type: int = 0) -> None:
        """The call is answered: the first packet is due now (payload type 0 PCMU or 8 PCMA)."""
        if payload_type not in _MILLIWATT:
            raise ValueError(f"the signal is PCMU (0) or PCMA (8), not payload type {payload_type}")
        if self._started is None:
            self._started = now
            self.payload_type = payload_type
            self._tone = (_MILLIWATT[payload_type] * (SAMPLES // 8))[_MARK:]

    def stop(self) -> None:
        """No more packets (the call ended before the signal did); echoes still count."""
        self._stopped = True

    def timer(self) -> float | None:
        """When the next packet is due; None before the start and once the signal is over."""
        if self._started is None or self._stopped or self._next >= self.total:
            return None
        return self._started + self._next * PTIME

    def due(self, now: float) -> list[bytes]:
        """The packets to send now: those whose time has come, at most MAX_BURST (the older ones are skipped:
        a phone does not send stale audio in a burst either)."""
        if self._started is None or self._stopped:
            return []
        last = min(self.total, math.floor((now + _TOLERANCE - self._started) / PTIME) + 1)
        if last <= self._next:
            return []
        skip = max(0, last - self._next - MAX_BURST)
        self._sent_at.extend([math.nan] * skip)
        self.skipped += skip
        packets = [self._packet(index) for index in range(self._next + skip, last)]
        self._sent_at.extend([now] * len(packets))
        self.sent += len(packets)
        self._next = last
        return packets

    def _packet(self, index: int) -> bytes:
        header = _HEADER.pack(
            0x80,
            (0x80 if index == 0 else 0) | self.payload_type,  # the marker starts the talkspurt (RFC 3551 §4.1)
            (self._seq_base + index) & 0xFFFF,
            (self._ts_base + index * SAMPLES) & 0xFFFFFFFF,
            self.ssrc,
        )
        return header + self.token + index.to_bytes(4, "big") + self._tone

    # ----------------------------------------------------------------------------------- receiving
    def receive(self, data: bytes, source: tuple[str, int], now: float) -> None:
        """A datagram on the RTP socket: an echo of one of our packets, or foreign."""
        payload = rtp_payload(data)
        if payload is None or is_rtcp(data) or len(payload) < _MARK or payload[:8] != self.token:
            self.foreign += 1
            return
        index = int.from_bytes(payload[8:_MARK], "big")
        if index >= len(self._sent_at) or math.isnan(self._sent_at[index]):
            self.foreign += 1  # carries our token but was never sent: forged, not an echo
            return
        if self._got[index]:
            self.duplicates += 1
            return
        self._got[index] = 1
        self.received += 1
        rtt = now - self._sent_at[index]
        self._rtt_sum += rtt
        self._rtt_min = min(self._rtt_min, rtt)
        self._rtt_max = max(self._rtt_max, rtt)
        transit = rtt * CLOCK_RATE  # RFC 3550 §A.8's Rj - Sj, with S the moment the packet left
        if self._transit is not None:
            self._jitter += (abs(transit - self._transit) - self._jitter) / 16
        self._transit = transit
        if index < self._highest:
            self.reordered += 1
        else:
            self._highest = index
        if len(self._sources) < MAX_SOURCES and source not in self._sources:
            self._sources.append((source[0], source[1]))

    def receive_rtcp(self) -> None:
        """A datagram on the RTCP port: counted, not read (an echo's reports tell nothing about our signal)."""
        self.rtcp += 1

    def figures(self) -> Figures:
        measured = self.received > 0
        return Figures(
            sent=self.sent,
            received=self.received,
            duplicates=self.duplicates,
            reordered=self.reordered,
            foreign=self.foreign,
            skipped=self.skipped,
            rtcp=self.rtcp,
            rtt_min=self._rtt_min if measured else None,
            rtt_avg=self._rtt_sum / self.received if measured else None,
            rtt_max=self._rtt_max if measured else None,
            jitter=self._jitter / CLOCK_RATE if measured else None,
            sources=tuple(self._sources),
        )


# --------------------------------------------------------------------------------------------- the verdict


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the call core knows of a finished test call: the signalling and the media plan.

    `status` is the final response to our INVITE (200 when answered, None when none came); `reason` says why
    the call ended ("test call done", "bye from callee", "no answer", "refused 486 Busy Here", ...). `local` is
    our RTP socket, `advertised` what our SDP offer gave, `mapping` the router's external address and port for
    that socket (None when the media was not mapped), `remote` where the answer said to send."""

    uri: str
    profile: str
    call_id: str
    seconds: float
    answered: bool
    status: int | None
    phrase: str
    reason: str
    setup: float | None = None  # INVITE to 2xx
    duration: float | None = None  # 2xx to the end
    local: tuple[str, int] | None = None
    advertised: tuple[str, int] | None = None
    mapping: tuple[str, int] | None = None
    remote: tuple[str, int] | None = None
    codec: str | None = None

    @property
    def through_mapping(self) -> bool:
        """Our SDP gave the router's mapping: what comes back to our socket came in through that hole."""
        return self.mapping is not None and self.advertised == self.mapping


def _hostport(address: tuple[str, int] | None) -> str | None:
    if address is None:
        return None
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def verdict(outcome: Outcome, figures: Figures | None) -> tuple[bool, str]:
    """(ok, the one line): "ok: audio both ways through the NAT" (on IPv6: "... through the router's IPv6
    firewall (pinholes)"), "fail: no audio back", "fail: call refused
    486 Busy Here", "fail: no answer", ..."""
    if not outcome.answered:
        status = outcome.status
        if status is not None and status >= 300 and status != 408:
            return False, f"fail: call refused {status} {outcome.phrase}".rstrip()
        if status == 408 or outcome.reason == "no answer":
            return False, "fail: no answer"
        return False, f"fail: {outcome.reason}"
    if figures is None or figures.sent == 0:
        return False, f"fail: no audio sent ({outcome.reason})"
    if figures.received == 0:
        return False, "fail: no audio back"
    if outcome.through_mapping and outcome.advertised is not None and ":" in outcome.advertised[0]:
        line = "ok: audio both ways through the router's IPv6 firewall (pinholes)"  # no NAT on IPv6
    elif outcome.through_mapping:
        line = "ok: audio both ways through the NAT"
    else:
        line = f"ok: audio both ways, not through a router mapping (our SDP gave {_hostport(outcome.advertised)})"
    loss = figures.loss or 0.0
    if loss >= POOR_LOSS:
        line += f", but {100 * loss:.1f} % lost"
    return True, line


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 3)


def report(outcome: Outcome, figures: Figures | None) -> dict[str, Any]:
    """The verdict and every figure as one JSON-ready object (`autonat call --json`, the doctor)."""
    ok, line = verdict(outcome, figures)
    rtp: dict[str, Any] | None = None
    if figures is not None:
        loss = figures.loss
        rtp = {
            "sent": figures.sent,
            "received": figures.received,
            "lost": figures.sent - figures.received,
            "loss_percent": None if loss is None else round(100 * loss, 2),
            "duplicates": figures.duplicates,
            "reordered": figures.reordered,
            "foreign": figures.foreign,
            "skipped": figures.skipped,
            "rtcp_received": figures.rtcp,
        }
    measured = figures is not None and figures.received > 0
    return {
        "schema": REPORT_SCHEMA,
        "ok": ok,
        "verdict": line,
        "uri": outcome.uri,
        "profile": outcome.profile,
        "call_id": outcome.call_id,
        "seconds": outcome.seconds,
        "answered": outcome.answered,
        "status": outcome.status,
        "phrase": outcome.phrase,
        "reason": outcome.reason,
        "setup_ms": _ms(outcome.setup),
        "duration_s": None if outcome.duration is None else round(outcome.duration, 3),
        "codec": outcome.codec,
        "rtp": rtp,
        "rtt_ms": (
            {"min": _ms(figures.rtt_min), "avg": _ms(figures.rtt_avg), "max": _ms(figures.rtt_max)}
            if measured and figures is not None
            else None
        ),
        "jitter_ms": _ms(figures.jitter) if figures is not None else None,
        "media": {
            "local": _hostport(outcome.local),
            "advertised": _hostport(outcome.advertised),
            "mapping": _hostport(outcome.mapping),
            "remote": _hostport(outcome.remote),
            "echo_from": [_hostport(source) for source in figures.sources] if figures is not None else [],
            "through_mapping": outcome.through_mapping,
        },
    }
