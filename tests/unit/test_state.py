"""Host secret and nonce derivation: stable across processes, different per mapping."""

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autonat.errors import AutonatError
from autonat.state import SECRET_SIZE, NonceDeriver, derive_nonce, derive_nonce_for, host_secret, state_dir


def test_secret_is_created_once_owner_only(tmp_path: Path) -> None:
    first = host_secret(tmp_path / "s")
    second = host_secret(tmp_path / "s")
    assert first == second and len(first) == SECRET_SIZE
    mode = stat.S_IMODE(os.stat(tmp_path / "s" / "host-secret").st_mode)
    assert mode == 0o600


def test_corrupt_secret_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "host-secret").write_bytes(b"short")
    with pytest.raises(AutonatError, match="corrupt"):
        host_secret(tmp_path)


def test_unusable_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(AutonatError, match="cannot use state directory"):
        host_secret(blocker / "sub")


def test_nonce_depends_on_every_part_and_the_secret() -> None:
    base = derive_nonce(b"k" * 32, "pcp", "192.168.77.10", "udp", 5060)
    assert len(base) == 12
    assert base == derive_nonce(b"k" * 32, "pcp", "192.168.77.10", "udp", 5060)
    assert base != derive_nonce(b"k" * 32, "pcp", "192.168.77.10", "tcp", 5060)
    assert base != derive_nonce(b"k" * 32, "pcp", "192.168.77.10", "udp", 5061)
    assert base != derive_nonce(b"j" * 32, "pcp", "192.168.77.10", "udp", 5060)


def test_state_dir_honours_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AUTONAT_STATE_DIR", str(tmp_path))
    assert state_dir() == tmp_path


def test_a_pcp_nonce_is_the_same_in_every_version_and_through_the_client_cache() -> None:
    # A later process (or a restarted daemon) refreshes and deletes a PCP mapping by this nonce: its value
    # for given parts must never change (HMAC-SHA256 of "pcp|192.168.77.10|udp|5060", first 12 bytes).
    from ipaddress import IPv4Address

    from autonat.aio.pcp import Nonces
    from autonat.proto.types import Transport

    expected = bytes.fromhex("f7d5acb5d0e3754849d25b36")
    local = IPv4Address("192.168.77.10")
    assert derive_nonce(b"x" * 32, "pcp", local, Transport.UDP, 5060) == expected
    assert Nonces(b"x" * 32, local)(Transport.UDP, 5060) == expected


@given(st.binary(min_size=1, max_size=64), st.text(max_size=40), st.text(max_size=40), st.integers(1, 32))
@settings(max_examples=200, deadline=None)
def test_a_nonce_deriver_gives_the_one_shot_derivation(secret: bytes, prefix: str, rest: str, size: int) -> None:
    derive = NonceDeriver(secret, prefix, size)
    assert derive(rest) == derive_nonce_for(secret, prefix + rest, size)
    assert derive(rest) == derive(rest)  # the prefix's HMAC is copied, never consumed
