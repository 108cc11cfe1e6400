"""Configuration layering (file < environment < flags), validation messages, and durations."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from identity.keys import KeyType
from meshward.config import DEFAULT_DATA_DIR, Config, ConfigError, load_config
from meshward.durations import format_duration, parse_duration


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- defaults and layering ------------------------------------------------------------


def test_defaults() -> None:
    config = load_config(None, env={}, flags={})

    assert config.trust_domain is None
    assert config.data_dir == DEFAULT_DATA_DIR == Path(".meshward")
    assert config.database_url is None
    assert config.log_level == "info"
    assert config.server.health_listen == "127.0.0.1:8088"
    assert config.server.admin_socket is None
    assert config.admin_socket == Path(".meshward/admin/admin.sock")
    assert config.ca.key_type is KeyType.EC_P256
    assert config.ca.jwt_key_type is KeyType.EC_P256
    assert config.ca.ttl == timedelta(hours=24)
    assert config.ca.bundle_grace == timedelta(hours=1)
    assert config.ca.upstream is None
    assert config.svid.x509_ttl == timedelta(hours=1)
    assert config.svid.jwt_ttl == timedelta(minutes=5)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path / "c.yaml", ""), env={}) == Config()


def test_yaml_file_values(tmp_path: Path) -> None:
    path = write(
        tmp_path / "meshward.yaml",
        """
trust_domain: prod.example.com
data_dir: /var/lib/meshward
database_url: postgresql+psycopg://meshward@db:5432/meshward
log_level: debug
server:
  admin_socket: /run/meshward/admin.sock
  health_listen: 0.0.0.0:9000
ca:
  key_type: ec-p384
  jwt_key_type: rsa-2048
  ttl: 12h
  bundle_grace: 90m
  upstream:
    cert_file: /etc/up.pem
    key_file: /etc/up.key
svid:
  x509_ttl: 30m
  jwt_ttl: 90s
""",
    )

    config = load_config(path, env={})

    assert config.trust_domain == "prod.example.com"
    assert config.data_dir == Path("/var/lib/meshward")
    assert config.database_url == "postgresql+psycopg://meshward@db:5432/meshward"
    assert config.log_level == "debug"
    assert config.admin_socket == Path("/run/meshward/admin.sock")
    assert config.server.health_listen == "0.0.0.0:9000"
    assert config.ca.key_type is KeyType.EC_P384
    assert config.ca.jwt_key_type is KeyType.RSA_2048
    assert config.ca.ttl == timedelta(hours=12)
    assert config.ca.bundle_grace == timedelta(minutes=90)
    assert config.ca.upstream is not None
    assert config.ca.upstream.cert_file == Path("/etc/up.pem")
    assert config.ca.upstream.key_file == Path("/etc/up.key")
    assert config.ca.upstream.bundle_file is None
    assert config.svid.x509_ttl == timedelta(minutes=30)
    assert config.svid.jwt_ttl == timedelta(seconds=90)


def test_admin_socket_follows_data_dir() -> None:
    config = load_config(None, env={}, flags={"data_dir": Path("/srv/mw")})
    assert config.admin_socket == Path("/srv/mw/admin/admin.sock")


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.yaml",
        "trust_domain: file.example\nca:\n  ttl: 24h\n  key_type: ec-p384\n",
    )

    config = load_config(
        path,
        env={
            "MESHWARD_TRUST_DOMAIN": "env.example",
            "MESHWARD_CA__TTL": "12h",
            "MESHWARD_SERVER__HEALTH_LISTEN": "127.0.0.1:9000",
            "HOME": "/root",  # not ours: ignored
        },
    )

    assert config.trust_domain == "env.example"
    assert config.ca.ttl == timedelta(hours=12)
    assert config.ca.key_type is KeyType.EC_P384  # untouched by the environment
    assert config.server.health_listen == "127.0.0.1:9000"


def test_cli_variables_are_not_config_keys() -> None:
    config = load_config(None, env={"MESHWARD_CONFIG": "/x.yaml", "MESHWARD_OUTPUT": "json"})
    assert config == Config()


def test_flags_override_environment_and_file(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "trust_domain: file.example\nlog_level: debug\n")

    config = load_config(
        path,
        env={"MESHWARD_TRUST_DOMAIN": "env.example", "MESHWARD_CA__TTL": "12h"},
        flags={
            "trust_domain": "flag.example",
            "ca.ttl": "2h",
            "data_dir": Path("/flag/dir"),
            "database_url": None,  # a flag not given does not override
        },
    )

    assert config.trust_domain == "flag.example"
    assert config.ca.ttl == timedelta(hours=2)
    assert config.data_dir == Path("/flag/dir")
    assert config.log_level == "debug"
    assert config.database_url is None


def test_environment_is_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHWARD_TRUST_DOMAIN", "from-os.example")
    assert load_config(None).trust_domain == "from-os.example"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("10m", timedelta(minutes=10)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("2d", timedelta(days=2)),
        ("3600", timedelta(hours=1)),
    ],
)
def test_durations_in_config(tmp_path: Path, text: str, expected: timedelta) -> None:
    path = write(tmp_path / "c.yaml", f"ca:\n  ttl: '{text}'\n  bundle_grace: {text}\n")
    config = load_config(path, env={})
    assert config.ca.ttl == expected
    assert config.ca.bundle_grace == expected


def test_spiffe_prefixed_trust_domain_is_normalised() -> None:
    config = load_config(None, env={"MESHWARD_TRUST_DOMAIN": "spiffe://example.org"})
    assert config.trust_domain == "example.org"


def test_config_is_frozen() -> None:
    config = load_config(None, env={})
    with pytest.raises(ValueError, match="frozen"):
        config.log_level = "debug"  # type: ignore[misc]


# -- errors name the key and where it came from ---------------------------------------


def config_error(
    path: Path | None = None, env: dict[str, str] | None = None, **flags: object
) -> str:
    with pytest.raises(ConfigError) as raised:
        load_config(path, env=env or {}, flags=flags)
    message = str(raised.value)
    assert "Traceback" not in message
    return message


def test_unknown_yaml_key(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "trust_domain: example.org\ntrust_domian: typo.org\n")
    message = config_error(path)
    assert message.startswith("config trust_domian: unknown key")
    assert f"(from {path})" in message


def test_unknown_nested_yaml_key(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "ca:\n  tll: 1h\n")
    message = config_error(path)
    assert message.startswith("config ca.tll: unknown key")
    assert str(path) in message


def test_unknown_environment_variable() -> None:
    message = config_error(env={"MESHWARD_TRUST_DOMIAN": "example.org"})
    assert message.startswith("config trust_domian: unknown key")
    assert "environment variable MESHWARD_TRUST_DOMIAN" in message


def test_bad_duration_names_key_and_environment_variable() -> None:
    message = config_error(env={"MESHWARD_CA__TTL": "12 hours"})
    assert message.startswith("config ca.ttl: ")
    assert "'12 hours' is not a duration" in message
    assert "environment variable MESHWARD_CA__TTL" in message


def test_bad_duration_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "svid:\n  jwt_ttl: 5 minutes\n")
    message = config_error(path)
    assert message.startswith("config svid.jwt_ttl: ")
    assert "is not a duration" in message
    assert f"(from {path})" in message


def test_zero_duration_is_refused() -> None:
    message = config_error(**{"ca.bundle_grace": "0s"})
    assert message.startswith("config ca.bundle_grace: ")
    assert "longer than zero" in message
    assert "flag --bundle-grace" in message


def test_ca_ttl_minimum() -> None:
    message = config_error(env={"MESHWARD_CA__TTL": "30s"})
    assert message.startswith("config ca.ttl: the CA lifetime must be at least 1m")
    assert "MESHWARD_CA__TTL" in message


def test_bad_key_type(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "ca:\n  key_type: rsa-1024\n")
    message = config_error(path)
    assert message.startswith("config ca.key_type: ")
    assert "ec-p256" in message
    assert "rsa-2048" in message
    assert str(path) in message


@pytest.mark.parametrize("value", ["Example.org", "bad domain", "spiffe://example.org/path", ""])
def test_bad_trust_domain(value: str) -> None:
    message = config_error(trust_domain=value)
    assert message.startswith("config trust_domain: ")
    assert "is not a valid trust domain" in message
    assert "flag --trust-domain" in message


def test_bad_log_level() -> None:
    message = config_error(env={"MESHWARD_LOG_LEVEL": "loud"})
    assert message.startswith("config log_level: ")
    assert "MESHWARD_LOG_LEVEL" in message


@pytest.mark.parametrize(("key", "value"), [("x509_ttl", "31d"), ("jwt_ttl", "25h")])
def test_svid_ttl_out_of_range_from_file(tmp_path: Path, key: str, value: str) -> None:
    path = write(tmp_path / "c.yaml", f"svid:\n  {key}: {value}\n")
    message = config_error(path)
    assert message.startswith("config svid")
    assert key in message
    assert "out of range; use between 1s and" in message
    assert str(path) in message


@pytest.mark.parametrize(
    ("env", "flags", "key", "origin"),
    [
        (
            {"MESHWARD_SVID__X509_TTL": "31d"},
            {},
            "x509_ttl",
            "environment variable MESHWARD_SVID__X509_TTL",
        ),
        (
            {"MESHWARD_SVID__JWT_TTL": "2d"},
            {},
            "jwt_ttl",
            "environment variable MESHWARD_SVID__JWT_TTL",
        ),
        ({}, {"svid.x509_ttl": "40d"}, "x509_ttl", "flag --x509-ttl"),
    ],
)
def test_svid_ttl_out_of_range_names_its_origin(
    env: dict[str, str], flags: dict[str, str], key: str, origin: str
) -> None:
    message = config_error(env=env, **flags)
    assert key in message
    assert f"(from {origin})" in message


@pytest.mark.parametrize(
    "value", ["nope", "127.0.0.1", ":8088", "127.0.0.1:http", "127.0.0.1:70000"]
)
def test_health_listen_not_host_port(value: str) -> None:
    message = config_error(env={"MESHWARD_SERVER__HEALTH_LISTEN": value})
    assert message.startswith("config server.health_listen: ")
    assert "is not host:port" in message
    assert "MESHWARD_SERVER__HEALTH_LISTEN" in message


def test_health_listen_may_be_turned_off() -> None:
    assert load_config(None, env={"MESHWARD_SERVER__HEALTH_LISTEN": ""}).server.health_listen == ""


# -- authz ----------------------------------------------------------------------------


def test_authz_defaults() -> None:
    authz = load_config(None, env={}).authz
    assert authz.listen == "127.0.0.1:9191"
    assert authz.health_listen == "127.0.0.1:9192"
    assert authz.tls is None


def test_authz_tls_from_file(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.yaml",
        """
authz:
  listen: unix:///run/meshward/authz.sock
  health_listen: ""
  tls:
    workload_api_socket: unix:///run/meshward/agent.sock
    allowed_clients:
    - spiffe://example.org/ns/default/sa/envoy
    - spiffe://partner.example/ns/edge/sa/gateway
    svid_timeout: 2m
""",
    )
    authz = load_config(path, env={}).authz
    assert authz.listen == "unix:///run/meshward/authz.sock"
    assert authz.health_listen == ""
    assert authz.tls is not None
    # The SPIFFE_ENDPOINT_SOCKET form and a bare path mean the same socket.
    assert authz.tls.workload_api_socket == "/run/meshward/agent.sock"
    assert authz.tls.allowed_clients == [
        "spiffe://example.org/ns/default/sa/envoy",
        "spiffe://partner.example/ns/edge/sa/gateway",
    ]
    assert authz.tls.svid_timeout == timedelta(minutes=2)
    minimal = load_config(
        None, env={"MESHWARD_AUTHZ__TLS__WORKLOAD_API_SOCKET": "/run/agent.sock"}
    ).authz.tls
    assert minimal is not None
    assert minimal.allowed_clients == []
    assert minimal.svid_timeout == timedelta(seconds=30)


@pytest.mark.parametrize(
    "value",
    [
        "127.0.0.1:9191",
        "0.0.0.0:0",
        "[::1]:9191",
        "unix:///run/meshward/authz.sock",
        "unix:/run/meshward/authz.sock",
        "unix:authz.sock",
        "/run/meshward/authz.sock",
    ],
)
def test_authz_listen_accepts_tcp_and_grpc_unix_addresses(value: str) -> None:
    assert load_config(None, env={}, flags={"authz.listen": value}).authz.listen == value


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        ("authz", "is not host:port or a Unix socket"),
        ("127.0.0.1:http", "is not host:port or a Unix socket"),
        ("unix:", "names no socket path"),
        ("unix://host/authz.sock", "has no authority"),
    ],
)
def test_authz_listen_refused_names_the_flag(value: str, hint: str) -> None:
    message = config_error(**{"authz.listen": value})
    assert message.startswith("config authz.listen: ")
    assert hint in message
    assert message.endswith("(from flag --listen)")


def test_authz_listen_empty_turns_authz_off_in_up_and_authz_refuses_it(tmp_path: Path) -> None:
    from meshward.authz_runtime import run_authz

    config = load_config(None, env={}, flags={"authz.listen": ""})
    assert config.authz.listen == ""
    with pytest.raises(ConfigError, match=r'authz\.listen is "" \(off\)'):
        run_authz(config, policies=tmp_path)


def test_authz_tls_needs_the_workload_api_socket(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "authz:\n  tls:\n    allowed_clients: []\n")
    message = config_error(path)
    assert message.startswith("config authz.tls.workload_api_socket: ")
    assert "required" in message.lower()


@pytest.mark.parametrize("value", ["agent.sock", "unix:agent.sock", "tcp://127.0.0.1:1"])
def test_authz_tls_socket_must_be_an_absolute_unix_path(value: str) -> None:
    message = config_error(env={"MESHWARD_AUTHZ__TLS__WORKLOAD_API_SOCKET": value})
    assert message.startswith("config authz.tls.workload_api_socket: ")
    assert "absolute Unix socket path" in message


def test_authz_allowed_clients_must_be_spiffe_ids(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.yaml",
        "authz:\n  tls:\n    workload_api_socket: /run/agent.sock\n"
        "    allowed_clients: [spiffe://example.org/ok, envoy, spiffe://Example.org/x]\n",
    )
    lines = config_error(path).splitlines()
    assert lines[0].startswith("config authz.tls.allowed_clients.1: 'envoy' is not a valid")
    assert lines[1].startswith("config authz.tls.allowed_clients.2: ")
    assert "lowercase" in lines[1]


def test_authz_tls_unknown_key(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "authz:\n  tls:\n    workload_api_sock: /run/a.sock\n")
    message = config_error(path)
    assert "config authz.tls.workload_api_sock: unknown key" in message


def test_authz_rego_defaults() -> None:
    from authz.rego_input import DEFAULT_MAX_BODY_BYTES

    rego = load_config(None, env={}).authz.rego
    assert rego.decision == "envoy/authz/allow"
    assert rego.mode == "custom"
    assert rego.dry_run is False
    assert rego.dry_run_packages == []
    assert rego.parse_body is True
    assert rego.max_body_bytes == DEFAULT_MAX_BODY_BYTES
    assert rego.timeout == timedelta(milliseconds=100)


def test_authz_rego_from_file_and_environment(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.yaml",
        """
authz:
  rego:
    decision: data.mesh.gate.decision
    mode: always
    dry_run: true
    dry_run_packages: [envoy.canary, data.team.staged]
    parse_body: false
    max_body_bytes: 4096
    timeout: 250ms
""",
    )
    rego = load_config(path, env={"MESHWARD_AUTHZ__REGO__MODE": "custom"}).authz.rego
    assert rego.decision == "data.mesh.gate.decision"
    assert rego.mode == "custom"  # the environment wins over the file
    assert rego.dry_run is True
    assert rego.dry_run_packages == ["envoy.canary", "team.staged"]
    assert (rego.parse_body, rego.max_body_bytes) == (False, 4096)
    assert rego.timeout == timedelta(milliseconds=250)


@pytest.mark.parametrize(
    ("yaml_text", "key", "hint"),
    [
        ("decision: allow", "authz.rego.decision", "must name a package and a rule"),
        ("decision: envoy/au-thz/allow", "authz.rego.decision", "must name a package and a rule"),
        ("mode: sometimes", "authz.rego.mode", "'custom' or 'always'"),
        ("dry_run_packages: [envoy.can-ary]", "authz.rego.dry_run_packages.0", "package name"),
        ("dry_run_packages: envoy.canary", "authz.rego.dry_run_packages", "list"),
        ("max_body_bytes: -1", "authz.rego.max_body_bytes", "0 or more"),
        ("timeout: 0s", "authz.rego.timeout", "longer than zero"),
        ("timeout: soon", "authz.rego.timeout", ""),
        ("dryrun: true", "authz.rego.dryrun", "unknown key"),
    ],
)
def test_authz_rego_refused(tmp_path: Path, yaml_text: str, key: str, hint: str) -> None:
    path = write(tmp_path / "c.yaml", "authz:\n  rego:\n    " + yaml_text + "\n")
    message = config_error(path)
    assert message.startswith(f"config {key}: ")
    assert hint in message
    assert message.endswith(f"(from {path})")


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_yaml_that_is_not_a_mapping(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "c.yaml", text)
    message = config_error(path)
    assert message.startswith(f"{path}: ")
    assert "must be a mapping" in message


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "trust_domain: example.org\nca:\n  ttl: [1h\nsvid: {}\n")
    message = config_error(path)
    assert message.startswith(f"{path} line 4: not valid YAML")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    message = config_error(path)
    assert message == f"cannot read config file {path}: No such file or directory"


def test_environment_variable_into_a_scalar_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "ca: 3\n")
    message = config_error(path, env={"MESHWARD_CA__TTL": "1h"})
    assert "MESHWARD_CA__TTL" in message
    assert "ca is not a section" in message


def test_several_errors_are_all_reported(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "log_level: loud\nca:\n  key_type: dsa\n")
    lines = config_error(path).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("config log_level: ")
    assert lines[1].startswith("config ca.key_type: ")


def test_huge_duration_is_a_config_error() -> None:
    message = config_error(env={"MESHWARD_CA__TTL": "99999999999d"})
    assert message.startswith("config ca.ttl: ")
    assert "MESHWARD_CA__TTL" in message


# -- durations ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("10m", timedelta(minutes=10)),
        ("1h", timedelta(hours=1)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("7d", timedelta(days=7)),
        ("1d2h3m4s", timedelta(days=1, hours=2, minutes=3, seconds=4)),
        ("500ms", timedelta(milliseconds=500)),
        ("1m30s", timedelta(seconds=90)),
        (" 10m ", timedelta(minutes=10)),
        ("45", timedelta(seconds=45)),
        ("1.5", timedelta(seconds=1.5)),
        (30, timedelta(seconds=30)),
        (2.5, timedelta(seconds=2.5)),
        (timedelta(minutes=3), timedelta(minutes=3)),
    ],
)
def test_parse_duration(value: str | int | float | timedelta, expected: timedelta) -> None:
    assert parse_duration(value) == expected


@pytest.mark.parametrize(
    "value",
    ["", "1x", "h", "1h 30m", "-5s", "5 s", "1.5h", "10M", "1h30", "s10", "0s", "0", 0, -1, True],
)
def test_parse_duration_refuses(value: str | int | bool) -> None:
    with pytest.raises(ValueError, match=r"is not a duration|longer than zero") as raised:
        parse_duration(value)
    assert repr(value) in str(raised.value)


@pytest.mark.parametrize("value", ["99999999999d", 10**20, float("inf")])
def test_parse_duration_out_of_range_is_a_value_error(value: str | int | float) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (timedelta(0), "0s"),
        (timedelta(seconds=45), "45s"),
        (timedelta(seconds=90), "1m30s"),
        (timedelta(minutes=10), "10m"),
        (timedelta(hours=1), "1h"),
        (timedelta(hours=1, minutes=30), "1h30m"),
        (timedelta(days=1), "1d"),
        (timedelta(days=1, seconds=1), "1d1s"),
        (timedelta(days=30), "30d"),
        (timedelta(days=2, hours=3, minutes=4, seconds=5), "2d3h4m5s"),
    ],
)
def test_format_duration(value: timedelta, expected: str) -> None:
    assert format_duration(value) == expected


@pytest.mark.parametrize("seconds", [1, 59, 60, 61, 3599, 3600, 3661, 86399, 86400, 90061, 2592000])
def test_format_then_parse_round_trips(seconds: int) -> None:
    value = timedelta(seconds=seconds)
    assert parse_duration(format_duration(value)) == value
