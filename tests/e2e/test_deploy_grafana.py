"""deploy/grafana/meshward.json: a Grafana dashboard over metrics meshward really exposes.

Every metric a panel's query names must be one that `meshward authz` (its servicer,
policy store and audit spool) or `meshward audit` registers, so a renamed metric
breaks this test rather than a user's dashboard.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from audit.api import create_audit_app
from audit.sink import MemorySink
from audit.store.database import AuditDatabase, sqlite_url
from meshward.authz_audit import AuthzAudit
from meshward.authz_runtime import build_authz
from meshward.config import load_config

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "meshward.json"
_METRIC = re.compile(r"\bmeshward_[a-z_]+")
_SUFFIXES = ("_bucket", "_total", "_count", "_sum")


def exposed(tmp_path: Path) -> set[str]:
    config = load_config(None, env={}, flags={"trust_domain": "example.org", "data_dir": tmp_path})
    registry = CollectorRegistry()
    build_authz(config, policies=Path("policies"), sink=MemorySink(), registry=registry)
    audit = AuthzAudit(config)
    registry.register(audit.collector())
    db = AuditDatabase(sqlite_url(tmp_path))
    create_audit_app(db, registry=registry)
    text = generate_latest(registry).decode()
    audit.close()
    db.dispose()
    return {family.name for family in text_string_to_metric_families(text)}


def test_every_query_names_a_metric_meshward_exposes(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    families = exposed(tmp_path)
    queries = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    assert len(queries) >= 15
    named = {m for q in queries for m in _METRIC.findall(q)}
    for name in sorted(named):
        family = next((name.removesuffix(s) for s in _SUFFIXES if name.endswith(s)), name)
        assert family in families, f"{name}: no such metric (exposed: {sorted(families)})"
    # What the issue asks the dashboard to show.
    for wanted in (
        "meshward_authz_decisions",
        "meshward_authz_policy_decisions",
        "meshward_authz_decision_seconds",
        "meshward_audit_spool_pending_bytes",
        "meshward_audit_shipper_lag_seconds",
        "meshward_audit_records_lost",
    ):
        assert any(wanted in q for q in queries), wanted


def test_the_dashboard_is_well_formed(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        covered = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not covered & cells, f"{panel['title']} overlaps another panel"
        cells |= covered
        for target in panel.get("targets", []):
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
            assert "$instance" in target["expr"], target["expr"]
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "instance"}
