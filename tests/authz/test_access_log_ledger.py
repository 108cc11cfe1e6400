"""The ledger of access-log entries: what each Envoy says it sent, against what arrived."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from authz.access_log_ledger import ENVOY_COUNTER_NAMES, AccessLogLedger


def test_entries_flushed_but_never_received_are_counted_per_envoy() -> None:
    ledger = AccessLogLedger()
    ledger.received("a", 10)
    ledger.report("a", {"written": 10, "flushed": 10})  # counting starts here
    ledger.received("a", 5)
    ledger.report("a", {"written": 25, "flushed": 25})
    ledger.received("b", 3)
    ledger.report("b", {"written": 3, "flushed": 3})
    nodes = ledger.nodes()
    assert nodes["a"]["unreceived"] == 10
    assert nodes["b"]["unreceived"] == 0
    totals = ledger.totals()
    assert (totals["written"], totals["flushed"], totals["received"]) == (28, 28, 18)
    assert totals["unreceived"] == 10
    assert list(ledger.details()["losing"]) == ["a"]


def test_what_an_envoy_flushed_before_its_first_report_is_taken_as_received() -> None:
    # An Envoy that ran before this ledger existed: its past is not counted as lost.
    ledger = AccessLogLedger()
    ledger.received("a", 2)
    ledger.report("a", {"flushed": 40})
    assert ledger.nodes()["a"]["unreceived"] == 0
    ledger.report("a", {"flushed": 45})
    assert ledger.nodes()["a"]["unreceived"] == 5


def test_entries_received_ahead_of_the_next_report_are_no_loss() -> None:
    ledger = AccessLogLedger()
    ledger.report("a", {"flushed": 0})
    ledger.received("a", 7)  # flushed after the last report, already here
    assert ledger.nodes()["a"]["unreceived"] == 0


def test_a_restarted_envoy_keeps_what_it_counted_before() -> None:
    ledger = AccessLogLedger()
    ledger.received("a", 96)
    ledger.report("a", {"written": 100, "dropped": 4, "flushed": 96})
    ledger.report("a", {"written": 3, "flushed": 3})  # lower: a new Envoy process
    ledger.received("a", 1)
    node = ledger.nodes()["a"]
    assert (node["written"], node["dropped"], node["flushed"]) == (103, 4, 99)
    assert node["unreceived"] == 2
    # A counter a report leaves out (Envoy sends counters once used) keeps its value.
    ledger.report("a", {"written": 4})
    assert ledger.nodes()["a"]["dropped"] == 4


def test_the_ledger_survives_a_restart_of_meshward(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "ledger.json"
    first = AccessLogLedger(path)
    first.report("a", {"flushed": 10})
    first.received("a", 3)  # before a restart: these arrived at the first process
    first.save()
    second = AccessLogLedger(path)
    second.received("a", 4)
    second.report("a", {"flushed": 20})
    # 10 (counting started) + 3 + 4 received of 20 flushed: 3 lost, not 13.
    assert second.nodes()["a"]["received"] == 17
    assert second.nodes()["a"]["unreceived"] == 3


def test_an_unreadable_ledger_is_set_aside_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    path.write_text("{not json")
    ledger = AccessLogLedger(path)
    assert ledger.nodes() == {}
    assert (tmp_path / "ledger.bad").read_text() == "{not json"


def test_totals_are_exported_as_metrics() -> None:
    ledger = AccessLogLedger()
    ledger.received("a", 10)
    ledger.report("a", {"written": 12, "dropped": 2, "flushed": 10, "flush_failed": 1})
    ledger.report("a", {"flushed": 14})
    registry = CollectorRegistry()
    registry.register(ledger.collector())
    text = generate_latest(registry).decode()
    assert "meshward_envoy_access_log_dropped_total 2.0" in text
    assert "meshward_envoy_access_log_flush_failed_total 1.0" in text
    assert "meshward_envoy_access_log_unreceived 4.0" in text
    assert "meshward_envoy_stats_reporters 1.0" in text


def test_envoy_counter_names_are_the_ledgers_keys() -> None:
    assert ENVOY_COUNTER_NAMES["access_logs.grpc_access_log.logs_dropped"] == "dropped"
    assert set(ENVOY_COUNTER_NAMES.values()) == {"written", "dropped", "flushed", "flush_failed"}
