"""autonat: FreeSWITCH-style auto-nat for any service.

Finds the home router, learns the public address through PCP (RFC 6887), NAT-PMP (RFC 6886) or UPnP
IGD, and opens the port mappings a service needs. Everything a program needs is importable from here:

    import autonat

    # asyncio: one session with the router, every protocol
    async with await autonat.RouterSession.open() as router:
        probe = await router.probe()                    # PCP, NAT-PMP, UPnP in one burst
        mapping = await router.add(autonat.MappingRequest(autonat.Transport.UDP, 5060, lifetime=3600))
        await router.remove(mapping)

    # no event loop: PCP, NAT-PMP (and UPnP IGD) on blocking sockets
    with autonat.open_router() as router:
        mapping = router.add(autonat.MappingRequest(autonat.Transport.UDP, 5060, lifetime=3600))
        router.remove(mapping)
    print(autonat.external_address())

    # the engine: keeps mappings alive, renews them, re-makes what the router lost
    engine = autonat.NatEngine(autonat.NatSettings())
    await engine.start([autonat.Wanted(autonat.Transport.UDP, 5060)])
    async for event in engine.events.subscribe():
        print(event.to_dict())

Each name is imported on first use (PEP 562), so `import autonat` costs nothing and a PCP request
never loads the UPnP, HTTP or XML modules; `dir(autonat)` and `__all__` list them all. Errors are
subclasses of `AutonatError`, each one line fit for a user.
"""

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy treats the name alike)
if TYPE_CHECKING:
    from autonat.addresses import AddressKind, classify, is_public
    from autonat.aio.blocking import BlockingSession, external_address, open_router
    from autonat.aio.route import RouterLocation, locate_router
    from autonat.aio.router import ProbeResult, ProtocolChoice, RouterSession
    from autonat.engine.engine import EngineStatus, MappingStatus, NatEngine, Wanted
    from autonat.engine.events import Event, EventKind
    from autonat.engine.settings import NatSettings
    from autonat.errors import (
        AutonatError,
        NotPublic,
        ProtocolUnavailable,
        RouterNotFound,
        RouterRefused,
        RouterTimeout,
        RouterUnreachable,
    )
    from autonat.mapper import DEFAULT_LIFETIME, Mapping, MappingRequest, ProtocolStatus
    from autonat.portmapper import PortMapper
    from autonat.proto.types import Transport
    from autonat.version import __version__

# Public name -> the module that defines it. A new public name is added here and to `__all__`.
_EXPORTS = {
    "RouterSession": "autonat.aio.router",
    "ProbeResult": "autonat.aio.router",
    "ProtocolChoice": "autonat.aio.router",
    "BlockingSession": "autonat.aio.blocking",
    "open_router": "autonat.aio.blocking",
    "external_address": "autonat.aio.blocking",
    "RouterLocation": "autonat.aio.route",
    "locate_router": "autonat.aio.route",
    "Mapping": "autonat.mapper",
    "MappingRequest": "autonat.mapper",
    "PortMapper": "autonat.portmapper",
    "ProtocolStatus": "autonat.mapper",
    "DEFAULT_LIFETIME": "autonat.mapper",
    "Transport": "autonat.proto.types",
    "NatEngine": "autonat.engine.engine",
    "Wanted": "autonat.engine.engine",
    "EngineStatus": "autonat.engine.engine",
    "MappingStatus": "autonat.engine.engine",
    "NatSettings": "autonat.engine.settings",
    "Event": "autonat.engine.events",
    "EventKind": "autonat.engine.events",
    "AddressKind": "autonat.addresses",
    "classify": "autonat.addresses",
    "is_public": "autonat.addresses",
    "AutonatError": "autonat.errors",
    "RouterNotFound": "autonat.errors",
    "RouterTimeout": "autonat.errors",
    "RouterUnreachable": "autonat.errors",
    "RouterRefused": "autonat.errors",
    "NotPublic": "autonat.errors",
    "ProtocolUnavailable": "autonat.errors",
    "__version__": "autonat.version",
}

__all__ = [
    "DEFAULT_LIFETIME",
    "AddressKind",
    "AutonatError",
    "BlockingSession",
    "EngineStatus",
    "Event",
    "EventKind",
    "Mapping",
    "MappingRequest",
    "MappingStatus",
    "NatEngine",
    "NatSettings",
    "NotPublic",
    "PortMapper",
    "ProbeResult",
    "ProtocolChoice",
    "ProtocolStatus",
    "ProtocolUnavailable",
    "RouterLocation",
    "RouterNotFound",
    "RouterRefused",
    "RouterSession",
    "RouterTimeout",
    "RouterUnreachable",
    "Transport",
    "Wanted",
    "__version__",
    "classify",
    "external_address",
    "is_public",
    "locate_router",
    "open_router",
]


def __getattr__(name: str) -> object:
    """Import a public name's module on first use (PEP 562) and keep the name here."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'autonat' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
