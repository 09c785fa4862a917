"""`Record`, the dataclass stand-in of the cold path (autonat.proto.record): what a frozen dataclass gives."""

from __future__ import annotations

import copy
import pickle
from ipaddress import IPv4Address

import pytest

from autonat.mapper import Mapping, MappingRequest, ProtocolStatus
from autonat.proto.natpmp import MapResponse
from autonat.proto.record import FrozenInstanceError, from_wire
from autonat.proto.types import Transport


def test_records_compare_hash_and_print_by_their_fields_in_constructor_order() -> None:
    a = MappingRequest(Transport.UDP, 5060, lifetime=600)
    assert a == MappingRequest(Transport.UDP, 5060, 0, 600) and hash(a) == hash(
        MappingRequest(Transport.UDP, 5060, 0, 600)
    )
    assert a != MappingRequest(Transport.UDP, 5061, lifetime=600)
    assert a != (Transport.UDP, 5060, 0, 600)  # not a tuple
    assert (
        repr(a) == "MappingRequest(transport=<Transport.UDP: 'udp'>, internal_port=5060, external_port=0, lifetime=600)"
    )
    assert len({a, MappingRequest(Transport.UDP, 5060, lifetime=600)}) == 1


def test_records_are_frozen_and_replace_checks_again() -> None:
    a = MappingRequest(Transport.UDP, 5060)
    with pytest.raises(FrozenInstanceError):
        a.internal_port = 1
    with pytest.raises(FrozenInstanceError):
        del a.lifetime
    assert a.replace(lifetime=60) == MappingRequest(Transport.UDP, 5060, lifetime=60)
    with pytest.raises(ValueError, match="internal port"):
        a.replace(internal_port=0)
    with pytest.raises(TypeError, match="no field 'port'"):
        a.replace(port=1)


def test_records_survive_pickle_and_copy() -> None:
    mapping = Mapping("pcp", Transport.TCP, IPv4Address("192.168.1.2"), 5061, IPv4Address("203.0.113.1"), 5061, 7200, 9)
    assert pickle.loads(pickle.dumps(mapping)) == mapping  # noqa: S301 (our own bytes, just made)
    assert copy.copy(mapping) is mapping and copy.deepcopy(mapping) is mapping
    status = ProtocolStatus("pcp", True, "ok")
    assert status.details == {} and status.details is not ProtocolStatus("pcp", True, "ok").details


def test_from_wire_builds_without_the_callers_checks() -> None:
    reply = from_wire(MapResponse, Transport.UDP, 0, 5, 5060, 6000, 3600)
    assert reply == MapResponse(Transport.UDP, 0, 5, 5060, 6000, 3600)
    assert reply.external_port == 6000


def test_every_record_class_names_each_field_once_in_slots_and_init() -> None:
    """init_fields trusts the class: one value per field, in `_fields` order, which is `__init__`'s order."""
    import importlib
    import inspect
    import pkgutil

    import autonat
    from autonat.proto.record import Record

    for module in pkgutil.walk_packages(autonat.__path__, "autonat."):
        if not module.name.startswith(("autonat.lab", "autonat.__main__")):
            importlib.import_module(module.name)
    classes: list[type[Record]] = []
    pending: list[type[Record]] = [Record]
    while pending:
        for sub in pending.pop().__subclasses__():
            classes.append(sub)
            pending.append(sub)
    assert len(classes) >= 15
    for cls in classes:
        assert cls.__slots__ == cls._fields and len(set(cls._fields)) == len(cls._fields), cls
        assert len(cls._setters) == len(cls._fields), cls
        parameters = list(inspect.signature(cls.__init__).parameters)[1:]
        if cls._fields:
            assert tuple(parameters) == cls._fields, cls
