"""The unix workload attestor, on this test process and on fake /proc trees."""

from __future__ import annotations

import hashlib
import os
import pwd
from pathlib import Path

import pytest

from identity.errors import AttestationError
from identity.peers import Peer, process_start_time
from identity.selectors import Selector
from identity.unix_attestor import UnixAttestor


def me() -> Peer:
    start = process_start_time(os.getpid())
    assert start is not None
    return Peer(pid=os.getpid(), uid=os.getuid(), gid=os.getgid(), start_time=start)


def fake_proc(root: Path, pid: int, *, start: int, groups: str, comm: str = "web (v2) x") -> Path:
    """A /proc with one process; ``comm`` holds spaces and parentheses as real ones may."""
    proc = root / "proc"
    (proc / str(pid)).mkdir(parents=True)
    rest = ["S"] + ["0"] * 18 + [str(start)] + ["0"] * 30
    (proc / str(pid) / "stat").write_text(f"{pid} ({comm}) {' '.join(rest)}\n")
    (proc / str(pid) / "status").write_text(f"Name:\tweb\nGroups:\t{groups}\nVmRSS:\t1 kB\n")
    return proc


def test_selectors_of_this_process() -> None:
    selectors = UnixAttestor().attest(me())
    assert Selector("unix", "uid", str(os.getuid())) in selectors
    assert Selector("unix", "gid", str(os.getgid())) in selectors
    assert Selector("unix", "user", pwd.getpwuid(os.getuid()).pw_name) in selectors
    assert not [s for s in selectors if s.key in ("path", "sha256")]
    assert list(selectors) == sorted(set(selectors))


def test_path_and_sha256_when_path_discovery_is_on() -> None:
    selectors = {s.key: s.value for s in UnixAttestor(discover_workload_path=True).attest(me())}
    binary = os.readlink("/proc/self/exe")
    assert selectors["path"] == binary
    assert selectors["sha256"] == hashlib.sha256(Path(binary).read_bytes()).hexdigest()


def test_binary_over_the_size_limit_fails() -> None:
    with pytest.raises(AttestationError, match="over the 10-byte limit"):
        UnixAttestor(discover_workload_path=True, workload_size_limit=10).attest(me())


def test_supplementary_groups_come_from_proc_status(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, 4242, start=777, groups="0 99999 10")
    selectors = UnixAttestor(proc=proc).attest(Peer(pid=4242, uid=99998, gid=99997, start_time=777))
    assert [s for s in selectors if s.key == "supplementary_gid"] == [
        Selector("unix", "supplementary_gid", "0"),
        Selector("unix", "supplementary_gid", "10"),
        Selector("unix", "supplementary_gid", "99999"),
    ]
    assert Selector("unix", "supplementary_group", "root") in selectors
    # uids and gids with no name still give their numeric selectors, and no name selector.
    assert Selector("unix", "uid", "99998") in selectors
    assert not [s for s in selectors if s.key in ("user", "group")]


def test_pid_reused_during_attestation_fails(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, 4242, start=778, groups="")
    with pytest.raises(AttestationError, match="pid was reused"):
        UnixAttestor(proc=proc).attest(Peer(pid=4242, uid=0, gid=0, start_time=777))


def test_exited_process_fails(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    with pytest.raises(AttestationError, match="groups of process 4242"):
        UnixAttestor(proc=tmp_path / "proc").attest(Peer(pid=4242, uid=0, gid=0, start_time=1))


def test_start_time_is_read_after_the_last_parenthesis(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, 7, start=123456, groups="", comm="a) b (c")
    assert process_start_time(7, proc) == 123456
