"""``meshward audit …`` and ``meshward policy replay``: the audit trail from the shell.

``meshward audit`` serves the query API and the page; ``query``, ``tail`` and
``explain`` ask that API (``--audit-url``, default ``http://<audit.listen>``, env
``MESHWARD_AUDIT_URL``); ``ship`` drains a spool. ``policy replay`` fetches recorded
decisions from the API and re-evaluates them here, against a local candidate
directory, under the authz settings each decision was recorded with (fetched from the
API; this machine's config only where the trail does not keep them, flags over both):
what a CI job of a policy repository runs.
"""

from __future__ import annotations

import base64
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click
import httpx

from audit.errors import AuditError
from audit.store.queries import FILTERS
from audit.timespec import format_time, parse_time
from meshward import lifeline
from meshward.cli_options import (
    F,
    common,
    config_from,
    config_options,
    emit,
    handle_errors,
    log_level_option,
    setup_logging,
)
from meshward.config import Config

__all__ = ["audit", "policy_replay"]

_TIMEOUT = httpx.Timeout(30.0, read=300.0)  # a replay's export may stream for minutes


def _filter_options(func: F) -> F:
    """One option per filter of the query API (``--principal-prefix`` for principal_prefix)."""
    flags = {"allowed", "dry_run_flip"}
    for name in reversed(FILTERS):
        if name in flags:
            continue
        func = click.option(f"--{name.replace('_', '-')}", name, help=FILTERS[name])(func)
    func = click.option(
        "--allowed/--denied", "allowed", default=None, help="Allowed, or denied, decisions only."
    )(func)
    return click.option(
        "--dry-run-flip",
        is_flag=True,
        help="Only decisions some dry-run policy would have changed.",
    )(func)


# A decision is stored after it was made: Envoy's access log arrives in batches a second
# or more later, and each authz worker ships its own spool. `tail` looks this far behind
# the newest decision it showed, and shows each one once.
_LATE_US = 5_000_000


def _filter_params(values: dict[str, Any]) -> dict[str, str]:
    params: dict[str, str] = {}
    for name in FILTERS:
        value = values.pop(name, None)
        if value is None or (name == "dry_run_flip" and not value):
            continue
        params[name] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return params


def _url_option(func: F) -> F:
    return click.option(
        "--audit-url",
        envvar="MESHWARD_AUDIT_URL",
        help="The audit API (default http://<audit.listen>, env MESHWARD_AUDIT_URL).",
    )(func)


class _Api:
    """The audit API over HTTP; every failure a one-line AuditError."""

    def __init__(self, config: Config, url: str | None) -> None:
        self.base = (url or f"http://{config.audit.listen}").rstrip("/")
        self._client = httpx.Client(base_url=self.base, timeout=_TIMEOUT)
        self._settings: dict[str, dict[str, Any] | None] = {}

    def __enter__(self) -> _Api:
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.close()

    def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        params = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = self._client.get(path, params=params)
        except httpx.HTTPError as exc:
            raise AuditError(
                f"cannot reach the audit API at {self.base} ({exc}); is `meshward audit` "
                "running? (set --audit-url or MESHWARD_AUDIT_URL)"
            ) from exc
        return self._checked(response).json()

    def get_if_found(self, path: str) -> Any | None:
        """``get``, or None when the API answers 404 (that, or an older API without it)."""
        try:
            return self.get(path)
        except _NotFound:
            return None

    def lines(self, path: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        try:
            with self._client.stream("GET", path, params=params) as response:
                if response.status_code != 200:
                    response.read()
                    self._checked(response)
                for line in response.iter_lines():
                    if line:
                        yield json.loads(line)
        except httpx.HTTPError as exc:
            raise AuditError(f"reading {path} from the audit API at {self.base}: {exc}") from exc

    def _checked(self, response: httpx.Response) -> httpx.Response:
        if response.status_code == 200:
            return response
        try:
            body = response.json()
            message = body.get("error") or body.get("detail") or response.text
        except ValueError:
            message = response.text
        error = _NotFound if response.status_code == 404 else AuditError
        raise error(f"audit API: {message} (HTTP {response.status_code})")

    def settings_of(self, version: str) -> dict[str, Any] | None:
        """The authz settings policy-set ``version`` was served with (None: not kept)."""
        if version not in self._settings:
            found = self.get_if_found(f"/v1/policy-sets/{quote(version, safe='')}")
            self._settings[version] = found.get("settings") if found else None
        return self._settings[version]


class _NotFound(AuditError):
    """The API answered 404."""


@click.group("audit", invoke_without_command=True)
@common
@click.option("--listen", help="host:port of the API and page (audit.listen; 127.0.0.1:8090).")
@click.option("--database-url", help="The audit store (default SQLite in the data dir).")
@click.option(
    "--policies",
    type=click.Path(path_type=Path, file_okay=False),
    help="A policy directory the page's replay form may read (also audit.replay_roots).",
)
@log_level_option
@click.pass_context
@handle_errors
def audit(
    ctx: click.Context,
    config_path: Path | None,
    data_dir: Path | None,
    output: str,
    listen: str | None,
    database_url: str | None,
    policies: Path | None,
    log_level: str | None,
) -> None:
    """Serve the audit trail: query API (OpenAPI at /docs), the page, /metrics.

    Reads the store read-only; there is no endpoint that writes. Subcommands query it.
    """
    if ctx.invoked_subcommand is not None:
        return
    from meshward.audit_runtime import run_audit_server

    config = config_from(
        config_path,
        data_dir=data_dir,
        log_level=log_level,
        **{"audit.listen": listen, "audit.database_url": database_url},
    )
    setup_logging(config)
    run_audit_server(config, policies=policies)


@audit.command("ship")
@common
@click.option("--once", is_flag=True, help="Drain what the spool holds, then exit.")
@click.option(
    "--config-stdin",
    is_flag=True,
    hidden=True,
    help="Read the config as one JSON line on stdin, and stop at end of file (how "
    "meshward authz runs its shipper).",
)
@log_level_option
@handle_errors
def ship(
    config_path: Path | None,
    data_dir: Path | None,
    output: str,
    once: bool,
    config_stdin: bool,
    log_level: str | None,
) -> None:
    """Drain <data-dir>/audit/spool into audit.database_url.

    `meshward authz` runs this for its own spool and restarts it if it exits; run it by
    hand to drain the spool of an authz that is gone (--once).
    """
    from meshward.audit_runtime import run_shipper

    if config_stdin:
        config = lifeline.read_config()
    else:
        config = config_from(config_path, data_dir=data_dir, log_level=log_level)
    setup_logging(config)
    run_shipper(config, once=once, lifeline=sys.stdin.buffer if config_stdin else None)


def _query_options(func: F) -> F:
    func = click.option(
        "--output",
        type=click.Choice(["table", "json"]),
        default="table",
        show_default=True,
        help="A table, or JSON (one object per decision for tail).",
    )(func)
    return _url_option(config_options(func))


@audit.command("query")
@_query_options
@_filter_options
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True)
@handle_errors
def query(
    config_path: Path | None,
    data_dir: Path | None,
    output: str,
    audit_url: str | None,
    limit: int,
    **filters: Any,
) -> None:
    """Decisions matching the filters, newest first."""
    params = _filter_params(filters)
    config = config_from(config_path, data_dir=data_dir)
    items: list[dict[str, Any]] = []
    with _Api(config, audit_url) as api:
        cursor = None
        while len(items) < limit:
            page = api.get(
                "/v1/decisions",
                {**params, "limit": min(1000, limit - len(items)), "cursor": cursor},
            )
            items += page["items"]
            cursor = page["next_cursor"]
            if cursor is None:
                break
    emit("json" if output == "json" else "text", items, _table)


@audit.command("tail")
@_query_options
@_filter_options
@click.option(
    "--interval", type=float, default=1.0, show_default=True, help="Seconds between polls."
)
@click.option("--count", type=click.IntRange(1), help="Stop after this many decisions.")
@handle_errors
def tail(
    config_path: Path | None,
    data_dir: Path | None,
    output: str,
    audit_url: str | None,
    interval: float,
    count: int | None,
    **filters: Any,
) -> None:
    """Follow new decisions as they are stored (from now, or --since), until Ctrl-C."""
    params = _filter_params(filters)
    now_us = time.time_ns() // 1000
    floor = parse_time(params.pop("since", "0s"), now_us=now_us, field="since")
    config = config_from(config_path, data_dir=data_dir)
    shown = 0
    header = output != "json"
    # Decision time → decision id of what was shown within _LATE_US of the newest one.
    seen: dict[str, int] = {}
    newest = floor
    with _Api(config, audit_url) as api:
        try:
            while count is None or shown < count:
                fresh = [
                    item
                    for item in _decisions_since(api, params, max(floor, newest - _LATE_US))
                    if item["decision_id"] not in seen
                ]
                for item in fresh[: None if count is None else count - shown]:
                    if output == "json":
                        click.echo(json.dumps(item, sort_keys=True))
                    else:
                        click.echo(_table([item], header=header))
                        header = False
                    shown += 1
                    seen[item["decision_id"]] = item["time_us"]
                    newest = max(newest, item["time_us"])
                seen = {k: t for k, t in seen.items() if t >= newest - _LATE_US}
                if not fresh:
                    time.sleep(interval)
        except KeyboardInterrupt:
            return


def _decisions_since(api: _Api, params: dict[str, str], since_us: int) -> Iterator[dict[str, Any]]:
    """Every stored decision from ``since_us`` on, the oldest first."""
    cursor = None
    while True:
        page = api.get(
            "/v1/decisions",
            {
                **params,
                "since": format_time(since_us),
                "order": "oldest",
                "limit": 500,
                "cursor": cursor,
            },
        )
        yield from page["items"]
        if len(page["items"]) < 500:
            return
        cursor = page["next_cursor"]


@audit.command("explain")
@_query_options
@click.argument("decision_id")
@handle_errors
def explain(
    config_path: Path | None,
    data_dir: Path | None,
    output: str,
    audit_url: str | None,
    decision_id: str,
) -> None:
    """Why DECISION_ID was decided (the x-meshward-decision-id a client got)."""
    config = config_from(config_path, data_dir=data_dir)
    with _Api(config, audit_url) as api:
        report = api.get(f"/v1/decisions/{decision_id}/explain")
    emit("json" if output == "json" else "text", report, _explanation)


@click.command("replay")
@common
@click.option(
    "--policies",
    "directory",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="The candidate policy directory (istio/ and rego/ inside).",
)
@_url_option
@_filter_options
@click.option(
    "--limit",
    type=click.IntRange(1),
    default=100_000,
    show_default=True,
    help="Replay at most this many decisions, the newest; the report says when more match.",
)
@click.option("--fail-on-flip", is_flag=True, help="Exit 1 when any decision would flip.")
@click.option(
    "--trust-domain",
    help="Replay under this trust domain instead of the one each decision was recorded "
    "under (the report notes the difference).",
)
@handle_errors
def policy_replay(
    config_path: Path | None,
    data_dir: Path | None,
    output: str,
    directory: Path,
    audit_url: str | None,
    limit: int,
    fail_on_flip: bool,
    trust_domain: str | None,
    **filters: Any,
) -> None:
    """Re-evaluate recorded decisions (default: the last 24 h) against --policies.

    Reports every decision that would flip (allow→deny, deny→allow), grouped by the
    policy that decides the difference and by caller, with examples. Each decision is
    decided under the authz settings it was recorded with (trust domain, root
    namespace, Rego decision and mode), as the audit trail keeps them; this machine's
    config stands in where it does not. Requests the trail kept too little of to decide
    again (a redacted header the candidate reads) are counted, not guessed.
    """
    from authz.errors import PolicyLoadError
    from authz.replay import report_text
    from meshward.audit_tools import replay_decisions

    params = _filter_params(filters)
    params.setdefault("since", "24h")
    config = config_from(config_path, data_dir=data_dir, trust_domain=trust_domain)
    # Only a flag overrides what was recorded: a config file's or the environment's
    # trust domain is for decisions whose settings the trail does not keep.
    overrides = {"trust_domain": config.trust_domain} if trust_domain else {}
    if not directory.is_dir():
        raise click.BadParameter(f"{directory} is not a directory", param_hint="--policies")
    with _Api(config, audit_url) as api:
        decisions = _decoded(
            api.lines("/v1/decisions/export", {**params, "include_request": "true"})
        )
        try:
            report = replay_decisions(
                config,
                directory,
                decisions,
                recorded=api.settings_of,
                overrides=overrides,
                limit=limit,
            )
        except PolicyLoadError as exc:
            click.echo("\n".join(f"error: {i}" for i in exc.issues), err=True)
            sys.exit(1)
    emit(output, report, report_text)
    if fail_on_flip and any(report["flips"].values()):
        sys.exit(1)


def _decoded(items: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for item in items:
        blob = item.get("request")
        item["request"] = base64.b64decode(blob) if blob else None
        yield item


# -- text forms -------------------------------------------------------------------------

_COLUMNS: list[tuple[str, int, Callable[[dict[str, Any]], str]]] = [
    ("TIME", 24, lambda d: d["time"][:23] + "Z"),
    ("DECISION", 32, lambda d: d["decision_id"]),
    ("OUTCOME", 9, lambda d: "allow" if d["allowed"] else f"deny {d['status'] or ''}".strip()),
    ("SOURCE", 40, lambda d: d["source_principal"] or d["source_ip"] or "-"),
    (
        "DESTINATION",
        24,
        lambda d: f"{d['destination_namespace'] or '-'}/{d['destination_workload'] or '-'}",
    ),
    ("REQUEST", 36, lambda d: f"{d['method'] or ''} {d['path'] or ''}".strip() or "-"),
    ("DECIDED BY", 0, lambda d: d["policy_id"] or d["reason"]),
]


def _table(items: list[dict[str, Any]], *, header: bool = True) -> str:
    if not items:
        return "no decisions match"
    lines = []
    if header:
        lines.append("  ".join(name.ljust(width) for name, width, _ in _COLUMNS).rstrip())
    for item in items:
        cells = []
        for _, width, cell in _COLUMNS:
            text = cell(item)
            if width and len(text) > width:
                text = text[: width - 1] + "…"
            cells.append(text.ljust(width))
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _explanation(report: dict[str, Any]) -> str:
    from authz.decision_trace import shadow_lines

    d = report["decision"]
    outcome = "allowed" if d["allowed"] else f"denied {d['status'] or ''}".rstrip()
    lines = [
        f"decision   {d['decision_id']}  at {d['time']}",
        f"outcome    {outcome} ({d['reason']}), engine {d['engine']}, decided by "
        f"{d['policy_id'] or '-'}",
        f"from       {d['source_principal'] or 'no client certificate'}"
        + (f" ({d['source_ip']})" if d.get("source_ip") else "")
        + (f", end user {d['request_principal']}" if d.get("request_principal") else ""),
        f"to         {d['destination_namespace']}/{d['destination_workload'] or '-'}"
        + (f" service {d['destination_service']}" if d.get("destination_service") else "")
        + (f" port {d['destination_port']}" if d.get("destination_port") else ""),
        f"request    {d['method'] or ''} {d['path'] or ''}"
        + (f"  (host {d['host']})" if d["host"] else ""),
    ]
    policy_set = report["policy_set"]
    kept = f"kept, {len(policy_set['files'])} files" if policy_set["kept"] else "not kept"
    lines.append(f"policy set {policy_set['version'] or '-'} ({kept})")
    istio = report.get("istio")
    if istio is not None:
        lines += ["", "Istio"]
        if not istio["policies"]:
            lines.append("  no AuthorizationPolicy applies to the workload")
        for match in istio["policies"]:
            kind = match["action"] + (" (dry-run)" if match["dry_run"] else "")
            found = match["matched_rule"] or "no rule matched"
            lines.append(f"  {kind:<16} {match['policy']:<40} {found}")
        lines.append(
            f"  verdict: {'allowed' if istio['allowed'] else 'denied'} ({istio['reason']})"
            + (f", decided by {istio['policy_id']}" if istio["policy_id"] else "")
        )
        lines += shadow_lines(istio)
    again = report.get("reevaluated")
    # Values evaluated on a request that lacks what the policies read are not the decision's.
    unlike = " of the stored request" if again and again.get("not_reevaluable") else ""
    rego = report.get("rego")
    if rego is not None:
        lines += ["", "Rego", f"  decision {rego['decision']} (package {rego['package']})"]
        if d.get("rego_result") is not None:
            lines.append(f"  recorded: {json.dumps(d['rego_result'], sort_keys=True)}")
        for key, label in (("result", "value"), ("shadow", "with dry-run packages")):
            value = rego.get(key)
            if value is not None:
                lines.append(f"  {label}{unlike}: {json.dumps(value, sort_keys=True)}")
    elif d.get("rego_decision"):
        lines += ["", "Rego", f"  decision {d['rego_decision']}: {d.get('rego_result')}"]
    if d["dry_run_flips"]:
        lines += ["", "Dry-run policies that would have changed it"]
        lines += [f"  {f['engine']} {f['policy']} → {f['to']}" for f in d["dry_run_flips"]]
    if again is not None:
        verdict = "allowed" if again["allowed"] else "denied"
        if again.get("not_reevaluable"):
            same = "not comparable (see the note)"
        else:
            same = "the same as recorded" if again["reproduced"] else "NOT what was recorded"
        lines += ["", f"evaluated again{unlike}: {verdict} ({again['reason']}), {same}"]
    if report.get("notes"):
        lines += ["", *(f"note: {n}" for n in report["notes"])]
    return "\n".join(lines)
