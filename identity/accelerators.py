"""Handshake accelerators on this host: Intel QAT devices and CPU support for CryptoMB.

Pure reads under ``root`` (``/`` in production, a prepared tree in tests); nothing is
loaded, probed or opened for writing, so detection is safe to run on any node.

What counts as usable is what Envoy's contrib providers need, not what the hardware
could do with another stack:

- **QAT** (``envoy.tls.key_providers.qat``, qatlib linked into Envoy): the kernel's
  ``intel_qat`` module, a 4th-generation QAT endpoint (PCI ``8086:4940/4942/4944/4946``)
  driven by ``4xxx``/``420xx`` that is ``up`` with ``asym`` among its services, and at
  least one of its virtual functions (``4941/4943/4945/4947``) bound to ``vfio-pci``
  with ``/dev/vfio/vfio`` and its IOMMU group's node present. qatlib's shared libraries
  are reported but not required: Envoy links qatlib statically.
- **CryptoMB** (``envoy.tls.key_providers.cryptomb``, ipp-crypto's multi-buffer RSA and
  ECDSA): every CPU flag ipp-crypto's ``mbx_is_crypto_mb_applicable`` checks, on every
  logical CPU (a hybrid part may lack them on some cores).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CRYPTOMB_CPU_FLAGS",
    "Accelerators",
    "CryptoMbSupport",
    "QatDevice",
    "QatSupport",
    "detect_accelerators",
    "detect_cryptomb",
    "detect_qat",
]

CRYPTOMB_CPU_FLAGS = ("bmi2", "avx512f", "avx512dq", "avx512bw", "avx512ifma", "avx512_vbmi2")

_INTEL = "0x8086"
_QAT_PF_IDS = frozenset({"0x4940", "0x4942", "0x4944", "0x4946"})
_QAT_VF_IDS = frozenset({"0x4941", "0x4943", "0x4945", "0x4947"})
_QAT_DRIVERS = ("4xxx", "420xx")
_LIB_DIRS = (
    "usr/lib",
    "usr/lib64",
    "usr/lib/x86_64-linux-gnu",
    "usr/local/lib",
    "usr/local/lib64",
    "lib",
    "lib64",
    "lib/x86_64-linux-gnu",
)
_QATLIB_NAMES = ("libqat.so", "libusdm.so")


@dataclass(slots=True, frozen=True)
class QatDevice:
    """One QAT PCI function: a physical endpoint (PF) or one of its virtual functions."""

    address: str  # PCI bus address, e.g. 0000:6b:00.0
    device_id: str  # e.g. 0x4940
    virtual: bool
    driver: str | None  # the bound kernel driver (4xxx, 420xx, vfio-pci), None if unbound
    state: str | None = None  # PF only: "up" or "down" (sysfs qat/state)
    services: tuple[str, ...] = ()  # PF only: sysfs qat/cfg_services, e.g. ("asym", "dc")
    iommu_group: str | None = None  # VF: the group whose /dev/vfio/<group> userspace opens
    group_node: bool = False  # VF: /dev/vfio/<group> exists
    parent: str | None = None  # VF: its PF's address (sysfs physfn link)

    def as_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "device_id": self.device_id,
            "virtual": self.virtual,
            "driver": self.driver,
            **({} if self.virtual else {"state": self.state, "services": list(self.services)}),
            **({"iommu_group": self.iommu_group} if self.virtual else {}),
        }


@dataclass(slots=True, frozen=True)
class QatSupport:
    kernel_module: bool  # /sys/module/intel_qat
    drivers: tuple[str, ...]  # QAT PCI drivers registered (/sys/bus/pci/drivers/4xxx, ...)
    devices: tuple[QatDevice, ...]
    vfio: bool  # /dev/vfio/vfio
    qatlib: tuple[str, ...]  # qatlib shared libraries found (informational)

    @property
    def endpoints(self) -> tuple[QatDevice, ...]:
        """Virtual functions a QAT-enabled Envoy can open (see the module docstring)."""
        if not self.vfio or not self._asym_up():
            return ()
        return tuple(
            d
            for d in self.devices
            if d.virtual and d.driver == "vfio-pci" and d.group_node and self._parent_ok(d)
        )

    @property
    def usable(self) -> bool:
        return bool(self.endpoints)

    @property
    def reason(self) -> str:
        """Why QAT cannot be used, or what will be used."""
        pfs = [d for d in self.devices if not d.virtual]
        vfs = [d for d in self.devices if d.virtual]
        if self.usable:
            return f"{len(self.endpoints)} QAT endpoint(s) bound to vfio-pci"
        if not self.kernel_module and not self.devices:
            return "no QAT device and no intel_qat kernel module"
        if not pfs:
            driver = ", ".join(self.drivers) or "intel_qat"
            return f"QAT driver {driver} loaded but no QAT device (PCI 8086:4940/4942/4944/4946)"
        if not any(d.driver in _QAT_DRIVERS for d in pfs):
            return "QAT device present but not driven by the kernel's 4xxx/420xx driver"
        if not any(d.state == "up" for d in pfs):
            return "QAT device present but down (sysfs qat/state)"
        if not self._asym_up():
            return "no QAT device offers the asym service (sysfs qat/cfg_services)"
        if not any(d.driver == "vfio-pci" for d in vfs):
            return "no QAT virtual function bound to vfio-pci (enable SR-IOV and bind the VFs)"
        if not self.vfio:
            return "QAT virtual functions bound to vfio-pci but /dev/vfio/vfio is missing"
        return (
            "QAT virtual functions bound to vfio-pci but their /dev/vfio/<group> nodes are missing"
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "usable": self.usable,
            "reason": self.reason,
            "kernel_module": self.kernel_module,
            "drivers": list(self.drivers),
            "devices": [d.as_json() for d in self.devices],
            "endpoints": len(self.endpoints),
            "vfio": self.vfio,
            "qatlib": list(self.qatlib),
        }

    def _asym_up(self) -> bool:
        return any(self._pf_ok(d) for d in self.devices if not d.virtual)

    @staticmethod
    def _pf_ok(pf: QatDevice) -> bool:
        return pf.driver in _QAT_DRIVERS and pf.state == "up" and "asym" in pf.services

    def _parent_ok(self, vf: QatDevice) -> bool:
        # A VF offers what its PF was configured with; without the physfn link (some
        # containers hide it), any PF that offers asym will do.
        if vf.parent is None:
            return True
        return any(self._pf_ok(d) for d in self.devices if d.address == vf.parent)


@dataclass(slots=True, frozen=True)
class CryptoMbSupport:
    cpu_flags_read: bool  # /proc/cpuinfo could be read and lists flags
    missing: tuple[str, ...]  # required flags some CPU lacks

    @property
    def usable(self) -> bool:
        return self.cpu_flags_read and not self.missing

    @property
    def reason(self) -> str:
        if not self.cpu_flags_read:
            return "CPU flags unknown (/proc/cpuinfo unreadable or without flags)"
        if self.missing:
            return f"the CPU lacks {', '.join(self.missing)}"
        return "the CPU has " + ", ".join(CRYPTOMB_CPU_FLAGS)

    def as_json(self) -> dict[str, Any]:
        return {"usable": self.usable, "reason": self.reason, "missing": list(self.missing)}


@dataclass(slots=True, frozen=True)
class Accelerators:
    qat: QatSupport
    cryptomb: CryptoMbSupport

    def summary(self) -> str:
        """One line for the agent's start-up log."""
        qat = "usable" if self.qat.usable else "no"
        cryptomb = "usable" if self.cryptomb.usable else "no"
        qatlib = "present" if self.qat.qatlib else "absent"
        return (
            f"QAT: {qat} ({self.qat.reason}; qatlib {qatlib}); "
            f"CryptoMB: {cryptomb} ({self.cryptomb.reason})"
        )

    def as_json(self) -> dict[str, Any]:
        return {"qat": self.qat.as_json(), "cryptomb": self.cryptomb.as_json()}


def detect_accelerators(root: Path = Path("/")) -> Accelerators:
    return Accelerators(qat=detect_qat(root), cryptomb=detect_cryptomb(root))


def detect_cryptomb(root: Path = Path("/")) -> CryptoMbSupport:
    try:
        text = (root / "proc" / "cpuinfo").read_text(errors="replace")
    except OSError:
        return CryptoMbSupport(cpu_flags_read=False, missing=CRYPTOMB_CPU_FLAGS)
    per_cpu = [
        set(value.split())
        for key, _, value in (line.partition(":") for line in text.splitlines())
        if key.strip() == "flags"
    ]
    if not per_cpu:
        return CryptoMbSupport(cpu_flags_read=False, missing=CRYPTOMB_CPU_FLAGS)
    common = set.intersection(*per_cpu)
    return CryptoMbSupport(
        cpu_flags_read=True, missing=tuple(f for f in CRYPTOMB_CPU_FLAGS if f not in common)
    )


def detect_qat(root: Path = Path("/")) -> QatSupport:
    sys_root = root / "sys"
    devices = tuple(_qat_devices(sys_root / "bus" / "pci" / "devices", root / "dev" / "vfio"))
    return QatSupport(
        kernel_module=(sys_root / "module" / "intel_qat").is_dir(),
        drivers=tuple(d for d in _QAT_DRIVERS if (sys_root / "bus/pci/drivers" / d).is_dir()),
        devices=devices,
        vfio=(root / "dev" / "vfio" / "vfio").exists(),
        qatlib=tuple(_qatlib(root)),
    )


def _qat_devices(pci: Path, vfio: Path) -> Iterable[QatDevice]:
    try:
        entries = sorted(pci.iterdir())
    except OSError:
        return
    for path in entries:
        if _read(path / "vendor") != _INTEL:
            continue
        device_id = _read(path / "device")
        if device_id in _QAT_PF_IDS:
            services = _read(path / "qat" / "cfg_services") or ""
            yield QatDevice(
                address=path.name,
                device_id=device_id,
                virtual=False,
                driver=_link_name(path / "driver"),
                state=_read(path / "qat" / "state"),
                services=tuple(s for s in services.replace(",", ";").split(";") if s),
            )
        elif device_id in _QAT_VF_IDS:
            group = _link_name(path / "iommu_group")
            yield QatDevice(
                address=path.name,
                device_id=device_id,
                virtual=True,
                driver=_link_name(path / "driver"),
                iommu_group=group,
                group_node=group is not None and (vfio / group).exists(),
                parent=_link_name(path / "physfn"),
            )


def _qatlib(root: Path) -> Iterable[str]:
    for directory in _LIB_DIRS:
        try:
            names = sorted(os.listdir(root / directory))
        except OSError:
            continue
        for name in names:
            if name.startswith(_QATLIB_NAMES):
                yield f"/{directory}/{name}"


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return None


def _link_name(path: Path) -> str | None:
    try:
        return Path(os.readlink(path)).name
    except OSError:
        return None
