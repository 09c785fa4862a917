"""Shared by the benchmarks: timing, percentiles, and running a measurement inside a lab's lan host."""

from __future__ import annotations

import json
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

Figures = dict[str, dict[str, float]]


def soap_request(service: str, action: str, arguments: str, control: tuple[str, int, str]) -> bytes:
    """The bytes of one SOAP request (UPnP DA 1.1 §3.2.1) with `Connection: close`, as a raw client would
    prebuild them. `control` is (host, port, path) of the service's control URL."""
    host, port, path = control
    body = (
        '<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
        's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
        f'<u:{action} xmlns:u="{service}">{arguments}</u:{action}></s:Body></s:Envelope>'
    ).encode()
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    head = (
        f'POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: text/xml; charset="utf-8"\r\n'
        f'SOAPAction: "{service}#{action}"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n'
    ).encode()
    return head + body


def raw_exchange(address: tuple[str, int], request: bytes, *, source: str | None = None) -> bytes:
    """The least a Python client can do for one HTTP exchange with miniupnpd, which closes every connection
    after its reply: a plain socket (no getaddrinfo, as `socket.create_connection` would call), one timeout,
    connect, sendall, read until EOF; from `source` when given. The reply must be a 200."""
    sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(2)
        if source is not None:
            sock.bind((source, 0))
        sock.connect(address)
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    finally:
        sock.close()
    reply = b"".join(chunks)
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    return reply


def raw_soap(
    service: str, action: str, arguments: str, control: tuple[str, int, str], *, source: str | None = None
) -> bytes:
    """One SOAP exchange the raw way (`soap_request` + `raw_exchange`), from `source` when given (an IPv6
    pinhole's request must come from the address it is for)."""
    return raw_exchange(control[:2], soap_request(service, action, arguments, control), source=source)


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 4),
        "p90_ms": round(ordered[max(0, int(len(ordered) * 0.9) - 1)] * 1000, 4),
        "n": len(ordered),
    }


def timed_sync(rounds: int, action: Callable[[int], object]) -> list[float]:
    samples = []
    for index in range(rounds):
        started = time.perf_counter()
        action(index)
        samples.append(time.perf_counter() - started)
    return samples


async def timed_async(rounds: int, action: Callable[[int], Awaitable[object]]) -> list[float]:
    samples = []
    for index in range(rounds):
        started = time.perf_counter()
        await action(index)
        samples.append(time.perf_counter() - started)
    return samples


def run_in_lab(script: str, prefix: str, rounds: int) -> Figures:
    """Bring up a lab, run `script --inside --rounds N` on its lan host, tear the lab down."""
    from autonat.lab import Lab

    lab = Lab(prefix)
    lab.up()
    try:
        with tempfile.TemporaryDirectory() as state:
            argv = ["env", f"AUTONAT_STATE_DIR={state}", sys.executable, str(Path(script).resolve())]
            result = lab.run("lan", [*argv, "--inside", "--rounds", str(rounds)], timeout=900)
        if result.returncode != 0:
            sys.exit(f"benchmark failed inside the lab: {result.stderr.strip()[-2000:]}")
        figures: Figures = json.loads(result.stdout)
        return figures
    finally:
        lab.down()


def report(figures: Figures, ratios: list[tuple[str, str]], note: str, as_json: bool) -> None:
    computed = {f"{a} / {b}": round(figures[a]["p50_ms"] / figures[b]["p50_ms"], 3) for a, b in ratios}
    if as_json:
        print(json.dumps({"figures": figures, "ratios_p50": computed}, indent=2))
        return
    width = max(len(name) for name in figures) + 2
    print(f"{'operation':<{width}} {'p50 ms':>9} {'p90 ms':>9} {'n':>5}")
    for name, figure in figures.items():
        print(f"{name:<{width}} {figure['p50_ms']:>9.3f} {figure['p90_ms']:>9.3f} {figure['n']:>5}")
    print(f"\nratios of medians ({note})")
    for name, ratio in computed.items():
        print(f"  {ratio:>7.3f}  {name}")


def main_args(description: str) -> Any:
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()
