"""The 49 torture messages of RFC 4475 (tests/data/rfc4475/), each received over UDP by the service's call core
with its default profile (auth-calls on), and answered or dropped as the RFC says.

Every valid message (§3.1.1, §3.2.1 read the RFC 2543 way, §3.4) parses, and what it gets is the answer of an
ordinary request of its kind: 200 to OPTIONS, 501 to an unknown method, 401/407 challenges, 404 for no route.
Every invalid one (§3.1.2, §3.3) gets the answer its section names, or nothing where no answer is possible (a
response never gets one).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from autonat.proto.errors import DecodeError
from autonat.sip import core
from autonat.sip.dialplan import DEFAULT_DIALPLAN
from autonat.sip.message import BadRequest, Request, Response, parse_message
from autonat.sip.peer import Peer
from tests.unit.test_sip_harness import Net

CORPUS = Path(__file__).parents[1] / "data" / "rfc4475"
PEER = Peer("udp", "198.51.100.20", 5060)

# name: (section, valid, the status answered (None: nothing is sent))
VERDICTS: dict[str, tuple[str, bool, int | None]] = {
    "wsinv": ("3.1.1.1", True, 481),  # its To has a tag: a re-INVITE in a dialog we do not have (§12.2.2)
    "intmeth": ("3.1.1.2", True, 501),  # "Endpoints will generate a 501 listing the methods they understand"
    "esc01": ("3.1.1.3", True, 404),  # no dialplan entry for that user part
    "escnull": ("3.1.1.4", True, 401),
    "esc02": ("3.1.1.5", True, 501),  # RE%47IST%45R is not REGISTER
    "lwsdisp": ("3.1.1.6", True, 200),
    "longreq": ("3.1.1.7", True, 407),  # 34 Vias and long values, well formed
    "dblreq": ("3.1.1.8", True, 401),  # the REGISTER; the INVITE after it in the datagram is discarded
    "semiuri": ("3.1.1.9", True, 200),
    "transports": ("3.1.1.10", True, 200),
    "mpart01": ("3.1.1.11", True, 405),  # parsed; MESSAGE outside a call is not served
    "unreason": ("3.1.1.12", True, None),  # responses to nothing of ours
    "noreason": ("3.1.1.13", True, None),
    "badinv01": ("3.1.2.1", False, 400),
    "clerr": ("3.1.2.2", False, 400),  # over UDP: "should respond with a 400"
    "ncl": ("3.1.2.3", False, 400),
    "scalar02": ("3.1.2.4", False, 400),  # "400 Bad Request due to the CSeq error"
    "scalarlg": ("3.1.2.5", False, None),  # a response: "simply discard it"
    "quotbal": ("3.1.2.6", False, 400),
    "ltgtruri": ("3.1.2.7", False, 400),
    "lwsruri": ("3.1.2.8", False, 400),
    "lwsstart": ("3.1.2.9", False, 400),  # "acceptable to reject this request as malformed"
    "trws": ("3.1.2.10", False, 400),
    "escruri": ("3.1.2.11", False, 400),
    "baddate": ("3.1.2.12", False, 407),  # "shouldn't [reject] unless the Date ... were important": it is not
    "regbadct": ("3.1.2.13", False, 400),
    "badaspec": ("3.1.2.14", False, 400),
    "baddn": ("3.1.2.15", False, 400),
    "badvers": ("3.1.2.16", False, 505),
    "mismatch01": ("3.1.2.17", False, 400),
    "mismatch02": ("3.1.2.18", False, 501),  # "should respond with a 501"
    "bigcode": ("3.1.2.19", False, None),  # a response: "simply drop it"
    "badbranch": ("3.2.1", True, 200),  # falls back to the RFC 2543 transaction identifier
    "insuf": ("3.3.1", False, 400),
    "unkscm": ("3.3.2", False, 416),
    "novelsc": ("3.3.3", False, 416),
    "unksm2": ("3.3.4", False, 400),  # a registrar refuses a non-SIP AOR
    "bext01": ("3.3.5", False, 420),
    "invut": ("3.3.6", False, 415),
    "regaut01": ("3.3.7", False, 401),  # a registrar challenges (an unknown scheme is no credentials)
    "multi01": ("3.3.8", False, 400),
    "mcl01": ("3.3.9", False, 400),
    "bcast": ("3.3.10", False, None),  # "an endpoint receiving this message should simply discard it"
    "zeromf": ("3.3.11", True, 200),  # an endpoint answers as if Max-Forwards were positive
    "cparam01": ("3.3.12", True, 401),
    "cparam02": ("3.3.13", True, 401),
    "regescrt": ("3.3.14", True, 401),
    "sdp01": ("3.3.15", False, 406),  # "should respond with a 406 Not Acceptable"
    "inv2543": ("3.4.1", True, 407),  # RFC 2543: no branch, no From tag, no Max-Forwards, no Content-Length
}


def test_the_corpus_is_the_rfcs_49_messages() -> None:
    assert sorted(path.stem for path in CORPUS.glob("*.dat")) == sorted(VERDICTS)
    assert len(VERDICTS) == 49


@pytest.mark.parametrize("name", sorted(VERDICTS))
def test_every_message_is_parsed_answered_or_dropped_as_the_rfc_says(name: str) -> None:
    section, valid, status = VERDICTS[name]
    data = (CORPUS / f"{name}.dat").read_bytes()
    try:
        parsed: Request | Response | BadRequest = parse_message(data)  # type: ignore[assignment]
    except BadRequest as bad:
        parsed = bad
    except DecodeError:
        assert status is None, f"§{section} {name}: dropped, but the RFC has it answered {status}"
        return
    if valid:
        assert not isinstance(parsed, BadRequest), f"§{section} {name}: a valid message refused"
    net = Net(core.ProfileConfig("p", 5060, dialplan=DEFAULT_DIALPLAN))
    net.run(net.core.receive("p", parsed, PEER, net.now))
    net.advance(0.5)  # a 100 Trying may go first; the answer is what counts
    finals = [s.message for s in net.sent if isinstance(s.message, Response) and s.message.status >= 200]
    if status is None:
        assert finals == [], f"§{section} {name}: answered where the RFC says discard"
        return
    assert [r.status for r in finals][:1] == [status], f"§{section} {name}"
    answer = finals[0]
    assert all(s.peer == PEER for s in net.sent)  # to the packet's source
    if status == 400:
        assert answer.reason.startswith("Bad Request"), answer.reason  # the defect named in the phrase
    assert net.core.calls == []


def test_valid_messages_all_parse() -> None:
    """The three valid messages the codec used to refuse included: escaped NUL/BEL/DEL in a quoted string
    (intmeth), 34 Vias (longreq), an RFC 2543 request without a Via branch (inv2543)."""
    for name, (section, valid, _) in VERDICTS.items():
        if valid:
            parsed = parse_message((CORPUS / f"{name}.dat").read_bytes())
            assert isinstance(parsed, Request | Response), f"§{section} {name}"
    longreq = parse_message((CORPUS / "longreq.dat").read_bytes())
    assert isinstance(longreq, Request) and len(longreq.vias()) == 34
    inv2543 = parse_message((CORPUS / "inv2543.dat").read_bytes())
    assert isinstance(inv2543, Request) and inv2543.top_via().branch is None and inv2543.from_tag() is None
    assert inv2543.max_forwards() is None and inv2543.body.endswith(b"m=audio 49217 RTP/AVP 0\r\n")
