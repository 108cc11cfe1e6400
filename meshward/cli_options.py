"""What the command modules share: common options, error handling, config, output."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from audit.errors import AuditError
from identity.errors import IdentityError
from meshward.admin_client import AdminError
from meshward.config import Config, ConfigError, load_config
from meshward.durations import parse_duration

__all__ = [
    "DURATION",
    "F",
    "common",
    "config_from",
    "config_options",
    "emit",
    "handle_errors",
    "log_level_option",
    "server_options",
    "setup_logging",
]

F = TypeVar("F", bound=Callable[..., Any])


class DurationType(click.ParamType):  # type: ignore[type-arg]
    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DURATION = DurationType()


def config_options(func: F) -> F:
    """Where the config file and the data dir are."""
    func = click.option(
        "--data-dir",
        type=click.Path(path_type=Path, file_okay=False),
        help="Data directory (default ./.meshward, env MESHWARD_DATA_DIR).",
    )(func)
    return click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path, dir_okay=False),
        envvar="MESHWARD_CONFIG",
        help="YAML config file (env MESHWARD_CONFIG).",
    )(func)


def common(func: F) -> F:
    """Options every command takes: where the config and the data dir are, and output form."""
    func = click.option(
        "--output",
        type=click.Choice(["text", "json"]),
        default="text",
        envvar="MESHWARD_OUTPUT",
        show_default=True,
        help="Output format.",
    )(func)
    return config_options(func)


log_level_option = click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None
)


def server_options(func: F) -> F:
    options = [
        click.option("--trust-domain", help="Trust domain (env MESHWARD_TRUST_DOMAIN)."),
        click.option("--database-url", help="SQLAlchemy URL (default SQLite in the data dir)."),
        log_level_option,
    ]
    for option in reversed(options):
        func = option(func)
    return func


def handle_errors(func: F) -> F:
    """Turn every expected failure into one line on stderr and exit code 1; never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (AdminError, AuditError, ConfigError, IdentityError) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def config_from(config_path: Path | None, **flags: Any) -> Config:
    return load_config(config_path, flags=flags)


def emit(output: str, data: Any, text: Callable[[Any], str]) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True) if output == "json" else text(data))


def setup_logging(config: Config) -> None:
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Alembic narrates every start at INFO, which buries what the server itself says.
    logging.getLogger("alembic.runtime.migration").setLevel(
        max(logging.WARNING, logging.getLogger().level)
    )
