"""What each Envoy says it sent over the access-log service, against what meshward got.

Envoy's counters (received over its metrics service, :mod:`authz.envoy_metrics_service`)
do not see every loss. ``logs_dropped`` counts entries dropped when the logger's
buffer is full; but entries written into a stream that then fails (the receiver
killed, or away when the stream was opened: Envoy 1.40 opens it, writes, and learns
of the refused connection afterwards) are counted as ``grpc_entries_flushed`` and
lost without any counter of Envoy's. So meshward keeps, per Envoy node id, both
sides of the ledger:

- Envoy's cumulative counters, as last reported (``written``, ``dropped``,
  ``flushed``, ``flush_failed``; see :data:`ENVOY_COUNTERS`), a value lower than the
  last one being a restarted Envoy whose earlier count is carried over;
- ``received``: the entries meshward's receiver took from that node, whatever became
  of them (recorded, skipped, malformed);

and reports ``unreceived = flushed - received`` per node (never below zero): entries
Envoy wrote into a stream that never reached meshward, bar those still in flight.
Counting starts at the first report of a node: what it had flushed before is taken
as received (so an Envoy older than the ledger is not charged with its past; entries
in flight at that moment then hide as many later losses).

The ledger is saved in the data dir (``audit/access-log-ledger.json``, at most every
:data:`SAVE_INTERVAL` and at exit), so a restarted authz process keeps the receipts of
the one before: entries its predecessor received are not counted as lost, entries
that died with it are. Receipts of the last moments before a crash (less than the
save interval) may be counted as lost: the count errs on the side of loss. Entries
still buffered in an Envoy are in ``written - flushed``, and lost if that
Envoy exits before it flushes them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "ENVOY_COUNTERS",
    "ENVOY_COUNTER_NAMES",
    "SAVE_INTERVAL",
    "AccessLogLedger",
]

log = logging.getLogger(__name__)

SAVE_INTERVAL = 0.25  # seconds
_PREFIX = "access_logs.grpc_access_log."
# The ledger's keys of Envoy's counters, and what each counts (metric help texts).
ENVOY_COUNTERS: Mapping[str, str] = {
    "written": "Entries Envoy's gRPC access loggers took (logs_written)",
    "dropped": "Entries Envoy dropped because its access-log buffer was full "
    "(logs_dropped): lost decisions",
    "flushed": "Entries Envoy wrote into an access-log stream (grpc_entries_flushed; the "
    "protocol has no acknowledgement)",
    "flush_failed": "Access-log sends Envoy could not make and kept for its next flush "
    "(grpc_entries_flush_failed)",
}
_RECEIVED = "received"
_UNRECEIVED = "unreceived"


# Envoy's stat names (``emit_tags_as_labels`` off) → the ledger's keys.
ENVOY_COUNTER_NAMES: Mapping[str, str] = {
    _PREFIX + "logs_written": "written",
    _PREFIX + "logs_dropped": "dropped",
    _PREFIX + "grpc_entries_flushed": "flushed",
    _PREFIX + "grpc_entries_flush_failed": "flush_failed",
}


@dataclass(slots=True)
class _Node:
    last: dict[str, float] = field(default_factory=dict)
    carried: dict[str, float] = field(default_factory=dict)
    received: int = 0
    reported: bool = False

    def total(self, key: str) -> float:
        return self.carried.get(key, 0.0) + self.last.get(key, 0.0)

    def unreceived(self) -> float:
        return max(0.0, self.total("flushed") - self.received) if self.reported else 0.0


class AccessLogLedger:
    """Per Envoy node: its counters and meshward's receipts (see the module docstring)."""

    def __init__(self, path: Path | None = None) -> None:
        self._path = path  # None: kept in memory only
        self._nodes: dict[str, _Node] = {}
        self._dirty = False
        if path is not None:
            self._load(path)

    def received(self, node_id: str, count: int) -> None:
        """``count`` entries of ``node_id`` reached the receiver."""
        self._nodes.setdefault(node_id, _Node()).received += count
        self._dirty = True

    def report(self, node_id: str, values: Mapping[str, float]) -> None:
        """One report of ``node_id``'s cumulative counters (keys of :data:`ENVOY_COUNTERS`);
        a counter it leaves out keeps its value (Envoy reports counters once used)."""
        node = self._nodes.setdefault(node_id, _Node())
        for key, value in values.items():
            last = node.last.get(key, 0.0)
            if value < last:
                node.carried[key] = node.carried.get(key, 0.0) + last
            node.last[key] = value
        if not node.reported:
            # Counting starts now: what it flushed before is taken as received.
            node.reported = True
            node.received = max(node.received, int(node.total("flushed")))
        self._dirty = True

    def nodes(self) -> dict[str, dict[str, float]]:
        return {
            node_id: {
                **{k: node.total(k) for k in ENVOY_COUNTERS},
                _RECEIVED: node.received,
                _UNRECEIVED: node.unreceived(),
            }
            for node_id, node in sorted(self._nodes.items())
        }

    def totals(self) -> dict[str, float]:
        nodes = self._nodes.values()
        out = {k: sum(n.total(k) for n in nodes) for k in ENVOY_COUNTERS}
        out[_RECEIVED] = sum(n.received for n in nodes)
        out[_UNRECEIVED] = sum(n.unreceived() for n in nodes)
        return out

    def details(self, *, max_nodes: int = 20) -> dict[str, Any]:
        """``/ready``'s view: the totals, and the nodes that lost entries (worst first)."""
        nodes = self.nodes()
        losing = sorted(
            (n for n in nodes.items() if n[1]["dropped"] or n[1][_UNRECEIVED]),
            key=lambda n: -(n[1]["dropped"] + n[1][_UNRECEIVED]),
        )
        return {
            "envoys_reporting": sum(1 for n in self._nodes.values() if n.reported),
            **{k: int(v) for k, v in self.totals().items()},
            "losing": {
                node_id: {k: int(v) for k, v in n.items()} for node_id, n in losing[:max_nodes]
            },
        }

    # -- persistence ---------------------------------------------------------------

    def save(self) -> None:
        """Write the ledger if it changed (no fsync: it must survive this process, not
        the machine, whose spool loses its last records too)."""
        if self._path is None or not self._dirty:
            return
        self._dirty = False
        document = {
            node_id: {
                "last": node.last,
                "carried": node.carried,
                "received": node.received,
                "reported": node.reported,
            }
            for node_id, node in self._nodes.items()
        }
        temporary = self._path.with_suffix(".tmp")
        try:
            self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            temporary.write_text(json.dumps(document, separators=(",", ":")))
            os.replace(temporary, self._path)
        except OSError as exc:
            self._dirty = True
            log.error(
                "access log: cannot save %s (%s); receipts are kept in memory", self._path, exc
            )

    def _load(self, path: Path) -> None:
        try:
            document = json.loads(path.read_text())
            nodes = {
                str(node_id): _Node(
                    last={str(k): float(v) for k, v in raw["last"].items()},
                    carried={str(k): float(v) for k, v in raw["carried"].items()},
                    received=int(raw["received"]),
                    reported=bool(raw["reported"]),
                )
                for node_id, raw in document.items()
            }
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            # Losing the receipts only makes earlier entries count as received again.
            log.error("access log: %s is unreadable (%s); starting a new ledger", path, exc)
            with contextlib.suppress(OSError):
                path.rename(path.with_suffix(".bad"))
            return
        self._nodes = nodes

    def collector(self) -> Collector:
        return _Collector(self)


class _Collector(Collector):
    def __init__(self, ledger: AccessLogLedger) -> None:
        self._ledger = ledger

    def collect(self) -> Iterator[Metric]:
        totals = self._ledger.totals()
        for key, help_text in ENVOY_COUNTERS.items():
            metric = CounterMetricFamily(
                f"meshward_envoy_access_log_{key}", help_text + ", summed over Envoys"
            )
            metric.add_metric([], totals[key])
            yield metric
        received = CounterMetricFamily(
            "meshward_envoy_access_log_received",
            "Access-log entries meshward received, by the ledger (kept across restarts)",
        )
        received.add_metric([], totals[_RECEIVED])
        yield received
        unreceived = GaugeMetricFamily(
            "meshward_envoy_access_log_unreceived",
            "Entries Envoys wrote into access-log streams that never reached meshward "
            "(flushed - received per Envoy, since its first report): lost decisions, "
            "bar the few in flight",
        )
        unreceived.add_metric([], totals[_UNRECEIVED])
        yield unreceived
        reporters = GaugeMetricFamily(
            "meshward_envoy_stats_reporters",
            "Envoys whose access-log counters meshward has received (metrics service)",
        )
        reporters.add_metric([], self._ledger.details(max_nodes=0)["envoys_reporting"])
        yield reporters
