"""autonat against the Python libraries a user would pick instead, and against itself before this tree.

One lab run (prefix `bp`, needs root): miniupnpc's Python binding, async-upnp-client, nat-pmp and
upnpclient (installed in the bench's own venv, bench/.venv, never as autonat's dependencies), autonat
from this tree (with asyncio's loop and with uvloop), autonat as committed at `--before` (default HEAD),
and the raw exchanges (blocking, and through an event loop: the floor of an asyncio program), each in its
own process, interleaved round by round (the order rotates) so machine noise hits all of them alike.
Then, as processes: the cold script (import + NAT-PMP external address) and the RSS of a process holding
one mapping; then the router stopped (ICMP port unreachable) and silent (all datagrams dropped). Prints
medians and the ratios autonat / peer (below 1: autonat is faster).

    .venv/bin/python bench/peers.py [--rounds 200] [--before REF] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENV = BENCH / ".venv"
PEERS = ["miniupnpc==2.3.3", "async-upnp-client==0.49.0", "nat-pmp==1.3.2", "upnpclient==2.0.3", "uvloop==0.23.0"]
PREFIX = "bp"
GATEWAY = "192.168.77.1"
ME = "autonat"
BEFORE = "autonat (before)"
BLOCKING = "autonat blocking"

# name -> (contestant in bench/_contestants.py, which source tree: "now", "before" or None)
CONTESTANTS: dict[str, tuple[str, str | None]] = {
    ME: ("autonat", "now"),
    "autonat+uvloop": ("autonat+uvloop", "now"),
    BLOCKING: ("autonat blocking", "now"),
    BEFORE: ("autonat", "before"),
    "miniupnpc": ("miniupnpc", None),
    "nat-pmp": ("nat-pmp", None),
    "async-upnp-client": ("async-upnp-client", None),
    "upnpclient": ("upnpclient", None),
    "raw": ("raw", None),
    "raw (asyncio)": ("raw asyncio", None),
}
DISCOVERY_ROUNDS = 5  # the peers wait out a 1 s search window each time
ICMP_REFILL = 7.0  # seconds for Linux's per-host ICMP bucket (6 x icmp_ratelimit 1 s) to fill again

# The cold scripts and the memory of a process holding one mapping: what a user's one-shot script does.
COLD_NOW = "import autonat\nprint(autonat.external_address())\n"
COLD_BEFORE = (
    "import asyncio\nfrom autonat.aio.router import RouterSession\n"
    "async def main():\n"
    "    async with await RouterSession.open() as router:\n"
    "        print((await router.natpmp.external_address()).external_address)\n"
    "asyncio.run(main())\n"
)
COLD_NATPMP = "import natpmp\nprint(natpmp.get_public_address())\n"
RSS = "print(int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) / 1024)"
HOLD_NOW = (
    "import autonat\n"
    "with autonat.open_router() as router:\n"
    "    router.add(autonat.MappingRequest(autonat.Transport.UDP, 24001, lifetime=600), 'natpmp')\n"
    f"    {RSS}\n"
    "    router.delete(autonat.Transport.UDP, 24001, 'natpmp')\n"
)
HOLD_NOW_ASYNC = (
    "import asyncio, autonat\n"
    "async def main():\n"
    "    async with await autonat.RouterSession.open() as router:\n"
    "        await router.add(autonat.MappingRequest(autonat.Transport.UDP, 24002, lifetime=600), 'natpmp')\n"
    f"        {RSS}\n"
    "        await router.delete(autonat.Transport.UDP, 24002, 'natpmp')\n"
    "asyncio.run(main())\n"
)
HOLD_BEFORE = (
    "import asyncio\nfrom autonat.aio.router import RouterSession\nfrom autonat.mapper import MappingRequest\n"
    "from autonat.proto.types import Transport\n"
    "async def main():\n"
    "    async with await RouterSession.open() as router:\n"
    "        await router.add(MappingRequest(Transport.UDP, 24003, lifetime=600), 'natpmp')\n"
    f"        {RSS}\n"
    "        await router.delete(Transport.UDP, 24003, 'natpmp')\n"
    "asyncio.run(main())\n"
)
HOLD_NATPMP = f"import natpmp\nnatpmp.map_udp_port(24004, 24004, 600)\n{RSS}\nnatpmp.map_udp_port(0, 24004, 0)\n"
HOLD_MINIUPNPC = (
    "import miniupnpc\nu = miniupnpc.UPnP()\nu.discoverdelay = 1000\nu.discover()\nu.selectigd()\n"
    "u.addportmapping(24005, 'UDP', '192.168.77.10', 24005, 'x', '', 600)\n"
    f"{RSS}\n"
    "u.deleteportmapping(24005, 'UDP')\n"
)

# The router stopped (port unreachable) or silent: how long until each gives up, 2 s deadline.
FAIL_NOW = (
    "import sys, time, autonat\n"
    "autonat.external_address  # the module's import is not the failure's time\n"
    "started = time.perf_counter()\n"
    "try:\n"
    "    autonat.external_address(timeout=2.0)\n"
    "except autonat.AutonatError as exc:\n"
    "    print(time.perf_counter() - started, '|', exc)\n"
)
FAIL_NOW_ASYNC = (
    "import asyncio, sys, time, autonat\n"
    "async def main():\n"
    "    async with await autonat.RouterSession.open(deadline=2.0) as router:\n"
    "        started = time.perf_counter()\n"
    "        try:\n"
    "            await router.add(autonat.MappingRequest(autonat.Transport.UDP, 24006), sys.argv[1])\n"
    "        except autonat.AutonatError as exc:\n"
    "            print(time.perf_counter() - started, '|', exc)\n"
    "asyncio.run(main())\n"
)
FAIL_BEFORE_ASYNC = (
    "import asyncio, sys, time\nfrom autonat.aio.router import RouterSession\nfrom autonat.errors import AutonatError\n"
    "from autonat.mapper import MappingRequest\nfrom autonat.proto.types import Transport\n"
    "async def main():\n"
    "    async with await RouterSession.open(deadline=2.0) as router:\n"
    "        started = time.perf_counter()\n"
    "        try:\n"
    "            await router.add(MappingRequest(Transport.UDP, 24006), sys.argv[1])\n"
    "        except AutonatError as exc:\n"
    "            print(time.perf_counter() - started, '|', exc)\n"
    "asyncio.run(main())\n"
)


# --- outside the lab ------------------------------------------------------------------------------------


def bench_venv() -> Path:
    """bench/.venv with the peers and autonat's own dependencies (idempotent; ignored by git)."""
    python = VENV / "bin" / "python"
    stamp = VENV / ".peers-installed"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        (VENV / ".gitignore").write_text("*\n")
    if not stamp.exists() or stamp.read_text() != " ".join(PEERS):
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, *PEERS, "-e", str(ROOT)], check=True)
        stamp.write_text(" ".join(PEERS))
    return python


def before_tree(ref: str, into: Path) -> Path:
    """`src/` as committed at `ref` (read-only git: an archive, nothing checked out)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "src"], check=True, capture_output=True).stdout
    target = into / "tar"
    target.write_bytes(archive)
    with tarfile.open(target) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def run_lab(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "src"))
    from autonat.lab import Lab

    python = bench_venv()
    lab = Lab(args.prefix)
    lab.up()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            before = before_tree(args.before, Path(scratch))
            # Both trees byte-compiled, as pip leaves an installed package: the cold script measures the
            # import, not the compiler (with PYTHONDONTWRITEBYTECODE set an uncompiled tree would compile
            # on every run).
            for tree in (before, ROOT / "src"):
                compile_tree = [str(python), "-m", "compileall", "-q", str(tree)]
                subprocess.run(compile_tree, check=True, stdout=subprocess.DEVNULL)
            state = Path(scratch) / "state"
            env = ["env", f"AUTONAT_STATE_DIR={state}", f"BENCH_BEFORE={before}"]
            inside = [*env, str(python), str(Path(__file__).resolve()), "--rounds", str(args.rounds)]

            def phase(name: str) -> dict[str, Any]:
                result = lab.run("lan", [*inside, "--phase", name], timeout=1800)
                if result.returncode != 0:
                    sys.exit(f"bench phase {name} failed inside the lab: {result.stderr.strip()[-3000:]}")
                data: dict[str, Any] = json.loads(result.stdout)
                return data

            figures: dict[str, Any] = {}
            if "warm" in args.phases:
                figures.update(phase("warm"))
            if "process" in args.phases:
                figures.update(phase("process"))
            if "stopped" in args.phases:
                lab.stop_router()
                try:
                    figures.update(phase("stopped"))
                finally:
                    lab.start_router()
            if "silent" in args.phases:
                lab.set_loss(99)  # the lab's cap: 1 in 10,000 round trips gets through, silence for 4 tries
                try:
                    figures.update(phase("silent"))
                finally:
                    lab.set_loss(0)
            return figures
    finally:
        lab.down()


# --- inside the lab (lan host) --------------------------------------------------------------------------


def env_for(tree: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if tree == "before":
        env["PYTHONPATH"] = os.environ["BENCH_BEFORE"]
    elif tree == "now":
        env["PYTHONPATH"] = str(ROOT / "src")
    return env


class Worker:
    def __init__(self, label: str) -> None:
        kind, tree = CONTESTANTS[label]
        self.label = label
        self.process = subprocess.Popen(
            [sys.executable, str(BENCH / "_contestants.py"), kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env_for(tree),
        )
        assert self.process.stdout is not None
        hello = self.process.stdout.readline().split()
        if not hello or hello[0] != "ready":
            sys.exit(f"contestant {label} did not start")
        if tree == "before":
            assert hello[1].startswith(os.environ["BENCH_BEFORE"]), hello
        elif tree == "now":
            assert hello[1].startswith(str(ROOT / "src")), hello

    def ask(self, op: str, index: int) -> float | str:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{op} {index}\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline().strip()
        return answer[1:] if answer.startswith("!") else float(answer)

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)


def summary(samples: list[float], errors: list[str]) -> dict[str, Any]:
    ordered = sorted(samples)
    figure: dict[str, Any] = {"n": len(ordered), "errors": len(errors)}
    if ordered:
        figure["p50_ms"] = round(statistics.median(ordered) * 1000, 4)
        figure["p90_ms"] = round(ordered[max(0, int(len(ordered) * 0.9) - 1)] * 1000, 4)
    if errors:
        figure["first_error"] = errors[0][:200]
    return figure


def warm(rounds: int) -> dict[str, Any]:
    workers = [Worker(label) for label in CONTESTANTS]
    try:
        ops: dict[str, list[Worker]] = {}
        for worker in workers:
            names = subprocess_ops(worker)
            for op in names:
                ops.setdefault(op, []).append(worker)
        figures: dict[str, Any] = {}
        for op, doing in ops.items():
            count = DISCOVERY_ROUNDS if op == "discovery" else rounds
            samples: dict[str, list[float]] = {w.label: [] for w in doing}
            errors: dict[str, list[str]] = {w.label: [] for w in doing}
            for index in range(count):
                turn = index % len(doing)
                for worker in doing[turn:] + doing[:turn]:
                    answer = worker.ask(op, index)
                    if isinstance(answer, str):
                        errors[worker.label].append(answer)
                    else:
                        samples[worker.label].append(answer)
            for worker in doing:
                figures[f"{op} | {worker.label}"] = summary(samples[worker.label], errors[worker.label])
        return figures
    finally:
        for worker in workers:
            worker.close()


def subprocess_ops(worker: Worker) -> list[str]:
    """The operations a contestant implements, asked of it once (`?` lists them)."""
    kind, _ = CONTESTANTS[worker.label]
    sys.path.insert(0, str(BENCH))
    warm_ops = [
        "upnp external IP",
        "upnp add+delete",
        "upnp add+delete (README: delete by internal port)",
        "natpmp external IP",
        "natpmp map+unmap",
        "pcp map+delete",
    ]
    raw_ops = ["natpmp external IP", "natpmp map+unmap", "pcp map+delete", "upnp external IP", "upnp add+delete"]
    table = {
        "autonat": ["discovery", *warm_ops],
        "autonat blocking": warm_ops,
        "miniupnpc": ["discovery", "upnp external IP", "upnp add+delete"],
        "nat-pmp": ["natpmp external IP", "natpmp external IP (gateway looked up)", "natpmp map+unmap"],
        "async-upnp-client": ["discovery", "upnp external IP", "upnp add+delete"],
        "upnpclient": ["discovery", "upnp external IP", "upnp add+delete"],
        "raw": raw_ops,
        "raw asyncio": raw_ops,
    }
    return table[kind if kind in table else "autonat"]


def run_script(code: str, tree: str | None, *argv: str, timeout: float = 60) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        env=env_for(tree),
        timeout=timeout,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        return elapsed, "!" + (result.stderr.strip().splitlines() or ["exit status"])[-1]
    return elapsed, result.stdout.strip()


def processes(rounds: int) -> dict[str, Any]:
    cold = {
        "cold script: import + NAT-PMP external IP | autonat": (COLD_NOW, "now"),
        "cold script: import + NAT-PMP external IP | autonat (before)": (COLD_BEFORE, "before"),
        "cold script: import + NAT-PMP external IP | nat-pmp": (COLD_NATPMP, None),
        "cold script: import + NAT-PMP external IP | bare interpreter": ("pass", None),
    }
    figures: dict[str, Any] = {}
    samples: dict[str, list[float]] = {name: [] for name in cold}
    errors: dict[str, list[str]] = {name: [] for name in cold}
    names = list(cold)
    for index in range(max(20, rounds // 4)):
        turn = index % len(names)
        for name in names[turn:] + names[:turn]:
            elapsed, out = run_script(*cold[name])
            (errors[name].append(out) if out.startswith("!") else samples[name].append(elapsed))
    for name in names:
        figures[name] = summary(samples[name], errors[name])
    hold = {
        "RSS MB holding one mapping | autonat": (HOLD_NOW, "now"),
        "RSS MB holding one mapping | autonat (asyncio session)": (HOLD_NOW_ASYNC, "now"),
        "RSS MB holding one mapping | autonat (before)": (HOLD_BEFORE, "before"),
        "RSS MB holding one mapping | nat-pmp": (HOLD_NATPMP, None),
        "RSS MB holding one mapping | miniupnpc": (HOLD_MINIUPNPC, None),
        "RSS MB holding one mapping | bare interpreter": (RSS, None),
    }
    for name, (code, tree) in hold.items():
        values, failures = [], []
        for _ in range(3):
            _, out = run_script(code, tree)
            if out.startswith("!"):
                failures.append(out)
            else:
                values.append(float(out.splitlines()[-1]))
        figures[name] = {"mb": round(statistics.median(values), 2) if values else None, "errors": len(failures)}
        if failures:
            figures[name]["first_error"] = failures[0][:200]
    return figures


def failing(state: str) -> dict[str, Any]:
    """The router stopped or silent: seconds until each call gives up (deadline 2 s)."""
    runs = {
        f"{state}: NAT-PMP external IP (blocking) | autonat": (FAIL_NOW, "now", "natpmp"),
        f"{state}: PCP map (asyncio) | autonat": (FAIL_NOW_ASYNC, "now", "pcp"),
        f"{state}: PCP map (asyncio) | autonat (before)": (FAIL_BEFORE_ASYNC, "before", "pcp"),
        f"{state}: NAT-PMP map (asyncio) | autonat": (FAIL_NOW_ASYNC, "now", "natpmp"),
        f"{state}: NAT-PMP map (asyncio) | autonat (before)": (FAIL_BEFORE_ASYNC, "before", "natpmp"),
        f"{state}: probe all, then map (asyncio) | autonat": (FAIL_NOW_ASYNC, "now", "auto"),
        f"{state}: probe all, then map (asyncio) | autonat (before)": (FAIL_BEFORE_ASYNC, "before", "auto"),
    }
    figures: dict[str, Any] = {}
    for name, (code, tree, protocol) in runs.items():
        values, messages = [], []
        for _ in range(3):
            if state == "router stopped" and tree == "now":
                # The router's kernel rate-limits ICMP per host (Linux: a burst of 6, then 1 a second),
                # and one probe costs 8 (PCP, NAT-PMP, 6 SSDP search targets): each run here stands for
                # a command after a quiet spell, as a user's would be.
                time.sleep(ICMP_REFILL)
            _, out = run_script(code, tree, protocol)
            if "|" in out:
                seconds, message = out.split("|", 1)
                values.append(float(seconds))
                messages.append(message.strip())
            else:
                messages.append("did not fail: " + out)
        figures[name] = {
            "p50_ms": round(statistics.median(values) * 1000, 1) if values else None,
            "n": len(values),
            "message": messages[0][:240] if messages else "",
        }
    return figures


# --- report ---------------------------------------------------------------------------------------------


def ratios(figures: dict[str, Any]) -> list[tuple[str, float]]:
    out = []
    by_op: dict[str, dict[str, float]] = {}
    for name, figure in figures.items():
        if " | " in name and figure.get("p50_ms"):
            op, who = name.split(" | ", 1)
            by_op.setdefault(op, {})[who] = figure["p50_ms"]
        elif " | " in name and figure.get("mb"):
            op, who = name.split(" | ", 1)
            by_op.setdefault(op, {})[who] = figure["mb"]
    for op, whos in by_op.items():
        mine = whos.get(ME)
        if mine is None:
            continue
        for who, value in whos.items():
            if who != ME and value:
                out.append((f"{op}: autonat / {who}", round(mine / value, 3)))
        # The blocking session is the fastest path a library user has: its ratios to the floor and the peers.
        blocking = whos.get(BLOCKING)
        if blocking is not None:
            for who, value in whos.items():
                if who not in (ME, BLOCKING, BEFORE) and not who.startswith("autonat") and value:
                    out.append((f"{op}: autonat blocking / {who}", round(blocking / value, 3)))
    return out


def report(figures: dict[str, Any], as_json: bool) -> None:
    computed = ratios(figures)
    if as_json:
        print(json.dumps({"figures": figures, "ratios": dict(computed)}, indent=2))
        return
    width = max(len(name) for name in figures) + 2
    print(f"{'operation | contestant':<{width}} {'p50 ms':>10} {'p90 ms':>10} {'n':>5}")
    for name, figure in figures.items():
        if "mb" in figure:
            print(f"{name:<{width}} {figure['mb'] or float('nan'):>10.2f} {'MB':>10} {'':>5}")
        else:
            p50 = figure.get("p50_ms") or float("nan")
            print(f"{name:<{width}} {p50:>10.3f} {figure.get('p90_ms', float('nan')):>10.3f} {figure['n']:>5}")
        for key in ("first_error", "message"):
            if figure.get(key):
                print(f"{'':<{width}}   {key}: {figure[key]}")
    print("\nratios of medians (autonat / other; below 1: autonat is faster or smaller)")
    for name, ratio in computed:
        print(f"  {ratio:>8.3f}  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--before", default="HEAD", help="git ref of the 'before' tree (default HEAD)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--prefix", default=PREFIX, help=f"the lab's name prefix (default {PREFIX}; two runs need two)")
    parser.add_argument("--phases", default="warm,process,stopped,silent", help="which parts to run (default: all)")
    parser.add_argument("--phase", choices=["warm", "process", "stopped", "silent"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "warm":
        print(json.dumps(warm(args.rounds)))
    elif args.phase == "process":
        print(json.dumps(processes(args.rounds)))
    elif args.phase in ("stopped", "silent"):
        print(json.dumps(failing(f"router {args.phase}")))
    else:
        if shutil.which("git") is None:
            sys.exit("bench/peers.py needs git (to export the 'before' tree)")
        report(run_lab(args), args.json)


if __name__ == "__main__":
    main()
