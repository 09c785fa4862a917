"""The UPnP client's decisions, sans-IO (aio/upnp_core.py), driven by hand with a fake clock: what search
replies offer, which IGD a discovery ends with and when, what an IGD is worth, and the AddPortMapping
error matrix and the one-call delete, shared by the asyncio and the blocking client."""

from __future__ import annotations

from collections.abc import Callable, Generator
from ipaddress import IPv4Address, IPv4Network
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autonat.aio import upnp_core as core
from autonat.errors import NotPublic, ProtocolUnavailable, RouterRefused, RouterTimeout, RouterUnreachable
from autonat.mapper import Mapping, MappingRequest
from autonat.proto import igd
from autonat.proto.types import Transport
from tests.fakes.igd_server import PPP_SERVICE, SERVICE, description
from tests.unit.test_architecture import IO_MODULES, PACKAGE, imports_of
from tests.unit.test_ssdp import MINIUPNPD_RESPONSE

T = TypeVar("T")
GATEWAY = IPv4Address("192.168.77.1")
LAN = IPv4Network("192.168.77.0/24")
LOCAL = IPv4Address("192.168.77.10")
ROOT = "http://192.168.77.1:5000/rootDesc.xml"
SECRET = b"s" * 32


def test_the_core_does_no_io_and_reads_no_clock() -> None:
    for name in ("aio/upnp_core.py", "proto/httpwire.py"):
        imported = {module.split(".")[0] for module in imports_of(PACKAGE / name)}
        assert not imported & IO_MODULES, (name, imported & IO_MODULES)


# --- what search replies offer -------------------------------------------------------------------------


def _reply(location: bytes) -> bytes:
    return MINIUPNPD_RESPONSE.replace(b"http://192.168.77.1:5000/rootDesc.xml", location)


def test_a_refused_location_is_offered_once_with_its_reason_and_a_repeat_is_not_news() -> None:
    offers = core.Offers(GATEWAY, LAN)
    got = [offers.received(_reply(b"http://127.0.0.1:5000/rootDesc.xml"), GATEWAY) for _ in range(3)]
    assert isinstance(got[0], core.RefusedOffer) and got[1:] == [None, None]
    assert "127.0.0.1" in got[0].reason
    found = offers.received(MINIUPNPD_RESPONSE, GATEWAY)
    assert isinstance(found, core.Offer) and found.location.url == ROOT
    assert offers.received(MINIUPNPD_RESPONSE, IPv4Address("192.168.77.66")) is None  # the same URL: fetched once


def test_what_one_host_and_all_hosts_can_offer_is_bounded() -> None:
    offers = core.Offers(GATEWAY, LAN)
    one = [
        offers.received(_reply(b"http://192.168.77.66:%d/d.xml" % p), IPv4Address("192.168.77.66")) for p in range(100)
    ]
    assert sum(item is not None for item in one) == core.MAX_LOCATIONS_PER_RESPONDER
    many = [
        offers.received(_reply(b"http://192.168.77.%d:80/d.xml" % host), IPv4Address(f"192.168.77.{host}"))
        for host in range(100, 200)
    ]
    assert sum(item is not None for item in many) == core.MAX_CANDIDATES - core.MAX_LOCATIONS_PER_RESPONDER
    assert offers.drops["too many LOCATIONs offered; the rest ignored"] == 96 + 88


@given(st.lists(st.tuples(st.integers(1, 254), st.binary(max_size=300)), max_size=60))
@settings(max_examples=200)
def test_whatever_the_lan_sends_the_offers_are_bounded_safe_and_printable(datagrams: list[tuple[int, bytes]]) -> None:
    offers = core.Offers(GATEWAY, LAN)
    handed: list[core.Offer | core.RefusedOffer] = []
    for host, data in datagrams:
        # Half whole junk, half a real reply around a junk LOCATION: both must end in None or an offer.
        for datagram in (data, _reply(data)):
            item = offers.received(datagram, IPv4Address(f"192.168.77.{host}"))
            if item is not None:
                handed.append(item)
    assert len(handed) <= core.MAX_CANDIDATES
    for item in handed:
        if isinstance(item, core.RefusedOffer):
            assert item.location.isprintable() and "\n" not in item.reason
        else:
            assert item.location.host in (item.responder, GATEWAY)


# --- which IGD a discovery ends with, and when (fake clock) ----------------------------------------------


def _igd(external: str | None = "203.0.113.1", status: str = "Connected", responder: str = "192.168.77.1") -> core.Igd:
    desc = igd.parse_device_description(description("192.168.77.1"), ROOT)
    return core.Igd(
        ROOT,
        responder,
        desc,
        desc.connection_services()[0],
        frozenset(),
        None if external is None else IPv4Address(external),
        igd.StatusInfo(status, "ERROR_NONE", 1),
    )


def _offer(url: str = ROOT, responder: IPv4Address = GATEWAY) -> core.Offer:
    from autonat.proto import ssdp

    return core.Offer(
        ssdp.validate_location(url, responder=responder, gateway=GATEWAY, local_network=LAN), responder, "st", None
    )


def test_the_best_possible_igd_ends_the_search_at_once() -> None:
    discovery = core.Discovery("192.168.77.1", now=100.0, deadline=2.0)
    candidate = discovery.offered(_offer(), 100.001)
    assert discovery.found(candidate, _igd(), 100.003) is True
    assert discovery.result(100.003) is discovery.best and candidate.outcome == core.USABLE


def test_a_lesser_igd_opens_the_collection_window_and_the_best_ranked_wins() -> None:
    discovery = core.Discovery("192.168.77.1", now=100.0, deadline=2.0)
    private = _igd(external="10.0.0.2")
    assert discovery.found(discovery.offered(_offer(), 100.0), private, 100.01) is False
    assert discovery.window_end == pytest.approx(100.01 + core.COLLECT_WINDOW)
    other = _offer("http://192.168.77.2:80/d.xml", IPv4Address("192.168.77.2"))
    public_elsewhere = _igd(responder="192.168.77.2")
    assert discovery.found(discovery.offered(other, 100.05), public_elsewhere, 100.06) is False  # not the gateway
    assert discovery.result(discovery.window_end) is public_elsewhere  # (0, 1) beats (1, 0)


def test_a_failure_opens_the_failure_window_and_the_error_names_each_candidate() -> None:
    discovery = core.Discovery("192.168.77.1", now=100.0, deadline=2.0)
    discovery.refused(core.RefusedOffer("http://127.0.0.1/x", GATEWAY, "LOCATION is loopback"), 100.0)
    assert discovery.window_end == pytest.approx(100.0 + core.FAILED_WINDOW)
    discovery.failed(discovery.offered(_offer(), 100.1), RouterRefused("boom", protocol="upnp", code=0), 100.2)
    stuck = discovery.offered(_offer("http://192.168.77.3:80/d.xml", IPv4Address("192.168.77.3")), 100.3)
    with pytest.raises(ProtocolUnavailable) as info:
        discovery.result(100.7)
    assert str(info.value) == (
        "no usable IGD answered SSDP (192.168.77.1 offered LOCATION http://127.0.0.1/x, refused: LOCATION is"
        f" loopback; {ROOT}: boom; http://192.168.77.3:80/d.xml, unfinished after 0.4 s)"
    )
    assert stuck.outcome == core.UNFINISHED


def test_at_the_deadline_it_is_a_timeout_and_an_unreachable_gateway_ends_it_after_a_grace() -> None:
    silent = core.Discovery("192.168.77.1", now=0.0, deadline=2.0)
    with pytest.raises(RouterTimeout, match=r"^no usable IGD answered SSDP within 2 s$"):
        silent.result(2.0)
    stopped = core.Discovery("192.168.77.1", now=0.0, deadline=2.0)
    stopped.gateway_unreachable(0.001)
    assert stopped.window_end == pytest.approx(0.001 + core.UNREACHABLE_GRACE)
    with pytest.raises(RouterUnreachable, match="answered SSDP with ICMP port unreachable"):
        stopped.result(stopped.window_end)
    inspecting = core.Discovery("192.168.77.1", now=0.0, deadline=2.0)
    inspecting.offered(_offer(), 0.0)
    inspecting.gateway_unreachable(0.001)
    assert inspecting.window_end == pytest.approx(0.001 + core.FAILED_WINDOW)


# --- what an IGD is worth ----------------------------------------------------------------------------------


def _outputs(**values: str) -> dict[str, str]:
    return dict(values)


def run_inspection(body: bytes, answer: Callable[[core.Step], Any]) -> tuple[core.Igd, list[tuple[core.Step, ...]]]:
    steps = core.inspect(ROOT, "192.168.77.1")
    batches = [next(steps)]
    assert batches[0] == (core.Fetch(ROOT, igd.MAX_DESCRIPTION_SIZE),)
    try:
        batch = steps.send((body,))
        while True:
            batches.append(batch)
            batch = steps.send(tuple(answer(step) for step in batch))
    except StopIteration as stop:
        return stop.value, batches


def test_the_first_connected_service_is_chosen_its_three_questions_asked_at_once() -> None:
    body = description("192.168.77.1", services=((PPP_SERVICE, "/ctl/PPP"), (SERVICE, "/ctl/IPConn")))

    def answer(step: core.Step) -> Any:
        if isinstance(step, core.Fetch):
            return b"<scpd><actionList><action><name>AddAnyPortMapping</name></action></actionList></scpd>"
        if step.request.action == "GetStatusInfo":
            up = step.service.control_url.endswith("/ctl/PPP")  # WANIPConnection ranks first, and is down
            return _outputs(NewConnectionStatus="Connected" if up else "Disconnected", NewUptime="5")
        return _outputs(NewExternalIPAddress="203.0.113.1")

    found, batches = run_inspection(body, answer)
    assert [len(batch) for batch in batches] == [1, 3, 3]  # description; then status, address, SCPD per service
    assert found.service.control_url.endswith("/ctl/PPP") and found.connected
    assert found.skipped == ((SERVICE, "Disconnected"),)
    assert found.actions == frozenset({"AddAnyPortMapping"}) and found.external_ip == IPv4Address("203.0.113.1")


def test_optional_answers_may_fail_but_a_timeout_of_the_address_ends_the_inspection() -> None:
    body = description("192.168.77.1")
    timeout = RouterTimeout("router did not answer")

    def lenient(step: core.Step) -> Any:
        return RouterRefused("no", protocol="upnp", code=0) if isinstance(step, core.Fetch) else igd.UpnpError(501)

    found, _ = run_inspection(body, lenient)
    assert (found.actions, found.status, found.external_ip) == (frozenset(), None, None)
    with pytest.raises(RouterTimeout):
        run_inspection(body, lambda step: timeout if isinstance(step, core.Call) else b"")


def test_an_unusable_description_says_so() -> None:
    with pytest.raises(RouterRefused, match="description is unusable"):
        run_inspection(b"<not xml", lambda step: None)
    with pytest.raises(RouterTimeout):
        steps = core.inspect(ROOT, "192.168.77.1")
        next(steps)
        steps.send((RouterTimeout("hang"),))


# --- port mappings ------------------------------------------------------------------------------------------


def drive(
    steps: Generator[igd.SoapRequest, dict[str, str], T], answer: Callable[[igd.SoapRequest], dict[str, str]]
) -> tuple[T, list[igd.SoapRequest]]:
    """Run a mapping operation as a shell would: `answer` returns the outputs or raises."""
    sent: list[igd.SoapRequest] = []
    try:
        request = next(steps)
        while True:
            sent.append(request)
            try:
                outputs = answer(request)
            except (igd.UpnpError, RouterRefused, RouterTimeout) as exc:
                request = steps.throw(exc)
            else:
                request = steps.send(outputs)
    except StopIteration as stop:
        return stop.value, sent


def args(request: igd.SoapRequest) -> dict[str, str]:
    return dict(request.arguments)


def faults(*codes: int) -> Callable[[igd.SoapRequest], dict[str, str]]:
    """Answer each AddPortMapping with the next fault code (0: success), everything else with success."""
    queue = list(codes)

    def answer(request: igd.SoapRequest) -> dict[str, str]:
        if request.action.startswith("Add") and queue:
            code = queue.pop(0)
            if code:
                raise igd.UpnpError(code)
        if request.action == "AddAnyPortMapping":
            return {"NewReservedPort": "40000"}
        return {}

    return answer


def test_a_mapping_is_one_add_for_our_own_address_with_our_tag() -> None:
    mappings = core.Mappings(SECRET, LOCAL)
    mapping, sent = drive(mappings.add(_igd(), MappingRequest(Transport.UDP, 5060, lifetime=600), 10.0), faults())
    assert [r.action for r in sent] == ["AddPortMapping"]
    sent_args = args(sent[0])
    assert sent_args["NewInternalClient"] == "192.168.77.10" and sent_args["NewLeaseDuration"] == "600"
    assert sent_args["NewPortMappingDescription"] == f"autonat:{mappings.tag} 5060/udp"
    assert mapping == Mapping("upnp", Transport.UDP, LOCAL, 5060, IPv4Address("203.0.113.1"), 5060, 600)
    assert mappings.made[(Transport.UDP, 5060)] == (5060, 610.0)


def test_conflicts_move_to_the_secret_s_port_sequence_and_any_port_where_listed() -> None:
    mappings = core.Mappings(SECRET, LOCAL)
    sequence = core.alternative_ports(SECRET, Transport.UDP, 5060)
    expected = [5060, next(sequence), next(sequence)]
    mapping, sent = drive(mappings.add(_igd(), MappingRequest(Transport.UDP, 5060), 0.0), faults(718, 729, 0))
    assert [int(args(r)["NewExternalPort"]) for r in sent] == expected and mapping.external_port == expected[2]
    igd2 = _igd()
    igd2 = core.Igd(
        igd2.root_url,
        igd2.responder,
        igd2.description,
        igd2.service,
        frozenset({"AddAnyPortMapping"}),
        igd2.external_ip,
        igd2.status,
    )
    mapping, sent = drive(
        core.Mappings(SECRET, LOCAL).add(igd2, MappingRequest(Transport.UDP, 5060), 0.0), faults(718, 0)
    )
    assert [r.action for r in sent] == ["AddPortMapping", "AddAnyPortMapping"] and mapping.external_port == 40000


def test_permanent_leases_only_after_the_address_checked_out() -> None:
    """725 (MikroTik RouterOS, Netgear R7000P, ZyXEL VMG1312: docs/QUIRKS.md U1)."""
    mapping, sent = drive(
        core.Mappings(SECRET, LOCAL).add(_igd(), MappingRequest(Transport.TCP, 80), 0.0), faults(725, 0)
    )
    assert [args(r)["NewLeaseDuration"] for r in sent] == ["7200", "0"] and mapping.lifetime == 0
    with pytest.raises(NotPublic, match="is not public"):
        drive(core.Mappings(SECRET, LOCAL).add(_igd("10.1.1.1"), MappingRequest(Transport.TCP, 80), 0.0), faults(725))
    with pytest.raises(RouterRefused, match="even to a permanent lease"):
        drive(core.Mappings(SECRET, LOCAL).add(_igd(), MappingRequest(Transport.TCP, 80), 0.0), faults(725, 725))


@given(st.lists(st.sampled_from([0, 402, 501, 606, 716, 718, 724, 725, 727, 728, 729, 999]), max_size=40))
@settings(max_examples=300)
def test_whatever_the_router_answers_an_add_ends_in_a_mapping_or_one_line_within_bounds(codes: list[int]) -> None:
    try:
        mapping, sent = drive(
            core.Mappings(SECRET, LOCAL).add(_igd(), MappingRequest(Transport.UDP, 5060, lifetime=60), 0.0),
            faults(*codes),
        )
    except (RouterRefused, NotPublic) as exc:
        assert "\n" not in str(exc)
    else:
        assert mapping.external_port > 0 and len(sent) <= core.MAX_ATTEMPTS * 2


def test_a_mapping_we_made_is_deleted_in_one_call_until_its_lease_runs_out() -> None:
    mappings = core.Mappings(SECRET, LOCAL)
    found = _igd()
    drive(mappings.add(found, MappingRequest(Transport.UDP, 5060, lifetime=600), 1000.0), faults(718, 0))
    external = mappings.made[(Transport.UDP, 5060)][0]
    _, sent = drive(mappings.delete(found, Transport.UDP, 5060, now=1599.0), faults())
    assert [(r.action, args(r)["NewExternalPort"]) for r in sent] == [("DeletePortMapping", str(external))]
    assert (Transport.UDP, 5060) not in mappings.made

    drive(mappings.add(found, MappingRequest(Transport.UDP, 5060, lifetime=600), 1000.0), faults())

    def table(request: igd.SoapRequest) -> dict[str, str]:
        if request.action == "GetSpecificPortMappingEntry":
            return {
                "NewInternalPort": "5060",
                "NewInternalClient": "192.168.77.10",
                "NewEnabled": "1",
                "NewPortMappingDescription": "x",
                "NewLeaseDuration": "10",
            }
        return {}

    _, sent = drive(mappings.delete(found, Transport.UDP, 5060, now=1600.0), table)  # the lease ran out: look first
    assert [r.action for r in sent] == ["GetSpecificPortMappingEntry", "DeletePortMapping"]


def test_a_delete_by_internal_port_leaves_another_host_s_mapping_alone() -> None:
    def table(request: igd.SoapRequest) -> dict[str, str]:
        if request.action == "GetSpecificPortMappingEntry":
            return {
                "NewInternalPort": "5060",
                "NewInternalClient": "192.168.77.99",
                "NewEnabled": "1",
                "NewPortMappingDescription": "x",
                "NewLeaseDuration": "10",
            }
        if request.action == "GetGenericPortMappingEntry":
            if args(request)["NewPortMappingIndex"] == "0":
                return {
                    "NewRemoteHost": "",
                    "NewExternalPort": "6000",
                    "NewProtocol": "UDP",
                    "NewInternalPort": "5060",
                    "NewInternalClient": "192.168.77.10",
                    "NewEnabled": "1",
                    "NewPortMappingDescription": "x",
                    "NewLeaseDuration": "10",
                }
            raise igd.UpnpError(713)
        return {}

    _, sent = drive(core.Mappings(SECRET, LOCAL).delete(_igd(), Transport.UDP, 5060, now=0.0), table)
    assert [r.action for r in sent] == [
        "GetSpecificPortMappingEntry",
        "GetGenericPortMappingEntry",
        "GetGenericPortMappingEntry",
        "DeletePortMapping",
    ]
    assert args(sent[-1])["NewExternalPort"] == "6000"  # ours, found in the table; port 5060 is another host's


def test_a_delete_of_what_is_gone_is_success_and_other_faults_are_one_line() -> None:
    def gone(request: igd.SoapRequest) -> dict[str, str]:
        raise igd.UpnpError(714)

    assert drive(core.Mappings(SECRET, LOCAL).delete_external(_igd(), Transport.TCP, 80), gone)[0] is None

    def refused(request: igd.SoapRequest) -> dict[str, str]:
        raise igd.UpnpError(606)

    with pytest.raises(RouterRefused, match=r"^router refused DeletePortMapping tcp 80: "):
        drive(core.Mappings(SECRET, LOCAL).delete_external(_igd(), Transport.TCP, 80), refused)


def test_the_external_address_request_is_built_once() -> None:
    mappings = core.Mappings(SECRET, LOCAL)
    found = _igd()
    assert mappings.external_ip_request(found) is mappings.external_ip_request(found)
    address, _ = drive(mappings.external_ip(found), lambda r: {"NewExternalIPAddress": "198.51.100.4"})
    assert address == IPv4Address("198.51.100.4")
    with pytest.raises(RouterRefused, match="external address is malformed"):
        drive(mappings.external_ip(found), lambda r: {"NewExternalIPAddress": "nonsense"})
