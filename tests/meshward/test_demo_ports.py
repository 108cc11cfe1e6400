"""The demo's ports: each one it hands out is distinct, even when the kernel repeats one."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from meshward.demo import mesh


class _RepeatingKernel:
    """A socket whose bind(0) gets the ports of ``ports`` in turn, as a kernel may."""

    ports: Iterator[int]

    def __enter__(self) -> _RepeatingKernel:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def bind(self, address: Any) -> None:
        self.port = next(self.ports)

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


def test_a_port_the_kernel_gives_again_is_not_handed_out_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _RepeatingKernel.ports = iter([47001, 47001, 47001, 47002])
    monkeypatch.setattr(mesh, "_handed_out", set())
    monkeypatch.setattr(mesh.socket, "socket", _RepeatingKernel)
    assert [mesh._free_port(), mesh._free_port()] == [47001, 47002]
