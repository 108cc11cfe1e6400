"""Accelerator detection on prepared fake /sys, /dev, /proc and lib trees, one case each."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from identity.accelerators import (
    CRYPTOMB_CPU_FLAGS,
    detect_accelerators,
    detect_cryptomb,
    detect_qat,
)

PF, VF = "0000:6b:00.0", "0000:6b:00.1"
BASE_FLAGS = "fpu vme de pse tsc msr pae mce cx8 apic sse sse2 avx avx2"


# -- building fake trees -------------------------------------------------------------------


def write_cpuinfo(root: Path, *flag_lines: str) -> None:
    """One processor block per flag line, as /proc/cpuinfo lays them out."""
    blocks = [
        f"processor\t: {n}\nvendor_id\t: GenuineIntel\nflags\t\t: {flags}\n"
        for n, flags in enumerate(flag_lines)
    ]
    (root / "proc").mkdir(parents=True, exist_ok=True)
    (root / "proc" / "cpuinfo").write_text("\n".join(blocks))


def link(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)


def pci_function(
    root: Path,
    address: str,
    device: str,
    *,
    driver: str | None,
    vendor: str = "0x8086",
    state: str | None = None,
    services: str | None = None,
    group: str | None = None,
    physfn: str | None = None,
) -> None:
    path = root / "sys/bus/pci/devices" / address
    path.mkdir(parents=True)
    (path / "vendor").write_text(vendor + "\n")
    (path / "device").write_text(device + "\n")
    if driver is not None:
        (root / "sys/bus/pci/drivers" / driver).mkdir(parents=True, exist_ok=True)
        link(path / "driver", f"../../../bus/pci/drivers/{driver}")
    if state is not None or services is not None:
        (path / "qat").mkdir()
        (path / "qat" / "state").write_text(f"{state or 'up'}\n")
        (path / "qat" / "cfg_services").write_text(f"{services or 'asym;dc'}\n")
    if group is not None:
        link(path / "iommu_group", f"../../../kernel/iommu_groups/{group}")
    if physfn is not None:
        link(path / "physfn", f"../{physfn}")


def qat_node(
    root: Path,
    *,
    state: str = "up",
    services: str = "asym;dc",
    vf_driver: str | None = "vfio-pci",
    vfio: bool = True,
    group_node: bool = True,
) -> None:
    """A node set up as Envoy's QAT provider needs, unless a keyword says otherwise."""
    (root / "sys/module/intel_qat").mkdir(parents=True)
    (root / "sys/module/qat_4xxx").mkdir(parents=True)
    pci_function(root, PF, "0x4940", driver="4xxx", state=state, services=services)
    pci_function(root, VF, "0x4941", driver=vf_driver, group="17", physfn=PF)
    (root / "dev/vfio").mkdir(parents=True)
    if vfio:
        (root / "dev/vfio/vfio").touch()
    if group_node:
        (root / "dev/vfio/17").touch()


# -- QAT -----------------------------------------------------------------------------------


def test_nothing_at_all(tmp_path: Path) -> None:
    found = detect_accelerators(tmp_path)
    assert not found.qat.usable
    assert found.qat.devices == ()
    assert found.qat.qatlib == ()
    assert "no intel_qat kernel module" in found.qat.reason
    assert not found.cryptomb.usable
    assert "unknown" in found.cryptomb.reason
    assert found.qat.endpoints == ()


def test_qat_ready_for_envoy(tmp_path: Path) -> None:
    qat_node(tmp_path)
    qat = detect_qat(tmp_path)
    assert qat.usable
    assert qat.kernel_module
    assert qat.drivers == ("4xxx",)
    assert [d.address for d in qat.endpoints] == [VF]
    (pf,) = [d for d in qat.devices if not d.virtual]
    assert (pf.device_id, pf.driver, pf.state, pf.services) == (
        "0x4940",
        "4xxx",
        "up",
        ("asym", "dc"),
    )
    (vf,) = qat.endpoints
    assert (vf.driver, vf.iommu_group, vf.group_node, vf.parent) == ("vfio-pci", "17", True, PF)
    assert "1 QAT endpoint" in qat.reason


def test_qat_driver_loaded_but_no_device(tmp_path: Path) -> None:
    (tmp_path / "sys/module/intel_qat").mkdir(parents=True)
    (tmp_path / "sys/bus/pci/drivers/4xxx").mkdir(parents=True)
    qat = detect_qat(tmp_path)
    assert qat.kernel_module
    assert qat.drivers == ("4xxx",)
    assert not qat.usable
    assert "no QAT device" in qat.reason
    assert "4xxx" in qat.reason


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        pytest.param({"state": "down"}, "down", id="endpoint-down"),
        pytest.param({"services": "sym;dc"}, "asym service", id="no-asym-service"),
        pytest.param({"vf_driver": "4xxxvf"}, "bound to vfio-pci", id="vf-on-kernel-driver"),
        pytest.param({"vf_driver": None}, "bound to vfio-pci", id="vf-unbound"),
        pytest.param({"vfio": False}, "/dev/vfio/vfio is missing", id="no-vfio-container"),
        pytest.param({"group_node": False}, "/dev/vfio/<group>", id="no-group-node"),
    ],
)
def test_qat_present_but_not_usable(tmp_path: Path, change: dict[str, object], reason: str) -> None:
    qat_node(tmp_path, **change)  # type: ignore[arg-type]
    qat = detect_qat(tmp_path)
    assert qat.devices  # seen...
    assert not qat.usable  # ...but not something Envoy could open
    assert qat.endpoints == ()
    assert reason in qat.reason


def test_vf_of_an_endpoint_without_asym_does_not_count(tmp_path: Path) -> None:
    qat_node(tmp_path)  # PF with asym, its VF usable
    other_pf, other_vf = "0000:70:00.0", "0000:70:00.1"
    pci_function(tmp_path, other_pf, "0x4942", driver="4xxx", state="up", services="dc")
    pci_function(tmp_path, other_vf, "0x4943", driver="vfio-pci", group="18", physfn=other_pf)
    (tmp_path / "dev/vfio/18").touch()
    assert [d.address for d in detect_qat(tmp_path).endpoints] == [VF]


def test_other_vendors_with_the_same_device_id_are_not_qat(tmp_path: Path) -> None:
    pci_function(tmp_path, PF, "0x4940", driver="nvme", vendor="0x144d")
    assert detect_qat(tmp_path).devices == ()


def test_qatlib_presence_is_reported_and_not_required(tmp_path: Path) -> None:
    qat_node(tmp_path)
    assert detect_qat(tmp_path).qatlib == ()
    assert detect_qat(tmp_path).usable  # Envoy links qatlib statically
    libs = tmp_path / "usr/lib/x86_64-linux-gnu"
    libs.mkdir(parents=True)
    for name in ("libqat.so.4", "libusdm.so.0", "libssl.so.3"):
        (libs / name).touch()
    assert detect_qat(tmp_path).qatlib == (
        "/usr/lib/x86_64-linux-gnu/libqat.so.4",
        "/usr/lib/x86_64-linux-gnu/libusdm.so.0",
    )
    found = detect_accelerators(tmp_path)
    assert "qatlib present" in found.summary()
    assert found.as_json()["qat"]["qatlib"] == list(found.qat.qatlib)


# -- CryptoMB ------------------------------------------------------------------------------

ALL_FLAGS = f"{BASE_FLAGS} {' '.join(CRYPTOMB_CPU_FLAGS)} avx512vl"


def test_cpu_with_every_flag_cryptomb_needs(tmp_path: Path) -> None:
    write_cpuinfo(tmp_path, ALL_FLAGS, ALL_FLAGS)
    support = detect_cryptomb(tmp_path)
    assert support.usable
    assert support.missing == ()


@pytest.mark.parametrize("flag", CRYPTOMB_CPU_FLAGS)
def test_cpu_without_one_required_flag(tmp_path: Path, flag: str) -> None:
    without = " ".join(f for f in ALL_FLAGS.split() if f != flag)
    write_cpuinfo(tmp_path, without)
    support = detect_cryptomb(tmp_path)
    assert not support.usable
    assert support.missing == (flag,)
    assert flag in support.reason


def test_flag_missing_on_one_cpu_only_disables_cryptomb(tmp_path: Path) -> None:
    write_cpuinfo(tmp_path, ALL_FLAGS, ALL_FLAGS.replace(" avx512ifma", ""))
    assert detect_cryptomb(tmp_path).missing == ("avx512ifma",)


def test_flags_are_whole_words(tmp_path: Path) -> None:
    # avx512_vbmi is not avx512_vbmi2, nor avx512f a prefix match of avx512fp16.
    write_cpuinfo(
        tmp_path,
        f"{BASE_FLAGS} bmi2 avx512fp16 avx512dq avx512bw avx512ifma avx512_vbmi",
    )
    assert detect_cryptomb(tmp_path).missing == ("avx512f", "avx512_vbmi2")


def test_a_cpu_like_this_machines(tmp_path: Path) -> None:
    write_cpuinfo(tmp_path, f"{BASE_FLAGS} bmi2")
    support = detect_cryptomb(tmp_path)
    assert support.missing == tuple(f for f in CRYPTOMB_CPU_FLAGS if f != "bmi2")
    assert "the CPU lacks avx512f" in detect_accelerators(tmp_path).summary()
