"""The audit side of ``meshward authz``: its spool, redaction, shipper child, metrics.

The authz process appends every decision to its spool (``audit.spool``) and starts
``meshward audit ship`` as a child that drains the spool into ``audit.database_url``,
restarting it whenever it exits. The child is configured over its stdin, which stays
open as its lifeline (``meshward.lifeline``): at end of file (this process closed it to
stop the child, or died, even by SIGKILL) the child ships what it can and exits. Metrics and ``/ready`` read the spool and the shipper's ``shipper.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from audit.redaction import Redaction, load_key
from audit.shipper import read_status
from audit.spool import KIND_POLICY_SET, Position, SpoolReader, SpoolWriter
from audit.store.ingest import encode_policy_set_files
from authz.policy_store import ServedPolicies
from meshward import lifeline
from meshward.config import Config

__all__ = ["AuthzAudit", "served_settings", "with_settings"]

log = logging.getLogger("meshward")
_RESTART_BACKOFF = (0.5, 1.0, 2.0, 5.0)


def served_settings(config: Config) -> dict[str, Any]:
    """The authz settings that decide how a policy set reads (kept with the set)."""
    authz = config.authz
    return {
        "trust_domain": config.trust_domain,
        "trust_domain_aliases": list(authz.trust_domain_aliases),
        "root_namespace": authz.root_namespace,
        "rego": authz.rego.model_dump(mode="json"),
    }


def with_settings(config: Config, settings: dict[str, Any]) -> Config:
    """``config`` with the authz settings a policy set was served with (see above)."""
    data = config.model_dump(mode="json")
    if settings.get("trust_domain"):
        data["trust_domain"] = settings["trust_domain"]
    for key in ("trust_domain_aliases", "root_namespace", "rego"):
        if key in settings:
            data["authz"][key] = settings[key]
    return Config.model_validate(data)


class AuthzAudit:
    """The spool writer and everything around it, for one authz process."""

    def __init__(self, config: Config) -> None:
        audit = config.audit
        self.config = config
        self.on_full = audit.on_full
        spool = audit.spool
        self.writer = SpoolWriter(
            config.audit_spool,
            segment_bytes=spool.segment_bytes,
            max_bytes=spool.max_bytes,
            sync_interval=spool.sync_interval.total_seconds(),
            sync_records=spool.sync_records,
        )
        self.redaction = Redaction.build(
            load_key(config.data_dir / "audit" / "redaction.key"),
            headers=audit.redact_headers,
            query_parameters=audit.redact_query_parameters,
            store_body=audit.store_body,
            max_body_bytes=audit.max_body_bytes,
        )
        self._reader = SpoolReader(config.audit_spool)
        self._child: subprocess.Popen[bytes] | None = None
        self._restarts = 0

    @property
    def required(self) -> bool:
        """Whether a request must be denied when its record cannot be kept."""
        return self.on_full == "deny"

    def policy_set_served(self, served: ServedPolicies) -> None:
        """Keep the files of a newly served set in the audit trail, for ``explain``."""
        document = orjson.dumps(
            {
                "version": served.version,
                "time_us": time.time_ns() // 1000,
                "files": encode_policy_set_files(served.sources),
                "settings": served_settings(self.config),
            }
        )
        if not self.writer.append(KIND_POLICY_SET, document):
            log.warning(
                "audit: policy set %s (%d bytes) is not kept in the audit trail (spool full, "
                "or larger than audit.spool.segment_bytes): `meshward audit explain` will "
                "not show its policies",
                served.version,
                len(document),
            )

    # -- the shipper child -------------------------------------------------------------

    async def supervise_shipper(self) -> None:
        """Run ``meshward audit ship`` until cancelled, restarting it when it exits."""
        try:
            while True:
                child = self._start_child()
                code = await asyncio.to_thread(child.wait)
                if child.stdin is not None:
                    with contextlib.suppress(OSError):
                        child.stdin.close()
                delay = _RESTART_BACKOFF[min(self._restarts, len(_RESTART_BACKOFF) - 1)]
                self._restarts += 1
                log.error(
                    "audit: the shipper (pid %d) exited with %s; restarting it in %.1fs (the "
                    "spool keeps every record meanwhile)",
                    child.pid,
                    code,
                    delay,
                )
                await asyncio.sleep(delay)
        finally:
            await asyncio.shield(asyncio.to_thread(self._stop_child))

    def _start_child(self) -> subprocess.Popen[bytes]:
        self._child = lifeline.spawn(["audit", "ship"], self.config)
        return self._child

    def _stop_child(self) -> None:
        """Stop the shipper once it has shipped what it can; if it was not running (killed,
        or between restarts), run one that does just that."""
        child = self._child
        if child is None or child.poll() is not None:
            child = self._start_child()
        lifeline.stop(child)  # end of file: the shipper ships what is there, then exits

    @property
    def shipper_pid(self) -> int | None:
        child = self._child
        return child.pid if child is not None and child.poll() is None else None

    # -- reporting ---------------------------------------------------------------------

    def details(self) -> tuple[bool, dict[str, Any]]:
        """``/ready``'s ``audit`` entry, and whether the audit trail lets requests through."""
        stats = self.writer.stats()
        status = read_status(self.config.audit_spool) or {}
        position = Position(int(status.get("segment", 0)), int(status.get("offset", 0)))
        details: dict[str, Any] = {
            "spool": str(self.config.audit_spool),
            "spool_bytes": stats.bytes,
            "max_bytes": self.config.audit.spool.max_bytes,
            "pending_bytes": self._reader.pending_bytes(position),
            "records_written": stats.written,
            "records_lost": stats.lost,
            "on_full": self.on_full,
            "shipper": {
                "running": self.shipper_pid is not None,
                "restarts": self._restarts,
                "database": status.get("database"),
                "shipped": status.get("shipped", 0),
                "lag_seconds": _lag(status),
                "last_error": status.get("last_error"),
            },
        }
        ok = True
        if stats.full:
            details["full"] = (
                "the spool is full: every request is denied (audit_unavailable) until the "
                "shipper catches up"
                if self.required
                else "the spool is full: records are being lost (counted in records_lost)"
            )
            ok = not self.required
        return ok, details

    def collector(self) -> Collector:
        return _AuditCollector(self)

    def close(self) -> None:
        self.writer.close()


def _lag(status: dict[str, Any]) -> float:
    oldest = status.get("oldest_pending_us")
    return max(0.0, time.time() - oldest / 1e6) if oldest else 0.0


class _AuditCollector(Collector):
    def __init__(self, audit: AuthzAudit) -> None:
        self._audit = audit

    def collect(self) -> Iterator[Metric]:
        _, details = self._audit.details()
        shipper = details["shipper"]
        yield _counter(
            "meshward_audit_records_written",
            "Decision records appended to the spool",
            details["records_written"],
        )
        yield _counter(
            "meshward_audit_records_lost",
            "Decision records that could not be kept (spool full or unwritable); with "
            "audit.on_full: deny those requests were denied, with allow they were served",
            details["records_lost"],
        )
        yield _counter(
            "meshward_audit_records_shipped",
            "Records the shipper has stored in the audit database, over every run",
            shipper["shipped"] or 0,
        )
        yield _gauge(
            "meshward_audit_spool_bytes", "Bytes of spool segments on disk", details["spool_bytes"]
        )
        yield _gauge(
            "meshward_audit_spool_pending_bytes",
            "Spool bytes not yet stored in the audit database",
            details["pending_bytes"],
        )
        yield _gauge(
            "meshward_audit_spool_max_bytes", "audit.spool.max_bytes", details["max_bytes"]
        )
        yield _gauge(
            "meshward_audit_spool_full", "1 while the spool has no room", int("full" in details)
        )
        yield _gauge(
            "meshward_audit_shipper_lag_seconds",
            "Age of the oldest record not yet stored (0: the shipper has caught up)",
            shipper["lag_seconds"],
        )
        yield _gauge(
            "meshward_audit_shipper_up", "1 while the shipper process runs", int(shipper["running"])
        )
        yield _gauge(
            "meshward_audit_shipper_failing",
            "1 while the shipper's last attempt to store failed (see /ready)",
            int(bool(shipper["last_error"])),
        )


def _counter(name: str, documentation: str, value: float) -> Metric:
    metric = CounterMetricFamily(name, documentation)
    metric.add_metric([], value)
    return metric


def _gauge(name: str, documentation: str, value: float) -> Metric:
    metric = GaugeMetricFamily(name, documentation)
    metric.add_metric([], value)
    return metric
