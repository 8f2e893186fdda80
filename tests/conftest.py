"""Fixtures shared by the host tests.

* ``sock_path``: where a test's handshake service listens (in the test's own tmp_path).
* ``private_session_keyring``: this process joins a new, empty anonymous session keyring, so
  a test never sees keys another test (or the user running the suite) left behind.
* ``ring``: a fresh keyring of the test's own, linked into that private session keyring (so
  this process and the agent running in it possess it), revoked afterwards.

Plain helpers live in modules the tests import: :mod:`tests.waiting` (``run``, readiness),
:mod:`tests.processes` (child processes and their teardown), :mod:`tests.agent_helpers`,
:mod:`tests.peers`, :mod:`tests.cli_peers`, :mod:`tests.pki`.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ktlsd import keyring


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "handshake.sock")


@pytest.fixture
def private_session_keyring() -> int:
    return keyring.join_session_keyring(None)


@pytest.fixture
def ring(private_session_keyring: int) -> Iterator[int]:
    serial = keyring.add_key("keyring", f"ktlsd-test-{uuid.uuid4().hex[:12]}", None,
                             keyring.KEY_SPEC_SESSION_KEYRING)
    try:
        yield serial
    finally:
        with contextlib.suppress(keyring.KeyringError):  # the test may have revoked it itself
            keyring.revoke_key(serial)
        with contextlib.suppress(keyring.KeyringError):
            keyring.unlink_key(serial, keyring.KEY_SPEC_SESSION_KEYRING)
