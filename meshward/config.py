"""Configuration: one YAML file, then ``MESHWARD_*`` environment overrides, then CLI flags.

Validated with pydantic; unknown keys and bad values are errors that name the key and
where it came from (file, environment variable or flag).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PlainSerializer,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from audit.redaction import DEFAULT_REDACTED_QUERY_PARAMETERS
from authz.rego_paths import DEFAULT_DECISION_PATH, parse_decision_path, parse_package_name
from identity.entries import JWT_TTL_RANGE, X509_TTL_RANGE, check_ttl
from identity.errors import IdentityError
from identity.keys import KeyType
from identity.spiffeid import parse_spiffe_id, parse_trust_domain
from meshward.durations import parse_duration

__all__ = ["DEFAULT_DATA_DIR", "ENV_PREFIX", "Config", "ConfigError", "load_config"]

ENV_PREFIX = "MESHWARD_"
DEFAULT_DATA_DIR = Path(".meshward")
# Variables read by the CLI itself rather than mapped onto config keys.
_ENV_NOT_CONFIG = frozenset({"MESHWARD_CONFIG", "MESHWARD_OUTPUT", "MESHWARD_AUDIT_URL"})

# Serialized as seconds, which parse_duration reads back: a Config survives a JSON round
# trip (how `meshward authz` hands its config to the shipper it starts).
Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(lambda v: v.total_seconds(), return_type=float, when_used="json"),
]
_SIZE = re.compile(r"(\d+)\s*(B|KiB|MiB|GiB|TiB)?")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def _byte_size(value: Any) -> int:
    """A size in bytes: a bare number, or with a unit (512MiB, 4GiB)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size; use e.g. 512MiB or 4GiB")
    if isinstance(value, int):
        return value
    match = _SIZE.fullmatch(str(value).strip())
    if match is None:
        raise ValueError(f"{value!r} is not a size; use e.g. 1048576, 512MiB or 4GiB")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


ByteSize = Annotated[int, BeforeValidator(_byte_size)]


class ConfigError(Exception):
    """A configuration problem, worded as what to fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UpstreamConfig(_Section):
    cert_file: Path
    key_file: Path
    bundle_file: Path | None = None


class CAConfig(_Section):
    key_type: KeyType = KeyType.EC_P256
    jwt_key_type: KeyType = KeyType.EC_P256
    ttl: Duration = timedelta(hours=24)
    bundle_grace: Duration = timedelta(hours=1)
    upstream: UpstreamConfig | None = None

    @field_validator("ttl")
    @classmethod
    def _ttl(cls, value: timedelta) -> timedelta:
        if value < timedelta(minutes=1):
            raise ValueError("the CA lifetime must be at least 1m")
        return value


class SvidConfig(_Section):
    x509_ttl: Duration = timedelta(hours=1)
    jwt_ttl: Duration = timedelta(minutes=5)

    @field_validator("x509_ttl", "jwt_ttl")
    @classmethod
    def _range(cls, value: timedelta, info: ValidationInfo) -> timedelta:
        bounds = X509_TTL_RANGE if info.field_name == "x509_ttl" else JWT_TTL_RANGE
        try:
            return check_ttl(value.total_seconds(), bounds, field=str(info.field_name))
        except IdentityError as exc:
            raise ValueError(exc.message) from exc


def _host_port(value: str) -> str:
    if value:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"{value!r} is not host:port, e.g. 127.0.0.1:8088")
    return value


HostPort = Annotated[str, AfterValidator(_host_port)]


class ServerConfig(_Section):
    admin_socket: Path | None = None  # default <data_dir>/admin/admin.sock
    health_listen: HostPort = "127.0.0.1:8088"  # /live /ready /metrics only; "" turns it off
    node_listen: HostPort = "127.0.0.1:8081"  # node API for agents (mTLS); "" turns it off
    attestation_listen: HostPort = "127.0.0.1:8082"  # agent attestation (TLS)
    agent_svid_ttl: Duration = timedelta(hours=1)
    x509pop_ca_bundle: Path | None = None  # CAs of the x509pop certificates agents present


class K8sAttestorConfig(_Section):
    kubelet_host: str = "127.0.0.1"
    kubelet_port: int = 10250
    kubelet_ca_path: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")
    skip_kubelet_verification: bool = False
    token_path: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    max_poll_attempts: int = 20
    poll_retry_interval: Duration = timedelta(milliseconds=500)


class X509PopConfig(_Section):
    cert_file: Path  # the node's certificate (chain), issued by a CA the server trusts
    key_file: Path


def _positive(value: int) -> int:
    if value < 1:
        raise ValueError("must be 1 or more")
    return value


class AgentConfig(_Section):
    socket: Path | None = None  # default <data_dir>/agent.sock; SPIFFE_ENDPOINT_SOCKET for clients
    health_listen: HostPort = "127.0.0.1:8089"  # /live /ready /metrics; "" turns it off
    server_address: HostPort = "127.0.0.1:8081"  # the server's node_listen
    attestation_address: HostPort = "127.0.0.1:8082"  # the server's attestation_listen
    trust_bundle_path: Path | None = None  # bootstrap bundle to verify the server the first time
    join_token: str | None = None
    x509pop: X509PopConfig | None = None
    discover_workload_path: bool = False  # unix:path and unix:sha256 selectors
    workload_size_limit: int = 128 * 1024 * 1024  # bytes hashed at most for unix:sha256
    # Connections one uid may hold open on the agent socket (each may carry up to 100
    # streams); more are closed and logged (identity.peer_front.MAX_CONNECTIONS_PER_UID).
    max_connections_per_uid: Annotated[int, AfterValidator(_positive)] = 256
    k8s: K8sAttestorConfig | None = None  # set (even to {}) to attest pods through the kubelet
    # SDS validation contexts as plain trusted_ca instead of Envoy's SPIFFE validator
    # (an Envoy can also ask for that in its node metadata, as with SPIRE).
    disable_spiffe_cert_validation: bool = False
    # The key type of workload X509-SVIDs the agent generates. RSA-2048 is slower to sign
    # with but is what QAT offloads; CryptoMB takes RSA-2048 and EC P-256; neither P-384.
    workload_key_type: KeyType = KeyType.EC_P256
    # TLS certificates over SDS carry a QAT/CryptoMB private key provider: auto where
    # this host has the hardware and the Envoy the extension; cryptomb/qat force it; none
    # never. An Envoy overrides it in its node metadata (meshward.private_key_provider).
    # Whatever is chosen, an Envoy that refuses the provider gets plain certificates.
    private_key_provider: Literal["auto", "cryptomb", "qat", "none"] = "auto"
    # The defaults are identity.handshake_offload.DEFAULT_POLL_DELAYS (not imported: that
    # loads the Envoy protos, which every CLI command would pay for).
    cryptomb_poll_delay: Duration = timedelta(milliseconds=10)  # a batch waits this long
    qat_poll_delay: Duration = timedelta(milliseconds=5)  # Envoy polls QAT this often
    # The policy directory (istio/, rego/) whose AuthorizationPolicies the agent serves to
    # native and hybrid sidecars as Envoy RBAC filters over ECDS: the one `meshward authz`
    # serves. Unset: `meshward up` uses its --policies; a stand-alone agent serves none.
    policies: Path | None = None

    @field_validator("cryptomb_poll_delay", "qat_poll_delay")
    @classmethod
    def _poll_delay(cls, value: timedelta, info: ValidationInfo) -> timedelta:
        # parse_duration already refused zero; Envoy's QAT provider wants at least 1ms.
        if info.field_name == "qat_poll_delay" and value < timedelta(milliseconds=1):
            raise ValueError("must be at least 1ms (Envoy's QAT provider polls no faster)")
        if value > timedelta(seconds=1):
            raise ValueError(
                "must be at most 1s: a handshake may wait this long; e.g. 10ms for "
                "cryptomb, 5ms for qat"
            )
        return value


def _grpc_listen(value: str) -> str:
    """host:port, or a Unix socket as gRPC spells it (``unix:PATH``, ``unix:///abs``)."""
    if value.startswith("unix://") and not value.startswith("unix:///"):
        raise ValueError(
            f"{value!r}: a Unix socket URI has no authority; write unix:///abs/path.sock "
            "or unix:relative/path.sock"
        )
    if value.startswith("unix:"):
        if not value.removeprefix("unix:").strip("/"):
            raise ValueError(
                f"{value!r} names no socket path, e.g. unix:///run/meshward/authz.sock"
            )
        return value
    if value.startswith("/"):
        return value  # a bare absolute path: host:port never starts with "/"
    if not value:
        return value  # off: `meshward up` runs no authz (`meshward authz` refuses to start)
    try:
        return _host_port(value)
    except ValueError:
        raise ValueError(
            f"{value!r} is not host:port or a Unix socket, e.g. 127.0.0.1:9191 or "
            "unix:///run/meshward/authz.sock"
        ) from None


def _workload_api_socket(value: str) -> str:
    # The SPIFFE_ENDPOINT_SOCKET forms: unix:///abs/path or a bare absolute path.
    path = value.removeprefix("unix://") if value.startswith("unix:///") else value
    if not path.startswith("/"):
        raise ValueError(
            f"{value!r} is not an absolute Unix socket path, e.g. unix:///run/meshward/agent.sock"
        )
    return path


def _spiffe_id(value: str) -> str:
    try:
        parse_spiffe_id(value)
    except IdentityError as exc:
        raise ValueError(exc.message) from exc
    return value


class AuthzTLSConfig(_Section):
    # The agent's Workload API, where the authz process gets its own X509-SVID and bundle.
    workload_api_socket: Annotated[str, AfterValidator(_workload_api_socket)]
    # Empty: any client whose certificate chains to the bundle; else only these SPIFFE IDs.
    allowed_clients: list[Annotated[str, AfterValidator(_spiffe_id)]] = []
    # How long to wait for the first SVID before giving up (never serving plaintext).
    svid_timeout: Duration = timedelta(seconds=30)


def _decision_path(value: str) -> str:
    parse_decision_path(value)
    return value


def _package_name(value: str) -> str:
    return parse_package_name(value)


class AuthzRegoConfig(_Section):
    # The rule whose value decides, as OPA-Envoy's `path` (envoy/authz/allow).
    decision: Annotated[str, AfterValidator(_decision_path)] = DEFAULT_DECISION_PATH
    # custom: Rego runs where an Istio CUSTOM policy names provider `rego`;
    # always: also on every request Istio allowed.
    mode: Literal["custom", "always"] = "custom"
    dry_run: bool = False  # decide and record, never deny (OPA-Envoy's dry-run)
    # Packages staged like `custom: {dry_run: true}`: shadow-evaluated, not enforced.
    dry_run_packages: list[Annotated[str, AfterValidator(_package_name)]] = []
    parse_body: bool = True  # input.parsed_body (OPA-Envoy's skip-request-body-parse inverted)
    # Bodies above this are not parsed (authz.rego_input.DEFAULT_MAX_BODY_BYTES, not
    # imported: that module loads the Envoy protos, which every CLI command would pay for).
    max_body_bytes: int = 1024 * 1024
    timeout: Duration = timedelta(milliseconds=100)  # a later result is discarded: deny

    @field_validator("max_body_bytes")
    @classmethod
    def _max_body(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must be 0 or more bytes (0: no body is parsed)")
        return value

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("must be longer than zero, e.g. 100ms")
        return value


class AuthzConfig(_Section):
    # ext_authz gRPC; "" keeps `meshward up` from running authz
    listen: Annotated[str, AfterValidator(_grpc_listen)] = "127.0.0.1:9191"
    health_listen: HostPort = "127.0.0.1:9192"  # /live /ready /metrics; "" turns it off
    root_namespace: str = "istio-system"  # its policies apply mesh-wide, as in Istio
    trust_domain_aliases: list[str] = []  # principals in these trust domains match ours
    explain_denials: bool = False  # name the deciding policy in the 403 body
    reload_interval: Duration = timedelta(seconds=1)
    # A policy or data file larger than this is a load problem (the last good set keeps
    # serving); authz.policy_files.MAX_POLICY_FILE_BYTES, not imported (see max_body_bytes).
    max_policy_file_bytes: Annotated[int, AfterValidator(_positive)] = 8 * 1024 * 1024
    tls: AuthzTLSConfig | None = None  # mTLS on the gRPC listener with the process's own SVID
    rego: AuthzRegoConfig = AuthzRegoConfig()  # policies/rego/: the Rego engine
    # `meshward up` runs this many authz processes (a Check is CPU-bound Python: one core
    # each), on listen's port and the ones after it, as the endpoints of every sidecar's
    # authz cluster (`envoy bootstrap --authz-workers`).
    workers: int = 1
    # Which of them this process is (`up` sets it): its ports, spool and ledger follow.
    worker: int = 0

    @field_validator("workers")
    @classmethod
    def _workers(cls, value: int) -> int:
        if not 1 <= value <= 64:
            raise ValueError("must be 1 to 64 processes (one per core is the most that helps)")
        return value

    @model_validator(mode="after")
    def _tcp_for_workers(self) -> AuthzConfig:
        if self.workers > 1 and self.listen.startswith(("unix:", "/")):
            raise ValueError(
                f"workers: {self.workers} needs a TCP listen (host:port), where worker i "
                f"listens on the port + i; listen is {self.listen!r}"
            )
        for key, listen in (("listen", self.listen), ("health_listen", self.health_listen)):
            if self.workers < 2 or not listen:
                continue
            port = int(listen.rpartition(":")[2])
            if port == 0 or port + self.workers - 1 > 65535:
                raise ValueError(
                    f"workers: {self.workers} use the {key} ports {port} to "
                    f"{port + self.workers - 1}: give {key} a fixed port at most "
                    f"{65536 - self.workers}"
                )
        if self.workers > 1 and self.listen and self.health_listen:
            first = int(self.listen.rpartition(":")[2])
            health = int(self.health_listen.rpartition(":")[2])
            if abs(first - health) < self.workers:
                raise ValueError(
                    f"workers: {self.workers} use the listen ports {first} to "
                    f"{first + self.workers - 1} and the health_listen ports {health} to "
                    f"{health + self.workers - 1}, which overlap; move health_listen, e.g. to "
                    f"port {max(first, health) + self.workers}"
                )
        if not 0 <= self.worker < self.workers:
            raise ValueError(f"worker {self.worker} is not one of the {self.workers} workers")
        return self


class AuditSpoolConfig(_Section):
    directory: Path | None = None  # default <data_dir>/audit/spool
    max_bytes: ByteSize = 1 << 30  # segments on disk not yet shipped; then audit.on_full
    segment_bytes: ByteSize = 16 << 20
    sync_interval: Duration = timedelta(milliseconds=50)  # fsync at least this often
    sync_records: int = 1000  # ... or after this many records

    @field_validator("segment_bytes")
    @classmethod
    def _segment(cls, value: int) -> int:
        if value < 64 * 1024:
            raise ValueError("must be at least 64KiB (a record with its request fits)")
        return value

    @field_validator("sync_records")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be 1 or more")
        return value


class AuditRetentionConfig(_Section):
    max_age: Duration | None = timedelta(days=30)  # null: kept however old
    max_rows: int | None = 10_000_000  # null: no limit
    interval: Duration = timedelta(minutes=5)  # how often the shipper enforces it

    @field_validator("max_rows")
    @classmethod
    def _rows(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("must be 1 or more, or null for no limit")
        return value


def _header_name(value: str) -> str:
    if not value or any(c.isspace() or c == ":" for c in value):
        raise ValueError(f"{value!r} is not an HTTP header name, e.g. x-api-key")
    return value.lower()


class AuditConfig(_Section):
    database_url: str | None = None  # default: SQLite <data_dir>/audit/audit.db
    listen: HostPort = "127.0.0.1:8090"  # `meshward audit`: query API, page, /metrics
    # deny: a request whose record cannot be kept (the spool is full) is denied
    # (audit_unavailable); allow: it is served and the lost record counted.
    on_full: Literal["deny", "allow"] = "deny"
    spool: AuditSpoolConfig = AuditSpoolConfig()
    retention: AuditRetentionConfig = AuditRetentionConfig()
    # Header values never stored, beyond authorization, cookie, set-cookie and
    # proxy-authorization (always), and any value that looks like a JWT.
    redact_headers: list[Annotated[str, AfterValidator(_header_name)]] = [
        "x-api-key",
        "x-auth-token",
    ]
    redact_query_parameters: list[str] = list(DEFAULT_REDACTED_QUERY_PARAMETERS)
    store_body: bool = False  # keep request bodies (cut to max_body_bytes) for replay
    max_body_bytes: ByteSize = 1024
    # Directories the page's replay form may name (and those below them); empty: the
    # --policies directory of `meshward audit` only.
    replay_roots: list[Path] = []


class Config(_Section):
    trust_domain: str | None = None
    data_dir: Path = DEFAULT_DATA_DIR
    database_url: str | None = None  # default: SQLite in the data dir
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    server: ServerConfig = ServerConfig()
    ca: CAConfig = CAConfig()
    svid: SvidConfig = SvidConfig()
    agent: AgentConfig = AgentConfig()
    authz: AuthzConfig = AuthzConfig()
    audit: AuditConfig = AuditConfig()

    @field_validator("trust_domain")
    @classmethod
    def _trust_domain(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return parse_trust_domain(value).name
        except IdentityError as exc:
            raise ValueError(exc.message) from exc

    @property
    def admin_socket(self) -> Path:
        return self.server.admin_socket or self.data_dir / "admin" / "admin.sock"

    @property
    def agent_socket(self) -> Path:
        return self.agent.socket or self.data_dir / "agent.sock"

    @property
    def audit_spool(self) -> Path:
        return self.audit.spool.directory or self.data_dir / "audit" / "spool"

    @property
    def audit_database_url(self) -> str:
        from audit.store.database import sqlite_url

        return self.audit.database_url or sqlite_url(self.data_dir)


def load_config(
    path: Path | None,
    *,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Layer file < environment < flags and validate; raise ConfigError naming the key."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    origin: dict[tuple[str, ...], str] = {}
    if path is not None:
        data = _read_yaml(path)
        _note(origin, data, (), f"{path}")
    for name, value in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or name in _ENV_NOT_CONFIG:
            continue
        keys = tuple(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))
        _put(data, keys, value, name)
        origin[keys] = f"environment variable {name}"
    for dotted, value in (flags or {}).items():
        if value is None:
            continue
        keys = tuple(dotted.split("."))
        _put(data, keys, value, dotted)
        origin[keys] = f"flag --{keys[-1].replace('_', '-')}"
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origin)) from exc


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})"
        ) from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of keys, e.g. trust_domain: ..."
        )
    return loaded


def _put(data: dict[str, Any], keys: tuple[str, ...], value: Any, source: str) -> None:
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def _note(
    origin: dict[tuple[str, ...], str], data: Any, prefix: tuple[str, ...], source: str
) -> None:
    if isinstance(data, dict):
        for key, value in data.items():
            origin[(*prefix, str(key))] = source
            _note(origin, value, (*prefix, str(key)), source)


def _describe(exc: ValidationError, origin: dict[tuple[str, ...], str]) -> str:
    lines = []
    for error in exc.errors():
        loc = tuple(str(p) for p in error["loc"])
        key = ".".join(loc) or "(top level)"
        where = next((origin[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in origin), None)
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; see README, Configuration)"
        lines.append(f"config {key}: {message}" + (f" (from {where})" if where else ""))
    return "\n".join(lines)
