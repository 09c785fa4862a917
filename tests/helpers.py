"""Helpers shared by the test packages, one copy each (import them as `from tests.helpers import ...`).

Everything here stays on loopback and needs no privileges. A port found free may be taken before the
caller binds it: the kernel hands out ephemeral ports (32768-60999) at random for `bind(0)`, so any
socket the test opens meanwhile may land on it (seen: "address already in use" for a SIP profile's port
in a full run). So the ports handed out here come from below the ephemeral range, where nothing lands
by chance, chosen at random and checked free.
"""

from __future__ import annotations

import contextlib
import random
import resource
import socket

LOOPBACK = "127.0.0.1"
PORTS = range(20000, 32700)  # below Linux's ephemeral range (net.ipv4.ip_local_port_range 32768-60999)


def free_port(kind: int = socket.SOCK_DGRAM, host: str = LOOPBACK, attempts: int = 100) -> int:
    """A port free on `host` for `kind` (UDP unless told otherwise), outside the ephemeral range."""
    for _ in range(attempts):
        port = random.randrange(PORTS.start, PORTS.stop)
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        return port
    raise AssertionError(f"no free port on {host} in {attempts} attempts")


def free_udp_tcp_port(host: str = LOOPBACK, attempts: int = 50) -> int:
    """A port free for UDP and TCP alike on `host` (a SIP profile binds both on its port)."""
    for _ in range(attempts):
        port = free_port(socket.SOCK_DGRAM, host)
        try:
            with (
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
                socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
            ):
                udp.bind((host, port))
                tcp.bind((host, port))
        except OSError:
            continue
        return port
    raise AssertionError(f"no port free for both UDP and TCP on {host} in {attempts} attempts")


def free_port_pairs(count: int, host: str = LOOPBACK, attempts: int = 200) -> list[int]:
    """`count` distinct even UDP ports P with P and P + 1 free together on `host` (RTP and RTCP pairs,
    RFC 3550 §11); the pairs found are held until all are, so no two overlap."""
    held: list[socket.socket] = []
    found: list[int] = []
    try:
        for _ in range(attempts):
            if len(found) == count:
                return found
            port = free_port(socket.SOCK_DGRAM, host) & ~1
            pair = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
            try:
                pair[0].bind((host, port))
                pair[1].bind((host, port + 1))
            except OSError:
                for sock in pair:
                    sock.close()
                continue
            held += pair
            found.append(port)
    finally:
        for sock in held:
            with contextlib.suppress(OSError):
                sock.close()
    if len(found) == count:
        return found
    raise AssertionError(f"no {count} free even/odd UDP port pairs on {host} in {attempts} attempts")


def free_port_pair(host: str = LOOPBACK) -> int:
    """One even UDP port P with P and P + 1 free on `host`."""
    return free_port_pairs(1, host)[0]


def ensure_open_files(wanted: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE to at least `wanted` (a flood test holds both ends of
    ~1,000 connections in one process).

    A root shell here starts with a soft limit of 20,000, but a login session (PAM's pam_limits, as
    `runuser -u nobody` gives) starts with 1,024; raising the soft limit up to the hard one needs no
    privilege. Fails with the reason when the hard limit itself is too low, rather than letting the
    flood die on EMFILE halfway."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return
    if hard != resource.RLIM_INFINITY and hard < wanted:
        raise AssertionError(f"this test needs {wanted} open files; the hard limit is {hard} (raise it: ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
