"""The `autonat` command's start-up, per command, beside `upnpc` in the same run (issue 13, "A fast CLI").

Brings up its own lab (prefix `bc`, needs root) and times, as processes on the lan host, interleaved
round by round: `autonat --help`, `autonat --version`, `autonat map add --help`, `autonat probe
--protocol upnp` beside `upnpc -i -s` (SSDP discovery + status), and `autonat nat_map status` against a
daemon of its own (`autonat run --nonatmap`, control socket in a temporary directory). Also runs the
tree as committed at `--before` (default HEAD) for the same commands. Prints medians and the ratios.

    .venv/bin/python bench/cli.py [--rounds 30] [--before REF] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
from peers import before_tree  # noqa: E402 (bench/ is not a package)

PREFIX = "bc"
AUTONAT = [sys.executable, "-m", "autonat"]


def commands(socket: str) -> dict[str, list[str]]:
    return {
        "autonat --help": [*AUTONAT, "--help"],
        "autonat --version": [*AUTONAT, "--version"],
        "autonat map add --help": [*AUTONAT, "map", "add", "--help"],
        "autonat probe --protocol upnp": [*AUTONAT, "probe", "--protocol", "upnp"],
        "autonat nat_map status": [*AUTONAT, "nat_map", "status", "--socket", socket],
    }


def inside(rounds: int) -> dict[str, Any]:
    scratch = Path(os.environ["BENCH_SCRATCH"])
    socket = str(scratch / "control.sock")
    config = scratch / "autonat.toml"
    config.write_text(f'[control]\nsocket = "{socket}"\n')
    trees = {"": str(ROOT / "src"), " (before)": os.environ["BENCH_BEFORE"]}
    daemon = subprocess.Popen(
        [*AUTONAT, "run", "--config", str(config), "--nonatmap"],
        env={**os.environ, "PYTHONPATH": trees[""]},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            if Path(socket).exists():
                break
            time.sleep(0.05)
        runs: dict[str, tuple[list[str], dict[str, str]]] = {}
        for suffix, tree in trees.items():
            env = {**os.environ, "PYTHONPATH": tree}
            for name, argv in commands(socket).items():
                runs[name + suffix] = (argv, env)
        runs["upnpc -i -s"] = (["upnpc", "-i", "-s"], dict(os.environ))
        runs["bare interpreter"] = ([sys.executable, "-c", "pass"], dict(os.environ))
        samples: dict[str, list[float]] = {name: [] for name in runs}
        failures: dict[str, str] = {}
        names = list(runs)
        for index in range(rounds):
            turn = index % len(names)
            for name in names[turn:] + names[:turn]:
                if name.startswith(("upnpc", "autonat probe")) and index >= max(5, rounds // 3):
                    continue  # the discovery rows wait out seconds (upnpc): fewer rounds
                argv, env = runs[name]
                started = time.perf_counter()
                result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
                elapsed = time.perf_counter() - started
                if result.returncode != 0:
                    failures[name] = (result.stderr.strip().splitlines() or ["?"])[-1][:200]
                    continue
                samples[name].append(elapsed)
        figures: dict[str, Any] = {}
        for name, values in samples.items():
            figures[name] = {
                "p50_ms": round(statistics.median(values) * 1000, 1) if values else None,
                "n": len(values),
                **({"error": failures[name]} if name in failures else {}),
            }
        return figures
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--before", default="HEAD")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        print(json.dumps(inside(args.rounds)))
        return
    sys.path.insert(0, str(ROOT / "src"))
    from autonat.lab import Lab

    lab = Lab(PREFIX)
    lab.up()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            before = before_tree(args.before, Path(scratch))
            env = ["env", f"BENCH_SCRATCH={scratch}", f"BENCH_BEFORE={before}", f"AUTONAT_STATE_DIR={scratch}/state"]
            argv = [*env, sys.executable, str(Path(__file__).resolve()), "--inside", "--rounds", str(args.rounds)]
            result = lab.run("lan", argv, timeout=1800)
            if result.returncode != 0:
                sys.exit(f"bench failed inside the lab: {result.stderr.strip()[-3000:]}")
            figures = json.loads(result.stdout)
    finally:
        lab.down()
    upnpc = figures["upnpc -i -s"]["p50_ms"]
    ratios = {
        "autonat probe --protocol upnp / upnpc -i -s": round(
            figures["autonat probe --protocol upnp"]["p50_ms"] / upnpc, 3
        ),
        "(before) autonat probe --protocol upnp / upnpc -i -s": round(
            figures["autonat probe --protocol upnp (before)"]["p50_ms"] / upnpc, 3
        ),
    }
    if args.json:
        print(json.dumps({"figures": figures, "ratios": ratios}, indent=2))
        return
    width = max(len(name) for name in figures) + 2
    print(f"{'command (process)':<{width}} {'p50 ms':>8} {'n':>4}")
    for name, figure in figures.items():
        p50 = figure["p50_ms"] if figure["p50_ms"] is not None else float("nan")
        print(f"{name:<{width}} {p50:>8.1f} {figure['n']:>4}  {figure.get('error', '')}")
    print("\ntargets: --help <= 60 ms; probe --protocol upnp <= 0.05x upnpc -i -s; nat_map status <= 80 ms")
    for name, ratio in ratios.items():
        print(f"  {ratio:>7.3f}  {name}")


if __name__ == "__main__":
    main()
