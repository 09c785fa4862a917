"""The architecture, checked from the code's own imports: layers only point down, and the sans-IO cores
stay free of I/O (DESIGN-NOTES: cli -> daemon -> service -> engine -> aio -> sip / values -> proto)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "autonat"

# Lower number = lower layer. A module may import only from its own layer or below.
LAYERS: dict[str, int] = {
    "proto": 0,
    "errors": 0,
    "addresses": 0,
    "limits": 0,
    "version": 0,
    "sip": 1,
    "mapper": 1,
    "portmapper": 1,
    "advertise": 1,
    "acl": 1,
    "state": 1,
    "aio": 2,
    "engine": 3,
    "service": 4,
    "doctor": 4,  # a tool beside the service: uses the protocol clients and the journal
    "web": 5,  # under the daemon: only daemon/run.py (and daemon/config.py, for its settings) import it
    "lab": 5,  # the lab is a tool beside the daemon: it uses only the values below
    "daemon": 6,
    "cli": 7,
    "__main__": 8,
    "__init__": 0,  # the package face: its public names (and __version__) are imported on first use
}
# Sans-IO cores: no asyncio, no sockets, no threads, no clock (time is an argument).
CORES = [
    "engine/lifecycle.py",
    "engine/schedule.py",
    "limits.py",
    "sip/admission.py",
    "sip/guard.py",
    "doctor/findings.py",
    "sip/core.py",
    "sip/dialog.py",
    "sip/session.py",
    "sip/ice.py",
    "sip/rtp.py",
    "sip/probecall.py",
    "aio/upnp_core.py",  # the UPnP client's decisions, for the asyncio and the blocking shell
    "proto/record.py",
]
IO_MODULES = {"asyncio", "socket", "selectors", "threading", "time", "sqlite3", "subprocess", "ssl"}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(relative.parts).removesuffix(".__init__")
        found[name] = path
    return found


def imports_of(path: Path) -> set[str]:
    """Every module name an `import` or `from ... import` in the file names (lazy imports included)."""
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def layer_of(module: str) -> int:
    part = module.split(".")[1] if "." in module else "__init__"
    return LAYERS[part]


def test_every_module_has_a_layer() -> None:
    unknown = sorted({m.split(".")[1] for m in modules() if "." in m} - set(LAYERS))
    assert not unknown, f"modules without a layer in this test: {unknown}"


def test_no_import_runs_from_a_lower_layer_to_a_higher_one() -> None:
    known = modules()
    upward = []
    for module, path in known.items():
        if module == "autonat":
            # The package face re-exports the public API of every layer, but only on first use of a
            # name (PEP 562) and for type checkers: `import autonat` loads no submodule at all
            # (tests/unit/test_cli_lazy.py), and no module imports the face (checked below).
            continue
        for name in imports_of(path):
            if name in known and layer_of(name) > layer_of(module):
                upward.append(f"{module} (layer {layer_of(module)}) imports {name} (layer {layer_of(name)})")
    assert not upward, "\n".join(upward)


def test_no_module_imports_the_package_face() -> None:
    """`autonat` re-exports every layer, so importing it from inside the package would be an arrow up
    (the version string lives in autonat/version.py for that reason)."""
    known = modules()
    offenders = sorted(m for m, path in known.items() if m != "autonat" and "autonat" in imports_of(path))
    assert not offenders, offenders


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The test above would notice one: an engine module importing the service is caught."""
    probe = tmp_path / "probe.py"
    probe.write_text("from autonat.service.sip import SipService\n")
    assert "autonat.service.sip" in imports_of(probe)
    assert layer_of("autonat.service.sip") > layer_of("autonat.engine.lifecycle")


@pytest.mark.parametrize("core", CORES)
def test_a_sans_io_core_imports_no_io_and_reads_no_clock(core: str) -> None:
    known = modules()
    start = ".".join(("autonat", *Path(core).with_suffix("").parts))
    seen, todo = {start}, [start]
    while todo:  # the core and every autonat module it pulls in
        for name in imports_of(known[todo.pop()]):
            if name in known and name not in seen:
                seen.add(name)
                todo.append(name)
    own = {name.split(".")[0] for name in imports_of(known[start])}
    assert not own & IO_MODULES, f"{core} imports {sorted(own & IO_MODULES)}"
    for name in sorted(seen):
        pulled = {n.split(".")[0] for n in imports_of(known[name])} & {"asyncio", "socket", "selectors", "threading"}
        assert not pulled, f"{core} pulls in {name}, which imports {sorted(pulled)}"
    source = (PACKAGE / core).read_text()
    for clock in ("time.time(", "time.monotonic(", "loop.time(", "get_running_loop("):
        assert clock not in source, f"{core} reads a clock: {clock}"
