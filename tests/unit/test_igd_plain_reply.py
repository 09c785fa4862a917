"""proto/igd.py reads the plainest SOAP reply (miniupnpd's) without building a tree (`_plain_response`):
whatever it accepts it must read exactly as the tree parser does, and anything it is unsure of it leaves to
the tree parser. Differential property tests over replies built to sit on every edge of "plainest"."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autonat.proto import igd
from autonat.proto.errors import DecodeError

SERVICE = "urn:schemas-upnp-org:service:WANIPConnection:1"
REQUEST = igd.get_external_ip_address(SERVICE)
ENVELOPE = "http://schemas.xmlsoap.org/soap/envelope/"
MINIUPNPD = (
    b'<?xml version="1.0"?>\r\n<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
    b's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body><u:GetExternalIPAddressResponse '
    b'xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:1"><NewExternalIPAddress>203.0.113.1'
    b"</NewExternalIPAddress></u:GetExternalIPAddressResponse></s:Body></s:Envelope>\r\n"
)


def read(data: bytes, status: int, plain: bool) -> tuple[str, object]:
    with pytest.MonkeyPatch.context() as patch:
        if not plain:
            patch.setattr(igd, "_plain_response", lambda data, element: None)
        try:
            return "outputs", igd.parse_soap_response(data, REQUEST, status)
        except igd.UpnpError as error:
            return "fault", (error.code, error.description)
        except DecodeError as exc:
            return "decode", str(exc)


def test_miniupnpd_s_reply_is_read_without_a_tree() -> None:
    assert igd._plain_response(MINIUPNPD, "GetExternalIPAddressResponse") == {"NewExternalIPAddress": "203.0.113.1"}
    assert read(MINIUPNPD, 200, True) == read(MINIUPNPD, 200, False)


@pytest.mark.parametrize(
    "data",
    [
        MINIUPNPD.replace(b"<?xml", b'<!DOCTYPE x [<!ENTITY a "b">]><?xml'),
        MINIUPNPD.replace(b"203.0.113.1", b"&#50;03.0.113.1"),
        MINIUPNPD.replace(b"203.0.113.1", b"<!-- c -->203.0.113.1"),
        MINIUPNPD.replace(b'xmlns:u="urn', b'xmlns:v="urn'),  # u unbound
        MINIUPNPD.replace(b"203.0.113.1", b"203.0\r.113.1"),  # XML reads \r as \n
        MINIUPNPD.replace(b"GetExternalIPAddressResponse", b"GetStatusInfoResponse"),
        MINIUPNPD.replace(b'version="1.0"', b'version="1.0" encoding="cp037"'),
        MINIUPNPD.replace(b"</NewExternalIPAddress>", b"</NewExternalIPAddress><NewExternalIPAddress/>"),
        MINIUPNPD.replace(b"203.0.113.1", "203.0.113.\u0661".encode()),
    ],
    ids=["doctype", "char-ref", "comment", "unbound", "cr", "other-action", "ebcdic", "repeat", "non-ascii"],
)
def test_anything_less_plain_is_left_to_the_tree(data: bytes) -> None:
    assert igd._plain_response(data, "GetExternalIPAddressResponse") is None


names = st.sampled_from(["NewExternalIPAddress", "NewUptime", "a", "B.c-d", "_x", "u:Bar", "1bad", "xmlns"])
spaces = st.sampled_from(["", "", " ", "\r\n", "\t ", "  \n"])
texts = st.from_regex(r"[0-9. a-z]{0,12}", fullmatch=True) | st.text(
    alphabet=st.sampled_from("aZ09 .:-_&;#x<>\"'\t\n\r/=\u00e9"), max_size=12
)
GOOD_EA = f' xmlns:s="{ENVELOPE}" s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"'
GOOD_RA = f' xmlns:u="{SERVICE}"'


def mostly(good: str, *bad: str) -> st.SearchStrategy[str]:
    """`good` nine times in ten, else one of `bad`: each part right or wrong in one way at a time."""
    return (
        st.one_of(st.just(good), st.just(good), st.just(good), st.just(good), st.sampled_from(bad))
        if bad
        else st.just(good)
    )


@st.composite
def attributes(draw: st.DrawFn, good: str) -> str:
    extra = []
    for _ in range(draw(st.sampled_from([0] * 8 + [1, 2]))):
        name = draw(st.sampled_from(["xmlns:s", "xmlns:u", "xmlns:q", "xmlns", "s:encodingStyle", "u:x", "x",
                                     "q:x", "xmlns:xml", "a:b:c", "xmlns:xmlns", "encodingStyle"]))  # fmt: skip
        value = draw(st.sampled_from([ENVELOPE, SERVICE, "", "a<b", "a&amp;b", "x"]))
        quote = draw(st.sampled_from(['"', "'"]))
        extra.append(f"{draw(st.sampled_from([' ', '  ', chr(10)]))}{name}{draw(spaces)}={quote}{value}{quote}")
    kept = good if draw(st.sampled_from([True] * 9 + [False])) else ""
    return kept + "".join(extra)


@st.composite
def replies(draw: st.DrawFn) -> bytes:
    """Replies near miniupnpd's: each part drawn right, or wrong in one of the ways XML can be."""
    envelope = draw(mostly("s:Envelope", "Envelope", "q:Envelope", "xml:Envelope", "S:Envelope"))
    body = draw(mostly("s:Body", "Body", "u:Body", "q:Body"))
    response = draw(
        mostly(
            "u:GetExternalIPAddressResponse",
            "GetExternalIPAddressResponse",
            "q:GetExternalIPAddressResponse",
            "u:OtherResponse",
        )
    )
    children = []
    for _ in range(draw(st.integers(0, 3))):
        name = draw(mostly("NewExternalIPAddress", "NewUptime", "u:Bar", "1bad", "B.c-d", "xmlns"))
        form = draw(st.sampled_from([1] * 7 + [0, 2, 3]))
        if form == 0:
            children.append(f"{draw(spaces)}<{name}{draw(spaces)}/>")
        elif form == 1:
            children.append(f"{draw(spaces)}<{name}>{draw(texts)}</{name}{draw(spaces)}>")
        elif form == 2:
            children.append(f"<{name}><x>{draw(texts)}</x></{name}>")  # nested
        else:
            children.append(f"<{name}>{draw(texts)}</{draw(names)}>")  # maybe mismatched
    declaration = draw(
        mostly('<?xml version="1.0"?>\r\n', "", "<?xml version='1.0' encoding='UTF-8'?>", '<?xml version="1.1"?>',
               '<?xml version="1.0" encoding="latin-1"?>', "<?pi x?>", " ", '<?xml version="1.0" standalone="yes"?>')
    )  # fmt: skip
    ea, ba, ra = draw(attributes(GOOD_EA)), draw(attributes("")), draw(attributes(GOOD_RA))
    end_response = draw(mostly(response, "u:GetExternalIPAddressResponse", "GetExternalIPAddressResponse"))
    if draw(st.sampled_from([False] * 4 + [True])):  # <response/>, as miniupnpd answers AddPortMapping
        element = f"<{response}{ra}{draw(spaces)}/>"
    else:
        element = f"<{response}{ra}>{''.join(children)}</{end_response}{draw(spaces)}>"
    document = (
        f"{declaration}<{envelope}{ea}{draw(spaces)}>{draw(spaces)}<{body}{ba}>{draw(spaces)}"
        f"{element}{draw(spaces)}</{body}>{draw(spaces)}</{envelope}>{draw(spaces)}"
    )
    return document.encode(draw(mostly("ascii", "utf-8", "latin-1")), "replace")


@given(replies(), st.sampled_from([200, 200, 500]))
@settings(max_examples=1500, deadline=None)
def test_the_plain_reading_is_the_tree_s_wherever_it_answers(data: bytes, status: int) -> None:
    plain = igd._plain_response(data, "GetExternalIPAddressResponse")
    if plain is not None and status == 200:
        assert read(data, status, False) == ("outputs", plain)
    assert read(data, status, True) == read(data, status, False)


@given(st.binary(max_size=400))
@settings(max_examples=300, deadline=None)
def test_any_bytes_read_the_same_either_way(data: bytes) -> None:
    assert read(data, 200, True) == read(data, 200, False)


def test_the_plain_reading_is_taken_often_enough_to_be_tested() -> None:
    # The strategy above must reach the plain path, else the differential test proves nothing.
    seen: list[bool] = []

    @given(replies())
    @settings(max_examples=400, deadline=None, database=None, derandomize=True)
    def probe(data: bytes) -> None:
        seen.append(igd._plain_response(data, "GetExternalIPAddressResponse") is not None)

    probe()
    assert sum(seen) >= 20, sum(seen)


ADD_REPLY = (  # miniupnpd 2.3.1's answer to AddPortMapping, from the lab
    b'<?xml version="1.0"?>\r\n<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
    b's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body><u:AddPortMappingResponse '
    b'xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:1"/></s:Body></s:Envelope>\r\n'
)


def test_a_reply_without_out_arguments_is_read_without_a_tree_too() -> None:
    request = igd.SoapRequest("AddPortMapping", SERVICE)
    igd._KNOWN.clear()
    for _ in range(2):  # read in full, then known
        assert igd._plain_response(ADD_REPLY, "AddPortMappingResponse") == {}
        assert igd.parse_soap_response(ADD_REPLY, request, 200) == {}
    # Known whole: more after it is not the same reply, and the tree finds it malformed.
    longer = ADD_REPLY + b"<NewX>1</NewX>"
    assert igd._plain_response(longer, "AddPortMappingResponse") is None
    with pytest.raises(DecodeError):
        igd.parse_soap_response(longer, request, 200)


def test_a_known_envelope_reads_only_the_children_and_still_as_the_tree() -> None:
    igd._KNOWN.clear()
    assert igd._plain_response(MINIUPNPD, "GetExternalIPAddressResponse") is not None
    assert "GetExternalIPAddressResponse" in igd._KNOWN
    # Same envelope, other children: the short way, the same answer as the tree.
    other = MINIUPNPD.replace(b"203.0.113.1", b"198.51.100.7")
    assert igd._plain_response(other, "GetExternalIPAddressResponse") == {"NewExternalIPAddress": "198.51.100.7"}
    assert read(other, 200, True) == read(other, 200, False)
    # The same reply again is a comparison; each caller gets its own copy of the outputs.
    first = igd._plain_response(other, "GetExternalIPAddressResponse")
    assert first == {"NewExternalIPAddress": "198.51.100.7"}
    first["NewExternalIPAddress"] = "changed"
    assert igd._plain_response(other, "GetExternalIPAddressResponse") == {"NewExternalIPAddress": "198.51.100.7"}


@given(st.lists(st.tuples(names, texts, spaces), max_size=4), st.sampled_from(["", "&amp;", "<!-- c -->", "\r"]))
@settings(max_examples=500, deadline=None)
def test_children_in_a_known_envelope_read_as_the_tree_reads_them(
    children: list[tuple[str, str, str]], extra: str
) -> None:
    igd._plain_response(MINIUPNPD, "GetExternalIPAddressResponse")  # the envelope is known
    inner = "".join(f"{space}<{name}>{text}{extra}</{name}>" for name, text, space in children)
    data = MINIUPNPD.replace(
        b"<NewExternalIPAddress>203.0.113.1</NewExternalIPAddress>", inner.encode("utf-8", "replace")
    )
    plain = igd._plain_response(data, "GetExternalIPAddressResponse")
    if plain is not None:
        assert read(data, 200, False) == ("outputs", plain)
    assert read(data, 200, True) == read(data, 200, False)
