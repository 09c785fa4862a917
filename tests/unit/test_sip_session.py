"""SDP offer/answer of the SIP service (RFC 3264): the echo answer and the relay's anchored copy."""

from __future__ import annotations

from ipaddress import ip_address

from hypothesis import given, settings
from hypothesis import strategies as st

from autonat.proto.sdp import parse_sdp_addresses
from autonat.sip.session import anchor_sdp, echo_answer, first_audio

OURS = ip_address("203.0.113.1")
BARESIP = (
    "v=0\r\n"
    "o=- 1234 5678 IN IP4 10.0.0.5\r\n"
    "s=-\r\n"
    "c=IN IP4 10.0.0.5\r\n"
    "t=0 0\r\n"
    "m=audio 40000 RTP/AVP 96 8 0 101\r\n"
    "a=rtpmap:96 opus/48000/2\r\n"
    "a=fmtp:96 stereo=1\r\n"
    "a=rtpmap:101 telephone-event/8000\r\n"
    "a=rtcp:40001\r\n"
    "a=candidate:1 1 UDP 2130706431 10.0.0.5 40000 typ host\r\n"
    "a=ptime:20\r\n"
    "m=video 40002 RTP/AVP 97\r\n"
    "a=rtpmap:97 H264/90000\r\n"
)


def test_echo_answer_accepts_the_audio_formats_and_declines_the_rest() -> None:
    answer = echo_answer(BARESIP, address=OURS, port=16384, rtcp_port=16385, session_id=7)
    assert answer is not None
    summary = parse_sdp_addresses(answer)
    assert [m.media for m in summary.media] == ["audio", "video"]  # RFC 3264 §6: same number of streams
    audio, video = summary.media
    assert (audio.port, audio.formats) == (16384, ("96", "8", "0", "101"))
    assert video.port == 0
    assert summary.connection is not None and summary.connection.address == "203.0.113.1"
    assert "a=rtpmap:96 opus/48000/2" in answer and "a=fmtp:96 stereo=1" in answer
    assert "a=candidate" not in answer and "a=rtcp:" not in answer  # RTCP on port + 1: nothing to say


def test_echo_answer_names_the_rtcp_port_when_the_router_mapped_it_elsewhere() -> None:
    answer = echo_answer(BARESIP, address=OURS, port=20000, rtcp_port=31001, session_id=7)
    assert answer is not None and "a=rtcp:31001" in answer
    assert parse_sdp_addresses(answer).media[0].rtcp is not None


def test_no_usable_audio_means_no_answer() -> None:
    assert echo_answer("v=0\r\nm=video 5000 RTP/AVP 97\r\n", address=OURS, port=2, rtcp_port=3, session_id=1) is None
    assert echo_answer("v=0\r\nm=audio 0 RTP/AVP 0\r\n", address=OURS, port=2, rtcp_port=3, session_id=1) is None
    assert first_audio("\x00" * 70000) is None  # over the SDP cap


def test_anchor_moves_audio_to_the_relay_and_drops_ice() -> None:
    anchored = anchor_sdp(BARESIP, address=OURS, port=16390, rtcp_port=30001)
    assert anchored is not None
    summary = parse_sdp_addresses(anchored)
    assert summary.origin is not None and summary.origin.address == "203.0.113.1"
    assert [m.port for m in summary.media] == [16390, 0]
    assert summary.media[0].rtcp is not None and summary.media[0].rtcp.port == 30001
    assert "a=candidate" not in anchored and "10.0.0.5" not in anchored
    assert "a=rtpmap:96 opus/48000/2" in anchored  # codecs pass through untouched


SDP_LINES = st.sampled_from(
    [
        "v=0",
        "o=- 1 1 IN IP4 10.0.0.5",
        "c=IN IP4 10.0.0.5",
        "c=IN IP6 ::1",
        "m=audio 4000 RTP/AVP 0 8",
        "m=audio 0 RTP/AVP 0",
        "m=video 4002 RTP/AVP 97",
        "m=audio 65535 RTP/SAVPF 111",
        "m=audio x RTP/AVP",
        "a=rtcp:4001",
        "a=rtcp-mux",
        "a=rtpmap:0 PCMU/8000",
        "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:xyz",
        "t=0 0",
        "m=",
        "",
    ]
)


@settings(max_examples=500)
@given(st.lists(st.one_of(SDP_LINES, st.text(max_size=40)), max_size=30), st.sampled_from(["\r\n", "\n"]))
def test_hostile_offers_give_an_sdp_or_none(lines: list[str], newline: str) -> None:
    offer = newline.join(lines)
    audio = first_audio(offer)
    answer = echo_answer(offer, address=OURS, port=20000, rtcp_port=20001, session_id=1)
    anchored = anchor_sdp(offer, address=OURS, port=20000, rtcp_port=20001)
    assert (answer is None) == (audio is None) == (anchored is None)
    if answer is not None and anchored is not None and audio is not None:
        offered = [line for line in offer.split("\n") if line.strip() and line.startswith("m=")]
        answered = [line for line in answer.split("\r\n") if line.startswith("m=")]
        assert len(answered) == len(offered)  # RFC 3264 §6: one answer stream per offered stream
        assert [m.port for m in parse_sdp_addresses(answer).media if m.port] == [20000]
        assert [m.port for m in parse_sdp_addresses(anchored).media if m.port] == [20000]


def test_the_rtcp_attribute_follows_the_accepted_stream_not_an_earlier_declined_one() -> None:
    offer = "v=0\r\nc=IN IP4 10.0.0.5\r\nm=audio 0 RTP/AVP 0\r\nm=audio 4000 RTP/AVP 8\r\n"
    answer = echo_answer(offer, address=OURS, port=20000, rtcp_port=31001, session_id=1)
    assert answer is not None
    lines = answer.split("\r\n")
    assert lines[lines.index("m=audio 20000 RTP/AVP 8") + 1] == "a=rtcp:31001"
    summary = parse_sdp_addresses(answer)
    assert summary.media[0].rtcp is None and summary.media[1].rtcp is not None
