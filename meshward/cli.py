"""The ``meshward`` command line: servers, and admin commands over the admin socket."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from identity.errors import IdentityError
from identity.keys import KeyType, generate_key, signature_hash, write_private_key
from meshward.admin_client import AdminClient
from meshward.audit_cli import audit, policy_replay
from meshward.cli_options import (
    DURATION,
    F,
    common,
    config_from,
    emit,
    handle_errors,
    log_level_option,
    server_options,
    setup_logging,
)
from meshward.config import Config, load_config
from meshward.durations import format_duration, parse_duration

__all__ = ["main"]

if TYPE_CHECKING:
    from authz.istio_lint import LintFinding
    from authz.istio_policy import PolicySet
    from meshward.envoy_bootstrap import Upstream

UP_TRUST_DOMAIN = "example.org"  # the embedded default of `meshward up`


def _client(config_path: Path | None, data_dir: Path | None) -> AdminClient:
    return AdminClient(config_from(config_path, data_dir=data_dir).admin_socket)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli() -> None:
    """meshward: SPIFFE identities and Envoy authorization for a service mesh."""


# -- servers ---------------------------------------------------------------------------


def _run_server(config: Config, *, agent: bool = False) -> None:
    from meshward.runtime import run

    setup_logging(config)
    run(config, agent=agent)


@cli.command()
@common
@server_options
@handle_errors
def server(
    config_path: Path | None,
    data_dir: Path | None,
    output: str,
    trust_domain: str | None,
    database_url: str | None,
    log_level: str | None,
) -> None:
    """Run the CA, registry and admin API."""
    _run_server(
        config_from(
            config_path,
            data_dir=data_dir,
            trust_domain=trust_domain,
            database_url=database_url,
            log_level=log_level,
        )
    )


@cli.command()
@common
@server_options
@click.option(
    "--policies",
    type=click.Path(path_type=Path, file_okay=False),
    help="Policy directory authz serves (default ./policies, else the sample policies/).",
)
@handle_errors
def up(
    config_path: Path | None,
    data_dir: Path | None,
    output: str,
    trust_domain: str | None,
    database_url: str | None,
    log_level: str | None,
    policies: Path | None,
) -> None:
    """Run server, agent, authz and the audit API together (trust domain example.org unless set).

    Entries created without --parent-id belong to this agent; workloads reach it at
    unix://<data-dir>/agent.sock (export it as SPIFFE_ENDPOINT_SOCKET). Authz (a child
    process) serves ext_authz on authz.listen (127.0.0.1:9191) from --policies, and the
    agent serves the same policies to native and hybrid sidecars as Envoy RBAC filters
    (ECDS; agent.policies names another directory); the audit API and page are on
    audit.listen (127.0.0.1:8090). "" turns either off. Ctrl-C or SIGTERM stops all of it.
    """
    config = config_from(
        config_path,
        data_dir=data_dir,
        trust_domain=trust_domain,
        database_url=database_url,
        log_level=log_level,
    )
    if config.trust_domain is None:
        config = config.model_copy(update={"trust_domain": UP_TRUST_DOMAIN})
    from meshward.runtime import run
    from meshward.up import policies_dir

    setup_logging(config)
    authz_policies = policies_dir(policies) if config.authz.listen else None
    # The agent serves the same directory to native and hybrid sidecars, unless
    # agent.policies names another; with authz off, only an explicit --policies.
    agent_policies = config.agent.policies or authz_policies
    if agent_policies is None and policies is not None:
        agent_policies = policies_dir(policies)
    run(config, agent=True, policies=authz_policies, agent_policies=agent_policies)


@cli.command()
@common
@click.option("--server-address", help="The server's node API, host:port (default 127.0.0.1:8081).")
@click.option(
    "--attestation-address", help="The server's attestation port (default 127.0.0.1:8082)."
)
@click.option("--join-token", help="Single-use token from `meshward token generate`.")
@click.option(
    "--trust-bundle",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Bundle (PEM) to verify the server at first attestation.",
)
@click.option(
    "--policies",
    type=click.Path(path_type=Path, file_okay=False),
    help="Policy directory to serve to native and hybrid sidecars as Envoy RBAC filters "
    "over ECDS (agent.policies; the one authz serves).",
)
@log_level_option
@handle_errors
def agent(
    config_path: Path | None,
    data_dir: Path | None,
    output: str,
    server_address: str | None,
    attestation_address: str | None,
    join_token: str | None,
    trust_bundle: Path | None,
    policies: Path | None,
    log_level: str | None,
) -> None:
    """Run a node agent: attest to the server, serve the Workload API, SDS and ECDS to workloads.

    A restarted agent resumes with the SVID it keeps in <data-dir>/agent/; the join token
    is needed once.
    """
    from meshward.runtime import run_agent

    config = load_config(
        config_path,
        flags={
            "data_dir": data_dir,
            "log_level": log_level,
            "agent.server_address": server_address,
            "agent.attestation_address": attestation_address,
            "agent.join_token": join_token,
            "agent.trust_bundle_path": trust_bundle,
            "agent.policies": policies,
        },
    )
    setup_logging(config)
    run_agent(config)


@cli.command("authz")
@common
@click.option(
    "--policies",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("policies"),
    show_default=True,
    help="Policy directory (istio/ and rego/ inside).",
)
@click.option(
    "--listen",
    help="host:port, unix:///abs/path.sock or an absolute path "
    "(authz.listen; default 127.0.0.1:9191).",
)
@click.option("--trust-domain", help="Trust domain (env MESHWARD_TRUST_DOMAIN).")
@click.option(
    "--config-stdin",
    is_flag=True,
    hidden=True,
    help="Read the config as one JSON line on stdin, and stop at end of file (how "
    "meshward up runs authz).",
)
@log_level_option
@handle_errors
def authz_command(
    config_path: Path | None,
    data_dir: Path | None,
    output: str,
    policies: Path,
    listen: str | None,
    trust_domain: str | None,
    config_stdin: bool,
    log_level: str | None,
) -> None:
    """Run the Envoy ext_authz server (Istio AuthorizationPolicy), reloading policies on change.

    gRPC Check, health and reflection on --listen (mTLS with the process's own SVID when
    authz.tls is set); /live, /ready and /metrics on authz.health_listen.
    """
    from meshward import lifeline
    from meshward.authz_runtime import run_authz

    if config_stdin:
        config = lifeline.read_config()
    else:
        config = config_from(
            config_path,
            data_dir=data_dir,
            trust_domain=trust_domain,
            log_level=log_level,
            **{"authz.listen": listen},
        )
    setup_logging(config)
    run_authz(config, policies=policies, lifeline=sys.stdin.buffer if config_stdin else None)


@cli.group()
def policy() -> None:
    """The policy repository."""


@policy.command("lint")
@common
@click.argument(
    "directory", type=click.Path(path_type=Path, file_okay=False), default=Path("policies")
)
@click.option("--trust-domain", help="Trust domain (env MESHWARD_TRUST_DOMAIN).")
@click.option("--strict", is_flag=True, help="Exit 1 on warnings too, not only on errors.")
@click.option(
    "--authz-mode",
    type=click.Choice(["native", "ext_authz", "hybrid"]),
    default="hybrid",
    show_default=True,
    help="How the sidecars enforce these policies (as `meshward envoy bootstrap`): in native "
    "and hybrid mode what Envoy's RBAC filters cannot express is an error, in ext_authz "
    "mode a warning.",
)
@handle_errors
def policy_lint(
    config_path: Path | None,
    data_dir: Path | None,
    output: str,
    directory: Path,
    trust_domain: str | None,
    strict: bool,
    authz_mode: str,
) -> None:
    """Check DIRECTORY/istio and DIRECTORY/rego as `meshward authz` loads them; print each problem.

    AuthorizationPolicy problems print as FILE[DOCUMENT] FIELD, Rego ones as FILE:LINE.
    Errors (the policies would not load, or, for native and hybrid sidecars, Envoy's
    RBAC filters cannot enforce them) exit 1; warnings (policies that load but cannot
    do what they appear to) exit 0 unless --strict.
    """
    from authz.istio_lint import LintFinding, Severity, lint
    from meshward.authz_runtime import policy_store

    config = _policy_toolconfig_from(config_path, data_dir, trust_domain)
    assert config.trust_domain is not None
    domain = config.trust_domain
    aliases = tuple(config.authz.trust_domain_aliases)
    rego = config.authz.rego
    store = policy_store(config, directory)
    loaded = store.reload()
    # (finding, line): LintFinding has no line, and Rego problems are placed by one.
    findings = [(LintFinding.from_issue(i), i.line) for i in store.issues]
    served = store.current
    if loaded and served is not None:
        policy_set = served.istio
        texts: dict[str, str] = {}
        for file in {p.file for p in policy_set.policies}:
            try:
                texts[file] = Path(file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue  # removed since the load: its value checks are skipped
        found = lint(policy_set, trust_domain=domain, trust_domain_aliases=aliases, texts=texts)
        findings += [(f, None) for f in found]
        rego_dir = str(store.rego_dir)
        if served.rego is None and rego.mode == "always":
            message = (
                "holds no Rego modules, and authz.rego.mode is always: every request is "
                "denied (rego_not_loaded)"
            )
            findings.append((LintFinding(rego_dir, 0, "", message), None))
        custom = any(p.provider == "rego" for p in policy_set.policies if not p.dry_run)
        if served.rego is not None and rego.mode == "custom" and not custom:
            message = (
                "no AuthorizationPolicy calls provider rego (action CUSTOM) and "
                "authz.rego.mode is custom, so these modules decide no request; add one, "
                "or set authz.rego.mode: always"
            )
            findings.append((LintFinding(rego_dir, 0, "", message), None))
        for name in sorted(served.rego.unknown_dry_run_packages if served.rego else ()):
            message = f"authz.rego.dry_run_packages lists {name}, which no module defines"
            findings.append((LintFinding(rego_dir, 0, "", message), None))
        findings += [(f, None) for f in _native_findings(policy_set, authz_mode)]

    def text(finding: LintFinding, line: int | None) -> str:
        if line is None and not Path(finding.file).is_relative_to(store.rego_dir):
            return str(finding)
        where = finding.file if line is None else f"{finding.file}:{line}"
        where += f" {finding.field}" if finding.field else ""
        return f"{finding.severity}: {where}: {finding.message}"

    errors = sum(f.severity is Severity.ERROR for f, _ in findings)
    warnings = len(findings) - errors
    ok = loaded and not errors and not (strict and warnings)
    count = len(served.istio.policies) if served else 0
    modules = served.rego.modules if served and served.rego else 0
    emit(
        output,
        {
            "ok": ok,
            "policies": count,
            "rego_modules": modules,
            "errors": errors,
            "warnings": warnings,
            "issues": [f.as_dict() | {"line": line} for f, line in findings],
        },
        lambda r: (
            "\n".join(text(f, line) for f, line in findings)
            if findings
            else f"{r['policies']} AuthorizationPolicy documents"
            + (f" and {modules} Rego modules" if modules else "")
            + ", no problems"
        ),
    )
    if not ok:
        sys.exit(1)


def _native_findings(policy_set: PolicySet, authz_mode: str) -> list[LintFinding]:
    """What Envoy's RBAC filters cannot enforce, as native and hybrid sidecars need."""
    from authz.istio_lint import LintFinding, Severity
    from authz.istio_policy import Action
    from authz.rbac_translation import translation_issues

    findings = []
    native = authz_mode != "ext_authz"
    for issue in translation_issues(policy_set):
        consequence = (
            f" (--authz-mode {authz_mode}: the workloads it applies to get no RBAC filters, "
            "so their sidecars stay unready or keep their previous filters, until it is "
            "changed; ext_authz mode enforces it)"
            if native
            else " (only native and hybrid sidecars would refuse it)"
        )
        findings.append(
            LintFinding(
                issue.file,
                issue.document,
                issue.field,
                issue.message + consequence,
                Severity.ERROR if native else Severity.WARNING,
            )
        )
    if authz_mode == "native":
        for policy in policy_set.policies:
            if policy.action is Action.CUSTOM and not policy.dry_run:
                findings.append(
                    LintFinding(
                        policy.file,
                        policy.document,
                        "spec.action",
                        f"CUSTOM policy {policy.namespace}/{policy.name}: native sidecars run "
                        "no ext_authz, so every request it selects is denied; use "
                        "--authz-mode hybrid for the workloads it applies to",
                    )
                )
    return findings


def _policy_toolconfig_from(
    config_path: Path | None, data_dir: Path | None, trust_domain: str | None
) -> Config:
    config = config_from(config_path, data_dir=data_dir, trust_domain=trust_domain)
    # As lint: principals are matched literally unless an alias names another domain.
    if config.trust_domain is None:
        config = config.model_copy(update={"trust_domain": "cluster.local"})
    # The store logs what the report prints anyway.
    logging.getLogger("authz").setLevel(logging.CRITICAL)
    return config


@policy.command("test")
@common
@click.argument(
    "directory", type=click.Path(path_type=Path, file_okay=False), default=Path("policies")
)
@click.option("--trust-domain", help="Trust domain (env MESHWARD_TRUST_DOMAIN).")
@handle_errors
def policy_test(
    config_path: Path | None,
    data_dir: Path | None,
    output: str,
    directory: Path,
    trust_domain: str | None,
) -> None:
    """Run the Rego unit tests and the request tests of DIRECTORY; exit 1 on any failure.

    Rego unit tests: every test_* rule of rego/**/*_test.rego, as `opa test` runs them.
    Request tests: tests/*.yaml, each request sent as Envoy's ext_authz filter would
    send it through the same engines `meshward authz` runs, and its decision compared
    with the expected one. Policies that do not load, a malformed test file or no
    tests at all fail the run too.
    """
    from meshward.policy_runner import run_policy_tests

    report = run_policy_tests(
        _policy_toolconfig_from(config_path, data_dir, trust_domain), directory
    )
    emit(output, report.as_dict(), lambda _: report.text())
    if not report.ok:
        sys.exit(1)


@policy.command("eval")
@common
@click.argument(
    "directory", type=click.Path(path_type=Path, file_okay=False), default=Path("policies")
)
@click.option(
    "--request",
    "request_file",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="YAML file with one request, as an entry of tests/*.yaml (expect optional).",
)
@click.option("--trust-domain", help="Trust domain (env MESHWARD_TRUST_DOMAIN).")
@handle_errors
def policy_eval(
    config_path: Path | None,
    data_dir: Path | None,
    output: str,
    directory: Path,
    request_file: Path,
    trust_domain: str | None,
) -> None:
    """Decide one request against DIRECTORY and show why: Istio policies, rule, Rego value.

    Exits 0 whatever the decision; 1 when the policies or the request file have
    problems, or when the file has an `expect` the decision does not meet.
    """
    from authz.errors import PolicyLoadError
    from meshward.policy_runner import evaluate_request, issue_dict

    config = _policy_toolconfig_from(config_path, data_dir, trust_domain)
    try:
        report = evaluate_request(config, directory, request_file)
    except PolicyLoadError as exc:
        # Bad input, as everywhere in the CLI: on stderr, unless JSON was asked for.
        if output == "json":
            emit(output, {"ok": False, "issues": [issue_dict(i) for i in exc.issues]}, str)
        else:
            click.echo("\n".join(f"error: {i}" for i in exc.issues), err=True)
        sys.exit(1)
    emit(output, report.as_dict(), lambda _: report.text())
    if not report.ok:
        sys.exit(1)


@cli.command()
@click.option(
    "--duration",
    type=click.FloatRange(min=2),
    default=80,
    show_default=True,
    help="Seconds of traffic; the policy change comes at half.",
)
@click.option(
    "--svid-ttl",
    type=click.IntRange(min=4),
    default=60,
    show_default=True,
    help="Seconds an SVID lives; the agent renews at about half.",
)
@click.option(
    "--identity",
    type=click.Choice(["auto", "uid", "path"]),
    default="auto",
    show_default=True,
    help="How the agent tells the sidecars apart: unix:uid (root) or unix:path; auto: uid as root.",
)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="A new directory for the mesh (default: a fresh one under /tmp).",
)
@click.option(
    "--policies",
    type=click.Path(path_type=Path, file_okay=False),
    help="The policies it starts from (default: the sample policies/).",
)
@click.option(
    "--authz-mode",
    type=click.Choice(["hybrid", "ext_authz"]),
    default="hybrid",
    show_default=True,
    help="hybrid: Istio policies in Envoy's RBAC filters, ext_authz only for Rego; "
    "ext_authz: every request asks meshward authz.",
)
@click.option("--keep", is_flag=True, help="Leave the mesh running afterwards, until Ctrl-C.")
@click.option(
    "--report",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also write the results as JSON here.",
)
@handle_errors
def demo(
    duration: float,
    svid_ttl: int,
    identity: str,
    data_dir: Path | None,
    policies: Path | None,
    authz_mode: str,
    keep: bool,
    report: Path | None,
) -> None:
    """Run the sample mesh: five workloads with Envoy sidecars, mTLS with SVIDs that rotate,
    ext_authz on every request, a policy change, and the audit trail of it all."""
    from meshward.demo.mesh import DemoSettings, run_demo
    from meshward.envoy_bootstrap import AuthzMode
    from meshward.up import policies_dir

    settings = DemoSettings(
        duration=duration,
        svid_ttl=svid_ttl,
        identity=identity,
        data_dir=data_dir,
        keep=keep,
        report=report,
        authz_mode=AuthzMode(authz_mode),
    )
    sys.exit(run_demo(settings, policies_dir(policies)))


@cli.group()
def envoy() -> None:
    """Envoy sidecar configuration."""


@envoy.command("bootstrap")
@click.option("--workload", required=True, help="Workload name (the Envoy node id).")
@click.option("--namespace", required=True, help="Namespace of the protected workload.")
@click.option("--label", "labels", multiple=True, help="Workload label k=v (repeat).")
@click.option("--service", help="Service name, for AuthorizationPolicy targetRefs.")
@click.option("--app-port", type=int, required=True, help="The application's local port.")
@click.option("--inbound-port", type=int, default=15006, show_default=True)
@click.option("--admin-port", type=int, default=15000, show_default=True)
@click.option(
    "--agent-socket",
    type=click.Path(path_type=Path, dir_okay=False),
    default=Path(".meshward/agent.sock"),
    show_default=True,
)
@click.option(
    "--authz-port", type=int, default=9191, show_default=True, help="meshward authz on loopback."
)
@click.option(
    "--authz-workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="authz.workers of the meshward up beside it: ext_authz to that many processes from "
    "--authz-port on, access logs to the first.",
)
@click.option(
    "--authz-spiffe-id",
    help="Reach authz over mTLS and require this SPIFFE ID (authz.tls on the authz side).",
)
@click.option(
    "--outbound-port",
    type=int,
    default=15001,
    show_default=True,
    help="Where the application sends requests to other workloads (plain HTTP, loopback).",
)
@click.option(
    "--upstream",
    "upstreams",
    multiple=True,
    metavar="NAME=PORT@SPIFFE_ID",
    help="Route Host NAME to the sidecar on 127.0.0.1:PORT over mTLS; it must present "
    "SPIFFE_ID (repeat).",
)
@click.option("--jwt-issuer", help="Verify end-user bearer tokens of this issuer (jwt_authn).")
@click.option(
    "--jwks-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The issuer's JWKS (with --jwt-issuer).",
)
@click.option("--access-log", help="Access log path, e.g. /dev/stdout (default: none).")
@click.option(
    "--authz-mode",
    type=click.Choice(["native", "ext_authz", "hybrid"]),
    default="hybrid",
    show_default=True,
    help="native: Istio policies as Envoy RBAC filters from the agent (ECDS), no ext_authz; "
    "ext_authz: every request asks authz; hybrid: the RBAC filters, then ext_authz where a "
    "CUSTOM (Rego) policy applies.",
)
@click.option(
    "--log-header",
    "logged_headers",
    multiple=True,
    help="native/hybrid: a request header the audit trail keeps of what the RBAC filters "
    "decided, for replay of policies that read it (repeat; credentials are refused).",
)
@click.option(
    "--rego-always",
    is_flag=True,
    help="hybrid: send every request the RBAC filters allowed to ext_authz, for authz "
    "with authz.rego.mode: always.",
)
@click.option(
    "--format", "fmt", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True
)
@handle_errors
def envoy_bootstrap(
    workload: str,
    namespace: str,
    labels: tuple[str, ...],
    service: str | None,
    app_port: int,
    inbound_port: int,
    admin_port: int,
    agent_socket: Path,
    authz_port: int,
    authz_workers: int,
    authz_spiffe_id: str | None,
    outbound_port: int,
    upstreams: tuple[str, ...],
    jwt_issuer: str | None,
    jwks_file: Path | None,
    access_log: str | None,
    authz_mode: str,
    logged_headers: tuple[str, ...],
    rego_always: bool,
    fmt: str,
) -> None:
    """Print a sidecar bootstrap: inbound mTLS with SVIDs from the agent, policies enforced
    as --authz-mode says, outbound by Host to the --upstream sidecars over mTLS.

    native and hybrid take the RBAC filters from the agent (which serves agent.policies;
    `meshward up`: --policies), for the workload named by --namespace, --label, --service.
    """
    from audit.redaction import ALWAYS_REDACTED_HEADERS
    from meshward.envoy_bootstrap import AuthzMode, JwtIssuer, dump_yaml, sidecar_bootstrap

    if (jwt_issuer is None) != (jwks_file is None):
        raise click.UsageError("--jwt-issuer and --jwks-file go together")
    if rego_always and authz_mode != AuthzMode.HYBRID:
        raise click.UsageError(
            f"--rego-always is for --authz-mode hybrid; in {authz_mode} mode "
            + (
                "no request goes to ext_authz"
                if authz_mode == AuthzMode.NATIVE
                else "every request already goes to ext_authz"
            )
        )

    for header in logged_headers:
        if header.lower() in ALWAYS_REDACTED_HEADERS:
            raise click.BadParameter(
                f"{header}: a credential is never sent to the audit trail",
                param_hint="--log-header",
            )
    parsed: dict[str, str] = {}
    for label in labels:
        key, sep, value = label.partition("=")
        if not sep or not key or not value or "," in label:
            raise click.BadParameter(f"{label!r} is not k=v", param_hint="--label")
        parsed[key] = value
    bootstrap = sidecar_bootstrap(
        workload=workload,
        namespace=namespace,
        labels=parsed,
        service=service,
        agent_socket=agent_socket.absolute(),
        authz_port=authz_port,
        authz_workers=authz_workers,
        authz_id=_spiffe_id_option(authz_spiffe_id, "--authz-spiffe-id"),
        app_port=app_port,
        inbound_port=inbound_port,
        admin_port=admin_port,
        outbound_port=outbound_port,
        upstreams=[_upstream_option(u) for u in upstreams],
        jwt_issuer=JwtIssuer(jwt_issuer, jwks_file.absolute())
        if jwt_issuer and jwks_file
        else None,
        access_log=access_log,
        authz_mode=AuthzMode(authz_mode),
        rego_always=rego_always,
        logged_headers=logged_headers,
    )
    if fmt == "json":
        click.echo(json.dumps(bootstrap, indent=2))
    else:
        click.echo(dump_yaml(bootstrap), nl=False)


def _upstream_option(value: str) -> Upstream:
    from meshward.envoy_bootstrap import Upstream

    name, _, rest = value.partition("=")
    port, _, spiffe_id = rest.partition("@")
    if not name or not port.isdigit() or not spiffe_id:
        raise click.BadParameter(
            f"{value!r} is not NAME=PORT@SPIFFE_ID, e.g. "
            "reviews=15106@spiffe://example.org/ns/default/sa/reviews",
            param_hint="--upstream",
        )
    checked = _spiffe_id_option(spiffe_id, "--upstream")
    assert checked is not None
    return Upstream(name, int(port), checked)


def _spiffe_id_option(value: str | None, option: str) -> str | None:
    from identity.spiffeid import parse_spiffe_id

    if value is None:
        return None
    try:
        return str(parse_spiffe_id(value))
    except IdentityError as exc:
        raise click.BadParameter(exc.message, param_hint=option) from exc


# -- entries ---------------------------------------------------------------------------


@cli.group()
def entry() -> None:
    """Registration entries: which SPIFFE ID a workload with given selectors gets."""


def _entry_text(e: dict[str, Any]) -> str:
    rows = [
        ("Entry ID", e["id"]),
        ("SPIFFE ID", e["spiffe_id"]),
        ("Parent ID", e["parent_id"]),
        *[("Selector", s) for s in e["selectors"]],
        ("X509-SVID TTL", _ttl_text(e["x509_svid_ttl"])),
        ("JWT-SVID TTL", _ttl_text(e["jwt_svid_ttl"])),
        *[("DNS name", d) for d in e["dns_names"]],
        ("Hint", e["hint"] or "-"),
        ("Admin", "yes" if e["admin"] else "no"),
        ("Expires at", e["expires_at"] or "never"),
        ("Revision", str(e["revision"])),
    ]
    return "\n".join(f"{k:<15}: {v}" for k, v in rows)


def _ttl_text(seconds: int | None) -> str:
    if seconds is None:
        return "default"
    return format_duration(parse_duration(seconds))


def _entry_body(
    *,
    spiffe_id: str | None,
    parent_id: str | None,
    selectors: tuple[str, ...],
    x509_svid_ttl: Any,
    jwt_svid_ttl: Any,
    dns_names: tuple[str, ...],
    hint: str | None,
    admin: bool | None,
    expires_at: datetime | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "spiffe_id": spiffe_id,
        "parent_id": parent_id,
        "selectors": list(selectors) or None,
        "x509_svid_ttl": int(x509_svid_ttl.total_seconds()) if x509_svid_ttl else None,
        "jwt_svid_ttl": int(jwt_svid_ttl.total_seconds()) if jwt_svid_ttl else None,
        "dns_names": list(dns_names) or None,
        "hint": hint,
        "admin": admin,
        "expires_at": expires_at.isoformat() if expires_at else None,
    }
    return {k: v for k, v in body.items() if v is not None}


def entry_options(*, create: bool) -> Callable[[F], F]:
    def decorate(func: F) -> F:
        options = [
            click.option("--spiffe-id", required=create, help="SPIFFE ID the workload gets."),
            click.option("--parent-id", help="SPIFFE ID of the agent (node) the workload runs on."),
            click.option(
                "--selector",
                "selectors",
                multiple=True,
                required=create,
                help="type:key:value, e.g. unix:uid:1000 (repeat; all must match).",
            ),
            click.option("--x509-svid-ttl", type=DURATION, help="e.g. 30m"),
            click.option("--jwt-svid-ttl", type=DURATION, help="e.g. 5m"),
            click.option("--dns", "dns_names", multiple=True, help="DNS SAN (repeat)."),
            click.option("--hint", help="Hint passed to workloads to pick between SVIDs."),
            click.option("--admin/--no-admin", default=None, help="Entry may use the admin API."),
            click.option(
                "--expires-at",
                type=click.DateTime(["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%d"]),
                help="When the entry stops applying, e.g. 2027-01-01T00:00:00Z.",
            ),
        ]
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def _aware(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


@entry.command("create")
@common
@entry_options(create=True)
@handle_errors
def entry_create(
    config_path: Path | None, data_dir: Path | None, output: str, **fields: Any
) -> None:
    """Create a registration entry."""
    fields["expires_at"] = _aware(fields["expires_at"])
    with _client(config_path, data_dir) as client:
        created = client.json("POST", "/v1/entries", json=_entry_body(**fields))
    emit(output, created, _entry_text)


@entry.command("update")
@common
@click.argument("entry_id")
@entry_options(create=False)
@handle_errors
def entry_update(
    config_path: Path | None, data_dir: Path | None, output: str, entry_id: str, **fields: Any
) -> None:
    """Change fields of an entry (given selectors or DNS names replace the old ones)."""
    fields["expires_at"] = _aware(fields["expires_at"])
    with _client(config_path, data_dir) as client:
        updated = client.json("PATCH", f"/v1/entries/{entry_id}", json=_entry_body(**fields))
    emit(output, updated, _entry_text)


@entry.command("show")
@common
@click.argument("entry_id")
@handle_errors
def entry_show(config_path: Path | None, data_dir: Path | None, output: str, entry_id: str) -> None:
    """Show one entry."""
    with _client(config_path, data_dir) as client:
        emit(output, client.json("GET", f"/v1/entries/{entry_id}"), _entry_text)


@entry.command("list")
@common
@click.option("--spiffe-id")
@click.option("--parent-id")
@click.option("--selector", help="Only entries with this selector.")
@handle_errors
def entry_list(
    config_path: Path | None,
    data_dir: Path | None,
    output: str,
    spiffe_id: str | None,
    parent_id: str | None,
    selector: str | None,
) -> None:
    """List entries."""
    params = {
        k: v
        for k, v in (("spiffe_id", spiffe_id), ("parent_id", parent_id), ("selector", selector))
        if v
    }
    with _client(config_path, data_dir) as client:
        entries = client.json("GET", "/v1/entries", params=params)

    def text(items: list[dict[str, Any]]) -> str:
        if not items:
            return "no entries"
        return "\n\n".join(_entry_text(e) for e in items) + f"\n\n{len(items)} entries"

    emit(output, entries, text)


@entry.command("delete")
@common
@click.argument("entry_id")
@handle_errors
def entry_delete(
    config_path: Path | None, data_dir: Path | None, output: str, entry_id: str
) -> None:
    """Delete an entry."""
    with _client(config_path, data_dir) as client:
        deleted = client.json("DELETE", f"/v1/entries/{entry_id}")
    emit(output, deleted, lambda e: f"deleted entry {e['id']} ({e['spiffe_id']})")


# -- join tokens -----------------------------------------------------------------------


@cli.group()
def token() -> None:
    """Join tokens for agent attestation."""


@token.command("generate")
@common
@click.option(
    "--ttl", type=DURATION, default="10m", show_default=True, help="How long the token is valid."
)
@handle_errors
def token_generate(config_path: Path | None, data_dir: Path | None, output: str, ttl: Any) -> None:
    """Generate a single-use join token (shown once)."""
    with _client(config_path, data_dir) as client:
        issued = client.json("POST", "/v1/join-tokens", json={"ttl": int(ttl.total_seconds())})
    emit(output, issued, lambda t: f"Token: {t['token']}\nExpires at: {t['expires_at']}")


# -- minting ---------------------------------------------------------------------------


@cli.group()
def svid() -> None:
    """X509-SVIDs."""


@svid.command("mint")
@common
@click.option("--spiffe-id", required=True)
@click.option("--ttl", type=DURATION, help="Lifetime (default: the server's X509-SVID TTL).")
@click.option("--dns", "dns_names", multiple=True, help="DNS SAN (repeat).")
@click.option(
    "--key-type",
    type=click.Choice([k.value for k in KeyType]),
    default=KeyType.EC_P256.value,
    show_default=True,
)
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False), required=True)
@handle_errors
def svid_mint(
    config_path: Path | None,
    data_dir: Path | None,
    output: str,
    spiffe_id: str,
    ttl: Any,
    dns_names: tuple[str, ...],
    key_type: str,
    out_dir: Path,
) -> None:
    """Mint an X509-SVID: the key is made here and never sent; the server signs a CSR.

    Writes svid.pem (leaf first, then intermediates), key.pem (0600) and bundle.pem.
    """
    key = generate_key(KeyType(key_type))
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshward")]))
        .sign(key, signature_hash(key))
    )
    body: dict[str, Any] = {
        "spiffe_id": spiffe_id,
        "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
        "dns_names": list(dns_names),
    }
    if ttl is not None:
        body["ttl"] = int(ttl.total_seconds())
    with _client(config_path, data_dir) as client:
        minted = client.json("POST", "/v1/svids/x509", json=body)
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private_key(out_dir / "key.pem", key)
    (out_dir / "svid.pem").write_text(minted["svid_pem"])
    (out_dir / "bundle.pem").write_text(minted["bundle_pem"])
    chain = x509.load_pem_x509_certificates(minted["svid_pem"].encode())
    summary = {
        "spiffe_id": minted["spiffe_id"],
        "serial": minted["serial"],
        "expires_at": minted["expires_at"],
        "capped": minted["capped"],
        "files": {n: str(out_dir / n) for n in ("svid.pem", "key.pem", "bundle.pem")},
        "chain": [_cert_summary(c) for c in chain],
    }
    emit(output, summary, _svid_text)


def _cert_summary(cert: x509.Certificate) -> dict[str, Any]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
        dns = sans.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        uris, dns = [], []
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "uri_sans": uris,
        "dns_sans": dns,
        "serial": f"{cert.serial_number:x}",
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "sha256": cert.fingerprint(hashes.SHA256()).hex(),
    }


def _svid_text(s: dict[str, Any]) -> str:
    leaf = s["chain"][0]
    lines = [
        f"SPIFFE ID : {s['spiffe_id']}",
        f"Subject   : {leaf['subject']}",
        f"Serial    : {s['serial']}",
        f"Expires at: {s['expires_at']}" + ("  (capped at the CA's expiry)" if s["capped"] else ""),
    ]
    if leaf["dns_sans"]:
        lines.append(f"DNS names : {', '.join(leaf['dns_sans'])}")
    lines.append("Chain     :")
    for i, cert in enumerate(s["chain"]):
        lines.append(
            f"  [{i}] {cert['subject']}  (issuer {cert['issuer']}, until {cert['not_after']})"
        )
    lines.append("Files     : " + ", ".join(s["files"].values()))
    return "\n".join(lines)


@cli.group("jwt")
def jwt_group() -> None:
    """JWT-SVIDs."""


@jwt_group.command("mint")
@common
@click.option("--spiffe-id", required=True)
@click.option("--audience", "audience", multiple=True, required=True, help="aud claim (repeat).")
@click.option("--ttl", type=DURATION, help="Lifetime (default: the server's JWT-SVID TTL).")
@handle_errors
def jwt_mint(
    config_path: Path | None,
    data_dir: Path | None,
    output: str,
    spiffe_id: str,
    audience: tuple[str, ...],
    ttl: Any,
) -> None:
    """Mint a JWT-SVID; text output is the token alone, ready for a shell variable."""
    body: dict[str, Any] = {"spiffe_id": spiffe_id, "audience": list(audience)}
    if ttl is not None:
        body["ttl"] = int(ttl.total_seconds())
    with _client(config_path, data_dir) as client:
        minted = client.json("POST", "/v1/svids/jwt", json=body)
    emit(output, minted, lambda m: m["token"])


# -- bundle and CA ---------------------------------------------------------------------


@cli.group()
def bundle() -> None:
    """The trust bundle."""


@bundle.command("show")
@common
@click.option(
    "--format", "fmt", type=click.Choice(["pem", "jwks"]), default="pem", show_default=True
)
@handle_errors
def bundle_show(config_path: Path | None, data_dir: Path | None, output: str, fmt: str) -> None:
    """Print the X.509 roots (PEM) or the SPIFFE bundle (JWKS)."""
    with _client(config_path, data_dir) as client:
        response = client.request("GET", "/v1/bundle", params={"format": fmt})
    if fmt == "pem" and output == "json":
        click.echo(json.dumps({"pem": response.text}))
    elif fmt == "pem":
        click.echo(response.text, nl=False)
    else:
        click.echo(json.dumps(response.json(), indent=2))


@cli.group()
def ca() -> None:
    """The certificate authority."""


def _ca_text(c: dict[str, Any]) -> str:
    lines = [
        f"Trust domain   : {c['trust_domain']}",
        f"Upstream       : {'disk' if c['upstream'] else 'none (self-signed)'}",
        f"Bundle sequence: {c['bundle_sequence']}",
    ]
    for slot in c["slots"]:
        lines += [
            "",
            f"CA {slot['id']}  [{slot['state'].upper()}]"
            + ("" if slot["can_sign"] else "  (key lost)"),
            f"  subject    : {slot['subject']}",
            f"  key type   : {slot['key_type']}",
            f"  valid      : {slot['not_before']} .. {slot['not_after']}",
            f"  prepare at : {slot['prepare_at']}",
            f"  activate at: {slot['activate_at']}",
            f"  JWT key ID : {slot['jwt_key_id']}",
        ]
    return "\n".join(lines)


@ca.command("show")
@common
@handle_errors
def ca_show(config_path: Path | None, data_dir: Path | None, output: str) -> None:
    """Show the CA slots (PREPARED / ACTIVE / OLD) and their schedule."""
    with _client(config_path, data_dir) as client:
        emit(output, client.json("GET", "/v1/ca"), _ca_text)


@ca.command("rotate")
@common
@handle_errors
def ca_rotate(config_path: Path | None, data_dir: Path | None, output: str) -> None:
    """Prepare and activate a new CA now (the old one stays in the bundle until it expires)."""
    with _client(config_path, data_dir) as client:
        result = client.json("POST", "/v1/ca/rotate")
    emit(output, result, lambda r: "\n".join(r["events"]) + "\n\n" + _ca_text(r["ca"]))


cli.add_command(audit)
policy.add_command(policy_replay)


def main() -> None:
    try:
        cli.main(prog_name="meshward", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.format_message(), err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        # Usage errors too get the one-line form every other error has.
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(1)
