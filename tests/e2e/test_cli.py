"""End to end: `meshward up`/`server` as real processes, driven by the `meshward` CLI."""

from __future__ import annotations

import json
import re
import socket
import stat
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, Store
from spiffe import JwtBundle, JwtSvid, SpiffeId, TrustDomain, X509Bundle, X509Svid

from tests.conftest import _postgres_database
from tests.e2e.processes import (
    CliResult,
    ServerProcess,
    cli_env,
    free_port,
    run_cli,
    running_server,
    write_config,
)

TD = TrustDomain("example.org")
# `meshward up` runs the agent in-process: entries without --parent-id belong to it.
DEFAULT_PARENT = "spiffe://example.org/meshward/agent/local"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One `meshward up` shared by the tests below; each uses SPIFFE IDs of its own."""
    with running_server(tmp_path_factory.mktemp("mw")) as process:
        yield process
    # running_server sent SIGTERM; a clean stop is exit code 0 without a traceback.
    assert process.process.returncode == 0, process.stderr
    assert "Traceback" not in process.stderr


def cli(server: ServerProcess, *args: str | Path) -> CliResult:
    return run_cli(*args, "--data-dir", server.data_dir)


def unique_id(name: str = "web") -> str:
    return f"spiffe://example.org/e2e/{name}-{uuid.uuid4().hex[:8]}"


def field_lines(text: str) -> dict[str, list[str]]:
    """`Key   : value` lines of the text output, by key (keys repeat for lists)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def entries(server: ServerProcess) -> list[dict[str, Any]]:
    return list(cli(server, "entry", "list", "--output", "json").json())


def assert_one_error_line(result: CliResult, *mentions: str) -> str:
    """Exit code != 0, exactly one line on stderr, starting with "error:", no traceback."""
    assert result.returncode != 0, result.describe()
    assert "Traceback" not in result.stderr + result.stdout, result.describe()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.describe()
    assert lines[0].startswith("error: "), result.describe()
    for mention in mentions:
        assert mention in lines[0], result.describe()
    return lines[0]


def verify(svid_pem: bytes, bundle_pem: bytes) -> x509.Certificate:
    chain = x509.load_pem_x509_certificates(svid_pem)
    roots = x509.load_pem_x509_certificates(bundle_pem)
    verifier = PolicyBuilder().store(Store(roots)).time(datetime.now(UTC)).build_client_verifier()
    verified = verifier.verify(chain[0], chain[1:])
    assert verified.chain[-1] in roots
    return chain[0]


# -- entries --------------------------------------------------------------------------


def test_entry_lifecycle_in_text(server: ServerProcess) -> None:
    spiffe_id = unique_id()

    created = cli(
        server,
        "entry",
        "create",
        "--spiffe-id",
        spiffe_id,
        "--selector",
        "unix:uid:1000",
        "--selector",
        "k8s:pod-label:app:web",
        "--x509-svid-ttl",
        "30m",
        "--dns",
        "web.default.svc",
    ).ok()
    fields = field_lines(created.stdout)
    (entry_id,) = fields["Entry ID"]
    assert re.fullmatch(r"[0-9a-f-]{36}", entry_id)
    assert fields["SPIFFE ID"] == [spiffe_id]
    assert fields["Parent ID"] == [DEFAULT_PARENT]
    assert fields["Selector"] == ["k8s:pod-label:app:web", "unix:uid:1000"]
    assert fields["X509-SVID TTL"] == ["30m"]
    assert fields["JWT-SVID TTL"] == ["default"]
    assert fields["DNS name"] == ["web.default.svc"]
    assert fields["Admin"] == ["no"]
    assert fields["Expires at"] == ["never"]
    revision = int(fields["Revision"][0])

    shown = cli(server, "entry", "show", entry_id).ok()
    assert shown.stdout == created.stdout

    listed = cli(server, "entry", "list", "--spiffe-id", spiffe_id).ok()
    assert field_lines(listed.stdout)["Entry ID"] == [entry_id]
    assert listed.stdout.rstrip().endswith("1 entries")

    updated = cli(
        server,
        "entry",
        "update",
        entry_id,
        "--selector",
        "k8s:sa:web",
        "--hint",
        "blue",
        "--admin",
        "--jwt-svid-ttl",
        "90s",
    ).ok()
    after = field_lines(updated.stdout)
    assert after["Entry ID"] == [entry_id]
    assert after["Selector"] == ["k8s:sa:web"]
    assert after["Hint"] == ["blue"]
    assert after["Admin"] == ["yes"]
    assert after["JWT-SVID TTL"] == ["1m30s"]
    assert after["X509-SVID TTL"] == ["30m"]  # not given: unchanged
    assert after["DNS name"] == ["web.default.svc"]
    assert int(after["Revision"][0]) > revision

    deleted = cli(server, "entry", "delete", entry_id).ok()
    assert deleted.stdout.strip() == f"deleted entry {entry_id} ({spiffe_id})"
    assert cli(server, "entry", "list", "--spiffe-id", spiffe_id).ok().stdout.strip() == (
        "no entries"
    )
    assert_one_error_line(cli(server, "entry", "show", entry_id), "id", entry_id)


def test_entry_lifecycle_in_json(server: ServerProcess) -> None:
    spiffe_id = unique_id("api")
    created = cli(
        server,
        "entry",
        "create",
        "--output",
        "json",
        "--spiffe-id",
        spiffe_id,
        "--parent-id",
        "spiffe://example.org/agent/node-1",
        "--selector",
        "unix:uid:1001",
        "--expires-at",
        "2099-01-01T00:00:00Z",
    ).json()
    assert created["spiffe_id"] == spiffe_id
    assert created["parent_id"] == "spiffe://example.org/agent/node-1"
    assert created["selectors"] == ["unix:uid:1001"]
    assert datetime.fromisoformat(created["expires_at"]) == datetime(2099, 1, 1, tzinfo=UTC)

    assert cli(server, "entry", "show", created["id"], "--output", "json").json() == created
    by_selector = cli(
        server, "entry", "list", "--output", "json", "--selector", "unix:uid:1001"
    ).json()
    assert created in by_selector
    assert all("unix:uid:1001" in e["selectors"] for e in by_selector)
    by_parent = cli(
        server, "entry", "list", "--output", "json", "--parent-id", created["parent_id"]
    ).json()
    assert created["id"] in {e["id"] for e in by_parent}

    updated = cli(
        server, "entry", "update", created["id"], "--output", "json", "--x509-svid-ttl", "2h"
    ).json()
    assert updated["x509_svid_ttl"] == 7200
    assert updated["revision"] > created["revision"]
    assert {
        k: v for k, v in updated.items() if k not in {"x509_svid_ttl", "revision", "updated_at"}
    } == {k: v for k, v in created.items() if k not in {"x509_svid_ttl", "revision", "updated_at"}}

    deleted = cli(server, "entry", "delete", created["id"], "--output", "json").json()
    assert deleted == updated
    assert created["id"] not in {e["id"] for e in entries(server)}


def test_duplicate_entry_through_the_cli(server: ServerProcess) -> None:
    spiffe_id = unique_id()
    args = ("entry", "create", "--spiffe-id", spiffe_id, "--selector", "unix:uid:7")
    cli(server, *args).ok()
    before = entries(server)
    line = assert_one_error_line(cli(server, *args), "already gives", spiffe_id)
    assert "update it instead" in line
    assert entries(server) == before


def bad_inputs() -> list[Any]:
    eid = "00000000-0000-0000-0000-000000000000"
    create = ("entry", "create", "--selector", "unix:uid:1000")
    good_id = ("--spiffe-id", "spiffe://example.org/e2e/bad-input")
    return [
        pytest.param(
            (*create, "--spiffe-id", "spiffe://example.org/a//b"),
            ("spiffe_id",),
            id="malformed spiffe id",
        ),
        pytest.param(
            (*create, "--spiffe-id", "spiffe://Example.org/a"),
            ("spiffe_id", "lowercase"),
            id="uppercase trust domain",
        ),
        pytest.param(
            (*create, "--spiffe-id", "spiffe://other.org/a"),
            ("spiffe_id", "other.org"),
            id="other trust domain",
        ),
        pytest.param(
            ("entry", "create", *good_id, "--selector", "unix:uid"),
            ("selectors[0]",),
            id="bad selector",
        ),
        pytest.param(
            ("entry", "create", *good_id, "--selector", "unix:uid:1", "--selector", "UNIX:uid:2"),
            ("selectors[1]",),
            id="second selector bad",
        ),
        pytest.param(
            (*create, *good_id, "--x509-svid-ttl", "31d"), ("x509_svid_ttl",), id="ttl out of range"
        ),
        pytest.param(
            (*create, *good_id, "--dns", "bad_name"), ("dns_names[0]",), id="bad dns name"
        ),
        pytest.param(
            (*create, *good_id, "--expires-at", "2001-01-01"),
            ("expires_at", "past"),
            id="expiry in the past",
        ),
        pytest.param(
            (*create, *good_id, "--x509-svid-ttl", "1x"), ("x509-svid-ttl",), id="bad ttl syntax"
        ),
        pytest.param(
            (*create, *good_id, "--x509-svid-ttl", "99999999999d"),
            ("x509-svid-ttl",),
            id="huge ttl",
        ),
        pytest.param(("entry", "show", eid), ("id", eid), id="unknown id show"),
        pytest.param(("entry", "update", eid, "--hint", "x"), ("id", eid), id="unknown id update"),
        pytest.param(("entry", "delete", eid), ("id", eid), id="unknown id delete"),
        pytest.param(("entry", "list", "--selector", "unix"), ("selector",), id="bad list filter"),
        pytest.param(("token", "generate", "--ttl", "8d"), ("ttl",), id="token ttl out of range"),
        pytest.param(
            ("jwt", "mint", "--spiffe-id", "spiffe://example.org/a", "--audience", " "),
            ("audience",),
            id="blank audience",
        ),
    ]


@pytest.mark.parametrize(("args", "mentions"), bad_inputs())
def test_bad_input_gives_one_error_line_and_changes_nothing(
    server: ServerProcess, args: tuple[str, ...], mentions: tuple[str, ...]
) -> None:
    before = entries(server)
    assert_one_error_line(cli(server, *args), *mentions)
    assert entries(server) == before


def test_bad_mint_writes_no_files(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "svid"
    result = cli(server, "svid", "mint", "--spiffe-id", "spiffe://other.org/web", "--out", out)
    assert_one_error_line(result, "spiffe_id", "other.org")
    assert not out.exists()


# -- tokens, SVIDs, bundle, CA --------------------------------------------------------


def test_token_generate(server: ServerProcess) -> None:
    text = cli(server, "token", "generate").ok().stdout.splitlines()
    assert len(text) == 2
    assert text[0].startswith("Token: ")
    assert len(text[0].removeprefix("Token: ")) >= 32
    assert text[1].startswith("Expires at: ")

    before = datetime.now(UTC)
    issued = cli(server, "token", "generate", "--ttl", "1h", "--output", "json").json()
    after = datetime.now(UTC)
    assert set(issued) == {"token", "id", "expires_at"}
    expires = datetime.fromisoformat(issued["expires_at"])
    assert before + timedelta(hours=1) - timedelta(seconds=1) <= expires
    assert expires <= after + timedelta(hours=1)
    assert issued["token"] != text[0].removeprefix("Token: ")


def test_svid_mint(server: ServerProcess, tmp_path: Path) -> None:
    spiffe_id = unique_id()
    out = tmp_path / "web"

    result = cli(
        server,
        "svid",
        "mint",
        "--spiffe-id",
        spiffe_id,
        "--dns",
        "web.default.svc",
        "--ttl",
        "30m",
        "--out",
        out,
    ).ok()

    files = {name: out / name for name in ("svid.pem", "key.pem", "bundle.pem")}
    assert all(path.is_file() for path in files.values())
    assert stat.S_IMODE(files["key.pem"].stat().st_mode) == 0o600
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert "PRIVATE KEY" not in result.stdout
    key = serialization.load_pem_private_key(files["key.pem"].read_bytes(), password=None)
    leaf = verify(files["svid.pem"].read_bytes(), files["bundle.pem"].read_bytes())
    assert leaf.public_key() == key.public_key()
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe_id]
    assert sans.get_values_for_type(x509.DNSName) == ["web.default.svc"]
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == timedelta(minutes=30, seconds=10)

    svid = X509Svid.load(files["svid.pem"], files["key.pem"], serialization.Encoding.PEM)
    assert svid.spiffe_id == SpiffeId(spiffe_id)
    parsed = X509Svid.parse(files["svid.pem"].read_bytes(), files["key.pem"].read_bytes())
    assert parsed.leaf == leaf
    bundle = X509Bundle.parse(TD, files["bundle.pem"].read_bytes())
    assert leaf.issuer in {a.subject for a in bundle.x509_authorities}

    text = field_lines(result.stdout)
    assert text["SPIFFE ID"] == [spiffe_id]
    assert text["Serial"] == [f"{leaf.serial_number:x}"]
    assert text["DNS names"] == ["web.default.svc"]


def test_svid_mint_json_and_key_types(server: ServerProcess, tmp_path: Path) -> None:
    spiffe_id = unique_id()
    for key_type in ("ec-p384", "rsa-2048"):
        out = tmp_path / key_type
        summary = cli(
            server,
            "svid",
            "mint",
            "--spiffe-id",
            spiffe_id,
            "--key-type",
            key_type,
            "--out",
            out,
            "--output",
            "json",
        ).json()
        assert summary["spiffe_id"] == spiffe_id
        assert summary["files"] == {n: str(out / n) for n in ("svid.pem", "key.pem", "bundle.pem")}
        assert summary["chain"][0]["uri_sans"] == [spiffe_id]
        assert summary["capped"] is False
        svid = X509Svid.load(out / "svid.pem", out / "key.pem", serialization.Encoding.PEM)
        assert f"{svid.leaf.serial_number:x}" == summary["serial"]
        verify((out / "svid.pem").read_bytes(), (out / "bundle.pem").read_bytes())


def jwt_bundle(server: ServerProcess) -> JwtBundle:
    jwks = json.loads(cli(server, "bundle", "show", "--format", "jwks").ok().stdout)
    keys = [k for k in jwks["keys"] if k["use"] == "jwt-svid"]
    return JwtBundle.parse(TD, json.dumps({"keys": keys}).encode())


def test_jwt_mint(server: ServerProcess) -> None:
    spiffe_id = unique_id()
    token = cli(
        server, "jwt", "mint", "--spiffe-id", spiffe_id, "--audience", "reviews", "--ttl", "2m"
    ).ok()
    lines = token.stdout.splitlines()
    assert len(lines) == 1  # the token alone, ready for a shell variable

    svid = JwtSvid.parse_and_validate(lines[0], jwt_bundle(server), {"reviews"})
    assert svid.spiffe_id == SpiffeId(spiffe_id)

    minted = cli(
        server,
        "jwt",
        "mint",
        "--spiffe-id",
        spiffe_id,
        "--audience",
        "a",
        "--audience",
        "b",
        "--output",
        "json",
    ).json()
    assert minted["audience"] == ["a", "b"]
    JwtSvid.parse_and_validate(minted["token"], jwt_bundle(server), {"a", "b"})


def test_bundle_show(server: ServerProcess) -> None:
    ca = cli(server, "ca", "show", "--output", "json").json()
    serials = {s["serial"] for s in ca["slots"]}

    pem = cli(server, "bundle", "show").ok().stdout  # pem is the default
    assert cli(server, "bundle", "show", "--format", "pem").ok().stdout == pem
    roots = x509.load_pem_x509_certificates(pem.encode())
    assert {f"{r.serial_number:x}" for r in roots} == serials
    assert json.loads(cli(server, "bundle", "show", "--output", "json").ok().stdout) == {"pem": pem}

    jwks = json.loads(cli(server, "bundle", "show", "--format", "jwks").ok().stdout)
    assert {k["use"] for k in jwks["keys"]} == {"x509-svid", "jwt-svid"}
    assert {k["kid"] for k in jwks["keys"] if k["use"] == "jwt-svid"} == {
        s["jwt_key_id"] for s in ca["slots"]
    }
    assert jwks["spiffe_sequence"] == ca["bundle_sequence"]


def test_ca_show(server: ServerProcess) -> None:
    shown = cli(server, "ca", "show").ok().stdout
    fields = field_lines(shown)
    assert fields["Trust domain"] == ["example.org"]
    assert fields["Upstream"] == ["none (self-signed)"]
    assert re.search(r"^CA [0-9a-f-]{36}  \[ACTIVE\]$", shown, re.MULTILINE)
    ca = cli(server, "ca", "show", "--output", "json").json()
    assert ca["trust_domain"] == "example.org"
    assert [s["state"] for s in ca["slots"]].count("active") == 1


def test_health_endpoints(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.health_url, timeout=10) as client:
        assert client.get("/live").json() == {"status": "live"}
        ready = client.get("/ready")
        metrics = client.get("/metrics").text
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"
    assert 'meshward_svids_signed_total{type="ca"}' in metrics
    assert "meshward_ca_expiry_timestamp_seconds " in metrics
    count = len(entries(server))
    with httpx.Client(base_url=server.health_url, timeout=10) as client:
        metrics = client.get("/metrics").text
    assert f"meshward_registration_entries {float(count)}" in metrics


def test_ca_rotate_then_sigterm(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("mw")
    with running_server(root) as server:
        before = cli(server, "ca", "show", "--output", "json").json()
        out = root / "old-svid"
        cli(server, "svid", "mint", "--spiffe-id", unique_id(), "--out", out).ok()

        rotated = cli(server, "ca", "rotate").ok().stdout
        assert re.search(r"^prepared CA [0-9a-f-]{36}", rotated, re.MULTILINE)
        assert re.search(r"^activated CA [0-9a-f-]{36}", rotated, re.MULTILINE)

        after = cli(server, "ca", "show", "--output", "json").json()
        states = {s["id"]: s["state"] for s in after["slots"]}
        (old,) = before["slots"]
        assert states.pop(old["id"]) == "old"
        assert list(states.values()) == ["active"]
        assert after["bundle_sequence"] > before["bundle_sequence"]

        bundle = cli(server, "bundle", "show").ok().stdout.encode()
        assert len(x509.load_pem_x509_certificates(bundle)) == 2
        verify((out / "svid.pem").read_bytes(), bundle)  # old SVIDs still verify
        json_rotation = cli(server, "ca", "rotate", "--output", "json").json()
        assert len(json_rotation["ca"]["slots"]) == 3
        socket_path = server.data_dir / "admin" / "admin.sock"
        assert socket_path.exists()
        assert stat.S_IMODE(socket_path.parent.stat().st_mode) == 0o700

    assert server.process.returncode == 0, server.stderr
    assert "Traceback" not in server.stderr
    # After a clean stop the CLI reports that no server answers, in one line.
    assert_one_error_line(cli(server, "ca", "show"), str(socket_path))


def test_server_restarts_on_its_data_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("mw")
    spiffe_id = unique_id()
    with running_server(root) as first:
        created = cli(
            first,
            "entry",
            "create",
            "--spiffe-id",
            spiffe_id,
            "--selector",
            "unix:uid:5",
            "--output",
            "json",
        ).json()
        ca = cli(first, "ca", "show", "--output", "json").json()
    with running_server(root) as second:
        assert cli(second, "entry", "show", created["id"], "--output", "json").json() == created
        assert cli(second, "ca", "show", "--output", "json").json()["slots"] == ca["slots"]
    assert second.process.returncode == 0, second.stderr


# -- no server, bad start-up ----------------------------------------------------------


def test_cli_without_a_server(tmp_path: Path) -> None:
    data_dir = tmp_path / "nothing-here"
    result = run_cli("entry", "list", "--data-dir", data_dir)
    line = assert_one_error_line(result, str(data_dir / "admin" / "admin.sock"))
    assert f"meshward up --data-dir {data_dir}" in line


def exits_with_error(args: list[str | Path], *mentions: str) -> str:
    result = run_cli(*args, timeout=60)
    return assert_one_error_line(result, *mentions)


def test_server_without_trust_domain(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", health_port=free_port())
    exits_with_error(
        ["server", "--data-dir", tmp_path / "d", "--config", config],
        "trust_domain",
        "--trust-domain",
    )


def test_server_with_bad_trust_domain(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", health_port=free_port())
    exits_with_error(
        [
            "server",
            "--data-dir",
            tmp_path / "d",
            "--config",
            config,
            "--trust-domain",
            "Bad Domain",
        ],
        "trust_domain",
        "flag --trust-domain",
    )


def test_server_with_unreachable_database(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", health_port=free_port())
    line = exits_with_error(
        [
            "server",
            "--trust-domain",
            "example.org",
            "--data-dir",
            tmp_path / "d",
            "--config",
            config,
            "--database-url",
            "postgresql://postgres@127.0.0.1:1/x",
        ],
        "database_url",
        "127.0.0.1:1",
    )
    assert "check that the server is up" in line


def test_server_with_password_in_a_malformed_database_url(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", health_port=free_port())
    line = exits_with_error(
        [
            "server",
            "--trust-domain",
            "example.org",
            "--data-dir",
            tmp_path / "d",
            "--config",
            config,
            "--database-url",
            "postgresql://u:secret@127.0.0.1:port/x",
        ],
        "database_url",
    )
    assert "secret" not in line


def test_server_with_data_dir_under_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    config = write_config(tmp_path / "c.yaml", health_port=free_port())
    exits_with_error(
        [
            "server",
            "--trust-domain",
            "example.org",
            "--data-dir",
            blocker / "data",
            "--config",
            config,
        ],
        "data dir",
        str(blocker / "data"),
        "Not a directory",
    )


def test_server_with_unknown_config_key(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", health_port=free_port(), extra="trust_domian: x\n")
    exits_with_error(
        [
            "server",
            "--trust-domain",
            "example.org",
            "--data-dir",
            tmp_path / "d",
            "--config",
            config,
        ],
        "trust_domian",
        "unknown key",
        str(config),
    )


def test_server_with_unknown_environment_variable(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", health_port=free_port())
    result = run_cli(
        "up",
        "--data-dir",
        tmp_path / "d",
        "--config",
        config,
        env=cli_env(MESHWARD_CA__TLL="1h"),
        timeout=60,
    )
    assert_one_error_line(result, "ca.tll", "MESHWARD_CA__TLL")


def test_server_with_invalid_yaml(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("server:\n  health_listen: [\n")
    exits_with_error(["up", "--data-dir", tmp_path / "d", "--config", config], str(config), "line")


def test_second_server_on_the_same_data_dir_refuses(server: ServerProcess, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", health_port=free_port())
    socket_path = server.data_dir / "admin" / "admin.sock"
    exits_with_error(
        ["up", "--data-dir", server.data_dir, "--config", config],
        "another meshward server",
        str(socket_path),
    )
    # The first server is untouched and still answers.
    assert socket_path.exists()
    cli(server, "ca", "show").ok()


def test_server_with_health_port_in_use(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("mw")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_config(root / "c.yaml", health_port=port)
        line = exits_with_error(
            ["up", "--data-dir", root / "d", "--config", config], f"127.0.0.1:{port}"
        )
    assert "health_listen" in line


def test_data_dir_too_long_for_the_admin_socket(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("mw")
    data_dir = root / ("d" * 100)
    config = write_config(root / "c.yaml", health_port=free_port())
    exits_with_error(["up", "--data-dir", data_dir, "--config", config], "admin.sock")


# -- PostgreSQL -----------------------------------------------------------------------


@pytest.fixture
def postgres_url() -> Iterator[str]:
    yield from _postgres_database()


@pytest.mark.postgres
def test_server_on_postgresql(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("mw")
    extra = ("--trust-domain", "example.org", "--database-url", postgres_url)
    spiffe_id = unique_id()
    with running_server(root, command="server", extra=extra) as server:
        created = cli(
            server,
            "entry",
            "create",
            "--spiffe-id",
            spiffe_id,
            "--selector",
            "unix:uid:1",
            "--output",
            "json",
        ).json()
        out = root / "svid"
        cli(server, "svid", "mint", "--spiffe-id", spiffe_id, "--out", out).ok()
        verify((out / "svid.pem").read_bytes(), (out / "bundle.pem").read_bytes())
        listed = cli(server, "entry", "list", "--output", "json").json()
        assert [e["id"] for e in listed] == [created["id"]]
        token = cli(server, "jwt", "mint", "--spiffe-id", spiffe_id, "--audience", "a").ok()
        JwtSvid.parse_and_validate(token.stdout.strip(), jwt_bundle(server), {"a"})

    assert server.process.returncode == 0, server.stderr
    assert not (server.data_dir / "meshward.db").exists()
    plain = postgres_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(plain, connect_timeout=5) as conn:
        stored = conn.execute("SELECT id, spiffe_id FROM entries").fetchall()
        slots = conn.execute("SELECT state FROM ca_slots").fetchall()
        issued = conn.execute(
            "SELECT count(*) FROM issued_certificates WHERE spiffe_id = %s", (spiffe_id,)
        ).fetchone()
    assert stored == [(created["id"], spiffe_id)]
    assert slots == [("active",)]
    assert issued == (1,)
