"""Frozen value classes for the cold path, without `dataclasses`.

`@dataclass(frozen=True, slots=True)` is what autonat uses for values everywhere else, but importing
`dataclasses` costs a one-shot script about 11 ms on CPython 3.11 (it imports `inspect`, hence `ast`,
`dis`, `tokenize`...) and each decorated class another 0.4 ms of generated code, together more than the
whole NAT-PMP exchange and the rest of the import (bench/peers.py: "cold script"). The few values a
blocking NAT-PMP request needs (the NAT-PMP codec, `MappingRequest`/`Mapping`, the retransmission
schedule, the router's location, the netlink answers) therefore derive from `Record`: the class names
its fields in `_fields`, in constructor order, sets `__slots__ = _fields` (by name: a linter sorting a
literal `__slots__` must not reorder them) and writes its `__init__` with `init_fields`; `Record` gives
what the dataclass would have: equality and hash by field values and type, a repr naming every field,
no assignment after construction, and `replace()`.
"""

from __future__ import annotations

from itertools import repeat
from operator import call

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy treats the name alike)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, Self, TypeVar

    T = TypeVar("T", bound="Record")


class FrozenInstanceError(AttributeError):
    """Assignment to a field of a `Record` (as dataclasses.FrozenInstanceError for a frozen dataclass)."""


class Record:
    _fields: tuple[str, ...] = ()  # the fields in constructor order; each subclass sets __slots__ = _fields
    _setters: tuple[Callable[[Any, Any], None], ...] = ()  # each field's slot setter, in that order
    __slots__ = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The slots' own setters, found once per class: setting a field through them is about twice as
        # fast as object.__setattr__ by name, and a reply builds a few records.
        cls._setters = tuple(getattr(cls, name).__set__ for name in cls._fields)

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Record)
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash((self.__class__, self._values()))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{self.__class__.__name__}({fields})"

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __copy__(self) -> Self:
        return self  # immutable

    def __deepcopy__(self, memo: dict[int, Any]) -> Self:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, self._values())

    def replace(self, **changes: Any) -> Self:
        """A copy with `changes` (field name -> value), checked by the class's constructor again."""
        values: dict[str, Any] = {name: getattr(self, name) for name in self._fields}
        unknown = changes.keys() - values.keys()
        if unknown:
            raise TypeError(f"{self.__class__.__name__} has no field {sorted(unknown)[0]!r}")
        values.update(changes)
        return self.__class__(**values)


def init_fields(instance: Record, *values: Any) -> None:
    """Set `instance`'s fields, in `_fields` order, from its `__init__` (fields cannot be assigned).
    Every field must get a value (tests/unit/test_record.py checks each Record class: map stops at the
    shorter, as zip without strict would). Each setter is called from C (`any` of their Nones), without a
    bytecode loop: a fifth less per record, and every request and reply builds a few."""
    any(map(call, instance._setters, repeat(instance), values))


def from_wire(cls: type[T], *values: Any) -> T:
    """An instance of the Record `cls` from fields just decoded off the wire, in field order, without its
    `__init__`: a fixed-width unsigned field is in range by construction and the decoder has checked the
    rest, so the checks meant for a caller's values would only cost time on every reply (bench/peers.py).
    Also for values built from such fields and already checked ones (a Mapping from a reply, a request
    whose arguments were checked once): every field, in order, and nothing `__init__` would change."""
    instance = object.__new__(cls)
    any(map(call, cls._setters, repeat(instance), values))  # as in init_fields
    return instance
