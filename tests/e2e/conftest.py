"""Fixtures of the end-to-end tests that start real Envoys."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.envoys import Envoy


@pytest.fixture
def root() -> Iterator[Path]:
    # Short (Unix socket paths) and traversable by the Envoys' uids, unlike pytest's tmp_path.
    path = Path(tempfile.mkdtemp(prefix="mw-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def envoys() -> Iterator[list[Envoy]]:
    """Envoys a test starts; stopped at the end whatever happened."""
    started: list[Envoy] = []
    yield started
    for envoy in started:
        envoy.process.terminate()
    for envoy in started:
        try:
            envoy.process.wait(10)
        except subprocess.TimeoutExpired:
            envoy.process.kill()
            envoy.process.wait(10)
