"""`explain` and `replay` wired to the engines, through the audit API as the page uses them.

Decisions are made by the real servicer on the sample policies (the admin console, which
Rego decides) or on a set whose outcome depends on the authz settings it is served with,
and shipped into the store; the audit API's explain and replay endpoints run with the
wiring `meshward audit` uses.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from audit.api import create_audit_app
from audit.record import DecisionRecord
from audit.store.database import AuditDatabase, sqlite_url
from authz.replay import report_text
from meshward.audit_tools import NO_SETTINGS, explainer, replay_decisions, replayer
from meshward.config import load_config
from tests.asgi_client import TestClient
from tests.audit.decided import (
    ADMIN_REQUESTS,
    SETTINGS_FLAGS,
    SETTINGS_REQUESTS,
    config_for,
    decide_into_store,
    replay_store,
    settings_policies,
    stored_decisions,
)

POLICIES = Path(__file__).parents[2] / "policies"
DECISION = "data.envoy.authz.allow"
CUSTOM_RULE = "default.admin-rego[rules[0]]"
TOKEN_NOT_KEPT = "a Rego module reads header authorization, which is not stored"


@dataclass
class Store:
    root: Path
    url: str
    records: list[DecisionRecord]

    @property
    def data_dir(self) -> Path:
        return self.root / "data"


@pytest.fixture(scope="module")
def admin(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """ADMIN_REQUESTS decided on the sample policies (see tests/audit/decided.py)."""
    root = tmp_path_factory.mktemp("admin")
    records = decide_into_store(POLICIES, root / "data", ADMIN_REQUESTS)
    return Store(root, sqlite_url(root / "data"), records)


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """SETTINGS_REQUESTS decided on their policy set, served with SETTINGS_FLAGS."""
    root = tmp_path_factory.mktemp("settings")
    policies = settings_policies(root / "policies")
    records = decide_into_store(policies, root / "data", SETTINGS_REQUESTS, flags=SETTINGS_FLAGS)
    assert [r.allowed for r in records] == [True] * 3 + [False] * 2
    assert {r.engine for r in records[3:]} == {"rego"}
    return Store(root, sqlite_url(root / "data"), records)


def audit_api(store: Store, roots: list[Path]) -> Iterator[TestClient]:
    """The API as `meshward audit` serves it, with the config of a machine whose
    settings are the defaults (trust domain example.org, nothing else set)."""
    config = config_for(store.data_dir)
    reader = AuditDatabase(store.url, read_only=True)
    app = create_audit_app(
        reader,
        registry=CollectorRegistry(),
        explain=explainer(config),
        replay=replayer(config, roots),
    )
    with TestClient(app) as client:
        yield client
    reader.dispose()


@pytest.fixture
def admin_api(admin: Store, tmp_path: Path) -> Iterator[TestClient]:
    yield from audit_api(admin, [tmp_path])


@pytest.fixture
def settings_api(settings: Store) -> Iterator[TestClient]:
    yield from audit_api(settings, [settings.root])


def explained(client: TestClient, record: DecisionRecord) -> dict[str, Any]:
    response = client.get(f"/v1/decisions/{record.decision_id}/explain")
    assert response.status_code == 200, response.text
    report: dict[str, Any] = response.json()
    return report


def replayed(client: TestClient, policies: Path, **params: Any) -> dict[str, Any]:
    response = client.get("/v1/replay", params={"policies": str(policies), **params})
    assert response.status_code == 200, response.text
    report: dict[str, Any] = response.json()
    return report


def matched_rules(report: dict[str, Any]) -> dict[str, tuple[str, str | None, str | None]]:
    return {
        p["policy"]: (p["action"], p["provider"], p["matched_rule"])
        for p in report["istio"]["policies"]
    }


# -- explain: Rego decisions ---------------------------------------------------------------


def test_explain_names_the_rego_decision_that_denied_and_reproduces_it(
    admin: Store, admin_api: TestClient
) -> None:
    no_token = admin.records[5]  # GET /admin/users without a token: Rego's 401
    assert (no_token.engine, no_token.status, no_token.redacted) == ("rego", 401, ())
    report = explained(admin_api, no_token)
    decision = report["decision"]
    assert (decision["engine"], decision["policy_id"], decision["rego_decision"]) == (
        "rego",
        CUSTOM_RULE,
        DECISION,
    )
    # The Istio CUSTOM rule that handed the request to Rego, and the ALLOW layer after it.
    rules = matched_rules(report)
    assert rules["default.admin-rego"] == ("CUSTOM", "rego", CUSTOM_RULE)
    assert rules["default.admin-callers"] == ("ALLOW", None, "default.admin-callers[rules[0]]")
    # The Rego decision by path and package, with the value it produced.
    rego = report["rego"]
    assert (rego["decision"], rego["package"]) == (DECISION, "envoy.authz")
    assert rego["dry_run_packages"] == ["envoy.authz.mfa"]
    value = rego["result"]["value"]
    assert (value["allowed"], value["http_status"]) == (False, 401)
    assert value["body"] == "a bearer token is required for the admin console"
    again = report["reevaluated"]
    assert (again["allowed"], again["status"], again["engine"]) == (False, 401, "rego")
    assert again["reproduced"] is True
    assert again["not_reevaluable"] is None
    assert report["notes"] == []


@pytest.mark.parametrize(
    ("index", "allowed", "status"),
    [(0, True, None), (3, False, 403)],
    ids=["rego-allowed-bob", "rego-denied-bob-403"],
)
def test_explain_of_a_rego_decision_on_a_token_not_kept_does_not_claim_to_reproduce_it(
    admin: Store, admin_api: TestClient, index: int, allowed: bool, status: int | None
) -> None:
    record = admin.records[index]
    assert (record.allowed, record.status, record.rego_decision) == (allowed, status, DECISION)
    assert record.redacted == ("header:authorization",)
    report = explained(admin_api, record)
    assert report["decision"]["rego_result"]["allowed"] is allowed
    assert (report["rego"]["decision"], report["rego"]["package"]) == (DECISION, "envoy.authz")
    assert matched_rules(report)["default.admin-rego"] == ("CUSTOM", "rego", CUSTOM_RULE)
    # The stored request holds the token's hash: Rego answers it with its 401, which is
    # neither the recorded allow nor the recorded 403 (same verdict and reason: a check of
    # those alone would call it reproduced).
    assert report["rego"]["result"]["value"]["http_status"] == 401
    again = report["reevaluated"]
    assert again["not_reevaluable"] == TOKEN_NOT_KEPT
    assert again["reproduced"] is False
    assert any(TOKEN_NOT_KEPT in note for note in report["notes"]), report["notes"]


# -- replay: a candidate Rego change -------------------------------------------------------


def admin_candidate(root: Path) -> Path:
    """The sample policies with the health check handed to Rego too, and Rego allowing
    GET /admin/public/* without a token."""
    candidate = root / "candidate"
    shutil.copytree(POLICIES, candidate)
    istio = candidate / "istio" / "admin.yaml"
    text = istio.read_text()
    changed = text.replace(
        '  - to:\n    - operation:\n        notPaths: ["/healthz"]\n', "  - {}\n"
    )
    assert changed != text
    istio.write_text(changed)
    rego = candidate / "rego" / "envoy" / "authz" / "policy.rego"
    rego.write_text(
        rego.read_text() + '\nallow := {"allowed": true} if {\n\thttp_request.method == "GET"\n'
        '\tstartswith(request_path, "/admin/public/")\n}\n'
    )
    return candidate


def test_replay_of_a_rego_change_reports_its_flips_and_counts_requests_decided_on_a_token(
    admin: Store, admin_api: TestClient, tmp_path: Path
) -> None:
    report = replayed(admin_api, admin_candidate(tmp_path), since="24h")
    assert report["considered"] == len(ADMIN_REQUESTS) == 12
    # Every request that sent a token (bob's reads and delete, alice's delete) was
    # decided on it, and the trail keeps only its hash: counted, never decided on the
    # hash (which Rego would answer with a 401, i.e. flip bob's and alice's allows).
    assert report["not_reevaluable"] == {TOKEN_NOT_KEPT: 6}
    assert report["reevaluated"] == 6
    assert report["unchanged"] == 2  # GET /admin/users without a token: still Rego's 401
    assert report["flips"] == {"allow_to_deny": 2, "deny_to_allow": 2}
    groups = {(g["direction"], g["policy"]): g for g in report["groups"]}
    assert set(groups) == {("allow_to_deny", CUSTOM_RULE), ("deny_to_allow", CUSTOM_RULE)}
    health = groups[("allow_to_deny", CUSTOM_RULE)]
    assert (health["count"], health["principal"]) == (2, None)
    assert {(e["path"], e["now"]["engine"], e["now"]["status"]) for e in health["examples"]} == {
        ("/healthz", "rego", 401)
    }
    public = groups[("deny_to_allow", CUSTOM_RULE)]
    assert (public["count"], public["principal"]) == (2, "example.org/ns/default/sa/frontend")
    assert {e["decision_id"] for e in public["examples"]} == {
        r.decision_id for r in admin.records if (r.path or "").startswith("/admin/public/")
    }
    assert {(e["was"]["engine"], e["was"]["status"]) for e in public["examples"]} == {("rego", 401)}


# -- replay: the settings decisions were made under ---------------------------------------


def test_replay_decides_under_the_recorded_settings_not_this_machines(
    settings: Store, settings_api: TestClient
) -> None:
    unchanged = settings.root / "policies"
    config = config_for(settings.data_dir)  # no alias, Rego mode custom
    recorded = replay_store(settings.url, config, unchanged)
    assert recorded["flips"] == {"allow_to_deny": 0, "deny_to_allow": 0}
    assert (recorded["reevaluated"], recorded["unchanged"]) == (5, 5)
    assert recorded["notes"] == []
    # The same policies under this machine's settings "flip" every decision: what the
    # replay reported before it read the recorded settings.
    local = replay_store(settings.url, config, unchanged, recorded=False)
    assert local["flips"] == {"allow_to_deny": 3, "deny_to_allow": 2}
    assert [n.split(":")[0] for n in local["notes"]] == [
        f"the audit trail does not keep the settings of policy set "
        f"{settings.records[0].policy_set_version}"
    ]
    # The page's replay, on a server whose config has neither setting, agrees.
    served = replayed(settings_api, unchanged, since="24h")
    assert served["flips"] == {"allow_to_deny": 0, "deny_to_allow": 0}
    assert served["reevaluated"] == 5


def test_the_api_returns_a_policy_sets_settings(settings: Store, settings_api: TestClient) -> None:
    version = settings.records[0].policy_set_version
    response = settings_api.get(f"/v1/policy-sets/{version}")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["version"] == version
    assert sorted(body["files"]) == ["istio/api.yaml", "rego/envoy/authz/policy.rego"]
    assert body["settings"]["trust_domain"] == "example.org"
    assert body["settings"]["trust_domain_aliases"] == ["old.example.org"]
    assert body["settings"]["rego"]["mode"] == "always"
    assert settings_api.get("/v1/policy-sets/0000000000000000").status_code == 404


def test_an_explicit_trust_domain_overrides_the_recorded_one_and_the_report_says_so(
    settings: Store,
) -> None:
    report = replay_store(
        settings.url,
        config_for(settings.data_dir),
        settings.root / "policies",
        overrides={"trust_domain": "cluster.local"},
    )
    # Under cluster.local the frontend's example.org principal is no longer the alias's.
    assert report["flips"] == {"allow_to_deny": 3, "deny_to_allow": 0}
    (note,) = report["notes"]
    assert note.startswith(
        'replayed with trust_domain "cluster.local" (given), not "example.org" as policy set '
        f"{settings.records[0].policy_set_version} was served with"
    ), note
    assert note.endswith("(5 decisions)")
    assert f"note: {note}" in report_text(report)


def test_decisions_whose_settings_are_unknown_are_counted_without_a_trust_domain(
    settings: Store, tmp_path: Path
) -> None:
    decisions = stored_decisions(settings.url)
    no_trust_domain = load_config(None, env={}, flags={"data_dir": tmp_path})
    assert no_trust_domain.trust_domain is None
    report = replay_decisions(
        no_trust_domain, settings.root / "policies", decisions, recorded=lambda version: None
    )
    assert report["not_reevaluable"] == {NO_SETTINGS: 5}
    assert report["reevaluated"] == 0
    assert report["flips"] == {"allow_to_deny": 0, "deny_to_allow": 0}
    # The settings the trail keeps are enough without any trust domain configured here.
    kept = replay_store(settings.url, no_trust_domain, settings.root / "policies")
    assert (kept["reevaluated"], kept["unchanged"], kept["not_reevaluable"]) == (5, 5, {})


# -- replay: the limit ---------------------------------------------------------------------


def test_a_replay_cut_at_its_limit_says_so(settings: Store, settings_api: TestClient) -> None:
    policies = settings.root / "policies"
    config = config_for(settings.data_dir)
    cut = replay_store(settings.url, config, policies, limit=2)
    assert (cut["considered"], cut["limit"], cut["truncated"]) == (2, 2, True)
    assert "stopped at the limit of 2: more recorded decisions match" in report_text(cut)
    whole = replay_store(settings.url, config, policies, limit=5)
    assert (whole["considered"], whole["truncated"]) == (5, False)
    assert "stopped at the limit" not in report_text(whole)
    served_cut = replayed(settings_api, policies, since="24h", limit=4)
    assert (served_cut["considered"], served_cut["truncated"]) == (4, True)
    served_whole = replayed(settings_api, policies, since="24h", limit=5)
    assert (served_whole["considered"], served_whole["truncated"]) == (5, False)
