"""`meshward up` runs every part (server, agent, authz, audit), each with its own health
endpoints, and a signal stops the whole process tree, leaving nothing that blocks the
next start."""

from __future__ import annotations

import ipaddress
import signal
import time
from pathlib import Path

import httpx

from tests.e2e.processes import STOP_DEADLINE, ServerProcess, free_port, server_args

POLICIES = Path(__file__).resolve().parents[2] / "policies"


def _descendants(pid: int) -> dict[int, str]:
    """pid → start time (field 22 of /proc/PID/stat) of every process below ``pid``."""
    parents: dict[int, int] = {}
    started: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        child = int(stat.parent.name)
        parents[child] = int(fields[1])
        started[child] = fields[19]
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found[child] = started[child]
                frontier.append(child)
    return found


def _alive(pid: int, start_time: str) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = text[text.rindex(")") + 2 :].split()
    return fields[19] == start_time and fields[0] != "Z"


def _wait_ok(url: str, process: ServerProcess, deadline: float = 60) -> httpx.Response:
    until = time.monotonic() + deadline
    last = "no answer"
    while time.monotonic() < until:
        assert process.process.poll() is None, process.stderr
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == 200:
                return response
            last = f"{response.status_code} {response.text}"
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise AssertionError(f"{url}: {last}\n--- stderr\n{process.stderr}")


def test_up_runs_every_part_and_a_signal_stops_the_whole_tree(root: Path) -> None:
    ports = {name: free_port() for name in ("server", "agent", "authz", "authz_health", "audit")}
    config = root / "meshward.yaml"
    config.write_text(
        f"server:\n  health_listen: 127.0.0.1:{ports['server']}\n  node_listen: ''\n"
        f"agent:\n  health_listen: 127.0.0.1:{ports['agent']}\n"
        f"authz:\n  listen: 127.0.0.1:{ports['authz']}\n"
        f"  health_listen: 127.0.0.1:{ports['authz_health']}\n"
        f"audit:\n  listen: 127.0.0.1:{ports['audit']}\n"
    )
    data_dir = root / "data"
    health = [f"http://127.0.0.1:{ports[name]}" for name in ("server", "agent", "authz_health")]
    health.append(f"http://127.0.0.1:{ports['audit']}")
    # Twice on the same data dir and ports: what the first run leaves must not block the
    # second. SIGTERM as a service manager stops it; SIGINT as Ctrl-C does.
    for run, sig in enumerate((signal.SIGTERM, signal.SIGINT)):
        up = ServerProcess(
            args=server_args("up", data_dir, config, ["--policies", POLICIES]),
            data_dir=data_dir,
            health_port=ports["server"],
            log_dir=root / f"logs{run}",
        ).start()
        try:
            up.wait_ready()
            for base in health:
                _wait_ok(f"{base}/ready", up)
                assert _wait_ok(f"{base}/live", up).status_code == 200
                assert "# HELP" in _wait_ok(f"{base}/metrics", up).text
            ready = _wait_ok(f"{health[2]}/ready", up).json()
            assert ready["policy_set"]["version"], ready
            listing = up.stdout
            assert f"authz           127.0.0.1:{ports['authz']}" in listing
            assert f"agent           unix://{data_dir}/agent.sock" in listing
            assert f"audit           http://127.0.0.1:{ports['audit']}/" in listing
            tree = _descendants(up.process.pid)
            assert len(tree) >= 2, tree  # authz, and the audit shipper below it
            up.process.send_signal(sig)
            assert up.wait_exit(STOP_DEADLINE) == 0, up.stderr
            assert "Traceback" not in up.stderr
            until = time.monotonic() + 10
            while any(_alive(p, t) for p, t in tree.items()) and time.monotonic() < until:
                time.sleep(0.1)
            assert not [p for p, t in tree.items() if _alive(p, t)], "orphaned processes"
        finally:
            up.kill()


def _listening(pids: set[int]) -> set[str]:
    """Every socket the processes ``pids`` listen on: ``tcp HOST:PORT`` or ``unix PATH``."""
    inodes: set[str] = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = fd.readlink().name
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    found: set[str] = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            address, port = fields[1].split(":")
            # Words of 4 bytes, each in host (little-endian) order.
            raw = b"".join(
                bytes.fromhex(address[i : i + 8])[::-1] for i in range(0, len(address), 8)
            )
            ip = ipaddress.ip_address(raw)
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            found.add(f"tcp {ip}:{int(port, 16)}")
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        # Flags 00010000: __SO_ACCEPTCON, a listening socket.
        if len(fields) >= 8 and fields[6] in inodes and int(fields[3], 16) & 0x10000:
            found.add(f"unix {fields[7]}")
    return found


def test_nothing_listens_but_what_the_readme_lists(root: Path) -> None:
    names = ("server", "node", "attestation", "agent", "authz", "authz_health", "audit")
    ports = {name: free_port() for name in names}
    config = root / "meshward.yaml"
    config.write_text(
        f"server:\n  health_listen: 127.0.0.1:{ports['server']}\n"
        f"  node_listen: 127.0.0.1:{ports['node']}\n"
        f"  attestation_listen: 127.0.0.1:{ports['attestation']}\n"
        f"agent:\n  health_listen: 127.0.0.1:{ports['agent']}\n"
        f"  server_address: 127.0.0.1:{ports['node']}\n"
        f"  attestation_address: 127.0.0.1:{ports['attestation']}\n"
        f"authz:\n  listen: 127.0.0.1:{ports['authz']}\n"
        f"  health_listen: 127.0.0.1:{ports['authz_health']}\n"
        f"audit:\n  listen: 127.0.0.1:{ports['audit']}\n"
    )
    data_dir = root / "data"
    up = ServerProcess(
        args=server_args("up", data_dir, config, ["--policies", POLICIES]),
        data_dir=data_dir,
        health_port=ports["server"],
        log_dir=root / "logs",
    ).start()
    try:
        up.wait_ready()
        _wait_ok(f"http://127.0.0.1:{ports['authz_health']}/ready", up)
        _wait_ok(f"http://127.0.0.1:{ports['audit']}/ready", up)
        # The README's list (Data dir and security, "What listens"), with these ports.
        expected = {f"tcp 127.0.0.1:{port}" for port in ports.values()} | {
            f"unix {data_dir}/admin/admin.sock",
            f"unix {data_dir}/agent.sock",
            f"unix {data_dir}/agent/grpc.sock",
        }
        until = time.monotonic() + 30
        while True:
            found = _listening({up.process.pid, *_descendants(up.process.pid)})
            if found >= expected or time.monotonic() > until:
                break
            time.sleep(0.2)
        assert found == expected
    finally:
        up.kill()
