"""``meshward audit …``: the audit trail's server, shipper and queries."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from meshward.cli_options import common, config_from, handle_errors, setup_logging
from meshward.config import Config

__all__ = ["audit"]


@click.group("audit", invoke_without_command=True)
@click.pass_context
def audit(ctx: click.Context) -> None:
    """The audit trail: every decision, queried by API, page and CLI."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@audit.command("ship")
@common
@click.option("--once", is_flag=True, help="Drain what the spool holds, then exit.")
@click.option(
    "--config-stdin",
    is_flag=True,
    hidden=True,
    help="Read the whole config as JSON on stdin (how meshward authz starts its shipper).",
)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None)
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
        config = Config.model_validate_json(sys.stdin.buffer.read())
    else:
        config = config_from(config_path, data_dir=data_dir, log_level=log_level)
    setup_logging(config)
    run_shipper(config, once=once, follow_parent=config_stdin)
